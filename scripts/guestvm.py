"""The Debian guest of scripts/build-guest.sh as the benchmark scripts drive it: its
command line (microvm or pc, tcg, 256 MiB, a raw virtio-blk disk), a VMM process whose serial
console is read and typed into and whose QMP socket is asked (`Proc`). Standard library
only; imported by bench-restore.py and bench-migrate.py.
"""

import json
import os
import select
import socket
import subprocess
import time


def host_tsc_khz():
    """The host's TSC rate in kHz from /proc/cpuinfo, or None (as bench-boot.py)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


def guest_args(guest, disk, append, machine="microvm"):
    """The command line on `machine`: microvm (vmlinux, virtio-blk-device) or pc (bzImage,
    virtio-blk-pci)."""
    kernel, disk_device = ("bzImage", "virtio-blk-pci") if machine == "pc" else \
        ("vmlinux", "virtio-blk-device")
    return ["-M", machine, "-accel", "tcg", "-m", "256M", "-nodefaults", "-no-reboot",
            "-serial", "stdio", "-kernel", os.path.join(guest, kernel),
            "-initrd", os.path.join(guest, "initramfs-virtio.cpio.gz"), "-append", append,
            "-drive", "file=%s,if=none,id=d0,format=raw" % disk,
            "-device", "%s,drive=d0" % disk_device]


class Proc:
    def __init__(self, argv, sock):
        if os.path.exists(sock):
            os.unlink(sock)
        self.sock = sock
        self.start = time.monotonic()
        self.p = subprocess.Popen(argv + ["-qmp", "unix:%s,server=on,wait=off" % sock],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
        self.buf = b""
        self.q = None

    def wait_for(self, pat, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pat in self.buf:
                return time.monotonic() - self.start
            r, _, _ = select.select([self.p.stdout], [], [], 0.05)
            if r:
                d = os.read(self.p.stdout.fileno(), 65536)
                if not d:
                    break
                self.buf += d
        raise RuntimeError("no %r within %ss; last output %r" % (pat, timeout, self.buf[-300:]))

    def type(self, data):
        self.p.stdin.write(data)
        self.p.stdin.flush()

    def qmp(self, name, args=None):
        if self.q is None:
            for _ in range(2000):
                try:
                    s = socket.socket(socket.AF_UNIX)
                    s.connect(self.sock)
                    break
                except OSError:
                    time.sleep(0.005)
            self.q = s.makefile("rwb")
            self.q.readline()
            self.qmp("qmp_capabilities")
        m = {"execute": name}
        if args is not None:
            m["arguments"] = args
        self.q.write((json.dumps(m) + "\n").encode())
        self.q.flush()
        while True:
            r = json.loads(self.q.readline())
            if "event" not in r:
                if "error" in r:
                    raise RuntimeError("%s: %s" % (name, r["error"]))
                return r["return"]

    def wait_running(self, timeout):
        end = time.monotonic() + timeout
        while self.qmp("query-status")["status"] != "running":
            if time.monotonic() > end:
                raise RuntimeError("never running")
            time.sleep(0.005)

    def kill(self):
        self.p.kill()
        self.p.wait()
