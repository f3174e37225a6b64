#!/usr/bin/env bash
# Build Keel's reference Linux guest from Debian's archive only.
#
# Fetches (with `apt-get download`, nothing else) a Debian kernel package and
# busybox-static, and produces, in a cache directory outside the git tree:
#
#   bzImage                   the package's vmlinuz, unchanged
#   vmlinux                   the uncompressed ELF carved out of the bzImage
#                             payload (keeps the PVH note XEN_ELFNOTE_PHYS32_ENTRY)
#   config                    the kernel's build configuration
#   initramfs.cpio.gz         busybox /init: mounts /proc /sys /dev, prints
#                             "KEEL-GUEST-READY ...", then keel.mode=poweroff
#                             (default) powers off, keel.mode=shell runs a shell
#   initramfs-virtio.cpio.gz  the same plus the kernel's virtio modules (virtio_pci
#                             too), keel.mode=virtio-test (which also lists the PCI
#                             functions and block devices) and keel.mode=blk-bench
#                             (see the init text below)
#   manifest                  package versions, hashes and facts of this build
#
# Idempotent: when every output exists and the package versions (and this
# script) are unchanged, nothing is fetched or rebuilt. Byte-reproducible for
# the same package versions: fixed mtimes, sorted archives, cpio
# --reproducible, gzip -n.
#
# Usage: scripts/build-guest.sh [--flavour cloud|generic] [--kernel-package PKG]
#                               [--out DIR] [--force] [--print-dir] [-h]
# Environment: KEEL_GUEST_DIR (output directory), KEEL_GUEST_CACHE (cache root,
# default ${XDG_CACHE_HOME:-$HOME/.cache}/keel-guest), KEEL_GUEST_FLAVOUR,
# SOURCE_DATE_EPOCH (mtime stamped into the archives, default 0).

set -euo pipefail
umask 022
export LC_ALL=C

SCRIPT_PATH=$(readlink -f "${BASH_SOURCE[0]}")
PROG=${0##*/}

FLAVOUR=${KEEL_GUEST_FLAVOUR:-cloud}
KERNEL_PKG=""
OUT=${KEEL_GUEST_DIR:-}
CACHE=${KEEL_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/keel-guest}
FORCE=0
PRINT_DIR=0
EPOCH=${SOURCE_DATE_EPOCH:-0}

# Marker printed by /init once user space runs; benchmarks and tests wait for it.
MARKER=KEEL-GUEST-READY
# Modules wanted in the virtio initramfs; their dependencies are added from
# the modules' own .modinfo and everything is loaded in dependency order.
VIRTIO_MODULES=(virtio virtio_ring virtio_mmio virtio_pci virtio_blk failover
  net_failover virtio_net virtio_console virtio_rng)

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$SCRIPT_PATH"
}

while [ $# -gt 0 ]; do
  case $1 in
    --flavour|--flavor) FLAVOUR=${2:?--flavour needs cloud or generic}; shift 2 ;;
    --flavour=*|--flavor=*) FLAVOUR=${1#*=}; shift ;;
    --kernel-package) KERNEL_PKG=${2:?--kernel-package needs a package name}; shift 2 ;;
    --kernel-package=*) KERNEL_PKG=${1#*=}; shift ;;
    --out) OUT=${2:?--out needs a directory}; shift 2 ;;
    --out=*) OUT=${1#*=}; shift ;;
    --force) FORCE=1; shift ;;
    --print-dir) PRINT_DIR=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (try --help)" ;;
  esac
done

case $FLAVOUR in
  cloud) META_PKG=linux-image-cloud-amd64 ;;
  generic) META_PKG=linux-image-amd64 ;;
  *) die "--flavour must be 'cloud' or 'generic', not '$FLAVOUR'" ;;
esac
case $EPOCH in ''|*[!0-9]*) die "SOURCE_DATE_EPOCH must be a number of seconds, not '$EPOCH'" ;; esac

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=(sudo); fi
fi

# --- host tools ---------------------------------------------------------------

apt_install() {
  # Installs Debian packages providing missing tools (root or sudo needed).
  if [ "$(id -u)" -ne 0 ] && [ ${#SUDO[@]} -eq 0 ]; then
    die "missing tools; install as root: apt-get install $*"
  fi
  log "installing $* with apt-get"
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2 \
    || die "apt-get install $* failed"
}

need_tools() {
  # need_tools TOOL:PACKAGE...: installs the packages of the tools not on PATH.
  local pair missing=()
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
  done
  if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
}

need_tools apt-get:apt dpkg-deb:dpkg sha256sum:coreutils od:coreutils \
  readelf:binutils objcopy:binutils cpio:cpio gzip:gzip

# --- resolve package versions (local apt metadata, no download) ---------------

# Each apt-cache call costs ~0.7 s where apt keeps no binary cache (Debian's
# container images set Dir::Cache::pkgcache ""), so keep one in our cache
# directory (apt revalidates it against the package lists) and batch queries.
mkdir -p "$CACHE/apt"
APT_CACHE=(apt-cache -o "Dir::Cache::pkgcache=$CACHE/apt/pkgcache.bin"
  -o "Dir::Cache::srcpkgcache=$CACHE/apt/srcpkgcache.bin")

candidates() {
  # candidates PKG...: "PKG VERSION" lines of the candidate versions (missing ones omitted).
  "${APT_CACHE[@]}" policy "$@" 2>/dev/null | awk '
    /^[^ ]/ { p = $1; sub(/:$/, "", p) }
    /Candidate:/ && $2 != "(none)" { print p, $2 }'
}

resolve_candidates() {
  # resolve_candidates PKG...: like candidates, running apt-get update once if one is missing.
  local out
  out=$(candidates "$@")
  if [ "$(printf '%s' "$out" | grep -c .)" -ne $# ]; then
    if [ "$(id -u)" -ne 0 ] && [ ${#SUDO[@]} -eq 0 ]; then
      die "apt knows no candidate for some of: $* (apt-get update needs root)"
    fi
    log "apt-get update (package lists missing or stale)"
    "${SUDO[@]}" apt-get update -qq >&2 || die "apt-get update failed"
    out=$(candidates "$@")
  fi
  [ "$(printf '%s' "$out" | grep -c .)" -eq $# ] \
    || die "apt knows no candidate for some of: $* (check sources.list for Debian's archive)"
  printf '%s\n' "$out"
}

RECORDS=""
load_records() {
  # load_records PKG=VER...: keeps the apt records of those exact versions in RECORDS.
  RECORDS=$("${APT_CACHE[@]}" show "$@" 2>/dev/null) || die "apt-cache show $* failed"
}

field() {
  # field PKG VERSION FIELD: one field of the first record of PKG=VERSION in RECORDS.
  printf '%s\n' "$RECORDS" | awk -v p="$1" -v v="$2" -v f="$3" '
    done { next }
    $0 == "" { if (hit && val != "") { print val; done = 1 } pkg = ""; ver = ""; val = ""; hit = 0; next }
    index($0, "Package: ") == 1 { pkg = substr($0, 10) }
    index($0, "Version: ") == 1 { ver = substr($0, 10); hit = (pkg == p && ver == v) }
    index($0, f ": ") == 1 { val = substr($0, length(f) + 3) }
    END { if (!done && hit && val != "") print val }'
}

BUSYBOX_PKG=busybox-static
if [ -z "$KERNEL_PKG" ]; then
  # The meta package depends on exactly one versioned image: "linux-image-X (= V)".
  read -r _ meta_ver <<< "$(resolve_candidates "$META_PKG")"
  load_records "$META_PKG=$meta_ver"
  dep=$(field "$META_PKG" "$meta_ver" Depends | tr ',|' '\n' | sed 's/^ *//' \
    | grep -E '^linux-image-[0-9]' | head -n1) || true
  KERNEL_PKG=${dep%% *}
  [ -n "$KERNEL_PKG" ] || die "cannot resolve $META_PKG $meta_ver to a versioned linux-image package"
fi
vers=$(resolve_candidates "$KERNEL_PKG" "$BUSYBOX_PKG")
KERNEL_VER=$(awk -v p="$KERNEL_PKG" '$1 == p { print $2 }' <<< "$vers")
BUSYBOX_VER=$(awk -v p="$BUSYBOX_PKG" '$1 == p { print $2 }' <<< "$vers")
load_records "$KERNEL_PKG=$KERNEL_VER" "$BUSYBOX_PKG=$BUSYBOX_VER"
KERNEL_SHA=$(field "$KERNEL_PKG" "$KERNEL_VER" SHA256)
KERNEL_FILE=$(field "$KERNEL_PKG" "$KERNEL_VER" Filename)
BUSYBOX_SHA=$(field "$BUSYBOX_PKG" "$BUSYBOX_VER" SHA256)
BUSYBOX_FILE=$(field "$BUSYBOX_PKG" "$BUSYBOX_VER" Filename)
if [ -z "$KERNEL_SHA" ] || [ -z "$BUSYBOX_SHA" ] || [ -z "$KERNEL_FILE" ] || [ -z "$BUSYBOX_FILE" ]; then
  die "apt metadata lacks the SHA256/Filename fields of $KERNEL_PKG or $BUSYBOX_PKG"
fi

# The kernel release (uname -r) is the package name without its prefix.
KREL=${KERNEL_PKG#linux-image-}
KREL=${KREL%-unsigned}

# The flavour follows the package actually built (--kernel-package may name any).
case $KREL in
  *-cloud-amd64) FLAVOUR=cloud ;;
  *-rt-amd64) FLAVOUR=rt ;;
  *) FLAVOUR=generic ;;
esac
if [ -z "$OUT" ]; then
  OUT=$CACHE/$KREL
  # Stable paths for tests and benchmarks: current (cloud), current-generic, current-rt.
  LINK=$CACHE/current
  [ "$FLAVOUR" = cloud ] || LINK=$CACHE/current-$FLAVOUR
else
  LINK=""
fi

SCRIPT_SHA=$(sha256sum "$SCRIPT_PATH" | cut -d' ' -f1)
STAMP="script $SCRIPT_SHA
kernel $KERNEL_PKG $KERNEL_VER $KERNEL_SHA
busybox $BUSYBOX_PKG $BUSYBOX_VER $BUSYBOX_SHA
epoch $EPOCH"

OUTPUTS=(bzImage vmlinux config initramfs.cpio.gz initramfs-virtio.cpio.gz manifest)

print_outputs() {
  local f
  if [ -n "$LINK" ]; then
    mkdir -p "$CACHE"
    ln -sfn "$KREL" "$LINK"
  fi
  if [ $PRINT_DIR -eq 1 ]; then
    printf '%s\n' "$OUT"
    return
  fi
  printf 'KEEL_GUEST_DIR=%s\n' "$OUT"
  [ -z "$LINK" ] || printf 'KEEL_GUEST_LINK=%s\n' "$LINK"
  for f in "${OUTPUTS[@]}"; do printf '%s\n' "$OUT/$f"; done
}

up_to_date() {
  local f
  [ $FORCE -eq 0 ] || return 1
  [ -f "$OUT/.stamp" ] || return 1
  for f in "${OUTPUTS[@]}"; do [ -f "$OUT/$f" ] || return 1; done
  [ "$(cat "$OUT/.stamp")" = "$STAMP" ]
}

# One build per output directory at a time.
mkdir -p "$OUT"
if command -v flock >/dev/null 2>&1; then
  exec 9> "$OUT/.lock"
  flock 9
fi

if up_to_date; then
  log "up to date: $KERNEL_PKG $KERNEL_VER, $BUSYBOX_PKG $BUSYBOX_VER"
  print_outputs
  exit 0
fi

log "building guest: $KERNEL_PKG $KERNEL_VER, $BUSYBOX_PKG $BUSYBOX_VER -> $OUT"
WORK=$(mktemp -d "$OUT/.work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# --- download (apt only) --------------------------------------------------------

DEBS=$CACHE/debs
mkdir -p "$DEBS"

fetch() {
  # fetch PKG VERSION SHA256 FILENAME: prints the path of the verified .deb, downloading if needed.
  local pkg=$1 ver=$2 sha=$3 name=$4 deb
  deb=$DEBS/${name##*/}
  if [ ! -f "$deb" ] || [ "$(sha256sum "$deb" | cut -d' ' -f1)" != "$sha" ]; then
    rm -f "$deb"
    local opts=() tmp
    # apt's sandbox user cannot write into root's private cache directory.
    [ "$(id -u)" -ne 0 ] || opts=(-o APT::Sandbox::User=root)
    tmp=$(mktemp -d "$DEBS/.download.XXXXXX")
    (cd "$tmp" && apt-get download -qq "${opts[@]}" "$pkg=$ver" >&2) || { rm -rf "$tmp"; die "apt-get download $pkg=$ver failed"; }
    # apt names the file after the version (epoch colon escaped); keep the archive's name.
    { mv "$tmp"/*.deb "$deb" && rmdir "$tmp"; } || die "apt-get download $pkg=$ver left no single .deb in $tmp"
  fi
  [ "$(sha256sum "$deb" | cut -d' ' -f1)" = "$sha" ] || die "$deb does not match apt's SHA256 $sha"
  printf '%s\n' "$deb"
}

KERNEL_DEB=$(fetch "$KERNEL_PKG" "$KERNEL_VER" "$KERNEL_SHA" "$KERNEL_FILE")
BUSYBOX_DEB=$(fetch "$BUSYBOX_PKG" "$BUSYBOX_VER" "$BUSYBOX_SHA" "$BUSYBOX_FILE")

# --- extract --------------------------------------------------------------------

mkdir -p "$WORK/kernel" "$WORK/busybox"
dpkg-deb --fsys-tarfile "$KERNEL_DEB" | tar -x -C "$WORK/kernel" --wildcards './boot/*' './lib/modules/*' \
  || die "cannot extract $KERNEL_DEB"
dpkg-deb --fsys-tarfile "$BUSYBOX_DEB" | tar -x -C "$WORK/busybox" ./bin/busybox \
  || die "cannot extract $BUSYBOX_DEB"

VMLINUZ=$WORK/kernel/boot/vmlinuz-$KREL
CONFIG=$WORK/kernel/boot/config-$KREL
MODDIR=$WORK/kernel/lib/modules/$KREL
BUSYBOX=$WORK/busybox/bin/busybox
[ -f "$VMLINUZ" ] || die "$KERNEL_DEB has no boot/vmlinuz-$KREL"
[ -f "$CONFIG" ] || die "$KERNEL_DEB has no boot/config-$KREL"
[ -d "$MODDIR" ] || die "$KERNEL_DEB has no lib/modules/$KREL"

# --- vmlinux: carve and decompress the bzImage payload -------------------------

le() {
  # le FILE OFFSET SIZE: unsigned little-endian integer at OFFSET.
  od -An -tu"$3" -j"$2" -N"$3" "$1" | tr -d ' \n'
}

[ "$(dd if="$VMLINUZ" bs=1 skip=$((0x202)) count=4 status=none)" = HdrS ] || die "$VMLINUZ is not a bzImage (no HdrS)"
setup_sects=$(le "$VMLINUZ" $((0x1f1)) 1)
[ "$setup_sects" -ne 0 ] || setup_sects=4
payload_offset=$(le "$VMLINUZ" $((0x248)) 4)
payload_length=$(le "$VMLINUZ" $((0x24c)) 4)
payload_start=$(( (setup_sects + 1) * 512 + payload_offset ))
[ "$payload_length" -gt 4 ] || die "bzImage payload_length is $payload_length"
# The build appends the decompressed size (le32) to the compressed stream.
expected_size=$(le "$VMLINUZ" $((payload_start + payload_length - 4)) 4)
magic=$(od -An -tx1 -j"$payload_start" -N6 "$VMLINUZ" | tr -d ' \n')
case $magic in
  02214c18*) COMP=lz4; need_tools lz4:lz4; DECOMP=(lz4 -dc) ;;
  fd377a585a00) COMP=xz; need_tools xz:xz-utils; DECOMP=(xz -dc --single-stream) ;;
  1f8b*) COMP=gzip; DECOMP=(gzip -dc) ;;
  28b52ffd*) COMP=zstd; need_tools zstd:zstd; DECOMP=(zstd -dcq) ;;
  *) die "unknown bzImage payload compression (magic $magic)" ;;
esac
log "bzImage payload: $COMP, offset $payload_start, $payload_length bytes"
dd if="$VMLINUZ" bs=64K iflag=skip_bytes,count_bytes skip="$payload_start" \
  count=$((payload_length - 4)) status=none | "${DECOMP[@]}" > "$WORK/vmlinux" \
  || die "decompressing the $COMP payload failed"
actual_size=$(stat -c %s "$WORK/vmlinux")
[ "$actual_size" = "$expected_size" ] || die "vmlinux is $actual_size bytes, the bzImage says $expected_size"
[ "$(od -An -tx1 -N4 "$WORK/vmlinux" | tr -d ' \n')" = 7f454c46 ] || die "decompressed payload is not an ELF file"

# XEN_ELFNOTE_PHYS32_ENTRY (18): the 32-bit PVH entry point.
pvh_line=$(readelf -n -W "$WORK/vmlinux" | grep -E '^ *Xen .*(\(0x00000012\)|PHYS32_ENTRY)' | head -n1) || true
[ -n "$pvh_line" ] || die "vmlinux has no XEN_ELFNOTE_PHYS32_ENTRY note (kernel built without CONFIG_PVH?)"
read -r b0 b1 b2 b3 _ <<< "${pvh_line##*description data: }"
PVH_ENTRY=0x$b3$b2$b1$b0
log "vmlinux: $actual_size bytes, PVH entry $PVH_ENTRY"

cp "$VMLINUZ" "$WORK/bzImage"
cp "$CONFIG" "$WORK/config"

# --- initramfs trees --------------------------------------------------------------

write_init() {
  cat > "$1" <<'EOF'
#!/bin/sh
# Keel reference guest /init (generated by scripts/build-guest.sh).
# Kernel command line: keel.mode=poweroff (default) | shell | virtio-test
#                      keel.off=auto (default: poweroff with ACPI, else reboot) | poweroff | reboot
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
mode=poweroff off=auto
read -r cmdline < /proc/cmdline
for arg in $cmdline; do
  case $arg in
    keel.mode=*) mode=${arg#keel.mode=} ;;
    keel.off=*) off=${arg#keel.off=} ;;
  esac
done
read -r up _ < /proc/uptime
echo "KEEL-GUEST-READY uptime=$up mode=$mode"

off() {
  sync
  # Without ACPI the kernel has no power-off method and only halts; a reboot
  # (reboot=t on the kernel command line, a VMM that exits on reset) ends the VM.
  if [ "$off" = auto ]; then
    if [ -d /sys/firmware/acpi ]; then off=poweroff; else off=reboot; fi
  fi
  if [ "$off" = reboot ]; then reboot -f; else poweroff -f; fi
  while :; do sleep 1; done
}

load_modules() {
  [ -f /lib/modules/load-order ] || { echo "KEEL-MODULES: none in this initramfs"; return 1; }
  n=0
  while read -r m; do
    if insmod "/lib/modules/$m.ko"; then n=$((n + 1)); else echo "KEEL-MODULE-FAILED $m"; fi
  done < /lib/modules/load-order
  echo "KEEL-MODULES-LOADED $n"
}

case $mode in
  poweroff) off ;;
  shell)
    [ ! -f /lib/modules/load-order ] || load_modules
    hostname keel-guest
    echo "KEEL-GUEST-SHELL (exit the shell to power off)"
    setsid cttyhack sh -l
    off ;;
  virtio-test)
    if load_modules; then /bin/keel-virtio-test; fi
    echo "KEEL-VIRTIO-TEST-DONE"
    off ;;
EOF
  # The virtio initramfs alone knows keel.mode=blk-bench; the plain /init stays as it was.
  if [ "${2:-}" = virtio ]; then
    cat >> "$1" <<'EOF'
  blk-bench)
    # Sequential virtio-blk throughput with dd (keel.mb=N MiB, default 64; overwrites /dev/vda).
    if load_modules; then /bin/keel-blk-bench; fi
    echo "KEEL-BLK-BENCH-DONE"
    off ;;
EOF
  fi
  cat >> "$1" <<'EOF'
  *)
    echo "KEEL-GUEST: unknown keel.mode '$mode', powering off"
    off ;;
esac
EOF
  chmod 0755 "$1"
}

write_virtio_test() {
  cat > "$1" <<'EOF'
#!/bin/sh
# Keel virtio device test (generated by scripts/build-guest.sh); run by /init
# with keel.mode=virtio-test after the virtio modules are loaded.
# Options on the kernel command line:
#   keel.blk_sector=N  sector (512 bytes) of /dev/vda to write the test string to (default 8)
#   keel.ip=ADDR/LEN   address for eth0 (brings it up)   keel.ping=ADDR  peer to ping
sector=8 ip='' peer=''
read -r cmdline < /proc/cmdline
for arg in $cmdline; do
  case $arg in
    keel.blk_sector=*) sector=${arg#keel.blk_sector=} ;;
    keel.ip=*) ip=${arg#keel.ip=} ;;
    keel.ping=*) peer=${arg#keel.ping=} ;;
  esac
done

# PCI functions as the guest enumerated them (none without PCI, e.g. on microvm),
# and the block devices it has.
if [ -d /sys/bus/pci/devices ]; then
  echo "KEEL-PCI-BEGIN"
  for d in /sys/bus/pci/devices/*; do
    [ -e "$d" ] || continue
    drv=-; [ -L "$d/driver" ] && drv=$(basename "$(readlink "$d/driver")")
    echo "KEEL-PCI ${d##*/} $(cat "$d/vendor"):$(cat "$d/device") class=$(cat "$d/class") subsys=$(cat "$d/subsystem_vendor"):$(cat "$d/subsystem_device") irq=$(cat "$d/irq") driver=$drv"
  done
  echo "KEEL-PCI-END"
  echo "KEEL-PCI-MSI $(grep -c 'PCI-MSI' /proc/interrupts) vectors"
fi
for b in /sys/block/*; do
  [ -e "$b" ] || continue
  echo "KEEL-BLOCK ${b##*/} $(cat "$b/size") sectors $(basename "$(readlink -f "$b/device/..")" 2>/dev/null)"
done

# virtio-blk: the first sector, then a write at $sector read back with O_DIRECT.
i=0
while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
if [ -b /dev/vda ]; then
  echo "KEEL-VDA-SIZE $(cat /sys/block/vda/size) sectors"
  echo "KEEL-VDA-BEGIN"
  dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | hexdump -C
  echo "KEEL-VDA-END"
  echo "KEEL-VDA-TEXT $(dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | tr -c ' -~' '.' | sed 's/\.*$//')"
  echo "KEEL-VDA-SHA256 $(dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
  text="KEEL-GUEST-WROTE-THIS sector=$sector"
  if printf '%s\n' "$text" | dd of=/dev/vda bs=512 seek="$sector" conv=notrunc,sync 2>/dev/null && sync; then
    back=$(dd if=/dev/vda bs=512 skip="$sector" count=1 iflag=direct 2>/dev/null | head -n1)
    if [ "$back" = "$text" ]; then echo "KEEL-VDA-WRITE OK sector=$sector"; else echo "KEEL-VDA-WRITE MISMATCH sector=$sector read '$back'"; fi
  else
    echo "KEEL-VDA-WRITE FAILED sector=$sector"
  fi
else
  echo "KEEL-VDA-MISSING"
fi

# virtio-rng: 32 bytes from the hardware RNG.
echo "KEEL-RNG-CURRENT $(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)"
rng=$(timeout 5 head -c 32 /dev/hwrng 2>/dev/null | od -An -tx1 -v | tr -d ' \n')
if [ ${#rng} -eq 64 ]; then echo "KEEL-RNG $rng"; else echo "KEEL-RNG FAILED got '$rng'"; fi

# virtio-console: one line on hvc0.
if [ -c /dev/hvc0 ] && timeout 5 sh -c 'echo "KEEL-HVC0-HELLO from the guest" > /dev/hvc0'; then
  echo "KEEL-HVC0 OK"
else
  echo "KEEL-HVC0 FAILED"
fi

# virtio-net: the links, and optionally an address and a ping.
echo "KEEL-IP-LINK-BEGIN"
ip link
echo "KEEL-IP-LINK-END"
if [ -n "$ip" ]; then
  ip addr add "$ip" dev eth0 && ip link set eth0 up && echo "KEEL-NET-UP $ip"
  if [ -n "$peer" ]; then
    if ping -c 3 -W 2 "$peer"; then echo "KEEL-PING OK $peer"; else echo "KEEL-PING FAILED $peer"; fi
  fi
fi
EOF
  chmod 0755 "$1"
}

write_blk_bench() {
  cat > "$1" <<'EOF'
#!/bin/sh
# Keel virtio-blk throughput (generated by scripts/build-guest.sh); run by /init
# with keel.mode=blk-bench after the virtio modules are loaded.
#   keel.mb=N  MiB read from /dev/vda, then written to it (default 64)
# dd bs=1M with O_DIRECT both ways (no guest page cache); the write ends with
# fsync. Timed with /proc/uptime (centiseconds). Prints
#   KEEL-BLK-READ bytes=N csec=T    KEEL-BLK-WRITE bytes=N csec=T
# or KEEL-BLK-READ FAILED ... / KEEL-BLK-WRITE FAILED ... The write OVERWRITES the disk.
mb=64
read -r cmdline < /proc/cmdline
for arg in $cmdline; do
  case $arg in
    keel.mb=*) mb=${arg#keel.mb=} ;;
  esac
done
case $mb in
  ''|*[!0-9]*|0*) echo "KEEL-BLK-BENCH FAILED keel.mb must be a positive number, not '$mb'"; exit 1 ;;
esac

csec() {
  # Centiseconds since boot; /proc/uptime has two decimals ("1${frac}" avoids octal).
  read -r u _ < /proc/uptime
  echo $(( ${u%.*} * 100 + 1${u#*.} - 100 ))
}

i=0
while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
if [ ! -b /dev/vda ]; then echo "KEEL-VDA-MISSING"; exit 1; fi
bytes=$((mb * 1048576))
size=$(( $(cat /sys/block/vda/size) * 512 ))
if [ "$size" -lt "$bytes" ]; then
  echo "KEEL-BLK-BENCH FAILED /dev/vda has $size bytes, keel.mb=$mb needs $bytes"
  exit 1
fi

t0=$(csec)
if dd if=/dev/vda of=/dev/null bs=1M count="$mb" iflag=direct 2>/dev/null; then
  t1=$(csec)
  echo "KEEL-BLK-READ bytes=$bytes csec=$((t1 - t0))"
else
  echo "KEEL-BLK-READ FAILED dd status $?"
fi

t0=$(csec)
if dd if=/dev/zero of=/dev/vda bs=1M count="$mb" oflag=direct conv=notrunc,fsync 2>/dev/null; then
  t1=$(csec)
  echo "KEEL-BLK-WRITE bytes=$bytes csec=$((t1 - t0))"
else
  echo "KEEL-BLK-WRITE FAILED dd status $?"
fi
EOF
  chmod 0755 "$1"
}

make_tree() {
  # make_tree DIR [virtio]: the busybox root shared by both initramfs images.
  local root=$1 applet
  mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,root,etc,mnt,lib/modules}
  chmod 1777 "$root/tmp"
  chmod 0700 "$root/root"
  install -m 0755 "$BUSYBOX" "$root/bin/busybox"
  # Symlinks for every applet (busybox is static, so it runs on the build host).
  "$BUSYBOX" --list-full | LC_ALL=C sort | while read -r applet; do
    [ "$applet" != bin/busybox ] || continue
    [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
  done
  write_init "$root/init" "${2:-}"
  printf 'root:x:0:0:root:/root:/bin/sh\n' > "$root/etc/passwd"
  printf 'root:x:0:\n' > "$root/etc/group"
  printf 'export PS1='\''keel-guest:\\w# '\''\n' > "$root/etc/profile"
}

add_virtio() {
  # add_virtio DIR: the virtio modules (with their dependencies) and the test script.
  local root=$1 f name d
  declare -A path=() seen=()
  local order=()
  while IFS= read -r f; do
    name=$(basename "$f" .ko)
    path[${name//-/_}]=$f
  done < <(find "$MODDIR/kernel" -name '*.ko' | LC_ALL=C sort)
  visit() {
    local m=$1 dep deps
    [ -z "${seen[$m]:-}" ] || return 0
    seen[$m]=1
    [ -n "${path[$m]:-}" ] || die "module $m is not in $KERNEL_PKG"
    deps=$(objcopy -O binary --only-section=.modinfo "${path[$m]}" /dev/stdout | tr '\0' '\n' \
      | sed -n 's/^depends=//p')
    for dep in ${deps//,/ }; do visit "${dep//-/_}"; done
    order+=("$m")
  }
  for d in "${VIRTIO_MODULES[@]}"; do visit "$d"; done
  for d in "${order[@]}"; do
    install -m 0644 "${path[$d]}" "$root/lib/modules/$d.ko"
    printf '%s\n' "$d" >> "$root/lib/modules/load-order"
  done
  write_virtio_test "$root/bin/keel-virtio-test"
  write_blk_bench "$root/bin/keel-blk-bench"
  MODULE_ORDER=${order[*]}
}

pack() {
  # pack DIR OUT: reproducible gzip-compressed cpio newc archive of DIR.
  local root=$1 out=$2
  find "$root" -exec touch -h -d "@$EPOCH" {} +
  (cd "$root" && find . -mindepth 1 | LC_ALL=C sort \
    | cpio --quiet -o -H newc -R 0:0 --reproducible) | gzip -n -9 > "$out"
}

make_tree "$WORK/root"
pack "$WORK/root" "$WORK/initramfs.cpio.gz"
make_tree "$WORK/root-virtio" virtio
add_virtio "$WORK/root-virtio"
pack "$WORK/root-virtio" "$WORK/initramfs-virtio.cpio.gz"
log "virtio modules (load order): $MODULE_ORDER"

{
  printf 'kernel_package=%s\nkernel_version=%s\nkernel_release=%s\nflavour=%s\n' \
    "$KERNEL_PKG" "$KERNEL_VER" "$KREL" "$FLAVOUR"
  printf 'busybox_package=%s\nbusybox_version=%s\n' "$BUSYBOX_PKG" "$BUSYBOX_VER"
  printf 'payload_compression=%s\npvh_entry=%s\nmarker=%s\n' "$COMP" "$PVH_ENTRY" "$MARKER"
  printf 'virtio_modules=%s\nsource_date_epoch=%s\n' "$MODULE_ORDER" "$EPOCH"
  for f in bzImage vmlinux config initramfs.cpio.gz initramfs-virtio.cpio.gz; do
    printf 'sha256 %s %s\n' "$(sha256sum "$WORK/$f" | cut -d' ' -f1)" "$f"
  done
} > "$WORK/manifest"

rm -f "$OUT/.stamp"
for f in "${OUTPUTS[@]}"; do mv -f "$WORK/$f" "$OUT/$f"; done
printf '%s\n' "$STAMP" > "$OUT/.stamp"
log "done"
print_outputs
