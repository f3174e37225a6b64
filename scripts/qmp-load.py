#!/usr/bin/env python3
"""QMP load test: N clients doing query-status as fast as they can (stdlib only).

    scripts/qmp-load.py [--clients 8] [--duration 10] [--marker TEXT] [--runs R]
                        [--vmm BIN] [--qemu [BIN]] -- VMM ARGUMENTS...

The VMM is started as `BIN ARGUMENTS... -qmp unix:SOCK1,server=on,wait=off ...`, one
monitor per client (QEMU serves one client per monitor; `--shared-socket` puts every
client on one socket, which Keel allows). Each client is a process of its own (so Python's lock does not serialise them): it connects,
negotiates, then sends `query-status` and waits for the reply, again and again, timing
every round trip. Reported per side: requests per second over all clients, p50/p90/p99
latency, and the VMM's CPU time.

With `--marker TEXT` the arguments must boot a guest that prints TEXT on the VMM's
standard output (e.g. `-serial stdio` and scripts/build-guest.sh's KEEL-GUEST-READY).
Each side then boots twice per run, interleaved: idle (no client) and busy (the clients
start as soon as the monitor accepts and run until the marker). The time from process
start to the marker is the boot time; the slowdown is busy / idle - 1 (medians over the
runs); `paired` is the median of each run's busy / idle - 1, the two boots being next to
each other in time (steadier on a host whose load changes). Without a marker the clients
run for `--duration` seconds.

While the guest runs, Keel keeps its QMP threads within a share of one CPU (20% unless
`KEEL_QMP_CPU_SHARE` says otherwise, see keel_qmp::pace); the variable is passed to Keel
from this script's environment and printed with the results.

`--qemu` runs the same arguments with QEMU's binary (default qemu-system-x86_64) in the
same run; Keel takes QEMU's command line, so one argument list serves both. Keel's
binary is --vmm, else $VMM, else target/release/vmm of this checkout.

Example (the Debian guest under TCG, 8 clients, against QEMU):

    G=~/.cache/keel-guest/current
    scripts/qmp-load.py --clients 8 --runs 3 --marker KEEL-GUEST-READY --qemu -- \\
        -M microvm -accel tcg -m 256M -nodefaults -no-user-config -nographic \\
        -serial stdio -kernel $G/vmlinux -initrd $G/initramfs.cpio.gz \\
        -append "console=ttyS0 tsc_early_khz=..."
"""

import argparse
import json
import multiprocessing as mp
import os
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICKS = os.sysconf("SC_CLK_TCK")


def client(path, stop, out, ready):
    """One QMP client: query-status in a loop until `stop`; sends its latencies to `out`."""
    lat = []
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(path)
                break
            except OSError:
                s.close()
                if stop.is_set() or time.monotonic() > deadline:
                    out.put(b"")
                    return
                time.sleep(0.005)
        buf = b""

        def line():
            nonlocal buf
            while b"\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    raise EOFError("monitor closed the connection")
                buf += chunk
            l, _, buf = buf.partition(b"\n")
            return l

        line()  # greeting
        s.sendall(b'{"execute": "qmp_capabilities"}')
        while b'"return"' not in line():
            pass
        ready.release()
        req = b'{"execute": "query-status"}'
        while not stop.is_set():
            t0 = time.perf_counter()
            s.sendall(req)
            while True:
                l = line()
                if l.startswith(b'{"return"'):
                    break
                if not l.startswith(b'{"timestamp"') and b'"event"' not in l:
                    raise RuntimeError("unexpected reply %r" % l[:200])
            lat.append(time.perf_counter() - t0)
        s.close()
    except (OSError, EOFError, RuntimeError) as e:
        if not stop.is_set():
            sys.stderr.write("qmp-load: client: %s\n" % e)
    out.put(struct.pack("%dd" % len(lat), *lat))


def cpu_seconds(pid):
    """User + system time of a live process (None once it is gone)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS
    except (OSError, IndexError, ValueError):
        return None


class Result:
    def __init__(self):
        self.boot = None  # seconds from start to marker
        self.requests = 0
        self.window = None
        self.lat = []
        self.cpu = None
        self.error = None


def run_once(binary, vm_args, clients, marker, duration, timeout, shared=False):
    """Starts the VMM, optionally with `clients` load; returns a Result."""
    res = Result()
    tmp = tempfile.mkdtemp(prefix="qmp-load-")
    n_socks = 1 if shared else max(1, clients)
    socks = [os.path.join(tmp, "qmp%d.sock" % i) for i in range(n_socks)]
    cmd = [binary] + vm_args
    for sock in socks:
        cmd += ["-qmp", "unix:%s,server=on,wait=off" % sock]
    ctx = mp.get_context("fork")
    stop = ctx.Event()
    out = ctx.Queue()
    ready = ctx.Semaphore(0)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    workers = [ctx.Process(target=client, args=(socks[i % n_socks], stop, out, ready),
                           daemon=True)
               for i in range(clients)]
    for w in workers:
        w.start()
    load_start = None
    try:
        if clients:
            for _ in range(clients):
                if not ready.acquire(timeout=timeout):
                    res.error = "clients could not connect"
                    break
            load_start = time.monotonic()
        cpu0 = cpu_seconds(proc.pid) or 0.0
        seen = b""
        end = (start + timeout) if marker else (time.monotonic() + duration)
        while res.error is None:
            now = time.monotonic()
            if now >= end:
                if marker:
                    res.error = "did not reach the marker within %gs" % timeout
                break
            r, _, _ = select.select([proc.stdout], [], [], min(0.05, end - now))
            if r:
                data = os.read(proc.stdout.fileno(), 65536)
                if not data:
                    res.error = "exited with status %s" % proc.wait()
                    break
                if marker:
                    seen = (seen + data)[-(len(marker) + 65536):]
                    if marker.encode() in seen:
                        res.boot = time.monotonic() - start
                        break
        res.cpu = (cpu_seconds(proc.pid) or cpu0) - cpu0
        stop.set()
        if load_start is not None:
            res.window = time.monotonic() - load_start
        for _ in workers:
            try:
                raw = out.get(timeout=10)
            except Exception:  # queue.Empty, from another module
                continue
            lat = struct.unpack("%dd" % (len(raw) // 8), raw)
            res.lat.extend(lat)
        res.requests = len(res.lat)
    finally:
        stop.set()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for w in workers:
            w.join(timeout=5)
            if w.is_alive():
                w.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def pct(values, p):
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(p / 100.0 * len(v)))]


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vmm", default=os.environ.get("VMM") or os.path.join(REPO, "target/release/vmm"))
    p.add_argument("--qemu", nargs="?", const="qemu-system-x86_64", default=None,
                   help="also run QEMU (binary, default qemu-system-x86_64)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--duration", type=float, default=10.0, help="load seconds without --marker")
    p.add_argument("--marker", help="text the guest prints when booted")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--timeout", type=float, default=180.0)
    p.add_argument("--shared-socket", action="store_true",
                   help="all clients on one monitor socket (Keel only; QEMU serves one)")
    p.add_argument("--json", action="store_true")
    p.add_argument("args", nargs=argparse.REMAINDER, help="-- VMM arguments")
    a = p.parse_args()
    vm_args = a.args[1:] if a.args[:1] == ["--"] else a.args
    sides = [("keel", a.vmm)]
    if a.qemu:
        if shutil.which(a.qemu) or os.path.exists(a.qemu):
            sides.append(("qemu", a.qemu))
        else:
            print("qmp-load: %s is not installed; Keel only" % a.qemu, file=sys.stderr)
    results = {name: {"idle": [], "busy": []} for name, _ in sides}
    for i in range(a.runs):
        for name, binary in sides:
            kinds = ["idle", "busy"] if a.marker else ["busy"]
            if a.marker and i % 2:
                kinds.reverse()
            for kind in kinds:
                n = a.clients if kind == "busy" else 0
                r = run_once(binary, vm_args, n, a.marker, a.duration, a.timeout,
                             a.shared_socket and name != "qemu")
                results[name][kind].append(r)
                msg = "%s %s run %d:" % (name, kind, i + 1)
                if r.error:
                    msg += " error: " + r.error
                if r.boot is not None:
                    msg += " boot %.2fs" % r.boot
                if r.requests and r.window:
                    msg += " %d requests, %.0f/s" % (r.requests, r.requests / r.window)
                print(msg, file=sys.stderr, flush=True)
    summary = {}
    for name, _ in sides:
        busy = results[name]["busy"]
        idle = results[name]["idle"]
        lat = [x for r in busy for x in r.lat]
        rates = [r.requests / r.window for r in busy if r.window and r.requests]
        s = {
            "clients": a.clients,
            "requests_per_s": median(rates),
            "p50_ms": pct(lat, 50) and pct(lat, 50) * 1e3,
            "p90_ms": pct(lat, 90) and pct(lat, 90) * 1e3,
            "p99_ms": pct(lat, 99) and pct(lat, 99) * 1e3,
            "vmm_cpu_s_busy": median([r.cpu for r in busy]),
            "errors": [r.error for r in busy + idle if r.error],
        }
        if a.marker:
            bi = median([r.boot for r in idle])
            bb = median([r.boot for r in busy])
            s.update({
                "boot_idle_s": bi, "boot_busy_s": bb,
                "boot_idle_all_s": [r.boot for r in idle],
                "boot_busy_all_s": [r.boot for r in busy],
                "slowdown": (bb / bi - 1) if bi and bb else None,
                # Each run's busy boot against the idle boot next to it in time: steadier
                # than the ratio of medians on a host whose load changes during the runs.
                "paired_slowdown": median([b.boot / i.boot - 1 for i, b in zip(idle, busy)
                                           if i.boot and b.boot]),
            })
        summary[name] = s
    if a.json:
        print(json.dumps(summary, indent=2))
        return
    f = lambda v, fmt: (fmt % v) if v is not None else "-"
    pc = lambda v: f(v if v is None else v * 100, "%+.1f%%")
    print("%-5s %7s %9s %9s %9s %9s %10s %8s %8s %8s" % (
        "side", "clients", "idle s", "busy s", "slowdown", "paired", "req/s", "p50 ms",
        "p99 ms", "cpu s"))
    for name, s in summary.items():
        print("%-5s %7d %9s %9s %9s %9s %10s %8s %8s %8s" % (
            name, s["clients"], f(s.get("boot_idle_s"), "%.2f"), f(s.get("boot_busy_s"), "%.2f"),
            pc(s.get("slowdown")), pc(s.get("paired_slowdown")),
            f(s["requests_per_s"], "%.0f"), f(s["p50_ms"], "%.3f"), f(s["p99_ms"], "%.3f"),
            f(s["vmm_cpu_s_busy"], "%.1f")))
        for e in s["errors"]:
            print("      error: %s" % e)
    k, q = summary.get("keel", {}), summary.get("qemu", {})
    if k.get("requests_per_s") and q.get("requests_per_s"):
        print("keel/qemu req/s: %.2f" % (k["requests_per_s"] / q["requests_per_s"]))
    if os.environ.get("KEEL_QMP_CPU_SHARE"):
        print("KEEL_QMP_CPU_SHARE=%s" % os.environ["KEEL_QMP_CPU_SHARE"])


if __name__ == "__main__":
    main()
