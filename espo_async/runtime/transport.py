"""ZeroMQ plumbing: where each endpoint lives, how sockets are made, how frames are sent.

Every bound endpoint of a run has a name (``ENDPOINTS``); ``resolve_addresses`` maps the names
to ``ipc://`` paths or ``tcp://`` ports once, in the supervisor, and every actor reads the same
map. Sockets carry one frame per message, encoded by ``protocols.codec``.

What can go wrong on the wire is counted (``Transport.errors``, reported with every heartbeat
as ``wire.<name>``) and logged, never raised: undecodable frames (``bad_frames``), frames over
``max_frame_bytes`` (libzmq drops the sender's connection before reading the frame into memory:
``peer_disconnects``), peers that fail the CURVE handshake (``auth_failures``,
``handshake_failures``), unroutable or dropped sends. With CURVE (``transport.curve``) every
socket authenticates and encrypts; a non-loopback address without it refuses to bind.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import tempfile
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

import protocols as P
from espo_async.config import is_loopback_host

log = logging.getLogger(__name__)

ENDPOINTS: dict[str, str] = {
    "work": "coordinator ROUTER: work requests in, prompt work out (credit-based)",
    "stopper_stream": "stopper PULL: token chunks and stream ends from samplers, values from the critic",
    "stopper_cancel": "stopper ROUTER: cancels to the sampler that owns the request",
    "critic_stream": "critic PULL: token chunks and stream ends from samplers",
    "results": "learner PULL: finished trajectories from samplers (backpressure)",
    "broadcast": "learner PUB: weights, batch boundaries, shutdown",
    "control_in": "supervisor PULL: heartbeats from every actor",
    "control_out": "supervisor PUB: start and shutdown",
}


#: The role whose process binds each endpoint ("supervisor": every host's own supervisor).
ENDPOINT_OWNERS: dict[str, str] = {
    "work": "coordinator",
    "stopper_stream": "stopper",
    "stopper_cancel": "stopper",
    "critic_stream": "critic",
    "results": "learner",
    "broadcast": "learner",
    "control_in": "supervisor",
    "control_out": "supervisor",
}
#: Endpoints that never leave a host: each host's supervisor binds its own (docs/cluster.md).
CONTROL_ENDPOINTS = ("control_in", "control_out")


def resolve_addresses(
    kind: str,
    run_id: str,
    *,
    host: str = "127.0.0.1",
    base_port: int = 0,
    role_hosts: dict[str, str] | None = None,
) -> dict[str, str]:
    """Choose one address per endpoint. ipc paths live in a short private temp folder (the
    AF_UNIX path limit is ~107 bytes); tcp ports are consecutive from base_port or free ports.
    ``role_hosts`` (tcp): the host of the endpoints a role binds, when not ``host``."""
    if kind == "ipc":
        return _ipc_addresses(run_id, ENDPOINTS)
    if kind == "tcp":
        ports = [base_port + i for i in range(len(ENDPOINTS))] if base_port else free_ports(len(ENDPOINTS), host)
        where = {name: (role_hosts or {}).get(ENDPOINT_OWNERS[name], host) for name in ENDPOINTS}
        return {name: f"tcp://{_bracket(where[name])}:{port}" for name, port in zip(ENDPOINTS, ports)}
    raise ValueError(f"unknown transport kind {kind!r} (allowed: ipc, tcp)")


def _ipc_addresses(run_id: str, names) -> dict[str, str]:
    digest = hashlib.sha1(run_id.encode()).hexdigest()[:10]
    folder = Path(tempfile.gettempdir()) / f"espo-{digest}"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return {name: f"ipc://{folder}/{name}" for name in names}


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def joined_addresses(head: dict[str, str], run_id: str) -> dict[str, str]:
    """The address map of a host that joins a run: the head's endpoints, except the control
    endpoints, which this host's own supervisor binds locally (ipc: they never leave the host)."""
    missing = sorted(set(ENDPOINTS) - set(head))
    if missing:
        raise ValueError(f"the head's addresses lack {', '.join(missing)}")
    out = {name: head[name] for name in ENDPOINTS}
    out.update(_ipc_addresses(run_id, CONTROL_ENDPOINTS))
    return out


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports that were free a moment ago (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def is_local_address(address: str) -> bool:
    """ipc://, inproc:// and tcp:// on a loopback host never leave the machine."""
    scheme = address.partition("://")[0]
    if scheme in ("ipc", "inproc"):
        return True
    host = urlsplit(address).hostname or address.partition("://")[2].rpartition(":")[0]
    return is_loopback_host(host)


class InsecureAddressError(ValueError):
    """Binding or connecting a non-loopback address without CURVE (and without allow_insecure)."""


def cleanup_ipc(addresses: dict[str, str]) -> None:
    """Remove ipc socket files (and their folder if empty) after a run."""
    folders = set()
    for addr in addresses.values():
        if addr.startswith("ipc://"):
            path = Path(addr[len("ipc://") :])
            folders.add(path.parent)
            path.unlink(missing_ok=True)
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            pass


_MONITOR_EVENTS = (
    zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class Transport:
    """Creates sockets on one asyncio ZeroMQ context and counts what goes wrong on the wire."""

    def __init__(
        self,
        addresses: dict[str, str],
        *,
        hwm: int = 1000,
        max_frame_bytes: int = P.DEFAULT_MAX_FRAME_BYTES,
        curve_keys_dir: str | os.PathLike | None = None,
        allow_insecure: bool = False,
    ):
        self.addresses = addresses
        self.hwm = hwm
        self.max_frame_bytes = max_frame_bytes
        self.allow_insecure = allow_insecure
        self.ctx = zmq.asyncio.Context()
        self.sockets: list[zmq.asyncio.Socket] = []
        self.errors: Counter[str] = Counter()
        #: Set whenever the socket monitor counted something (peer dropped, handshake failed).
        self.wire_event = asyncio.Event()
        self.curve = None
        self._auth = None
        self._monitors: list[tuple[str, zmq.asyncio.Socket]] = []
        self._monitor_tasks: list[asyncio.Task] = []
        if curve_keys_dir is not None:
            from espo_async.runtime import keys

            self.curve = keys.load(curve_keys_dir)

    @classmethod
    def from_config(cls, addresses: dict[str, str], tcfg, *, hwm: int | None = None) -> Transport:
        """A transport as ``transport`` (a TransportConfig) says: HWM, frame limit, CURVE."""
        return cls(
            addresses,
            hwm=hwm or tcfg.hwm,
            max_frame_bytes=tcfg.max_frame_bytes,
            curve_keys_dir=tcfg.curve.keys_dir if tcfg.curve.enabled else None,
            allow_insecure=tcfg.allow_insecure,
        )

    def _start_auth(self) -> None:
        """ZAP handler of this context: a CURVE client is admitted only if its public key is in
        ``authorized/``. Runs in its own thread (works while the event loop is busy)."""
        if self._auth is not None or self.curve is None:
            return
        from zmq.auth.thread import ThreadAuthenticator

        self._auth = ThreadAuthenticator(self.ctx, log=logging.getLogger("espo.auth"))
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(self.curve.authorized_dir))

    def _secure(self, sock: zmq.asyncio.Socket, address: str, bind: bool) -> None:
        if self.curve is None:
            if not is_local_address(address) and not self.allow_insecure:
                raise InsecureAddressError(
                    f"refusing to {'bind' if bind else 'connect'} {address} without CURVE: it is not a loopback "
                    "address. Set transport.curve.enabled and transport.curve.keys_dir "
                    "(python -m espo_async.runtime.keys gen DIR), or transport.allow_insecure: true"
                )
            return
        if bind:
            self._start_auth()
            sock.curve_secretkey = self.curve.server_secret
            sock.curve_publickey = self.curve.server_public
            sock.curve_server = True
        else:
            sock.curve_serverkey = self.curve.server_public
            sock.curve_secretkey = self.curve.client_secret
            sock.curve_publickey = self.curve.client_public

    def _monitor(self, sock: zmq.asyncio.Socket, endpoint: str) -> None:
        """Count (and log) peers that fail the handshake or get dropped by libzmq."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no event loop (a synchronous tool): nothing would read the events
        mon = sock.get_monitor_socket(_MONITOR_EVENTS)
        self._monitors.append((endpoint, mon))
        self._monitor_tasks.append(loop.create_task(self._read_monitor(endpoint, mon), name=f"monitor:{endpoint}"))

    async def _read_monitor(self, endpoint: str, mon: zmq.asyncio.Socket) -> None:
        with contextlib.suppress(asyncio.CancelledError, zmq.ZMQError):
            while True:
                event = parse_monitor_message(await mon.recv_multipart())
                kind = event["event"]
                if kind == zmq.EVENT_DISCONNECTED:
                    self.errors["peer_disconnects"] += 1
                    log.info(
                        "a peer of %s disconnected (it exited or restarted, or sent a frame over "
                        "max_frame_bytes=%d, which is dropped unread)", endpoint, self.max_frame_bytes,
                    )
                elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    self.errors["auth_failures"] += 1
                    log.warning("rejected a peer of %s: CURVE authentication failed (key not in authorized/)", endpoint)
                else:
                    self.errors["handshake_failures"] += 1
                    log.warning("rejected a peer of %s: handshake failed (no or wrong CURVE keys, or not ZMTP)", endpoint)
                self.wire_event.set()

    def socket(
        self,
        kind: int,
        endpoint: str,
        *,
        bind: bool,
        identity: str | None = None,
        subscribe: bool = False,
        hwm: int | None = None,
        linger_ms: int = 0,
    ) -> zmq.asyncio.Socket:
        if endpoint not in self.addresses:
            raise KeyError(f"no address for endpoint {endpoint!r} (known: {sorted(self.addresses)})")
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, linger_ms)
        sock.setsockopt(zmq.SNDHWM, hwm or self.hwm)
        sock.setsockopt(zmq.RCVHWM, hwm or self.hwm)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_frame_bytes)
        if identity is not None:
            sock.setsockopt(zmq.ROUTING_ID, identity.encode())
        if kind == zmq.ROUTER:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted peer takes its routing id back
        if subscribe:
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        address = self.addresses[endpoint]
        try:
            self._secure(sock, address, bind)
            if bind:
                self._monitor(sock, endpoint)
                sock.bind(address)
            else:
                sock.connect(address)
        except Exception:
            sock.close(linger=0)
            raise
        self.sockets.append(sock)
        return sock

    def close(self, linger_ms: int = 0) -> None:
        for task in self._monitor_tasks:
            task.cancel()
        self._monitor_tasks.clear()
        for sock in self.sockets:
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
        for _, mon in self._monitors:
            mon.close(linger=0)
        self._monitors.clear()
        for sock in self.sockets:
            sock.close(linger=linger_ms)
        self.sockets.clear()
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self.ctx.term()

    # -- frames ------------------------------------------------------------------------------

    def decode(self, frame: bytes, source: str) -> P.Message | None:
        """Decode a frame; a bad frame is logged and counted, never raised."""
        try:
            return P.decode(frame, max_bytes=self.max_frame_bytes)
        except P.ProtocolError as exc:
            self.errors["bad_frames"] += 1
            log.warning("rejected a frame from %s: %s", source, exc)
            return None

    async def recv(self, sock: zmq.asyncio.Socket, source: str) -> P.Message | None:
        return self.decode(await sock.recv(copy=True), source)

    async def recv_routed(self, sock: zmq.asyncio.Socket, source: str) -> tuple[bytes, P.Message | None]:
        """ROUTER receive: (peer identity, message or None)."""
        parts = await sock.recv_multipart(copy=True)
        if len(parts) != 2:
            self.errors["bad_frames"] += 1
            log.warning("rejected a %d-part message from %s", len(parts), source)
            return (parts[0] if parts else b""), None
        return parts[0], self.decode(parts[1], source)

    async def send(self, sock: zmq.asyncio.Socket, msg: P.Message) -> None:
        """Blocking send: waits while the peer's queue is full (backpressure)."""
        await sock.send(P.encode(msg), copy=False)

    def try_send(self, sock: zmq.asyncio.Socket, msg: P.Message | bytes, counter: str = "dropped") -> bool:
        """Non-blocking send: drops (and counts) the frame if the queue is full."""
        frame = msg if isinstance(msg, bytes) else P.encode(msg)
        exc = _nonblocking(sock.send(frame, flags=zmq.NOBLOCK, copy=False))
        if exc is None:
            return True
        if isinstance(exc, zmq.Again):
            self.errors[counter] += 1
            return False
        raise exc

    def send_to(self, sock: zmq.asyncio.Socket, peer: str | bytes, msg: P.Message) -> bool:
        """ROUTER send to one peer; False (counted) if the peer is unknown or its queue is full."""
        ident = peer.encode() if isinstance(peer, str) else peer
        exc = _nonblocking(sock.send_multipart([ident, P.encode(msg)], flags=zmq.NOBLOCK, copy=False))
        if exc is None:
            return True
        if isinstance(exc, zmq.Again) or (isinstance(exc, zmq.ZMQError) and exc.errno == zmq.EHOSTUNREACH):
            self.errors["unroutable"] += 1
            return False
        raise exc


def _nonblocking(fut) -> BaseException | None:
    """pyzmq's asyncio sockets report a NOBLOCK failure on the returned future, not by raising."""
    if not fut.done():  # queued by pyzmq; it completes without blocking the caller
        return None
    return fut.exception()
