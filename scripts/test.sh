#!/usr/bin/env bash
# The project's test command (README): format, lint, build, unit + real-process tests, conformance.
#
#   scripts/test.sh              everything, as CI runs it
#   SKIP_CONFORMANCE=1 scripts/test.sh    without the libiscsi conformance run
#   SKIP_FUZZ=1 scripts/test.sh           without the fuzzing step (FUZZ_SECONDS per target, default 20)
#   SKIP_CHAOS=1 scripts/test.sh          without the short chaos run (CHAOS_SEED, CHAOS_DURATION=60s)
#
# Sized for 2 cores (nextest profile `ci` in .config/nextest.toml). Binaries are found through
# cargo's target directory (build/ in this workspace, or CARGO_TARGET_DIR), never target/release.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO"

step() { log "== $*"; }
T0=$(date +%s)

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo build --release --workspace --bins"
cargo build --release --workspace --bins --locked

# The real-process tests find raftsan next to their own profile dir; point them at the release
# binary we just built, whatever the target dir is.
RAFTSAN_BIN="$(raftsan_bin)"
export RAFTSAN_BIN
[[ -x "$RAFTSAN_BIN" ]] || die "release build produced no $RAFTSAN_BIN"

step "cargo nextest run --workspace --release (profile ci)"
cargo nextest run --workspace --release --locked --profile ci

if [[ "${SKIP_FUZZ:-0}" != 1 ]]; then
    step "fuzz: every target for ${FUZZ_SECONDS:-20}s (scripts/fuzz.sh)"
    scripts/fuzz.sh "${FUZZ_SECONDS:-20}"
fi

if [[ "${SKIP_CHAOS:-0}" != 1 ]]; then
    step "chaos: every fault kind at least once under verified I/O (raftsan-chaos run)"
    CHAOS_ARGS=(run --duration "${CHAOS_DURATION:-60s}" --out "$(dirname "$RAFTSAN_BIN")/chaos-ci.json")
    if [[ -n "${CHAOS_SEED:-}" ]]; then CHAOS_ARGS+=(--seed "$CHAOS_SEED"); fi
    "$(dirname "$RAFTSAN_BIN")/raftsan-chaos" "${CHAOS_ARGS[@]}"
fi

if [[ "${SKIP_CONFORMANCE:-0}" != 1 ]]; then
    step "conformance: iscsi-test-cu against raftsan"
    scripts/conformance.sh raftsan
    step "conformance: iscsi-test-cu against a three-node raftsan cluster"
    scripts/conformance.sh cluster
fi

log "all checks passed in $(($(date +%s) - T0))s"
