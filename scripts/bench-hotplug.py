#!/usr/bin/env python3
"""ACPI PCI hot plug latency on `-M pc`: Keel vs QEMU 7.2 on the same Linux guest
(stdlib only).

Each round boots both VMMs one after the other (the order alternates between rounds) with

    VMM -M pc -accel tcg -m 256M -nodefaults -no-user-config -nographic -serial stdio
        -kernel bzImage -initrd initramfs-virtio.cpio.gz
        -append "console=ttyS0 keel.mode=shell" -qmp unix:SOCK,server=on,wait=off
        -blockdev driver=file,filename=IMG,node-name=d0

and measures, on each side:

* boot: process start -> the guest's marker (KEEL-GUEST-READY) on the serial console;
* add: `device_add virtio-blk-pci` sent -> the guest's virtio_blk driver bound and the
  disk probed (its "[vda] N 512-byte logical blocks" line on the console);
* del: `device_del` sent -> `DEVICE_DELETED` for the device (after the guest's eject).

add/del are repeated --cycles times per boot. Medians over everything measured and the
Keel/QEMU ratios are printed (below 1: Keel is faster). The guest comes from
scripts/build-guest.sh ($KEEL_GUEST_DIR, else ~/.cache/keel-guest/current); Keel is $VMM
(default target/release/vmm), QEMU is $QEMU (default qemu-system-x86_64). To validate the
script itself: VMM=qemu-system-x86_64 scripts/bench-hotplug.py
"""

import argparse
import json
import os
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "KEEL-GUEST-READY"
SHELL = "KEEL-GUEST-SHELL"


class Vm:
    """One VMM process: its serial console (with arrival times) and a QMP client."""

    def __init__(self, binary, guest, workdir, tag):
        self.sock = os.path.join(workdir, tag + ".qmp")
        img = os.path.join(workdir, tag + ".img")
        with open(img, "wb") as f:
            f.truncate(4 << 20)
        args = [
            binary, "-M", "pc", "-accel", "tcg", "-m", "256M", "-nodefaults",
            "-no-user-config", "-nographic", "-serial", "stdio",
            "-kernel", os.path.join(guest, "bzImage"),
            "-initrd", os.path.join(guest, "initramfs-virtio.cpio.gz"),
            "-append", "console=ttyS0 keel.mode=shell",
            "-qmp", "unix:%s,server=on,wait=off" % self.sock,
            "-blockdev", "driver=file,filename=%s,node-name=d0" % img,
        ]
        self.lock = threading.Lock()
        self.out = ""
        self.chunks = []  # (time, end offset in self.out)
        self.events = []
        self.replies = queue.Queue()
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        threading.Thread(target=self._serial, daemon=True).start()
        deadline = time.monotonic() + 10
        while True:
            try:
                self.qmp = socket.socket(socket.AF_UNIX)
                self.qmp.connect(self.sock)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("%s: no QMP socket" % binary)
                time.sleep(0.01)
        self.qf = self.qmp.makefile("rwb")
        self.qf.readline()
        threading.Thread(target=self._monitor, daemon=True).start()
        self.cmd("qmp_capabilities")

    def _serial(self):
        while True:
            b = self.proc.stdout.read1(4096)
            if not b:
                return
            now = time.monotonic()
            with self.lock:
                self.out += b.decode(errors="replace")
                self.chunks.append((now, len(self.out)))

    def _monitor(self):
        try:
            self._monitor_loop()
        except (OSError, ValueError):
            pass  # the VMM exited

    def _monitor_loop(self):
        for line in self.qf:
            msg = json.loads(line)
            if "event" in msg:
                with self.lock:
                    self.events.append((time.monotonic(), msg))
            else:
                self.replies.put(msg)

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.qf.write(json.dumps(msg).encode() + b"\n")
        self.qf.flush()
        reply = self.replies.get(timeout=60)
        if "error" in reply:
            raise RuntimeError("%s: %s" % (name, reply["error"]))
        return reply

    def wait_console(self, needle, start, timeout):
        """When `needle` arrived on the console after offset `start` (monotonic time)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                i = self.out.find(needle, start)
                if i >= 0:
                    end = i + len(needle)
                    return next(t for t, off in self.chunks if off >= end)
            time.sleep(0.005)
        raise RuntimeError("no %r within %ss" % (needle, timeout))

    def wait_event(self, name, device, start, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for t, e in self.events:
                    if t >= start and e["event"] == name and \
                            e.get("data", {}).get("device") == device:
                        return t
            time.sleep(0.005)
        raise RuntimeError("no %s for %s within %ss" % (name, device, timeout))

    def offset(self):
        with self.lock:
            return len(self.out)

    def close(self):
        try:
            self.cmd("quit")
        except (OSError, RuntimeError, queue.Empty):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run(binary, guest, workdir, tag, cycles, timeout):
    """One boot: {'boot': s, 'add': [s...], 'del': [s...]}."""
    vm = Vm(binary, guest, workdir, tag)
    try:
        boot = vm.wait_console(MARKER, 0, timeout) - vm.t0
        vm.wait_console(SHELL, 0, timeout)
        adds, dels = [], []
        for i in range(cycles):
            dev = "hd%d" % i
            start = vm.offset()
            t = time.monotonic()
            vm.cmd("device_add", driver="virtio-blk-pci", drive="d0", id=dev)
            adds.append(vm.wait_console("512-byte logical blocks", start, timeout) - t)
            t = time.monotonic()
            vm.cmd("device_del", id=dev)
            dels.append(vm.wait_event("DEVICE_DELETED", dev, t, timeout) - t)
        return {"boot": boot, "add": adds, "del": dels}
    finally:
        vm.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--cycles", type=int, default=3, help="hot add/remove cycles per boot")
    ap.add_argument("--timeout", type=float, default=120)
    args = ap.parse_args()
    guest = os.environ.get("KEEL_GUEST_DIR") or os.path.expanduser("~/.cache/keel-guest/current")
    sides = [
        ("keel", os.environ.get("VMM") or os.path.join(REPO, "target/release/vmm")),
        ("qemu", os.environ.get("QEMU") or "qemu-system-x86_64"),
    ]
    results = {name: {"boot": [], "add": [], "del": []} for name, _ in sides}
    with tempfile.TemporaryDirectory(prefix="keel-bench-hotplug-") as workdir:
        for r in range(args.rounds):
            order = sides if r % 2 == 0 else sides[::-1]
            for name, binary in order:
                try:
                    m = run(binary, guest, workdir, "%s%d" % (name, r), args.cycles, args.timeout)
                except (OSError, RuntimeError, queue.Empty) as e:
                    print("round %d %s: failed: %s" % (r, name, e), file=sys.stderr)
                    continue
                results[name]["boot"].append(m["boot"])
                results[name]["add"] += m["add"]
                results[name]["del"] += m["del"]
                print("round %d %-4s boot %.2fs  add %s  del %s" % (
                    r, name, m["boot"], " ".join("%.3f" % x for x in m["add"]),
                    " ".join("%.3f" % x for x in m["del"])), flush=True)
    print()
    print("%-34s %10s %10s %8s" % ("median (s)", "keel", "qemu", "ratio"))
    labels = [("boot", "boot to the marker"), ("add", "device_add -> driver bound"),
              ("del", "device_del -> DEVICE_DELETED")]
    for key, label in labels:
        k, q = results["keel"][key], results["qemu"][key]
        if not k or not q:
            print("%-34s %10s %10s %8s" % (label, "-", "-", "-"))
            continue
        mk, mq = statistics.median(k), statistics.median(q)
        print("%-34s %10.3f %10.3f %8.2f" % (label + " (n=%d)" % len(k), mk, mq, mk / mq))


if __name__ == "__main__":
    main()
