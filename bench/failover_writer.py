#!/usr/bin/env python3
"""One failover trial, timed from the client side (used by bench/failover.sh).

Logs in to one iSCSI portal with libiscsi (through ctypes: the same library iscsi-perf and
qemu's iscsi driver use), issues 4 KiB WRITE(16) commands one at a time (queue depth 1) for a
warm-up period, then sends SIGKILL to --kill-pid (the volume leader's `raftsan serve`) and keeps
writing. It measures, on one monotonic clock:

  kill_to_first_good_ms  from just before kill(2) to the GOOD completion of the first write that
                         was issued after the kill (writes that end in CHECK CONDITION or a lost
                         connection are retried at once and counted in `failed_writes`)
  first_write_ms         latency of that first post-kill write alone (issue to its completion)
  gap_ms                 longest completion-to-completion gap around the kill, i.e. how long the
                         application saw no progress
  warmup_p50_ms          median write latency before the kill (steady state for comparison)

The writer runs single-threaded and synchronously, so no write is in flight at the kill: the
first post-kill write is issued within microseconds of kill(2) returning. The figures therefore
have the resolution of time.monotonic() plus at most one write's latency. After the first GOOD
write it keeps writing for --after seconds to show the new steady state, then prints one JSON
object on stdout and exits 0 (1 if no write succeeded within --timeout).
"""

import argparse
import ctypes
import json
import os
import signal
import statistics
import sys
import time

SCSI_STATUS_GOOD = 0
ISCSI_SESSION_NORMAL = 2
BLOCK = 512
IO_BYTES = 4096


def load_libiscsi():
    lib = ctypes.CDLL("libiscsi.so.7")
    lib.iscsi_create_context.restype = ctypes.c_void_p
    lib.iscsi_create_context.argtypes = [ctypes.c_char_p]
    lib.iscsi_set_targetname.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.iscsi_set_session_type.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.iscsi_set_timeout.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.iscsi_full_connect_sync.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    lib.iscsi_get_error.restype = ctypes.c_char_p
    lib.iscsi_get_error.argtypes = [ctypes.c_void_p]
    # struct scsi_task *iscsi_write16_sync(iscsi, lun, lba, data, datalen, blocksize,
    #                                      wrprotect, dpo, fua, fua_nv, group_number)
    lib.iscsi_write16_sync.restype = ctypes.c_void_p
    lib.iscsi_write16_sync.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_char_p, ctypes.c_uint32,
        ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
    ]
    lib.scsi_free_scsi_task.argtypes = [ctypes.c_void_p]
    lib.iscsi_logout_sync.argtypes = [ctypes.c_void_p]
    lib.iscsi_destroy_context.argtypes = [ctypes.c_void_p]
    return lib


def process_gone(pid):
    """True once the process no longer runs (gone, or a zombie nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True
    # The state follows the command name in parentheses, which may itself contain spaces.
    state = stat[stat.rfind(b")") + 2:][:1]
    return state in (b"Z", b"X")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--portal", required=True, help="ADDR:PORT of a node that survives")
    ap.add_argument("--target", required=True)
    ap.add_argument("--lun", type=int, default=1)
    ap.add_argument("--initiator", default="iqn.2026-11.org.raftsan.bench:failover")
    ap.add_argument("--kill-pid", type=int, required=True)
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of writes before the kill")
    ap.add_argument("--after", type=float, default=0.5, help="seconds of writes after the first GOOD")
    ap.add_argument("--timeout", type=float, default=30.0, help="give up this long after the kill")
    ap.add_argument("--span-blocks", type=int, default=1 << 18, help="LBAs written cycle over this span")
    ap.add_argument("--lba-base", type=int, default=0)
    a = ap.parse_args()

    lib = load_libiscsi()
    ctx = lib.iscsi_create_context(a.initiator.encode())
    if not ctx:
        sys.exit("iscsi_create_context failed")
    lib.iscsi_set_targetname(ctx, a.target.encode())
    lib.iscsi_set_session_type(ctx, ISCSI_SESSION_NORMAL)
    # A sync call that gets no answer at all fails after this long (then we retry).
    lib.iscsi_set_timeout(ctx, max(1, int(a.timeout)))
    if lib.iscsi_full_connect_sync(ctx, a.portal.encode(), a.lun) != 0:
        sys.exit(f"login to {a.portal} failed: {lib.iscsi_get_error(ctx).decode(errors='replace')}")

    data = bytes([0xAB]) * IO_BYTES
    step = IO_BYTES // BLOCK
    lba = a.lba_base

    def write_once():
        """Returns (ok, error text or None, issue time, completion time)."""
        nonlocal lba
        this = lba
        lba = a.lba_base + ((lba - a.lba_base + step) % a.span_blocks)
        t0 = time.monotonic()
        task = lib.iscsi_write16_sync(ctx, a.lun, this, data, IO_BYTES, BLOCK, 0, 0, 0, 0, 0)
        t1 = time.monotonic()
        if not task:
            return False, "no task: " + lib.iscsi_get_error(ctx).decode(errors="replace"), t0, t1
        status = ctypes.c_int.from_address(task).value  # struct scsi_task starts with `int status`
        lib.scsi_free_scsi_task(task)
        if status != SCSI_STATUS_GOOD:
            err = lib.iscsi_get_error(ctx).decode(errors="replace")
            return False, f"status 0x{status:02x}: {err}", t0, t1
        return True, None, t0, t1

    warm = []
    last_done = None
    end = time.monotonic() + a.warmup
    while time.monotonic() < end:
        ok, err, t0, t1 = write_once()
        if not ok:
            sys.exit(f"write failed before the kill: {err}")
        warm.append(t1 - t0)
        last_done = t1

    t_kill = time.monotonic()
    os.kill(a.kill_pid, signal.SIGKILL)
    while not process_gone(a.kill_pid) and time.monotonic() - t_kill < 1.0:
        pass
    t_dead = time.monotonic()

    failed = []
    first = None
    while time.monotonic() - t_kill < a.timeout:
        ok, err, t0, t1 = write_once()
        if ok:
            first = (t0, t1)
            break
        if len(failed) < 20:
            failed.append({"at_ms": round((t1 - t_kill) * 1e3, 1), "error": err})
        else:
            failed.append(None)
    result = {
        "portal": a.portal,
        "killed_pid": a.kill_pid,
        "warmup_writes": len(warm),
        "warmup_p50_ms": round(statistics.median(warm) * 1e3, 3) if warm else None,
        "warmup_max_ms": round(max(warm) * 1e3, 3) if warm else None,
        "dead_after_ms": round((t_dead - t_kill) * 1e3, 3),
        "failed_writes": len(failed),
        "errors": [f for f in failed if f is not None],
    }
    if first is None:
        result["kill_to_first_good_ms"] = None
        print(json.dumps(result), flush=True)
        return 1
    result["kill_to_first_good_ms"] = round((first[1] - t_kill) * 1e3, 3)
    result["first_write_ms"] = round((first[1] - first[0]) * 1e3, 3)

    after = []
    prev = first[1]
    gap = first[1] - last_done
    end = time.monotonic() + a.after
    while time.monotonic() < end:
        ok, err, t0, t1 = write_once()
        if ok:
            after.append(t1 - t0)
            gap = max(gap, t1 - prev)
            prev = t1
    result["gap_ms"] = round(gap * 1e3, 3)
    result["after_writes"] = len(after)
    result["after_p50_ms"] = round(statistics.median(after) * 1e3, 3) if after else None
    print(json.dumps(result), flush=True)
    lib.iscsi_logout_sync(ctx)
    lib.iscsi_destroy_context(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
