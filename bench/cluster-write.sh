#!/usr/bin/env bash
# Quick replicated-write probe: starts `raftsan demo` (three nodes from FIRST_ADDR), then runs
# 4 KiB sequential writes through the volume leader's portal at each queue depth given.
#
#   bench/cluster-write.sh [-a FIRST_ADDR] [-c COUNT] [-z SIZE] [-f FSYNC] [-k] [DEPTH...]   (default depths: 1 32)
#
#   -f   the nodes' Raft log fsync policy: always (default) or on-flush
#   -k   keep the cluster running after the runs (Ctrl-C stops it), e.g. to attach perf
# Prints "depth N: IOPS, mean latency, writes per log entry" per depth. Not a test; the figures are noisy.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
FIRST=127.0.0.73
COUNT=20000
SIZE=256M
KEEP=0
while getopts "a:c:z:f:kh" opt; do
    case $opt in
    f) export DEMO_FSYNC=$OPTARG ;;
    a) FIRST=$OPTARG ;;
    c) COUNT=$OPTARG ;;
    z) SIZE=$OPTARG ;;
    k) KEEP=1 ;;
    *) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
DEPTHS=("$@")
[[ ${#DEPTHS[@]} -gt 0 ]] || DEPTHS=(1 32)
WORK="$(target_dir)/bench-cw-$FIRST"
rm -rf "$WORK"
mkdir -p "$WORK"
PID=""
cleanup() {
    [[ -n "$PID" ]] && stop_pid "$PID" INT
    return 0
}
trap cleanup EXIT
start_cluster_demo "$FIRST" "$WORK/c" "$WORK/demo.log" "$SIZE"
PID=$STARTED_PID
leader() {
    local n
    for n in 1 2 3; do
        timeout 10 "$(raftsan_bin)" status --json --config "$WORK/c/node$n/node.toml" 2>/dev/null && break
    done | jq -r '([.nodes[].groups[] | select(.name == "demo" and .leader != 0)] | max_by(.term) | .leader) as $l
        | if $l == null then empty else (.nodes[] | select(.id == $l) | "\($l) \(.portals[0] | sub(":[0-9]+$"; ""))") end'
}
sleep 6 # leadership moves to the preferred node 5 s after the election
read -r node addr < <(leader) || die "no leader"
log "leader: node $node at $addr; pids: $(pgrep -f "serve --config $WORK/c/node" | tr '\n' ' ')"
# Writes and log entries the leader's write batcher proposed so far: "WRITES ENTRIES".
batched() {
    local m
    m=$(sed -n 's/^metrics = "\(.*\)"$/\1/p' "$WORK/c/node$1/node.toml")
    curl -s "http://$m/metrics" | awk '
        /^raftsan_volume_coalesced_writes_total\{volume="demo"\}/ { w = $2 }
        /^raftsan_volume_write_entries_total\{volume="demo"\}/ { e = $2 }
        END { printf "%d %d\n", w, e }'
}
for d in "${DEPTHS[@]}"; do
    read -r node addr < <(leader) || die "no leader"
    read -r w0 e0 < <(batched "$node")
    t0=$(date +%s.%N)
    qemu-img bench -f raw -w --pattern 0xa5 -d "$d" -s 4096 -c "$COUNT" -t none \
        "json:{\"driver\":\"raw\",\"file\":{\"driver\":\"iscsi\",\"transport\":\"tcp\",\"portal\":\"$addr:3260\",\"target\":\"iqn.2026-11.org.raftsan:demo\",\"lun\":1}}" >/dev/null
    t1=$(date +%s.%N)
    read -r w1 e1 < <(batched "$node")
    awk -v d="$d" -v n="$COUNT" -v a="$t0" -v b="$t1" -v l="$node" -v w=$((w1 - w0)) -v e=$((e1 - e0)) \
        'BEGIN { s = b - a; printf "depth %d: %.0f IOPS, %.3f ms per write (%d writes in %.2f s, leader node %s, %.1f writes per log entry)\n", d, n / s, s * 1000 * d / n, n, s, l, e ? w / e : 0 }'
done
if [[ $KEEP == 1 ]]; then
    log "cluster kept running in $WORK/c (Ctrl-C stops it)"
    wait "$PID"
fi
