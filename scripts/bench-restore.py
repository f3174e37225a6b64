#!/usr/bin/env python3
"""Restore time of the Debian guest: Keel's -incoming vs a fresh boot vs QEMU's -incoming.

Each measurement is process start -> the guest's serial console answers a command
(`echo ALIVE-$((5*5))` printing ALIVE-25):

* keel boot:    `vmm ... keel.mode=shell`, wait for the shell, type the command;
* keel restore: `vmm ... -incoming file:SNAP` of that guest saved at its shell
                (with `migrate`), type the command once `query-status` says running;
* qemu restore: `qemu-system-x86_64 ... -incoming "exec:cat SNAP"` of the same guest
                saved by QEMU at its shell (`migrate exec:cat > SNAP`), the same way.

The guest is scripts/build-guest.sh's (vmlinux + initramfs-virtio, microvm, 256 MiB,
tcg, a 1 MiB virtio-blk disk), as tests/linux_virtio.rs boots it. Prints every run, the
medians and the ratios. Standard library only.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CMD = b"echo ALIVE-$((5*5))\n"
ANSWER = b"ALIVE-25"


from guestvm import Proc, guest_args, host_tsc_khz  # noqa: E402


def boot_to_shell(argv, sock, timeout):
    p = Proc(argv, sock)
    try:
        p.wait_for(b"KEEL-GUEST-SHELL", timeout)
        time.sleep(0.5)
        p.type(CMD)
        return p, p.wait_for(ANSWER, 30)
    except BaseException:
        p.kill()
        raise


def restore_once(argv, sock, timeout):
    p = Proc(argv, sock)
    try:
        p.wait_running(timeout)
        p.type(CMD)
        return p.wait_for(ANSWER, timeout)
    finally:
        p.kill()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vmm", default=os.path.join(ROOT, "target/release/vmm"))
    ap.add_argument("--qemu", default="/usr/bin/qemu-system-x86_64")
    ap.add_argument("--guest", default=os.environ.get("KEEL_GUEST_DIR", os.path.expanduser("~/.cache/keel-guest/current")))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=180)
    ap.add_argument("--machine", default="microvm", choices=["microvm", "pc"],
                    help="machine type (pc: bzImage and virtio-blk-pci)")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="keel-bench-restore-")
    disk = os.path.join(tmp, "disk.img")
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    # On a loaded host QEMU's guest cannot calibrate its TSC against the PIT and hangs
    # (scripts/README.md); giving the rate avoids the calibration, for both VMMs alike.
    append = "console=ttyS0 quiet keel.mode=shell"
    if host_tsc_khz():
        append += " tsc_early_khz=%d" % host_tsc_khz()
    args = guest_args(a.guest, disk, append, a.machine)
    sock = os.path.join(tmp, "qmp.sock")
    results = {"keel boot": [], "keel restore": [], "qemu restore": []}

    # Keel: boot (measured), save at the shell.
    snap = os.path.join(tmp, "keel.snap")
    for i in range(a.runs):
        p, t = boot_to_shell([a.vmm] + args, sock, a.timeout)
        results["keel boot"].append(t)
        if i == 0:
            info = p.qmp("migrate", {"uri": "file:" + snap})
            info = p.qmp("query-migrate")
            print("keel saved %d of %d pages, %.1f MiB in %d ms" % (
                info["ram"]["normal"], info["ram"]["total"] // 4096,
                os.path.getsize(snap) / 2**20, info["total-time"]))
        p.kill()
        print("keel boot run %d: %.3f s" % (i + 1, t))
    for i in range(a.runs):
        t = restore_once([a.vmm] + args + ["-incoming", "file:" + snap], sock, a.timeout)
        results["keel restore"].append(t)
        print("keel restore run %d: %.3f s" % (i + 1, t))

    # QEMU: boot once (not measured: its TCG boot is not the question here), save, restore.
    if os.path.exists(a.qemu):
        qsnap = os.path.join(tmp, "qemu.snap")
        qargs = [a.qemu, "-display", "none"] + args
        p, t = boot_to_shell(qargs, sock, a.timeout)
        p.qmp("migrate", {"uri": "exec:cat > " + qsnap})
        while p.qmp("query-migrate").get("status") not in ("completed", "failed"):
            time.sleep(0.05)
        print("qemu saved %.1f MiB (booted to the shell in %.3f s)" % (os.path.getsize(qsnap) / 2**20, t))
        p.kill()
        for i in range(a.runs):
            t = restore_once(qargs + ["-incoming", "exec:cat " + qsnap], sock, a.timeout)
            results["qemu restore"].append(t)
            print("qemu restore run %d: %.3f s" % (i + 1, t))
    else:
        print("no QEMU at %s: skipping its restore" % a.qemu)

    med = {k: statistics.median(v) for k, v in results.items() if v}
    print()
    for k, v in med.items():
        print("%-13s median %.3f s" % (k, v))
    if "keel boot" in med and "keel restore" in med:
        print("keel restore / keel boot   = %.3f" % (med["keel restore"] / med["keel boot"]))
    if "qemu restore" in med and "keel restore" in med:
        print("keel restore / qemu restore = %.3f" % (med["keel restore"] / med["qemu restore"]))


if __name__ == "__main__":
    sys.exit(main())
