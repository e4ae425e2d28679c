"""Where the learner writes its per-step weight files (``weights.dir``, docs/performance.md).

A file in ``/dev/shm`` is memory, and the samplers' workers map it without a disk read. Alone,
writing it is barely faster than into the page cache of the run folder (0.24 s against 0.26 s
for 538 MB, ``python bench/weight_publish.py``); in the running system, which writes policy and
critic every step, the step end -> sampler receives the announcement time fell from 0.69 to
0.38 s (``python bench/weight_sync.py --samplers 1``). It is only reachable on this host, so
``auto`` picks it only when no actor of the run can be on another host.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from espo_async.config import Config, is_loopback_host

SHM_ROOT = Path("/dev/shm")


def single_host(cfg: Config) -> bool:
    """Whether every actor of the run is on this host (no host can join later)."""
    t = cfg.transport
    local = t.kind == "ipc" or is_loopback_host(t.host)
    return local and cfg.cluster.roles is None and not cfg.cluster.role_hosts


def weight_files_dir(cfg: Config, run_dir: Path) -> Path:
    """The folder for this run's per-step weight files (not created here)."""
    choice = cfg.weights.dir
    if choice == "auto":
        choice = "shm" if single_host(cfg) and SHM_ROOT.is_dir() else "run"
    if choice == "run":
        return run_dir / "weights"
    if choice == "shm":
        run_dir = run_dir.resolve()
        tag = hashlib.sha256(str(run_dir).encode()).hexdigest()[:12]
        return SHM_ROOT / "espo-async" / f"{run_dir.name}-{tag}"
    return Path(choice)


def remove_transient(cfg: Config, run_dir: Path) -> None:
    """Free a run's weight files in memory at the end of the run (the checkpoint and the final
    model are in the run folder; per-step files are re-created from them on a resume)."""
    folder = weight_files_dir(cfg, run_dir)
    if SHM_ROOT in folder.parents:
        shutil.rmtree(folder, ignore_errors=True)
