#!/usr/bin/env python3
"""QMP latency and throughput: Keel vs QEMU (stdlib only).

Each side is started as

    BINARY -machine none -nodefaults -display none -qmp unix:SOCK,server=on,wait=off

and per run the script measures:

* process start -> QMP greeting received (connecting as soon as the socket accepts),
* sequential round trips per second of {"execute": "query-status"} after
  qmp_capabilities (one request in flight at a time, over the raw socket),
* peak RSS of the process (ru_maxrss from wait4), after a final "quit".

Medians over the runs and the Keel/QEMU ratios are printed. A side that fails
is reported and the other side is still measured. Keel's binary is $VMM
(default target/release/vmm in the checkout), QEMU's is $QEMU (default
qemu-system-x86_64). Validate with QEMU on both sides:
VMM=qemu-system-x86_64 scripts/qmp-compare.py
"""

import argparse
import json
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LINE = 1 << 20  # a reply longer than this is treated as a protocol error


class QmpError(Exception):
    """The VMM did not speak QMP as expected."""


class Conn:
    """A minimal line-oriented QMP client on a connected unix socket."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def read_msg(self, deadline):
        """Returns the next JSON object (dict) from the socket."""
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                line, self.buf = self.buf[:nl], self.buf[nl + 1:]
                if not line.strip():
                    continue
                try:
                    msg = json.loads(line)
                except ValueError:
                    raise QmpError("not JSON: %r" % line[:200])
                if not isinstance(msg, dict):
                    raise QmpError("not a JSON object: %r" % line[:200])
                return msg
            if len(self.buf) > MAX_LINE:
                raise QmpError("reply line longer than %d bytes" % MAX_LINE)
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpError("timed out waiting for a QMP message")
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                continue
            chunk = self.sock.recv(65536)
            if not chunk:
                raise QmpError("connection closed by the VMM")
            self.buf += chunk

    def command(self, request, deadline):
        """Sends one request and returns its reply, skipping events."""
        self.sock.sendall(request)
        while True:
            msg = self.read_msg(deadline)
            if "event" in msg:
                continue
            if "return" in msg:
                return msg
            if "error" in msg:
                raise QmpError("error reply: %s" % json.dumps(msg["error"])[:200])
            raise QmpError("unexpected message: %s" % json.dumps(msg)[:200])


class Run:
    """The outcome of one start/measure/quit cycle."""

    def __init__(self):
        self.greeting = None  # seconds from process start to the greeting
        self.rtps = None  # query-status round trips per second
        self.rss_kib = None
        self.status = None
        self.error = None
        self.output = b""


def connect(path, proc, deadline):
    """Connects to the QMP socket as soon as it accepts; returns the socket."""
    while True:
        if proc.poll() is not None:
            raise QmpError("exited with status %d before accepting a QMP connection" % proc.returncode)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
        if time.monotonic() >= deadline:
            raise QmpError("QMP socket %s did not accept a connection" % path)
        time.sleep(0.0002)


def reap(proc, deadline):
    """Waits for proc (killing it at deadline); returns (status, rusage, killed)."""
    killed = False
    while True:
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, rusage, killed
        if time.monotonic() >= deadline and not killed:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            killed = True
        time.sleep(0.001)


def measure_once(binary, extra, count, duration, timeout, workdir):
    run = Run()
    sock_path = os.path.join(workdir, "qmp-%d.sock" % time.monotonic_ns())
    cmd = [binary, "-machine", "none", "-nodefaults", "-display", "none",
           "-qmp", "unix:%s,server=on,wait=off" % sock_path] + extra
    out_path = sock_path + ".out"
    out = open(out_path, "w+b")
    start = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    except OSError as e:
        out.close()
        run.error = "cannot start %s: %s" % (binary, e.strerror or e)
        return run
    deadline = start + timeout
    sock = None
    try:
        sock = connect(sock_path, proc, deadline)
        conn = Conn(sock)
        greeting = conn.read_msg(deadline)
        run.greeting = time.monotonic() - start
        if "QMP" not in greeting:
            raise QmpError("first message is not a QMP greeting: %s" % json.dumps(greeting)[:200])
        conn.command(b'{"execute": "qmp_capabilities"}\n', deadline)
        request = b'{"execute": "query-status"}\n'
        conn.command(request, deadline)  # warm-up
        n = 0
        t0 = time.monotonic()
        stop = t0 + duration
        while n < count:
            reply = conn.command(request, deadline)
            if not isinstance(reply.get("return"), dict) or "status" not in reply["return"]:
                raise QmpError("query-status reply without a status: %s" % json.dumps(reply)[:200])
            n += 1
            if duration and time.monotonic() >= stop:
                break
        run.rtps = n / (time.monotonic() - t0)
        # Wait for quit's reply: closing the socket first may drop the request.
        try:
            conn.command(b'{"execute": "quit"}\n', min(deadline, time.monotonic() + 5.0))
        except (QmpError, OSError):
            pass  # the VMM may close the connection while exiting
    except (QmpError, OSError) as e:
        run.error = str(e)
    finally:
        if sock is not None:
            sock.close()
    # After quit (or a failure) give the process a moment, then kill it.
    status, rusage, killed = reap(proc, time.monotonic() + (5.0 if run.error is None else 0.0))
    run.status = status
    run.rss_kib = rusage.ru_maxrss
    if run.error is None and killed:
        run.error = "did not exit within 5s of quit"
    out.seek(0)
    run.output = out.read()[-600:]
    out.close()
    for p in (out_path, sock_path):
        try:
            os.unlink(p)
        except OSError:
            pass
    return run


def median(values):
    return statistics.median(values) if values else None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="process starts per side (default 5)")
    p.add_argument("--count", type=int, default=5000, help="query-status round trips per run at most (default 5000)")
    p.add_argument("--duration", type=float, default=1.0,
                   help="stop a run's round trips after this many seconds (default 1; 0 = use --count only)")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds per run (default 20)")
    p.add_argument("--vmm", default=os.environ.get("VMM") or os.path.join(REPO, "target/release/vmm"),
                   help="Keel's binary ($VMM, default target/release/vmm)")
    p.add_argument("--qemu", default=os.environ.get("QEMU") or "qemu-system-x86_64",
                   help="QEMU's binary ($QEMU, default qemu-system-x86_64)")
    p.add_argument("--only", choices=["keel", "qemu"], help="measure one side only")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("extra", nargs="*", help="extra arguments for both sides (after --)")
    args = p.parse_args()
    if args.runs < 1 or args.count < 1:
        p.error("--runs and --count must be at least 1")

    sides = [("keel", args.vmm), ("qemu", args.qemu)]
    if args.only:
        sides = [s for s in sides if s[0] == args.only]
    runs = {name: [] for name, _ in sides}
    print("# BINARY -machine none -nodefaults -display none -qmp unix:SOCK,server=on,wait=off %s" %
          " ".join(args.extra), file=sys.stderr)
    print("# keel=%s qemu=%s runs=%d load=%s" % (args.vmm, args.qemu, args.runs,
          " ".join("%.2f" % x for x in os.getloadavg())), file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="keel-qmp-") as workdir:
        for i in range(args.runs):
            for name, binary in sides:
                r = measure_once(binary, args.extra, args.count, args.duration, args.timeout, workdir)
                runs[name].append(r)
                print("%s run %d: greeting %s, %s round trips/s, status %s, peak RSS %s%s" % (
                    name, i + 1, "-" if r.greeting is None else "%.1f ms" % (r.greeting * 1e3),
                    "-" if r.rtps is None else "%.0f" % r.rtps, r.status,
                    "-" if r.rss_kib is None else "%.1f MiB" % (r.rss_kib / 1024.0),
                    "" if r.error is None else "  [%s]" % r.error), file=sys.stderr)

    summary = {}
    for name, rs in runs.items():
        ok = [r for r in rs if r.error is None]
        summary[name] = {
            "runs": len(rs), "ok": len(ok),
            "greeting_ms": median([r.greeting * 1e3 for r in ok]),
            "query_status_per_s": median([r.rtps for r in ok]),
            "rss_kib": median([r.rss_kib for r in ok]),
            "errors": [r.error for r in rs if r.error],
        }
    result = {"sides": summary}
    if "keel" in summary and "qemu" in summary:
        k, q = summary["keel"], summary["qemu"]

        def ratio(a, b):
            return None if a is None or b is None or b == 0 else a / b
        result["ratio_keel_over_qemu"] = {
            "greeting": ratio(k["greeting_ms"], q["greeting_ms"]),
            "query_status_per_s": ratio(k["query_status_per_s"], q["query_status_per_s"]),
            "rss": ratio(k["rss_kib"], q["rss_kib"]),
        }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("%-5s %7s %14s %18s %12s" % ("side", "ok", "to greeting", "query-status/s", "peak RSS"))
        for name, s in summary.items():
            print("%-5s %3d/%-3d %14s %18s %12s" % (
                name, s["ok"], s["runs"],
                "-" if s["greeting_ms"] is None else "%.1f ms" % s["greeting_ms"],
                "-" if s["query_status_per_s"] is None else "%.0f" % s["query_status_per_s"],
                "-" if s["rss_kib"] is None else "%.1f MiB" % (s["rss_kib"] / 1024.0)))
            if s["ok"] < s["runs"]:
                first = next(r for r in runs[name] if r.error)
                print("%s: %s (%d of %d runs failed)" % (name, first.error, s["runs"] - s["ok"], s["runs"]))
                for line in first.output.decode("utf-8", "replace").strip().splitlines()[-3:]:
                    print("  | %s" % line)
        rr = result.get("ratio_keel_over_qemu")
        if rr:
            print("ratio keel/qemu (medians): greeting %s (< 1: Keel answers sooner), "
                  "query-status/s %s (> 1: Keel is faster), peak RSS %s" % tuple(
                      "-" if v is None else "%.2fx" % v
                      for v in (rr["greeting"], rr["query_status_per_s"], rr["rss"])))
    return 1 if any(s["ok"] == 0 for s in summary.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
