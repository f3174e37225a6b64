#!/usr/bin/env python3
"""User-mode networking throughput (-netdev user, libslirp) with the Debian reference guest.

The guest (keel.mode=shell on microvm, virtio-net-device, DHCP from slirp) fetches
--mib MiB from an HTTP server on the host's loopback (10.0.2.2 in the guest) with busybox
wget, and sends the same amount back with nc to a host sink; the guest times both with
/proc/uptime. The same command line runs under Keel and QEMU 7.2; prints MiB/s and the
Keel/QEMU ratio. Under tcg the guest's interpreter dominates, so the ratio compares whole
stacks (CPU emulation, virtio-net, slirp thread), not libslirp itself.

Usage: scripts/bench-net-user.py [--vmm target/release/vmm] [--qemu /usr/bin/qemu-system-x86_64]
                                 [--accel tcg] [--mib 16] [--runs 1]
"""

import argparse
import os
import re
import socket
import subprocess
import threading
import time


def serve_http(size):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    def loop():
        while True:
            c, _ = srv.accept()
            c.recv(4096)
            c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            chunk = b"\0" * 65536
            left = size
            while left > 0:
                n = min(left, len(chunk))
                c.sendall(chunk[:n])
                left -= n
            c.close()

    threading.Thread(target=loop, daemon=True).start()
    return srv.getsockname()[1]


def serve_sink():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    def loop():
        while True:
            c, _ = srv.accept()
            while c.recv(1 << 16):
                pass
            c.close()

    threading.Thread(target=loop, daemon=True).start()
    return srv.getsockname()[1]


def tsc_khz():
    """The host's TSC rate as the tests pass it to the guest (a tcg guest's calibration is
    slow and unreliable): /proc/cpuinfo's "cpu MHz"."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    return 1000000


class Guest:
    def __init__(self, program, accel, guest_dir):
        cmd = [program, "-M", "microvm", "-accel", accel, "-m", "256M", "-nodefaults",
               "-no-reboot", "-display", "none", "-serial", "stdio",
               "-append", "console=ttyS0 quiet keel.mode=shell tsc_early_khz=%d" % tsc_khz(),
               "-kernel", os.path.join(guest_dir, "vmlinux"),
               "-initrd", os.path.join(guest_dir, "initramfs-virtio.cpio.gz"),
               "-netdev", "user,id=n0", "-device", "virtio-net-device,netdev=n0"]
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.out = b""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while True:
            b = self.p.stdout.read1(4096)
            if not b:
                return
            self.out += b

    def wait(self, needle, since=0, timeout=600):
        deadline = time.time() + timeout
        while needle.encode() not in self.out[since:]:
            if time.time() > deadline or self.p.poll() is not None:
                raise SystemExit("guest: no %r:\n%s" % (needle, self.out[-2000:].decode(errors="replace")))
            time.sleep(0.05)
        return self.out[since:].decode(errors="replace")

    def line(self, pattern, since):
        """The first output line matching `pattern` after `since` (waits for it)."""
        deadline = time.time() + 600
        rx = re.compile(pattern, re.M)
        while True:
            m = rx.search(self.out[since:].decode(errors="replace"))
            if m:
                return m.group(0)
            if time.time() > deadline or self.p.poll() is not None:
                raise SystemExit("guest: no %r:\n%s" % (pattern, self.out[-2000:].decode(errors="replace")))
            time.sleep(0.05)

    def run(self, line):
        since = len(self.out)
        self.p.stdin.write(line.encode() + b"\n")
        self.p.stdin.flush()
        return since

    def stop(self):
        self.p.kill()
        self.p.wait()


def measure(program, args, http, sink):
    g = Guest(program, args.accel, args.guest)
    try:
        g.wait("KEEL-GUEST-SHELL")
        s = g.run("printf '#!/bin/sh\\n[ \"$1\" = bound ] && ip addr add $ip/$mask dev $interface && "
                  "echo KEEL-LEASE $ip\\n' > /tmp/d.sh; chmod +x /tmp/d.sh; ip link set eth0 up; "
                  "udhcpc -i eth0 -f -q -n -s /tmp/d.sh")
        g.wait("KEEL-LEASE 10.0.2.15", s)
        size = args.mib << 20
        s = g.run("t() { cut -d' ' -f1 /proc/uptime; }; a=$(t); wget -q -O /dev/null "
                  "http://10.0.2.2:%d/; b=$(t); echo KEEL-''RX $a $b" % http)
        rx = g.line(r"^KEEL-RX [0-9.]+ [0-9.]+", s).split()
        s = g.run("a=$(t); dd if=/dev/zero bs=64k count=%d 2>/dev/null | nc 10.0.2.2 %d; b=$(t); "
                  "echo KEEL-''TX $a $b" % (size // 65536, sink))
        tx = g.line(r"^KEEL-TX [0-9.]+ [0-9.]+", s).split()
        mib = args.mib
        return mib / (float(rx[2]) - float(rx[1])), mib / (float(tx[2]) - float(tx[1]))
    finally:
        g.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vmm", default="target/release/vmm")
    ap.add_argument("--qemu", default="/usr/bin/qemu-system-x86_64")
    ap.add_argument("--accel", default="tcg")
    ap.add_argument("--mib", type=int, default=16)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--guest", default=os.environ.get(
        "KEEL_GUEST_DIR", os.path.expanduser("~/.cache/keel-guest/current")))
    args = ap.parse_args()
    http = serve_http(args.mib << 20)
    sink = serve_sink()
    results = {}
    for name, program in (("keel", args.vmm), ("qemu", args.qemu)):
        if not os.path.exists(program):
            print("%s: %s not found, skipped" % (name, program))
            continue
        runs = [measure(program, args, http, sink) for _ in range(args.runs)]
        rx = max(r[0] for r in runs)
        tx = max(r[1] for r in runs)
        results[name] = (rx, tx)
        print("%-4s host->guest %6.1f MiB/s   guest->host %6.1f MiB/s   (%d MiB, %s, best of %d)"
              % (name, rx, tx, args.mib, args.accel, args.runs))
    if len(results) == 2:
        k, q = results["keel"], results["qemu"]
        print("keel/qemu  host->guest %.2f   guest->host %.2f" % (k[0] / q[0], k[1] / q[1]))


if __name__ == "__main__":
    main()
