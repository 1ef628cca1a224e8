"""Whether a TCP port can be listened on, checked before a server starts, so that a busy port
is one clear line instead of a server's traceback."""

from __future__ import annotations

import errno
import socket


def bind_problem(host: str, port: int) -> str | None:
    """None if ``host:port`` can be listened on now, else one line saying why not.

    Binds the way uvicorn does (IPv6 only for a host with a colon, ``SO_REUSEADDR`` on),
    so a port in TIME_WAIT is free here as it is there.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except socket.gaierror as exc:
            return f"cannot listen on {host!r}: {exc.strerror}"
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is already in use"
            if exc.errno == errno.EACCES:
                return f"no permission to listen on port {port} on {host}"
            return f"cannot listen on {host}:{port}: {exc.strerror}"
    return None
