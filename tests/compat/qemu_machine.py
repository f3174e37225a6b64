#!/usr/bin/env python3
"""QEMU's own Python QEMUMachine (python/qemu/machine from QEMU's source tree) against an
emulator, in both of its monitor forms:

* path: QEMUMachine(monitor_address=PATH) listens on PATH and the emulator connects to it
  (`-chardev socket,id=mon,path=PATH -mon chardev=mon,mode=control`); ended with `quit`
  through vm.shutdown().
* fd: QEMUMachine() makes a socketpair and the emulator inherits one end
  (`-chardev socket,id=mon,fd=N`); ended by the guest powering off on system_powerdown.

Neither PyPI nor Debian has a package carrying qemu.machine; tests/compat/setup.sh
unpacks it from Debian's source package of QEMU into ~/.cache/keel-compat/qemu-python.

Usage: python3 tests/compat/qemu_machine.py --emulator PATH
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compat_common as cc  # noqa: E402

cc.reexec_in_venv("qemu.qmp")

S = cc.Scenario("qemu_machine", __doc__)
tree = cc.qemu_python_tree()
if tree is None:
    S.skip("QEMU's python/qemu/machine is not unpacked (bash tests/compat/setup.sh fetches it "
           "from Debian's QEMU source package)")
sys.path.insert(0, str(tree))
try:
    from qemu.machine import QEMUMachine
except ImportError as e:
    S.skip(f"cannot import qemu.machine from {tree}: {e}")
import inspect  # noqa: E402

HAS_FD_FORM = "_sock_pair" in inspect.getsource(QEMUMachine)
G = S.guest()
print(f"qemu.machine from {(tree / 'SOURCE').read_text().strip() if (tree / 'SOURCE').exists() else tree}")


def run_form(form: str) -> None:
    serial = S.tmp / f"serial-{form}.log"
    args = ["-M", "microvm", "-accel", "tcg", "-m", "256M", "-nodefaults", "-no-user-config",
            "-serial", f"file:{serial}"] + G.args()
    kw = {"monitor_address": str(S.tmp / f"mon-{form}.sock")} if form == "path" else {}
    vm = QEMUMachine(S.emulator, args=args, base_temp_dir=str(S.tmp), name=f"compat-{form}",
                     log_dir=str(S.tmp), qmp_timer=20, **kw)

    def cleanup():
        if vm.is_running():
            vm.kill()
    S.at_exit(cleanup)

    def launch():
        try:
            vm.launch()
            S.log("launched: " + " ".join(vm._qemu_full_args))
        except Exception as e:
            out = (getattr(e, "output", None) or vm.get_log() or "").strip()
            cause = getattr(e, "__cause__", None) or getattr(e, "exc", None)
            raise cc.StepFailed(f"{type(e).__name__} (exit code {getattr(e, 'exitcode', None)}, "
                                f"{type(cause).__name__}: {cause}): emulator said {out[-300:]!r}")
        cc.check(vm.is_running(), "not running after launch")
    S.step(f"{form}-launch", launch)

    def status_running():
        r = vm.qmp("query-status")
        cc.check(r.get("return", {}).get("status") == "running", f"query-status: {r}")
    S.step(f"{form}-query-status", status_running)

    def stop_cont():
        vm.cmd("stop")
        vm.event_wait("STOP", timeout=10)
        cc.check(vm.cmd("query-status")["status"] == "paused", "not paused after stop")
        vm.cmd("cont")
        vm.event_wait("RESUME", timeout=10)
        cc.check(vm.cmd("query-status")["status"] == "running", "not running after cont")
    S.step(f"{form}-stop-cont-events", stop_cont)

    def booted():
        cc.wait_for(lambda: cc.file_contains(serial, cc.READY), 90, f"{cc.READY} on the serial port")
    S.step(f"{form}-guest-boots", booted)

    if form == "path":
        def shutdown():
            vm.shutdown(timeout=20)
            cc.check(vm.exitcode() == 0, f"exit code {vm.exitcode()}")
        S.step(f"{form}-shutdown-quit", shutdown)
    else:
        def powerdown():
            vm.cmd("system_powerdown")
            ev = vm.event_wait("SHUTDOWN", timeout=60)
            cc.check(ev and ev["data"].get("guest") is True, f"SHUTDOWN: {ev}")
            vm.wait(timeout=20)
            cc.check(vm.exitcode() == 0, f"exit code {vm.exitcode()}")
        S.step(f"{form}-powerdown-exit", powerdown)


run_form("path")
if HAS_FD_FORM:
    run_form("fd")
else:
    print("note: this QEMUMachine predates the socketpair (fd) monitor form; only the path form ran")
S.finish()
