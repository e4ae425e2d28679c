"""What must stay cheap to import: the config (run.py --explain-config, the supervisor) loads no torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_import_config_does_not_import_torch():
    out = _run("import sys, espo_async.config; print('torch' in sys.modules)")
    assert out.strip() == "False"


def test_explain_config_does_not_import_torch():
    code = ("import sys, contextlib, io; sys.argv = ['run.py', '--explain-config']; import run\n"
            "buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf): rc = run.main(['--explain-config'])\n"
            "assert rc == 0 and 'algo.clip_low' in buf.getvalue(), buf.getvalue()[:500]\n"
            "print('torch' in sys.modules)")
    assert _run(code).strip() == "False"


def test_package_face_still_exports_the_core_lazily():
    out = _run("import sys, espo_async; print('torch' in sys.modules); from espo_async import gae, first_stop; "
               "import espo_async.core as c; print(espo_async.gae is c.gae, sorted(espo_async.__all__) == "
               "sorted([*c.__all__, '__version__']), 'torch' in sys.modules)")
    assert out.split() == ["False", "True", "True", "True"]
    import espo_async

    with pytest.raises(AttributeError):
        espo_async.no_such_name  # noqa: B018
