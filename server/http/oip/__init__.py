"""The Open Inference Protocol (KServe v2 / Triton HTTP) on top of the same batcher and engine as ``/v1``.

:mod:`~server.http.oip.schemas` -- the protocol's JSON objects (pydantic);
:mod:`~server.http.oip.wire` -- tensors on the wire: JSON data and the binary tensor data extension;
:mod:`~server.http.oip.model` -- what the served bundle looks like as a v2 model: metadata, inputs, outputs.
The routes are :mod:`server.http.routes.v2`.
"""
