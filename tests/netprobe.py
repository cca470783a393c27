"""Network probes, run inside a namespace the test names: `nsenter --net=PATH python netprobe.py`.

    serve TCP_PORT UDP_PORT      answer "hi" on TCP, echo on UDP, until killed ("ready" first)
    probe JSON                   [[proto, ip, port], ...] -> a JSON list of true/false
                                 (proto tcp, udp or icmp; a reply within TIMEOUT is true;
                                 IPv4 or IPv6, whichever IP is: the listeners answer both)
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import threading
import time

TIMEOUT = 0.6


def serve(tcp_port: int, udp_port: int) -> None:
    tcp = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    tcp.bind(("::", tcp_port))
    tcp.listen(64)
    udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    udp.bind(("::", udp_port))

    def echo() -> None:
        while True:
            data, peer = udp.recvfrom(2048)
            udp.sendto(data, peer)

    threading.Thread(target=echo, daemon=True).start()
    print("ready", flush=True)
    while True:
        conn, _ = tcp.accept()
        try:
            conn.sendall(b"hi\n")
        finally:
            conn.close()


def probe(proto: str, ip: str, port: int) -> bool:
    try:
        if proto == "tcp":
            with socket.create_connection((ip, port), timeout=TIMEOUT) as s:
                return s.recv(3) == b"hi\n"
        if proto == "udp":
            with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(TIMEOUT)
                s.sendto(b"ping", (ip, port))
                return s.recvfrom(64)[0] == b"ping"
        return _icmp(ip)
    except OSError:
        return False


def _icmp(ip: str) -> bool:
    if ":" in ip:
        return _icmp6(ip)
    ident = os.getpid() & 0xFFFF
    header = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
    payload = b"stockade"
    words = (len(header) + len(payload)) // 2
    total = sum(struct.unpack(f"!{words}H", header + payload))
    total = (total >> 16) + (total & 0xFFFF)
    checksum = ~(total + (total >> 16)) & 0xFFFF
    packet = struct.pack("!BBHHH", 8, 0, checksum, ident, 1) + payload
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        s.settimeout(TIMEOUT)
        s.sendto(packet, (ip, 0))
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            data, peer = s.recvfrom(2048)
            icmp = data[(data[0] & 0x0F) * 4:]
            if peer[0] == ip and icmp[0] == 0 and struct.unpack("!H", icmp[4:6])[0] == ident:
                return True
    return False


def _icmp6(ip: str) -> bool:
    """An ICMPv6 echo (the kernel sums it: IPv6 raw sockets of ICMPv6 always do)."""
    ident = os.getpid() & 0xFFFF
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as s:
        s.settimeout(TIMEOUT)
        s.sendto(struct.pack("!BBHHH", 128, 0, 0, ident, 1) + b"stockade", (ip, 0))
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            data, peer = s.recvfrom(2048)
            if peer[0] == ip and data[0] == 129 and struct.unpack("!H", data[4:6])[0] == ident:
                return True
    return False


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]), int(sys.argv[3]))
    else:
        print(json.dumps([probe(p, ip, port) for p, ip, port in json.loads(sys.argv[2])]))
