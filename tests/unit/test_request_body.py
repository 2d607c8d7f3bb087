"""The large-JSON path of the server's body decoder (a child process parses, the server wraps
raw bytes) gives the very request the in-thread decoder gives, and the same 400s."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import numpy as np
import pytest
from kserve.errors import InvalidInput

from pipeline.serving.request_body import BodyDecoder, decode_request, join_json_tensors, split_json_tensors

MODEL = "hospital-a"


def _via_child_format(body: bytes):
    """The split/join round trip, in this process (what the child and the server each do)."""
    answer = split_json_tensors(body)
    if isinstance(answer, str):
        raise InvalidInput(answer)
    return join_json_tensors(*answer, MODEL)


def _same(a, b) -> None:
    assert (a.id, a.parameters, a.model_name) == (b.id, b.parameters, b.model_name)
    assert [(o.name, o.parameters) for o in a.request_outputs or []] == [
        (o.name, o.parameters) for o in b.request_outputs or []
    ]
    for x, y in zip(a.inputs, b.inputs, strict=True):
        assert (x.name, x.shape, x.datatype, x.parameters) == (y.name, y.shape, y.datatype, y.parameters)
        if x.datatype == "BYTES":
            assert x.data == y.data
        else:
            np.testing.assert_array_equal(x.as_numpy(), y.as_numpy())
            assert x.as_numpy().dtype == y.as_numpy().dtype


def _body(**request) -> bytes:
    return json.dumps(request).encode()


SIGNALS = np.random.default_rng(0).normal(size=(2, 12, 50)).astype(np.float32)

REQUESTS = {
    "flat FP32 with parameters": _body(
        id="r1",
        parameters={"sample_rate": 250, "version": "3"},
        inputs=[{"name": "signals", "datatype": "FP32", "shape": [2, 12, 50], "data": SIGNALS.ravel().tolist()}],
        outputs=[{"name": "probabilities"}],
    ),
    "nested FP64": _body(
        inputs=[{"name": "signals", "datatype": "FP64", "shape": [2, 12, 50], "data": SIGNALS.astype(float).tolist()}]
    ),
    "ints and bytes side by side": _body(
        inputs=[
            {"name": "records", "datatype": "BYTES", "shape": [1, 2], "data": ["aGVh", "ZGF0"]},
            {"name": "counts", "datatype": "INT32", "shape": [3], "data": [1, -2, 3], "parameters": {"a": 1}},
        ]
    ),
    "NaN is data, judged later": b'{"inputs": [{"name": "signals", "datatype": "FP32", "shape": [2], "data": [NaN, 1.0]}]}',
    "data that does not fit the shape stays as sent": _body(
        inputs=[{"name": "signals", "datatype": "FP32", "shape": [2, 2], "data": [[1.0, 2.0], [3.0]]}]
    ),
}


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_the_child_format_gives_the_request_the_thread_gives(name):
    body = REQUESTS[name]
    direct, joined = decode_request(body, {}, MODEL), _via_child_format(body)
    if name.startswith("data that does not fit"):
        assert joined.inputs[0].data == direct.inputs[0].data  # the server's shape check names it
        return
    _same(direct, joined)


@pytest.mark.parametrize(
    "body",
    [
        b"not json at all",
        b'{"inputs": [',
        b'{"inputs": [{"name": "signals", "shape": [1], "data": [1.0]}]}',
        b'{"inputs": "nope"}',
        b'{"inputs": [{"name": "x", "datatype": "FP16", "shape": [1], "data": [1.0]}]}',
    ],
)
def test_a_malformed_body_is_the_same_400_on_both_paths(body):
    with pytest.raises(InvalidInput) as direct:
        decode_request(body, {}, MODEL)
    with pytest.raises(InvalidInput) as joined:
        _via_child_format(body)
    assert str(direct.value) == str(joined.value)
    assert "malformed request" in str(direct.value) or "FP16" in str(direct.value)


def test_the_decoder_parses_large_json_in_its_child_and_survives_the_childs_death():
    """With every JSON body counted large, requests go to the child; killed, it is replaced and
    the request in flight is still answered."""
    decoder = BodyDecoder(large_json_bytes=0)
    body = REQUESTS["flat FP32 with parameters"]
    try:
        decoder.start()
        child = decoder._executor().submit(os.getpid).result()
        assert child != os.getpid()
        _same(asyncio.run(decoder.decode(body, {}, MODEL)), decode_request(body, {}, MODEL))
        with pytest.raises(InvalidInput, match="not JSON"):
            asyncio.run(decoder.decode(b"nope", {}, MODEL))
        os.kill(child, signal.SIGKILL)
        _same(asyncio.run(decoder.decode(body, {}, MODEL)), decode_request(body, {}, MODEL))
        replacement = decoder._executor().submit(os.getpid).result()
        assert replacement not in (child, os.getpid())
    finally:
        decoder.close()
