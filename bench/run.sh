#!/usr/bin/env bash
# Side-by-side benchmark: tgtd against standalone raftsan and a three-node raftsan cluster, same
# data, public clients, interleaved.
#
#   bench/run.sh [-r ROUNDS] [-s SECONDS] [-c QEMU_COUNT] [-z SIZE] [-b raftsan|tgtd] [-C] [-o OUT.json]
#
#   -r ROUNDS      rounds; each round runs every test on A (tgtd), then B, then C     [5]
#   -s SECONDS     run time of each iscsi-perf run                                     [3]
#   -c QEMU_COUNT  requests per qemu-img bench run                                     [100000]
#   -z SIZE        size of each pre-filled backing file (truncate(1) syntax)           [1G]
#   -b SUBJECT     what runs in the B column: raftsan (release build), or tgtd to check the
#                  harness itself (two identical tgtd instances should give a ratio near 1)  [raftsan]
#   -C             no C column (skip the cluster)
#   -o FILE        JSON results                                                        [bench/results.json]
#
# Subjects: A = tgtd on 127.0.0.51:3260, B on 127.0.0.52:3260, each with one LUN on its own
# pre-filled file of SIZE in the same directory (same filesystem). C = `raftsan demo` on
# 127.0.0.53-55: three `raftsan serve` processes, one replicated volume of SIZE (fsync = on-flush, the default; DEMO_FSYNC=always for the other policy),
# pre-filled with the same bytes through qemu-img convert; every run goes to the portal of the
# node that leads the volume at that moment (from `raftsan status --json`). Tests, each at
# 512-byte blocks:
#   randread-4k-qd1    iscsi-perf -r -b 8   -m 1    (4 KiB random READ16, queue depth 1)
#   randread-4k-qd32   iscsi-perf -r -b 8   -m 32
#   seqread-128k-qd32  iscsi-perf    -b 256 -m 32   (128 KiB sequential)
#   write-4k-qd32      qemu-img bench -w -d 32 -s 4096   (sequential 4 KiB writes, qemu iscsi driver)
#   read-4k-qd32       qemu-img bench    -d 32 -s 4096
# Each figure is the median over the rounds. MB/s is MiB/s (2^20), as iscsi-perf prints it.
# Default run time is about 5 minutes plus file preparation and the cluster's pre-fill. A benchmark, not a test: it prints
# figures and never fails on them.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"

ROUNDS=5
SECS=3
QEMU_COUNT=100000
SIZE=1G
B_SUBJECT=raftsan
CLUSTER=1
OUT="$REPO/bench/results.json"
while getopts "r:s:c:z:b:o:Ch" opt; do
    case $opt in
    r) ROUNDS=$OPTARG ;;
    s) SECS=$OPTARG ;;
    c) QEMU_COUNT=$OPTARG ;;
    z) SIZE=$OPTARG ;;
    b) B_SUBJECT=$OPTARG ;;
    C) CLUSTER=0 ;;
    o) OUT=$OPTARG ;;
    *) sed -n '2,32p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
    esac
done
[[ $B_SUBJECT == raftsan || $B_SUBJECT == tgtd ]] || die "-b takes raftsan or tgtd"
for tool in iscsi-perf qemu-img tgtd; do
    command -v "$tool" >/dev/null || die "$tool missing (scripts/install-deps.sh)"
done

IQN="iqn.2026-11.org.raftsan.bench:lun"
A_ADDR=127.0.0.51
B_ADDR=127.0.0.52
C_FIRST=127.0.0.53
C_IQN="iqn.2026-11.org.raftsan:demo" # what `raftsan demo` creates: volume "demo", LUN 1
C_VOLUME=demo
PORT=3260
INITIATOR="iqn.2026-11.org.raftsan.bench:initiator"
WORK="$(target_dir)/bench"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"

if [[ ($B_SUBJECT == raftsan || $CLUSTER == 1) && ! -x "$(raftsan_bin)" ]]; then
    log "building raftsan (release)"
    (cd "$REPO" && cargo build --release -p raftsan-cluster --bins)
fi

A_PID=""
B_PID=""
C_PID=""
C_DIR="$WORK/cluster"
cleanup() {
    [[ -n "$A_PID" ]] && stop_pid "$A_PID" KILL
    if [[ -n "$B_PID" ]]; then
        if [[ $B_SUBJECT == tgtd ]]; then stop_pid "$B_PID" KILL; else stop_pid "$B_PID"; fi
    fi
    # SIGINT makes the demo stop its three nodes (SIGTERM, 10 s each at most) before it exits.
    [[ -n "$C_PID" ]] && stop_pid "$C_PID" INT
    rm -f "$WORK/a.img" "$WORK/b.img"
    if [[ -n "$C_PID" ]]; then
        for n in 1 2 3; do cp "$C_DIR/node$n/raftsan.log" "$WORK/c-node$n.log" 2>/dev/null || true; done
        rm -rf "$C_DIR" # three replicas of SIZE plus their Raft logs
    fi
    return 0
}
trap cleanup EXIT

# Pre-filled backing files: reads must hit data, not holes. Same content, same filesystem.
log "preparing two $SIZE backing files in $WORK"
truncate -s "$SIZE" "$WORK/a.img"
BYTES=$(stat -c %s "$WORK/a.img")
head -c "$BYTES" /dev/urandom >"$WORK/a.img"
cp --sparse=never "$WORK/a.img" "$WORK/b.img"
sync "$WORK/a.img" "$WORK/b.img" 2>/dev/null || sync

write_targets_conf "$WORK/a.conf" "$IQN" "$WORK/a.img"
write_targets_conf "$WORK/b.conf" "$IQN" "$WORK/b.img"
start_tgtd "$A_ADDR" "$PORT" 51 "$WORK/a.conf" "$WORK/a-tgtd.log"
A_PID=$STARTED_PID
if [[ $B_SUBJECT == tgtd ]]; then
    start_tgtd "$B_ADDR" "$PORT" 52 "$WORK/b.conf" "$WORK/b-tgtd.log"
else
    start_raftsan "$B_ADDR" "$PORT" "$WORK/b.conf" "$WORK/b-data" "$WORK/b-raftsan.log"
fi
B_PID=$STARTED_PID
log "A: tgtd $A_ADDR:$PORT (pid $A_PID); B: $B_SUBJECT $B_ADDR:$PORT (pid $B_PID)"

# cluster_status: `raftsan status --json` from the first cluster node that answers.
cluster_status() {
    local n
    for n in 1 2 3; do
        timeout 10 "$(raftsan_bin)" status --json --config "$C_DIR/node$n/node.toml" 2>/dev/null && return 0
    done
    return 0
}
# cluster_leader_portal: "NODE ADDR" of the volume's leader (highest term any node reports).
cluster_leader_portal() {
    cluster_status | jq -r --arg v "$C_VOLUME" '
        ([.nodes[].groups[] | select(.name == $v and .leader != 0)] | max_by(.term) | .leader) as $l
        | if $l == null then empty else (.nodes[] | select(.id == $l) | "\($l) \(.portals[0] | sub(":[0-9]+$"; ""))") end'
}
# cluster_wait_in_sync SECONDS: until every node has applied the same index of the volume's group.
cluster_wait_in_sync() {
    local i
    for ((i = 0; i < $1 * 2; i++)); do
        cluster_status | jq -e --arg v "$C_VOLUME" '
            [.nodes[] | select(.reachable) | .groups[] | select(.name == $v)]
            | length == 3 and ([.[].applied_index] | unique | length) == 1' >/dev/null && return 0
        sleep 0.5
    done
    return 1
}

SIDES=(A B)
if [[ $CLUSTER == 1 ]]; then
    SIDES+=(C)
    rm -rf "$C_DIR"
    log "C: starting raftsan demo (three nodes on $C_FIRST and the next two addresses, volume of $SIZE)"
    start_cluster_demo "$C_FIRST" "$C_DIR" "$WORK/c-demo.log" "$SIZE"
    C_PID=$STARTED_PID
    read -r c_node c_addr < <(cluster_leader_portal) || die "no leader for the cluster's volume; log: $WORK/c-demo.log"
    # Same bytes as the files, so reads hit data; written once through the leader's portal.
    log "C: pre-filling the replicated volume through node $c_node ($c_addr:$PORT) with qemu-img convert"
    t=$(date +%s)
    qemu-img convert -n -W -m 16 -f raw -O raw "$WORK/a.img" "iscsi://$c_addr:$PORT/$C_IQN/1" ||
        die "pre-filling the cluster volume failed; log: $WORK/c-demo.log"
    cluster_wait_in_sync 300 || die "the cluster's replicas did not converge after the pre-fill"
    log "C: pre-filled $BYTES bytes in $(($(date +%s) - t)) s, replicas in sync (demo pid $C_PID)"
fi

TESTS=(randread-4k-qd1 randread-4k-qd32 seqread-128k-qd32 write-4k-qd32 read-4k-qd32)

# run_one TEST ADDR IQN -> prints "IOPS MiBps"
run_one() {
    local test=$1 addr=$2 iqn=$3 url out secs iops
    url="iscsi://$addr:$PORT/$iqn/1"
    case $test in
    randread-4k-qd1 | randread-4k-qd32 | seqread-128k-qd32)
        local args=(-i "$INITIATOR" -t "$SECS")
        case $test in
        randread-4k-qd1) args+=(-r -b 8 -m 1) ;;
        randread-4k-qd32) args+=(-r -b 8 -m 32) ;;
        seqread-128k-qd32) args+=(-b 256 -m 32) ;;
        esac
        out=$(timeout $((SECS + 30)) iscsi-perf "${args[@]}" "$url" 2>&1 | tr '\r' '\n') || true
        # The last progress line: "iops average N (M MB/s)".
        local last
        last=$(grep -o 'iops average [0-9]* ([0-9]* MB/s)' <<<"$out" | tail -1)
        [[ -n "$last" ]] || { log "iscsi-perf $test on $addr failed: $(tail -3 <<<"$out")"; echo "0 0"; return; }
        awk '{gsub(/[()]/, ""); print $3, $4}' <<<"$last"
        ;;
    write-4k-qd32 | read-4k-qd32)
        local args=(bench -f raw -d 32 -s 4096 -c "$QEMU_COUNT")
        [[ $test == write-4k-qd32 ]] && args+=(-w --pattern 0xa5)
        out=$(timeout 300 qemu-img "${args[@]}" \
            "json:{\"driver\":\"raw\",\"file\":{\"driver\":\"iscsi\",\"transport\":\"tcp\",\"portal\":\"$addr:$PORT\",\"target\":\"$iqn\",\"lun\":1,\"initiator-name\":\"$INITIATOR\"}}" 2>&1) || true
        secs=$(sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p' <<<"$out")
        [[ -n "$secs" ]] || { log "qemu-img bench $test on $addr failed: $(tail -3 <<<"$out")"; echo "0 0"; return; }
        awk -v n="$QEMU_COUNT" -v s="$secs" 'BEGIN { iops = n / s; printf "%d %d\n", iops, iops * 4096 / 1048576 }'
        ;;
    esac
}

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) print 0; else if (NR % 2) print v[(NR + 1) / 2]; else print int((v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }

declare -A RES
declare -A NAME=([A]=tgtd [B]=$B_SUBJECT [C]=cluster)
T0=$(date +%s)
c_last=""
for ((round = 1; round <= ROUNDS; round++)); do
    for test in "${TESTS[@]}"; do
        for side in "${SIDES[@]}"; do
            iqn=$IQN
            case $side in
            A) addr=$A_ADDR ;;
            B) addr=$B_ADDR ;;
            C)
                iqn=$C_IQN
                read -r c_node addr < <(cluster_leader_portal) || { c_node=""; addr=""; }
                if [[ -z "$addr" ]]; then
                    log "round $round $test C: no volume leader known; counted as a failed run"
                    RES[$test.C.fail]=$((${RES[$test.C.fail]:-0} + 1))
                    continue
                fi
                [[ -n "$c_last" && "$c_last" != "$c_node" ]] && log "C: the volume leader moved to node $c_node"
                c_last=$c_node
                ;;
            esac
            # Dirty pages left by the previous run (or the pre-fill) are written back first, so
            # no subject pays for another's writeback during its measurement.
            sync
            read -r iops mibps < <(run_one "$test" "$addr" "$iqn")
            if [[ $iops == 0 ]]; then
                # A failed run (error logged by run_one) is counted, not averaged in as 0 IOPS.
                RES[$test.$side.fail]=$((${RES[$test.$side.fail]:-0} + 1))
                log "round $round/$ROUNDS $test $side (${NAME[$side]}): FAILED"
                continue
            fi
            RES[$test.$side.iops]+="$iops "
            RES[$test.$side.mibps]+="$mibps "
            log "round $round/$ROUNDS $test $side (${NAME[$side]}$([[ $side == C ]] && echo ", leader node $c_node")): $iops IOPS, $mibps MiB/s"
        done
    done
done
ELAPSED=$(($(date +%s) - T0))

med() { tr ' ' '\n' <<<"${RES[$1]:-}" | grep . | median; }
ratio_of() { awk -v a="$1" -v b="$2" 'BEGIN { if (a > 0) printf "%.2f", b / a; else print "n/a" }'; }
runs_of() { xargs <<<"${RES[$1]:-}" | tr ' ' ','; }
json_num() { if [[ $1 == n/a ]]; then echo null; else echo "$1"; fi; }

header=$(printf '%-20s %10s %9s %12s %10s %6s' "test" "tgtd IOPS" "tgtd MB/s" "$B_SUBJECT IOPS" "$B_SUBJECT MB/s" "B/tgtd")
[[ $CLUSTER == 1 ]] && header+=$(printf ' %13s %11s %10s' "cluster IOPS" "cluster MB/s" "C/tgtd")
printf '\n%s\n' "$header"
{
    printf '{\n  "a": "tgtd", "b": "%s", "c": %s, "rounds": %d, "iscsi_perf_seconds": %d, "qemu_count": %d,\n' \
        "$B_SUBJECT" "$([[ $CLUSTER == 1 ]] && echo "\"cluster (raftsan demo, 3 nodes, fsync = ${DEMO_FSYNC:-on-flush}, I/O through the volume leader portal)\"" || echo null)" \
        "$ROUNDS" "$SECS" "$QEMU_COUNT"
    printf '  "backing_bytes": %d, "elapsed_seconds": %d, "host_cpus": %d,\n  "results": [\n' \
        "$BYTES" "$ELAPSED" "$(nproc)"
} >"$OUT"
n=0
for test in "${TESTS[@]}"; do
    a_iops=$(med "$test.A.iops")
    a_mib=$(med "$test.A.mibps")
    b_iops=$(med "$test.B.iops")
    b_mib=$(med "$test.B.mibps")
    ratio=$(ratio_of "$a_iops" "$b_iops")
    line=$(printf '%-20s %10s %9s %12s %10s %6s' "$test" "$a_iops" "$a_mib" "$b_iops" "$b_mib" "$ratio")
    cjson=""
    if [[ $CLUSTER == 1 ]]; then
        c_iops=$(med "$test.C.iops")
        c_mib=$(med "$test.C.mibps")
        c_ratio=$(ratio_of "$a_iops" "$c_iops")
        line+=$(printf ' %13s %11s %10s' "$c_iops" "$c_mib" "$c_ratio")
        cjson=$(printf ', "cluster_iops": %d, "cluster_mibps": %d, "cluster_ratio": %s, "cluster_runs_iops": [%s], "cluster_failed_runs": %d' \
            "$c_iops" "$c_mib" "$(json_num "$c_ratio")" "$(runs_of "$test.C.iops")" "${RES[$test.C.fail]:-0}")
    fi
    fails=""
    for side in "${SIDES[@]}"; do
        [[ ${RES[$test.$side.fail]:-0} -gt 0 ]] && fails+=" ${NAME[$side]}: ${RES[$test.$side.fail]} failed run(s)"
    done
    printf '%s%s\n' "$line" "${fails:+  (${fails# })}"
    n=$((n + 1))
    sep=","
    [[ $n -eq ${#TESTS[@]} ]] && sep=""
    printf '    {"test": "%s", "tgtd_iops": %d, "tgtd_mibps": %d, "b_iops": %d, "b_mibps": %d, "ratio": %s, "tgtd_runs_iops": [%s], "b_runs_iops": [%s], "tgtd_failed_runs": %d, "b_failed_runs": %d%s}%s\n' \
        "$test" "$a_iops" "$a_mib" "$b_iops" "$b_mib" "$(json_num "$ratio")" \
        "$(runs_of "$test.A.iops")" "$(runs_of "$test.B.iops")" "${RES[$test.A.fail]:-0}" "${RES[$test.B.fail]:-0}" \
        "$cjson" "$sep" >>"$OUT"
done
printf '  ]\n}\n' >>"$OUT"
echo
echo "medians over $ROUNDS interleaved rounds (failed runs left out), ${ELAPSED}s of measurement; JSON: $OUT"
echo "ratios: B/tgtd and C/tgtd are IOPS ratios"
echo "B logs: $WORK/b-$B_SUBJECT.log"
if [[ $CLUSTER == 1 ]]; then
    echo "C logs: $WORK/c-demo.log, $WORK/c-node{1,2,3}.log (ERROR/panic lines:" \
        "$(cat "$C_DIR"/node*/raftsan.log 2>/dev/null | grep -cE 'ERROR|panicked' || true))"
    grep -hE 'ERROR|panicked' "$C_DIR"/node*/raftsan.log 2>/dev/null | head -5 || true
fi
