"""weights.dir: where the learner's per-step weight files go (espo_async/runtime/weight_files.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from espo_async.config import ConfigError, load_config
from espo_async.runtime import weight_files as W

DEFAULT = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"


def cfg(*overrides: str):
    return load_config(DEFAULT, list(overrides))


@pytest.fixture
def shm(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "shm"
    root.mkdir()
    monkeypatch.setattr(W, "SHM_ROOT", root)
    return root


def test_auto_uses_memory_only_when_no_host_can_join(shm, tmp_path):
    run = tmp_path / "runs" / "r1"
    assert shm in W.weight_files_dir(cfg("transport.kind=ipc"), run).parents
    assert shm in W.weight_files_dir(cfg("transport.kind=tcp", "transport.host=127.0.0.1"), run).parents
    # Another host may join (a non-loopback host, some roles only, roles placed on other hosts): disk.
    remote = cfg("transport.kind=tcp", "transport.host=10.0.0.5", "transport.allow_insecure=true")
    assert W.weight_files_dir(remote, run) == run / "weights"
    assert W.weight_files_dir(cfg("cluster.roles=[sampler]"), run) == run / "weights"


def test_auto_falls_back_to_the_run_folder_without_dev_shm(tmp_path, monkeypatch):
    monkeypatch.setattr(W, "SHM_ROOT", tmp_path / "missing")
    assert W.weight_files_dir(cfg(), tmp_path / "r") == tmp_path / "r" / "weights"


def test_explicit_choices(shm, tmp_path):
    run = tmp_path / "r"
    assert W.weight_files_dir(cfg("weights.dir=run"), run) == run / "weights"
    assert shm in W.weight_files_dir(cfg("weights.dir=shm", "cluster.roles=[sampler]"), run).parents
    assert W.weight_files_dir(cfg(f"weights.dir={tmp_path / 'w'}"), run) == tmp_path / "w"


def test_two_runs_with_the_same_name_never_share_a_folder(shm, tmp_path):
    a = W.weight_files_dir(cfg(), tmp_path / "a" / "run-1")
    b = W.weight_files_dir(cfg(), tmp_path / "b" / "run-1")
    assert a != b and a.name.startswith("run-1-")


def test_remove_transient_frees_memory_but_never_a_run_folder(shm, tmp_path):
    run = tmp_path / "r"
    mem = W.weight_files_dir(cfg(), run)
    mem.mkdir(parents=True)
    (mem / "policy-v1.safetensors").write_bytes(b"x")
    W.remove_transient(cfg(), run)
    assert not mem.exists()
    disk = W.weight_files_dir(cfg("weights.dir=run"), run)
    disk.mkdir(parents=True)
    W.remove_transient(cfg("weights.dir=run"), run)
    assert disk.is_dir()


@pytest.mark.parametrize("bad", ["relative/dir", "memory"])
def test_bad_dir_is_a_config_error_naming_the_key(bad):
    with pytest.raises(ConfigError, match="weights.dir"):
        cfg(f"weights.dir={bad}")
