"""Start the server: blocking under uvicorn (``ldm serve``), or in a thread (tests, benchmarks)."""

from __future__ import annotations

import socket
import threading
import time

from ldm.serve.app import Server, create_app


def serve(server: Server, log_level: str = "info") -> None:
    """Serve until Ctrl-C: the running job is interrupted at once (its request answers with the
    images made so far), queued ones are refused, then uvicorn closes."""
    import uvicorn

    class _Uvicorn(uvicorn.Server):
        def handle_exit(self, sig, frame):
            server.worker.stop_soon()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(create_app(server), host=server.config.host,
                            port=server.config.port, log_level=log_level, ws=_ws(),
                            timeout_graceful_shutdown=5)  # fmt: skip
    _Uvicorn(config).run()


def _ws() -> str:
    """uvicorn's sans-I/O websockets protocol where it has one (its older one is deprecated)."""
    import importlib.util

    found = importlib.util.find_spec("uvicorn.protocols.websockets.websockets_sansio_impl")
    return "websockets-sansio" if found else "auto"


class ThreadedServer:
    """uvicorn in a background thread on a free port: ``with ThreadedServer(server) as url``."""

    def __init__(self, server: Server, port: int | None = None):
        import uvicorn

        self.server = server
        self.port = port or free_port()
        config = uvicorn.Config(create_app(server), host=server.config.host, port=self.port,
                                log_level="warning", ws=_ws())  # fmt: skip
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.server.config.host}:{self.port}"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
