"""Small helpers shared by the runtime and the actors."""

from __future__ import annotations

import hashlib


def stable_seed(*parts: object) -> int:
    """A 31-bit seed from any printable parts, identical across processes and runs
    (unlike ``hash()``, which Python salts per process)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def set_parent_death_signal(sig: int | None = None) -> None:
    """Linux: ask the kernel to send ``sig`` (default SIGTERM) to this process when its parent
    dies (no orphans after a kill -9). Elsewhere, or without libc: nothing."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM if sig is None else sig)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


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


def read_jsonl(path, *, missing_ok: bool = True) -> list:
    """Every JSON value of a JSON-lines file, blank lines skipped. A missing file: [] (or
    FileNotFoundError with ``missing_ok=False``)."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        if missing_ok:
            return []
        raise FileNotFoundError(f"file not found: {path}")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json(path, value, *, indent: int = 1):
    """``value`` as JSON at ``path``, its folder created; returns the path."""
    import json
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=indent))
    return path


def atomic_dir(dest, *, keep=None):
    """Context manager publishing a directory in one rename: it yields a fresh temporary sibling
    of ``dest`` to fill; when the block ends without error the temporary folder replaces ``dest``
    (a previous ``dest`` is moved aside first, then removed). On an error the temporary folder is
    removed and ``dest`` is untouched. ``keep(dest) -> True`` (checked at the end, when ``dest``
    exists) means another process already published what was built: the new one is dropped."""
    import contextlib
    import os
    import shutil
    import tempfile
    from pathlib import Path

    @contextlib.contextmanager
    def _publish():
        target = Path(dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            yield tmp
            if keep is not None and target.exists() and keep(target):
                shutil.rmtree(tmp, ignore_errors=True)
                return
            old = None
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent)) / "old"
                os.replace(target, old)
            os.replace(tmp, target)
            if old is not None:
                shutil.rmtree(old.parent, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    return _publish()
