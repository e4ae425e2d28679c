"""espo-async: asynchronous Early-Stopping PPO for post-training language models.

The public API is the pure algorithm core (``espo_async.core``), re-exported here:

* ``gae(rewards, values, *, gamma, lam, last_value=0.0) -> (advantages, returns)`` for one
  trajectory (1-D tensors of equal length);
* ``first_stop(regret, values, *, mu, var, c, delta, alpha_s, beta, eps) -> int | None``: the
  index of the first token at which the ESPO stop rule fires under frozen statistics;
* the regret, normaliser, streaming stop rule and replay, beta controller, warm-up gate, stop
  policies for the paper's ablations, GAE with endings, GRPO advantages, and the losses.

docs/algorithms.md states every formula as implemented. The actor system lives in ``actors/``
(started by ``run.py``), the message types in ``protocols/``.

The core (and with it torch) is imported on first use of one of its names, not by
``import espo_async.config`` or any other torch-free submodule (PEP 562).
"""

from __future__ import annotations

import importlib
import importlib.util

__version__ = "0.1.0"


def _core():
    return importlib.import_module("espo_async.core")


def __getattr__(name: str):
    if name.startswith("__") and name != "__all__":
        raise AttributeError(name)
    # `from espo_async import config` asks for the attribute before importing the submodule:
    # a submodule's name must not import the core
    if name != "__all__" and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        raise AttributeError(name)
    core = _core()
    if name == "__all__":
        return [*core.__all__, "__version__"]
    if name in core.__all__:
        value = globals()[name] = getattr(core, name)  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_core().__all__})
