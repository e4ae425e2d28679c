"""Several hosts, the quick parts (no processes): cluster config, names, addresses, and the
coordinator's bookkeeping of samplers on other hosts (liveness, restarts, asking for slots).
The whole thing with real processes is tests/reliability/test_multihost.py."""

from __future__ import annotations

import logging
import time
from collections import Counter, deque

import numpy as np
import pytest

import protocols as P
from actors.coordinator import Coordinator, Outstanding
from espo_async.config import ConfigError, parse_config
from espo_async.runtime.entry import actor_instances
from espo_async.runtime.transport import CONTROL_ENDPOINTS, ENDPOINTS, joined_addresses, resolve_addresses


def test_cluster_config_names_roles_and_checks_placement():
    cfg = parse_config({"cluster": {"roles": ["sampler"], "host_name": "gpu-3"}, "actors": {"sampler": {
        "class": "actors.samplers.fake:FakeSampler", "count": 2}}})
    assert [n for n, _, _ in actor_instances(cfg, local=True)] == ["sampler-0@gpu-3", "sampler-1@gpu-3"]
    assert len(actor_instances(cfg)) == 6  # every actor of the run, for name lookups
    assert not cfg.cluster.runs("coordinator") and cfg.cluster.runs("sampler")
    assert [n for n, _, _ in actor_instances(parse_config({}), local=True)][-1] == "sampler-0"

    def error(data) -> str:
        with pytest.raises(ConfigError) as exc:
            parse_config(data)
        return str(exc.value)

    assert "cluster.roles.1: got 'nobody'" in error({"cluster": {"roles": ["sampler", "nobody"]}})
    assert "twice" in error({"cluster": {"roles": ["sampler", "sampler"]}})
    assert "host_name" in error({"cluster": {"host_name": "a/b"}})
    assert "transport.kind tcp" in error({"cluster": {"role_hosts": {"learner": "10.0.0.2"}}})
    assert "base_port" in error({"transport": {"kind": "tcp"}, "cluster": {"role_hosts": {"learner": "10.0.0.2"}}})
    assert "curve" in error({"transport": {"kind": "tcp", "base_port": 7000},
                             "cluster": {"role_hosts": {"learner": "10.0.0.2"}}}).lower()
    assert "actors.critic is null" in error({"stop": {"policy": "none"}, "actors": {"critic": None},
                                             "cluster": {"roles": ["critic"]}})


def test_addresses_place_each_role_and_joined_hosts_keep_control_local(tmp_path):
    head = resolve_addresses("tcp", "run", host="127.0.0.1", base_port=7100, role_hosts={"learner": "127.0.0.2"})
    assert head["results"] == "tcp://127.0.0.2:7104" and head["broadcast"] == "tcp://127.0.0.2:7105"
    assert head["work"] == "tcp://127.0.0.1:7100" and head["control_in"].startswith("tcp://127.0.0.1:")
    mine = joined_addresses(head, str(tmp_path))
    assert set(mine) == set(ENDPOINTS)
    for name in ENDPOINTS:
        if name in CONTROL_ENDPOINTS:
            assert mine[name].startswith("ipc://") and mine[name] != head[name]
        else:
            assert mine[name] == head[name]
    with pytest.raises(ValueError, match="lack"):
        joined_addresses({"work": "tcp://127.0.0.1:1"}, str(tmp_path))


class FakeTransport:
    def __init__(self, routable: bool = True):
        self.sent: list[tuple[bytes, P.Message]] = []
        self.routable = routable

    def send_to(self, sock, peer, msg) -> bool:
        if self.routable:
            self.sent.append((peer, msg))
        return self.routable


def coordinator(timeout_s: float = 5.0) -> Coordinator:
    """A coordinator's bookkeeping without its process (no sockets, no dataset)."""
    c = Coordinator.__new__(Coordinator)
    c.cfg = parse_config({"transport": {"heartbeat_interval_s": 0.25, "heartbeat_timeout_s": timeout_s}})
    c.counters = Counter()
    c.log = logging.getLogger("test.coordinator")
    c.transport = FakeTransport()
    c.work_sock = None
    c.credits, c.outstanding, c.alive, c.sessions, c.asked = {}, {}, {}, {}, {}
    c.queue, c.priority = deque(), deque()
    c.delivered = 0
    # Its persistent state and stall watch (actors/coordinator.py): nothing open, learner not heard.
    c.open, c.eval_open, c.down, c.watched = {}, {}, {}, set()
    c.state_dirty, c.learner_epoch = False, None
    return c


def work(rid: str) -> P.PromptWork:
    return P.PromptWork(request_id=rid, prompt_id=rid.split("#")[0], sample_index=0, group_size=1,
                        prompt_token_ids=np.zeros(3, np.int32), max_tokens=8, temperature=1.0, top_p=1.0,
                        issued_at_version=0)


def request(c: Coordinator, ident: bytes, session: str, slots: int, intent: P.WorkIntent = "ordinary") -> None:
    """What the work loop does with a WorkRequest of a sampler on another host (without dispatching)."""
    msg = P.WorkRequest(sampler=ident.decode(), free_slots=slots, policy_version=0, session=session, intent=intent)
    s = c._remote_request(ident, msg)
    c.credits[ident] = c.credits.get(ident, 0) + (s or 0)


def test_remote_sampler_hello_restart_and_asking_for_slots():
    c = coordinator()
    a = b"sampler-0@hostA"
    request(c, a, "s1", 4, intent="hello")
    assert c.credits[a] == 4 and not c.transport.sent
    request(c, a, "s1", 0)  # alive
    request(c, a, "s1", 1)  # a slot came free
    assert c.credits[a] == 5

    # Restarted under the same name (a new session): the old process's work is issued again.
    c.outstanding["g0/p#0"] = Outstanding(work("g0/p#0"), a)
    c.outstanding["g0/p#1"] = Outstanding(work("g0/p#1"), a, delivered=True)
    c.delivered = 1
    c.outstanding["g0/p#2"] = Outstanding(work("g0/p#2"), b"other")
    request(c, a, "s2", 4, intent="hello")
    assert c.counters["samplers_restarted"] == 1 and c.counters["reissued_after_loss"] == 2
    assert list(c.outstanding) == ["g0/p#2"] and c.delivered == 0 and c.credits[a] == 4
    assert [w.attempt for w in c.queue] == [1, 1]

    # A session it never said hello in (the coordinator restarted, or gave it up): ask for its
    # free slots; its requests until the answer are not counted; the answer sets the credit.
    c2 = coordinator()
    request(c2, a, "s1", 1)
    assert c2.credits[a] == 0 and a in c2.asked
    peer, msg = c2.transport.sent[0]
    assert peer == a and isinstance(msg, P.SlotsQuery) and msg.sampler == "sampler-0@hostA"
    request(c2, a, "s1", 1)
    request(c2, a, "s1", 3, intent="slots")
    assert c2.credits[a] == 3 and a not in c2.asked
    request(c2, a, "s1", 3, intent="slots")  # a second answer (asked twice): counted once
    assert c2.credits[a] == 3 and c2.counters["slot_answers_ignored"] == 1
    request(c2, a, "s1", 1)
    assert c2.credits[a] == 4

    # Unroutable when asked: asked again on its next request.
    c3 = coordinator()
    c3.transport = FakeTransport(routable=False)
    request(c3, a, "s1", 0)
    assert a not in c3.asked and a not in c3.sessions


async def test_a_silent_remote_sampler_is_lost_and_its_work_issued_again():
    import asyncio

    c = coordinator(timeout_s=0.5)
    a = b"sampler-0@hostA"
    request(c, a, "s1", 2, intent="hello")
    c.alive[a] = time.monotonic()
    c.outstanding["g0/p#0"] = Outstanding(work("g0/p#0"), a)
    c._dispatch = lambda: None
    loop = asyncio.create_task(c._liveness_loop())
    try:
        async with asyncio.timeout(10):
            while not c.counters["samplers_silent"]:
                await asyncio.sleep(0.05)  # polling a plain object: nothing to wait on
    finally:
        loop.cancel()
    assert c.counters["reissued_after_loss"] == 1 and not c.outstanding and a not in c.credits
    assert a not in c.sessions and a not in c.alive
