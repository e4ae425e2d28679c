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
"""

from espo_async.core import *  # noqa: F403 - the core is the public API
from espo_async.core import __all__ as _core_all

__version__ = "0.1.0"
__all__ = [*_core_all, "__version__"]
