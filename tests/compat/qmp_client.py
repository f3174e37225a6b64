#!/usr/bin/env python3
"""qemu.qmp's asyncio QMPClient (PyPI qemu.qmp) against an emulator, with events.

The emulator is started paused (-S) on the Debian reference guest with a QMP server
socket; the client connects, walks prelaunch → running → paused → running, and the guest
is powered off through the ACPI power button (system_powerdown), each transition checked
both by query-status and by the event the client receives.

Usage: python3 tests/compat/qmp_client.py --emulator PATH
"""

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compat_common as cc  # noqa: E402

cc.reexec_in_venv("qemu.qmp")

S = cc.Scenario("qmp_client", __doc__)
try:
    from qemu.qmp import EventListener, QMPClient
except ImportError:
    S.skip("Python package qemu.qmp is missing (bash tests/compat/setup.sh installs it)")
G = S.guest()


async def main() -> None:
    sock = S.tmp / "qmp.sock"
    serial = S.tmp / "serial.log"
    argv = [S.emulator, "-M", "microvm", "-accel", "tcg", "-m", "256M", "-nodefaults",
            "-no-user-config", "-display", "none", "-S",
            "-qmp", f"unix:{sock},server=on,wait=off", "-serial", f"file:{serial}"] + G.args()
    proc = S.popen(argv, stdin=cc.subprocess.DEVNULL, stdout=cc.subprocess.DEVNULL,
                   stderr=open(S.tmp / "emulator.err", "w"))

    def launched():
        cc.wait_for(lambda: sock.exists() or proc.poll() is not None, 20, "the QMP socket")
        cc.check(proc.poll() is None, f"the emulator exited with {proc.returncode}: "
                 + (S.tmp / "emulator.err").read_text()[-300:])
    S.step("launch", launched)

    qmp = QMPClient("compat")
    listener = EventListener()
    qmp.register_listener(listener)

    async def next_event(name: str, timeout: float = 20):
        async def get():
            while True:
                ev = await listener.get()
                S.log(f"event {ev['event']}")
                if ev["event"] == name:
                    return ev
        return await asyncio.wait_for(get(), timeout)

    async def connect():
        await asyncio.wait_for(qmp.connect(str(sock)), 10)
        g = qmp.greeting
        cc.check(g is not None, "no greeting")
        v = g.QMP.version["qemu"]
        cc.check(isinstance(v.get("major"), int), f"greeting version: {g}")
    await S.astep("connect-negotiate", connect)

    async def status(want: str):
        r = await qmp.execute("query-status")
        cc.check(r.get("status") == want, f"query-status: {r} (wanted {want})")
        cc.check(r.get("running") == (want == "running"), f"query-status running: {r}")

    await S.astep("query-status-prelaunch", lambda: status("prelaunch"))

    async def version():
        r = await qmp.execute("query-version")
        cc.check(isinstance(r["qemu"]["major"], int) and "package" in r, f"query-version: {r}")
        names = {c["name"] for c in await qmp.execute("query-commands")}
        for n in ("cont", "stop", "system_powerdown", "query-status", "quit"):
            cc.check(n in names, f"query-commands lacks {n}")
    await S.astep("query-version-commands", version)

    async def cont():
        await qmp.execute("cont")
        await next_event("RESUME")
        await status("running")
    await S.astep("cont-RESUME", cont)

    async def stop():
        await qmp.execute("stop")
        await next_event("STOP")
        await status("paused")
    await S.astep("stop-STOP", stop)

    async def cont2():
        await qmp.execute("cont")
        await next_event("RESUME")
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: cc.wait_for(lambda: cc.file_contains(serial, cc.READY), 90,
                                      f"{cc.READY} on the serial port"))
    await S.astep("guest-boots", cont2)

    async def unknown():
        try:
            await qmp.execute("no-such-command")
        except Exception as e:  # noqa: BLE001 - ExecuteError
            cc.check(type(e).__name__ == "ExecuteError", f"{type(e).__name__}: {e}")
            cc.check(e.error.error.class_ == "CommandNotFound", f"error class {e.error.error.class_}")
            return
        raise cc.StepFailed("no error for an unknown command")
    await S.astep("error-CommandNotFound", unknown)

    async def powerdown():
        await qmp.execute("system_powerdown")
        await next_event("POWERDOWN")
        ev = await next_event("SHUTDOWN", 60)
        cc.check(ev["data"].get("guest") is True, f"SHUTDOWN data: {ev['data']}")
    await S.astep("system_powerdown-SHUTDOWN", powerdown)

    async def exited():
        try:
            await qmp.disconnect()
        except (EOFError, ConnectionResetError):
            pass  # the emulator closed the socket as it exited
        rc = await asyncio.get_running_loop().run_in_executor(None, lambda: proc.wait(20))
        cc.check(rc == 0, f"exit status {rc}")
    await S.astep("emulator-exits-0", exited)


asyncio.run(main())
S.finish()
