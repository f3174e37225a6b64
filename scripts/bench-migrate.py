#!/usr/bin/env python3
"""Live migration of the Debian guest (256 MiB, tcg) at its shell: Keel vs QEMU 7.2.

Each run boots the source to its shell, starts a destination with `-incoming unix:SOCK`
(the same command line and disk image), runs `migrate uri=unix:SOCK` on the source, polls
`query-migrate` until `completed`, then checks that the destination's console answers
(`echo ALIVE-$((5*5))`). Reported per run from the source's `query-migrate`: `total-time`,
`downtime`, `setup-time`, bytes transferred and dirty-sync rounds; then the medians and
the ratios Keel / QEMU. Both VMMs get the same `migrate-set-parameters` (`--max-bandwidth`,
`--downtime-limit`; QEMU's defaults are 128 MiB/s and 300 ms).

The guest is scripts/build-guest.sh's (vmlinux + initramfs-virtio, microvm, tcg, a 1 MiB
virtio-blk disk), as scripts/bench-restore.py runs it. Standard library only.
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


def migrate_once(argv, tmp, params, timeout):
    """One live migration; returns the source's final query-migrate answer."""
    mig = os.path.join(tmp, "mig.sock")
    if os.path.exists(mig):
        os.unlink(mig)
    src = Proc(argv, os.path.join(tmp, "src.sock"))
    dst = None
    try:
        src.wait_for(b"KEEL-GUEST-SHELL", timeout)
        time.sleep(0.5)
        dst = Proc(argv + ["-incoming", "unix:" + mig], os.path.join(tmp, "dst.sock"))
        if dst.qmp("query-status")["status"] != "inmigrate":
            raise RuntimeError("the destination is not waiting")
        src.qmp("migrate-set-parameters", params)
        src.qmp("migrate", {"uri": "unix:" + mig})
        end = time.monotonic() + timeout
        while True:
            info = src.qmp("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() > end:
                raise RuntimeError("the migration did not end: %s" % info)
            time.sleep(0.01)
        if info["status"] != "completed":
            raise RuntimeError("migration %s: %s" % (info["status"], info.get("error-desc")))
        end = time.monotonic() + timeout
        while dst.qmp("query-status")["status"] != "running":
            if time.monotonic() > end:
                raise RuntimeError("the destination never ran")
            time.sleep(0.005)
        dst.type(CMD)
        dst.wait_for(ANSWER, timeout)
        return info
    finally:
        src.kill()
        if dst is not None:
            dst.kill()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vmm", default=os.path.join(ROOT, "target/release/vmm"))
    ap.add_argument("--qemu", default="/usr/bin/qemu-system-x86_64")
    ap.add_argument("--guest", default=os.environ.get("KEEL_GUEST_DIR", os.path.expanduser("~/.cache/keel-guest/current")))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=180)
    ap.add_argument("--machine", default="microvm", choices=["microvm", "pc"],
                    help="machine type (pc: bzImage and virtio-blk-pci)")
    ap.add_argument("--max-bandwidth", type=int, default=128 << 20, help="bytes/s (QEMU's default)")
    ap.add_argument("--downtime-limit", type=int, default=300, help="ms (QEMU's default)")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="keel-bench-migrate-")
    disk = os.path.join(tmp, "disk.img")
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    # On a loaded host QEMU's guest cannot calibrate its TSC against the PIT and hangs
    # (scripts/README.md); giving the rate avoids the calibration, for both VMMs alike.
    append = "console=ttyS0 quiet keel.mode=shell"
    if host_tsc_khz():
        append += " tsc_early_khz=%d" % host_tsc_khz()
    args = guest_args(a.guest, disk, append, a.machine)
    params = {"max-bandwidth": a.max_bandwidth, "downtime-limit": a.downtime_limit}
    vmms = [("keel", [a.vmm])]
    if os.path.exists(a.qemu):
        vmms.append(("qemu", [a.qemu, "-display", "none"]))
    else:
        print("no QEMU at %s: Keel only" % a.qemu)
    keys = ("total-time", "downtime", "setup-time")
    results = {name: {k: [] for k in keys} for name, _ in vmms}
    for i in range(a.runs):
        # Interleaved, so both see the same host load.
        for name, cmd in vmms:
            info = migrate_once(cmd + args, tmp, params, a.timeout)
            for k in keys:
                results[name][k].append(info.get(k, 0))
            ram = info.get("ram", {})
            print("%s run %d: total %d ms, downtime %d ms, setup %d ms, %.1f MiB sent, "
                  "%d dirty syncs" % (name, i + 1, info.get("total-time", 0),
                                      info.get("downtime", 0), info.get("setup-time", 0),
                                      ram.get("transferred", 0) / 2**20,
                                      ram.get("dirty-sync-count", 0)))
    print()
    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in results.items()}
    for n, m in med.items():
        print("%-5s median total %.0f ms, downtime %.0f ms, setup %.0f ms" % (
            n, m["total-time"], m["downtime"], m["setup-time"]))
    if "qemu" in med:
        for k in ("total-time", "downtime"):
            q = med["qemu"][k]
            r = med["keel"][k] / q if q else float("inf")
            print("keel / qemu %-10s = %.3f" % (k, r))


if __name__ == "__main__":
    sys.exit(main())
