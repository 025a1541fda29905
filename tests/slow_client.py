"""A hostile client, run as its own process: `python -m tests.slow_client PORT COUNT SECONDS`.

Opens COUNT connections to 127.0.0.1:PORT, sends each the start of a request and never its end
(one more header byte every half second, slowloris style), prints `ready <connected>` once all
were tried, and holds them for SECONDS (or until stdin closes). Loopback only, bounded in count
and time; its own process, so its descriptors and CPU are not the server's.
"""

from __future__ import annotations

import contextlib
import resource
import select
import socket
import sys
import time

START = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
MAX_COUNT = 2000
MAX_SECONDS = 30.0


def main(port: int, count: int, seconds: float) -> None:
    count, seconds = min(count, MAX_COUNT), min(seconds, MAX_SECONDS)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the test may have lowered ours
    sockets: list[socket.socket] = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        sockets.append(sock)
    connected = 0
    settle = time.monotonic() + 5
    pending = list(sockets)
    while pending and time.monotonic() < settle:
        still = []
        for sock in pending:
            try:
                sock.send(START)
                connected += 1
            except BlockingIOError:
                still.append(sock)
            except OSError:
                pass  # refused or reset: the server's choice
        pending = still
        time.sleep(0.05)
    print("ready", connected, flush=True)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        readable, _, _ = select.select([sys.stdin], [], [], 0.5)
        if readable and not sys.stdin.readline():
            break
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.send(b"x")
    for sock in sockets:
        sock.close()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))
