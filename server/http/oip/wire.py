"""Tensors on the wire: the JSON form and the binary tensor data extension (what ``tritonclient`` sends by default).

Binary form: the body is a JSON header of ``Inference-Header-Content-Length`` bytes followed by the
raw data of every input whose ``parameters.binary_data_size`` is set, in the order of ``inputs``.
FP32/INT64 raw data is little-endian row-major; a BYTES element is a 4-byte little-endian length
then its bytes. Responses use the same layout for outputs asked with ``binary_data``.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from server.http.codec import decode_json
from server.http.errors import InvalidTensor, PayloadTooLarge, UnsupportedMediaType
from server.http.oip.schemas import InferInputTensor, InferRequest

HEADER_LENGTH = "Inference-Header-Content-Length"
#: numeric datatypes -> little-endian numpy dtypes (BYTES is handled apart)
NUMPY_TYPES = {
    "BOOL": "?",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}


@dataclass
class Tensor:
    """One decoded input or output: a numeric array, or a list of byte strings (BYTES)."""

    name: str
    datatype: str
    shape: list[int]
    value: np.ndarray | list[bytes]
    from_json: bool = False  # BYTES given as JSON strings (IMAGE is then base64)


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo ``Content-Encoding`` gzip/deflate (tritonclient's request compression), at most ``limit`` bytes out."""
    if not encoding or encoding.strip().lower() == "identity":
        return body
    kind = encoding.strip().lower()
    if kind not in ("gzip", "deflate"):
        raise UnsupportedMediaType(f"Content-Encoding '{encoding}' is not supported (use gzip, deflate or none)")
    inflater = zlib.decompressobj(wbits=31 if kind == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise InvalidTensor(f"body is not valid {kind} data: {e}", code="invalid_encoding") from e
    if len(out) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(f"decompressed body is above the limit of {limit} bytes")
    return out


def parse_request(body: bytes, header_length: str | None) -> tuple[InferRequest, bytes]:
    """Body (+ the ``Inference-Header-Content-Length`` header) -> the validated JSON header and the binary rest."""
    if header_length is None:
        header, rest = body, b""
    else:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise InvalidTensor(
                f"{HEADER_LENGTH} '{header_length}' is not a length within the body of {len(body)} bytes",
                code="invalid_header_length",
            )
        n = int(header_length)
        header, rest = body[:n], body[n:]
    if not header.strip():
        raise InvalidTensor("request body is empty", code="empty_body")
    data = decode_json(header)
    if not isinstance(data, dict):
        raise InvalidTensor('the inference request must be a JSON object with "inputs"')
    try:
        return InferRequest.model_validate(data), rest
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ())) or "body"
        raise InvalidTensor(f"{loc}: {err.get('msg', 'invalid')}") from e


def _count(shape: list[int], name: str) -> int:
    if any(d < 0 for d in shape):
        raise InvalidTensor(f"input '{name}': shape {shape} has a negative dimension")
    return math.prod(shape)


def split_binary(request: InferRequest, rest: bytes) -> dict[str, bytes]:
    """The binary data of each input that has ``binary_data_size``; the sizes must add up to the body exactly."""
    chunks: dict[str, bytes] = {}
    offset = 0
    for t in request.inputs:
        size = t.parameters.get("binary_data_size")
        if size is None:
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidTensor(f"input '{t.name}': binary_data_size must be a non-negative integer")
        if t.data is not None:
            raise InvalidTensor(f"input '{t.name}' has both data and binary_data_size")
        if offset + size > len(rest):
            raise InvalidTensor(
                f"input '{t.name}': binary_data_size {size} runs past the end of the body "
                f"({len(rest) - offset} bytes left)",
                code="invalid_binary_data",
            )
        chunks[t.name] = rest[offset : offset + size]
        offset += size
    if offset != len(rest):
        raise InvalidTensor(
            f"{len(rest) - offset} bytes of binary data after the inputs' binary_data_size (sizes add up to "
            f"{offset} of {len(rest)})",
            code="invalid_binary_data",
        )
    return chunks


def deserialize_bytes(raw: bytes, name: str) -> list[bytes]:
    """BYTES raw data (length-prefixed elements) -> the elements."""
    out, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidTensor(f"input '{name}': truncated BYTES element length")
        (n,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + n > len(raw):
            raise InvalidTensor(f"input '{name}': BYTES element of {n} bytes runs past the end of its data")
        out.append(raw[offset : offset + n])
        offset += n
    return out


def serialize_bytes(values: list[bytes]) -> bytes:
    """Elements -> BYTES raw data."""
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    stack = [data]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(reversed(node))
        else:
            flat.append(node)
    return flat


def decode_input(t: InferInputTensor, raw: bytes | None) -> Tensor:
    """One input tensor (JSON data or its binary chunk) -> a :class:`Tensor` of exactly ``shape``."""
    n = _count(t.shape, t.name)
    if t.datatype == "BYTES":
        if raw is not None:
            values = deserialize_bytes(raw, t.name)
        else:
            flat = _flatten(t.data) if t.data is not None else []
            if not all(isinstance(v, str) for v in flat):
                raise InvalidTensor(f"input '{t.name}': BYTES data in JSON must be strings")
            values = [v.encode() for v in flat]
        if len(values) != n:
            raise InvalidTensor(f"input '{t.name}': shape {t.shape} needs {n} elements, got {len(values)}")
        return Tensor(t.name, t.datatype, t.shape, values, from_json=raw is None)
    dtype = NUMPY_TYPES.get(t.datatype)
    if dtype is None:
        raise InvalidTensor(f"input '{t.name}': unknown datatype '{t.datatype}'")
    if raw is not None:
        itemsize = np.dtype(dtype).itemsize
        if len(raw) != n * itemsize:
            raise InvalidTensor(
                f"input '{t.name}': shape {t.shape} of {t.datatype} needs {n * itemsize} bytes, got {len(raw)}",
                code="invalid_binary_data",
            )
        arr = np.frombuffer(raw, dtype=dtype)
    else:
        flat = _flatten(t.data) if t.data is not None else []
        if not all(isinstance(v, (int, float)) for v in flat):
            raise InvalidTensor(f"input '{t.name}': {t.datatype} data must be numbers")
        if len(flat) != n:
            raise InvalidTensor(f"input '{t.name}': shape {t.shape} needs {n} elements, got {len(flat)}")
        try:
            arr = np.asarray(flat, dtype=dtype)
        except (OverflowError, ValueError) as e:
            raise InvalidTensor(f"input '{t.name}': data does not fit {t.datatype} ({e})") from e
    return Tensor(t.name, t.datatype, t.shape, arr.reshape(t.shape))


def encode_response(header: dict[str, Any], outputs: list[Tensor], binary: list[bool]) -> tuple[bytes, dict[str, str]]:
    """Response body + headers: outputs in JSON, or as binary after the JSON header where ``binary`` says so."""
    tensors, chunks = [], []
    for out, as_binary in zip(outputs, binary):
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        if as_binary:
            raw = (
                serialize_bytes(out.value)
                if isinstance(out.value, list)
                else np.ascontiguousarray(out.value, dtype=NUMPY_TYPES[out.datatype]).tobytes()
            )
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif isinstance(out.value, list):
            entry["data"] = [v.decode() for v in out.value]
        else:
            entry["data"] = out.value.reshape(-1).tolist()
        tensors.append(entry)
    text = json.dumps({**header, "outputs": tensors}, separators=(",", ":")).encode()
    if not chunks:
        return text, {"content-type": "application/json"}
    return text + b"".join(chunks), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(text))}
