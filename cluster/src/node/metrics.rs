//! Raft and ALUA gauges of a cluster node, sampled once a second from openraft's metrics (off the
//! I/O path: nothing here runs per command).
//!
//! * `raftsan_raft_term{group}`, `raftsan_raft_is_leader{group}`, `raftsan_raft_commit_index{group}`,
//!   `raftsan_raft_applied_index{group}` — `group` is "metadata" or the volume name;
//! * `raftsan_raft_follower_lag_entries{group,follower}` on the group's leader;
//! * `raftsan_raft_leader_changes_total{group}` as seen by this node;
//! * `raftsan_alua_state{volume}`: this node's port group state for the volume (0 active/optimized,
//!   1 active/non-optimized, 14 transitioning — the SPC-4 codes).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;

use super::Node;

const SAMPLE_EVERY: Duration = Duration::from_secs(1);

pub(super) async fn sample_loop(node: Arc<Node>) {
    let mut shutdown = node.shutdown.subscribe();
    let mut last_leader: HashMap<u64, Option<u64>> = HashMap::new();
    loop {
        sample(&node, &mut last_leader);
        tokio::select! {
            _ = tokio::time::sleep(SAMPLE_EVERY) => {}
            _ = shutdown.changed() => return,
        }
    }
}

fn sample(node: &Node, last_leader: &mut HashMap<u64, Option<u64>>) {
    let cat = node.catalogue();
    let groups: Vec<_> = node.read_groups().values().cloned().collect();
    for g in groups {
        let name = super::group_name(&cat, g.id);
        let m = g.raft.metrics().borrow_watched().clone();
        let labels = [("group", name.clone())];
        metrics::gauge!("raftsan_raft_term", &labels).set(m.current_term as f64);
        let leads = m.current_leader == Some(node.id);
        metrics::gauge!("raftsan_raft_is_leader", &labels).set(if leads { 1.0 } else { 0.0 });
        let idx = |l: &Option<openraft::alias::LogIdOf<crate::raft::TypeConfig>>| {
            l.as_ref().map(|l| l.index).unwrap_or(0) as f64
        };
        metrics::gauge!("raftsan_raft_commit_index", &labels).set(idx(&m.cluster_committed));
        metrics::gauge!("raftsan_raft_applied_index", &labels).set(idx(&m.last_applied));
        if let Some(r) = &m.replication {
            let last = m.last_log_index.unwrap_or(0);
            for (id, matched) in r.iter().filter(|(id, _)| **id != node.id) {
                let lag = last.saturating_sub(matched.as_ref().map(|l| l.index).unwrap_or(0));
                metrics::gauge!("raftsan_raft_follower_lag_entries", "group" => name.clone(), "follower" => id.to_string())
                    .set(lag as f64);
            }
        }
        let prev = last_leader.insert(g.id, m.current_leader);
        if prev.is_some_and(|p| p != m.current_leader) {
            metrics::counter!("raftsan_raft_leader_changes_total", &labels).increment(1);
        }
        if g.volume.is_some() {
            let state = match m.current_leader {
                None => 14.0,
                Some(l) if l == node.id => 0.0,
                Some(_) => 1.0,
            };
            metrics::gauge!("raftsan_alua_state", "volume" => name).set(state);
        }
    }
}
