"""Decoding a v2 REST request body without stalling the server's event loop.

A JSON body is parsed by ``orjson``, which holds the GIL for the whole parse (~4 ms per MB on
the 2-core machine): a worker thread alone would still stall ``/v2/health/live`` for ~0.25 s
on a 64 MB body. A body of :data:`LARGE_JSON_BYTES` or more is therefore parsed in a child
process, which hands back the small JSON header and each numeric tensor as raw bytes (the
shape of the binary tensor extension); the server process only wraps those bytes in numpy
arrays. Smaller bodies, and bodies in the binary extension, are decoded in a worker thread.
A body that is not a v2 request is a 400 naming what is wrong, whichever path decoded it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

BINARY_HEADER = "inference-header-content-length"  # the binary tensor extension's JSON length
LARGE_JSON_BYTES = 4 * 1024 * 1024
"""JSON bodies from this size on are parsed in the child process (below it, the GIL is held
for ~15 ms at most)."""

NUMERIC = {
    "FP32": np.float32,
    "FP64": np.float64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
}
"""Datatypes whose JSON data the child hands back as raw bytes (FP16 and BYTES stay JSON:
kserve refuses FP16 in JSON itself, and BYTES inputs are small WFDB payload pairs)."""


def _invalid(message: str) -> Exception:
    from kserve.errors import InvalidInput

    return InvalidInput(message)


def _json_payload(body: bytes) -> Any:
    """The parsed body; NaN and Infinity (not JSON) are accepted here and judged later."""
    import orjson

    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as err:
            raise _invalid(f"malformed request: body: not JSON ({err})") from None


def _inference_request(payload: Any):
    """kserve's ``InferenceRequest`` model of the payload, or a 400 naming the first problems
    (as FastAPI's validation would)."""
    from kserve.protocol.rest.v2_datamodels import InferenceRequest
    from pydantic import ValidationError

    try:
        return InferenceRequest.model_validate(payload)
    except ValidationError as err:
        problems = []
        for error in err.errors()[:5]:
            where = ".".join(str(part) for part in error.get("loc", ())) or "body"
            problems.append(f"{where}: {error.get('msg', 'invalid')}")
        raise _invalid("malformed request: " + "; ".join(problems)) from None


def decode_request(body: bytes, headers: dict[str, str], model_name: str):
    """The kserve ``InferRequest`` of a v2 REST body (JSON, or the binary extension), decoded
    in the calling thread."""
    from kserve.protocol.infer_type import InferRequest

    length = headers.get(BINARY_HEADER)
    if length is not None:
        if not length.isdigit():
            raise _invalid("malformed request: Inference-Header-Content-Length must be a number of bytes")
        return InferRequest.from_bytes(body, int(length), model_name)
    return InferRequest.from_inference_request(_inference_request(_json_payload(body)), model_name)


def split_json_tensors(body: bytes) -> tuple[bytes, list[bytes | None]] | str:
    """Child side: the request's JSON with each numeric input's ``data`` emptied, and those
    inputs' values as raw bytes (``None`` for an input left in the JSON); or the 400 message.
    Data that does not convert (ragged or not numbers) stays in the JSON, so the server's own
    shape check names it."""
    from kserve.errors import InvalidInput

    try:
        payload = _json_payload(body)
        _inference_request(payload)
    except InvalidInput as err:
        return str(err)
    raws: list[bytes | None] = []
    for item in payload["inputs"]:
        dtype = NUMERIC.get(str(item["datatype"]).upper())
        raw = None
        if dtype is not None:
            try:
                raw = np.asarray(item["data"], dtype=dtype).tobytes()
            except (ValueError, TypeError, OverflowError):
                raw = None
            else:
                item["data"] = []
        raws.append(raw)
    return json.dumps(payload, allow_nan=True).encode(), raws


def join_json_tensors(header: bytes, raws: list[bytes | None], model_name: str):
    """Server side: the ``InferRequest`` of a :func:`split_json_tensors` answer (the raw bytes
    become numpy arrays without a copy)."""
    from kserve.protocol.infer_type import InferRequest

    request = InferRequest.from_inference_request(_inference_request(_json_payload(header)), model_name)
    for tensor, raw in zip(request.inputs, raws, strict=True):
        if raw is not None:
            tensor.data = np.frombuffer(raw, dtype=NUMERIC[tensor.datatype])
    return request


class BodyDecoder:
    """Decodes request bodies off the event loop: large JSON in one child process (started at
    :meth:`start`, restarted if it dies), everything else in a worker thread."""

    def __init__(self, large_json_bytes: int = LARGE_JSON_BYTES) -> None:
        self.large_json_bytes = large_json_bytes
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the child and import its modules now, not on the first large request."""
        self._executor().submit(split_json_tensors, b'{"inputs": []}').result()

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                # spawn: the server process holds torch threads and locks a fork would copy
                self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
            return self._pool

    async def decode(self, body: bytes, headers: dict[str, str], model_name: str):
        if BINARY_HEADER in headers or len(body) < self.large_json_bytes:
            return await asyncio.to_thread(decode_request, body, headers, model_name)
        pool = self._executor()
        try:
            answer = await asyncio.wrap_future(pool.submit(split_json_tensors, body))
        except BrokenProcessPool:
            log.warning("the JSON decoding process died; restarting it and decoding this request in a thread")
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            return await asyncio.to_thread(decode_request, body, headers, model_name)
        if isinstance(answer, str):
            raise _invalid(answer)
        header, raws = answer
        return await asyncio.to_thread(join_json_tensors, header, raws, model_name)
