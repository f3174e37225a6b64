#!/usr/bin/env python3
"""libvirt 9.0's QEMU driver hot plugging a virtio disk into a `pc` domain of an emulator
given as <emulator> (issue #12's PCI half).

A private libvirtd runs as tests/compat/libvirt_daemon.py describes (root, its own mount
namespace, a temporary /etc/libvirt, /run/libvirt, /var/{lib,cache,log}/libvirt).

Steps: a type='qemu' `pc` domain (direct kernel boot of the Debian reference guest, ACPI,
serial to a file) is defined and started; its guest loads its virtio drivers and reports
its virtio disks on the console (`KEEL-COMPAT-DISKS [...]`, from /sys/block). Then
`virsh attach-device --live` of a raw file as a virtio disk (libvirt: `blockdev-add`, then
`device_add` of a virtio-blk-pci): libvirt's live XML has it and the guest sees `vda`;
`virsh detach-device --live` (libvirt: `device_del`, waits for `DEVICE_DELETED`, then
`blockdev-del`): the guest ejects it, libvirt's live XML no longer has it and the node is
gone from `query-named-block-nodes`; the domain is destroyed. Then the disk goes into the
domain's definition (`attach-device --config`) and the domain starts with it on its
command line (libvirt's `-blockdev` pair and `-device virtio-blk-pci,...`): the guest has
`vda` from boot; the domain is destroyed and undefined. The daemon's
debug log (what libvirt sent the emulator) is DIR/log/libvirtd.log; --keep keeps DIR.

Usage: python3 tests/compat/libvirt_pc_disk.py --emulator PATH [--keep] [-v]
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

S = cc.Scenario("libvirt_pc_disk", __doc__, timeout=300)

DOM = "keel-compat-pc"
L = libvirt_daemon.Libvirtd(S, DOM)
G = S.guest(virtio=True)
D = S.tmp
SERIAL = D / "serial.log"
virsh, expect_state = L.virsh, L.expect_state

S.step("libvirtd-start", L.up)


def domcaps():
    out = virsh("domcapabilities", "--emulatorbin", S.emulator, "--virttype", "qemu",
                "--machine", "pc", timeout=120)
    cc.check(f"<path>{S.emulator}</path>" in out, "domcapabilities: no <path> of the emulator")
    cc.check(re.search(r"<machine>pc(-i440fx-[0-9.]+)?</machine>", out),
             "domcapabilities: not <machine>pc</machine>")


S.step("domcapabilities", domcaps)

XML = f"""<domain type='qemu'>
  <name>{DOM}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{G.kernel}</kernel>
    <initrd>{G.initrd}</initrd>
    <cmdline>{G.append} keel.compat.disks</cmdline>
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
DISK = D / "disk.raw"
with open(DISK, "wb") as f:
    f.truncate(4 << 20)
os.chmod(DISK, 0o666)
(D / "disk.xml").write_text(f"""<disk type='file' device='disk'>
  <driver name='qemu' type='raw'/>
  <source file='{DISK}'/>
  <target dev='vda' bus='virtio'/>
</disk>
""")


def define():
    virsh("define", str(D / "domain.xml"))
    expect_state("shut off", "unknown")


S.step("define", define)


def start():
    virsh("start", DOM, timeout=120)
    expect_state("running", "booted")


S.step("start", start)


def disks_line() -> str:
    """The guest's last report of its virtio disks ('' before the first)."""
    try:
        text = SERIAL.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    found = re.findall(r"KEEL-COMPAT-DISKS \[([^\]]*)\]", text)
    return found[-1].strip() if found else ""


def booted():
    cc.wait_for(lambda: cc.file_contains(SERIAL, cc.READY), 120, f"{cc.READY} in the serial file")
    cc.wait_for(lambda: "KEEL-COMPAT-DISKS" in SERIAL.read_text(errors="replace"), 30,
                "the guest's first disk report")
    cc.check(disks_line() == "", f"the guest has virtio disks before the hot plug: {disks_line()}")


S.step("guest-boots", booted)


def named_nodes() -> list:
    out = virsh("qemu-monitor-command", DOM, '{"execute":"query-named-block-nodes"}')
    return [n.get("file") for n in json.loads(out).get("return", [])]


def sent(command: str) -> list:
    """The arguments of every `command` libvirt sent the emulator (from its debug log)."""
    out = []
    log = (D / "log/libvirtd.log").read_text(errors="replace")
    for m in re.finditer(r"QEMU_MONITOR_IO_WRITE: mon=\S+ buf=(\{.*\})\s*$", log, re.M):
        try:
            msg = json.loads(m.group(1))
        except ValueError:
            continue
        if msg.get("execute") == command:
            out.append(msg.get("arguments", {}))
    return out


def attach():
    virsh("attach-device", DOM, str(D / "disk.xml"), "--live", timeout=120)
    xml = virsh("dumpxml", DOM)
    cc.check(re.search(r"<target dev='vda' bus='virtio'/>", xml), "the live XML has no vda")
    cc.check(str(DISK) in named_nodes(), "query-named-block-nodes has no node of the file")
    adds = sent("device_add")
    cc.check(adds and adds[-1].get("driver") == "virtio-blk-pci",
             f"libvirt did not add a virtio-blk-pci: {adds}")
    cc.check(sent("blockdev-add"), "libvirt sent no blockdev-add")


S.step("attach-device", attach)


def guest_sees():
    cc.wait_for(lambda: disks_line() == "vda", 60, f"the guest's vda (now [{disks_line()}])", 0.5)


S.step("guest-sees-disk", guest_sees)


def detach():
    virsh("detach-device", DOM, str(D / "disk.xml"), "--live", timeout=120)
    # libvirt returns once DEVICE_DELETED came (or after its 5 s wait, with the removal
    # still pending): the live XML loses the disk when the event comes.
    cc.wait_for(lambda: "<target dev='vda'" not in virsh("dumpxml", DOM), 60,
                "the disk gone from libvirt's live XML", 0.5)
    cc.wait_for(lambda: str(DISK) not in named_nodes(), 30,
                "the node gone from query-named-block-nodes", 0.5)
    dels = sent("device_del")
    cc.check(dels and dels[-1].get("id") == adds_id(), f"libvirt's device_del: {dels}")
    deleted = [a.get("node-name") for a in sent("blockdev-del")]
    added = [a.get("node-name") for a in sent("blockdev-add")]
    cc.check(sorted(deleted) == sorted(added),
             f"blockdev-del of {deleted}, blockdev-add of {added}")


def adds_id() -> str:
    return sent("device_add")[-1].get("id", "")


S.step("detach-device", detach)


def guest_lost():
    cc.wait_for(lambda: disks_line() == "", 60, f"the guest without vda (now [{disks_line()}])", 0.5)


S.step("guest-loses-disk", guest_lost)


def destroy():
    virsh("destroy", DOM)
    expect_state("shut off", "destroyed")


S.step("destroy", destroy)


def attach_config():
    virsh("attach-device", DOM, str(D / "disk.xml"), "--config", timeout=60)
    cc.check("<target dev='vda' bus='virtio'/>" in virsh("dumpxml", "--inactive", DOM),
             "the persistent XML has no vda")


S.step("attach-device-config", attach_config)


def start_with_disk():
    virsh("start", DOM, timeout=120)
    expect_state("running", "booted")
    # The disk is on the command line now (cold plug): no device_add after the start.
    adds = len(sent("device_add"))
    cc.wait_for(lambda: disks_line() == "vda", 120,
                f"the guest's vda from boot (now [{disks_line()}])", 0.5)
    cc.check(len(sent("device_add")) == adds, "libvirt hot plugged the disk of the definition")
    cc.check(str(DISK) in named_nodes(), "query-named-block-nodes has no node of the file")


S.step("start-with-disk", start_with_disk)


def destroy_undefine():
    virsh("destroy", DOM)
    expect_state("shut off", "destroyed")
    virsh("undefine", DOM)


S.step("destroy-undefine", destroy_undefine)
S.finish()
