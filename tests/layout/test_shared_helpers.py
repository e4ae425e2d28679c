"""The routines that used to be written several times, each now in one place."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from espo_async.core import stop_threshold, surrogate_regret
from espo_async.utils import atomic_dir, read_jsonl


def test_read_jsonl(tmp_path):
    p = tmp_path / "a.jsonl"
    assert read_jsonl(p) == []
    with pytest.raises(FileNotFoundError):
        read_jsonl(p, missing_ok=False)
    p.write_text('{"a": 1}\n\n  \n{"b": [2]}\n')
    assert read_jsonl(p) == [{"a": 1}, {"b": [2]}]


def test_atomic_dir_replaces_keeps_and_rolls_back(tmp_path):
    dest = tmp_path / "out"
    with atomic_dir(dest) as tmp:
        assert tmp.parent == tmp_path and not dest.exists()
        (tmp / "f").write_text("1")
    assert (dest / "f").read_text() == "1"
    with atomic_dir(dest) as tmp:  # replaces a previous version whole
        (tmp / "g").write_text("2")
    assert sorted(p.name for p in dest.iterdir()) == ["g"]
    with atomic_dir(dest, keep=lambda d: (d / "g").is_file()) as tmp:  # someone else published first
        (tmp / "h").write_text("3")
    assert sorted(p.name for p in dest.iterdir()) == ["g"]
    with pytest.raises(RuntimeError), atomic_dir(dest) as tmp:
        (tmp / "x").write_text("half")
        raise RuntimeError("boom")
    assert sorted(p.name for p in dest.iterdir()) == ["g"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left


def test_stop_threshold_numbers_and_tensors_agree():
    beta, eps = 7.0, 0.2
    vs = [0.5, 0.1, -1.0, 0.2, float("nan"), -math.inf]
    t = stop_threshold(torch.tensor(vs, dtype=torch.float64), beta, eps)
    for v, tv in zip(vs, t.tolist()):
        n = stop_threshold(v, beta, eps)
        if v != v:
            assert n is None and math.isnan(tv)
        else:
            assert n == pytest.approx(beta * max(v, eps)) == pytest.approx(tv)
    assert stop_threshold(None, beta, eps) is None


def test_surrogate_regret_numpy_matches_torch_and_floats():
    lp = np.array([-1.0, -0.5, -2.0, np.nan], np.float32)
    top1 = np.array([-0.5, -0.5, -0.4999, -0.1], np.float32)
    g = surrogate_regret(lp, top1)
    assert g.dtype == np.float64
    ref = surrogate_regret(torch.from_numpy(lp.astype(np.float64)), torch.from_numpy(top1.astype(np.float64)))
    np.testing.assert_allclose(g[:3], ref.numpy()[:3])
    assert np.isnan(g[3])
    assert g[1] == 0.0 and surrogate_regret(-1.0, -0.25) == pytest.approx(0.75)


def test_numpy_arrays_are_encoded_for_msgpack_in_one_place():
    """The learner's rank-to-rank documents carry arrays as the frame codec's array extension
    (protocols/codec.py array_payload), not a format of their own."""
    import msgpack

    from espo_async.training import data_parallel as dp
    from protocols.codec import ARRAY_EXT, array_payload

    arr = np.arange(6, dtype=">f4").reshape(2, 3)  # big-endian: normalised the same way
    assert msgpack.unpackb(dp.encode(arr)) == msgpack.ExtType(ARRAY_EXT, array_payload(arr))
    back = dp.decode(dp.encode({"a": arr}))["a"]
    assert back.dtype == np.dtype("<f4") and np.array_equal(back, arr) and back.flags.writeable
    with pytest.raises(TypeError, match="cannot travel"):
        dp.encode(np.array(["text"]))
