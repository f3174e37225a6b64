#!/usr/bin/env python3
"""libvirt 9.0's `virsh save` / `virsh restore` and `virsh managedsave` / `virsh start`
driving an emulator given as <emulator>.

The private libvirtd of tests/compat/libvirt_daemon.py (see libvirt_domain.py) runs a
type='qemu' microvm domain (direct kernel boot of the Debian reference guest, serial to a
file, ACPI). Once the guest is up it is saved to a file (`virsh save`: libvirt pauses it,
migrates it to `fd:` through its iohelper and ends the emulator), restored into a new
emulator (`virsh restore`: `-incoming defer` and `migrate-incoming`), saved again with
`virsh managedsave` and brought back with `virsh start`. The restored guest must go on
where it was: it answers the ACPI power button (`virsh shutdown`) by printing
KEEL-COMPAT-POWER-BUTTON on its serial port and powering off. libvirt's idea of the state
and its reason is checked after each step. The daemon's debug log is DIR/log/libvirtd.log;
--keep keeps DIR.

Usage: python3 tests/compat/libvirt_save.py --emulator PATH [--keep] [-v]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compat_common as cc  # noqa: E402
import libvirt_daemon  # noqa: E402

S = cc.Scenario("libvirt_save", __doc__, timeout=300)

DOM = "keel-compat-save"
L = libvirt_daemon.Libvirtd(S, DOM)
G = S.guest()
D = S.tmp
SERIAL = D / "serial.log"
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


def booted():
    cc.wait_for(lambda: cc.file_contains(SERIAL, cc.READY), 90, f"{cc.READY} in the serial file")


S.step("guest-boots", booted)


SAVED = D / "saved.img"


def save():
    virsh("save", DOM, str(SAVED), timeout=120)
    expect_state("shut off", "saved")
    cc.check(SAVED.exists() and SAVED.stat().st_size > 4096, "no saved image")


S.step("save", save)


def restore():
    virsh("restore", str(SAVED), timeout=120)
    expect_state("running", "restored", 30)


S.step("restore", restore)


def managedsave():
    virsh("managedsave", DOM, timeout=120)
    expect_state("shut off", "saved")
    virsh("start", DOM, timeout=120)
    expect_state("running", "restored", 30)


S.step("managedsave-start", managedsave)


def continues():
    # The guest restored twice still waits for the power button it armed at boot.
    virsh("shutdown", DOM)
    expect_state("shut off", "shutdown", 60)
    cc.check(cc.file_contains(SERIAL, "KEEL-COMPAT-POWER-BUTTON"),
             "the restored guest never saw the power button")


S.step("restored-guest-continues", continues)


def undefine():
    virsh("undefine", DOM, "--managed-save")
    out = virsh("list", "--all", "--name")
    cc.check(DOM not in out.split(), f"still listed: {out}")


S.step("undefine", undefine)
S.finish()
