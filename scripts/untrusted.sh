#!/bin/sh
# An untrusted-looking workload: it tries the usual ways out and reports what happened.
try() {
  label=$1; shift
  out=$("$@" 2>&1); rc=$?
  if [ "$rc" -eq 0 ]; then echo "ALLOWED  $label"; return; fi
  echo "denied   $label: $(echo "$out" | grep -v dmesg | tail -n1) (exit $rc)"
}
echo "inside: pid $$, uid $(id -u), hostname $(hostname)"
echo "processes visible: $(ls /proc | grep -c '^[0-9]')"
try "write to /usr"                  sh -c 'echo x > /usr/pwned'
try "read host /etc/shadow"          cat /etc/shadow
try "find host home directories"     sh -c 'ls -A /home /root | grep -v -e "^/" -e "^$"'
try "mount a tmpfs"                  mount -t tmpfs none /mnt
try "new user namespace"             unshare -U true
try "ptrace another process"         python3 -c 'import ctypes, os; l=ctypes.CDLL(None, use_errno=True); r=l.ptrace(16, 1, 0, 0); raise SystemExit(os.strerror(ctypes.get_errno()) if r else 0)'
try "raw socket (ping)"              python3 -c 'import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, 1)'
try "reach the network"              python3 -c 'import socket; socket.create_connection(("1.1.1.1", 53), timeout=2)'
try "reach cloud metadata"           python3 -c 'import socket; socket.create_connection(("169.254.169.254", 80), timeout=2)'
try "load a kernel module"           python3 -c 'import ctypes; l=ctypes.CDLL(None, use_errno=True); r=l.syscall(175, 0, 0, 0); import os; raise SystemExit(os.strerror(ctypes.get_errno())) if r else None'
try "allocate 512 MiB"               python3 -c 'b = bytearray(512 << 20); b[::4096] = b"x" * (len(b) // 4096)'
try "write to private /tmp"          sh -c 'echo ok > /tmp/scratch && cat /tmp/scratch'
echo "exiting with 7"
exit 7
