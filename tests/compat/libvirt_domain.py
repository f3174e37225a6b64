#!/usr/bin/env python3
"""libvirt 9.0's QEMU driver (Debian 12) driving an emulator given as <emulator>.

A private libvirtd is started for the run: root, in its own mount namespace
(`unshare -m`) with a temporary directory bind-mounted over /etc/libvirt, /run/libvirt and
/var/{lib,cache,log}/libvirt, so it touches nothing of the host's. Its qemu.conf runs
domains as root without a security driver, cgroups or namespaces (a container has none
to give). virsh talks to it through a socket in the temporary directory
(tests/compat/libvirt_daemon.py).

Steps: libvirt probes the emulator (`virsh domcapabilities --emulatorbin EMU --virttype
qemu --machine microvm`), then a type='qemu' microvm domain (direct kernel boot of the
Debian reference guest, serial to a file, ACPI) is defined, started, suspended, resumed,
queried with qemu-monitor-command and domstats, shut down (ACPI power button; the guest
powers off), started again and destroyed, and undefined; libvirt's idea of the state and
its reason is checked after each. A second serial port on a pty (with a log file) checks
that libvirt finds the terminal through query-chardev. The daemon's debug log (what libvirt sent the emulator) is
DIR/log/libvirtd.log; --keep keeps DIR.

Usage: python3 tests/compat/libvirt_domain.py --emulator PATH [--keep] [-v]
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compat_common as cc  # noqa: E402
import libvirt_daemon  # noqa: E402

S = cc.Scenario("libvirt_domain", __doc__, timeout=300)

DOM = "keel-compat"
L = libvirt_daemon.Libvirtd(S, DOM)
G = S.guest()
D = S.tmp
SERIAL = D / "serial.log"
PTY_LOG = D / "pty.log"
virsh, expect_state = L.virsh, L.expect_state

S.step("libvirtd-start", L.up)


def domcaps():
    out = virsh("domcapabilities", "--emulatorbin", S.emulator, "--virttype", "qemu",
                "--machine", "microvm", timeout=120)
    cc.check(f"<path>{S.emulator}</path>" in out, "domcapabilities: no <path> of the emulator")
    cc.check("<domain>qemu</domain>" in out, "domcapabilities: not <domain>qemu</domain>")
    cc.check("<machine>microvm</machine>" in out, "domcapabilities: not <machine>microvm</machine>")
    cc.check("<arch>x86_64</arch>" in out, "domcapabilities: not <arch>x86_64</arch>")


S.step("domcapabilities", domcaps)

XML = f"""<domain type='qemu'>
  <name>{DOM}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='microvm'>hvm</type>
    <kernel>{G.kernel}</kernel>
    <initrd>{G.initrd}</initrd>
    <cmdline>{G.append}</cmdline>
  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{S.emulator}</emulator>
    <serial type='file'><source path='{SERIAL}'/><target port='0'/></serial>
    <serial type='pty'><log file='{PTY_LOG}' append='on'/><target port='1'/></serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""
(D / "domain.xml").write_text(XML)


def define():
    virsh("define", str(D / "domain.xml"))
    expect_state("shut off", "unknown")


S.step("define", define)


def start():
    virsh("start", DOM, timeout=120)
    expect_state("running", "booted")


S.step("start", start)


def pty_serial():
    # libvirt learnt the second serial port's terminal from query-chardev.
    xml = virsh("dumpxml", DOM)
    m = re.search(r"<serial type='pty'>\s*<source path='(/dev/pts/\d+)'", xml)
    cc.check(m, f"no pty path in the live XML: {xml[:600]!r}")
    fd = os.open(m.group(1), os.O_RDWR | os.O_NOCTTY)
    try:
        cc.check(os.isatty(fd), f"{m.group(1)} is not a terminal")
    finally:
        os.close(fd)
    cc.check(PTY_LOG.exists(), "the pty's log file was not created")
    out = virsh("qemu-monitor-command", DOM, '{"execute":"query-chardev"}')
    cc.check(f"pty:{m.group(1)}" in out, f"query-chardev: {out.strip()[:300]}")


S.step("pty-serial", pty_serial)


def booted():
    cc.wait_for(lambda: cc.file_contains(SERIAL, cc.READY), 90, f"{cc.READY} in the serial file")


S.step("guest-boots", booted)


def suspend():
    virsh("suspend", DOM)
    expect_state("paused", "user")


S.step("suspend", suspend)


def resume():
    virsh("resume", DOM)
    expect_state("running", "unpaused")


S.step("resume", resume)


def monitor():
    out = virsh("qemu-monitor-command", DOM, '{"execute":"query-status"}')
    r = json.loads(out)
    cc.check(r.get("return", {}).get("status") == "running", f"query-status: {out.strip()}")
    out = virsh("qemu-monitor-command", DOM, "--hmp", "info status")
    cc.check("running" in out, f"HMP info status: {out.strip()}")


S.step("qemu-monitor-command", monitor)


def domstats():
    out = virsh("domstats", DOM)
    cc.check(re.search(r"^\s*state\.state=1$", out, re.M), f"domstats: no state.state=1 in {out[:300]!r}")
    cc.check(re.search(r"^\s*vcpu\.current=1$", out, re.M), f"domstats: no vcpu.current=1 in {out[:300]!r}")


S.step("domstats", domstats)


def shutdown():
    virsh("shutdown", DOM)
    expect_state("shut off", "shutdown", 60)
    cc.check(cc.file_contains(SERIAL, "KEEL-COMPAT-POWER-BUTTON"),
             "the guest never saw the power button")


S.step("shutdown", shutdown)


def destroy():
    virsh("start", DOM, timeout=120)
    expect_state("running", "booted")
    virsh("destroy", DOM)
    expect_state("shut off", "destroyed")


S.step("start-destroy", destroy)


def undefine():
    virsh("undefine", DOM)
    out = virsh("list", "--all", "--name")
    cc.check(DOM not in out.split(), f"still listed: {out}")


S.step("undefine", undefine)
S.finish()
