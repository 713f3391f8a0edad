#!/usr/bin/env bash
# libiscsi conformance: run iscsi-test-cu --dataloss against a freshly started target.
#
#   scripts/conformance.sh [-t FAMILY[.SUITE[.TEST]]] [-o OUTDIR] [-k] raftsan|tgtd|cluster
#
# cluster: a three-node raftsan cluster (set up by `raftsan demo --check-only` on 127.0.0.44-46,
# then served with relaxed NOP-In and Raft timings, see lib.sh start_cluster_relaxed) with one
# replicated volume; once its leadership settled (leaders move to the volume's preferred node),
# iscsi-test-cu talks to the leader's portal and gets another node's portal as the second path
# (forwarded to the leader). Its floor is the "<N> cluster" line.
# Starts SUBJECT on a loopback portal (tgtd 127.0.0.41:3260, raftsan 127.0.0.42:3260) with one
# 1 GiB sparse file-backed LUN (LUN 1, as tgt numbers them) and open ACLs, runs iscsi-test-cu in
# XML mode with two initiator names (the persistent-reservation tests need two I_T nexuses),
# prints "passed N of M" and the failed tests, and keeps the CUnit XML, the test-tool output and
# the daemon log in OUTDIR (default <cargo target dir>/conformance/SUBJECT).
# For raftsan and cluster, a full run (no -t) fails if N is below the floor in
# tests/conformance-floor.txt.
# CONFORMANCE_TIMEOUT (seconds, default 900, cluster 1800) bounds the iscsi-test-cu run; CONFORMANCE_LUN_SIZE (1G).
# -k keeps the target running after the run (for poking at it); stop it with the printed kill.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

TEST_RE=""
OUTDIR=""
KEEP=0
while getopts "t:o:kh" opt; do
    case $opt in
    t) TEST_RE=$OPTARG ;;
    o) OUTDIR=$OPTARG ;;
    k) KEEP=1 ;;
    *) usage ;;
    esac
done
shift $((OPTIND - 1))
[[ $# -eq 1 ]] || usage
SUBJECT=$1

IQN="iqn.2026-11.org.raftsan.ci:conformance"
PORT=3260
LUN_SIZE="${CONFORMANCE_LUN_SIZE:-1G}"
case $SUBJECT in
tgtd) ADDR=127.0.0.41 ;;
raftsan) ADDR=127.0.0.42 ADDR2=127.0.0.43 ;;
cluster) ADDR=127.0.0.44 ADDR2=127.0.0.45 ;;
*) usage ;;
esac
command -v iscsi-test-cu >/dev/null || die "iscsi-test-cu not installed (scripts/install-deps.sh)"

OUTDIR="${OUTDIR:-$(target_dir)/conformance/$SUBJECT}"
rm -rf "$OUTDIR"
mkdir -p "$OUTDIR/work"
OUTDIR="$(cd "$OUTDIR" && pwd)"
WORK="$OUTDIR/work"
BACKING="$WORK/lun1.img"
CONF="$WORK/targets.conf"
DAEMON_LOG="$OUTDIR/$SUBJECT.log"

truncate -s "$LUN_SIZE" "$BACKING"
write_targets_conf "$CONF" "$IQN" "$BACKING"

PID=""
cleanup() {
    if [[ -n "$PID" && $KEEP -eq 0 ]]; then
        if [[ $SUBJECT == tgtd ]]; then stop_pid "$PID" KILL; else stop_pid "$PID"; fi
        rm -f "$BACKING"
    fi
}
trap cleanup EXIT

log "starting $SUBJECT on $ADDR:$PORT (LUN 1: $LUN_SIZE sparse file $BACKING)"
case $SUBJECT in
tgtd) start_tgtd "$ADDR" "$PORT" 41 "$CONF" "$DAEMON_LOG" ;;
raftsan) start_raftsan "$ADDR" "$PORT" "$CONF" "$WORK/data" "$DAEMON_LOG" "$ADDR2" ;;
cluster)
    start_cluster_relaxed "$ADDR" "$WORK/cluster" "$DAEMON_LOG" "$LUN_SIZE"
    IQN="iqn.2026-11.org.raftsan:demo"
    # The first path on the volume leader (executed there), the second on another node
    # (forwarded to it).
    ADDR=$CLUSTER_LEADER_IP
    ADDR2=$CLUSTER_OTHER_IP
    ;;
esac
PID=$STARTED_PID
[[ $KEEP -eq 1 ]] && log "target kept running: kill $PID"

URL="iscsi://$ADDR:$PORT/$IQN/1"
# raftsan serves the LU on a second portal too, so the MultipathIO suite runs (one LU designator,
# two paths) instead of being skipped. tgtd gets one portal, as tgt users run it.
URLS=("$URL")
[[ -n "${ADDR2:-}" ]] && URLS+=("iscsi://$ADDR2:$PORT/$IQN/1")
ARGS=(--dataloss --xml
    -i iqn.2026-11.org.raftsan.ci:initiator-1
    -I iqn.2026-11.org.raftsan.ci:initiator-2)
[[ -n "$TEST_RE" ]] && ARGS+=(--test "$TEST_RE")

log "iscsi-test-cu ${ARGS[*]} ${URLS[*]}"
START=$(date +%s)
# XML mode writes CUnitAutomated-Results.xml into the current directory.
rc=0
# A target bug can send iscsi-test-cu into an endless loop; CI must still end.
# Every write of the cluster goes through Raft (fsync on three nodes): its run takes ~10 minutes
# on a busy 2-core machine, so it gets twice the time.
DEFAULT_TIMEOUT=900
[[ $SUBJECT == cluster ]] && DEFAULT_TIMEOUT=1800
TIMEOUT="${CONFORMANCE_TIMEOUT:-$DEFAULT_TIMEOUT}"
(cd "$OUTDIR" && timeout --signal=KILL "$TIMEOUT" \
    iscsi-test-cu "${ARGS[@]}" "${URLS[@]}" >"$OUTDIR/iscsi-test-cu.out" 2>&1) || rc=$?
ELAPSED=$(($(date +%s) - START))
RESULTS="$OUTDIR/CUnitAutomated-Results.xml"
if [[ $rc -eq 137 ]]; then
    LAST_SUITE=$(grep -o '<SUITE_NAME>[^<]*' "$RESULTS" 2>/dev/null | tail -1 | sed 's/<SUITE_NAME> *//')
    echo "FAIL: iscsi-test-cu did not finish within ${TIMEOUT}s (killed; last suite started: ${LAST_SUITE:-none})"
    echo "last output:"
    tail -5 "$OUTDIR/iscsi-test-cu.out" | sed 's/^/  /'
    exit 1
fi
[[ -s "$RESULTS" ]] || die "iscsi-test-cu wrote no results (exit $rc); see $OUTDIR/iscsi-test-cu.out"

# One line per executed test: "<suite>.<test> PASS|FAIL", in run order. The same suite runs once
# per test family that includes it (ALL, SCSI, iSCSI, LINUX), so names repeat; CUnit writes one
# CUNIT_RUN_TEST_FAILURE record per failed assertion, so consecutive failure records of one test
# are merged. N and M come from CUnit's own "Test Cases" summary (SUCCEEDED of RUN), which is the
# figure the issue quotes; the per-test list is checked against it.
awk '
    /<SUITE_NAME>/ { s = $0; gsub(/.*<SUITE_NAME> *| *<\/SUITE_NAME>.*/, "", s); suite = s; last = "" }
    /<CUNIT_RUN_TEST_SUCCESS>/ { state = "PASS"; where = "" }
    /<CUNIT_RUN_TEST_FAILURE>/ { state = "FAIL"; where = "" }
    /<TEST_NAME>/ { t = $0; gsub(/.*<TEST_NAME> *| *<\/TEST_NAME>.*/, "", t) }
    /<FILE_NAME>/ { f = $0; gsub(/.*<FILE_NAME> *| *<\/FILE_NAME>.*/, "", f); where = f }
    /<LINE_NUMBER>/ { l = $0; gsub(/[^0-9]/, "", l); where = where ":" l }
    /<\/CUNIT_RUN_TEST_RECORD>/ {
        key = suite "." t
        if (state == "FAIL" && last == key " FAIL") next
        last = key " " state
        print last (state == "FAIL" ? " " where : "")
    }
' "$RESULTS" >"$OUTDIR/results.txt"

summary_field() {
    awk -v field="$1" '
        /<TYPE> Test Cases <\/TYPE>/ { on = 1 }
        on && $0 ~ "<" field ">" { v = $0; gsub(/[^0-9]/, "", v); print v; exit }
    ' "$RESULTS"
}
TOTAL=$(summary_field RUN)
PASSED=$(summary_field SUCCEEDED)
[[ -n "$TOTAL" && -n "$PASSED" ]] || die "no Test Cases summary in $RESULTS (iscsi-test-cu exit $rc)"
FAILED=$((TOTAL - PASSED))
LISTED=$(wc -l <"$OUTDIR/results.txt")
PARSED_FAILED=$(grep -c ' FAIL ' "$OUTDIR/results.txt" || true)
[[ $PARSED_FAILED -eq $((TOTAL - PASSED)) ]] || log "warning: parsed $PARSED_FAILED failed tests, CUnit reports $((TOTAL - PASSED))"
[[ $LISTED -eq $TOTAL ]] || log "warning: parsed $LISTED test records, CUnit reports $TOTAL"
# Unique failed tests with the number of families they failed in and where the first failed
# assertion is (libiscsi test-tool file:line).
grep ' FAIL ' "$OUTDIR/results.txt" | awk '
    { if (!($1 in n)) { order[++k] = $1; at[$1] = $3 } n[$1]++ }
    END { for (i = 1; i <= k; i++) print order[i] (n[order[i]] > 1 ? " (x" n[order[i]] ")" : "") "  " at[order[i]] }
' >"$OUTDIR/failed.txt" || true
{
    echo "subject: $SUBJECT"
    echo "filter: ${TEST_RE:-ALL}"
    echo "passed $PASSED of $TOTAL"
    echo "failed $FAILED"
    echo "seconds $ELAPSED"
} >"$OUTDIR/summary.txt"

echo "== conformance $SUBJECT (${TEST_RE:-all tests}): passed $PASSED of $TOTAL in ${ELAPSED}s"
if [[ $FAILED -gt 0 ]]; then
    echo "failed tests:"
    sed 's/^/  /' "$OUTDIR/failed.txt"
fi
echo "details: $OUTDIR (results.txt, iscsi-test-cu.out, CUnitAutomated-Results.xml, $SUBJECT.log)"

for f in "$DAEMON_LOG" "$WORK"/cluster/node*/raftsan.log "$WORK"/cluster/node*/serve.log; do
    [[ -f $f ]] || continue
    if grep -q -E 'panicked' "$f"; then
        echo "FAIL: $SUBJECT log has a panic: $f"
        exit 1
    fi
done
if [[ $SUBJECT != tgtd && -z "$TEST_RE" ]]; then
    FLOOR_FILE="$REPO/tests/conformance-floor.txt"
    # "<N>" (raftsan) or "<N> <subject>" lines; the first one for SUBJECT counts.
    FLOOR=$(awk -v s="$SUBJECT" '/^[0-9]+/ { if (($2 == "" ? "raftsan" : $2) == s) { print $1; exit } }' "$FLOOR_FILE")
    [[ -n "$FLOOR" ]] || die "no floor for $SUBJECT in $FLOOR_FILE"
    if [[ $PASSED -lt $FLOOR ]]; then
        echo "FAIL: $SUBJECT passed $PASSED, below the floor of $FLOOR ($FLOOR_FILE)"
        # CI keeps no files: show why here. The assertion of each failed test, then the
        # daemons' last warnings and errors (expected ones included: the protocol tests
        # provoke some), by time.
        awk '/<CONDITION>/ { sub(/^[ \t]*<CONDITION> */, ""); sub(/ *<\/CONDITION>.*/, ""); print "  assertion: " $0 }' \
            "$RESULTS" | head -20
        echo "last WARN/ERROR lines of the $SUBJECT logs:"
        for f in "$DAEMON_LOG" "$WORK"/cluster/node*/serve.log; do
            [[ -f $f ]] || continue
            grep -E '^[0-9TZ:.-]+ +(WARN|ERROR) ' "$f" | sed "s|^|$(basename "$(dirname "$f")") |"
        done | sort -k2,2 | tail -40 | cut -c1-300
        exit 1
    fi
    echo "ok: $PASSED >= floor $FLOOR"
fi
