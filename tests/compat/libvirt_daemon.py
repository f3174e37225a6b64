"""A private libvirtd (libvirt 9.0's QEMU driver, Debian 12) for a compatibility scenario.

It runs as root in its own mount namespace (`unshare -m`) with the scenario's temporary
directory bind-mounted over /etc/libvirt, /run/libvirt and /var/{lib,cache,log}/libvirt,
so it touches nothing of the host's. Its qemu.conf runs domains as root without a security
driver, cgroups or namespaces (a container has none to give). virsh talks to it through a
socket in the temporary directory; its debug log (what libvirt sent the emulator) is
DIR/log/libvirtd.log.
"""

import grp
import os
import pwd
import shutil
import signal
import subprocess
from pathlib import Path

import compat_common as cc

LIBVIRTD = shutil.which("libvirtd") or "/usr/sbin/libvirtd"
QEMU_DRIVER = "/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so"
MOUNTS = {"etc": "/etc/libvirt", "run": "/run/libvirt", "lib": "/var/lib/libvirt",
          "cache": "/var/cache/libvirt", "log": "/var/log/libvirt"}


class Libvirtd:
    """The daemon of scenario `S`, whose domain is `dom`; skips the scenario where the
    daemon cannot run. Stopped (with any emulator it left running) when the scenario ends."""

    def __init__(self, S: cc.Scenario, dom: str):
        if os.geteuid() != 0:
            S.skip("needs root (a private system libvirtd in its own mount namespace)")
        for tool in ("virsh", "unshare", "mount"):
            if not shutil.which(tool):
                S.skip(f"{tool} not found (apt-get install libvirt-clients libvirt-daemon "
                       "libvirt-daemon-driver-qemu)")
        if not os.access(LIBVIRTD, os.X_OK) or not Path(QEMU_DRIVER).exists():
            S.skip("libvirtd or its QEMU driver is missing (apt-get install libvirt-daemon "
                   "libvirt-daemon-driver-qemu)")
        try:
            pwd.getpwnam("libvirt-qemu")
            grp.getgrnam("libvirt-qemu")
        except KeyError:
            S.skip("no libvirt-qemu user and group (bash tests/compat/setup.sh creates them)")
        self.S, self.dom = S, dom
        D = self.dir = S.tmp
        self.uri = f"qemu+unix:///system?socket={D}/libvirt-sock"
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
        binds = " && ".join(f"mount --bind '{D / d}' '{m}'" for d, m in MOUNTS.items())
        self.daemon = S.popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c",
             f"mkdir -p {' '.join(MOUNTS.values())} && {binds} && exec '{LIBVIRTD}' "
             f"--config '{D}/etc/libvirtd.conf' --pid-file '{D}/libvirtd.pid'"],
            stdin=subprocess.DEVNULL, stdout=open(D / "libvirtd.out", "w"),
            stderr=subprocess.STDOUT)
        S.at_exit(self._stop_domains)
        S.at_exit(self._stop_daemon)  # runs first (clean-ups run in reverse)

    def _stop_domains(self):
        # Emulators libvirt left running (the daemon does not stop them when it exits).
        for pidfile in (self.dir / "run/qemu").glob("*.pid"):
            try:
                os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
            except (ValueError, OSError):
                pass

    def _stop_daemon(self):
        if self.daemon.poll() is None:
            self.daemon.terminate()
            try:
                self.daemon.wait(10)
            except subprocess.TimeoutExpired:
                self.daemon.kill()

    def virsh(self, *args: str, timeout: float = 60, check: bool = True) -> str:
        """Runs virsh against the daemon; a failure (with `check`) fails the step."""
        cmd = ["virsh", "-q", "-c", self.uri, *args]
        self.S.log("$ " + " ".join(cmd))
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        self.S.log(r.stdout + r.stderr)
        if check and r.returncode != 0:
            err = " ".join(r.stderr.split()) or r.stdout.strip()
            raise cc.StepFailed(f"virsh {args[0]}: {err[:300]}{self.daemon_error()}")
        return r.stdout

    def daemon_error(self) -> str:
        """The last error libvirtd logged: the generic "cause is unknown" of virsh often
        hides the real message."""
        try:
            lines = (self.dir / "log/libvirtd.log").read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        errs = [l for l in lines if " : error : " in l]
        if not errs:
            return ""
        return "; libvirtd: " + errs[-1].split(" : error : ", 1)[1][:300]

    def state(self) -> str:
        return self.virsh("domstate", "--reason", self.dom).strip()

    def expect_state(self, want: str, reason: str, timeout: float = 10):
        """libvirt's state of the domain and its reason (`virsh domstate --reason`)."""
        full = f"{want} ({reason})"
        cc.wait_for(lambda: self.state() == full, timeout,
                    f"domstate '{full}' (now '{self.state()}')", 0.2)

    def up(self):
        """The `libvirtd-start` step: the socket appears and virsh gets an answer."""
        def ready():
            if self.daemon.poll() is not None:
                raise cc.StepFailed(f"libvirtd exited with {self.daemon.returncode}: "
                                    + (self.dir / "libvirtd.out").read_text()[-300:])
            return (self.dir / "libvirt-sock").exists()
        cc.wait_for(ready, 30, "libvirtd's socket")
        out = self.virsh("version")
        cc.check("QEMU" in out or "libvirt" in out.lower(), f"virsh version: {out}")
