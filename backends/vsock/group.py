"""Sibling groups: how `vdev vsock` devices of one ``--group`` find each other.

vhost-device-vsock lets guests whose devices share a group reach each other
by CID, but only inside one process.  Here every device of a group, in any
number of daemons, listens on a Unix socket at a fixed place::

    <runtime dir>/<group>/<cid>.sock

where the runtime directory is ``$VDEV_VSOCK_RUNTIME_DIR`` if set, else
``$XDG_RUNTIME_DIR/vdev-vsock``, else ``/run/vdev-vsock`` for root and
``/tmp/vdev-vsock-<uid>`` for anyone else.  Directories are created with mode
0700, so only the same user's daemons join a group.

A guest (CID A) connecting to CID B port P makes A's daemon connect to B's
socket and write one line, then wait for B's answer::

    A → B:  SIBLING <A> <guest A's port> <P>\\n
    B → A:  OK\\n        (guest B accepted; the stream carries data from here)
            or the socket closes (guest B answered RST, or B is going away)

From then on the socket is an ordinary byte stream, exactly like a host
program's Unix socket: each daemon runs the usual connection state machine
and credit accounting with its own guest, so neither daemon buffers more
than the credit its guest gave it, and the kernel's socket buffer carries
back-pressure between them.  B's guest sees the connection coming from
``A:<guest A's port>`` (not from the host), so replies find their way back.
A CID nobody in the group holds (no socket, or nobody listening on it)
gets the guest an RST, as an unknown host port does.

A second device claiming a CID already in the group is refused at start (the
socket answers); a socket left by a daemon that died is replaced.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import stat
from pathlib import Path

from vdev.errors import DeviceError

RUNTIME_DIR_ENV = "VDEV_VSOCK_RUNTIME_DIR"
GROUP_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
#: sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
SUN_PATH_MAX = 107


def check_group_name(name: str) -> str:
    """Return ``name`` if it can name a group (it becomes a directory name)."""
    if not GROUP_NAME.match(name):
        raise ValueError(f"--group: {name!r} is not 1-64 of letters, digits, '_', '.', '-' "
                         "(not starting with '.' or '-')")
    return name


def runtime_dir() -> Path:
    """Where group sockets live (see the module docstring)."""
    if env := os.environ.get(RUNTIME_DIR_ENV):
        return Path(env)
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(xdg) / "vdev-vsock"
    if os.geteuid() == 0:
        return Path("/run/vdev-vsock")
    return Path(f"/tmp/vdev-vsock-{os.geteuid()}")


def member_path(group: str, cid: int, base: Path | None = None) -> str:
    """The socket of CID ``cid`` in ``group``."""
    return str((base or runtime_dir()) / group / f"{cid}.sock")


def check_unix_path(path: str, what: str) -> None:
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise ValueError(f"{what}: {path!r} is longer than a Unix socket path may be "
                         f"({SUN_PATH_MAX} bytes)")


def is_live_socket(path: str) -> bool:
    """Whether something accepts connections at ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def listen_unix(path: str, *, what: str, backlog: int = socket.SOMAXCONN) -> socket.socket:
    """Listen on ``path``; a stale socket there is replaced, a live one or a non-socket refused.

    Raises:
        DeviceError: something answers at ``path``, or it is not a socket.
        OSError: bind or listen failed.
    """
    with contextlib.suppress(FileNotFoundError):
        mode = os.lstat(path).st_mode
        if not stat.S_ISSOCK(mode):
            raise DeviceError(f"{what}: {path} exists and is not a socket", value=path)
        if is_live_socket(path):
            raise DeviceError(f"{what}: another process is listening on {path}", value=path)
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def join_group(group: str, cid: int, base: Path | None = None) -> tuple[socket.socket, str]:
    """Create the group directory if needed and listen as ``cid``; returns (socket, path).

    Raises:
        DeviceError: CID ``cid`` is already held in ``group`` by a running device.
    """
    path = member_path(group, cid, base)
    check_unix_path(path, f"--group {group}")
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise DeviceError(f"--group {group}: cannot create {directory}", value=directory,
                          cause=exc) from exc
    try:
        return listen_unix(path, what=f"--group {group}: CID {cid}"), path
    except DeviceError as exc:
        raise DeviceError(f"--group {group}: CID {cid} is already held by another device "
                          f"({path})", value=cid) from exc


def connect_member(group: str, cid: int, base: Path | None = None) -> socket.socket:
    """A non-blocking connection to CID ``cid`` of ``group``.

    Raises:
        OSError: no such member (ENOENT, ECONNREFUSED) or its backlog is full (EAGAIN).
    """
    return connect_unix(member_path(group, cid, base))


def connect_unix(path: str) -> socket.socket:
    """Connect to a Unix stream socket without blocking.

    An AF_UNIX connect either completes at once or fails (EAGAIN when the
    listener's backlog is full), so this never waits.

    Raises:
        OSError: ENOENT, ECONNREFUSED, EAGAIN, ENAMETOOLONG and the like.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        sock.connect(path)
    except BlockingIOError as exc:
        sock.close()
        raise OSError(errno.EAGAIN, f"{path}: listener backlog full") from exc
    except BaseException:
        sock.close()
        raise
    return sock


__all__ = ["RUNTIME_DIR_ENV", "check_group_name", "connect_member", "connect_unix", "is_live_socket",
           "join_group", "listen_unix", "member_path", "runtime_dir"]
