"""``livegen bench``: the engine against stock diffusers (``engine``), realtime sessions over
WebSocket (``realtime``), where a batch's time goes (``profile``), the issue's targets (``targets``)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (the OS picks it; another process may
    take it before the caller binds it, which on a test or bench machine does not happen)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
