#!/usr/bin/env python3
"""virtio-blk throughput benchmark: Keel vs QEMU on the same Linux guest (stdlib only).

Each run creates a fresh sparse raw image of (MB + 16) MiB in a temporary
directory and boots the virtio initramfs with keel.mode=blk-bench:

    VMM -M microvm -accel tcg -m 256M -nodefaults -no-user-config -nographic
        -serial stdio -kernel K -initrd I
        -append "console=ttyS0 keel.mode=blk-bench keel.mb=MB"
        -drive file=IMG,if=none,id=d0,format=raw -device virtio-blk-device,drive=d0

The guest's /bin/keel-blk-bench reads MB MiB of /dev/vda with
`dd bs=1M iflag=direct` and then writes MB MiB of zeros with
`dd bs=1M oflag=direct conv=fsync`, times each with /proc/uptime
(centiseconds) and prints

    KEEL-BLK-READ bytes=N csec=T
    KEEL-BLK-WRITE bytes=N csec=T

Per-run and median MB/s (10^6 bytes per second) for read and write per side
are printed, and the Keel/QEMU ratios (above 1: Keel is faster). Sides run
interleaved. A side that fails or times out is reported and the other side is
still measured. The timer resolution is 10 ms: raise --mb when a side finishes
in few centiseconds.

QEMU's TCG TSC runs at the host's rate; microvm has no HPET or PM timer, and on
a loaded host the kernel's TSC calibration can fail and the boot hang, so QEMU
gets tsc_early_khz=<host rate> on its command line (so does a "keel" side
whose binary is named qemu*; --no-qemu-tsc-khz drops it). Keel's command line
is the one above.

The guest comes from scripts/build-guest.sh ($KEEL_GUEST_DIR, else
~/.cache/keel-guest/current). Keel's binary is $VMM (default
target/release/vmm in the checkout), QEMU's is $QEMU (default
qemu-system-x86_64). To validate the script itself, run QEMU on both sides:
VMM=qemu-system-x86_64 scripts/bench-blk.py
"""

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_RE = re.compile(rb"KEEL-BLK-(READ|WRITE) bytes=([0-9]+) csec=(-?[0-9]+)")
FAILED_RE = re.compile(rb"KEEL-(?:BLK-[A-Z]+ FAILED|VDA-MISSING|MODULE-FAILED|MODULES: none)[^\r\n]*")
DONE = b"KEEL-BLK-BENCH-DONE"


def host_tsc_khz():
    """TSC frequency of the host in kHz, from /proc/cpuinfo (None if unknown)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


class Run:
    """The outcome of one boot."""

    def __init__(self):
        self.read = None  # MB/s
        self.write = None  # MB/s
        self.read_csec = None
        self.write_csec = None
        self.wall = None  # seconds from process start to exit
        self.error = None  # why the run failed, if it did
        self.tail = b""  # last bytes of output, for failure reports


def mbps(nbytes, csec):
    return nbytes / (csec / 100.0) / 1e6


def run_once(cmd, image, size, timeout, log_path=None):
    """Creates a fresh sparse image, boots once and parses the guest's results."""
    run = Run()
    with open(image, "wb") as f:
        f.truncate(size)
    start = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as e:
        run.error = "cannot start %s: %s" % (cmd[0], e.strerror or e)
        return run
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        out, _ = proc.communicate()
        run.error = "did not exit within %gs" % timeout
    run.wall = time.monotonic() - start
    run.tail = out[-600:]
    if log_path:
        with open(log_path, "wb") as f:
            f.write(out)
    for kind, nbytes, csec in RESULT_RE.findall(out):
        nbytes, csec = int(nbytes), int(csec)
        if csec <= 0:
            run.error = run.error or "%s took %d csec: too fast to time, raise --mb" % (
                kind.decode().lower(), csec)
            continue
        if kind == b"READ":
            run.read, run.read_csec = mbps(nbytes, csec), csec
        else:
            run.write, run.write_csec = mbps(nbytes, csec), csec
    failed = FAILED_RE.search(out)
    if run.error is None and failed:
        run.error = "guest: " + failed.group(0).decode(errors="replace")
    if run.error is None and (run.read is None or run.write is None):
        run.error = "no %s result (exit status %s)" % (
            "read" if run.read is None else "write", proc.returncode)
    if run.error is None and DONE not in out:
        run.error = "guest did not finish (exit status %s)" % proc.returncode
    if run.error is None and proc.returncode != 0:
        run.error = "exited with status %d" % proc.returncode
    return run


def median(values):
    return statistics.median(values) if values else None


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def fmt(v, unit=" MB/s", digits=1):
    return "-" if v is None else "%.*f%s" % (digits, v, unit)


def main():
    guest_dir = os.environ.get("KEEL_GUEST_DIR") or os.path.expanduser("~/.cache/keel-guest/current")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="boots per side (default 3)")
    p.add_argument("--mb", type=int, default=64, help="MiB read and written per run (default 64)")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds per boot (default 180)")
    p.add_argument("--vmm", default=os.environ.get("VMM") or os.path.join(REPO, "target/release/vmm"),
                   help="Keel's binary ($VMM, default target/release/vmm)")
    p.add_argument("--qemu", default=os.environ.get("QEMU") or "qemu-system-x86_64",
                   help="QEMU's binary ($QEMU, default qemu-system-x86_64)")
    p.add_argument("--guest-dir", default=guest_dir, help="build-guest.sh output (default %(default)s)")
    p.add_argument("--kernel", help="kernel image (default GUEST_DIR/vmlinux)")
    p.add_argument("--initrd", help="initramfs (default GUEST_DIR/initramfs-virtio.cpio.gz)")
    p.add_argument("--accel", default="tcg", help="accelerator for both sides (default tcg)")
    p.add_argument("-m", "--memory", default="256M", help="guest RAM (default 256M)")
    p.add_argument("--no-qemu-tsc-khz", action="store_true",
                   help="do not add tsc_early_khz=<host rate> to QEMU's command line")
    p.add_argument("--only", choices=["keel", "qemu"], help="measure one side only")
    p.add_argument("--tmp-dir", help="where the images go (default: a new temporary directory)")
    p.add_argument("--log-dir", help="keep each run's console output here")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args()
    if args.runs < 1:
        p.error("--runs must be at least 1")
    if args.mb < 1:
        p.error("--mb must be at least 1")
    args.kernel = args.kernel or os.path.join(args.guest_dir, "vmlinux")
    args.initrd = args.initrd or os.path.join(args.guest_dir, "initramfs-virtio.cpio.gz")
    for f in (args.kernel, args.initrd):
        if not os.path.isfile(f):
            sys.exit("bench-blk: %s does not exist; run scripts/build-guest.sh first" % f)
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)

    tmp = tempfile.TemporaryDirectory(prefix="keel-bench-blk-", dir=args.tmp_dir)
    image = os.path.join(tmp.name, "disk.raw")
    size = (args.mb + 16) * 1024 * 1024
    append = "console=ttyS0 keel.mode=blk-bench keel.mb=%d" % args.mb
    khz = None if args.no_qemu_tsc_khz else host_tsc_khz()

    def cmd(binary, side):
        a = append
        if khz and (side == "qemu" or os.path.basename(binary).startswith("qemu")):
            a = "console=ttyS0 tsc_early_khz=%d keel.mode=blk-bench keel.mb=%d" % (khz, args.mb)
        return [binary, "-M", "microvm", "-accel", args.accel, "-m", args.memory,
                "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
                "-kernel", args.kernel, "-initrd", args.initrd, "-append", a,
                "-drive", "file=%s,if=none,id=d0,format=raw" % image,
                "-device", "virtio-blk-device,drive=d0"]

    sides = [("keel", args.vmm), ("qemu", args.qemu)]
    if args.only:
        sides = [s for s in sides if s[0] == args.only]
    for name, binary in sides:
        print("%s: %s" % (name, " ".join(cmd(binary, name))), file=sys.stderr)
    results = {name: [] for name, _ in sides}
    with tmp:
        for i in range(args.runs):
            for name, binary in sides:
                log = os.path.join(args.log_dir, "%s-%d.log" % (name, i)) if args.log_dir else None
                run = run_once(cmd(binary, name), image, size, args.timeout, log)
                results[name].append(run)
                if run.error:
                    print("%s run %d: FAILED: %s" % (name, i + 1, run.error), file=sys.stderr)
                    tail = run.tail.decode(errors="replace").strip().splitlines()[-5:]
                    for line in tail:
                        print("    | " + line, file=sys.stderr)
                else:
                    print("%s run %d: read %s (%d csec)  write %s (%d csec)  wall %.2f s" % (
                        name, i + 1, fmt(run.read), run.read_csec, fmt(run.write),
                        run.write_csec, run.wall), file=sys.stderr)

    summary = {"mb": args.mb, "accel": args.accel, "sides": {}}
    for name, runs in results.items():
        ok = [r for r in runs if r.error is None]
        summary["sides"][name] = {
            "runs": len(runs),
            "ok": len(ok),
            "read_mbps": median([r.read for r in ok]),
            "write_mbps": median([r.write for r in ok]),
            "read_all_mbps": [r.read for r in runs],
            "write_all_mbps": [r.write for r in runs],
            "errors": [r.error for r in runs if r.error],
        }
    s = summary["sides"]
    if "keel" in s and "qemu" in s:
        summary["ratio_read"] = ratio(s["keel"]["read_mbps"], s["qemu"]["read_mbps"])
        summary["ratio_write"] = ratio(s["keel"]["write_mbps"], s["qemu"]["write_mbps"])

    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print("virtio-blk sequential dd, %d MiB, bs=1M, O_DIRECT, accel %s" % (args.mb, args.accel))
        print("%-6s %8s %14s %14s" % ("side", "ok/runs", "read (median)", "write (median)"))
        for name, v in s.items():
            print("%-6s %8s %14s %14s" % (name, "%d/%d" % (v["ok"], v["runs"]),
                                          fmt(v["read_mbps"]), fmt(v["write_mbps"])))
        if "ratio_read" in summary:
            print("ratio keel/qemu: read %s  write %s" % (
                fmt(summary["ratio_read"], "x", 2), fmt(summary["ratio_write"], "x", 2)))
    failed = any(v["ok"] == 0 for v in s.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
