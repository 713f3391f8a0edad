#!/usr/bin/env bash
# Side-by-side benchmark: tgtd against raftsan, same backing file kind, public clients, interleaved.
#
#   bench/run.sh [-r ROUNDS] [-s SECONDS] [-c QEMU_COUNT] [-z SIZE] [-b raftsan|tgtd] [-o OUT.json]
#
#   -r ROUNDS      rounds; each round runs every test on A (tgtd) then on B          [5]
#   -s SECONDS     run time of each iscsi-perf run                                     [3]
#   -c QEMU_COUNT  requests per qemu-img bench run                                     [100000]
#   -z SIZE        size of each pre-filled backing file (truncate(1) syntax)           [1G]
#   -b SUBJECT     what runs in the B column: raftsan (release build), or tgtd to check the
#                  harness itself (two identical tgtd instances should give a ratio near 1)  [raftsan]
#   -o FILE        JSON results                                                        [bench/results.json]
#
# Subjects: A = tgtd on 127.0.0.51:3260, B on 127.0.0.52:3260, each with one LUN on its own
# pre-filled file of SIZE in the same directory (same filesystem). Tests, each at 512-byte blocks:
#   randread-4k-qd1    iscsi-perf -r -b 8   -m 1    (4 KiB random READ16, queue depth 1)
#   randread-4k-qd32   iscsi-perf -r -b 8   -m 32
#   seqread-128k-qd32  iscsi-perf    -b 256 -m 32   (128 KiB sequential)
#   write-4k-qd32      qemu-img bench -w -d 32 -s 4096   (sequential 4 KiB writes, qemu iscsi driver)
#   read-4k-qd32       qemu-img bench    -d 32 -s 4096
# Each figure is the median over the rounds. MB/s is MiB/s (2^20), as iscsi-perf prints it.
# Default run time is about 3 minutes plus file preparation. A benchmark, not a test: it prints
# figures and never fails on them.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"

ROUNDS=5
SECS=3
QEMU_COUNT=100000
SIZE=1G
B_SUBJECT=raftsan
OUT="$REPO/bench/results.json"
while getopts "r:s:c:z:b:o:h" opt; do
    case $opt in
    r) ROUNDS=$OPTARG ;;
    s) SECS=$OPTARG ;;
    c) QEMU_COUNT=$OPTARG ;;
    z) SIZE=$OPTARG ;;
    b) B_SUBJECT=$OPTARG ;;
    o) OUT=$OPTARG ;;
    *) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
    esac
done
[[ $B_SUBJECT == raftsan || $B_SUBJECT == tgtd ]] || die "-b takes raftsan or tgtd"
for tool in iscsi-perf qemu-img tgtd; do
    command -v "$tool" >/dev/null || die "$tool missing (scripts/install-deps.sh)"
done

IQN="iqn.2026-11.org.raftsan.bench:lun"
A_ADDR=127.0.0.51
B_ADDR=127.0.0.52
PORT=3260
INITIATOR="iqn.2026-11.org.raftsan.bench:initiator"
WORK="$(target_dir)/bench"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"

if [[ $B_SUBJECT == raftsan && ! -x "$(raftsan_bin)" ]]; then
    log "building raftsan (release)"
    (cd "$REPO" && cargo build --release -p raftsan-cluster --bins)
fi

A_PID=""
B_PID=""
cleanup() {
    [[ -n "$A_PID" ]] && stop_pid "$A_PID" KILL
    if [[ -n "$B_PID" ]]; then
        if [[ $B_SUBJECT == tgtd ]]; then stop_pid "$B_PID" KILL; else stop_pid "$B_PID"; fi
    fi
    rm -f "$WORK/a.img" "$WORK/b.img"
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

TESTS=(randread-4k-qd1 randread-4k-qd32 seqread-128k-qd32 write-4k-qd32 read-4k-qd32)

# run_one TEST ADDR -> prints "IOPS MiBps"
run_one() {
    local test=$1 addr=$2 url out secs iops
    url="iscsi://$addr:$PORT/$IQN/1"
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
            "json:{\"driver\":\"raw\",\"file\":{\"driver\":\"iscsi\",\"transport\":\"tcp\",\"portal\":\"$addr:$PORT\",\"target\":\"$IQN\",\"lun\":1,\"initiator-name\":\"$INITIATOR\"}}" 2>&1) || true
        secs=$(sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p' <<<"$out")
        [[ -n "$secs" ]] || { log "qemu-img bench $test on $addr failed: $(tail -3 <<<"$out")"; echo "0 0"; return; }
        awk -v n="$QEMU_COUNT" -v s="$secs" 'BEGIN { iops = n / s; printf "%d %d\n", iops, iops * 4096 / 1048576 }'
        ;;
    esac
}

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) print 0; else if (NR % 2) print v[(NR + 1) / 2]; else print int((v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }

declare -A RES
T0=$(date +%s)
for ((round = 1; round <= ROUNDS; round++)); do
    for test in "${TESTS[@]}"; do
        for side in A B; do
            if [[ $side == A ]]; then addr=$A_ADDR; else addr=$B_ADDR; fi
            read -r iops mibps < <(run_one "$test" "$addr")
            RES[$test.$side.iops]+="$iops "
            RES[$test.$side.mibps]+="$mibps "
            log "round $round/$ROUNDS $test $side ($([[ $side == A ]] && echo tgtd || echo "$B_SUBJECT")): $iops IOPS, $mibps MiB/s"
        done
    done
done
ELAPSED=$(($(date +%s) - T0))

printf '\n%-20s %12s %10s %12s %10s %7s\n' "test" "tgtd IOPS" "tgtd MB/s" "$B_SUBJECT IOPS" "$B_SUBJECT MB/s" "ratio"
{
    printf '{\n  "a": "tgtd", "b": "%s", "rounds": %d, "iscsi_perf_seconds": %d, "qemu_count": %d,\n' \
        "$B_SUBJECT" "$ROUNDS" "$SECS" "$QEMU_COUNT"
    printf '  "backing_bytes": %d, "elapsed_seconds": %d, "host_cpus": %d,\n  "results": [\n' \
        "$BYTES" "$ELAPSED" "$(nproc)"
} >"$OUT"
n=0
for test in "${TESTS[@]}"; do
    a_iops=$(tr ' ' '\n' <<<"${RES[$test.A.iops]}" | grep . | median)
    a_mib=$(tr ' ' '\n' <<<"${RES[$test.A.mibps]}" | grep . | median)
    b_iops=$(tr ' ' '\n' <<<"${RES[$test.B.iops]}" | grep . | median)
    b_mib=$(tr ' ' '\n' <<<"${RES[$test.B.mibps]}" | grep . | median)
    ratio=$(awk -v a="$a_iops" -v b="$b_iops" 'BEGIN { if (a > 0) printf "%.2f", b / a; else print "n/a" }')
    printf '%-20s %12s %10s %12s %10s %7s\n' "$test" "$a_iops" "$a_mib" "$b_iops" "$b_mib" "$ratio"
    n=$((n + 1))
    sep=","
    [[ $n -eq ${#TESTS[@]} ]] && sep=""
    printf '    {"test": "%s", "tgtd_iops": %d, "tgtd_mibps": %d, "b_iops": %d, "b_mibps": %d, "ratio": %s, "tgtd_runs_iops": [%s], "b_runs_iops": [%s]}%s\n' \
        "$test" "$a_iops" "$a_mib" "$b_iops" "$b_mib" \
        "$([[ $ratio == n/a ]] && echo null || echo "$ratio")" \
        "$(xargs <<<"${RES[$test.A.iops]}" | tr ' ' ',')" "$(xargs <<<"${RES[$test.B.iops]}" | tr ' ' ',')" \
        "$sep" >>"$OUT"
done
printf '  ]\n}\n' >>"$OUT"
echo
echo "medians over $ROUNDS interleaved rounds, ${ELAPSED}s of measurement; JSON: $OUT"
echo "B logs: $WORK/b-$B_SUBJECT.log"
