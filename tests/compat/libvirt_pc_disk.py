#!/usr/bin/env python3
"""libvirt 9.0's QEMU driver hot plugging a virtio disk into a `pc` domain of an emulator
given as <emulator> (issue #12's PCI half).

A private libvirtd runs as in libvirt_domain.py (root, its own mount namespace, a
temporary /etc/libvirt, /run/libvirt, /var/{lib,cache,log}/libvirt).

Steps: a type='qemu' `pc` domain (direct kernel boot of the Debian reference guest, ACPI,
serial to a file) is defined and started; its guest loads its virtio drivers and reports
its virtio disks on the console (`KEEL-COMPAT-DISKS [...]`, from /sys/block). Then
`virsh attach-device --live` of a raw file as a virtio disk (libvirt: `blockdev-add`, then
`device_add` of a virtio-blk-pci): libvirt's live XML has it and the guest sees `vda`;
`virsh detach-device --live` (libvirt: `device_del`, waits for `DEVICE_DELETED`, then
`blockdev-del`): the guest ejects it, libvirt's live XML no longer has it and the node is
gone from `query-named-block-nodes`; the domain is destroyed and undefined. The daemon's
debug log (what libvirt sent the emulator) is DIR/log/libvirtd.log; --keep keeps DIR.

Usage: python3 tests/compat/libvirt_pc_disk.py --emulator PATH [--keep] [-v]
"""

import json
import os
import pwd
import grp
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compat_common as cc  # noqa: E402

S = cc.Scenario("libvirt_pc_disk", __doc__, timeout=300)

LIBVIRTD = shutil.which("libvirtd") or "/usr/sbin/libvirtd"
if os.geteuid() != 0:
    S.skip("needs root (a private system libvirtd in its own mount namespace)")
for tool in ("virsh", "unshare", "mount"):
    if not shutil.which(tool):
        S.skip(f"{tool} not found (apt-get install libvirt-clients libvirt-daemon "
               "libvirt-daemon-driver-qemu)")
if not os.access(LIBVIRTD, os.X_OK) or not Path("/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so").exists():
    S.skip("libvirtd or its QEMU driver is missing (apt-get install libvirt-daemon libvirt-daemon-driver-qemu)")
try:
    pwd.getpwnam("libvirt-qemu")
    grp.getgrnam("libvirt-qemu")
except KeyError:
    S.skip("no libvirt-qemu user and group (bash tests/compat/setup.sh creates them)")
G = S.guest(virtio=True)

D = S.tmp
DOM = "keel-compat-pc"
SERIAL = D / "serial.log"
URI = f"qemu+unix:///system?socket={D}/libvirt-sock"
MOUNTS = {"etc": "/etc/libvirt", "run": "/run/libvirt", "lib": "/var/lib/libvirt",
          "cache": "/var/cache/libvirt", "log": "/var/log/libvirt"}
for d in MOUNTS:
    (D / d).mkdir()
(D / "etc/libvirtd.conf").write_text(f"""
unix_sock_dir = "{D}"
unix_sock_group = "root"
unix_sock_rw_perms = "0770"
auth_unix_rw = "none"
log_filters = "1:qemu 1:util.command 3:util 3:rpc 3:event"
log_outputs = "1:file:{D}/log/libvirtd.log"
""")
(D / "etc/qemu.conf").write_text("""
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
""")


def virsh(*args: str, timeout: float = 60, check: bool = True) -> str:
    cmd = ["virsh", "-q", "-c", URI, *args]
    S.log("$ " + " ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    S.log(r.stdout + r.stderr)
    if check and r.returncode != 0:
        err = " ".join(r.stderr.split()) or r.stdout.strip()
        raise cc.StepFailed(f"virsh {args[0]}: {err[:300]}{daemon_error()}")
    return r.stdout


def daemon_error() -> str:
    """The last error libvirtd logged: the generic "cause is unknown" of virsh often hides
    the real message."""
    try:
        lines = (D / "log/libvirtd.log").read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return ""
    errs = [l for l in lines if " : error : " in l]
    if not errs:
        return ""
    return "; libvirtd: " + errs[-1].split(" : error : ", 1)[1][:300]


def state() -> str:
    return virsh("domstate", "--reason", DOM).strip()


def expect_state(want: str, reason: str, timeout: float = 10):
    """libvirt's state of the domain and its reason (`virsh domstate --reason`)."""
    full = f"{want} ({reason})"
    cc.wait_for(lambda: state() == full, timeout, f"domstate '{full}' (now '{state()}')", 0.2)


# --- the daemon ---------------------------------------------------------------------------

binds = " && ".join(f"mount --bind '{D / d}' '{m}'" for d, m in MOUNTS.items())
daemon = S.popen(
    ["unshare", "-m", "--propagation", "private", "sh", "-c",
     f"mkdir -p {' '.join(MOUNTS.values())} && {binds} && exec '{LIBVIRTD}' "
     f"--config '{D}/etc/libvirtd.conf' --pid-file '{D}/libvirtd.pid'"],
    stdin=subprocess.DEVNULL, stdout=open(D / "libvirtd.out", "w"), stderr=subprocess.STDOUT)


def stop_domains():
    # Emulators libvirt left running (the daemon does not stop them when it exits).
    for pidfile in (D / "run/qemu").glob("*.pid"):
        try:
            os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
        except (ValueError, OSError):
            pass


def stop_daemon():
    if daemon.poll() is None:
        daemon.terminate()
        try:
            daemon.wait(10)
        except subprocess.TimeoutExpired:
            daemon.kill()


S.at_exit(stop_domains)
S.at_exit(stop_daemon)  # runs first (clean-ups run in reverse)


def daemon_up():
    def up():
        if daemon.poll() is not None:
            raise cc.StepFailed(f"libvirtd exited with {daemon.returncode}: "
                                + (D / "libvirtd.out").read_text()[-300:])
        return (D / "libvirt-sock").exists()
    cc.wait_for(up, 30, "libvirtd's socket")
    out = virsh("version")
    cc.check("QEMU" in out or "libvirt" in out.lower(), f"virsh version: {out}")


S.step("libvirtd-start", daemon_up)


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
    virsh("undefine", DOM)


S.step("destroy-undefine", destroy)
S.finish()
