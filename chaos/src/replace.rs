//! `replace-node`: a node replaced by a new one while I/O runs.
//!
//! Fault model: an operator brings up a brand-new machine and swaps it for an old one, as a
//! failed disk or a retired host needs. The harness
//!
//! 1. adds a node under the next unused id (4, then 5, ...: ids are never reused, DESIGN.md
//!    invariant 8) with `raftsan cluster add-node` ([`Cluster::add_node`]), and waits until it
//!    is a voter of the metadata group and of the volume's group and has applied everything the
//!    leaders had committed when it became one (the "resync" figure of the kind);
//! 2. after the hold (four members serve I/O), removes an old member with `raftsan cluster
//!    remove-node` (which returns once every group dropped it) and stops its process (SIGTERM).
//!
//! The victim is a follower of the volume, drawn from the schedule's RNG. The client was given
//! the three original portals (and learns others by SendTargets through them), so the victim is
//! drawn among the original nodes only while three of them are members: at least two of the
//! portals the client started with stay members. When that leaves no follower (a new node leads
//! and the others are the last two original nodes) the leader itself is removed: openraft hands
//! leadership over and the removed leader steps down once the change commits; the time until a
//! survivor reports another leader is the kind's "new leader" figure.
//!
//! What must hold: no acknowledged write lost, no stale read on any path (a read that the
//! removed node returned is judged like any other; a read that failed because its portal went
//! away is not an error), the new member's image identical to the others' at the end. The run
//! then continues with the new members: later faults, the heal and the final checks use them.

use std::path::PathBuf;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use raftsan_tests::cluster::{Cluster, applied_index, group_field, group_leader};
use serde_json::Value;

use crate::run::{local_leader, status};

/// The metadata group's id.
const META: u64 = 0;
/// How long the new node may take to become a voter of both groups and catch up.
const CATCH_UP: Duration = Duration::from_secs(120);
/// How long `raftsan cluster remove-node` may take (it waits up to 60 s itself).
const REMOVE: Duration = Duration::from_secs(90);

/// The node to remove: a follower of the volume among `members` (the leader only when no
/// follower may go), keeping at least two of the `original` nodes members. `pick(n)` draws an
/// index below `n` (the schedule's RNG).
pub fn choose_victim(members: &[u64], original: &[u64], leader: u64, pick: impl FnOnce(usize) -> usize) -> u64 {
    let originals_left = members.iter().filter(|m| original.contains(m)).count();
    let removable = |m: &u64| originals_left > 2 || !original.contains(m);
    let followers: Vec<u64> = members
        .iter()
        .copied()
        .filter(|&m| m != leader && removable(&m))
        .collect();
    if followers.is_empty() {
        return leader;
    }
    followers[pick(followers.len()).min(followers.len() - 1)]
}

/// The voters of `group` as its leader reports them.
pub fn voters(s: &Value, group: u64) -> Vec<u64> {
    let Some(leader) = group_leader(s, group) else {
        return Vec::new();
    };
    group_field(s, leader, group, "voters")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

/// Commit index of `group` as its leader reports it.
fn leader_commit(s: &Value, group: u64) -> Option<u64> {
    let leader = group_leader(s, group)?;
    group_field(s, leader, group, "commit_index")?.as_u64()
}

/// A replacement under way: the new node is in and caught up; [`Replacement::finish`] removes
/// the old one.
#[derive(Debug)]
pub struct Replacement {
    pub added: u64,
    pub victim: u64,
    group: u64,
    /// The members once the victim is gone.
    survivors: Vec<u64>,
    /// From the start of the add until the new node voted in both groups and had applied what
    /// their leaders had committed when it became a voter.
    pub caught_up_ms: f64,
}

/// What the removal took.
#[derive(Clone, Debug, Default)]
pub struct Removed {
    /// The victim led the volume: from the start of the removal until a survivor reported
    /// another leader.
    pub new_leader_ms: Option<f64>,
    pub remove_ms: f64,
}

impl Replacement {
    /// Adds node `added` to the cluster whose members are `members`, and waits until it is a
    /// voter of the metadata group and of `group` and has caught up.
    pub fn begin(c: &mut Cluster, members: &[u64], added: u64, victim: u64, group: u64) -> Result<Replacement> {
        ensure!(
            c.node(added).is_err(),
            "node id {added} was used before (ids are never reused)"
        );
        let t = Instant::now();
        c.add_node(added).with_context(|| format!("adding node {added}"))?;
        let mut with_new = members.to_vec();
        with_new.push(added);
        let deadline = t + CATCH_UP;
        // The leaders' commit indexes once the new node votes in both groups.
        let mut goal: Option<(u64, u64)> = None;
        loop {
            if let Some(s) = status(c, &with_new) {
                if goal.is_none() && voters(&s, META).contains(&added) && voters(&s, group).contains(&added) {
                    goal = leader_commit(&s, META).zip(leader_commit(&s, group));
                }
                if let Some((meta, vol)) = goal
                    && applied_index(&s, added, META).is_some_and(|a| a >= meta)
                    && applied_index(&s, added, group).is_some_and(|a| a >= vol)
                {
                    break;
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "node {added} did not become a caught-up voter of the metadata group and volume {group} within {CATCH_UP:?}"
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
        Ok(Replacement {
            added,
            victim,
            group,
            survivors: with_new.into_iter().filter(|&m| m != victim).collect(),
            caught_up_ms: t.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// The members once the victim is gone.
    pub fn survivors(&self) -> &[u64] {
        &self.survivors
    }

    /// `raftsan cluster remove-node` of the victim through a survivor (it returns once every
    /// group dropped the victim), then SIGTERM of the victim's process.
    pub fn finish(self, c: &mut Cluster) -> Result<Removed> {
        let victim = self.victim;
        let victim_led = local_leader(c, victim, self.group) == Some(victim);
        let via = self.survivors.first().copied().ok_or_else(|| anyhow!("no survivor"))?;
        let config: PathBuf = c.node(via)?.config.clone();
        let bin = raftsan_tests::raftsan_bin()?;
        let t = Instant::now();
        let mut new_leader_ms = None;
        let out = thread::scope(|sc| {
            let cmd = sc.spawn(|| {
                raftsan_tests::run(
                    Command::new(&bin)
                        .args(["cluster", "remove-node", "--id", &victim.to_string(), "--config"])
                        .arg(&config)
                        .env("NO_COLOR", "1"),
                    REMOVE,
                )
            });
            while !cmd.is_finished() {
                if victim_led
                    && new_leader_ms.is_none()
                    && self
                        .survivors
                        .iter()
                        .any(|&n| local_leader(c, n, self.group).is_some_and(|l| l != victim))
                {
                    new_leader_ms = Some(t.elapsed().as_secs_f64() * 1e3);
                }
                thread::sleep(Duration::from_millis(50));
            }
            cmd.join().map_err(|_| anyhow!("the remove-node thread panicked"))?
        })?;
        ensure!(out.success(), "remove-node {victim} failed:\n{}", out.combined());
        let remove_ms = t.elapsed().as_secs_f64() * 1e3;
        c.stop(victim)?;
        if victim_led && new_leader_ms.is_none() {
            let deadline = Instant::now() + Duration::from_secs(30);
            while new_leader_ms.is_none() && Instant::now() < deadline {
                if self
                    .survivors
                    .iter()
                    .any(|&n| local_leader(c, n, self.group).is_some_and(|l| l != victim))
                {
                    new_leader_ms = Some(t.elapsed().as_secs_f64() * 1e3);
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(Removed {
            new_leader_ms,
            remove_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_victim_is_a_follower_and_two_original_nodes_stay() {
        let orig = [1, 2, 3];
        // Three original members: any follower.
        assert_eq!(choose_victim(&[1, 2, 3], &orig, 2, |_| 0), 1);
        assert_eq!(choose_victim(&[1, 2, 3], &orig, 2, |_| 1), 3);
        // Two original members left: only a new node may go.
        assert_eq!(choose_victim(&[1, 3, 4], &orig, 1, |_| 0), 4);
        assert_eq!(choose_victim(&[1, 3, 4], &orig, 3, |n| n - 1), 4);
        // ... and when the new node leads, it is the one removed.
        assert_eq!(choose_victim(&[1, 3, 4], &orig, 4, |_| 0), 4);
        assert_eq!(choose_victim(&[2, 4, 5], &orig, 4, |_| 0), 5);
    }

    #[test]
    fn voters_are_read_from_the_leaders_report() {
        let s: Value = serde_json::json!({"nodes": [
            {"id": 1, "groups": [{"group": 1, "leader": 2, "term": 3, "voters": [1, 2, 3]}]},
            {"id": 2, "groups": [{"group": 1, "leader": 2, "term": 3, "voters": [1, 2, 3, 4], "commit_index": 40}]},
        ]});
        assert_eq!(voters(&s, 1), vec![1, 2, 3, 4]);
        assert_eq!(leader_commit(&s, 1), Some(40));
        assert!(voters(&s, 0).is_empty());
    }
}
