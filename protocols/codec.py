"""Frame codec: msgpack via msgspec, typed decoding, one error type.

A frame is the msgpack array ``[schema_version, kind, body]`` where ``body`` is the message's
fields as a msgpack array. ``numpy.ndarray`` fields travel as msgpack extension type
``ARRAY_EXT`` whose payload is the msgpack array ``[dtype, shape, data]`` (``dtype`` a numpy
type string such as ``"<f4"``, ``data`` the raw little-endian bytes). Nothing is pickled.

``decode`` either returns a complete, validated message or raises ``ProtocolError`` saying
what is wrong with the frame. It never returns half a message and never raises anything else.
"""

from __future__ import annotations

import math

import msgspec
import numpy as np

from protocols.messages import MESSAGE_TYPES, Message

SCHEMA_VERSION = 4
"""Version of the wire format; every frame carries it. Bump on any message change.

History: 1, the first format. 2, ``TokenBatch`` (kind ``token_batch``): a sampler sends the new
tokens of all its streams of one engine step as one frame (the bus costs ~30 us per frame
whatever it holds, and 64 frames per step delayed cancels in the sampler's loop); frames of
version 1 still decoded. 3, a wire that says what it means: ``WorkRequest`` carries the sampler's
name (``sampler``), its process (``session``) and what the request is (``intent``: ordinary,
hello, slots) in fields of their own instead of ``sampler_id`` = ``<name>#<session>[#hello|#slots]``,
and the coordinator asks a sampler for its free slots with a kind of its own (``SlotsQuery``, kind
``slots_query``) instead of an ``ActorDown`` on the work socket. A changed message: frames of
versions 1 and 2 are refused (``unsupported schema version``), so every actor of a run must run
this build, and a learner's trajectory log written by an older build is refused with an error
that says so (``TrajectoryLogVersionError``; the log is left as it is). 4, ``WeightsAnnounced``
gains a last field ``tensors`` (the (name, dtype, shape) list of a collective weight broadcast,
espo_async/weights/collective.py; default []): additive, so frames of version 3 still decode."""

OLDEST_READABLE_VERSION = 3
"""Frames from this version up to ``SCHEMA_VERSION`` decode (each kind from the version that
introduced it); writing is always ``SCHEMA_VERSION``. Raise it when a message that existed
before changes."""

KIND_SINCE: dict[str, int] = {}
"""The schema version that introduced a kind, for kinds newer than ``OLDEST_READABLE_VERSION``
(a frame of an older readable version cannot hold them). Empty while every kind is readable from
``OLDEST_READABLE_VERSION`` (``token_batch`` came in 2, ``slots_query`` in 3); an additive bump
that keeps older frames readable lists its new kinds here."""

ARRAY_EXT = 1
"""msgpack extension type code of an ndarray."""

DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024
"""Frames larger than this are rejected before parsing (weights travel as files, not frames)."""

MAX_ARRAY_NDIM = 4

ALLOWED_DTYPES = frozenset(
    ["|b1", "|u1", "|i1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f2", "<f4", "<f8"]
)
"""The array element types that may travel; always little-endian."""


class ProtocolError(ValueError):
    """A frame could not be decoded into a valid message; the message says why."""


class UnsupportedVersion(ProtocolError):
    """A well-formed frame of a schema version this build does not read (``.version``)."""

    def __init__(self, message: str, version: int):
        super().__init__(message)
        self.version = version


KINDS: dict[str, type[Message]] = {cls.KIND: cls for cls in MESSAGE_TYPES}


def array_payload(arr: np.ndarray) -> bytes:
    """The payload of an array's ``ARRAY_EXT`` extension: the msgpack array ``[dtype, shape, data]``
    (little-endian, C order). The one place that writes numpy arrays for msgpack: the frames here
    and the learner's rank-to-rank documents (espo_async/training/data_parallel.py). Raises
    ``TypeError`` for a dtype outside ``ALLOWED_DTYPES`` or more than ``MAX_ARRAY_NDIM`` dimensions."""
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and not np.little_endian):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    dtype = arr.dtype.str
    if dtype not in ALLOWED_DTYPES:
        raise TypeError(f"arrays of dtype {arr.dtype} cannot travel (allowed: {sorted(ALLOWED_DTYPES)})")
    if arr.ndim > MAX_ARRAY_NDIM:
        raise TypeError(f"arrays with {arr.ndim} dimensions cannot travel (max {MAX_ARRAY_NDIM})")
    return _ARRAY_ENCODER.encode((dtype, list(arr.shape), np.ascontiguousarray(arr).data))


def array_from_payload(data: bytes | memoryview, *, copy: bool = False) -> np.ndarray:
    """The array an ``ARRAY_EXT`` payload holds, checked (dtype allowed, shape, byte count); a
    read-only view of ``data`` unless ``copy``. Raises ``ValueError`` (or a msgspec error) when
    the payload is not a valid array."""
    dtype_str, shape, buf = _ARRAY_HEADER.decode(data)
    dtype = _DTYPES.get(dtype_str)
    if dtype is None:
        raise ValueError(f"array dtype {dtype_str!r} not allowed (allowed: {sorted(ALLOWED_DTYPES)})")
    if len(shape) == 1:  # the common case (every per-token array): no generator, no reshape
        if shape[0] < 0:
            raise ValueError(f"bad array shape {shape}")
        expected = shape[0] * dtype.itemsize
    else:
        if len(shape) > MAX_ARRAY_NDIM or any(d < 0 for d in shape):
            raise ValueError(f"bad array shape {shape}")
        expected = math.prod(shape) * dtype.itemsize
    if expected != len(buf):
        raise ValueError(f"array of shape {shape} and dtype {dtype_str} needs {expected} bytes, got {len(buf)}")
    arr = np.frombuffer(buf, dtype=dtype)
    if len(shape) != 1:
        arr = arr.reshape(shape)
    return arr.copy() if copy else arr


def _enc_hook(obj: object) -> object:
    if isinstance(obj, np.ndarray):
        return msgspec.msgpack.Ext(ARRAY_EXT, array_payload(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode object of type {type(obj).__name__}")


_ARRAY_ENCODER = msgspec.msgpack.Encoder()
_ARRAY_HEADER = msgspec.msgpack.Decoder(tuple[str, list[int], bytes])


_DTYPES = {name: np.dtype(name) for name in ALLOWED_DTYPES}


def _ext_hook(code: int, data: memoryview) -> object:
    if code != ARRAY_EXT:
        raise ValueError(f"unknown msgpack extension type {code}")
    return array_from_payload(data)


def _dec_hook(typ: type, obj: object) -> object:
    if typ is np.ndarray:
        if isinstance(obj, np.ndarray):
            return obj
        raise ValueError(f"expected an array, got {type(obj).__name__}")
    raise ValueError(f"unsupported type {typ}")


_ENCODER = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_ENVELOPE = msgspec.msgpack.Decoder(tuple[int, str, msgspec.Raw])
_BODY_DECODERS = {
    kind: msgspec.msgpack.Decoder(cls, ext_hook=_ext_hook, dec_hook=_dec_hook) for kind, cls in KINDS.items()
}


def encode(msg: Message) -> bytes:
    """Encode a message into one frame."""
    kind = getattr(type(msg), "KIND", "")
    if kind not in KINDS or KINDS[kind] is not type(msg):
        raise TypeError(f"not a registered message type: {type(msg).__name__}")
    return _ENCODER.encode((SCHEMA_VERSION, kind, msgspec.Raw(_ENCODER.encode(msg))))


def decode(frame: bytes | bytearray | memoryview, *, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Message:
    """Decode one frame. Raises ``ProtocolError`` (and only that) if the frame is not valid."""
    try:
        size = len(frame)
    except TypeError:
        raise ProtocolError(f"frame must be bytes, got {type(frame).__name__}") from None
    if size > max_bytes:
        raise ProtocolError(f"frame of {size} bytes exceeds the limit of {max_bytes} bytes")
    if size == 0:
        raise ProtocolError("empty frame")
    try:
        version, kind, body = _ENVELOPE.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"malformed frame envelope (expected [version, kind, body]): {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the contract is: only ProtocolError escapes
        raise ProtocolError(f"malformed frame envelope: {type(exc).__name__}: {exc}") from None
    _check_version(version, kind)
    decoder = _BODY_DECODERS.get(kind)
    if decoder is None:
        raise ProtocolError(f"unknown message kind {kind!r} (known: {sorted(KINDS)})")
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"invalid {kind} message: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"malformed {kind} message: {exc}") from None
    except Exception as exc:  # noqa: BLE001
        raise ProtocolError(f"malformed {kind} message: {type(exc).__name__}: {exc}") from None


def kind_of(frame: bytes) -> str:
    """The kind tag of a frame without decoding its body (raises ProtocolError)."""
    try:
        version, kind, _ = _ENVELOPE.decode(frame)
    except Exception as exc:  # noqa: BLE001
        raise ProtocolError(f"malformed frame envelope: {exc}") from None
    _check_version(version, kind)
    return kind


def _check_version(version: int, kind: str) -> None:
    if not OLDEST_READABLE_VERSION <= version <= SCHEMA_VERSION:
        raise UnsupportedVersion(
            f"unsupported schema version {version} (this build speaks {SCHEMA_VERSION} and reads "
            f"{OLDEST_READABLE_VERSION}..{SCHEMA_VERSION})", version
        )
    if version < KIND_SINCE.get(kind, OLDEST_READABLE_VERSION):
        raise ProtocolError(f"message kind {kind!r} needs schema version {KIND_SINCE[kind]}, the frame says {version}")
