"""``vitmerge serve``: the HTTP server."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from server.cli.common import Parsers, SubParsers

if TYPE_CHECKING:
    from server.http.settings import ServerSettings


def serve_settings(args: argparse.Namespace):
    """`vitmerge serve` settings: flags given beat ``VITMERGE_*`` variables, which beat the defaults."""
    from server.http.settings import ServerSettings

    flags = {
        "host": args.host,
        "port": args.port,
        "store": args.store,
        "zoo": args.zoo,
        "admin_token": args.admin_token,
        "device": args.device,
        "max_batch_size": args.max_batch_size,
        "max_wait_ms": args.max_wait_ms,
        "mixing": args.mixing,
        "cache_bytes": args.cache_bytes,
        "watch_interval_s": args.watch_interval,
        "worker": args.worker,
    }
    return ServerSettings(**{k: v for k, v in flags.items() if v is not None})


def check_http_stack(settings: ServerSettings) -> None:
    """A loop or parser asked for by name must be installed (``auto`` falls back to asyncio / h11)."""
    import importlib.util

    for wanted in (settings.http_loop, settings.http_parser):
        if wanted in ("uvloop", "httptools") and importlib.util.find_spec(wanted) is None:
            raise ValueError(
                f"VITMERGE_HTTP_LOOP/PARSER asks for {wanted}, which is not installed: pip install {wanted}"
            )


def cmd_serve(args: argparse.Namespace) -> int:
    import logging
    import signal
    from types import FrameType

    import uvicorn

    from server.eval.examples import ready_message, write_examples
    from server.http.app import create_app

    settings = serve_settings(args)
    check_http_stack(settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("vitmerge.access").setLevel(
        logging.WARNING if args.quiet else logging.INFO
    )  # one line per request
    if settings.malloc_reuse:  # before any worker thread starts (threads keep the arena they got)
        from model_store.memory import reuse_freed_memory

        reuse_freed_memory()
    app = create_app(settings, progress=not args.quiet)
    state = app.state.vitmerge
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    base_url = f"http://{host}:{settings.port}"

    def announce(engine) -> None:
        try:
            examples = write_examples(engine, settings.layout.root / "examples")
        except Exception:  # noqa: BLE001 - examples are a convenience
            examples = {}
        print(ready_message(engine, base_url, examples, settings.playground), flush=True)

    state.on_ready.append(announce)
    print(
        f"vitmerge: starting on {base_url} (store {settings.layout.root}, zoo {settings.zoo}); /healthz is up now, "
        "/readyz once the model is loaded",
        flush=True,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning" if args.quiet else "info",
        access_log=False,
        timeout_graceful_shutdown=int(settings.request_timeout_s),
        loop=settings.http_loop,
        http=settings.http_parser,
        timeout_keep_alive=int(settings.keep_alive_s),
    )
    server = uvicorn.Server(config)
    uvicorn_exit = server.handle_exit

    def handle_exit(sig: int, frame: FrameType | None) -> None:  # SIGTERM: tell the app, then uvicorn drains
        state.stop_signal(signal.Signals(sig).name)
        uvicorn_exit(sig, frame)

    server.handle_exit = handle_exit  # type: ignore[method-assign]
    server.run()
    if not server.started:
        return 3  # uvicorn's exit code for a server that could not start (e.g. the port is taken)
    return 0


def register(sub: SubParsers, parsers: Parsers) -> None:
    """Add this group's commands to the ``vitmerge`` parser."""
    common = parsers.common
    p = sub.add_parser(
        "serve",
        parents=[common],
        help="serve the store's CURRENT bundle over HTTP (merges the zoo first if there is none)",
    )
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1; env VITMERGE_HOST)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000; env VITMERGE_PORT)")
    p.add_argument(
        "--zoo",
        default=None,
        help=(
            "source zoo: a zoo spec YAML (created in the store on first start), preset name, zoo name in the store, "
            "or directory (default tiny)"
        ),
    )
    p.add_argument("--admin-token", default=None, help="bearer token for /v1/merge (env VITMERGE_ADMIN_TOKEN)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument(
        "--max-batch-size", type=int, default=None, help="dynamic batching: images per batch (1 = off; default 32)"
    )
    p.add_argument(
        "--max-wait-ms", type=float, default=None, help="dynamic batching: max wait for a batch to fill (default 5)"
    )
    p.add_argument(
        "--mixing",
        "--strategy",  # the flag's name before "strategy" came to mean the engine's per-kind executor only
        dest="mixing",
        choices=["exact", "sparse"],
        default=None,
        help="gated bundles: how experts are mixed per image (default sparse)",
    )
    p.add_argument(
        "--cache-bytes", type=int, default=None, help="LRU budget for materialised task weights (default 512 MiB)"
    )
    p.add_argument(
        "--watch-interval", type=float, default=None, help="seconds between CURRENT polls (0 = off; default 2)"
    )
    p.add_argument(
        "--worker",
        choices=["thread", "process"],
        default=None,
        help="engine in its own process or the server process (default process)",
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_serve)
