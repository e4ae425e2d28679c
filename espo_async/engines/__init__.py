"""Inference engines for the samplers.

* ``vllm_engine.VLLMEngine``: async wrapper over vLLM's v1 ``AsyncLLM`` (CPU and CUDA builds):
  token streaming with sampled / top-1 log-probs, abort, hot weight updates, clean shutdown.
* ``vllm_worker_ext.WeightSyncExtension``: the worker extension that reloads weights in place.
* ``weights``: safetensors serialisation of state dicts (atomic files, blobs, sha256).

Nothing here imports vLLM at import time (``VLLMEngine.create`` does).
"""

from espo_async.engines.vllm_engine import TokenChunk, VLLMEngine

__all__ = ["TokenChunk", "VLLMEngine"]
