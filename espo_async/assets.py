"""Models a run needs, resolved once before any actor starts.

``prepare_assets`` (called by run.py) turns the config's model specs into local directories
that both vLLM and transformers load: it builds the tiny model, runs its supervised warm-up, or
converts SmolLM2, caching each result under the cache folder (``$ESPO_CACHE`` or
``~/.cache/espo-async``). It writes ``RUN_DIR/assets.json``; actors read it with
``load_assets``. Nothing here runs inside the actors' event loops.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from espo_async.config import Config


@dataclass(frozen=True)
class Assets:
    policy_dir: str  # initial policy weights + tokenizer (version 0)
    critic_dir: str  # initial critic backbone (the policy's when model.critic == "policy")
    critic_from_policy: bool


def load_assets(run_dir: Path) -> Assets:
    path = Path(run_dir) / "assets.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run.py prepares assets before starting actors")
    return Assets(**json.loads(path.read_text()))


def task_alphabet(config: Config) -> str | None:
    """The task's character set, if it declares one (the tiny model's vocabulary)."""
    from espo_async.tasks.registry import make_task

    task = make_task(config.task.name, **config.task.options)
    return getattr(task, "alphabet", None)


def resolve_model(spec: str, config: Config, *, log=print) -> Path:
    """A local model directory for a model spec ('tiny', 'smollm2-135m' or a path)."""
    from espo_async.models.loading import resolve_model as resolve_model_dir

    if spec == "tiny":
        from espo_async.models.tiny import DEFAULT_ALPHABET, build_tiny_model

        path = build_tiny_model(
            None,  # cached per spec hash under the cache folder
            task_alphabet(config) or DEFAULT_ALPHABET,
            n_layers=config.model.tiny_layers,
            hidden=config.model.tiny_hidden,
            heads=config.model.tiny_hidden // 32,
            kv_heads=max(1, config.model.tiny_hidden // 64),
            seed=config.model_seed,
            max_position=max(512, 2 * config.rollout.max_tokens),
        )
        if config.model.sft_steps > 0:
            from espo_async.models.sft import warm_up

            path = warm_up(path, config, log=log)
        return Path(path)
    return Path(resolve_model_dir(spec, dtype=config.model.dtype))


def prepare_assets(config: Config, run_dir: Path, *, log=print) -> Assets:
    policy = resolve_model(config.model.policy, config, log=log)
    from_policy = config.model.critic == "policy"
    critic = policy if from_policy else resolve_model(config.model.critic, config, log=log)
    assets = Assets(policy_dir=str(policy), critic_dir=str(critic), critic_from_policy=from_policy)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "assets.json").write_text(json.dumps(asdict(assets), indent=1))
    return assets
