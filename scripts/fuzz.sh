#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz / libFuzzer, ASan, debug assertions) of every parser of
# untrusted bytes: fuzz/fuzz_targets/*.rs. Each target runs for a bounded time, single job, on a
# corpus seeded from fuzz/seeds/<target>/ plus the reproducers in fuzz/regressions/<target>/
# (replayed first, so a fixed crash stays fixed).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     default 30 s, all targets
#
# Fails (exit 1) on any crash, assertion, leak, timeout or OOM and prints the input's path
# (under fuzz/artifacts/<target>/). Replay one: cargo fuzz run -a <target> <path>.
# Rust here is stable: RUSTC_BOOTSTRAP=1 lets it take the -Z flags cargo-fuzz passes. The build
# dir is wherever cargo puts it (build/ via .cargo/config.toml, or CARGO_TARGET_DIR); cargo fuzz
# finds its binaries itself.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SECS="${1:-30}"
shift || true
[[ "$SECS" =~ ^[0-9]+$ ]] || die "usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]"

export RUSTC_BOOTSTRAP=1
cargo fuzz --version >/dev/null 2>&1 || die "cargo-fuzz missing: cargo install cargo-fuzz --locked (scripts/install-deps.sh does)"

FUZZ="$REPO/fuzz"
cd "$FUZZ"
if [[ $# -gt 0 ]]; then
    TARGETS=("$@")
else
    mapfile -t TARGETS < <(cargo fuzz list)
fi
LOGS="$FUZZ/artifacts/logs"
mkdir -p "$LOGS"

T0=$(date +%s)
log "fuzz: building ${#TARGETS[@]} targets (release, ASan, debug assertions)"
cargo fuzz build -a
log "fuzz: built in $(($(date +%s) - T0))s"

failed=()
for t in "${TARGETS[@]}"; do
    corpus="$FUZZ/corpus/$t"
    mkdir -p "$corpus" "$FUZZ/artifacts/$t"
    dirs=("$corpus")
    [[ -d "$FUZZ/seeds/$t" ]] && dirs+=("$FUZZ/seeds/$t")
    [[ -d "$FUZZ/regressions/$t" ]] && dirs+=("$FUZZ/regressions/$t")
    log "fuzz: $t for ${SECS}s"
    marker="$LOGS/$t.start"
    touch "$marker"
    rc=0
    cargo fuzz run -a "$t" "${dirs[@]}" -- \
        -max_total_time="$SECS" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
        >"$LOGS/$t.log" 2>&1 || rc=$?
    execs=$(awk '/stat::number_of_executed_units/ {n=$2} END {print n+0}' "$LOGS/$t.log")
    rate=$(awk '/stat::average_exec_per_sec/ {n=$2} END {print n+0}' "$LOGS/$t.log")
    cov=$(grep -o 'cov: [0-9]*' "$LOGS/$t.log" | tail -1 || true)
    if [[ $rc -ne 0 ]]; then
        artifact=$(find "$FUZZ/artifacts/$t" -type f -newer "$marker" 2>/dev/null | head -1)
        grep -E -A1 'panicked at|ERROR: AddressSanitizer' "$LOGS/$t.log" | head -6 >&2 || true
        log "fuzz: $t FAILED (exit $rc); input: ${artifact:-see $LOGS/$t.log}; log: $LOGS/$t.log"
        failed+=("$t")
    else
        log "fuzz: $t ok: $execs execs, $rate execs/s, $cov, corpus $(find "$corpus" -type f | wc -l) files"
    fi
done

log "fuzz: ${#TARGETS[@]} targets in $(($(date +%s) - T0))s"
if [[ ${#failed[@]} -gt 0 ]]; then
    die "fuzz: crashes in: ${failed[*]}"
fi
