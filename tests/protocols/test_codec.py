"""Every message round-trips; every kind of bad frame is rejected with ProtocolError only."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import protocols as P
from tests.protocols.strategies import MESSAGES, STRATEGIES, token_chunk, trajectory


def _pack_array(a: np.ndarray) -> msgpack.ExtType:
    return msgpack.ExtType(1, msgpack.packb([a.dtype.str, list(a.shape), a.tobytes()]))


def test_every_message_type_has_a_strategy_and_a_unique_kind():
    kinds = [cls.KIND for cls in P.MESSAGE_TYPES]
    assert len(kinds) == len(set(kinds))
    assert all(kinds)
    assert set(STRATEGIES) == set(P.MESSAGE_TYPES)


@given(MESSAGES)
def test_round_trip_is_exact(msg):
    frame = P.encode(msg)
    back = P.decode(frame)
    assert type(back) is type(msg)
    # Byte equality of re-encoding compares every field, NaNs and arrays included.
    assert P.encode(back) == frame


@given(MESSAGES)
def test_frame_is_plain_msgpack_with_version_and_kind(msg):
    version, kind, body = msgpack.unpackb(P.encode(msg), raw=False, strict_map_key=False)
    assert version == P.SCHEMA_VERSION
    assert kind == msg.KIND
    assert isinstance(body, list)


@given(token_chunk())
def test_arrays_keep_dtype_and_shape(msg):
    back = P.decode(P.encode(msg))
    for name in ("token_ids", "logprobs", "top1_logprobs", "versions"):
        a, b = getattr(msg, name), getattr(back, name)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()


def test_big_endian_and_non_contiguous_arrays_are_normalised():
    ids = np.arange(10, dtype=">i4")[::2]
    msg = P.TokenChunk(
        request_id="r",
        sampler_id="s",
        start=0,
        token_ids=ids,
        logprobs=np.zeros(5, np.float32),
        top1_logprobs=np.zeros(5, np.float32),
        versions=np.zeros(5, np.int32),
    )
    back = P.decode(P.encode(msg))
    assert back.token_ids.dtype == np.dtype("<i4")
    assert back.token_ids.tolist() == [0, 2, 4, 6, 8]


def test_object_arrays_cannot_be_encoded():
    msg = P.ValueChunk(request_id="r", positions=np.zeros(1, np.int32), values=np.zeros(1, np.float32), critic_version=0)
    msg.values = np.array([object()], dtype=object)
    with pytest.raises(TypeError):
        P.encode(msg)


def _good_token_chunk_body():
    return [
        "r",
        "s0",
        0,
        _pack_array(np.arange(3, dtype=np.int32)),
        _pack_array(np.zeros(3, np.float32)),
        _pack_array(np.zeros(3, np.float32)),
        _pack_array(np.zeros(3, np.int32)),
        None,
    ]


def _with(body, index, value):
    body = list(body)
    body[index] = value
    return msgpack.packb([P.SCHEMA_VERSION, "token_chunk", body])


BAD_FRAMES = {
    "empty": (b"", "empty frame"),
    "not msgpack": (b"\xc1", "malformed frame envelope"),
    "not an envelope": (msgpack.packb({"a": 1}), "malformed frame envelope"),
    "wrong version": (msgpack.packb([99, "shutdown", ["x", ""]]), "unsupported schema version 99"),
    "unknown kind": (msgpack.packb([P.SCHEMA_VERSION, "reboot", []]), "unknown message kind 'reboot'"),
    "missing fields": (msgpack.packb([P.SCHEMA_VERSION, "token_chunk", ["r"]]), "invalid token_chunk"),
    "extra fields": (msgpack.packb([P.SCHEMA_VERSION, "shutdown", ["x", "y", "z"]]), "invalid shutdown"),
    "wrong field type": (_with(_good_token_chunk_body(), 2, "zero"), "invalid token_chunk"),
    "negative start": (_with(_good_token_chunk_body(), 2, -1), "start must be >= 0"),
    "unequal lengths": (
        _with(_good_token_chunk_body(), 4, _pack_array(np.zeros(2, np.float32))),
        "arrays must have equal lengths",
    ),
    "2-D token ids": (
        _with(_good_token_chunk_body(), 3, _pack_array(np.zeros((3, 1), np.int32))),
        "token_ids must be 1-D",
    ),
    "float token ids": (
        _with(_good_token_chunk_body(), 3, _pack_array(np.zeros(3, np.float32))),
        "token_ids has dtype float32",
    ),
    "object dtype": (
        _with(_good_token_chunk_body(), 3, msgpack.ExtType(1, msgpack.packb(["|O", [3], b"abc"]))),
        "array dtype '|O' not allowed",
    ),
    "short array buffer": (
        _with(_good_token_chunk_body(), 3, msgpack.ExtType(1, msgpack.packb(["<i4", [3], b"abc"]))),
        "needs 12 bytes, got 3",
    ),
    "unknown extension": (_with(_good_token_chunk_body(), 3, msgpack.ExtType(7, b"")), "unknown msgpack extension"),
    "array header lies": (b"\x93\x01\xabtoken_chunk\xdd\xff\xff\xff\xff", "truncated"),
    "absorbed without stop index": (
        msgpack.packb(
            [
                P.SCHEMA_VERSION,
                "trajectory",
                ["r", "p", 0, 1, "s", _pack_array(np.ones(2, np.int32))]
                + [_pack_array(np.zeros(3, np.int32)), _pack_array(np.zeros(3, np.float32))]
                + [_pack_array(np.zeros(3, np.float32)), _pack_array(np.zeros(3, np.int32))]
                + ["absorbed", "abort"],
            ]
        ),
        "absorbed trajectory must hold tokens 0..stop_index",
    ),
    "unknown ending": (
        msgpack.packb([P.SCHEMA_VERSION, "stream_end", ["r", "s", "exploded", 3]]),
        "invalid stream_end",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_FRAMES))
def test_bad_frame_is_rejected_with_a_message_that_says_why(name):
    frame, expected = BAD_FRAMES[name]
    with pytest.raises(P.ProtocolError) as info:
        P.decode(frame)
    assert expected in str(info.value)


def test_oversized_frame_is_rejected_before_parsing():
    frame = P.encode(P.Shutdown(reason="x" * 1000))
    with pytest.raises(P.ProtocolError, match="exceeds the limit of 100 bytes"):
        P.decode(frame, max_bytes=100)


@pytest.mark.parametrize("frame", [None, "text", 12, object()])
def test_non_bytes_is_rejected(frame):
    with pytest.raises(P.ProtocolError):
        P.decode(frame)


@given(MESSAGES, st.data())
def test_every_truncation_is_rejected(msg, data):
    frame = P.encode(msg)
    cut = data.draw(st.integers(0, len(frame) - 1))
    with pytest.raises(P.ProtocolError):
        P.decode(frame[:cut])


@given(MESSAGES, st.binary(min_size=1, max_size=8))
def test_trailing_bytes_are_rejected(msg, extra):
    with pytest.raises(P.ProtocolError):
        P.decode(P.encode(msg) + extra)


@settings(max_examples=300)
@given(MESSAGES, st.data())
def test_corrupted_frames_decode_fully_or_raise_protocol_error(msg, data):
    """Flip bytes anywhere: the result is a complete valid message or a ProtocolError."""
    frame = bytearray(P.encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(frame) - 1))
        frame[i] = data.draw(st.integers(0, 255))
    try:
        out = P.decode(bytes(frame))
    except P.ProtocolError:
        return
    assert isinstance(out, P.Message)
    assert P.decode(P.encode(out)) is not None  # a decoded message is whole: it re-encodes


@settings(max_examples=300)
@given(st.binary(max_size=256))
def test_random_bytes_never_escape_as_another_exception(frame):
    try:
        P.decode(frame)
    except P.ProtocolError:
        pass


@given(trajectory())
def test_trajectory_invariants_hold_after_decode(traj):
    back = P.decode(P.encode(traj))
    if back.ending == "absorbed":
        assert len(back.token_ids) == back.stop_index + 1
    else:
        assert back.stop_index == -1
    assert back.tokens_generated >= len(back.token_ids)


def test_kind_of_reads_the_tag_without_the_body():
    assert P.kind_of(P.encode(P.Shutdown(reason="done"))) == "shutdown"
    with pytest.raises(P.ProtocolError):
        P.kind_of(b"\x00")
