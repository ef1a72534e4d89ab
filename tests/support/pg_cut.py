"""A TCP relay in front of PostgreSQL that can cut a connection right after passing on a COMMIT, swallowing the
reply (the client cannot know whether it committed) and leaving the server's side open, as a network cut does."""

from __future__ import annotations

import socket
import threading
import time


class CommitCut:
    """Relay 127.0.0.1:``port`` -> ``host``:``target_port``; :meth:`arm` cuts the next connection sending COMMIT."""

    def __init__(self, host: str, target_port: int) -> None:
        self.target = (host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.armed, self.cut = threading.Event(), threading.Event()
        self._open: list[socket.socket] = []  # the server sides of cut connections, held open
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self) -> None:
        self.cut.clear()
        self.armed.set()

    def close(self) -> None:
        self.listener.close()
        for s in self._open:
            s.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            muted = threading.Event()
            threading.Thread(target=self._up, args=(client, server, muted), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, muted), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, muted: threading.Event) -> None:
        while data := _recv(client):
            if self.armed.is_set() and b"COMMIT" in data:
                self.armed.clear()
                muted.set()  # the reply is swallowed
                server.sendall(data)
                time.sleep(0.5)  # the server commits
                self._open.append(server)
                client.close()
                self.cut.set()
                return
            server.sendall(data)
        server.close()

    @staticmethod
    def _down(server: socket.socket, client: socket.socket, muted: threading.Event) -> None:
        while data := _recv(server):
            if not muted.is_set():
                try:
                    client.sendall(data)
                except OSError:
                    break
        if not muted.is_set():
            client.close()


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""
