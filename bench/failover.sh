#!/usr/bin/env bash
# Leader failover time of a replicated volume: kill -9 of the volume leader's node to the first
# successful write through a surviving node's portal, over N trials.
#
#   bench/failover.sh [-n TRIALS] [-z SIZE] [-w WARMUP_S] [-e MIN,MAX] [-a FIRST_ADDR] [-o OUT.json]
#
#   -n TRIALS      trials                                                            [20]
#   -z SIZE        size of the demo volume                                           [256M]
#   -w WARMUP_S    seconds of writes before each kill                                [1]
#   -e MIN,MAX     election timeout range in ms: rewrite it in every node.toml and restart the
#                  nodes one by one before the first trial                   [the demo's: 150,300]
#   -a FIRST_ADDR  node 1's loopback address; nodes 2 and 3 take the next two        [127.0.0.53]
#   -o FILE        JSON results                                                      [bench/failover.json]
#
# Starts `raftsan demo` (three real `raftsan serve` processes, one replicated volume "demo",
# fsync = on-flush unless DEMO_FSYNC says otherwise, heartbeat 50 ms, election timeout 150-300 ms). Each trial:
#   1. waits until all three nodes answer and have applied the same index of the volume's group,
#      and reads the volume leader L from `raftsan status --json`;
#   2. bench/failover_writer.py logs in to the portal of another node S (a survivor), writes 4 KiB
#      (WRITE(16), queue depth 1, libiscsi) for WARMUP_S seconds, sends SIGKILL to L's
#      `raftsan serve` and keeps writing; it reports the time from the kill to the GOOD completion
#      of the first write issued after the kill (failed writes are retried at once);
#   3. checks with `raftsan status` that a different node now leads the volume in a newer term;
#   4. restarts L (`raftsan serve --config D/nodeL/node.toml`, log appended to D/nodeL/raftsan.log)
#      and waits until it has caught up (applied indexes of the volume's group equal everywhere).
# Prints one line per trial and p50/max, writes OUT. A benchmark: it never fails on the figures.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"

TRIALS=20
SIZE=256M
WARMUP=1
ELECTION=""
FIRST=127.0.0.53
OUT="$REPO/bench/failover.json"
while getopts "n:z:w:e:a:o:h" opt; do
    case $opt in
    n) TRIALS=$OPTARG ;;
    z) SIZE=$OPTARG ;;
    w) WARMUP=$OPTARG ;;
    e) ELECTION=$OPTARG ;;
    a) FIRST=$OPTARG ;;
    o) OUT=$OPTARG ;;
    *) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
    esac
done
[[ -z "$ELECTION" || "$ELECTION" =~ ^[0-9]+,[0-9]+$ ]] || die "-e takes MIN,MAX in milliseconds"
require_loopback "$FIRST"
for tool in python3 jq qemu-img iscsi-ls pgrep; do
    command -v "$tool" >/dev/null || die "$tool missing (scripts/install-deps.sh)"
done
python3 -c 'import ctypes; ctypes.CDLL("libiscsi.so.7")' 2>/dev/null || die "libiscsi.so.7 missing (libiscsi7)"
BIN="$(raftsan_bin)"
[[ -x "$BIN" ]] || die "raftsan binary not found at $BIN (cargo build --release -p raftsan-cluster --bin raftsan)"
WRITER="$REPO/bench/failover_writer.py"
VOLUME=demo
TARGET="iqn.2026-11.org.raftsan:demo"
LUN=1

WORK="$(target_dir)/bench"
mkdir -p "$WORK"
DIR="$(cd "$WORK" && pwd)/failover-cluster"
rm -rf "$DIR"
mkdir -p "$DIR"
TRIALS_FILE="$DIR/trials.jsonl"

DEMO_PID=""
declare -A OURS # node id -> pid of a `raftsan serve` this script restarted
cleanup() {
    local n
    for n in "${!OURS[@]}"; do stop_pid "${OURS[$n]}"; done
    [[ -n "$DEMO_PID" ]] && stop_pid "$DEMO_PID" INT
    return 0
}
trap cleanup EXIT

# status_json [SKIP_NODE]: `raftsan status --json` from the first node (other than SKIP_NODE)
# that answers; empty output when none does.
status_json() {
    local skip=${1:-0} n
    for n in 1 2 3; do
        [[ $n == "$skip" ]] && continue
        timeout 5 "$BIN" status --json --config "$DIR/node$n/node.toml" 2>/dev/null && return 0
    done
    return 0
}

# The volume group's leader as "LEADER TERM" (highest term any node reports), or nothing.
leader_term() {
    jq -r --arg v "$VOLUME" '[.nodes[].groups[] | select(.name == $v and .leader != 0)]
        | if length == 0 then empty else (max_by(.term) | "\(.leader) \(.term)") end' 2>/dev/null
}

# in_sync: all three nodes reachable, each reports the volume group with one leader and the same
# applied index. Prints the applied index when so.
in_sync() {
    jq -r --arg v "$VOLUME" '
        [.nodes[] | select(.reachable) | .groups[] | select(.name == $v)] as $g
        | if ($g | length) == 3 and ([$g[].applied_index] | unique | length) == 1
             and ([$g[].leader] | unique | length) == 1 and $g[0].leader != 0
          then $g[0].applied_index else empty end' 2>/dev/null
}

portal_of() { # portal_of NODE < status json
    jq -r --argjson n "$1" '.nodes[] | select(.id == $n) | .portals[0]'
}

# gone PID: the process has exited (or is a zombie its parent has not reaped yet).
gone() { [[ ! -e /proc/$1/stat ]] || [[ $(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null) == Z ]]; }

# start_node N: `raftsan serve` for node N exactly as the demo starts it (log appended), as our
# child (disowned: bash reaps it without a job notice when a trial kills it).
start_node() {
    RUST_LOG="${RUST_LOG:-info}" "$BIN" serve --config "$DIR/node$1/node.toml" \
        </dev/null >>"$DIR/node$1/raftsan.log" 2>&1 &
    OURS[$1]=$!
    disown "$!"
}

# wait_in_sync SECONDS: until in_sync holds; prints the seconds it took, fails on timeout.
wait_in_sync() {
    local secs=$1 t0 s
    t0=$(date +%s.%N)
    while true; do
        s=$(status_json)
        if [[ -n "$s" && -n "$(in_sync <<<"$s")" ]]; then
            awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f\n", b - a }'
            return 0
        fi
        awk -v a="$t0" -v b="$(date +%s.%N)" -v m="$secs" 'BEGIN { exit !(b - a > m) }' && return 1
        sleep 0.2
    done
}

log "starting raftsan demo on $FIRST and the next two addresses (volume $SIZE) in $DIR"
start_cluster_demo "$FIRST" "$DIR" "$DIR/demo.log" "$SIZE"
DEMO_PID=$STARTED_PID
SPAN=$(($(numfmt --from=iec "$SIZE") / 512))
wait_in_sync 60 >/dev/null || die "cluster not in sync after start; see $DIR/demo.log"
if [[ -n "$ELECTION" ]]; then
    for n in 1 2 3; do
        sed -i "s/^election_timeout_ms = .*/election_timeout_ms = [${ELECTION/,/, }]/" "$DIR/node$n/node.toml"
        pid=$(pgrep -f "serve --config $DIR/node$n/node.toml\$" || true)
        [[ -n "$pid" ]] && kill -TERM "$pid"
        for ((i = 0; i < 200; i++)); do gone "$pid" && break; sleep 0.05; done
        gone "$pid" || die "node $n did not stop on SIGTERM"
        start_node "$n"
        wait_in_sync 60 >/dev/null || die "node $n did not rejoin after the restart with election timeout [$ELECTION]"
    done
    log "election timeout set to [$ELECTION] ms on every node (nodes restarted)"
fi
log "cluster ready (demo pid $DEMO_PID)"
: >"$TRIALS_FILE"

T0=$(date +%s)
for ((trial = 1; trial <= TRIALS; trial++)); do
    wait_in_sync 120 >/dev/null || die "trial $trial: nodes did not converge within 120 s"
    st=$(status_json)
    read -r old_leader old_term < <(leader_term <<<"$st")
    pids=$(pgrep -f "serve --config $DIR/node$old_leader/node.toml\$" || true)
    [[ $(wc -w <<<"$pids") -eq 1 ]] || die "trial $trial: expected one process for node $old_leader, found '$pids'"
    survivor=$((old_leader % 3 + 1))
    portal=$(portal_of "$survivor" <<<"$st")
    res=$(python3 "$WRITER" --portal "$portal" --target "$TARGET" --lun "$LUN" --kill-pid "$pids" \
        --warmup "$WARMUP" --span-blocks "$SPAN" --lba-base 0) || true
    [[ -n "$res" ]] || die "trial $trial: the writer gave no result"
    # The new leader, as the survivors report it.
    new_leader="" new_term=""
    for ((i = 0; i < 50; i++)); do
        read -r new_leader new_term < <(status_json "$old_leader" | leader_term) || true
        [[ -n "$new_leader" && "$new_leader" != "$old_leader" ]] && break
        sleep 0.1
    done
    # Restart the killed node exactly as the demo started it.
    start_node "$old_leader"
    catchup=$(wait_in_sync 120) || die "trial $trial: node $old_leader did not catch up within 120 s"
    jq -c --argjson t "$trial" --argjson ol "$old_leader" --argjson ot "$old_term" \
        --argjson nl "${new_leader:-0}" --argjson nt "${new_term:-0}" --argjson s "$survivor" \
        --argjson c "$catchup" \
        '{trial: $t, old_leader: $ol, old_term: $ot, new_leader: $nl, new_term: $nt, writer_node: $s,
          catchup_s: $c} + .' <<<"$res" >>"$TRIALS_FILE"
    jq -r '"trial \(.trial): leader node \(.old_leader) (term \(.old_term)) killed; writes through node \(.writer_node): first GOOD write \(.kill_to_first_good_ms) ms after the kill (\(.failed_writes) failed writes, longest gap \(.gap_ms) ms); new leader node \(.new_leader) term \(.new_term); restarted node caught up in \(.catchup_s) s"' \
        <<<"$(tail -1 "$TRIALS_FILE")" >&2
done
ELAPSED=$(($(date +%s) - T0))

ELECTION_MS=$(grep -h '^election_timeout_ms' "$DIR/node1/node.toml" | sed 's/.*= *//')
HEARTBEAT_MS=$(grep -h '^heartbeat_ms' "$DIR/node1/node.toml" | sed 's/.*= *//')
python3 - "$TRIALS_FILE" "$OUT" "$ELAPSED" "$WARMUP" "$SIZE" "$ELECTION_MS" "$HEARTBEAT_MS" <<'EOF'
import json, statistics, sys, os
trials = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ok = [t["kill_to_first_good_ms"] for t in trials if t.get("kill_to_first_good_ms") is not None]
def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))] if v else None
summary = {
    "what": "kill -9 of the volume leader's raftsan serve -> GOOD completion of the first 4 KiB write "
            "issued after the kill through a surviving node's portal (libiscsi, queue depth 1)",
    "trials": len(trials),
    "succeeded": len(ok),
    "p50_ms": round(statistics.median(ok), 1) if ok else None,
    "p90_ms": round(pct(ok, 90), 1) if ok else None,
    "max_ms": round(max(ok), 1) if ok else None,
    "min_ms": round(min(ok), 1) if ok else None,
    "goal_p50_ms": 1000,
    "leader_changed_every_trial": all(t["new_leader"] not in (0, t["old_leader"]) and t["new_term"] > t["old_term"] for t in trials),
    "failed_writes_total": sum(t["failed_writes"] for t in trials),
    "catchup_p50_s": round(statistics.median([t["catchup_s"] for t in trials]), 2) if trials else None,
    "warmup_s": float(sys.argv[4]),
    "election_timeout_ms": json.loads(sys.argv[6]),
    "heartbeat_ms": json.loads(sys.argv[7]),
    "volume_size": sys.argv[5],
    "elapsed_seconds": int(sys.argv[3]),
    "host_cpus": os.cpu_count(),
    "results": trials,
}
with open(sys.argv[2], "w") as f:
    json.dump(summary, f, indent=2)
    f.write("\n")
print()
print("%-6s %-8s %-8s %12s %10s %8s %10s" % ("trial", "killed", "new", "first GOOD", "max gap", "failed", "catch-up"))
for t in trials:
    print("%-6d node %-3d node %-3d %9s ms %7s ms %8d %8.2f s" % (
        t["trial"], t["old_leader"], t["new_leader"], t["kill_to_first_good_ms"], t.get("gap_ms"),
        t["failed_writes"], t["catchup_s"]))
print()
print("kill -9 of the leader -> first GOOD write: p50 %s ms, p90 %s ms, max %s ms, min %s ms over %d/%d trials (goal: p50 < 1000 ms)" % (
    summary["p50_ms"], summary["p90_ms"], summary["max_ms"], summary["min_ms"], len(ok), len(trials)))
print("leader changed to another node in a newer term in every trial: %s; failed writes in all: %d; restarted node caught up in %s s (p50)" % (
    summary["leader_changed_every_trial"], summary["failed_writes_total"], summary["catchup_p50_s"]))
print("JSON: %s" % sys.argv[2])
EOF
echo "node logs: $DIR/node{1,2,3}/raftsan.log; ERROR/panic lines:" \
    "$(grep -cE 'ERROR|panicked' "$DIR"/node*/raftsan.log | tr '\n' ' ')"
