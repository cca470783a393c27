"""The loops bench/network.py times, run in the namespace (and cgroup) it puts them in:

    netload.py sink PORT                 TCP: read until EOF then answer "ok"; echo 1-byte requests;
                                         or send the MiB asked for ("d<MiB>\n") and close
    netload.py stream IP PORT MIB        send MIB MiB, wait for "ok": prints MB/s
    netload.py rtt IP PORT N             N one-byte round trips: prints the median in microseconds
(Per-syscall costs are bpf_loop.c's: no interpreter between the syscalls.)
"""

from __future__ import annotations

import socket
import statistics
import sys
import threading
import time


def sink(port: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(8)
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_serve, args=(conn,), daemon=True).start()


def _serve(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    kind = conn.recv(1)
    if kind == b"s":  # stream
        while conn.recv(1 << 20):
            pass
        conn.sendall(b"ok")
    elif kind == b"d":  # download: "d<MiB>\n", that many MiB back, then the end (no half-close)
        line = b""
        while not line.endswith(b"\n"):
            line += conn.recv(1)
        chunk = b"x" * (256 << 10)
        for _ in range(int(line) * 4):
            conn.sendall(chunk)
    else:  # round trips
        while data := conn.recv(1):
            conn.sendall(data)
    conn.close()


def stream(ip: str, port: int, mib: int) -> None:
    chunk = b"x" * (256 << 10)
    with socket.create_connection((ip, port)) as s:
        s.sendall(b"s")
        start = time.perf_counter()
        for _ in range(mib * 4):
            s.sendall(chunk)
        s.shutdown(socket.SHUT_WR)
        assert s.recv(2) == b"ok"
        print(mib * 1.048576 / (time.perf_counter() - start))


def rtt(ip: str, port: int, n: int) -> None:
    with socket.create_connection((ip, port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"r")
        times = []
        for _ in range(n):
            start = time.perf_counter_ns()
            s.sendall(b"a")
            s.recv(1)
            times.append(time.perf_counter_ns() - start)
    print(statistics.median(times) / 1000)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "sink":
        sink(int(args[0]))
    elif cmd == "stream":
        stream(args[0], int(args[1]), int(args[2]))
    else:
        rtt(args[0], int(args[1]), int(args[2]))
