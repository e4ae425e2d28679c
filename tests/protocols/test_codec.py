"""Every message round-trips; every kind of bad frame is rejected with ProtocolError only."""

from __future__ import annotations

import msgpack
import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import protocols as P
from tests.protocols.strategies import MESSAGES, STRATEGIES, token_batch, token_chunk, trajectory


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
    "array header lies": (
        b"\x93" + msgpack.packb(P.SCHEMA_VERSION) + b"\xabtoken_chunk\xdd\xff\xff\xff\xff", "truncated"
    ),
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


# -- TokenBatch ---------------------------------------------------------------------------------


def _batch_fields(**override):
    """A valid 3-request batch: r0 (2 tokens, first, prompt of 3), r1 (1 token), r2 (3 tokens, first, prompt of 2)."""
    fields = dict(
        sampler_id="s0",
        request_ids=["r0", "r1", "r2"],
        starts=np.array([0, 7, 0], np.int32),
        lengths=np.array([2, 1, 3], np.int32),
        token_ids=np.arange(10, 16, dtype=np.int32),
        logprobs=-np.arange(6, dtype=np.float32),
        top1_logprobs=np.full(6, -0.5, np.float32),
        versions=np.array([3, 3, 4, 5, 5, 5], np.int32),
        prompt_lengths=np.array([3, 0, 2], np.int32),
        prompt_token_ids=np.array([1, 2, 3, 8, 9], np.int32),
    )
    fields.update(override)
    return fields


def test_token_batch_entries_are_the_requests_in_order():
    batch = P.decode(P.encode(P.TokenBatch(**_batch_fields())))
    assert list(batch.entries()) == [
        P.TokenEntry("r0", 0, 0, 2, 0, 3),
        P.TokenEntry("r1", 7, 2, 3, 3, 3),
        P.TokenEntry("r2", 0, 3, 6, 3, 5),
    ]
    r0, r1, r2 = batch.chunks()
    assert (r0.request_id, r0.sampler_id, r0.start) == ("r0", "s0", 0)
    assert r0.token_ids.tolist() == [10, 11] and r0.prompt_token_ids.tolist() == [1, 2, 3]
    assert r1.start == 7 and r1.token_ids.tolist() == [12] and r1.prompt_token_ids is None
    assert r1.versions.tolist() == [4] and r1.logprobs.tolist() == [-2.0]
    assert r2.token_ids.tolist() == [13, 14, 15] and r2.prompt_token_ids.tolist() == [8, 9]


@given(token_batch())
def test_token_batch_is_exactly_its_chunks(batch):
    back = P.decode(P.encode(batch))
    chunks = list(back.chunks())
    assert [c.request_id for c in chunks] == batch.request_ids
    assert [c.start for c in chunks] == batch.starts.tolist()
    assert [len(c.token_ids) for c in chunks] == batch.lengths.tolist()
    for name in ("token_ids", "logprobs", "top1_logprobs", "versions"):
        assert np.concatenate([getattr(c, name) for c in chunks]).tobytes() == getattr(batch, name).tobytes()
    # Built back from its chunks, it is the same frame.
    assert P.encode(P.TokenBatch.from_chunks(chunks)) == P.encode(batch)


BAD_BATCHES = {
    "no requests": (dict(request_ids=[], starts=np.zeros(0, np.int32), lengths=np.zeros(0, np.int32),
                         prompt_lengths=np.zeros(0, np.int32)), "at least one request"),
    "starts for fewer requests": (dict(starts=np.array([0, 7], np.int32)), "starts has 2 entries for 3 request ids"),
    "lengths for more requests": (dict(lengths=np.array([2, 1, 3, 1], np.int32)), "lengths has 4 entries"),
    "prompt lengths missing": (dict(prompt_lengths=np.array([3], np.int32)), "prompt_lengths has 1 entries"),
    "negative start": (dict(starts=np.array([0, -1, 0], np.int32)), "starts must be >= 0"),
    "empty entry": (dict(lengths=np.array([3, 0, 3], np.int32)), "lengths must be >= 1"),
    "lengths short of the tokens": (dict(lengths=np.array([2, 1, 2], np.int32)), "lengths add up to 5 but token_ids holds 6"),
    "length past the tokens": (dict(lengths=np.array([2, 7, 3], np.int32)), "lengths has an entry of 7"),
    "negative prompt length": (dict(prompt_lengths=np.array([3, -1, 3], np.int32)), "prompt_lengths must be >= 0"),
    "prompts that do not add up": (dict(prompt_lengths=np.array([3, 0, 1], np.int32)), "prompt_lengths add up to 4"),
    "unequal token arrays": (dict(logprobs=np.zeros(5, np.float32)), "arrays must have equal lengths"),
    "float starts": (dict(starts=np.zeros(3, np.float32)), "starts has dtype float32"),
    "2-D lengths": (dict(lengths=np.ones((3, 1), np.int32)), "lengths must be 1-D"),
    "float token ids": (dict(token_ids=np.zeros(6, np.float32)), "token_ids has dtype float32"),
}


@pytest.mark.parametrize("name", sorted(BAD_BATCHES))
def test_inconsistent_token_batch_is_rejected(name):
    override, expected = BAD_BATCHES[name]
    with pytest.raises(ValueError, match=expected):
        P.TokenBatch(**_batch_fields(**override))
    # The same fields from the wire: a ProtocolError that says the same.
    body = [v if not isinstance(v, np.ndarray) else _pack_array(v) for v in _batch_fields(**override).values()]
    with pytest.raises(P.ProtocolError, match=expected):
        P.decode(msgpack.packb([P.SCHEMA_VERSION, "token_batch", body]))


def test_token_batch_from_chunks_needs_one_sampler():
    a = next(P.TokenBatch(**_batch_fields()).chunks())
    b = msgspec.structs.replace(a, sampler_id="other")
    with pytest.raises(ValueError, match="one sampler"):
        P.TokenBatch.from_chunks([a, b])
    with pytest.raises(ValueError, match="at least one request"):
        P.TokenBatch.from_chunks([])


def _as_version(frame: bytes, version: int) -> bytes:
    _, kind, body = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    return msgpack.packb([version, kind, body], use_bin_type=True)


@given(MESSAGES, st.sampled_from([1, 2]))
def test_frames_of_schema_1_and_2_are_refused(msg, version):
    """Schema 3 changed WorkRequest (typed sampler, session and intent) and added SlotsQuery: a
    frame of an older schema, of any kind, is refused with the codec's unsupported-version error."""
    old = _as_version(P.encode(msg), version)
    for read in (P.decode, P.kind_of):
        with pytest.raises(P.ProtocolError, match=f"unsupported schema version {version} .*reads 3..{P.SCHEMA_VERSION}"):
            read(old)


def test_a_schema_2_work_request_with_a_tagged_sampler_id_is_refused():
    """What a sampler of the previous build sends: its session and "hello" inside sampler_id."""
    frame = msgpack.packb([2, "work_request", ["sampler-0@hostA#1f-2a#hello", 4, 0]], use_bin_type=True)
    with pytest.raises(P.ProtocolError, match="unsupported schema version 2"):
        P.decode(frame)


def test_work_request_fields_say_what_it_is():
    req = P.WorkRequest(sampler="sampler-0@hostA", free_slots=4, policy_version=0, session="1f-2a", intent="hello")
    back = P.decode(P.encode(req))
    assert (back.sampler, back.session, back.intent, back.free_slots) == ("sampler-0@hostA", "1f-2a", "hello", 4)
    plain = P.decode(P.encode(P.WorkRequest(sampler="sampler-0", free_slots=1, policy_version=0)))
    assert (plain.session, plain.intent) == ("", "ordinary")
    body = msgpack.unpackb(P.encode(req), raw=False)[2]
    body[4] = "goodbye"
    with pytest.raises(P.ProtocolError, match="invalid work_request"):
        P.decode(msgpack.packb([P.SCHEMA_VERSION, "work_request", body], use_bin_type=True))
    query = P.decode(P.encode(P.SlotsQuery(sampler="sampler-0@hostA", reason="restarted")))
    assert isinstance(query, P.SlotsQuery) and query.sampler == "sampler-0@hostA"


@settings(max_examples=20)
@given(st.lists(trajectory(), min_size=1, max_size=3))
def test_a_trajectory_log_of_schema_2_records_is_refused_and_kept(old):
    """A log written by the previous build is not corruption: opening or replaying it raises an
    error that names the file and the versions, and the file is left as it was (nothing lost)."""
    import struct
    import tempfile
    from pathlib import Path

    from espo_async.runtime.trajectory_log import TrajectoryLog, TrajectoryLogVersionError, replay

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trajectories.log"
        frames = [_as_version(P.encode(t), 2) for t in old]
        data = b"".join(struct.pack("<I", len(f)) + f for f in frames)
        path.write_bytes(data)
        with pytest.raises(TrajectoryLogVersionError, match=rf"trajectories.log was written with protocol schema version 2.*reads 3..{P.SCHEMA_VERSION}"):
            list(replay(path))
        with pytest.raises(TrajectoryLogVersionError):
            TrajectoryLog(path)
        assert path.read_bytes() == data


def test_kind_of_reads_the_tag_without_the_body():
    assert P.kind_of(P.encode(P.Shutdown(reason="done"))) == "shutdown"
    with pytest.raises(P.ProtocolError):
        P.kind_of(b"\x00")


def test_a_schema_3_weights_announced_still_decodes():
    """Schema 4 only appended ``WeightsAnnounced.tensors`` (default []): a version-3 frame reads."""
    body = ["policy", 7, "file:///w/policy-v7.safetensors", "", 10, 7, "e"]
    msg = P.decode(msgpack.packb([3, "weights_announced", body], use_bin_type=True))
    assert msg == P.WeightsAnnounced(model="policy", version=7, uri="file:///w/policy-v7.safetensors", sha256="",
                                     nbytes=10, step=7, epoch="e", tensors=[])
    new = P.WeightsAnnounced(model="policy", version=8, uri="collective://h:1/g/policy/8?world=2", sha256="",
                             nbytes=8, tensors=[("w", "float32", [2])])
    assert P.decode(P.encode(new)) == new
