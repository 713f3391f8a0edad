# shellcheck shell=bash
# Shared helpers for scripts/*.sh and bench/run.sh: locate the build directory and the raftsan
# binary, start tgtd or raftsan on a loopback portal with a file-backed LUN, wait for the portal,
# stop what we started. Source it; it defines functions only (plus REPO).

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Cargo's build directory: CARGO_TARGET_DIR, else what cargo metadata says (the workspace moves it to
# build/ in .cargo/config.toml because the crate folder target/ is source), else build/.
target_dir() {
    if [[ -n "${CARGO_TARGET_DIR:-}" ]]; then
        printf '%s\n' "$CARGO_TARGET_DIR"
        return
    fi
    local dir=""
    if command -v cargo >/dev/null && command -v jq >/dev/null; then
        dir="$(cd "$REPO" && cargo metadata --format-version 1 --no-deps 2>/dev/null | jq -r .target_directory)" || dir=""
    fi
    printf '%s\n' "${dir:-$REPO/build}"
}

# The raftsan binary of the release profile (RAFTSAN_BIN overrides).
raftsan_bin() {
    if [[ -n "${RAFTSAN_BIN:-}" ]]; then
        printf '%s\n' "$RAFTSAN_BIN"
    else
        printf '%s/release/raftsan\n' "$(target_dir)"
    fi
}

# Refuse anything that is not a loopback IPv4 address: these scripts must never expose a portal.
require_loopback() {
    [[ "$1" =~ ^127\.[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "not a loopback IPv4 address: $1"
}

# wait_port ADDR PORT PID SECONDS: until ADDR:PORT accepts TCP; fails early if PID died.
wait_port() {
    local addr=$1 port=$2 pid=$3 secs=${4:-30} i
    for ((i = 0; i < secs * 10; i++)); do
        if (exec 3<>"/dev/tcp/$addr/$port") 2>/dev/null; then
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# A tgt targets.conf with one target, one file-backed LUN and open ACLs (tgt-admin adds
# initiator-address ALL when a target has no ACL line; raftsan treats no ACL line as open).
# write_targets_conf FILE IQN BACKING [EXTRA_LINES]
write_targets_conf() {
    local file=$1 iqn=$2 backing=$3 extra=${4:-}
    {
        printf '<target %s>\n' "$iqn"
        printf '    backing-store %s\n' "$backing"
        [[ -n "$extra" ]] && printf '%s\n' "$extra"
        printf '</target>\n'
    } >"$file"
}

# start_tgtd ADDR PORT CONTROL_PORT CONF LOGFILE: starts tgtd in the foreground (background job),
# loads CONF with tgt-admin, waits for the portal. Sets STARTED_PID.
start_tgtd() {
    local addr=$1 port=$2 cport=$3 conf=$4 logfile=$5 i
    require_loopback "$addr"
    command -v tgtd >/dev/null || die "tgtd not installed (scripts/install-deps.sh)"
    mkdir -p /var/run/tgtd
    tgtd -f -C "$cport" --iscsi "portal=$addr:$port" >"$logfile" 2>&1 &
    STARTED_PID=$!
    for ((i = 0; i < 100; i++)); do
        tgtadm -C "$cport" --mode sys --op show >/dev/null 2>&1 && break
        kill -0 "$STARTED_PID" 2>/dev/null || die "tgtd exited at start; log: $logfile"
        sleep 0.1
    done
    tgt-admin -C "$cport" -e -c "$conf" >>"$logfile" 2>&1 || die "tgt-admin failed on $conf; log: $logfile"
    wait_port "$addr" "$port" "$STARTED_PID" 30 || die "tgtd portal $addr:$port not up; log: $logfile"
}

# start_raftsan ADDR PORT CONF DATA_DIR LOGFILE [ADDR2]: raftsan serve on ADDR:PORT (and ADDR2:PORT,
# a second portal of the same node, when given), waits for the portals. Sets STARTED_PID.
start_raftsan() {
    local addr=$1 port=$2 conf=$3 data=$4 logfile=$5 addr2=${6:-} bin
    local listen=(--listen "$addr:$port")
    require_loopback "$addr"
    if [[ -n "$addr2" ]]; then
        require_loopback "$addr2"
        listen+=(--listen "$addr2:$port")
    fi
    bin="$(raftsan_bin)"
    [[ -x "$bin" ]] || die "raftsan binary not found at $bin (cargo build --release -p raftsan-cluster, or set RAFTSAN_BIN)"
    mkdir -p "$data"
    RUST_LOG="${RUST_LOG:-info}" "$bin" serve --config "$conf" "${listen[@]}" --data-dir "$data" \
        >"$logfile" 2>&1 &
    STARTED_PID=$!
    wait_port "$addr" "$port" "$STARTED_PID" 30 || die "raftsan portal $addr:$port not up; log: $logfile"
    if [[ -n "$addr2" ]]; then
        wait_port "$addr2" "$port" "$STARTED_PID" 30 || die "raftsan portal $addr2:$port not up; log: $logfile"
    fi
}

# start_cluster_demo FIRST_ADDR DIR LOG [SIZE]: `raftsan demo` (three nodes on FIRST_ADDR and the
# next two addresses, one replicated volume "demo" of SIZE, no demo client) in the background;
# waits until it is ready. STARTED_PID is the demo process (SIGINT/SIGTERM stops the nodes).
start_cluster_demo() {
    local first=$1 dir=$2 logfile=$3 size=${4:-256M} bin i
    require_loopback "$first"
    bin="$(raftsan_bin)"
    [[ -x "$bin" ]] || die "raftsan binary not found at $bin (cargo build --release -p raftsan-cluster, or set RAFTSAN_BIN)"
    mkdir -p "$dir"
    RUST_LOG="${RUST_LOG:-info}" "$bin" demo --no-client --first-address "$first" --dir "$dir" --size "$size" \
        --fsync "${DEMO_FSYNC:-on-flush}" >"$logfile" 2>&1 &
    STARTED_PID=$!
    for ((i = 0; i < 1200; i++)); do
        grep -q "running until Ctrl-C" "$logfile" 2>/dev/null && return 0
        kill -0 "$STARTED_PID" 2>/dev/null || die "raftsan demo exited; log: $logfile"
        sleep 0.1
    done
    die "raftsan demo not ready within 120 s; log: $logfile"
}

# start_cluster_relaxed FIRST_ADDR DIR LOG [SIZE]: the cluster of `raftsan demo` (three nodes on
# FIRST_ADDR and the next two addresses, one replicated volume "demo" of SIZE, target
# iqn.2026-11.org.raftsan:demo), set up with `raftsan demo --check-only`, then served by three
# `raftsan serve` processes with test-friendly settings: NOP-In pings at the node defaults (the
# demo's 1 s / 3 s drop the idle second path of iscsi-test-cu, which never reads it between tests)
# and a slower Raft heartbeat and election timeout (no leader change on a loaded machine during a
# conformance run). Logs: LOG (setup), DIR/node<i>/serve.log. Waits until every node sees a
# volume leader. STARTED_PID is a shell that stops the three nodes on SIGTERM.
start_cluster_relaxed() {
    local first=$1 dir=$2 logfile=$3 size=${4:-256M} bin i base ip conf
    require_loopback "$first"
    bin="$(raftsan_bin)"
    [[ -x "$bin" ]] || die "raftsan binary not found at $bin (cargo build --release -p raftsan-cluster, or set RAFTSAN_BIN)"
    mkdir -p "$dir"
    RUST_LOG="${RUST_LOG:-info}" timeout 300 "$bin" demo --check-only --first-address "$first" --dir "$dir" \
        --size "$size" >"$logfile" 2>&1 || die "raftsan demo --check-only failed; log: $logfile"
    for i in 1 2 3; do
        conf="$dir/node$i/node.toml"
        [[ -f $conf ]] || die "raftsan demo wrote no $conf"
        sed -i -e '/^nop_in_interval_ms *=/d' -e '/^nop_in_timeout_ms *=/d' \
            -e 's/^heartbeat_ms *=.*/heartbeat_ms = 150/' \
            -e 's/^election_timeout_ms *=.*/election_timeout_ms = [1500, 3000]/' "$conf"
        : >"$dir/node$i/serve.log"
    done
    (
        pids=()
        for i in 1 2 3; do
            RUST_LOG="${RUST_LOG:-info}" "$bin" serve --config "$dir/node$i/node.toml" \
                >>"$dir/node$i/serve.log" 2>&1 &
            pids+=($!)
        done
        trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait' TERM INT
        wait
    ) &
    STARTED_PID=$!
    base=${first##*.}
    for i in 1 2 3; do
        ip="${first%.*}.$((base + i - 1))"
        wait_port "$ip" 3260 "$STARTED_PID" 60 || die "node $i portal $ip:3260 not up; log: $dir/node$i/serve.log"
    done
    # The volume's leader settles: leadership moves to the volume's preferred replica 5 s after
    # an election (leader spreading), so wait until the same node has led for 8 s in a row.
    # CLUSTER_LEADER_IP is its portal address, CLUSTER_OTHER_IP another node's.
    local leader="" last="" since=0 now status
    for ((i = 0; i < 240; i++)); do
        kill -0 "$STARTED_PID" 2>/dev/null || die "cluster nodes exited; logs: $dir/node*/serve.log"
        status=$("$bin" status --json --config "$dir/node1/node.toml" 2>/dev/null || true)
        leader=$(jq -r '[.nodes[].groups[] | select(.name == "demo" and .leader != 0)] | max_by(.term) | .leader // empty' \
            <<<"$status" 2>/dev/null || true)
        now=$(date +%s)
        if [[ -n "$leader" && "$leader" == "$last" ]]; then
            if ((now - since >= 8)); then
                CLUSTER_LEADER_IP="${first%.*}.$((base + leader - 1))"
                CLUSTER_OTHER_IP="${first%.*}.$((base + (leader % 3)))"
                log "cluster volume leader: node $leader ($CLUSTER_LEADER_IP), second path $CLUSTER_OTHER_IP"
                return 0
            fi
        else
            last=$leader
            since=$now
        fi
        sleep 0.5
    done
    die "the volume's leader did not settle within 120 s; logs: $dir/node*/serve.log"
}

# stop_pid PID [SIGNAL]: SIGNAL (default TERM), then SIGKILL after 5 s. tgtd ignores SIGTERM once
# it has targets (and `tgtadm --op delete --mode system` refuses), so callers stop it with KILL.
stop_pid() {
    local pid=$1 sig=${2:-TERM} i
    kill -0 "$pid" 2>/dev/null || return 0
    kill "-$sig" "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || { { wait "$pid"; } 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    { wait "$pid"; } 2>/dev/null || true
} 2>/dev/null # also hides bash's "Killed" job notice
