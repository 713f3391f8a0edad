#!/usr/bin/env bash
# A stand-in for the raftsan binary that runs tgtd instead, to check the raftsan side of the test
# harness and scripts before raftsan works:
#
#   RAFTSAN_BIN=$PWD/tests/tgtd-as-raftsan.sh cargo nextest run -p raftsan-tests raftsan
#   SHIM_THIN_PROVISIONING=0 RAFTSAN_BIN=$PWD/tests/tgtd-as-raftsan.sh scripts/conformance.sh raftsan
#
# LUs are made thin (tgt's thin_provisioning=1), as raftsan's are, unless SHIM_THIN_PROVISIONING=0:
# with it, tgt 1.0.85 sends libiscsi's iscsi-test-cu into an endless loop after the
# CompareAndWrite suite, so the conformance check of the scripts runs without it.
#
# Accepts `serve --config FILE --listen ADDR:PORT [--listen ...] [--data-dir DIR] [--metrics A]`
# with FILE a tgt targets.conf. Expected to fail the tests where raftsan deliberately differs from
# tgt (ACLs: name AND address; config errors with file and line).
set -euo pipefail
[[ ${1:-} == serve ]] || { echo "tgtd-as-raftsan: only 'serve' is supported" >&2; exit 2; }
shift
CONFIG="" LISTEN=()
while [[ $# -gt 0 ]]; do
    case $1 in
    --config) CONFIG=$2; shift 2 ;;
    --listen) LISTEN+=("$2"); shift 2 ;;
    --data-dir | --metrics) shift 2 ;;
    *) echo "tgtd-as-raftsan: unknown argument $1" >&2; exit 2 ;;
    esac
done
[[ -n "$CONFIG" && ${#LISTEN[@]} -gt 0 ]] || { echo "tgtd-as-raftsan: need --config and --listen" >&2; exit 2; }
mkdir -p /var/run/tgtd
PID=""
trap '[[ -n "$PID" ]] && kill -KILL "$PID" 2>/dev/null; exit 0' TERM INT
for _ in $(seq 1 50); do
    CPORT=$((100 + RANDOM % 900))
    [[ -e /var/run/tgtd/socket.$CPORT ]] && continue
    # Listen on a parking portal until the targets are configured, so that the real portal
    # accepting TCP means ready (as the harness assumes).
    PARKING="127.0.0.2:$((20000 + CPORT))"
    tgtd -f -C "$CPORT" --iscsi "portal=$PARKING" &
    PID=$!
    for _ in $(seq 1 100); do
        tgtadm -C "$CPORT" --mode sys --op show >/dev/null 2>&1 && break
        kill -0 "$PID" 2>/dev/null || break
        sleep 0.05
    done
    kill -0 "$PID" 2>/dev/null && break
    PID=""
done
[[ -n "$PID" ]] || { echo "tgtd-as-raftsan: could not start tgtd" >&2; exit 1; }
tgt-admin -C "$CPORT" -e -c "$CONFIG" || { kill -KILL "$PID"; exit 1; }
# tgt reports full provisioning unless told; raftsan thin-provisions file LUs.
[[ ${SHIM_THIN_PROVISIONING:-1} == 0 ]] || tgtadm -C "$CPORT" --lld iscsi --op show --mode target | awk '/^Target [0-9]+:/ {t = $2} /LUN: [1-9]/ {print t, $2}' |
    tr -d ':' | while read -r tid lun; do
    tgtadm -C "$CPORT" --lld iscsi --op update --mode logicalunit --tid "$tid" --lun "$lun" \
        --params thin_provisioning=1 || true
done
for portal in "${LISTEN[@]}"; do
    tgtadm -C "$CPORT" --lld iscsi --op new --mode portal --param "portal=$portal"
done
tgtadm -C "$CPORT" --lld iscsi --op delete --mode portal --param "portal=$PARKING"
wait "$PID"
