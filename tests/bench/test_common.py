"""The benchmarks' shared helpers (bench/common.py): what they compute from samples."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import common as C  # noqa: E402


def test_variants_are_the_plain_run_then_each_labelled_override_set():
    args = SimpleNamespace(variant=["nice:actors.sampler.options.engine_nice=10",
                                    "two:a.b=1,c.d=x"])
    assert C.variants(args) == [("default", []), ("nice", ["actors.sampler.options.engine_nice=10"]),
                                ("two", ["a.b=1", "c.d=x"])]
    for bad in ["no-colon", "label:", ":a=1", "label:novalue"]:
        with pytest.raises(SystemExit, match="--variant"):
            C.variants(SimpleNamespace(variant=[bad]))


def test_cpu_window_is_the_difference_of_the_enclosing_samples():
    s = C.CpuSampler(lambda: {})
    # (time, per-process CPU s, per-thread CPU s, per-core busy s)
    s.samples = [
        (10.0, {"a": 1.0, "a/w": 0.0}, {"a/main": 1.0, "a/w/x": 0.0}, [5.0, 1.0]),
        (11.0, {"a": 1.5, "a/w": 0.2}, {"a/main": 1.5, "a/w/x": 0.2}, [6.0, 1.5]),
        (12.0, {"a": 2.0, "a/w": 1.0, "b": 0.5}, {"a/main": 2.0, "a/w/x": 1.0, "b/main": 0.5}, [7.0, 2.0]),
        (13.0, {"a": 2.1, "a/w": 1.0, "b": 0.5}, {"a/main": 2.1, "a/w/x": 1.0, "b/main": 0.5}, [7.2, 2.0]),
    ]
    w = s.window(10.5, 11.9)  # enclosed by the samples at 10 and 12
    assert (w["t0"], w["t1"], w["span_s"]) == (10.0, 12.0, 2.0)
    assert w["core_busy"] == [1.0, 0.5]
    assert w["process_cores"] == {"a": 0.5, "a/w": 0.5, "b": 0.25}  # a process born inside counts from 0
    assert list(w["process_cores"]) == ["a", "a/w", "b"]  # busiest first
    assert w["thread_cores"]["a/w/x"] == 0.5
    assert "a" not in s.window(12.0, 13.0, min_share=0.2)["process_cores"]  # 0.1 of a core: left out


def test_cpu_sampler_names_the_process_tree_and_leaves_other_roots_out():
    s = C.CpuSampler(lambda: {"me": os.getpid(), "again": os.getpid()})
    _, procs, threads, cores = s._snapshot()
    assert "again" in procs and "me" not in procs  # a pid is counted under the first label that reaches it
    assert all(k.startswith("again/") for k in threads)
    assert len(cores) == os.cpu_count()
