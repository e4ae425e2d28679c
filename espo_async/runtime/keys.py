"""CURVE keys of a run: ``python -m espo_async.runtime.keys gen DIR``.

Every socket that binds is a CURVE server (``server.key`` / ``server.key_secret``); every socket
that connects is a CURVE client (``client.key`` / ``client.key_secret``) and must know the server's
public key. A server accepts a client only if the client's public key is in ``DIR/authorized/``
(ZAP authentication), so knowing the server's public key is not enough to inject a frame. The
folder is created 0700 and secret keys 0600; copy it to every machine of the run over a secure
channel. To admit another client key pair, drop its public ``.key`` file into ``authorized/``.

    python -m espo_async.runtime.keys gen DIR      # make DIR with a server and a client key pair
    python -m espo_async.runtime.keys check DIR    # verify a folder (exit code 2 if unusable)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CurveKeys:
    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes
    authorized_dir: Path


def generate(folder: str | os.PathLike, *, force: bool = False) -> CurveKeys:
    """Create ``folder`` with a server and a client key pair and ``authorized/client.key``."""
    import zmq.auth

    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not force:
        raise FileExistsError(f"{folder} exists and is not empty (use --force to replace its keys)")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        zmq.auth.create_certificates(tmp, "server")
        zmq.auth.create_certificates(tmp, "client")
        for name in ("server.key", "server.key_secret", "client.key", "client.key_secret"):
            os.replace(Path(tmp) / name, folder / name)
    authorized = folder / "authorized"
    authorized.mkdir(mode=0o700, exist_ok=True)
    shutil.copyfile(folder / "client.key", authorized / "client.key")
    for path in folder.glob("*.key_secret"):
        os.chmod(path, 0o600)
    return load(folder)


def load(folder: str | os.PathLike) -> CurveKeys:
    """Read a key folder; ValueError naming what is missing or unsafe."""
    import zmq.auth

    folder = Path(folder)
    try:
        server_public, server_secret = zmq.auth.load_certificate(folder / "server.key_secret")
        client_public, client_secret = zmq.auth.load_certificate(folder / "client.key_secret")
    except (OSError, ValueError) as exc:
        raise ValueError(f"transport.curve.keys_dir {str(folder)!r}: cannot read the key pairs: {exc}") from None
    if server_secret is None or client_secret is None:
        raise ValueError(f"transport.curve.keys_dir {str(folder)!r}: a *.key_secret file holds no secret key")
    for path in folder.glob("*.key_secret"):
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            raise ValueError(f"{path} is readable by other users: chmod 600 {path}")
    authorized = folder / "authorized"
    if not authorized.is_dir() or not any(authorized.glob("*.key")):
        raise ValueError(f"transport.curve.keys_dir {str(folder)!r}: authorized/ holds no client public key (*.key)")
    return CurveKeys(server_public, server_secret, client_public, client_secret, authorized)


RUN_KEY_FILE = "run.key"


def run_key(run_dir: str | os.PathLike, *, value: bytes | None = None) -> bytes:
    """The run's secret for work tags (``espo_async/ids.py`` work_tag): 32 random bytes in
    ``RUN_DIR/run.key`` (0600), made by whoever needs it first (the supervisor, before any actor
    starts; an actor started alone by a test). Created with a hard link, so two processes that race
    agree on one key. ``value``: a key to install (a joining host takes the head's from join.json);
    an existing different key is an error."""
    path = Path(run_dir) / RUN_KEY_FILE
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        key = b""
    if len(key) != 32:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".run.key.")
        try:
            os.write(fd, value if value is not None else os.urandom(32))
            os.close(fd)
            os.chmod(tmp, 0o600)
            try:
                os.link(tmp, path)  # atomic, and never replaces a key another process made
            except FileExistsError:
                if len(path.read_bytes()) != 32:  # a torn file (cannot be made by link): replace it
                    os.replace(tmp, path)
                    tmp = ""
        finally:
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        key = path.read_bytes()
    if value is not None and key != value:
        raise ValueError(f"{path} holds another run's key than the one given (join.json of another run?)")
    return key


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m espo_async.runtime.keys", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("gen", help="create a key folder")
    gen.add_argument("dir", type=Path)
    gen.add_argument("--force", action="store_true", help="replace the keys of an existing folder")
    check = sub.add_parser("check", help="verify a key folder")
    check.add_argument("dir", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "gen":
            generate(args.dir, force=args.force)
            print(f"CURVE keys written to {args.dir}; set transport.curve.enabled: true and transport.curve.keys_dir: {args.dir}")
        else:
            load(args.dir)
            print(f"{args.dir}: OK")
    except (ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
