#!/usr/bin/env bash
# Hot-path cost of the Prometheus metrics: the same binaries (release unless overridden) with
# metrics enabled and disabled, side by side in the same run, interleaved rounds.
#
#   bench/metrics.sh [-r ROUNDS] [-s SECONDS] [-c QEMU_COUNT] [-z SIZE] [-I] [-o OUT.json]
#
#   -r ROUNDS      rounds; each round runs every test on both sides (order alternates)   [5]
#   -s SECONDS     run time of each iscsi-perf and fio run                               [5]
#   -c QEMU_COUNT  requests per qemu-img bench run                                       [100000]
#   -z SIZE        size of each pre-filled backing file (truncate(1) syntax)             [256M]
#   -I             no initiator part
#   -o FILE        JSON results                                                          [bench/metrics.json]
#
# Target part: two standalone `raftsan serve` (release build), each with one LUN on its own
# pre-filled file of SIZE: OFF on 127.0.0.61:3260 without a metrics address (no recorder is
# installed: every handle is a no-op), ON on 127.0.0.62:3260 with `--metrics 127.0.0.62:9862`
# (recorder installed, scraped once a second during the runs as Prometheus would). Tests:
#   randread-4k-qd32   iscsi-perf -r -b 8 -m 32           (4 KiB random READ16, queue depth 32)
#   write-4k-qd32      qemu-img bench -w -d 32 -s 4096    (4 KiB writes, qemu's iscsi driver)
# Initiator part: two `raftsan-initiator attach` of OFF's LUN, one without and one with
# `--metrics 127.0.0.61:9863` (scraped once a second), each exporting NBD on a Unix socket; fio's
# nbd engine runs 4 KiB random reads at queue depth 32 (nbd-randread-4k-qd32) through one, then
# the other (never both at once).
# Each figure is the median over the rounds; "diff" is (ON - OFF) / OFF of the medians in %, "paired
# diff" the median over rounds of each round's (ON - OFF) / OFF (the two runs of a round are
# adjacent in time, so load from other processes mostly cancels out; prefer it on a busy host).
# CPU per I/O, steadier than IOPS on a shared host: utime + stime of the process under test
# (the raftsan of that side; the raftsan-initiator of that side for the nbd test) from
# /proc/PID/stat before and after each run, divided by the I/Os of the run (qemu-img: its count;
# fio: total_ios; iscsi-perf: average IOPS x SECONDS). Printed in µs per I/O with the ON/OFF ratio
# of the medians and the median of each round's ON/OFF ratio. Resolution: one clock tick (10 ms)
# per run, against 1-2 CPU-seconds per run.
# A benchmark, not a test: it prints figures and never fails on them. Build first:
#   CARGO_BUILD_JOBS=1 cargo build --release -p raftsan-cluster -p raftsan-initiator
# RAFTSAN_BIN and RAFTSAN_INITIATOR_BIN override the binaries (e.g. the debug build: say so with
# the figures).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"

ROUNDS=5
SECS=5
QEMU_COUNT=100000
SIZE=256M
INITIATOR_PART=1
OUT="$REPO/bench/metrics.json"
while getopts "r:s:c:z:o:Ih" opt; do
    case $opt in
    r) ROUNDS=$OPTARG ;;
    s) SECS=$OPTARG ;;
    c) QEMU_COUNT=$OPTARG ;;
    z) SIZE=$OPTARG ;;
    I) INITIATOR_PART=0 ;;
    o) OUT=$OPTARG ;;
    *) sed -n '2,36p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
    esac
done
for tool in iscsi-perf qemu-img curl; do
    command -v "$tool" >/dev/null || die "$tool missing (scripts/install-deps.sh)"
done
[[ $INITIATOR_PART == 0 ]] || command -v fio >/dev/null || die "fio missing (scripts/install-deps.sh)"

IQN="iqn.2026-11.org.raftsan.bench:metrics"
OFF_ADDR=127.0.0.61
ON_ADDR=127.0.0.62
ON_METRICS=$ON_ADDR:9862
INI_METRICS=$OFF_ADDR:9863
PORT=3260
INITIATOR="iqn.2026-11.org.raftsan.bench:metrics-initiator"
WORK="$(target_dir)/bench-metrics"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
INITIATOR_BIN="${RAFTSAN_INITIATOR_BIN:-$(target_dir)/release/raftsan-initiator}"
[[ -x "$(raftsan_bin)" ]] || die "no release raftsan at $(raftsan_bin): CARGO_BUILD_JOBS=1 cargo build --release -p raftsan-cluster -p raftsan-initiator"
if [[ $INITIATOR_PART == 1 && ! -x "$INITIATOR_BIN" ]]; then
    die "no release raftsan-initiator at $INITIATOR_BIN (build it, or run with -I)"
fi

PIDS=()
SCRAPER=""
cleanup() {
    [[ -n "$SCRAPER" ]] && kill "$SCRAPER" 2>/dev/null
    local i
    # Newest first: the initiators detach (flush, logout) before the targets stop.
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${PIDS[$i]}"; done
    rm -f "$WORK/off.img" "$WORK/on.img"
    return 0
}
trap cleanup EXIT

log "preparing two $SIZE backing files in $WORK"
truncate -s "$SIZE" "$WORK/off.img"
BYTES=$(stat -c %s "$WORK/off.img")
head -c "$BYTES" /dev/urandom >"$WORK/off.img"
cp --sparse=never "$WORK/off.img" "$WORK/on.img"
sync "$WORK/off.img" "$WORK/on.img" 2>/dev/null || sync
write_targets_conf "$WORK/off.conf" "$IQN" "$WORK/off.img"
write_targets_conf "$WORK/on.conf" "$IQN" "$WORK/on.img"

start_raftsan "$OFF_ADDR" "$PORT" "$WORK/off.conf" "$WORK/off-data" "$WORK/off-raftsan.log"
PIDS+=("$STARTED_PID")
declare -A CPU_PID
CPU_PID[OFF]=$STARTED_PID
# start_raftsan takes no metrics address: the ON side is started here, as start_raftsan does.
bin="$(raftsan_bin)"
mkdir -p "$WORK/on-data"
RUST_LOG="${RUST_LOG:-info}" "$bin" serve --config "$WORK/on.conf" --listen "$ON_ADDR:$PORT" \
    --data-dir "$WORK/on-data" --metrics "$ON_METRICS" >"$WORK/on-raftsan.log" 2>&1 &
PIDS+=("$!")
CPU_PID[ON]=$!
wait_port "$ON_ADDR" "$PORT" "$!" 30 || die "raftsan portal $ON_ADDR:$PORT not up; log: $WORK/on-raftsan.log"
grep -q '^raftsan_up 1' <<<"$(curl -fsS "http://$ON_METRICS/metrics")" || die "no metrics on $ON_METRICS"
log "OFF: raftsan $OFF_ADDR:$PORT (no metrics); ON: raftsan $ON_ADDR:$PORT (metrics on $ON_METRICS)"

TESTS=(randread-4k-qd32 write-4k-qd32)
SIDES=(OFF ON)
if [[ $INITIATOR_PART == 1 ]]; then
    for side in OFF ON; do
        dir="$WORK/initiator-$side"
        rm -rf "$dir"
        mkdir -p "$dir/run"
        printf 'initiator_name = "%s-%s"\nrun_dir = "%s/run"\n' "$INITIATOR" "${side,,}" "$dir" >"$dir/initiator.toml"
        args=(--config "$dir/initiator.toml" attach "$IQN" --nbd "unix:$dir/nbd.sock" --portal "$OFF_ADDR:$PORT"
            --lun 1 --no-discover)
        [[ $side == ON ]] && args+=(--metrics "$INI_METRICS")
        RAFTSAN_LOG=info "$INITIATOR_BIN" "${args[@]}" >"$dir/initiator.out" 2>"$dir/initiator.log" &
        PIDS+=("$!")
        CPU_PID[nbd.$side]=$!
        for ((i = 0; i < 300; i++)); do
            [[ -S "$dir/nbd.sock" ]] && break
            kill -0 "$!" 2>/dev/null || die "raftsan-initiator ($side) exited; log: $dir/initiator.log"
            sleep 0.1
        done
        [[ -S "$dir/nbd.sock" ]] || die "raftsan-initiator ($side) exported nothing in 30 s; log: $dir/initiator.log"
    done
    grep -q '^raftsan_initiator_up 1' <<<"$(curl -fsS "http://$INI_METRICS/metrics")" ||
        die "no initiator metrics on $INI_METRICS"
    TESTS+=(nbd-randread-4k-qd32)
    log "initiators attached: OFF (no metrics), ON (metrics on $INI_METRICS)"
fi

# Prometheus-like scraping of the ON side once a second, so rendering cost is in the figures.
(
    while :; do
        curl -fsS -o /dev/null "http://$ON_METRICS/metrics" 2>/dev/null || true
        [[ $INITIATOR_PART == 1 ]] && { curl -fsS -o /dev/null "http://$INI_METRICS/metrics" 2>/dev/null || true; }
        sleep 1
    done
) &
SCRAPER=$!

CLK_TCK=$(getconf CLK_TCK)
# cpu_ticks PID: utime + stime of PID in clock ticks (fields 14 and 15 of /proc/PID/stat; the
# fields are counted after the command name, which may contain spaces).
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }

# run_one TEST SIDE -> prints "IOPS IOS" (IOPS 0 on failure; IOS: I/Os completed in the run)
run_one() {
    local test=$1 side=$2 addr url out secs
    addr=$OFF_ADDR
    [[ $side == ON ]] && addr=$ON_ADDR
    url="iscsi://$addr:$PORT/$IQN/1"
    case $test in
    randread-4k-qd32)
        out=$(timeout $((SECS + 30)) iscsi-perf -i "$INITIATOR" -t "$SECS" -r -b 8 -m 32 "$url" 2>&1 | tr '\r' '\n') || true
        local last
        last=$(grep -o 'iops average [0-9]*' <<<"$out" | tail -1)
        [[ -n "$last" ]] || { log "iscsi-perf on $side failed: $(tail -3 <<<"$out")"; echo 0; return; }
        awk -v s="$SECS" '{ print $3, $3 * s }' <<<"$last"
        ;;
    write-4k-qd32)
        out=$(timeout 300 qemu-img bench -f raw -d 32 -s 4096 -c "$QEMU_COUNT" -w --pattern 0xa5 \
            "json:{\"driver\":\"raw\",\"file\":{\"driver\":\"iscsi\",\"transport\":\"tcp\",\"portal\":\"$addr:$PORT\",\"target\":\"$IQN\",\"lun\":1,\"initiator-name\":\"$INITIATOR\"}}" 2>&1) || true
        secs=$(sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p' <<<"$out")
        [[ -n "$secs" ]] || { log "qemu-img bench on $side failed: $(tail -3 <<<"$out")"; echo 0; return; }
        awk -v n="$QEMU_COUNT" -v s="$secs" 'BEGIN { printf "%d %d\n", n / s, n }'
        ;;
    nbd-randread-4k-qd32)
        out=$(timeout $((SECS + 60)) fio --name=metrics --ioengine=nbd \
            "--uri=nbd+unix:///?socket=$WORK/initiator-$side/nbd.sock" --rw=randread --bs=4k --iodepth=32 \
            "--size=$BYTES" --time_based=1 "--runtime=$SECS" --randrepeat=0 --output-format=json 2>&1) || true
        local res
        res=$(sed -n '/^{/,$p' <<<"$out" | jq -r '"\(.jobs[0].read.iops // 0) \(.jobs[0].read.total_ios // 0)"' 2>/dev/null ||
            echo "0 0")
        [[ "${res%% *}" != 0 ]] || { log "fio on $side failed: $(tail -3 <<<"$out")"; echo 0; return; }
        awk '{ printf "%.0f %d\n", $1, $2 }' <<<"$res"
        ;;
    esac
}

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) print 0; else if (NR % 2) print v[(NR + 1) / 2]; else print int((v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }

declare -A RES
T0=$(date +%s)
for ((round = 1; round <= ROUNDS; round++)); do
    # Alternate which side goes first, so warm caches and drift do not favour one side.
    order=(OFF ON)
    ((round % 2 == 0)) && order=(ON OFF)
    for test in "${TESTS[@]}"; do
        for side in "${order[@]}"; do
            pid=${CPU_PID[$side]}
            [[ $test == nbd-* ]] && pid=${CPU_PID[nbd.$side]}
            t0=$(cpu_ticks "$pid")
            read -r iops ios < <(run_one "$test" "$side") || true
            t1=$(cpu_ticks "$pid")
            if [[ ${iops:-0} == 0 || ${ios:-0} == 0 ]]; then
                RES[$test.$side.fail]=$((${RES[$test.$side.fail]:-0} + 1))
                log "round $round/$ROUNDS $test $side: FAILED"
                continue
            fi
            RES[$test.$side]+="$iops "
            RES[$test.$side.$round]=$iops
            # CPU per I/O in nanoseconds.
            cpu=$(awk -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v n="$ios" 'BEGIN { printf "%d", t * 1e9 / hz / n }')
            RES[$test.$side.cpu]+="$cpu "
            RES[$test.$side.cpu.$round]=$cpu
            log "round $round/$ROUNDS $test metrics $side: $iops IOPS, $((cpu / 1000)).$(printf '%03d' $((cpu % 1000))) µs CPU per I/O"
        done
    done
done
ELAPSED=$(($(date +%s) - T0))

med() { tr ' ' '\n' <<<"${RES[$1]:-}" | grep . | median; }
runs_of() { xargs <<<"${RES[$1]:-}" | tr ' ' ','; }
diff_of() { awk -v a="$1" -v b="$2" 'BEGIN { if (a > 0) printf "%+.1f", (b - a) * 100 / a; else print "n/a" }'; }
# paired_diff TEST: the median over rounds of (ON - OFF) / OFF of the same round (the two runs
# are adjacent in time, so load from elsewhere on the host mostly cancels out).
paired_diff() {
    local r off on
    for ((r = 1; r <= ROUNDS; r++)); do
        off=${RES[$1.OFF.$r]:-0}
        on=${RES[$1.ON.$r]:-0}
        [[ $off -gt 0 && $on -gt 0 ]] && awk -v a="$off" -v b="$on" 'BEGIN { printf "%.2f\n", (b - a) * 100 / a }'
    done | sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "n/a"; else if (NR % 2) printf "%+.1f\n", v[(NR + 1) / 2]; else printf "%+.1f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# paired_ratio TEST: the median over rounds of each round's ON / OFF CPU per I/O.
paired_ratio() {
    local r off on
    for ((r = 1; r <= ROUNDS; r++)); do
        off=${RES[$1.OFF.cpu.$r]:-0}
        on=${RES[$1.ON.cpu.$r]:-0}
        [[ $off -gt 0 && $on -gt 0 ]] && awk -v a="$off" -v b="$on" 'BEGIN { printf "%.4f\n", b / a }'
    done | sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "n/a"; else if (NR % 2) printf "%.3f\n", v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
ratio_of() { awk -v a="$1" -v b="$2" 'BEGIN { if (a > 0) printf "%.3f", b / a; else print "n/a" }'; }
us() { awk -v n="$1" 'BEGIN { printf "%.2f", n / 1000 }'; }

printf '\n%-22s %10s %10s %7s %8s | %12s %12s %7s %8s\n' test "IOPS off" "IOPS on" "diff %" "paired %" \
    "CPU µs/IO off" "CPU µs/IO on" "on/off" "paired"
{
    printf '{\n  "rounds": %d, "seconds": %d, "qemu_count": %d, "backing_bytes": %d, "elapsed_seconds": %d, "host_cpus": %d, "raftsan_bin": "%s",\n  "results": [\n' \
        "$ROUNDS" "$SECS" "$QEMU_COUNT" "$BYTES" "$ELAPSED" "$(nproc)" "$(raftsan_bin)"
} >"$OUT"
n=0
for test in "${TESTS[@]}"; do
    off=$(med "$test.OFF")
    on=$(med "$test.ON")
    d=$(diff_of "$off" "$on")
    pd=$(paired_diff "$test")
    fails=""
    for side in OFF ON; do
        [[ ${RES[$test.$side.fail]:-0} -gt 0 ]] && fails+=" $side: ${RES[$test.$side.fail]} failed run(s)"
    done
    coff=$(med "$test.OFF.cpu")
    con=$(med "$test.ON.cpu")
    cr=$(ratio_of "$coff" "$con")
    pr=$(paired_ratio "$test")
    printf '%-22s %10s %10s %7s %8s | %12s %12s %7s %8s%s\n' "$test" "$off" "$on" "$d" "$pd" "$(us "$coff")" "$(us "$con")" \
        "$cr" "$pr" "${fails:+  (${fails# })}"
    n=$((n + 1))
    sep=","
    [[ $n -eq ${#TESTS[@]} ]] && sep=""
    printf '    {"test": "%s", "off_iops": %d, "on_iops": %d, "diff_percent": %s, "paired_diff_percent": %s, "off_runs": [%s], "on_runs": [%s],\n' \
        "$test" "$off" "$on" "$([[ $d == n/a ]] && echo null || echo "${d#+}")" "$([[ $pd == n/a ]] && echo null || echo "${pd#+}")" \
        "$(runs_of "$test.OFF")" "$(runs_of "$test.ON")" >>"$OUT"
    printf '     "off_cpu_ns_per_io": %d, "on_cpu_ns_per_io": %d, "cpu_ratio": %s, "paired_cpu_ratio": %s, "off_cpu_runs": [%s], "on_cpu_runs": [%s]}%s\n' \
        "$coff" "$con" "$([[ $cr == n/a ]] && echo null || echo "$cr")" "$([[ $pr == n/a ]] && echo null || echo "$pr")" \
        "$(runs_of "$test.OFF.cpu")" "$(runs_of "$test.ON.cpu")" "$sep" >>"$OUT"
done
printf '  ]\n}\n' >>"$OUT"
echo
echo "medians over $ROUNDS interleaved rounds (IOPS; failed runs left out), ${ELAPSED}s; JSON: $OUT"
echo "diff = (on - off) / off of the medians; paired = median over rounds of each round's (on - off) / off"
echo "CPU µs/IO: utime+stime of the process under test per I/O (raftsan; raftsan-initiator for nbd-*);"
echo "on/off = ratio of the medians; paired = median over rounds of each round's on / off"
bins=$(raftsan_bin)
[[ $INITIATOR_PART == 1 ]] && bins+=", $INITIATOR_BIN"
echo "binaries: $bins"
echo "logs: $WORK/{off,on}-raftsan.log, $WORK/initiator-{OFF,ON}/initiator.log"
