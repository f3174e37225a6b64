#!/usr/bin/env python3
"""Boot-time benchmark: Keel vs QEMU on the same Linux guest (stdlib only).

For each side the same command line is run several times (interleaved):

    VMM -M microvm -accel tcg -m 256M -nodefaults -no-user-config -nographic
        -serial stdio -kernel K -initrd I -append A

and four things are measured per run:

* process start -> the marker line (KEEL-GUEST-READY) on the serial console,
* process start -> process exit (the guest powers off),
* peak RSS of the VMM process (ru_maxrss from wait4),
* CPU time of the VMM process (user + system, from wait4): on a shared, loaded host
  the wall times of both sides stretch with the load; CPU time moves much less.

Medians over the successful runs and the Keel/QEMU ratios are printed.
`--baseline BIN` adds a third side, another Keel binary (e.g. a build before a
change), run interleaved with the other two, and prints its ratios as well. A side
that fails or times out is reported ("keel: did not reach marker within 60s")
and the other side is still measured.

The guest comes from scripts/build-guest.sh ($KEEL_GUEST_DIR, else
~/.cache/keel-guest/current). Keel's binary is $VMM (default
target/release/vmm in the checkout), QEMU's is $QEMU (default
qemu-system-x86_64). To validate the script itself, run QEMU on both sides:
VMM=qemu-system-x86_64 scripts/bench-boot.py
"""

import argparse
import json
import os
import re
import select
import signal
import statistics
import subprocess
import sys
import time

MARKER = b"KEEL-GUEST-READY"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def default_append():
    # QEMU's TCG TSC runs at the host's TSC rate. microvm has no HPET or PM
    # timer, and on a loaded host the kernel's PIT calibration of the TSC can
    # fail, after which the boot hangs; giving the rate avoids the calibration.
    khz = host_tsc_khz()
    append = "console=ttyS0"
    if khz:
        append += " tsc_early_khz=%d" % khz
    return append


def vm_args(args):
    """The VMM arguments shared by both sides."""
    return [
        "-M", "microvm", "-accel", args.accel, "-m", args.memory,
        "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
        "-kernel", args.kernel, "-initrd", args.initrd, "-append", args.append,
    ] + args.extra


class Run:
    """The outcome of one boot."""

    def __init__(self):
        self.marker = None  # seconds from process start to the marker line
        self.exit = None  # seconds from process start to process exit
        self.status = None  # exit status (negative: killed by that signal)
        self.rss_kib = None  # peak RSS in KiB
        self.uptime = None  # guest uptime printed with the marker
        self.cpu = None  # user + system CPU seconds of the process
        self.error = None  # why the run failed, if it did
        self.tail = b""  # last bytes of output, for failure reports


def wait_exit(proc, deadline):
    """Waits for proc until deadline; returns (status, rusage, time) or None on timeout."""
    pidfd = None
    if hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(proc.pid)
        except OSError:
            pidfd = None
    try:
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                now = time.monotonic()
                proc.returncode = os.waitstatus_to_exitcode(status)
                return proc.returncode, rusage, now
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if pidfd is not None:
                select.select([pidfd], [], [], left)
            else:
                time.sleep(min(left, 0.0005))
    finally:
        if pidfd is not None:
            os.close(pidfd)


def boot_once(cmd, timeout, marker, log_path=None):
    """Runs one boot and measures it."""
    run = Run()
    out = bytearray()
    start = time.monotonic()
    deadline = start + timeout
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as e:
        run.error = "cannot start %s: %s" % (cmd[0], e.strerror or e)
        return run
    fd = proc.stdout.fileno()
    line_re = re.compile(rb"(?:^|\n)" + re.escape(marker) + rb"[^\n]*")
    eof = False
    scan_from = 0
    while not eof:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            eof = True
            break
        now = time.monotonic()
        out += chunk
        if run.marker is None:
            m = line_re.search(out, max(0, scan_from - len(marker) - 1))
            if m:
                run.marker = now - start
            scan_from = len(out)
    waited = wait_exit(proc, deadline) if eof else None
    if waited is None:
        # Timed out: kill the whole process group and reap it.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        _, status, rusage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        run.status = proc.returncode
        run.rss_kib = rusage.ru_maxrss
        run.cpu = rusage.ru_utime + rusage.ru_stime
        if run.marker is None:
            run.error = "did not reach marker within %gs" % timeout
        else:
            run.error = "reached the marker but did not exit within %gs" % timeout
    else:
        run.status, rusage, t_exit = waited
        run.exit = t_exit - start
        run.rss_kib = rusage.ru_maxrss
        run.cpu = rusage.ru_utime + rusage.ru_stime
        if run.marker is None:
            run.error = "exited with status %d before the marker" % run.status
        elif run.status != 0:
            run.error = "reached the marker but exited with status %d" % run.status
    proc.stdout.close()
    m = line_re.search(out)
    up = re.search(rb"uptime=([0-9.]+)", m.group(0)) if m else None
    if up:
        run.uptime = float(up.group(1))
    run.tail = bytes(out[-600:])
    if log_path:
        with open(log_path, "wb") as f:
            f.write(out)
    return run


def median(values):
    return statistics.median(values) if values else None


def fmt_s(v):
    return "-" if v is None else "%.3f s" % v


def fmt_mib(kib):
    return "-" if kib is None else "%.1f MiB" % (kib / 1024.0)


def summarize(name, runs):
    ok = [r for r in runs if r.error is None]
    return {
        "name": name,
        "runs": len(runs),
        "ok": len(ok),
        "marker_s": median([r.marker for r in ok]),
        "exit_s": median([r.exit for r in ok]),
        "rss_kib": median([r.rss_kib for r in ok]),
        "rss_kib_max": max([r.rss_kib for r in ok], default=None),
        "guest_uptime_s": median([r.uptime for r in ok if r.uptime is not None]),
        "cpu_s": median([r.cpu for r in ok]),
        "marker_all_s": [r.marker for r in runs],
        "exit_all_s": [r.exit for r in runs],
        "rss_all_kib": [r.rss_kib for r in runs],
        "errors": [r.error for r in runs if r.error],
    }


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def main():
    guest_dir = os.environ.get("KEEL_GUEST_DIR") or os.path.expanduser("~/.cache/keel-guest/current")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="boots per side (default 5)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per boot (default 60)")
    p.add_argument("--vmm", default=os.environ.get("VMM") or os.path.join(REPO, "target/release/vmm"),
                   help="Keel's binary ($VMM, default target/release/vmm)")
    p.add_argument("--qemu", default=os.environ.get("QEMU") or "qemu-system-x86_64",
                   help="QEMU's binary ($QEMU, default qemu-system-x86_64)")
    p.add_argument("--baseline", help="a second Keel binary, measured as side 'base' (before/after)")
    p.add_argument("--guest-dir", default=guest_dir, help="build-guest.sh output (default %(default)s)")
    p.add_argument("--kernel", help="kernel image (default GUEST_DIR/vmlinux; try bzImage)")
    p.add_argument("--initrd", help="initramfs (default GUEST_DIR/initramfs.cpio.gz)")
    p.add_argument("--append", default=None, help="kernel command line (default: %s)" % default_append())
    p.add_argument("--accel", default="tcg", help="accelerator for both sides (default tcg)")
    p.add_argument("-m", "--memory", default="256M", help="guest RAM (default 256M)")
    p.add_argument("--marker", default=MARKER.decode(), help="marker line prefix (default %(default)s)")
    p.add_argument("--only", choices=["keel", "base", "qemu"], help="measure one side only")
    p.add_argument("--log-dir", help="keep each run's console output here")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("extra", nargs="*", help="extra VMM arguments for both sides (after --)")
    args = p.parse_args()
    if args.runs < 1:
        p.error("--runs must be at least 1")
    args.kernel = args.kernel or os.path.join(args.guest_dir, "vmlinux")
    args.initrd = args.initrd or os.path.join(args.guest_dir, "initramfs.cpio.gz")
    args.append = args.append if args.append is not None else default_append()
    for f in (args.kernel, args.initrd):
        if not os.path.isfile(f):
            sys.exit("bench-boot: %s does not exist; run scripts/build-guest.sh first" % f)
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)

    common = vm_args(args)
    sides = [("keel", args.vmm)]
    if args.baseline:
        sides.append(("base", args.baseline))
    sides.append(("qemu", args.qemu))
    if args.only:
        sides = [s for s in sides if s[0] == args.only]
    runs = {name: [] for name, _ in sides}
    print("# %s" % " ".join(["VMM"] + [repr(a) if " " in a else a for a in common]), file=sys.stderr)
    print("# keel=%s%s qemu=%s runs=%d timeout=%gs load=%s" % (
        args.vmm, " base=%s" % args.baseline if args.baseline else "", args.qemu, args.runs, args.timeout,
        " ".join("%.2f" % x for x in os.getloadavg())), file=sys.stderr)
    for i in range(args.runs):
        # Every other round runs the sides in reverse order: whichever side runs right after
        # another boot measured ~4% slower on a shared host, so a fixed order biases ratios.
        for name, binary in (sides if i % 2 == 0 else sides[::-1]):
            log = os.path.join(args.log_dir, "%s-%d.log" % (name, i)) if args.log_dir else None
            r = boot_once([binary] + common, args.timeout, args.marker.encode(), log)
            runs[name].append(r)
            print("%s run %d: marker %s, exit %s, status %s, peak RSS %s, CPU %s, guest uptime %s%s" % (
                name, i + 1, fmt_s(r.marker), fmt_s(r.exit), r.status, fmt_mib(r.rss_kib), fmt_s(r.cpu),
                "-" if r.uptime is None else "%.2f s" % r.uptime,
                "" if r.error is None else "  [%s]" % r.error), file=sys.stderr)

    summary = {name: summarize(name, rs) for name, rs in runs.items()}
    result = {"command": common, "keel_binary": args.vmm, "qemu_binary": args.qemu, "sides": summary,
              "load_end": os.getloadavg()}
    if args.baseline:
        result["baseline_binary"] = args.baseline

    def ratios(a, b):
        return {
            "marker": ratio(a["marker_s"], b["marker_s"]),
            "exit": ratio(a["exit_s"], b["exit_s"]),
            "rss": ratio(a["rss_kib"], b["rss_kib"]),
            "cpu": ratio(a["cpu_s"], b["cpu_s"]),
        }

    for a, b in (("keel", "qemu"), ("base", "qemu"), ("keel", "base")):
        if a in summary and b in summary:
            result["ratio_%s_over_%s" % (a, b)] = ratios(summary[a], summary[b])
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("%-5s %7s %14s %14s %16s %12s %14s" % (
            "side", "ok", "to marker", "to exit", "peak RSS", "CPU", "guest uptime"))
        for name, s in summary.items():
            print("%-5s %3d/%-3d %14s %14s %16s %12s %14s" % (
                name, s["ok"], s["runs"], fmt_s(s["marker_s"]), fmt_s(s["exit_s"]),
                fmt_mib(s["rss_kib"]), fmt_s(s["cpu_s"]), fmt_s(s["guest_uptime_s"])))
            if s["ok"] < s["runs"]:
                first = next(r for r in runs[name] if r.error)
                print("%s: %s (%d of %d runs failed)" % (name, first.error, s["runs"] - s["ok"], s["runs"]))
                tail = first.tail.decode("utf-8", "replace").strip().splitlines()[-3:]
                for line in tail:
                    print("  | %s" % line)
        for a, b in (("keel", "qemu"), ("base", "qemu"), ("keel", "base")):
            rr = result.get("ratio_%s_over_%s" % (a, b))
            if rr:
                print("ratio %s/%s (medians; < 1 means %s is faster/smaller): marker %s, exit %s, "
                      "peak RSS %s, CPU %s" % ((a, b, a) + tuple(
                          "-" if v is None else "%.2fx" % v
                          for v in (rr["marker"], rr["exit"], rr["rss"], rr["cpu"]))))
        print("load average at the end: %s" % " ".join("%.2f" % x for x in os.getloadavg()))
    failed = any(s["ok"] == 0 for s in summary.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
