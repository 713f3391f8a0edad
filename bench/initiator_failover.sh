#!/usr/bin/env bash
# Client-visible failover stall through raftsan-initiator: fio writes and verifies through the
# initiator's NBD export while the node leading the volume is killed with SIGKILL, over N trials.
#
#   bench/initiator_failover.sh [-n TRIALS] [-t RUNTIME_S] [-k KILL_AFTER_S] [-z SIZE] [-a FIRST_ADDR] [-o OUT.json]
#
#   -n TRIALS       trials                                                         [20]
#   -t RUNTIME_S    fio run time of each trial                                     [10]
#   -k KILL_AFTER_S seconds after fio starts when the leader's node is killed      [3]
#   -z SIZE         size of the demo volume (fio writes over the first 64 MiB)     [256M]
#   -a FIRST_ADDR   node 1's loopback address; nodes 2 and 3 take the next two     [127.0.0.57]
#   -o FILE         JSON results                                                   [bench/initiator_failover.json]
#
# Starts `raftsan demo` (three `raftsan serve`, volume "demo" = iqn.2026-11.org.raftsan:demo LUN 1,
# heartbeat 50 ms, election timeout 300-600 ms) and one `raftsan-initiator attach` (release build,
# NBD on a Unix socket, timeouts noop_interval 500ms, noop_timeout 1s, command 5s,
# no_path_retry 30s) that stays up over all trials. Each trial:
#   1. waits until the three nodes have applied the same index of the volume's group under one
#      leader L that has led for 8 s (leadership moves to the preferred replica 5 s after an
#      election), and until the initiator has its three paths up;
#   2. fio --ioengine=nbd: 4 KiB random writes at queue depth 8 with verify=crc32c
#      (verify_backlog 64, verify_fatal, do_verify) for RUNTIME_S seconds; KILL_AFTER_S in,
#      SIGKILL to L's `raftsan serve`;
#   3. fio must end without error; its longest write latency (jobs[0].write.lat_ns.max) is the
#      client-visible stall. fio interleaves verify reads (verify_backlog), so a kill that lands
#      while it reads shows up in read.lat_ns.max instead: stall_any_ms is the larger of the two.
#      fio's per-I/O latency log (--write_lat_log, Unix-epoch timestamps) tells when the slowest
#      I/O was issued and completed relative to the kill; the script also records when the killed
#      process had actually exited;
#   4. restarts L as the demo started it (`raftsan serve --config D/nodeL/node.toml`, log appended
#      to D/nodeL/raftsan.log).
# Prints every trial and p50/p90/max, writes OUT. RAFTSAN_LOG=debug gives a detailed initiator log
# (kept in build/bench/initiator-failover/initiator.log with each trial's kill time in the JSON).
# A benchmark: it never fails on the figures (a trial where fio fails is recorded as failed).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"

TRIALS=20
RUNTIME=10
KILL_AFTER=3
SIZE=256M
FIRST=127.0.0.57
OUT="$REPO/bench/initiator_failover.json"
while getopts "n:t:k:z:a:o:h" opt; do
    case $opt in
    n) TRIALS=$OPTARG ;;
    t) RUNTIME=$OPTARG ;;
    k) KILL_AFTER=$OPTARG ;;
    z) SIZE=$OPTARG ;;
    a) FIRST=$OPTARG ;;
    o) OUT=$OPTARG ;;
    *) sed -n '2,35p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
    esac
done
require_loopback "$FIRST"
for tool in fio jq python3 pgrep; do
    command -v "$tool" >/dev/null || die "$tool missing (scripts/install-deps.sh)"
done
fio --enghelp 2>/dev/null | grep -qw nbd || die "this fio has no nbd engine (Debian's fio >= 3.19 has it)"
BIN="$(raftsan_bin)"
[[ -x "$BIN" ]] || die "raftsan binary not found at $BIN (cargo build --release -p raftsan-cluster, or set RAFTSAN_BIN)"
IBIN="${RAFTSAN_INITIATOR_BIN:-$(dirname "$BIN")/raftsan-initiator}"
[[ -x "$IBIN" ]] || die "raftsan-initiator not found at $IBIN (cargo build --release -p raftsan-initiator, or set RAFTSAN_INITIATOR_BIN)"

VOLUME=demo
IQN="iqn.2026-11.org.raftsan:demo"
PORT=3260
INITIATOR="iqn.2026-11.org.raftsan.bench:failover"
WORK="$(target_dir)/bench"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)/initiator-failover"
DIR="$WORK/cluster"
rm -rf "$WORK"
mkdir -p "$WORK"
SOCK="$WORK/nbd.sock"
NBD_URI="nbd+unix:///?socket=$SOCK"
TRIALS_FILE="$WORK/trials.jsonl"

DEMO_PID=""
ATTACH_PID=""
FIO_PID=""
declare -A OURS # node id -> pid of a `raftsan serve` this script restarted
cleanup() {
    local n
    [[ -n "$FIO_PID" ]] && stop_pid "$FIO_PID" KILL
    [[ -n "$ATTACH_PID" ]] && stop_pid "$ATTACH_PID"
    for n in "${!OURS[@]}"; do stop_pid "${OURS[$n]}"; done
    [[ -n "$DEMO_PID" ]] && stop_pid "$DEMO_PID" INT
    # The demo's nodes stop on SIGTERM when the demo exits (stop_pid may have had to KILL it):
    # wait for them (this cluster's processes only, by pid) before removing their data.
    local pids i
    for ((i = 0; i < 100; i++)); do
        pids=$(pgrep -f "serve --config $DIR/node[123]/node.toml\$" || true)
        [[ -z "$pids" ]] && break
        ((i == 80)) && kill -KILL $pids 2>/dev/null
        sleep 0.1
    done
    for n in 1 2 3; do cp "$DIR/node$n/raftsan.log" "$WORK/node$n.log" 2>/dev/null || true; done
    rm -rf "$DIR" "$WORK/run" # replicas and Raft logs; the logs stay in $WORK
    return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM # run the EXIT trap on Ctrl-C and kill too

# status_json [SKIP_NODE]: `raftsan status --json` from the first node (not SKIP_NODE) that answers.
status_json() {
    local skip=${1:-0} n
    for n in 1 2 3; do
        [[ $n == "$skip" ]] && continue
        timeout 5 "$BIN" status --json --config "$DIR/node$n/node.toml" 2>/dev/null && return 0
    done
    return 0
}
# "LEADER TERM" of the volume's group (highest term any node reports), or nothing.
leader_term() {
    jq -r --arg v "$VOLUME" '[.nodes[].groups[] | select(.name == $v and .leader != 0)]
        | if length == 0 then empty else (max_by(.term) | "\(.leader) \(.term)") end' 2>/dev/null
}
# healthy: three reachable voters with one leader and the same applied index; prints the leader.
healthy() {
    status_json | jq -r --arg v "$VOLUME" '
        [.nodes[] | select(.reachable) | .groups[] | select(.name == $v)] as $g
        | if ($g | length) == 3 and ([$g[].applied_index] | unique | length) == 1
             and ([$g[].leader] | unique | length) == 1 and $g[0].leader != 0
          then $g[0].leader else empty end' 2>/dev/null
}
paths_up() {
    "$IBIN" --config "$WORK/initiator.toml" session --json 2>/dev/null |
        jq -r '[.[0].device.paths[] | select(.status == "up")] | length' 2>/dev/null || echo 0
}
counters() {
    "$IBIN" --config "$WORK/initiator.toml" session --json 2>/dev/null |
        jq -c '.[0].device | {failovers, retried_commands}' 2>/dev/null || echo '{}'
}
# wait_ready SECONDS: healthy with the same leader for 8 s and 3 initiator paths up; prints the
# seconds it took and the leader.
wait_ready() {
    local secs=$1 t0 now l last="" since
    t0=$(date +%s.%N)
    since=$(date +%s)
    while true; do
        l=$(healthy)
        now=$(date +%s)
        if [[ -n "$l" && "$l" == "$last" ]]; then
            if ((now - since >= 8)) && [[ $(paths_up) == 3 ]]; then
                awk -v a="$t0" -v b="$(date +%s.%N)" -v l="$l" 'BEGIN { printf "%.1f %d\n", b - a, l }'
                return 0
            fi
        else
            last=$l
            since=$now
        fi
        awk -v a="$t0" -v b="$(date +%s.%N)" -v m="$secs" 'BEGIN { exit !(b - a > m) }' && return 1
        sleep 0.25
    done
}
# gone PID: the process has exited (or is a zombie not yet reaped).
gone() { [[ ! -e /proc/$1/stat ]] || [[ $(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null) == Z ]]; }
# start_node N: `raftsan serve` for node N exactly as the demo starts it (log appended), disowned.
start_node() {
    RUST_LOG="${RUST_LOG:-info}" "$BIN" serve --config "$DIR/node$1/node.toml" \
        </dev/null >>"$DIR/node$1/raftsan.log" 2>&1 &
    OURS[$1]=$!
    disown "$!"
}

log "starting raftsan demo on $FIRST and the next two addresses (volume $SIZE) in $DIR"
start_cluster_demo "$FIRST" "$DIR" "$WORK/demo.log" "$SIZE"
DEMO_PID=$STARTED_PID

cat >"$WORK/initiator.toml" <<EOF
initiator_name = "$INITIATOR"
run_dir = "$WORK/run"

[timeouts]
noop_interval = "500ms"
noop_timeout = "1s"
command = "5s"
no_path_retry = "30s"
EOF
log "attaching $IQN LUN 1 with raftsan-initiator through $FIRST:$PORT, NBD on $SOCK (RAFTSAN_LOG=${RAFTSAN_LOG:-info})"
RAFTSAN_LOG="${RAFTSAN_LOG:-info}" NO_COLOR=1 "$IBIN" --config "$WORK/initiator.toml" attach "$IQN" \
    --portal "$FIRST:$PORT" --lun 1 --nbd "unix:$SOCK" </dev/null >"$WORK/initiator.out" 2>"$WORK/initiator.log" &
ATTACH_PID=$!
for ((i = 0; i < 300; i++)); do
    kill -0 "$ATTACH_PID" 2>/dev/null || die "raftsan-initiator attach exited; log: $WORK/initiator.log"
    [[ -S "$SOCK" ]] && break
    sleep 0.1
done
[[ -S "$SOCK" ]] || die "the NBD export did not come up; log: $WORK/initiator.log"
: >"$TRIALS_FILE"

T0=$(date +%s)
for ((trial = 1; trial <= TRIALS; trial++)); do
    kill -0 "$ATTACH_PID" 2>/dev/null || die "raftsan-initiator attach exited; log: $WORK/initiator.log"
    read -r ready_s leader < <(wait_ready 180) || die "trial $trial: cluster not healthy or paths not up within 180 s"
    read -r _ old_term < <(status_json | leader_term) || old_term=0
    pid=$(pgrep -f "serve --config $DIR/node$leader/node.toml\$" || true)
    [[ $(wc -w <<<"$pid") -eq 1 ]] || die "trial $trial: expected one process for node $leader, found '$pid'"
    before=$(counters)
    rm -f "$WORK/fio.json" "$WORK/fio.err"
    fio --name=failover --ioengine=nbd "--uri=$NBD_URI" --rw=randwrite --bs=4k --iodepth=8 --size=64M \
        --verify=crc32c --verify_backlog=64 --verify_fatal=1 --do_verify=1 --time_based=1 "--runtime=$RUNTIME" \
        --randrepeat=0 --output-format=json "--output=$WORK/fio.json" \
        "--write_lat_log=$WORK/lat-trial$trial" --log_avg_msec=0 --log_unix_epoch=1 </dev/null >/dev/null 2>"$WORK/fio.err" &
    FIO_PID=$!
    fio_at=$(date +%s.%N)
    sleep "$KILL_AFTER"
    kill -KILL "$pid"
    kill_at=$(date +%s.%N)
    # A process blocked in the kernel (fsync on a busy disk) dies only when that call returns:
    # until then its connections stay open and no reset reaches the initiator.
    for ((i = 0; i < 500; i++)); do gone "$pid" && break; sleep 0.01; done
    died_ms=$(awk -v a="$kill_at" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", (b - a) * 1000 }')
    fio_rc=0
    wait "$FIO_PID" || fio_rc=$?
    FIO_PID=""
    # The new leader, as the survivors report it.
    read -r new_leader new_term < <(status_json "$leader" | leader_term) || { new_leader=0; new_term=0; }
    after=$(counters)
    start_node "$leader"
    cp "$WORK/fio.json" "$WORK/fio-trial$trial.json" 2>/dev/null || true
    # When the slowest I/O (a write, or one of fio's verify reads) was issued and completed, in ms
    # after the kill (fio's per-I/O logs with Unix-epoch timestamps in ms at completion, latency
    # in ns; the verify reads are in the same log as direction 0).
    slowest=$(awk -F', *' -v k="$kill_at" '
        $2 + 0 > max { max = $2 + 0; t = $1 + 0 }
        END { if (max > 0) printf "{\"slowest_issued_after_kill_ms\": %d, \"slowest_done_after_kill_ms\": %d}", t - max / 1e6 - k * 1000, t - k * 1000 }' \
        "$WORK"/lat-trial"$trial"_lat.*.log 2>/dev/null) || slowest=""
    slow_n=$(awk -F', *' '$3 == 1 && $2 + 0 > 1e8' "$WORK"/lat-trial"$trial"_lat.*.log 2>/dev/null | wc -l) || slow_n=0
    [[ -n "$slowest" ]] || slowest='{}'
    rm -f "$WORK"/lat-trial"$trial"_clat.*.log "$WORK"/lat-trial"$trial"_slat.*.log
    slowest=$(jq -c --argjson n "$slow_n" '. + {writes_over_100ms: $n}' <<<"$slowest" 2>/dev/null || echo '{}')
    res=$(sed -n '/^{/,$p' "$WORK/fio.json" 2>/dev/null | jq -c --argjson rc "$fio_rc" '.jobs[0]
        | {fio_exit: $rc, fio_error: .error, stall_ms: (.write.lat_ns.max / 1e6 * 10 | round / 10),
           read_stall_ms: (.read.lat_ns.max / 1e6 * 10 | round / 10),
           stall_any_ms: ([.write.lat_ns.max, .read.lat_ns.max] | max / 1e6 * 10 | round / 10),
           write_lat_p50_ms: ((.write.clat_ns.percentile["50.000000"] // 0) / 1e6 * 100 | round / 100),
           writes: .write.total_ios, verify_reads: .read.total_ios}' 2>/dev/null) || res=""
    [[ -n "$res" ]] || res=$(jq -nc --argjson rc "$fio_rc" '{fio_exit: $rc, fio_error: null, stall_ms: null}')
    err=$(grep -v '^$' "$WORK/fio.err" 2>/dev/null | tail -2 | tr '\n' ' ' || true)
    jq -c --argjson t "$trial" --argjson ol "$leader" --argjson ot "${old_term:-0}" \
        --argjson nl "${new_leader:-0}" --argjson nt "${new_term:-0}" --argjson r "$ready_s" \
        --arg k "$(date -u -d "@$kill_at" +%H:%M:%S.%3N)" --arg f "$(date -u -d "@$fio_at" +%H:%M:%S.%3N)" --argjson sl "$slowest" --argjson dm "$died_ms" --argjson b "$before" --argjson a "$after" --arg e "$err" \
        '{trial: $t, killed_leader: $ol, old_term: $ot, new_leader: $nl, new_term: $nt, kill_utc: $k,
          ready_before_s: $r,
          fio_start_utc: $f, killed_process_gone_after_ms: $dm,
          initiator_failovers: (($a.failovers // 0) - ($b.failovers // 0)),
          retried_commands: (($a.retried_commands // 0) - ($b.retried_commands // 0))} + .
          + $sl + (if $e == "" then {} else {fio_stderr: $e} end)' <<<"$res" >>"$TRIALS_FILE"
    jq -r '"trial \(.trial): leader node \(.killed_leader) killed at \(.kill_utc) UTC; new leader node \(.new_leader) (term \(.new_term)); fio exit \(.fio_exit) error \(.fio_error); longest write \(.stall_ms) ms, read \(.read_stall_ms) ms (slowest I/O done \(.slowest_done_after_kill_ms) ms after the kill); \(.writes) writes, \(.verify_reads) verify reads; initiator failovers \(.initiator_failovers), retried commands \(.retried_commands)"' \
        <<<"$(tail -1 "$TRIALS_FILE")" >&2
done
ELAPSED=$(($(date +%s) - T0))

python3 - "$TRIALS_FILE" "$OUT" "$ELAPSED" "$RUNTIME" "$KILL_AFTER" "$SIZE" <<'EOF'
import json, os, statistics, sys
trials = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ok = [t for t in trials if t["fio_exit"] == 0 and t["fio_error"] == 0 and t["stall_ms"] is not None]
st = sorted(t["stall_ms"] for t in ok)
sa = sorted(t.get("stall_any_ms") or t["stall_ms"] for t in ok)
def pct(v, p):
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))] if v else None
summary = {
    "what": "fio (nbd engine, 4 KiB randwrite QD8, verify=crc32c) through raftsan-initiator attach; "
            "SIGKILL of the volume leader's raftsan serve; stall = fio's max write latency, "
            "stall_any = max over writes and fio's interleaved verify reads",
    "trials": len(trials),
    "fio_clean": len(ok),
    "stall_p50_ms": round(statistics.median(st), 1) if st else None,
    "stall_p90_ms": pct(st, 90),
    "stall_max_ms": max(st) if st else None,
    "stall_min_ms": min(st) if st else None,
    "stall_any_p50_ms": round(statistics.median(sa), 1) if sa else None,
    "stall_any_p90_ms": pct(sa, 90),
    "stall_any_max_ms": max(sa) if sa else None,
    "stall_any_min_ms": min(sa) if sa else None,
    "goal_max_ms": 1000,
    "trials_over_1s": sum(1 for s in sa if s > 1000),
    "leader_changed_every_trial": all(t["new_leader"] not in (0, t["killed_leader"]) for t in trials),
    "initiator_timeouts": {"noop_interval": "500ms", "noop_timeout": "1s", "command": "5s", "no_path_retry": "30s"},
    "fio_runtime_s": int(sys.argv[4]),
    "kill_after_s": float(sys.argv[5]),
    "volume_size": sys.argv[6],
    "elapsed_seconds": int(sys.argv[3]),
    "host_cpus": os.cpu_count(),
    "results": trials,
}
with open(sys.argv[2], "w") as f:
    json.dump(summary, f, indent=2)
    f.write("\n")
print()
print("%-6s %-7s %-7s %-13s %5s %9s %8s %11s %11s %8s %6s %7s %7s" % (
    "trial", "killed", "new", "kill (UTC)", "fio", "write ms", "read ms", "issued(ms)", "done(ms)", "gone ms",
    ">100ms", "writes", "verify"))
for t in trials:
    print("%-6d node %-2d node %-2d %-13s %5s %9s %8s %11s %11s %8s %6s %7s %7s" % (
        t["trial"], t["killed_leader"], t["new_leader"], t["kill_utc"],
        "ok" if t in ok else "FAIL", t["stall_ms"], t.get("read_stall_ms"), t.get("slowest_issued_after_kill_ms"),
        t.get("slowest_done_after_kill_ms"), t.get("killed_process_gone_after_ms"), t.get("writes_over_100ms"),
        t.get("writes"), t.get("verify_reads")))
print("write/read ms: fio's longest write / verify-read latency; issued/done: when the slowest I/O was issued and")
print("completed, in ms after the kill (fio's per-I/O log);")
print("gone: when the killed node's process had exited; >100ms: writes slower than 100 ms")
print()
print("client-visible stall (fio max write latency) over %d/%d clean trials: p50 %s ms, p90 %s ms, max %s ms, min %s ms" % (
    len(ok), len(trials), summary["stall_p50_ms"], summary["stall_p90_ms"], summary["stall_max_ms"], summary["stall_min_ms"]))
print("longest I/O of any kind (writes and verify reads): p50 %s ms, p90 %s ms, max %s ms, min %s ms; %d trial(s) over 1 s (goal: max < 1000 ms)" % (
    summary["stall_any_p50_ms"], summary["stall_any_p90_ms"], summary["stall_any_max_ms"], summary["stall_any_min_ms"],
    summary["trials_over_1s"]))
print("leader changed in every trial: %s; JSON: %s" % (summary["leader_changed_every_trial"], sys.argv[2]))
EOF
echo "logs: $WORK/initiator.log, $WORK/node{1,2,3}.log, fio output $WORK/fio-trial*.json"
