"""Worker extension mixed into vLLM's worker class (engine arg ``worker_extension_cls``).

vLLM resolves ``"espo_async.engines.vllm_worker_ext.WeightSyncExtension"`` by qualified name in
every worker process and adds it to the worker's bases, so its methods run *inside* the worker
with ``self`` being the (CPU or GPU) worker. ``AsyncLLM.collective_rpc(name, args=...)`` calls
them on all workers and returns the list of their results.

Weights are loaded with the worker's ``reload_weights(weights_iterator=...)`` (vLLM >= 0.3x):
it runs the model's checkpoint-format ``load_weights`` inside vLLM's layerwise-reload
bracket, which restores parameters that were repacked after the first load (the CPU build
repacks linear weights, which is why calling ``model_runner.model.load_weights`` directly
fails there with "'Parameter' object has no attribute 'weight_loader'").

This module must stay importable without importing vLLM (it is imported by the workers only).
"""

from __future__ import annotations

import hashlib
import time
from typing import Any


def _iter_safetensors_blob(blob: bytes):
    from safetensors.torch import load as st_load

    tensors = st_load(bytes(blob))
    return iter(tensors.items()), len(tensors)


def _iter_safetensors_file(path: str):
    from safetensors import safe_open

    f = safe_open(path, framework="pt", device="cpu")
    keys = list(f.keys())

    def gen():
        for k in keys:
            yield k, f.get_tensor(k)

    return gen(), len(keys)


def _top_functions(profiler, top: int) -> list[dict[str, Any]]:
    """The ``top`` functions of a cProfile run by cumulative time (a msgpack-able list)."""
    import pstats

    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (cc, ncalls, tottime, cumtime, callers)
    rows = [{"function": f"{name} ({file.rsplit('/', 1)[-1]}:{line})", "calls": int(nc),
             "self_s": float(tt), "cumulative_s": float(ct)}
            for (file, line, name), (_cc, nc, tt, ct, _callers) in stats.items()]
    return sorted(rows, key=lambda r: -r["cumulative_s"])[:top]


class WeightSyncExtension:
    """Methods callable through ``collective_rpc``. Names are prefixed to avoid clashes."""

    def espo_load_weights(
        self,
        source: bytes | str,
        version: str | int | None = None,
        expected_sha256: str | None = None,
        profile_top: int = 0,
    ) -> dict[str, Any]:
        """Load a safetensors state dict (path or in-memory blob) into the running model.

        Parameter names are checkpoint (HF) names; tensors of any float dtype are cast on copy.
        Returns a small report (number of tensors, seconds, version) for the caller; with
        ``profile_top`` > 0 the load runs under cProfile and the report's ``profile`` lists that
        many functions by cumulative time (bench/weight_sync.py --profile).
        """
        t0 = time.perf_counter()
        if isinstance(source, (bytes, bytearray, memoryview)):
            if expected_sha256 is not None:
                got = hashlib.sha256(source).hexdigest()
                if got != expected_sha256:
                    raise ValueError(f"weights blob sha256 mismatch: {got} != {expected_sha256}")
            it, n = _iter_safetensors_blob(source)
        else:
            if expected_sha256 is not None:
                h = hashlib.sha256()
                with open(source, "rb") as f:
                    while b := f.read(1 << 22):
                        h.update(b)
                if h.hexdigest() != expected_sha256:
                    raise ValueError(f"{source}: sha256 mismatch")
            it, n = _iter_safetensors_file(str(source))
        t1 = time.perf_counter()
        profiler = None
        if profile_top > 0:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        self.reload_weights(weights_iterator=it)  # type: ignore[attr-defined]
        if profiler is not None:
            profiler.disable()
        t2 = time.perf_counter()
        self._espo_weight_version = version
        report: dict[str, Any] = {
            "num_tensors": n,
            "read_s": t1 - t0,
            "load_s": t2 - t1,
            "version": version,
        }
        if profiler is not None:
            report["profile"] = _top_functions(profiler, profile_top)
        return report

    # -- the collective weight transfer (espo_async/weights/collective.py): this worker is a
    # member of the learner's weight-update group; it receives each version, then reloads.
    def _espo_group_member(self):
        from espo_async.weights.collective import GroupMember

        member = getattr(self, "_espo_group", None)
        if member is None:
            member = self._espo_group = GroupMember(device=getattr(self, "device", None))
        return member

    def espo_join_weight_group(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Start joining the learner's weight-update group (returns at once; idempotent)."""
        return self._espo_group_member().join(spec)

    def espo_receive_weights(self, spec: dict[str, Any], version: str | int, tensors: list) -> dict[str, Any]:
        """Receive one version from the group (every bucket first: a failed receive leaves the
        model as it was), then load it as ``espo_load_weights`` does."""
        member = self._espo_group_member()
        member.join(spec)
        t0 = time.perf_counter()
        received = member.receive(int(version), tensors)
        t1 = time.perf_counter()
        self.reload_weights(weights_iterator=iter(received))  # type: ignore[attr-defined]
        t2 = time.perf_counter()
        self._espo_weight_version = str(version)
        return {"num_tensors": len(received), "receive_s": t1 - t0, "load_s": t2 - t1, "version": str(version),
                "rank": member.rank}

    def espo_weight_version(self) -> Any:
        return getattr(self, "_espo_weight_version", None)

    def espo_param_checksum(self, names: list[str] | None = None) -> dict[str, float]:
        """Sum of each parameter (as float64), for tests and debugging. Kernel-format names."""
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        out: dict[str, float] = {}
        for name, p in model.named_parameters():
            if names is None or name in names:
                out[name] = float(p.detach().double().sum())
        return out
