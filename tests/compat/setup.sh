#!/usr/bin/env bash
# Installs what the compatibility scenarios in tests/compat/ need; idempotent, and fast
# (a few dpkg/file checks) when everything is already there. Run as root (CI is).
#
#   apt:  qemu-system-x86 (QEMU 7.2, the reference peer), libvirt-daemon,
#         libvirt-daemon-driver-qemu, libvirt-clients (libvirt 9.0), python3-venv if needed
#   user: libvirt-qemu (user and group; the QEMU driver wants them even to run as root)
#   venv: $CACHE/venv with qemu.qmp from PyPI (QMPClient, qmp-shell), pinned
#   tree: $CACHE/qemu-python: python/qemu/ (qemu.machine's QEMUMachine) from Debian's
#         source package of QEMU. No binary package and no PyPI package carries
#         qemu.machine, so it is taken from Debian 13's QEMU 10.0 source (its QEMUMachine
#         has both monitor forms: a path it listens on and an inherited socketpair fd),
#         falling back to Debian 12's QEMU 7.2 source (path form only).
#
# CACHE is $KEEL_COMPAT_CACHE or ${XDG_CACHE_HOME:-~/.cache}/keel-compat.
set -euo pipefail
QMP_VERSION=0.0.6
CACHE=${KEEL_COMPAT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/keel-compat}
log() { printf 'compat-setup: %s\n' "$*" >&2; }
mkdir -p "$CACHE"

# --- Debian packages ---------------------------------------------------------------
if command -v apt-get >/dev/null; then
    need=()
    for p in qemu-system-x86 libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients; do
        dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
    done
    if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then need+=(python3-venv); fi
    if [ ${#need[@]} -gt 0 ]; then
        log "apt-get install ${need[*]}"
        apt-get update -qq || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    fi
fi

# --- the libvirt-qemu user and group -------------------------------------------------
getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
getent passwd libvirt-qemu >/dev/null ||
    useradd --system -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu

# --- qemu.qmp in a venv ----------------------------------------------------------------
PY=python3
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1 && [ -x /usr/bin/python3 ]; then PY=/usr/bin/python3; fi
V=$CACHE/venv
if [ "$(cat "$V/.qemu.qmp" 2>/dev/null)" != "$QMP_VERSION" ] || ! "$V/bin/python3" -c 'import qemu.qmp' 2>/dev/null; then
    log "venv $V with qemu.qmp==$QMP_VERSION"
    rm -rf "$V"
    "$PY" -m venv "$V"
    "$V/bin/python3" -m pip install -q --disable-pip-version-check "qemu.qmp==$QMP_VERSION"
    echo "$QMP_VERSION" > "$V/.qemu.qmp"
fi

# --- QEMU's python/ tree (qemu.machine) from Debian's source package --------------------
T=$CACHE/qemu-python
if [ ! -f "$T/qemu/machine/machine.py" ]; then
    A=$CACHE/apt
    rm -rf "$A" && mkdir -p "$A/lists/partial" "$A/parts" "$A/dl"
    opts=(-o "Dir::Etc::SourceList=$A/sources.list" -o "Dir::Etc::SourceParts=$A/parts"
          -o "Dir::State::Lists=$A/lists" -o "Debug::NoLocking=1")
    for suite in trixie bookworm; do
        printf 'deb-src http://deb.debian.org/debian %s main\n' "$suite" > "$A/sources.list"
        rm -rf "$A/lists" "$A/dl" && mkdir -p "$A/lists/partial" "$A/dl"
        apt-get "${opts[@]}" update -qq >/dev/null 2>&1 || continue
        (cd "$A/dl" && apt-get "${opts[@]}" source --download-only -qq qemu >/dev/null 2>&1) || continue
        orig=$(ls "$A/dl"/qemu_*.orig.tar.xz 2>/dev/null | head -n1)
        [ -n "$orig" ] || continue
        rm -rf "$A/x" && mkdir -p "$A/x"
        tar -xJf "$orig" -C "$A/x" --wildcards '*/python/qemu/*' || continue
        src=$(ls -d "$A/x"/*/python 2>/dev/null | head -n1)
        [ -f "$src/qemu/machine/machine.py" ] || continue
        rm -rf "$T.tmp" && mkdir -p "$T.tmp"
        cp -r "$src/qemu" "$T.tmp/"
        basename "$orig" > "$T.tmp/SOURCE"
        rm -rf "$T" && mv "$T.tmp" "$T"
        log "qemu.machine from $(cat "$T/SOURCE") ($suite)"
        break
    done
    rm -rf "$A"
    [ -f "$T/qemu/machine/machine.py" ] || log "could not fetch QEMU's source from Debian: QEMUMachine scenarios will skip"
fi
