"""experiments/greedy_eval.py on a run folder whose start and final model are the same tiny model."""

from __future__ import annotations

import json
import shutil

import pytest

from experiments.greedy_eval import main


def _run(folder, model_dir):
    from espo_async.config import parse_config

    folder.mkdir()
    cfg = parse_config({"task": {"name": "arithmetic", "options": {"n_steps": 3}}})
    (folder / "config.yaml").write_text(cfg.to_yaml())
    (folder / "assets.json").write_text(json.dumps(
        {"policy_dir": model_dir, "critic_dir": model_dir, "critic_from_policy": True}))
    shutil.copytree(model_dir, folder / "final")
    (folder / "eval.jsonl").write_text(json.dumps({"step": 0, "accuracy": 0.25}) + "\n"
                                       + json.dumps({"step": 9, "accuracy": 0.5}) + "\n")
    return folder


def test_start_and_final_are_decoded_on_the_same_problems(tmp_path, tiny_model_dir, capsys):
    run = _run(tmp_path / "run", tiny_model_dir)
    out = tmp_path / "greedy.json"
    assert main([str(run), "--problems", "8", "--out", str(out)]) == 0
    (r,) = json.loads(out.read_text())
    assert r["problems"] == 8
    assert r["greedy_final"]["accuracy"] == r["greedy_start"]["accuracy"]  # the same weights
    assert r["greedy_gain"]["mean"] == 0.0
    assert (r["sampled_first"]["accuracy"], r["sampled_last"]["accuracy"]) == (0.25, 0.5)
    assert "0.250->0.500" in capsys.readouterr().out


def test_a_start_model_shared_by_runs_is_decoded_once(tmp_path, tiny_model_dir, monkeypatch):
    import experiments.greedy_eval as g

    decoded = []
    real = g.greedy
    monkeypatch.setattr(g, "greedy", lambda model_dir, task, problems: decoded.append(model_dir) or real(
        model_dir, task, problems))
    runs = [_run(tmp_path / name, tiny_model_dir) for name in ("a", "b")]
    assert main([str(r) for r in runs] + ["--problems", "4"]) == 0
    assert sorted(map(str, decoded)) == sorted([tiny_model_dir] + [str(r / "final") for r in runs])


def test_a_run_without_a_final_model_is_refused(tmp_path, tiny_model_dir):
    from espo_async.config import parse_config

    (tmp_path / "config.yaml").write_text(parse_config({}).to_yaml())
    (tmp_path / "assets.json").write_text(json.dumps(
        {"policy_dir": tiny_model_dir, "critic_dir": tiny_model_dir, "critic_from_policy": True}))
    with pytest.raises(SystemExit, match="no final/ model"):
        main([str(tmp_path)])
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--problems", "0"])
