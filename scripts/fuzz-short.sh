#!/usr/bin/env bash
# The short fuzz run of CI (`.ci/run`, step "fuzz (short)"): builds every cargo-fuzz target
# of fuzz/ once and runs each for FUZZ_SECONDS (default 10) over its committed corpus in
# fuzz/corpus/TARGET, failing on the first crash (the input lands in fuzz/artifacts/TARGET).
# Needs a nightly toolchain; without one it says so and succeeds. Installs cargo-fuzz if
# nightly exists and cargo-fuzz does not.
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${FUZZ_SECONDS:-10}"
# (grep without -q reads all of rustup's output: no SIGPIPE under pipefail)
if ! rustup toolchain list 2>/dev/null | grep '^nightly' >/dev/null; then
    echo "fuzz: skipped (no nightly toolchain)"
    exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz
fi
# Its own target dir (the fuzzing flags differ from the main workspace's), shared by all
# targets; optimized with debug assertions and overflow checks (cargo-fuzz's defaults).
# Without AddressSanitizer by default: the ASan build alone takes about 4.5 minutes on two
# cores, too long for every CI run; FUZZ_SANITIZER=address restores it.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$PWD/fuzz/target}"
san=(--sanitizer "${FUZZ_SANITIZER:-none}")
start=$SECONDS
cargo +nightly fuzz build --fuzz-dir fuzz "${san[@]}"
echo "fuzz: built all targets in $((SECONDS - start))s"
mkdir -p fuzz/artifacts
for t in $(cargo +nightly fuzz list --fuzz-dir fuzz); do
    mkdir -p "fuzz/corpus/$t"
    # A scratch corpus seeded from the committed one, so that CI does not grow the tree.
    work="$(mktemp -d)"
    t0=$SECONDS
    if ! cargo +nightly fuzz run --fuzz-dir fuzz "${san[@]}" "$t" "$work" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$work.log" 2>&1; then
        tail -n 60 "$work.log"
        echo "fuzz: $t crashed; the input is in fuzz/artifacts/$t (replay:" \
            "cargo +nightly fuzz run --fuzz-dir fuzz $t fuzz/artifacts/$t/crash-...)"
        exit 1
    fi
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$work.log" | tail -n 1)"
    echo "fuzz: $t ok (${execs:-?} runs in $((SECONDS - t0))s)"
    rm -rf "$work" "$work.log"
done
