"""Small helpers shared by the runtime and the actors."""

from __future__ import annotations

import hashlib


def stable_seed(*parts: object) -> int:
    """A 31-bit seed from any printable parts, identical across processes and runs
    (unlike ``hash()``, which Python salts per process)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def describe_exit(rc: int) -> str:
    """A process's exit status in words: "was killed by SIGKILL", "exited with code 1"."""
    import signal

    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with code {rc}"


def tail(path, n: int = 15) -> str:
    """The last ``n`` lines of a text file ("" if it cannot be read)."""
    from pathlib import Path

    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])
