#!/bin/sh
# An untrusted-looking workload: it tries the usual ways out and reports what happened.
try() { label=$1; shift; if out=$("$@" 2>&1); then echo "ALLOWED  $label"; else echo "denied   $label: $(echo "$out" | tail -n1)"; fi; }
echo "inside: pid $$, uid $(id -u), hostname $(hostname)"
echo "processes visible: $(ls /proc | grep -c '^[0-9]')"
try "write to /usr"                  sh -c 'echo x > /usr/pwned'
try "read host /etc/shadow"          cat /etc/shadow
try "see host home"                  ls /home/
try "mount a tmpfs"                  mount -t tmpfs none /mnt
try "new user namespace"             unshare -U true
try "signal host init (pid 1 here)"  kill -0 1
try "raw socket (ping)"              python3 -c 'import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, 1)'
try "reach the network"              python3 -c 'import socket; socket.create_connection(("1.1.1.1", 53), timeout=2)'
try "load a kernel module"           python3 -c 'import ctypes; l=ctypes.CDLL(None, use_errno=True); r=l.syscall(175, 0, 0, 0); import os; raise SystemExit(os.strerror(ctypes.get_errno())) if r else None'
try "allocate 512 MiB"               python3 -c 'b = bytearray(512 << 20); b[::4096] = b"x" * (len(b) // 4096)'
try "write to private /tmp"          sh -c 'echo ok > /tmp/scratch && cat /tmp/scratch'
echo "exiting with 7"
exit 7
