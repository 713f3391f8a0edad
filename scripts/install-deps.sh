#!/usr/bin/env bash
# Install the system packages the tests, the conformance run and the benchmarks use.
# Idempotent; run as root (or with sudo available). Non-interactive (CI=true friendly).
#
#   libiscsi-bin   iscsi-ls, iscsi-inq, iscsi-readcapacity16, iscsi-test-cu, iscsi-perf
#   tgt            tgtd, the reference target the tests and benchmarks compare against
#   qemu-utils + qemu-block-extra   qemu-img/qemu-io with the iscsi:// block driver (block-iscsi.so)
#   fio sg3-utils libnbd-bin iproute2 iptables jq
#   prometheus     promtool (`promtool check metrics` in tests/tests/metrics_names.rs)
#
# qemu-block-extra must be the exact version of qemu-utils (the module is refused otherwise). When
# qemu-utils came from <codename>-backports (as on the reference image: 10.0.2 from
# bookworm-backports) and that suite is not in the apt sources, plain `apt-get install
# qemu-block-extra` fails with "held broken packages"; we then add the backports suite and install
# the matching version from it.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "install-deps: run as root" >&2; exit 1; }
    SUDO="sudo -E"
fi
APT=($SUDO apt-get -y -q -o Dpkg::Options::=--force-confold --no-install-recommends)
log() { printf 'install-deps: %s\n' "$*" >&2; }

QEMU_MODULE=/usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so

log "apt-get update"
$SUDO apt-get update -q

log "installing libiscsi-bin tgt fio sg3-utils libnbd-bin iproute2 iptables jq prometheus"
"${APT[@]}" install libiscsi-bin tgt fio sg3-utils libnbd-bin iproute2 iptables jq prometheus

# --- qemu-utils and the matching qemu-block-extra -------------------------------------------
installed_version() { dpkg-query -W -f='${Status} ${Version}\n' "$1" 2>/dev/null | awk '$3 == "installed" {print $4}'; }
candidate_has() { apt-cache madison "$1" 2>/dev/null | awk -F'|' '{gsub(/ /, "", $2); print $2}' | grep -qxF "$2"; }

CODENAME="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
QEMU_VERSION="$(installed_version qemu-utils || true)"
if [[ -z "$QEMU_VERSION" ]]; then
    log "qemu-utils absent: installing qemu-utils and qemu-block-extra from the default suites"
    "${APT[@]}" install qemu-utils qemu-block-extra
else
    log "qemu-utils $QEMU_VERSION installed"
    EXTRA_VERSION="$(installed_version qemu-block-extra || true)"
    if [[ "$EXTRA_VERSION" == "$QEMU_VERSION" ]]; then
        log "qemu-block-extra $EXTRA_VERSION already matches"
    else
        if ! candidate_has qemu-block-extra "$QEMU_VERSION"; then
            if [[ "$QEMU_VERSION" == *bpo* && -n "$CODENAME" ]]; then
                if ! grep -rqsE "^[^#]*(${CODENAME}-backports)" /etc/apt/sources.list /etc/apt/sources.list.d/; then
                    log "adding ${CODENAME}-backports to /etc/apt/sources.list.d/backports.list"
                    echo "deb http://deb.debian.org/debian ${CODENAME}-backports main" |
                        $SUDO tee /etc/apt/sources.list.d/backports.list >/dev/null
                fi
                $SUDO apt-get update -q
            fi
        fi
        candidate_has qemu-block-extra "$QEMU_VERSION" ||
            { log "no qemu-block-extra $QEMU_VERSION in any apt source"; exit 1; }
        log "installing qemu-block-extra=$QEMU_VERSION"
        if [[ "$QEMU_VERSION" == *bpo* && -n "$CODENAME" ]]; then
            "${APT[@]}" install -t "${CODENAME}-backports" "qemu-block-extra=$QEMU_VERSION"
        else
            "${APT[@]}" install "qemu-block-extra=$QEMU_VERSION"
        fi
    fi
fi
[[ -e "$QEMU_MODULE" ]] || { log "missing $QEMU_MODULE after install"; exit 1; }
qemu-img --help | grep -qw iscsi || log "warning: qemu-img does not list the iscsi driver"

# --- Rust tooling ------------------------------------------------------------------------------
if command -v rustup >/dev/null; then
    rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
    rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
fi
if cargo nextest --version >/dev/null 2>&1; then
    log "$(cargo nextest --version | head -1)"
else
    log "installing cargo-nextest"
    cargo install cargo-nextest --locked
fi
# cargo-fuzz (scripts/fuzz.sh): ~2 min to build on 2 cores. Works on stable Rust with
# RUSTC_BOOTSTRAP=1, which scripts/fuzz.sh sets.
if cargo fuzz --version >/dev/null 2>&1; then
    log "$(cargo fuzz --version | head -1)"
else
    log "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

for tool in iscsi-ls iscsi-inq iscsi-readcapacity16 iscsi-test-cu iscsi-perf tgtd tgtadm tgt-admin \
    qemu-img qemu-io fio sg_unmap jq; do
    command -v "$tool" >/dev/null || { log "missing $tool after install"; exit 1; }
done
log "done"
