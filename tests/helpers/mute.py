"""An API on 127.0.0.1 that takes requests and never answers them (the edge of the world)."""

from __future__ import annotations

import socket
import threading


class MuteApi:
    """A TCP server that accepts connections and gives no answer: it keeps them open (a
    hung API) or, with ``close_after_request``, reads the request and closes (an API that
    dropped the connection after taking it)."""

    def __init__(self, *, close_after_request: bool = False) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.close_after_request = close_after_request
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            self.accepted.append(conn)
            if self.close_after_request:
                conn.recv(65536)
                conn.close()

    def close(self) -> None:
        # close() alone does not wake a thread blocked in accept() on Linux: shutdown does
        # (accept fails with EINVAL), so the join returns at once instead of at its timeout.
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)
        assert not self.thread.is_alive(), "the accept thread did not stop"
        for conn in self.accepted:
            conn.close()
