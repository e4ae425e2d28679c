"""Models: the embedded tiny model, model-spec resolution and the value model.

* ``tiny.build_tiny_model(out_dir, alphabet, ...)``: a tiny Llama-architecture causal LM with a
  character-level tokenizer, deterministic per spec and cached (``tiny.default_cache_dir()``).
* ``loading.resolve_model(spec)``: "tiny", "smollm2-135m", a ``.gguf`` file or a local HF
  checkpoint directory -> a local directory that vLLM and transformers both load.
* ``value_model``: the value model (backbone + scalar head) of the learner's critic and the HF
  critic actor.
"""

from espo_async.models.loading import resolve_model
from espo_async.models.tiny import DEFAULT_ALPHABET, build_tiny_model, default_cache_dir

__all__ = ["DEFAULT_ALPHABET", "build_tiny_model", "default_cache_dir", "resolve_model"]
