"""The server's routes, one module per group (ops, models, inference, admin), each an ``APIRouter`` factory.

Imports ``server.http`` modules only."""
