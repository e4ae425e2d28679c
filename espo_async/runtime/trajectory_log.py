"""An append-only log of received trajectories, so a learner crash loses nothing it received.

Each record is ``[4-byte little-endian length][frame]`` where the frame is the protocol
encoding of the ``Trajectory``. A torn last record (crash mid-write) is ignored on replay.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import protocols as P

_LEN = struct.Struct("<I")


class TrajectoryLog:
    def __init__(self, path: Path, *, fsync_every: int = 64):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("ab")
        self._since_sync = 0
        self.fsync_every = fsync_every

    def append(self, traj: P.Trajectory) -> None:
        frame = P.encode(traj)
        self._file.write(_LEN.pack(len(frame)) + frame)
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


def replay(path: Path) -> Iterator[P.Trajectory]:
    """Every complete, valid record of the log, in order."""
    path = Path(path)
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
        except P.ProtocolError:
            return  # corruption: stop at the last good record
        if isinstance(msg, P.Trajectory):
            yield msg
        pos = end
