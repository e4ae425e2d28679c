"""The evidence command end to end on fake samplers: every method's configuration is valid (real
and fake actors), a representative subset runs end to end, and the report is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from experiments.evidence import FAKE_ACTORS, METHODS, merge, method_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


# stopping, and random stop at ESPO's measured rate (the sweep's one dependency between methods).
# Every method's config is validated above; T-PPO windows run in tests/runtime/test_tppo_system.py,
# a layout without critic or stopper (GRPO) in the learning check (configs/learning-check.yaml).
# Kept to two runs for the suite's time budget (a third, entropy-IS, cost ~20 s).
RUN_IN_CI = ["espo", "random"]


@pytest.mark.parametrize("fake", [False, True])
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_config_is_valid(method, fake):
    base = yaml.safe_load((ROOT / "configs" / "evidence.yaml").read_text())
    if fake:
        base = merge(base, FAKE_ACTORS)
    cfg = method_config(base, method, seed=1, values={"espo_stop_rate": 0.2}, extra={})
    assert cfg["run"]["seed"] == 1


def test_quick_fake_sweep_writes_the_report(tmp_path):
    report = tmp_path / "docs" / "results.md"
    proc = subprocess.run(
        [sys.executable, "experiments/evidence.py", "--quick", "--fake", "--steps", "2", "--methods", *RUN_IN_CI,
         "--out", str(tmp_path / "runs"), "--report", str(report)],
        cwd=ROOT, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = report.read_text()
    for method in RUN_IN_CI:
        assert f"| {METHODS[method][0]} |" in text, method  # one row per method
    results = json.loads((tmp_path / "docs" / "results" / "evidence.json").read_text())
    assert set(results["aggregate"]) == set(RUN_IN_CI)
    for png in ("accuracy_vs_tokens", "accuracy_vs_wallclock", "stop_rate", "beta", "entropy"):
        assert (tmp_path / "docs" / "results" / f"{png}.png").stat().st_size > 0
    assert "experiments/evidence.py --quick --fake" in text  # the command that regenerates it
    # A finished run is not run again (an interrupted sweep resumes).
    # --data-dir puts evidence.json and the plots elsewhere, and the report links there.
    again = subprocess.run(
        [sys.executable, "experiments/evidence.py", "--quick", "--fake", "--steps", "2", "--methods", "espo",
         "--out", str(tmp_path / "runs"), "--report", str(tmp_path / "again.md"),
         "--data-dir", str(tmp_path / "data" / "again")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert again.returncode == 0 and "skipped" in again.stdout
    assert set(json.loads((tmp_path / "data" / "again" / "evidence.json").read_text())["aggregate"]) == {"espo"}
    assert "](data/again/accuracy_vs_tokens.png)" in (tmp_path / "again.md").read_text()
