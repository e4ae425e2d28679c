"""The evidence command end to end on fake samplers: every method runs, the report is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.evidence import METHODS

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_quick_fake_sweep_writes_the_report(tmp_path):
    report = tmp_path / "docs" / "results.md"
    proc = subprocess.run(
        [sys.executable, "experiments/evidence.py", "--quick", "--fake", "--steps", "2",
         "--out", str(tmp_path / "runs"), "--report", str(report)],
        cwd=ROOT, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = report.read_text()
    for label, _ in METHODS.values():
        assert f"| {label} |" in text, label  # one row per method
    results = json.loads((tmp_path / "docs" / "results" / "evidence.json").read_text())
    assert set(results["aggregate"]) == set(METHODS)
    for png in ("accuracy_vs_tokens", "stop_rate", "beta", "entropy"):
        assert (tmp_path / "docs" / "results" / f"{png}.png").stat().st_size > 0
    assert "experiments/evidence.py --quick --fake" in text  # the command that regenerates it
    # A finished run is not run again (an interrupted sweep resumes).
    again = subprocess.run(
        [sys.executable, "experiments/evidence.py", "--quick", "--fake", "--steps", "2", "--methods", "ppo",
         "--out", str(tmp_path / "runs"), "--report", str(tmp_path / "again.md")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert again.returncode == 0 and "skipped" in again.stdout
