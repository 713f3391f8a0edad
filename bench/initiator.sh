#!/usr/bin/env bash
# Cost of the initiator and NBD layer: the same workloads on one `raftsan demo` cluster, directly on
# the volume leader's portal with public iSCSI clients and through `raftsan-initiator attach`'s NBD
# export (Unix socket), interleaved in the same run.
#
#   bench/initiator.sh [-r ROUNDS] [-s SECONDS] [-c QEMU_COUNT] [-z SIZE] [-a FIRST_ADDR] [-o OUT.json]
#
#   -r ROUNDS      rounds; each round runs every workload direct, then through the initiator  [3]
#   -s SECONDS     run time of each iscsi-perf and fio run                                     [3]
#   -c QEMU_COUNT  4 KiB reads per qemu-img bench read run; write runs do a tenth (writes
#                  are replicated with fsync), 128 KiB read runs a sixth                       [60000]
#   -z SIZE        size of the demo volume, pre-filled with random bytes                      [256M]
#   -a FIRST_ADDR  node 1's loopback address; nodes 2 and 3 take the next two                 [127.0.0.57]
#   -o FILE        JSON results                                                                [bench/initiator.json]
#
# Cluster: `raftsan demo` (three `raftsan serve`, volume "demo" = iqn.2026-11.org.raftsan:demo
# LUN 1, fsync = $DEMO_FSYNC or on-flush). Initiator: `raftsan-initiator attach` (release build) given node 1's
# portal (SendTargets adds the other two), exporting on a Unix socket; it sends I/O down the
# active/optimized path, the leader's. Direct runs go to the portal of the node leading the volume
# at that moment (`raftsan status --json`). Workloads, pairs of (direct, via initiator+NBD):
#   randread-4k-qd32      iscsi-perf -r -b 8 -m 32           | fio nbd randread  bs=4k   iodepth=32
#   randwrite-4k-qd32     qemu-img bench -w -d 32 -s 4096    | fio nbd randwrite bs=4k   iodepth=32
#                         (sequential: no public random-write iSCSI client; see the qemu pairs)
#   seqread-128k-qd32     iscsi-perf -b 256 -m 32            | fio nbd read      bs=128k iodepth=32
#   qemu-read-4k-qd32     qemu-img bench -d 32 -s 4096, iscsi:// URL | the same on nbd+unix://
#   qemu-write-4k-qd32    qemu-img bench -w -d 32 -s 4096          | the same on nbd+unix://
#   qemu-read-128k-qd32   qemu-img bench -d 32 -s 131072           | the same on nbd+unix://
# The qemu-img rows are the apples-to-apples pairs (same client, same access pattern; qemu-img
# bench is sequential). Each figure is the median over the rounds; ratio = via/direct IOPS.
# MB/s is MiB/s. A benchmark, not a test: it prints figures and never fails on them.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"

ROUNDS=3
SECS=3
QEMU_COUNT=60000
SIZE=256M
FIRST=127.0.0.57
OUT="$REPO/bench/initiator.json"
while getopts "r:s:c:z:a:o:h" opt; do
    case $opt in
    r) ROUNDS=$OPTARG ;;
    s) SECS=$OPTARG ;;
    c) QEMU_COUNT=$OPTARG ;;
    z) SIZE=$OPTARG ;;
    a) FIRST=$OPTARG ;;
    o) OUT=$OPTARG ;;
    *) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
    esac
done
require_loopback "$FIRST"
for tool in fio iscsi-perf qemu-img jq python3; do
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
INITIATOR="iqn.2026-11.org.raftsan.bench:initiator"
WORK="$(target_dir)/bench"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)/initiator"
DIR="$WORK/cluster"
rm -rf "$WORK"
mkdir -p "$WORK"
SOCK="$WORK/nbd.sock"
NBD_URI="nbd+unix:///?socket=$SOCK"

DEMO_PID=""
ATTACH_PID=""
cleanup() {
    [[ -n "$ATTACH_PID" ]] && stop_pid "$ATTACH_PID"
    # SIGINT makes the demo stop its three nodes before it exits.
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
    rm -rf "$DIR" "$WORK/fill.img" "$WORK/run" # replicas and Raft logs; logs stay in $WORK
    return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM # run the EXIT trap on Ctrl-C and kill too

status_json() {
    local n
    for n in 1 2 3; do
        timeout 10 "$BIN" status --json --config "$DIR/node$n/node.toml" 2>/dev/null && return 0
    done
    return 0
}
# leader_portal: "NODE ADDR" of the volume's leader (highest term any node reports), or nothing.
leader_portal() {
    status_json | jq -r --arg v "$VOLUME" '
        ([.nodes[].groups[] | select(.name == $v and .leader != 0)] | max_by(.term) | .leader) as $l
        | if $l == null then empty else (.nodes[] | select(.id == $l) | "\($l) \(.portals[0] | sub(":[0-9]+$"; ""))") end' 2>/dev/null
}
# settle_leader QUIET_S: until the same node has led the volume for QUIET_S seconds (leadership
# moves to the volume's preferred replica 5 s after an election).
settle_leader() {
    local quiet=$1 last="" since now l i
    since=$(date +%s)
    for ((i = 0; i < 600; i++)); do
        read -r l _ < <(leader_portal) || l=""
        now=$(date +%s)
        if [[ -n "$l" && "$l" == "$last" ]]; then
            ((now - since >= quiet)) && return 0
        else
            last=$l
            since=$now
        fi
        sleep 0.5
    done
    return 1
}
in_sync() {
    status_json | jq -e --arg v "$VOLUME" '
        [.nodes[] | select(.reachable) | .groups[] | select(.name == $v)]
        | length == 3 and ([.[].applied_index] | unique | length) == 1' >/dev/null 2>&1
}
wait_in_sync() {
    local i
    for ((i = 0; i < $1 * 2; i++)); do
        in_sync && return 0
        sleep 0.5
    done
    return 1
}

log "starting raftsan demo on $FIRST and the next two addresses (volume $SIZE) in $DIR"
start_cluster_demo "$FIRST" "$DIR" "$WORK/demo.log" "$SIZE"
DEMO_PID=$STARTED_PID
settle_leader 8 || die "the volume's leader did not settle; log: $WORK/demo.log"
read -r node addr < <(leader_portal) || die "no volume leader; log: $WORK/demo.log"
log "pre-filling the volume with random bytes through node $node ($addr:$PORT)"
truncate -s "$SIZE" "$WORK/fill.img"
BYTES=$(stat -c %s "$WORK/fill.img")
head -c "$BYTES" /dev/urandom >"$WORK/fill.img"
qemu-img convert -n -W -m 16 -f raw -O raw "$WORK/fill.img" "iscsi://$addr:$PORT/$IQN/1" ||
    die "pre-filling the volume failed; log: $WORK/demo.log"
rm -f "$WORK/fill.img"
wait_in_sync 300 || die "the replicas did not converge after the pre-fill"

cat >"$WORK/initiator.toml" <<EOF
initiator_name = "$INITIATOR"
run_dir = "$WORK/run"
EOF
log "attaching $IQN LUN 1 with raftsan-initiator through $FIRST:$PORT, NBD on $SOCK"
RAFTSAN_LOG="${RAFTSAN_LOG:-info}" NO_COLOR=1 "$IBIN" --config "$WORK/initiator.toml" attach "$IQN" \
    --portal "$FIRST:$PORT" --lun 1 --nbd "unix:$SOCK" </dev/null >"$WORK/initiator.out" 2>"$WORK/initiator.log" &
ATTACH_PID=$!
paths_up() {
    "$IBIN" --config "$WORK/initiator.toml" session --json 2>/dev/null |
        jq -r '[.[0].device.paths[] | select(.status == "up")] | length' 2>/dev/null || echo 0
}
for ((i = 0; i < 300; i++)); do
    kill -0 "$ATTACH_PID" 2>/dev/null || die "raftsan-initiator attach exited; log: $WORK/initiator.log"
    [[ -S "$SOCK" && $(paths_up) == 3 ]] && break
    sleep 0.1
done
[[ -S "$SOCK" ]] || die "the NBD export did not come up; log: $WORK/initiator.log"
log "initiator up (pid $ATTACH_PID), $(paths_up) paths up"

TESTS=(randread-4k-qd32 randwrite-4k-qd32 seqread-128k-qd32 qemu-read-4k-qd32 qemu-write-4k-qd32 qemu-read-128k-qd32)
declare -A DIRECT_TOOL=(
    [randread-4k-qd32]="iscsi-perf -r -b 8 -m 32"
    [randwrite-4k-qd32]="qemu-img bench -w -d 32 -s 4096 (sequential)"
    [seqread-128k-qd32]="iscsi-perf -b 256 -m 32"
    [qemu-read-4k-qd32]="qemu-img bench -d 32 -s 4096"
    [qemu-write-4k-qd32]="qemu-img bench -w -d 32 -s 4096"
    [qemu-read-128k-qd32]="qemu-img bench -d 32 -s 131072"
)
declare -A VIA_TOOL=(
    [randread-4k-qd32]="fio nbd randread bs=4k iodepth=32"
    [randwrite-4k-qd32]="fio nbd randwrite bs=4k iodepth=32"
    [seqread-128k-qd32]="fio nbd read bs=128k iodepth=32"
    [qemu-read-4k-qd32]="qemu-img bench -d 32 -s 4096"
    [qemu-write-4k-qd32]="qemu-img bench -w -d 32 -s 4096"
    [qemu-read-128k-qd32]="qemu-img bench -d 32 -s 131072"
)

# iscsi_perf URL ARGS... -> "IOPS MiBps" or "0 0"
iscsi_perf() {
    local url=$1 out last
    shift
    out=$(timeout $((SECS + 30)) iscsi-perf -i "$INITIATOR" -t "$SECS" "$@" "$url" 2>&1 | tr '\r' '\n') || true
    last=$(grep -o 'iops average [0-9]* ([0-9]* MB/s)' <<<"$out" | tail -1)
    [[ -n "$last" ]] || { log "iscsi-perf $* failed: $(tail -3 <<<"$out")"; echo "0 0"; return; }
    awk '{ gsub(/[()]/, ""); print $3, $4 }' <<<"$last"
}
# qemu_bench URL BLOCK COUNT [-w] -> "IOPS MiBps" or "0 0"
qemu_bench() {
    local url=$1 bs=$2 count=$3 out secs
    shift 3
    out=$(timeout 300 qemu-img bench "$@" -d 32 -s "$bs" -c "$count" -t none -f raw "$url" 2>&1) || true
    secs=$(sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p' <<<"$out")
    [[ -n "$secs" ]] || { log "qemu-img bench $* -s $bs on $url failed: $(tail -3 <<<"$out")"; echo "0 0"; return; }
    awk -v n="$count" -v s="$secs" -v bs="$bs" 'BEGIN { iops = n / s; printf "%d %d\n", iops, iops * bs / 1048576 }'
}
# fio_nbd RW BS -> "IOPS MiBps" or "0 0"
fio_nbd() {
    local rw=$1 bs=$2 dir=read res
    [[ $rw == *write ]] && dir=write
    timeout $((SECS + 60)) fio --name=nbd --ioengine=nbd "--uri=$NBD_URI" "--rw=$rw" "--bs=$bs" \
        --iodepth=32 --time_based=1 "--runtime=$SECS" --randrepeat=0 --output-format=json \
        "--output=$WORK/fio.json" >"$WORK/fio.err" 2>&1 || true
    # fio may print notices before its JSON object.
    res=$(sed -n '/^{/,$p' "$WORK/fio.json" 2>/dev/null | jq -r --arg d "$dir" '.jobs[0]
        | if .error == 0 and .[$d].total_ios > 0 then "\(.[$d].iops | floor) \(.[$d].bw_bytes / 1048576 | floor)"
          else empty end' 2>/dev/null) || res=""
    [[ -n "$res" ]] || { log "fio $rw $bs failed: $(tail -3 "$WORK/fio.err" "$WORK/fio.json" 2>/dev/null)"; echo "0 0"; return; }
    echo "$res"
}
run_one() { # run_one TEST direct|via ADDR
    local test=$1 side=$2 addr=$3 url qc=$QEMU_COUNT
    url="iscsi://$addr:$PORT/$IQN/1"
    [[ $side == via ]] && url=$NBD_URI
    case $test.$side in
    randread-4k-qd32.direct) iscsi_perf "$url" -r -b 8 -m 32 ;;
    seqread-128k-qd32.direct) iscsi_perf "$url" -b 256 -m 32 ;;
    randwrite-4k-qd32.direct) qemu_bench "$url" 4096 $((qc / 10)) -w ;;
    randread-4k-qd32.via) fio_nbd randread 4k ;;
    randwrite-4k-qd32.via) fio_nbd randwrite 4k ;;
    seqread-128k-qd32.via) fio_nbd read 128k ;;
    qemu-read-4k-qd32.*) qemu_bench "$url" 4096 "$qc" ;;
    qemu-write-4k-qd32.*) qemu_bench "$url" 4096 $((qc / 10)) -w ;;
    qemu-read-128k-qd32.*) qemu_bench "$url" 131072 $((qc / 6)) ;;
    esac
}

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) print 0; else if (NR % 2) print v[(NR + 1) / 2]; else print int((v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }

declare -A RES
T0=$(date +%s)
last_node=""
for ((round = 1; round <= ROUNDS; round++)); do
    for test in "${TESTS[@]}"; do
        for side in direct via; do
            addr=""
            if [[ $side == direct ]]; then
                read -r node addr < <(leader_portal) || { node=""; addr=""; }
                if [[ -z "$addr" ]]; then
                    log "round $round $test direct: no volume leader known; counted as a failed run"
                    RES[$test.$side.fail]=$((${RES[$test.$side.fail]:-0} + 1))
                    continue
                fi
                [[ -n "$last_node" && "$last_node" != "$node" ]] && log "the volume leader moved to node $node"
                last_node=$node
            fi
            read -r iops mibps < <(run_one "$test" "$side" "$addr")
            if [[ $iops == 0 ]]; then
                RES[$test.$side.fail]=$((${RES[$test.$side.fail]:-0} + 1))
                log "round $round/$ROUNDS $test $side: FAILED"
                continue
            fi
            RES[$test.$side.iops]+="$iops "
            RES[$test.$side.mibps]+="$mibps "
            log "round $round/$ROUNDS $test $side$([[ $side == direct ]] && echo " (node $node)"): $iops IOPS, $mibps MiB/s"
        done
    done
done
ELAPSED=$(($(date +%s) - T0))
SESSION=$("$IBIN" --config "$WORK/initiator.toml" session --json 2>/dev/null | jq -c '.[0].device | {failovers, retried_commands}' 2>/dev/null || echo null)

med() { tr ' ' '\n' <<<"${RES[$1]:-}" | grep . | median; }
ratio_of() { awk -v a="$1" -v b="$2" 'BEGIN { if (a > 0) printf "%.2f", b / a; else print "n/a" }'; }
runs_of() { xargs <<<"${RES[$1]:-}" | tr ' ' ','; }
json_num() { if [[ $1 == n/a ]]; then echo null; else echo "$1"; fi; }

printf '\n%-20s %12s %12s %12s %12s %6s\n' workload "direct IOPS" "direct MB/s" "via IOPS" "via MB/s" ratio
{
    printf '{\n  "what": "raftsan demo cluster (3 nodes, fsync = '"${DEMO_FSYNC:-on-flush}"'): direct on the volume leader portal vs through raftsan-initiator attach + NBD Unix socket",\n'
    printf '  "rounds": %d, "seconds_per_run": %d, "qemu_count_4k_read": %d, "volume_bytes": %d, "elapsed_seconds": %d, "host_cpus": %d,\n' \
        "$ROUNDS" "$SECS" "$QEMU_COUNT" "$BYTES" "$ELAPSED" "$(nproc)"
    printf '  "initiator_counters": %s,\n  "results": [\n' "$SESSION"
} >"$OUT"
n=0
for test in "${TESTS[@]}"; do
    d_iops=$(med "$test.direct.iops")
    d_mib=$(med "$test.direct.mibps")
    v_iops=$(med "$test.via.iops")
    v_mib=$(med "$test.via.mibps")
    ratio=$(ratio_of "$d_iops" "$v_iops")
    fails=""
    for side in direct via; do
        [[ ${RES[$test.$side.fail]:-0} -gt 0 ]] && fails+=" $side: ${RES[$test.$side.fail]} failed run(s)"
    done
    printf '%-20s %12s %12s %12s %12s %6s%s\n' "$test" "$d_iops" "$d_mib" "$v_iops" "$v_mib" "$ratio" "${fails:+  (${fails# })}"
    n=$((n + 1))
    sep=","
    [[ $n -eq ${#TESTS[@]} ]] && sep=""
    printf '    {"workload": "%s", "direct_tool": "%s", "via_tool": "%s", "direct_iops": %d, "direct_mibps": %d, "via_iops": %d, "via_mibps": %d, "ratio": %s, "direct_runs_iops": [%s], "via_runs_iops": [%s], "direct_failed_runs": %d, "via_failed_runs": %d}%s\n' \
        "$test" "${DIRECT_TOOL[$test]}" "${VIA_TOOL[$test]}" "$d_iops" "$d_mib" "$v_iops" "$v_mib" "$(json_num "$ratio")" \
        "$(runs_of "$test.direct.iops")" "$(runs_of "$test.via.iops")" \
        "${RES[$test.direct.fail]:-0}" "${RES[$test.via.fail]:-0}" "$sep" >>"$OUT"
done
printf '  ]\n}\n' >>"$OUT"
echo
echo "medians over $ROUNDS interleaved rounds (failed runs left out), ${ELAPSED}s of measurement; ratio = via/direct IOPS"
echo "direct: iscsi-perf/qemu-img on the leader's portal; via: fio/qemu-img on $NBD_URI (raftsan-initiator attach)"
echo "initiator counters: $SESSION; JSON: $OUT"
echo "logs: $WORK/initiator.log, $WORK/demo.log, $WORK/node{1,2,3}.log"
