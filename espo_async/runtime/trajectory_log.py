"""An append-only log of received trajectories, so a learner crash loses nothing it received.

Each record is ``[4-byte little-endian length][frame]`` where the frame is the protocol
encoding of the ``Trajectory``. A torn last record (crash mid-write) is ignored on replay and cut
off when the log is opened again (so later records stay readable). Every record reaches the OS
before ``append`` returns (a killed process loses nothing it appended); ``fsync`` every
``fsync_every`` records bounds what a machine crash can lose. A log whose first record is a
well-formed frame of a schema version this build does not read was written by another build; it
is not damage: opening or replaying it raises ``TrajectoryLogVersionError`` and leaves the file
untouched.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import protocols as P

_LEN = struct.Struct("<I")


class TrajectoryLogVersionError(RuntimeError):
    """The log holds records of a protocol schema version this build cannot read."""


class TrajectoryLog:
    def __init__(self, path: Path, *, fsync_every: int = 64):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            good = valid_length(self.path)
            if good < self.path.stat().st_size:
                os.truncate(self.path, good)  # a torn or corrupt tail would hide later records
        self._file = self.path.open("ab")
        self._since_sync = 0
        self.fsync_every = fsync_every

    def append(self, traj: P.Trajectory) -> None:
        frame = P.encode(traj)
        self._file.write(_LEN.pack(len(frame)) + frame)
        self._file.flush()
        self._since_sync += 1
        if self._since_sync >= self.fsync_every:
            self.sync()

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._since_sync = 0

    def close(self) -> None:
        self.sync()
        self._file.close()


def valid_length(path: Path) -> int:
    """Bytes of the log up to the end of its last complete, decodable record."""
    end = 0
    for end, _ in _records(Path(path)):
        pass
    return end


def replay(path: Path) -> Iterator[P.Trajectory]:
    """Every complete, valid record of the log, in order."""
    for _, msg in _records(Path(path)):
        if isinstance(msg, P.Trajectory):
            yield msg


def _records(path: Path) -> Iterator[tuple[int, P.Message]]:
    if not path.is_file():
        return
    data = path.read_bytes()
    pos = 0
    while pos + _LEN.size <= len(data):
        (n,) = _LEN.unpack_from(data, pos)
        end = pos + _LEN.size + n
        if end > len(data):
            return  # torn record at the end
        try:
            msg = P.decode(data[pos + _LEN.size : end])
        except P.UnsupportedVersion as exc:
            if pos:  # a later record: damage (its version byte), cut like any other
                return
            raise TrajectoryLogVersionError(
                f"{path} was written with protocol schema version {exc.version}, and "
                f"this build reads {P.OLDEST_READABLE_VERSION}..{P.SCHEMA_VERSION}: resume this run with the "
                f"build that wrote it, or start a new run (the log is left as it is)") from None
        except P.ProtocolError:
            return  # corruption: stop at the last good record
        yield end, msg
        pos = end
