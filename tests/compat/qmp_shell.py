#!/usr/bin/env python3
"""qmp-shell (PyPI qemu.qmp) against an emulator, in QMP mode and in HMP mode (-H).

The emulator waits paused (-S) with a QMP server socket; each step runs qmp-shell once
with one command on its standard input and checks what it prints. The HMP steps are
independent: one failing does not stop the others.

Usage: python3 tests/compat/qmp_shell.py --emulator PATH
"""

import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compat_common as cc  # noqa: E402

cc.reexec_in_venv("qemu.qmp")

S = cc.Scenario("qmp_shell", __doc__)
try:
    import qemu.qmp.qmp_shell  # noqa: F401
except ImportError:
    S.skip("Python package qemu.qmp (qmp-shell) is missing (bash tests/compat/setup.sh installs it)")

# The console script next to this interpreter when there is one (a venv), else the module.
script = Path(sys.executable).parent / "qmp-shell"
SHELL = [str(script)] if script.exists() else [sys.executable, "-m", "qemu.qmp.qmp_shell"]
NAME = "compat-vm"

sock = S.tmp / "qmp.sock"
argv = [S.emulator, "-M", "microvm", "-accel", "tcg", "-m", "64M", "-nodefaults",
        "-no-user-config", "-display", "none", "-S", "-name", NAME,
        "-qmp", f"unix:{sock},server=on,wait=off"]
proc = S.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
               stderr=open(S.tmp / "emulator.err", "w"))


def launched():
    cc.wait_for(lambda: sock.exists() or proc.poll() is not None, 20, "the QMP socket")
    cc.check(proc.poll() is None, f"the emulator exited with {proc.returncode}: "
             + (S.tmp / "emulator.err").read_text()[-300:])


S.step("launch", launched)


def shell(line: str, hmp: bool) -> str:
    cmd = SHELL + (["-H"] if hmp else []) + [str(sock)]
    S.log("$ " + " ".join(cmd) + f" <<< {line!r}")
    r = subprocess.run(cmd, input=line + "\n", capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, PYTHONUNBUFFERED="1"))
    S.log(r.stdout + r.stderr)
    err = r.stderr.strip().splitlines()
    cc.check(r.returncode == 0 and not any("Traceback" in l for l in err),
             f"qmp-shell exited {r.returncode}: {(err or [''])[-1]}")
    # Drop the banner: the answer follows the first prompt.
    out = r.stdout.split("(QEMU) ", 1)
    cc.check(len(out) == 2, f"no prompt in {r.stdout!r}")
    return out[1]


def raw_hmp(line: str) -> str:
    """For the failure message: what human-monitor-command answers to what qmp-shell -H
    sends (it runs 'help' and 'info' first, to fill its completion, then the line, each
    with cpu-index 0); the first error, else the line's answer."""
    from qemu.qmp.legacy import QEMUMonitorProtocol
    q = QEMUMonitorProtocol(str(sock))
    try:
        q.connect()
        for l in ("help", "info", line):
            r = q.cmd_raw("human-monitor-command", {"command-line": l, "cpu-index": 0})
            if "error" in r or l == line:
                return f"{l!r} -> {r}"
        return ""
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    finally:
        q.close()


def expect(line: str, pattern: str, hmp: bool):
    def run():
        try:
            out = shell(line, hmp)
        except cc.StepFailed as e:
            if hmp:
                raise cc.StepFailed(f"{e}; human-monitor-command answered {raw_hmp(line)}")
            raise
        cc.check(re.search(pattern, out, re.M), f"{line!r}: {pattern!r} not in {out[:300]!r}")
    return run


def banner():
    r = subprocess.run(SHELL + [str(sock)], input="", capture_output=True, text=True, timeout=30)
    cc.check("Connected to QEMU" in r.stdout, f"banner: {r.stdout!r} {r.stderr[-300:]!r}")


S.step("qmp-banner", banner)
S.step("qmp-query-status", expect("query-status", r'"status": "prelaunch"', False))
S.step("qmp-query-name", expect("query-name", rf'"name": "{NAME}"', False))
S.step("qmp-qom-list", expect("qom-list path=/machine", r'"name": "type"', False), fatal=False)

HMP = [
    ("help", r"^info \[subcommand\]", "hmp-help"),
    ("info status", r"VM status: paused \(prelaunch\)", "hmp-info-status"),
    ("info version", r"^\d+\.\d+\.\d+", "hmp-info-version"),
    ("info cpus", r"CPU #0", "hmp-info-cpus"),
    ("info kvm", r"kvm support: (enabled|disabled)", "hmp-info-kvm"),
    ("info name", rf"^{NAME}", "hmp-info-name"),
    ("info qtree", r"bus: main-system-bus", "hmp-info-qtree"),
    ("info mtree", r"address-space: memory", "hmp-info-mtree"),
    ("info registers", r"[ER]IP=[0-9a-f]+", "hmp-info-registers"),
]
for line, pattern, step in HMP:
    S.step(step, expect(line, pattern, True), fatal=False)


def quit_():
    # The emulator may close the socket before qmp-shell reads on after the answer, so
    # qmp-shell may end with EOFError here: what counts is that the emulator exits 0.
    r = subprocess.run(SHELL + [str(sock)], input="quit\n", capture_output=True, text=True,
                       timeout=30)
    last = (r.stderr.strip().splitlines() or [""])[-1]
    cc.check(r.returncode == 0 or last.startswith(("EOFError", "ConnectionResetError")),
             f"qmp-shell exited {r.returncode}: {last}")
    cc.check(proc.wait(10) == 0, f"exit status {proc.returncode}")


S.step("qmp-quit", quit_)
S.finish()
