"""Weight publish: writing a policy's weights for the samplers, the old path against the new one.

    python bench/weight_publish.py            # SmolLM2-135M-sized state dict (538 MB fp32), 3 repeats
    python bench/weight_publish.py --quick    # 1 repeat

The learner publishes its weights after every step (docs/performance.md, weight sync). Side by
side, same state dict, old and new into the same folder (the run folder's disk), rotating the order:

* **old**: ``safetensors.torch.save`` into one in-memory blob, sha256 of the blob, write, fsync,
  rename (what the learner did before);
* **new**: ``safetensors.torch.save_file`` straight into a temp file, rename; no digest, no fsync
  (``espo_async.engines.weights.publish_safetensors``: the per-step files are re-created from the
  checkpoint after a crash, so durability buys nothing there);
* **shm**: the new writer into ``/dev/shm`` (memory; what ``weights.dir: auto`` picks on one host,
  ``espo_async/runtime/weight_files.py``).

The state dict has SmolLM2-135M's parameter count in fp32 (30 blocks of 4.5M plus embeddings).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import common as C

from espo_async.engines.weights import atomic_write_bytes, publish_safetensors, sha256_bytes

NAME = "weight_publish"


def state_dict(n_params: int = 134_515_008) -> dict[str, torch.Tensor]:
    per = 4 << 20  # 4M-element tensors, the rest in one
    sd = {f"layer{i}.weight": torch.randn(per) for i in range(n_params // per)}
    sd["rest.weight"] = torch.randn(n_params - per * (n_params // per))
    return sd


def old_path(sd, path: Path) -> float:
    from safetensors.torch import save

    t0 = time.perf_counter()
    data = save(sd)
    sha256_bytes(data)
    atomic_write_bytes(path, data)
    return time.perf_counter() - t0


def new_path(sd, path: Path) -> float:
    t0 = time.perf_counter()
    publish_safetensors(sd, path)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)
    meta = C.begin(args)
    repeats = args.repeats or (1 if args.quick else 3)
    sd = state_dict()
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    rows = []
    folder = Path(tempfile.mkdtemp(prefix="weight-publish-", dir=C.run_dir_for(NAME, False)))
    shm = Path(tempfile.mkdtemp(prefix="espo-weight-publish-", dir="/dev/shm")) if Path("/dev/shm").is_dir() else None
    paths = [("old", old_path, folder), ("new", new_path, folder)] + ([("shm", new_path, shm)] if shm else [])
    try:
        for i in range(repeats):
            for name, fn, where in paths[i % len(paths):] + paths[:i % len(paths)]:
                rows.append({"path": name, "repeat": i, "seconds": fn(sd, where / f"{name}.safetensors"),
                             "load": C.loadavg()})
                (where / f"{name}.safetensors").unlink()
    finally:
        C.remove_run(folder.parent, False)
        if shm is not None:
            C.remove_run(shm, False)
    med = {name: float(np.median([r["seconds"] for r in rows if r["path"] == name])) for name, _, _ in paths}
    C.print_table(rows, [("path", "path", ""), ("repeat", "repeat", "d"), ("seconds", "seconds", ".3f"), ("load", "load", "")])
    print(f"publish {nbytes / 1e6:.0f} MB (median): " + ", ".join(f"{k} {v:.3f}s" for k, v in med.items())
          + f"; old/new {med['old'] / med['new']:.2f}x" + (f", old/shm {med['old'] / med['shm']:.2f}x" if shm else ""))
    summary = {"median_s": med, "speedup": med["old"] / med["new"],
               "speedup_shm": med["old"] / med["shm"] if shm else None}
    C.finish(NAME, args, {"rows": rows, "bytes": nbytes, "summary": summary}, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
