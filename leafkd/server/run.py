"""Running the app under uvicorn with a graceful shutdown on SIGINT/SIGTERM; binding its socket first."""

from __future__ import annotations

import socket
import threading

from leafkd.errors import LeafkdError


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (not listening yet: connections are refused until the server is ready).
    Binding before the slow model load makes a busy port or an unknown host a one-line error at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as e:
        raise LeafkdError(f"--host {host}: cannot resolve it ({getattr(e, 'strerror', None) or e})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise LeafkdError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    return sock


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning", sock=None,
          graceful_timeout: int = 30) -> None:
    """Run the app with uvicorn until SIGINT/SIGTERM, then shut down gracefully and return normally.

    On the first signal the server stops accepting connections, in-flight requests finish (up to
    ``graceful_timeout`` s), the micro-batcher serves what it had queued, and the call returns; a second SIGINT
    forces the exit. (Stock uvicorn re-raises the signal afterwards, which would turn a clean stop into a
    "killed" exit status.)
    """
    import contextlib
    import signal

    import uvicorn

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # uvicorn >= 0.29 calls this around serving
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            sigs = [signal.SIGINT, signal.SIGTERM]
            previous = {s: signal.signal(s, self._leafkd_signal) for s in sigs}
            try:
                yield
            finally:
                for s, h in previous.items():
                    signal.signal(s, h)

        def _leafkd_signal(self, sig, frame) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            else:
                self.should_exit = True

    import gc
    import os
    import sys

    # The batcher thread and the event loop share the GIL; with the default 5 ms switch interval a busy batcher
    # (tokenising, launching kernels) delays every socket event by up to 5 ms. 1 ms keeps the loop responsive.
    sys.setswitchinterval(float(os.environ.get("LEAFKD_SWITCH_INTERVAL", "0.001")))
    # Everything alive now (models, index, document store) is long-lived: keep it out of the GC's scans so a
    # generation-2 collection never stalls a request for tens of ms.
    gc.collect()
    gc.freeze()
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_timeout,
                            access_log=False)
    server = _Server(config)
    server.run(sockets=[sock] if sock is not None else None)


