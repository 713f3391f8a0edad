//! Flush durability under the loss of every node at once (`kill-all-after-flush`).
//!
//! Fault model: the writers keep running; the harness issues a FLUSH through the initiator's NBD
//! export and, at the same moment, SYNCHRONIZE CACHE (16) on a direct iSCSI session, and records
//! for every block the newest write acknowledged before the flushes completed. Then all three
//! nodes get SIGKILL at the same moment (one `kill(2)` per process, back to back, before any is
//! reaped), stay dead for the hold, and are restarted together. Once a leader is back and the
//! replicas have caught up, every promised block is read back through the initiator and must
//! hold the promised write or a newer one (a `lost` violation otherwise); each read is also
//! judged for linearizability like any other.
//!
//! SCSI and NBD only promise the writes completed before the flush was *issued*; raftsan
//! acknowledges a write once it is committed, so the harness holds it to the stronger promise of
//! everything acknowledged before the flush *completed*.
//!
//! The client: `raftsan-initiator attach` rides through the total outage by itself (the run's
//! `no_path_retry` of 60 s queues I/O while no portal answers); the harness does not re-attach.
//! The direct iSCSI workers log in again with a backoff.
//!
//! The loss of a minority at once is one node for three; a kill -9 of the leader or a follower
//! right after a flush is `kill-leader` / `kill-follower`, whose reads the oracle already holds to
//! every acknowledged write (flushed or not), so it has no kind of its own.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use raftsan_tests::cluster::{Cluster, group_leader};
use serde::Serialize;
use serde_json::Value;
use tokio::task::JoinSet;

use crate::iscsi::Direct;
use crate::nbd::NbdClient;
use crate::oracle::BLOCK;
use crate::workload::{Op, Shared};

/// A completed flush and what it promises.
#[derive(Clone, Debug)]
pub struct FlushPoint {
    pub issued_ns: u64,
    pub completed_ns: u64,
    pub nbd_flush_ok: bool,
    /// None without direct sessions.
    pub sync_cache_ok: Option<bool>,
    /// (block, write id): the newest write of each block acknowledged before the flush completed.
    pub promised: Vec<(u64, u64)>,
}

/// The verdict of one flush-then-kill-all.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FlushCheck {
    pub at_s: f64,
    pub flush_ms: f64,
    pub nbd_flush_ok: bool,
    pub sync_cache_ok: Option<bool>,
    /// Blocks whose newest acknowledged write the flush promised.
    pub promised: usize,
    /// Promised blocks read back after the restart and judged.
    pub checked: usize,
    /// Promised writes missing after the restart (each is also a `lost` violation).
    pub lost: usize,
    /// Promised blocks whose read-back failed.
    pub unread: usize,
    /// From the restart of the nodes until one of them reports a leader of the volume.
    pub leader_after_restart_ms: Option<f64>,
}

/// FLUSH through the initiator and SYNCHRONIZE CACHE on a direct session, concurrently; the
/// promise covers the writes acknowledged before both completed, when at least one succeeded.
pub async fn flush_point(client: &NbdClient, direct: Option<&Direct>, shared: &Shared) -> FlushPoint {
    let issued_ns = shared.now_ns();
    let (nbd, sync) = tokio::join!(client.flush(), async {
        match direct {
            Some(d) => Some(d.synchronize_cache().await),
            None => None,
        }
    });
    let completed_ns = shared.now_ns();
    let nbd_flush_ok = matches!(nbd, Ok(Ok(_)));
    shared.record_op(
        Op {
            start_ns: issued_ns,
            end_ns: completed_ns,
            ok: nbd_flush_ok,
            direct: false,
        },
        (!nbd_flush_ok).then(|| "flush before kill-all failed".into()),
    );
    let promised = if nbd_flush_ok || sync == Some(true) {
        shared.oracle().acked_before(completed_ns)
    } else {
        Vec::new()
    };
    FlushPoint {
        issued_ns,
        completed_ns,
        nbd_flush_ok,
        sync_cache_ok: sync,
        promised,
    }
}

/// SIGKILL of every running node (the cluster's members: a removed node is stopped) at the same
/// moment; returns their ids (restart them with
/// [`crate::faults::Injected::heal`]).
pub fn kill_all(c: &mut Cluster) -> Result<Vec<u64>> {
    let mut victims = Vec::new();
    for n in &mut c.nodes {
        if n.is_running()
            && let Some(pid) = n.pid()
        {
            victims.push((n.id, pid));
        }
    }
    for &(_, pid) in &victims {
        let pid = libc::pid_t::try_from(pid).map_err(|_| anyhow!("pid {pid} out of range"))?;
        // SAFETY: kill(2) on children the cluster spawned and has not reaped yet (reaped below).
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
    // Reap them (a second SIGKILL to a dead, unreaped child is harmless).
    for &(id, _) in &victims {
        c.signal(id, libc::SIGKILL)?;
    }
    Ok(victims.into_iter().map(|(id, _)| id).collect())
}

/// Waits until one of `members` reports a leader of `group` (its own view); the time since
/// `since`.
pub fn leader_after(c: &Cluster, members: &[u64], group: u64, since: Instant, within: Duration) -> Option<f64> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        for &n in members {
            let leader = c
                .raftsan_on(n, &["status", "--json", "--local"])
                .ok()
                .and_then(|out| serde_json::from_str::<Value>(&out.stdout).ok())
                .and_then(|v| group_leader(&v, group));
            if leader.is_some() {
                return Some(since.elapsed().as_secs_f64() * 1e3);
            }
        }
        thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Reads every promised block back through the initiator (32 at a time) and judges it: the
/// promise ([`crate::oracle::Oracle::check_survived`]) and linearizability.
pub async fn verify(point: &FlushPoint, client: &Arc<NbdClient>, shared: &Arc<Shared>) -> FlushCheck {
    let mut check = FlushCheck {
        at_s: point.issued_ns as f64 / 1e9,
        flush_ms: (point.completed_ns - point.issued_ns) as f64 / 1e6,
        nbd_flush_ok: point.nbd_flush_ok,
        sync_cache_ok: point.sync_cache_ok,
        promised: point.promised.len(),
        ..FlushCheck::default()
    };
    for chunk in point.promised.chunks(32) {
        let mut set = JoinSet::new();
        for &(block, id) in chunk {
            let client = client.clone();
            let shared = shared.clone();
            set.spawn(async move {
                let start = shared.now_ns();
                let r = client.read(block * BLOCK as u64, BLOCK as u32).await;
                let end = shared.now_ns();
                match r {
                    Ok(Ok(data)) => {
                        let mut o = shared.oracle();
                        let _ = o.check_read(block, &data, start, end);
                        Some(o.check_survived(block, id, &data).is_ok())
                    }
                    _ => None,
                }
            });
        }
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Some(true)) => check.checked += 1,
                Ok(Some(false)) => {
                    check.checked += 1;
                    check.lost += 1;
                }
                _ => check.unread += 1,
            }
        }
    }
    if check.unread > 0 {
        shared.record_op(
            Op {
                start_ns: point.completed_ns,
                end_ns: shared.now_ns(),
                ok: false,
                direct: false,
            },
            Some(format!(
                "{} blocks promised by a flush could not be read back after kill-all",
                check.unread
            )),
        );
    }
    check
}
