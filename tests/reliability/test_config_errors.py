"""A wrong config fails before anything starts, with a message that names the key and says what
is allowed (parse_config for the schema, validate_actors for actor classes and their options,
and ``run.py --check`` end to end)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from espo_async.config import ConfigError, parse_config
from espo_async.runtime.entry import validate_actors

REPO = Path(__file__).resolve().parents[2]

CASES = {
    "unknown key": ({"rollout": {"max_tokns": 5}}, ["rollout.max_tokns", "unknown key", "max_tokens"]),
    "out of range": ({"rollout": {"max_tokens": 0}}, ["rollout.max_tokens", "greater than or equal to 1"]),
    "not a number": ({"transport": {"heartbeat_interval_s": "fast"}}, ["transport.heartbeat_interval_s", "number"]),
    "not an allowed value": ({"stop": {"policy": "magic"}}, ["stop.policy", "'magic'", "'espo'", "'regret_only'"]),
    "transport kind": ({"transport": {"kind": "udp"}}, ["transport.kind", "'ipc' or 'tcp'"]),
    "curve without keys": ({"transport": {"curve": {"enabled": True}}}, ["transport.curve", "curve.keys_dir"]),
    "non-loopback without curve": (
        {"transport": {"kind": "tcp", "host": "10.1.2.3"}},
        ["transport", "'10.1.2.3'", "transport.curve.enabled", "transport.allow_insecure"],
    ),
    "supervisor cpus": ({"actors": {"supervisor_cpus": []}}, ["actors.supervisor_cpus", "non-empty list"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_schema_errors_name_the_key_and_what_is_allowed(name):
    data, expected = CASES[name]
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    for text in expected:
        assert text in str(info.value), (text, str(info.value))


@pytest.mark.parametrize(
    "sampler, expected",
    [
        ({"class": "actors.samplers.nope:Nope"}, ["actors.sampler.class", "actors.samplers.nope"]),
        ({"class": "actors.stopper:Stopper"}, ["actors.sampler.class", "implements role 'stopper'"]),
        ({"class": "actors.samplers.fake:FakeSampler", "options": {"bogus": 1}},
         ["actors.sampler.options.bogus", "unknown option", "tokens_per_s"]),
        ({"class": "actors.samplers.fake:FakeSampler", "options": {"tokens_per_s": -1}},
         ["actors.sampler.options.tokens_per_s"]),
    ],
)
def test_actor_class_and_option_errors_name_the_key(sampler, expected):
    cfg = parse_config({"actors": {"sampler": sampler}, "task": {"name": "arithmetic", "options": {"n_steps": 3}}})
    with pytest.raises(ConfigError) as info:
        validate_actors(cfg)
    for text in expected:
        assert text in str(info.value), (text, str(info.value))


def test_run_py_refuses_to_start_with_a_wrong_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout:\n  max_tokens: -3\ntransport:\n  kind: tcp\n  host: 192.0.2.1\n")
    proc = subprocess.run([sys.executable, "run.py", "--config", str(bad), "--run-dir", str(tmp_path / "run")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "rollout.max_tokens" in proc.stderr and "transport.curve.enabled" in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()  # nothing started, no run folder


FAKE = "actors.samplers.fake:FakeSampler"


@pytest.mark.parametrize(
    "actors, available, expected",
    [
        ({"sampler": {"class": FAKE, "cpus": [0]}}, {0, 1, 2}, {1, 2}),  # auto: off the samplers' CPUs
        ({"sampler": {"class": FAKE, "cpus": [0, 1]}}, {0, 1}, None),  # they use every CPU: stay where it is
        ({}, {0, 1}, None),  # unpinned samplers
        ({"sampler": {"class": FAKE, "cpus": [0]}, "supervisor_cpus": None}, {0, 1}, None),
        ({"supervisor_cpus": [1, 7]}, {0, 1}, {1}),
    ],
)
def test_supervisor_cpus(actors, available, expected):
    from espo_async.runtime.supervisor import supervisor_cpus

    assert supervisor_cpus(parse_config({"actors": actors}), available) == expected


def test_supervisor_cpus_that_do_not_exist_are_an_error():
    from espo_async.runtime.supervisor import supervisor_cpus

    with pytest.raises(ValueError, match=r"actors.supervisor_cpus \[7\]"):
        supervisor_cpus(parse_config({"actors": {"supervisor_cpus": [7]}}), {0, 1})
