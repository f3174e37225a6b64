"""Shared support for the compatibility scenarios in tests/compat/.

Each scenario is a script run as `python3 tests/compat/NAME.py --emulator PATH`. It runs
named steps in order and prints one line per step:

    STEP <name> ok
    STEP <name> FAIL: <error>

and ends with `RESULT pass` (exit 0), `RESULT fail` (exit 1) or `RESULT skip: <reason>`
(exit 77, only when a client or the guest cannot be found). A failing step stops the
scenario unless it was declared independent (`fatal=False`); tests/compat.rs reads these
lines and compares the failing steps with its list of known gaps.
"""

from __future__ import annotations

import argparse
import atexit
import gzip
import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

SKIP = 77
HERE = Path(__file__).resolve().parent


def cache_root() -> Path:
    """Where tests/compat/setup.sh puts the venv and QEMU's Python tree."""
    env = os.environ.get("KEEL_COMPAT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "keel-compat"


def venv_python() -> Path:
    return cache_root() / "venv" / "bin" / "python3"


def qemu_python_tree() -> Optional[Path]:
    """QEMU's own python/ directory (qemu.machine), unpacked by setup.sh from Debian's
    source package of QEMU."""
    env = os.environ.get("KEEL_COMPAT_QEMU_PYTHON")
    p = Path(env) if env else cache_root() / "qemu-python"
    return p if (p / "qemu" / "machine" / "machine.py").exists() else None


def reexec_in_venv(module: str) -> None:
    """If `module` is not importable here but the setup.sh venv exists, run this script
    again with the venv's interpreter (so a scenario works standalone with any python3)."""
    try:
        __import__(module)
        return
    except ImportError:
        pass
    vp = venv_python()
    if vp.exists() and Path(sys.prefix) != vp.parent.parent and not os.environ.get(
        "KEEL_COMPAT_REEXEC"
    ):
        os.environ["KEEL_COMPAT_REEXEC"] = "1"
        os.execv(str(vp), [str(vp)] + sys.argv)


class StepFailed(Exception):
    pass


def check(cond: Any, msg: str) -> None:
    if not cond:
        raise StepFailed(msg)


class Scenario:
    """Argument parsing, step bookkeeping and clean-up for one scenario."""

    def __init__(self, name: str, doc: str, timeout: int = 180):
        ap = argparse.ArgumentParser(prog=name, description=doc)
        ap.add_argument("--emulator", required=True, help="qemu-system-x86_64 or Keel's vmm")
        ap.add_argument("--guest", default=None, help="guest directory (default: the "
                        "scripts/build-guest.sh cache, ~/.cache/keel-guest/current)")
        ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
        ap.add_argument("-v", "--verbose", action="store_true")
        self.args = ap.parse_args()
        self.name = name
        self.failed: list[str] = []
        self.cleanups: list[Callable[[], None]] = []
        self.tmp = Path(tempfile.mkdtemp(prefix=f"keel-compat-{name}-"))
        emu = shutil.which(self.args.emulator) or self.args.emulator
        self.emulator = os.path.abspath(emu)
        if not os.access(self.emulator, os.X_OK):
            self.skip(f"emulator {self.args.emulator} not found")
        signal.signal(signal.SIGALRM, self._timeout)
        signal.alarm(timeout)
        self.current = "start"
        # Clean up (kill what the scenario started) however the script ends.
        atexit.register(self._cleanup)
        print(f"scenario {name}: emulator {self.emulator}", flush=True)

    def _timeout(self, *_: Any) -> None:
        raise StepFailed(f"scenario timed out during step {self.current}")

    def log(self, msg: str) -> None:
        if self.args.verbose:
            print(f"  {msg}", flush=True)

    def at_exit(self, fn: Callable[[], None]) -> None:
        self.cleanups.append(fn)

    def _cleanup(self) -> None:
        signal.alarm(0)
        for fn in reversed(self.cleanups):
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - clean-up must go on
                print(f"  clean-up: {e}", flush=True)
        self.cleanups.clear()
        if not self.args.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)
        elif self.tmp.exists() and not getattr(self, "_kept", False):
            self._kept = True
            print(f"kept {self.tmp}")

    def skip(self, reason: str) -> None:
        print(f"RESULT skip: {reason}", flush=True)
        try:
            self._cleanup()
        finally:
            sys.exit(SKIP)

    def step(self, name: str, fn: Callable[[], Any], fatal: bool = True) -> Any:
        self.current = name
        try:
            r = fn()
        except Exception as e:  # noqa: BLE001 - every error is a step failure
            return self._failed(name, e, fatal)
        print(f"STEP {name} ok", flush=True)
        return r

    async def astep(self, name: str, fn: Callable[[], Any], fatal: bool = True) -> Any:
        """`step` for a coroutine function."""
        self.current = name
        try:
            r = await fn()
        except Exception as e:  # noqa: BLE001
            return self._failed(name, e, fatal)
        print(f"STEP {name} ok", flush=True)
        return r

    def _failed(self, name: str, e: BaseException, fatal: bool) -> None:
        msg = " ".join(f"{type(e).__name__}: {e}".split())[:400]
        if self.args.verbose and not isinstance(e, StepFailed):
            traceback.print_exc()
        print(f"STEP {name} FAIL: {msg}", flush=True)
        self.failed.append(name)
        if fatal:
            self.finish()

    def finish(self) -> None:
        self._cleanup()
        if self.failed:
            print("RESULT fail", flush=True)
            sys.exit(1)
        print("RESULT pass", flush=True)
        sys.exit(0)

    # --- the guest ---------------------------------------------------------------------

    def guest(self, virtio: bool = False) -> "Guest":
        """The reference guest; `virtio` builds on its initramfs with the virtio modules."""
        d = Path(self.args.guest) if self.args.guest else Path.home() / ".cache/keel-guest/current"
        base = "initramfs-virtio.cpio.gz" if virtio else "initramfs.cpio.gz"
        if not (d / "bzImage").exists() or not (d / base).exists():
            self.skip(f"no guest in {d} (build it with: bash scripts/build-guest.sh)")
        try:
            return Guest(d, base)
        except Exception as e:  # noqa: BLE001
            self.skip(f"cannot prepare the guest from {d}: {e}")
            raise

    # --- processes ---------------------------------------------------------------------

    def popen(self, argv: list[str], **kw: Any) -> subprocess.Popen:
        self.log("$ " + " ".join(argv))
        p = subprocess.Popen(argv, **kw)

        def stop() -> None:
            if p.poll() is None:
                p.kill()
            p.wait()

        self.at_exit(stop)
        return p


# --- a guest that stays up until the ACPI power button ---------------------------------

GUEST_INIT = """#!/bin/sh
# Keel compatibility guest: stays up until the ACPI power button, then powers off.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
insmod /lib/compat/evdev.ko
insmod /lib/compat/button.ko
# keel.compat.disks: load the virtio drivers of the base archive (initramfs-virtio) and report the guest's virtio
# disks on the console whenever the set changes (hot plug scenarios).
if grep -q keel.compat.disks /proc/cmdline; then
  while read -r m; do insmod "/lib/modules/$m.ko"; done < /lib/modules/load-order
  ( prev=none
    while :; do
      cur=$(cd /sys/block && ls -d vd* 2>/dev/null | tr '\n' ' ')
      [ "$cur" != "$prev" ] && echo "KEEL-COMPAT-DISKS [$cur]"
      prev=$cur
      sleep 0.5
    done ) &
fi
n=0
for d in /sys/class/input/event*; do
  [ -e "$d/device/name" ] || continue
  if [ "$(cat "$d/device/name")" = "Power Button" ]; then
    ev="/dev/input/${d##*/}"
    ( dd if="$ev" of=/dev/null bs=24 count=1 2>/dev/null; : > /pressed ) &
    # Ready only once the reader has the device open: evdev drops events nobody reads,
    # and a loaded host may run the VMM's power button before dd opens it.
    i=0
    while [ $i -lt 100 ]; do
      open=0
      for f in /proc/[0-9]*/fd/*; do
        [ "$(readlink "$f" 2>/dev/null)" = "$ev" ] && open=1
      done
      [ $open = 1 ] && break
      sleep 0.1
      i=$((i + 1))
    done
    n=$((n + 1))
  fi
done
echo "KEEL-COMPAT-READY power-buttons=$n"
while [ ! -e /pressed ]; do sleep 1; done
echo "KEEL-COMPAT-POWER-BUTTON"
sync
poweroff -f
while :; do sleep 1; done
"""

READY = "KEEL-COMPAT-READY"


def _newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A cpio archive in the kernel's "newc" format: (name, mode, data) entries."""
    out = io.BytesIO()

    def pad(n: int) -> None:
        out.write(b"\0" * ((4 - n % 4) % 4))

    for ino, (name, mode, data) in enumerate(entries + [("TRAILER!!!", 0, b"")], start=1):
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(
            f"{v:08X}"
            for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0)
        )
        out.write(hdr.encode() + nb)
        pad(110 + len(nb))
        out.write(data)
        pad(len(data))
    return out.getvalue()


class Guest:
    """The Debian reference guest (scripts/build-guest.sh) with an initramfs overlay whose
    /init waits for the ACPI power button: the kernel unpacks concatenated archives in
    order, so the overlay's /init and the two modules it needs (evdev, button; the
    kernel builds them as modules) replace or add to the base archive's files."""

    def __init__(self, d: Path, base_name: str = "initramfs.cpio.gz"):
        self.dir = d
        self.kernel = d / "bzImage"
        base = d / base_name
        manifest = (d / "manifest").read_text() if (d / "manifest").exists() else ""
        release = next((l.split("=", 1)[1] for l in manifest.splitlines()
                        if l.startswith("kernel_release=")), None)
        key = hashlib.sha256(base.read_bytes() + GUEST_INIT.encode() + manifest.encode())
        out = cache_root() / "guest" / f"initramfs-compat-{key.hexdigest()[:16]}.cpio.gz"
        if not out.exists():
            debs = sorted((d.parent / "debs").glob(f"linux-image-{release}_*.deb")) if release else []
            if not debs:
                raise RuntimeError(f"the kernel package of {release} is not in {d.parent / 'debs'}")
            mods = {}
            with tempfile.TemporaryDirectory() as t:
                tar = subprocess.run(
                    f"dpkg-deb --fsys-tarfile '{debs[-1]}' | tar -x -C '{t}' --wildcards "
                    "'*/kernel/drivers/acpi/button.ko' '*/kernel/drivers/input/evdev.ko'",
                    shell=True, capture_output=True, text=True)
                if tar.returncode != 0:
                    raise RuntimeError(f"extracting modules: {tar.stderr.strip()}")
                for m in ("button", "evdev"):
                    found = list(Path(t).rglob(f"{m}.ko"))
                    if not found:
                        raise RuntimeError(f"{m}.ko not in {debs[-1]}")
                    mods[m] = found[0].read_bytes()
            overlay = _newc([
                ("init", 0o100755, GUEST_INIT.encode()),
                ("lib", 0o40755, b""),
                ("lib/compat", 0o40755, b""),
                ("lib/compat/button.ko", 0o100644, mods["button"]),
                ("lib/compat/evdev.ko", 0o100644, mods["evdev"]),
            ])
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(base.read_bytes() + gzip.compress(overlay, mtime=0))
            os.replace(tmp, out)
        self.initrd = out
        # QEMU's TCG TSC runs at the host's rate and microvm has no HPET or PM timer:
        # on a loaded host the kernel's PIT calibration can fail and the boot hangs, so
        # the rate is given (as scripts/bench-boot.py does).
        self.append = "console=ttyS0 reboot=t panic=-1 quiet"
        khz = host_tsc_khz()
        if khz:
            self.append += f" tsc_early_khz={khz}"

    def args(self) -> list[str]:
        return ["-kernel", str(self.kernel), "-initrd", str(self.initrd), "-append", self.append]


def host_tsc_khz() -> Optional[int]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


def wait_for(pred: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise StepFailed(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def file_contains(path: Path, text: str) -> bool:
    try:
        return text in path.read_text(errors="replace")
    except FileNotFoundError:
        return False
