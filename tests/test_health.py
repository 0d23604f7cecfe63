"""``/healthz`` follows the database: 503 while PostgreSQL cannot be reached, 200 once it can.

The server reaches PostgreSQL through a small TCP relay that the test closes and opens again,
which cuts the connection as a network would, without stopping the server or needing root.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from tests.conftest import serve, server_settings
from tests.ray_support import free_port, wait_for

pytestmark = pytest.mark.postgres


class TcpRelay:
    """127.0.0.1:port -> target, while open; closing it drops every connection it carries."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        if self._listener is None:
            return
        # shutdown() first: close() alone leaves a socket listening while accept() waits on it.
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._listener = None
        with self._lock:
            for connection in self._connections:
                connection.shutdown(socket.SHUT_RDWR)
                connection.close()
            self._connections.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(self.target)
            with self._lock:
                self._connections += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:  # the relay was closed under it
        return


@pytest.fixture
def relay_to_postgres(
    make_database_url: Callable[[str], str],
) -> Iterator[tuple[TcpRelay, str]]:
    """A relay to the test PostgreSQL server, and a fresh database's URL through it."""
    url = make_url(make_database_url("postgres"))
    relay = TcpRelay((url.host or "127.0.0.1", url.port or 5432))
    relay.open()
    yield relay, url.set(host="127.0.0.1", port=relay.port).render_as_string(hide_password=False)
    relay.close()


def test_healthz_is_503_while_postgres_is_unreachable_and_200_once_it_is_back(
    relay_to_postgres: tuple[TcpRelay, str], tmp_path: Path
) -> None:
    relay, database_url = relay_to_postgres
    with serve(server_settings(tmp_path, database_url)) as server:

        def health() -> httpx.Response:
            return httpx.get(f"{server.url}/healthz", timeout=30)

        assert health().status_code == 200

        relay.close()
        down = health()
        assert down.status_code == 503
        assert down.json()["error"]["message"].startswith("database unreachable: ")

        relay.open()
        wait_for("/healthz to answer 200 again", lambda: health().status_code == 200, 30)
        assert health().json() == {"status": "ok", "database": "ok"}
