"""Propagation delay for the emulated links: a TCP relay per gateway.

This machine's kernel has TBF (rate) but no ``sch_netem``, so the delay half of a
link profile is added here, in user space, while rate limiting stays in the kernel
(``links/shaping.py``). Each gateway connects to its own relay port on 10.77.0.1; the
relay forwards to the SuperLink on loopback and holds every chunk, in each direction,
for the one-way delay (half the profile's RTT, plus jitter that never reorders bytes).
A request/response across the link therefore takes at least one RTT, as over the air.
"""

from __future__ import annotations

import queue
import random
import socket
import threading
import time


class DelayRelay:
    def __init__(self, listen: tuple[str, int], target: tuple[str, int], one_way_s: float, jitter_s: float = 0.0,
                 seed: int = 0) -> None:
        self.target = target
        self.one_way_s = max(0.0, one_way_s)
        self.jitter_s = max(0.0, jitter_s)
        self.rng = random.Random(seed)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(listen)
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.closed = threading.Event()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _delay(self) -> float:
        if self.jitter_s:
            return max(0.0, self.rng.gauss(self.one_way_s, self.jitter_s))
        return self.one_way_s

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conns += [client, upstream]
            self._pipe(client, upstream)
            self._pipe(upstream, client)

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        q: queue.Queue = queue.Queue()

        def reader() -> None:
            last_due = 0.0
            while True:
                try:
                    data = src.recv(65536)
                except OSError:
                    data = b""
                # never before an earlier chunk: jitter without reordering bytes
                last_due = max(last_due, time.monotonic() + self._delay())
                q.put((last_due, data))
                if not data:
                    return

        def writer() -> None:
            while True:
                due, data = q.get()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if not data:
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                try:
                    dst.sendall(data)
                except OSError:
                    return

        threading.Thread(target=reader, daemon=True).start()
        threading.Thread(target=writer, daemon=True).start()

    def close(self) -> None:
        self.closed.set()
        for s in [self.sock, *self.conns]:
            try:
                s.close()
            except OSError:
                pass
