//! Raft and ALUA metrics of a cluster node, sampled once a second from openraft's metrics, the
//! group's log store and the node's snapshot-transfer progress (off the I/O path: nothing
//! here runs per command). `group` is "metadata" or the volume name.
//!
//! * `raftsan_raft_term{group}`, `raftsan_raft_is_leader{group}`, `raftsan_raft_commit_index{group}`,
//!   `raftsan_raft_applied_index{group}` gauges;
//! * `raftsan_raft_follower_lag_entries{group,follower}` and
//!   `raftsan_raft_follower_lag_bytes{group,follower}` gauges on the group's leader (see
//!   [`average_entry_bytes`] for how bytes are estimated);
//! * `raftsan_raft_leader_changes_total{group}` counter: leader changes seen by this node;
//! * `raftsan_raft_elections_total{group}` counter: term increases seen by this node (each new
//!   term is one election; terms skipped between two samples are counted too);
//! * `raftsan_raft_snapshot_transfers_total{group,direction="sent"|"received"}` and
//!   `raftsan_raft_snapshot_bytes_total{group,direction}` counters, see [`SnapshotCounts`];
//! * `raftsan_volume_write_entries_total{volume}` and `raftsan_volume_coalesced_writes_total{volume}`
//!   counters on a volume's leader: log entries its write batcher proposed and the plain writes
//!   in them (counted per entry by the batcher in `node::volume`, not sampled; writes per entry
//!   is their ratio);
//! * `raftsan_alua_state{volume}`: this node's port group state for the volume (0 active/optimized,
//!   1 active/non-optimized, 14 transitioning — the SPC-4 codes).
//!
//! The counters of a group are registered at 0 when the sampler first sees the group.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, counter, describe_counter, describe_gauge, gauge};
use openraft::async_runtime::watch::WatchReceiver;

use super::Node;
use crate::raft::GroupId;
use crate::rpc::snapshot::{SnapshotDirection, SnapshotTransfer};

const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// What the sampler remembers of one group between samples.
struct GroupState {
    leader: Option<u64>,
    term: u64,
    leader_changes: Counter,
    elections: Counter,
    snapshots: [SnapshotCounts; 2],
}

impl GroupState {
    fn new(name: &str, leader: Option<u64>, term: u64) -> Self {
        let leader_changes = counter!("raftsan_raft_leader_changes_total", "group" => name.to_string());
        let elections = counter!("raftsan_raft_elections_total", "group" => name.to_string());
        leader_changes.absolute(0);
        elections.absolute(0);
        GroupState {
            leader,
            term,
            leader_changes,
            elections,
            snapshots: [SnapshotCounts::new(name, "sent"), SnapshotCounts::new(name, "received")],
        }
    }
}

/// Snapshot transfers of one group in one direction, derived from the node's
/// [`SnapshotProgress`](crate::rpc::SnapshotProgress) (what `raftsan status` shows): the
/// progress keeps the running or last transfer per peer, so the sampler counts a transfer when
/// it sees a new one (its counters went back, or its totals changed) and adds the bytes covered
/// since the last sample.
///
/// Bytes are an estimate: the progress counts chunks that travelled and bytes covered (travelled
/// or skipped because both sides already had them), so the bytes that travelled are taken as
/// `bytes_done × chunks_sent / (chunks_sent + chunks_skipped)` — exact except for a short last
/// chunk. A transfer that starts and ends between two samples with exactly the same totals as
/// the previous one to the same peer is missed.
struct SnapshotCounts {
    transfers: Counter,
    bytes: Counter,
    /// Per peer: the last transfer seen and the travelled bytes already counted of it.
    seen: HashMap<u64, (SnapshotTransfer, u64)>,
}

impl SnapshotCounts {
    fn new(group: &str, direction: &'static str) -> Self {
        let transfers =
            counter!("raftsan_raft_snapshot_transfers_total", "group" => group.to_string(), "direction" => direction);
        let bytes =
            counter!("raftsan_raft_snapshot_bytes_total", "group" => group.to_string(), "direction" => direction);
        transfers.absolute(0);
        bytes.absolute(0);
        SnapshotCounts {
            transfers,
            bytes,
            seen: HashMap::new(),
        }
    }

    fn observe(&mut self, peer: u64, t: &SnapshotTransfer) {
        let travelled = travelled_bytes(t);
        let counted = match self.seen.get(&peer) {
            Some((prev, counted)) if !is_new_transfer(prev, t) => *counted,
            _ => {
                self.transfers.increment(1);
                0
            }
        };
        self.bytes.increment(travelled.saturating_sub(counted));
        self.seen.insert(peer, (t.clone(), travelled.max(counted)));
    }
}

/// Whether `now` is a different transfer from `prev` (same group, direction and peer).
fn is_new_transfer(prev: &SnapshotTransfer, now: &SnapshotTransfer) -> bool {
    now.bytes_total != prev.bytes_total
        || now.bytes_done < prev.bytes_done
        || now.chunks_sent < prev.chunks_sent
        || now.chunks_skipped < prev.chunks_skipped
        || (now.running && !prev.running)
}

/// The bytes of a transfer that travelled (see [`SnapshotCounts`]).
fn travelled_bytes(t: &SnapshotTransfer) -> u64 {
    let chunks = t.chunks_sent + t.chunks_skipped;
    if chunks == 0 {
        return 0;
    }
    (u128::from(t.bytes_done) * u128::from(t.chunks_sent) / u128::from(chunks)) as u64
}

/// Registers the help text of the Raft and ALUA metrics.
fn describe() {
    describe_gauge!("raftsan_raft_term", "Current Raft term of the group on this node.");
    describe_gauge!("raftsan_raft_is_leader", "1 when this node leads the group.");
    describe_gauge!(
        "raftsan_raft_commit_index",
        "Highest log index known committed in the group."
    );
    describe_gauge!("raftsan_raft_applied_index", "Highest log index applied on this node.");
    describe_gauge!(
        "raftsan_raft_follower_lag_entries",
        "Log entries a follower is behind the leader (on the leader)."
    );
    describe_gauge!(
        "raftsan_raft_follower_lag_bytes",
        "Estimated bytes a follower is behind: lag entries times the group's average entry size."
    );
    describe_counter!(
        "raftsan_raft_leader_changes_total",
        "Leader changes of the group seen by this node."
    );
    describe_counter!(
        "raftsan_raft_elections_total",
        "Term increases (elections) seen by this node."
    );
    describe_counter!(
        "raftsan_raft_snapshot_transfers_total",
        "Snapshot transfers of the group, by direction (sent, received)."
    );
    describe_counter!(
        "raftsan_raft_snapshot_bytes_total",
        "Snapshot bytes that travelled (estimated from chunks), by direction."
    );
    describe_counter!(
        "raftsan_volume_write_entries_total",
        "Log entries of coalesced plain writes proposed by this node while leading the volume."
    );
    describe_counter!(
        "raftsan_volume_coalesced_writes_total",
        "Plain writes proposed in those entries (writes per entry: ratio to write_entries_total)."
    );
    describe_gauge!(
        "raftsan_alua_state",
        "SPC-4 ALUA state code of this node's port group for the volume (0 AO, 1 ANO, 14 transitioning)."
    );
}

pub(super) async fn sample_loop(node: Arc<Node>) {
    describe();
    let mut shutdown = node.shutdown.subscribe();
    let mut state: HashMap<GroupId, GroupState> = HashMap::new();
    loop {
        sample(&node, &mut state);
        tokio::select! {
            _ = tokio::time::sleep(SAMPLE_EVERY) => {}
            _ = shutdown.changed() => return,
        }
    }
}

fn sample(node: &Node, state: &mut HashMap<GroupId, GroupState>) {
    let cat = node.catalogue();
    let groups: Vec<_> = node.read_groups().values().cloned().collect();
    let transfers = node.progress.all();
    for g in groups {
        let name = super::group_name(&cat, g.id);
        let m = g.raft.metrics().borrow_watched().clone();
        let labels = [("group", name.clone())];
        gauge!("raftsan_raft_term", &labels).set(m.current_term as f64);
        let leads = m.current_leader == Some(node.id);
        gauge!("raftsan_raft_is_leader", &labels).set(if leads { 1.0 } else { 0.0 });
        let idx = |l: &Option<openraft::alias::LogIdOf<crate::raft::TypeConfig>>| {
            l.as_ref().map(|l| l.index).unwrap_or(0) as f64
        };
        gauge!("raftsan_raft_commit_index", &labels).set(idx(&m.cluster_committed));
        gauge!("raftsan_raft_applied_index", &labels).set(idx(&m.last_applied));
        if let Some(r) = &m.replication {
            let last = m.last_log_index.unwrap_or(0);
            let first = m.purged.as_ref().map(|l| l.index + 1).unwrap_or(0);
            let avg = average_entry_bytes(g.log.record_bytes(), last.saturating_add(1).saturating_sub(first));
            for (id, matched) in r.iter().filter(|(id, _)| **id != node.id) {
                let lag = last.saturating_sub(matched.as_ref().map(|l| l.index).unwrap_or(0));
                let follower = id.to_string();
                gauge!("raftsan_raft_follower_lag_entries", "group" => name.clone(), "follower" => follower.clone())
                    .set(lag as f64);
                gauge!("raftsan_raft_follower_lag_bytes", "group" => name.clone(), "follower" => follower)
                    .set(lag as f64 * avg);
            }
        }

        let s = state
            .entry(g.id)
            .or_insert_with(|| GroupState::new(&name, m.current_leader, m.current_term));
        if s.leader != m.current_leader {
            s.leader_changes.increment(1);
            s.leader = m.current_leader;
        }
        if m.current_term > s.term {
            s.elections.increment(m.current_term - s.term);
            s.term = m.current_term;
        }
        for t in transfers.iter().filter(|t| t.group == g.id) {
            match t.direction {
                SnapshotDirection::Sending { to } => s.snapshots[0].observe(to, t),
                SnapshotDirection::Receiving { from } => s.snapshots[1].observe(from, t),
            }
        }

        if g.volume.is_some() {
            let alua = match m.current_leader {
                None => 14.0,
                Some(l) if l == node.id => 0.0,
                Some(_) => 1.0,
            };
            gauge!("raftsan_alua_state", "volume" => name).set(alua);
        }
    }
}

/// The group's average log entry size in bytes: the bytes of records in its log segments
/// ([`LogStore::record_bytes`](crate::raft::log_store::LogStore::record_bytes)) over the
/// `entries` openraft still holds (last log index − purged index). An estimate: segments may
/// still contain purged entries until they are deleted, and framing is included, so it errs on
/// the high side. 0 when no entry is held.
fn average_entry_bytes(record_bytes: u64, entries: u64) -> f64 {
    if entries == 0 {
        return 0.0;
    }
    record_bytes as f64 / entries as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transfer(done: u64, total: u64, sent: u64, skipped: u64, running: bool) -> SnapshotTransfer {
        SnapshotTransfer {
            group: 1,
            direction: SnapshotDirection::Sending { to: 2 },
            bytes_done: done,
            bytes_total: total,
            chunks_sent: sent,
            chunks_skipped: skipped,
            running,
            error: None,
        }
    }

    #[test]
    fn travelled_bytes_leave_out_skipped_chunks() {
        assert_eq!(travelled_bytes(&transfer(0, 100, 0, 0, true)), 0);
        assert_eq!(travelled_bytes(&transfer(400, 1000, 1, 3, true)), 100);
        assert_eq!(travelled_bytes(&transfer(1000, 1000, 10, 0, false)), 1000);
    }

    #[test]
    fn new_transfers_are_told_apart_from_progress() {
        let a = transfer(100, 1000, 1, 0, true);
        assert!(!is_new_transfer(&a, &transfer(300, 1000, 3, 0, true)));
        assert!(!is_new_transfer(&a, &transfer(1000, 1000, 10, 0, false)));
        assert!(is_new_transfer(&a, &transfer(50, 1000, 1, 0, true)));
        assert!(is_new_transfer(&a, &transfer(100, 2000, 1, 0, true)));
        assert!(is_new_transfer(
            &transfer(1000, 1000, 10, 0, false),
            &transfer(1000, 1000, 10, 0, true)
        ));
    }

    #[test]
    fn average_entry_size_is_record_bytes_over_entries_held() {
        assert_eq!(average_entry_bytes(1500, 10), 150.0);
        assert_eq!(average_entry_bytes(1500, 0), 0.0);
    }
}
