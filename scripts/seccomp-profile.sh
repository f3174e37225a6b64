#!/usr/bin/env bash
# Lists the system calls each Keel thread class makes, to derive or check the allow-lists
# of crates/sandbox (see its crate documentation). Runs a command under `strace -f` and
# groups the calls by the thread's name (set with prctl(PR_SET_NAME) when a thread starts):
#
#   scripts/seccomp-profile.sh TRACE-FILE -- target/release/vmm -sandbox off -M microvm ...
#   scripts/seccomp-profile.sh TRACE-FILE            # only summarise an existing trace
#
# Output: one line per class, `class: call call ...`, classes as keel-sandbox names them
# (vcpu, worker, monitor, net, main). Run the VMM with `-sandbox off` so that a missing call
# shows up here instead of stopping the VMM.
set -euo pipefail
trace=${1:?usage: $0 TRACE-FILE [-- COMMAND...]}
shift
if [ "${1:-}" = -- ]; then
  shift
  command -v strace >/dev/null || { echo "strace is not installed (apt-get install strace)" >&2; exit 1; }
  strace -f -qq -o "$trace" "$@" || true
fi
awk '
  function class(name) {
    if (name ~ /^vcpu[0-9]+$/ || name == "rtc-timer") return "vcpu"
    if (name ~ /^virtio-/ || name == "serial-input") return "worker"
    if (name == "qmp-loop" || name == "qmp-stdin" || name == "qmp-stdout") return "monitor"
    if (name == "slirp") return "net"
    return "main"
  }
  NR == 1 { main = $1 }
  $2 ~ /^</ { next }                      # "<... call resumed>": counted when it started
  {
    tid = $1
    call = $2; sub(/\(.*/, "", call)
    if (call !~ /^[a-z_0-9]+$/) next
    if (call == "prctl" && $0 ~ /PR_SET_NAME/) {
      n = $0; sub(/.*PR_SET_NAME, "/, "", n); sub(/".*/, "", n); name[tid] = n
    }
    c = (tid in name) ? class(name[tid]) : "main"
    seen[c, call] = 1; classes[c] = 1
  }
  END {
    for (c in classes) {
      line = c ":"
      n = 0
      for (k in seen) { split(k, p, SUBSEP); if (p[1] == c) calls[++n] = p[2] }
      # insertion sort, small lists
      for (i = 2; i <= n; i++) { v = calls[i]; j = i - 1; while (j > 0 && calls[j] > v) { calls[j + 1] = calls[j]; j-- } calls[j + 1] = v }
      for (i = 1; i <= n; i++) line = line " " calls[i]
      print line
      delete calls
    }
  }
' "$trace" | sort
