#!/usr/bin/env python3
"""Process start -> exit of a hello PVH guest under KVM: Keel's vmm vs QEMU, plus the floor.

Runs the same command line (`-M microvm -accel kvm -m 128M -nodefaults -no-user-config
-display none -serial stdio -kernel GUEST -device isa-debug-exit,iobase=0xf4,iosize=0x04`)
with `vmm` and `qemu-system-x86_64`, interleaved, N times each, and prints the medians and
the ratio. With --bare it also runs keel-kvm's `bare_hello` example (the least a VMM can do
with kvm-ioctls: one memory slot, the irqchip, one vCPU, 50 port writes, exit), which shows
how much of the time is the host kernel's own VM set-up and teardown.

Guests: `cargo run --release -p keel-testguest --example write_guests -- DIR` writes
DIR/hello32.elf. The bare floor: `cargo build --release -p keel-kvm --example bare_hello`.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vmm", default="target/release/vmm", help="Keel binary (default %(default)s)")
    ap.add_argument("--qemu", default="qemu-system-x86_64", help="QEMU binary (default %(default)s)")
    ap.add_argument("--guest", default="/tmp/guests/hello32.elf", help="PVH guest (default %(default)s)")
    ap.add_argument("--bare", help="path of the bare_hello example binary, to time the floor too")
    ap.add_argument("--runs", type=int, default=20, help="runs per side (default %(default)s)")
    a = ap.parse_args()

    if not os.path.exists(a.guest):
        print(f"no guest at {a.guest}: run write_guests first (see --help)", file=sys.stderr)
        return 2
    if shutil.which(a.qemu) is None:
        print(f"{a.qemu} not found (apt-get install qemu-system-x86)", file=sys.stderr)
        return 2
    common = [
        "-accel", "kvm", "-m", "128M", "-nodefaults", "-no-user-config", "-display", "none",
        "-serial", "stdio", "-kernel", a.guest, "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ]
    sides = {
        "keel": [a.vmm, "-M", "microvm"] + common,
        "qemu": [a.qemu, "-M", "microvm"] + common,
    }
    if a.bare:
        sides["bare"] = [a.bare]
    times = {k: [] for k in sides}
    for _ in range(a.runs):
        for name, cmd in sides.items():
            t = time.perf_counter()
            p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[name].append((time.perf_counter() - t) * 1000)
            if p.returncode != 1:
                print(f"{name}: exit status {p.returncode}, expected 1", file=sys.stderr)
    q = statistics.median(times["qemu"])
    for name, v in times.items():
        m = statistics.median(v)
        print(f"{name:5s} median {m:7.1f} ms  min {min(v):6.1f} ms  / qemu {m / q:.3f}")
    if a.bare:
        b = statistics.median(times["bare"])
        k = statistics.median(times["keel"])
        print(f"keel above the bare floor: {k - b:.1f} ms; qemu above it: {q - b:.1f} ms")
    print(f"load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
