"""CURVE on real TCP sockets (127.0.0.1): the run's keys talk, strangers cannot inject a frame,
and a non-loopback address without keys refuses to bind or connect.

Every wait has a timeout; "nothing arrives" is asserted by waiting the full timeout for it.
"""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest
import zmq
import zmq.asyncio

import protocols as P
from espo_async.config import ConfigError, parse_config
from espo_async.runtime import keys
from espo_async.runtime.transport import InsecureAddressError, Transport, free_ports, resolve_addresses

QUIET_S = 2.0  # how long a receiver must stay silent after a stranger's attempt


def tcp_addresses(host: str = "127.0.0.1") -> dict[str, str]:
    return resolve_addresses("tcp", "security-test", host=host)


def token_chunk(rid: str) -> P.TokenChunk:
    n = 4
    return P.TokenChunk(request_id=rid, sampler_id="sampler-0", start=0, token_ids=np.arange(n, dtype=np.int32),
                        logprobs=np.zeros(n, np.float32), top1_logprobs=np.zeros(n, np.float32),
                        versions=np.zeros(n, np.int32))


@pytest.fixture
def key_dir(tmp_path):
    folder = tmp_path / "keys"
    keys.generate(folder)
    return folder


@contextlib.asynccontextmanager
async def transports(*specs):
    made = [Transport(addresses, **kwargs) for addresses, kwargs in specs]
    try:
        yield made
    finally:
        for t in made:
            t.close()


async def wait_counter(t: Transport, key: str, at_least: int = 1, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while t.errors[key] < at_least:
            t.wire_event.clear()
            await t.wire_event.wait()


async def nothing_arrives(t: Transport, sock, timeout: float = QUIET_S) -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(timeout):
            await t.recv(sock, "stranger")


async def test_two_transports_with_the_runs_keys_talk_encrypted(key_dir):
    addresses = tcp_addresses()
    async with transports((addresses, {"curve_keys_dir": key_dir}), (addresses, {"curve_keys_dir": key_dir})) as (
        server,
        client,
    ):
        pull = server.socket(zmq.PULL, "results", bind=True)
        push = client.socket(zmq.PUSH, "results", bind=False)
        router = server.socket(zmq.ROUTER, "stopper_cancel", bind=True)
        dealer = client.socket(zmq.DEALER, "stopper_cancel", bind=False, identity="sampler-0")
        pub = server.socket(zmq.PUB, "broadcast", bind=True)
        sub = client.socket(zmq.SUB, "broadcast", bind=False, subscribe=True)
        for sock in (pull, push, router, dealer, pub, sub):
            assert sock.get(zmq.MECHANISM) == zmq.CURVE
        assert pull.get(zmq.CURVE_SERVER) and not push.get(zmq.CURVE_SERVER)

        msg = token_chunk("r1")
        await client.send(push, msg)
        async with asyncio.timeout(20):
            got = await server.recv(pull, "client")
        assert P.encode(got) == P.encode(msg)

        # ROUTER -> DEALER by routing id (the cancel path), once the DEALER has connected.
        cancel = P.Cancel(request_id="r1", sampler_id="sampler-0", stop_index=2)
        await client.send(dealer, P.WorkRequest(sampler="sampler-0", free_slots=1, policy_version=0))
        async with asyncio.timeout(20):
            ident, hello = await server.recv_routed(router, "client")
        assert ident == b"sampler-0" and isinstance(hello, P.WorkRequest)
        assert server.send_to(router, ident, cancel)
        async with asyncio.timeout(20):
            got = await client.recv(dealer, "server")
        assert got == cancel

        # PUB -> SUB (re-sent, as the learner does, until the subscription is in place).
        boundary = P.Shutdown(reason="done", source="test")
        async with asyncio.timeout(20):
            while True:
                server.try_send(pub, boundary)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.2):
                        assert await client.recv(sub, "server") == boundary
                        break
        assert server.errors["auth_failures"] == 0 and server.errors["handshake_failures"] == 0


async def test_a_peer_without_keys_cannot_inject_a_frame(key_dir):
    addresses = tcp_addresses()
    async with transports((addresses, {"curve_keys_dir": key_dir}), (addresses, {"curve_keys_dir": key_dir})) as (
        server,
        client,
    ):
        pull = server.socket(zmq.PULL, "results", bind=True)
        ctx = zmq.asyncio.Context()
        try:
            stranger = ctx.socket(zmq.PUSH)
            stranger.setsockopt(zmq.LINGER, 0)
            stranger.connect(addresses["results"])  # plain ZMTP, no CURVE
            for i in range(5):
                await stranger.send(P.encode(token_chunk(f"evil-{i}")), flags=zmq.NOBLOCK)
            await wait_counter(server, "handshake_failures")
            await nothing_arrives(server, pull)
        finally:
            ctx.destroy(linger=0)
        # The run's own peers are unaffected.
        push = client.socket(zmq.PUSH, "results", bind=False)
        await client.send(push, token_chunk("good"))
        async with asyncio.timeout(20):
            assert (await server.recv(pull, "client")).request_id == "good"


async def test_an_unauthorized_client_key_cannot_inject_a_frame(key_dir, tmp_path):
    """Knowing the server's public key is not enough: the client key must be in authorized/."""
    other = keys.generate(tmp_path / "other-keys")  # a valid CURVE client, but not one of ours
    ours = keys.load(key_dir)
    addresses = tcp_addresses()
    async with transports((addresses, {"curve_keys_dir": key_dir})) as (server,):
        pull = server.socket(zmq.PULL, "results", bind=True)
        router = server.socket(zmq.ROUTER, "work", bind=True)
        ctx = zmq.asyncio.Context()
        try:
            socks = []
            for kind, endpoint in ((zmq.PUSH, "results"), (zmq.DEALER, "work")):
                s = ctx.socket(kind)
                s.setsockopt(zmq.LINGER, 0)
                s.curve_serverkey = ours.server_public
                s.curve_publickey, s.curve_secretkey = other.client_public, other.client_secret
                s.connect(addresses[endpoint])
                socks.append(s)
            for s in socks:
                await s.send(P.encode(P.WorkRequest(sampler="sampler-0", free_slots=4096, policy_version=0)), flags=zmq.NOBLOCK)
            await wait_counter(server, "auth_failures", at_least=2)
            await nothing_arrives(server, pull)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(QUIET_S):
                    await router.recv_multipart()
        finally:
            ctx.destroy(linger=0)
        assert server.errors["bad_frames"] == 0  # nothing reached the decoder at all


async def test_a_wrong_server_key_is_a_failed_handshake(key_dir, tmp_path):
    other = keys.generate(tmp_path / "other-keys")
    addresses = tcp_addresses()
    async with transports((addresses, {"curve_keys_dir": key_dir}), (addresses, {"curve_keys_dir": tmp_path / "other-keys"})) as (
        server,
        impostor,
    ):
        pull = server.socket(zmq.PULL, "results", bind=True)
        push = impostor.socket(zmq.PUSH, "results", bind=False)  # a whole run with other keys
        assert impostor.curve.server_public == other.server_public
        await impostor.send(push, token_chunk("evil"))
        await wait_counter(server, "handshake_failures")
        await nothing_arrives(server, pull)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10"])
async def test_non_loopback_without_curve_refuses_unless_allowed(host, key_dir):
    ports = free_ports(3)
    addresses = {"results": f"tcp://{host}:{ports[0]}", "broadcast": f"tcp://{host}:{ports[1]}"}
    other = {**addresses, "results": f"tcp://{host}:{ports[2]}"}
    async with transports((addresses, {}), (addresses, {"allow_insecure": True}), (other, {"curve_keys_dir": key_dir})) as (
        plain,
        insecure,
        curve,
    ):
        with pytest.raises(InsecureAddressError, match="without CURVE"):
            plain.socket(zmq.PULL, "results", bind=True)
        with pytest.raises(InsecureAddressError, match="transport.allow_insecure"):
            plain.socket(zmq.SUB, "broadcast", bind=False, subscribe=True)
        assert not plain.sockets  # the refused sockets were closed, nothing was bound
        # Connecting never needs the address to exist; binding does (0.0.0.0 always exists).
        insecure.socket(zmq.SUB, "broadcast", bind=False, subscribe=True)
        curve.socket(zmq.SUB, "broadcast", bind=False, subscribe=True)
        if host == "0.0.0.0":
            insecure.socket(zmq.PULL, "results", bind=True)
            curve.socket(zmq.PULL, "results", bind=True)


def test_loopback_and_ipc_need_no_keys(tmp_path):
    for addresses in (tcp_addresses(), tcp_addresses("localhost"), resolve_addresses("ipc", str(tmp_path))):
        t = Transport(addresses)
        try:
            t.socket(zmq.PULL, "results", bind=True)
        finally:
            t.close()


def test_config_refuses_a_non_loopback_tcp_host_without_curve_naming_the_keys(tmp_path):
    with pytest.raises(ConfigError) as info:
        parse_config({"transport": {"kind": "tcp", "host": "10.1.2.3"}})
    text = str(info.value)
    assert "transport:" in text and "'10.1.2.3'" in text
    assert "transport.curve.enabled" in text and "transport.curve.keys_dir" in text and "transport.allow_insecure" in text
    with pytest.raises(ConfigError, match=r"transport\.curve: .*needs curve\.keys_dir"):
        parse_config({"transport": {"kind": "tcp", "host": "10.1.2.3", "curve": {"enabled": True}}})
    with pytest.raises(ConfigError, match=r"transport\.curve: .*lacks server\.key"):
        parse_config({"transport": {"curve": {"enabled": True, "keys_dir": str(tmp_path / "none")}}})
    keys.generate(tmp_path / "k")
    ok = parse_config({"transport": {"kind": "tcp", "host": "10.1.2.3",
                                     "curve": {"enabled": True, "keys_dir": str(tmp_path / "k")}}})
    assert ok.transport.curve.enabled
    assert parse_config({"transport": {"kind": "tcp", "host": "10.1.2.3", "allow_insecure": True}}).transport.allow_insecure
    assert parse_config({"transport": {"kind": "tcp", "host": "127.0.0.1"}}).transport.host == "127.0.0.1"


def test_key_folder_is_private_and_checked(tmp_path):
    folder = tmp_path / "k"
    keys.generate(folder)
    assert (folder.stat().st_mode & 0o077) == 0
    assert all((p.stat().st_mode & 0o077) == 0 for p in folder.glob("*.key_secret"))
    assert keys.main(["check", str(folder)]) == 0
    (folder / "client.key_secret").chmod(0o644)
    with pytest.raises(ValueError, match="readable by other users"):
        keys.load(folder)
    (folder / "client.key_secret").chmod(0o600)
    for key in (folder / "authorized").glob("*.key"):
        key.unlink()
    with pytest.raises(ValueError, match="authorized/ holds no client public key"):
        keys.load(folder)
    with pytest.raises(FileExistsError):
        keys.generate(folder)


async def test_curve_auto_is_one_switch_that_protects_a_whole_run_on_loopback(tmp_path, tiny_model_dir):
    """transport.curve.auto on loopback tcp: the run makes its keys (RUN/curve, 0700), every actor
    uses them, and the run trains to its end; a local stranger without the keys (what any user of
    a shared machine could otherwise do) asks the coordinator for work all along and gets none."""
    import json
    import stat

    from tests.reliability.system_run import SystemRun, faults_config

    cfg = faults_config(run={"total_steps": 2}, transport={"kind": "tcp", "curve": {"auto": True}})
    assert cfg.transport.curve.enabled
    async with SystemRun(cfg, tmp_path) as run:
        ctx = zmq.asyncio.Context()
        stranger = ctx.socket(zmq.DEALER)
        stranger.setsockopt(zmq.LINGER, 0)
        stranger.connect(run.sup.addresses["work"])
        got = []

        async def ask_for_work():
            while True:
                await stranger.send(P.encode(P.WorkRequest(sampler="stranger", free_slots=4, policy_version=0)))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.2):  # the stranger's polling period, not synchronisation
                        got.append(await stranger.recv())

        asker = asyncio.create_task(ask_for_work())
        try:
            result = await run.finish(300)
        finally:
            asker.cancel()
            ctx.destroy(linger=0)
    assert result.exit_code == 0, result.reason
    assert got == []
    folder = tmp_path / "curve"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in folder.glob("*.key_secret"))
    assert f"keys_dir: {folder.resolve()}" in (tmp_path / "config.yaml").read_text()
    final = json.loads((tmp_path / "counters.jsonl").read_text().splitlines()[-1])
    assert final["actors"]["coordinator"]["counters"].get("wire.handshake_failures", 0) >= 1
