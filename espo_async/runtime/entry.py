"""Process entry point of one actor: ``python -m espo_async.runtime.entry RUN_DIR ACTOR_NAME``.

The supervisor writes ``RUN_DIR/config.yaml`` (the validated config) and
``RUN_DIR/addresses.json`` (the endpoint map) before it starts any actor; this module reads
them, imports the actor class named in the config, and runs it on a uvloop event loop.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import sys
from pathlib import Path

import yaml

from espo_async.config import Config, parse_config
from espo_async.runtime.actor import Actor, ActorContext
from espo_async.utils import set_parent_death_signal


def import_class(path: str) -> type:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"cannot import actor module {module_name!r} (from {path!r}): {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ImportError(f"module {module_name!r} has no class {attr!r} (from {path!r})") from None


def sampler_name(index: int, host_name: str = "") -> str:
    """``sampler-<i>``, or ``sampler-<i>@<host>`` on a host with a name (unique across hosts)."""
    return f"sampler-{index}@{host_name}" if host_name else f"sampler-{index}"


def actor_instances(config: Config, *, local: bool = False) -> list[tuple[str, str, int]]:
    """(name, role, index) of every actor process of a run, in start order; ``local``: only the
    roles this host starts (``cluster.roles``)."""
    out = []
    for role in ("learner", "stopper", "critic", "coordinator", "sampler"):
        spec = getattr(config.actors, role)
        if spec is None or (local and not config.cluster.runs(role)):
            continue
        for i in range(spec.count):
            out.append((sampler_name(i, config.cluster.host_name) if role == "sampler" else role, role, i))
    return out


def validate_actors(cfg: Config) -> None:
    """Import every configured actor class this host starts (``cluster.roles``), validate its
    options and the task's (fail before starting)."""
    from pydantic import ValidationError

    from espo_async.config import ConfigError
    from espo_async.tasks.registry import make_task

    errors = []
    for role in ("coordinator", "sampler", "critic", "stopper", "learner"):
        spec = getattr(cfg.actors, role)
        if spec is None or not cfg.cluster.runs(role):
            continue
        try:
            cls = import_class(spec.cls)
        except ImportError as exc:
            errors.append(f"  actors.{role}.class: {exc}")
            continue
        if not (isinstance(cls, type) and issubclass(cls, Actor)):
            errors.append(f"  actors.{role}.class: {spec.cls} is not an Actor subclass")
            continue
        if cls.ROLE != role:
            errors.append(f"  actors.{role}.class: {spec.cls} implements role {cls.ROLE!r}, not {role!r}")
        if cls.OPTIONS is not None:
            try:
                cls.OPTIONS(**spec.options)
            except ValidationError as exc:
                for err in exc.errors():
                    key = ".".join(str(p) for p in err["loc"])
                    msg = "unknown option" if err["type"] == "extra_forbidden" else err["msg"]
                    allowed = ", ".join(sorted(cls.OPTIONS.model_fields))
                    errors.append(f"  actors.{role}.options.{key}: {msg} (options of {spec.cls}: {allowed})")
        elif spec.options:
            errors.append(f"  actors.{role}.options: {spec.cls} takes no options, got {sorted(spec.options)}")
    try:
        make_task(cfg.task.name, **cfg.task.options)
    except (ValueError, TypeError) as exc:
        errors.append(f"  task: {exc}")
    if errors:
        raise ConfigError("invalid configuration:\n" + "\n".join(errors))


def setup_logging(run_dir: Path, name: str) -> None:
    log_dir = run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s [{name}] %(name)s: %(message)s")
    file_handler = logging.FileHandler(log_dir / f"{name}.log")
    file_handler.setFormatter(fmt)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    console.setLevel(logging.WARNING)
    root = logging.getLogger()
    root.handlers[:] = [file_handler, console]
    root.setLevel(os.environ.get("ESPO_LOG_LEVEL", "INFO"))


def build_actor(run_dir: Path, name: str) -> Actor:
    config = parse_config(yaml.safe_load((run_dir / "config.yaml").read_text()), source=str(run_dir / "config.yaml"))
    addresses = json.loads((run_dir / "addresses.json").read_text())
    for actor_name, role, index in actor_instances(config):
        if actor_name == name:
            break
    else:
        raise SystemExit(f"no actor named {name!r} in {run_dir}/config.yaml")
    spec = getattr(config.actors, role)
    cls = import_class(spec.cls)
    if not (isinstance(cls, type) and issubclass(cls, Actor)):
        raise SystemExit(f"{spec.cls} is not an Actor subclass")
    if cls.ROLE != role:
        raise SystemExit(f"{spec.cls} implements role {cls.ROLE!r}, but is configured as {role!r}")
    try:
        import torch

        torch.set_num_threads(spec.threads)
    except ImportError:
        pass
    ctx = ActorContext(
        name=name, role=role, index=index, config=config, addresses=addresses, run_dir=run_dir, options=spec.options
    )
    return cls(ctx)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m espo_async.runtime.entry RUN_DIR ACTOR_NAME", file=sys.stderr)
        return 2
    run_dir, name = Path(argv[0]), argv[1]
    set_parent_death_signal()
    setup_logging(run_dir, name)
    actor = build_actor(run_dir, name)
    try:
        import uvloop

        return uvloop.run(actor.run())
    except ImportError:
        return asyncio.run(actor.run())


if __name__ == "__main__":
    sys.exit(main())
