//! Faults against real processes, each with its model:
//!
//! | fault | what happens | what must hold |
//! | --- | --- | --- |
//! | `kill-leader` | SIGKILL of the node leading the volume, restarted after the hold | a new leader within the failover budget; the client carries on |
//! | `kill-follower` | SIGKILL of a node not leading it, restarted after the hold | no leader change needed; the client carries on |
//! | `kill-two-in-turn` | a follower is killed and restarted, then the leader | as above, twice |
//! | `pause-leader` | SIGSTOP of the leader, SIGCONT after the hold: it wakes up believing it leads | its stale leadership is fenced (no stale read, no lost write) |
//! | `partition-leader` | iptables drops the leader's cluster RPC both ways; its portal stays reachable | the majority elects a new leader; the old one stops serving |
//! | `partition-follower` | iptables drops a follower's cluster RPC both ways | no leader change; the follower's portal says transitioning, it catches up after the heal |
//! | `partition-leader-inbound` | asymmetric: nothing reaches the leader's cluster RPC listener (votes, forwarded commands), while its own connections to the followers (replication) keep working | no leader change needed; commands through the followers' portals fail over; nothing lost or stale |
//! | `client-cut-from-leader` | iptables drops the client's packets to the leader's portal | the client fails over to the other portals |
//! | `netem-delay` | 100-200 ms ±50 ms each way on the client's path to the leader's portal only ([`netem`]) | the client carries on, slower; nothing else is touched |
//! | `netem-loss` | 5-20 % of the packets each way on that path are dropped ([`netem`]) | TCP or the client's failover hides it |
//! | `delayed-stale-write` | a write to the leader is held back, leadership moves, a newer write is acknowledged, then the old one is delivered ([`stale`]) | the late write gets UNIT ATTENTION 2A/06 and is not executed (DESIGN.md invariant 3) |
//! | `kill-all-after-flush` | a flush completes, then SIGKILL of all three nodes at once, all restarted after the hold | every write acknowledged before the flush survives ([`crate::durability`]) |
//! | `disk-fail-follower` | a follower's volume image fails writes with EIO (`crate::disk`) | the follower leaves the group with a storage ERROR; the others carry on |
//! | `disk-full-leader` | the leader's Raft log fdatasync fails with ENOSPC (`crate::disk`) | the leader leaves the group; a new leader within the failover budget |
//! | `replace-node` | a brand-new node (next unused id) is added and caught up, then a follower is removed and stopped ([`crate::replace`]) | the client carries on; the new node serves the same data; the run continues with the new members |
//!
//! Every fault is healed (node restarted or resumed, rules removed; a disk-faulted node killed
//! and restarted without the fault; a replaced node removed and stopped) before the next.

use std::process::Command;
use std::time::Duration;

use anyhow::{Result, ensure};
use raftsan_tests::cluster::{Cluster, RPC_PORT};

use crate::netem::{self, NetFault};
use crate::stale;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    KillLeader,
    KillFollower,
    KillTwoInTurn,
    PauseLeader,
    PartitionLeader,
    ClientCutFromLeader,
    NetemDelay,
    NetemLoss,
    DelayedStaleWrite,
    KillAllAfterFlush,
    DiskFailFollower,
    DiskFullLeader,
    ReplaceNode,
    PartitionFollower,
    PartitionLeaderInbound,
}

impl FaultKind {
    pub const ALL: [FaultKind; 15] = [
        FaultKind::KillLeader,
        FaultKind::KillFollower,
        FaultKind::KillTwoInTurn,
        FaultKind::PauseLeader,
        FaultKind::PartitionLeader,
        FaultKind::ClientCutFromLeader,
        FaultKind::NetemDelay,
        FaultKind::NetemLoss,
        FaultKind::DelayedStaleWrite,
        FaultKind::KillAllAfterFlush,
        FaultKind::DiskFailFollower,
        FaultKind::DiskFullLeader,
        FaultKind::ReplaceNode,
        FaultKind::PartitionFollower,
        FaultKind::PartitionLeaderInbound,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillLeader => "kill-leader",
            FaultKind::KillFollower => "kill-follower",
            FaultKind::KillTwoInTurn => "kill-two-in-turn",
            FaultKind::PauseLeader => "pause-leader",
            FaultKind::PartitionLeader => "partition-leader",
            FaultKind::ClientCutFromLeader => "client-cut-from-leader",
            FaultKind::NetemDelay => "netem-delay",
            FaultKind::NetemLoss => "netem-loss",
            FaultKind::DelayedStaleWrite => "delayed-stale-write",
            FaultKind::KillAllAfterFlush => "kill-all-after-flush",
            FaultKind::DiskFailFollower => "disk-fail-follower",
            FaultKind::DiskFullLeader => "disk-full-leader",
            FaultKind::ReplaceNode => "replace-node",
            FaultKind::PartitionFollower => "partition-follower",
            FaultKind::PartitionLeaderInbound => "partition-leader-inbound",
        }
    }

    /// The kind named `name` (as [`FaultKind::name`] spells it).
    pub fn from_name(name: &str) -> Option<FaultKind> {
        FaultKind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Whether the fault takes the volume's leader away (a new leader is expected).
    pub fn hits_leader(self) -> bool {
        !matches!(
            self,
            FaultKind::KillFollower
                | FaultKind::ClientCutFromLeader
                | FaultKind::NetemDelay
                | FaultKind::NetemLoss
                | FaultKind::DiskFailFollower
                | FaultKind::ReplaceNode
                | FaultKind::PartitionFollower
                | FaultKind::PartitionLeaderInbound
        )
    }

    /// The longest client stall the fault may cause by raftsan's claim: under a second when a
    /// node dies (its connections close, its own storage error takes it out, or a planned
    /// membership change), under three when it hangs or is cut off (found by timeouts) or the
    /// path is degraded. None for `kill-all-after-flush`: the whole cluster is down by design.
    pub fn stall_budget(self) -> Option<Duration> {
        match self {
            FaultKind::KillLeader
            | FaultKind::KillFollower
            | FaultKind::KillTwoInTurn
            | FaultKind::DiskFailFollower
            | FaultKind::DiskFullLeader
            | FaultKind::ReplaceNode => Some(Duration::from_secs(1)),
            FaultKind::PauseLeader
            | FaultKind::PartitionLeader
            | FaultKind::PartitionFollower
            | FaultKind::PartitionLeaderInbound
            | FaultKind::ClientCutFromLeader
            | FaultKind::NetemDelay
            | FaultKind::NetemLoss
            | FaultKind::DelayedStaleWrite => Some(Duration::from_secs(3)),
            FaultKind::KillAllAfterFlush => None,
        }
    }

    /// Whether the fault's victim is a follower (else the leader).
    pub fn hits_follower(self) -> bool {
        matches!(
            self,
            FaultKind::KillFollower | FaultKind::DiskFailFollower | FaultKind::PartitionFollower
        )
    }
}

/// iptables rules on loopback addresses, removed when dropped.
pub struct Rules {
    rules: Vec<Vec<String>>,
}

impl Rules {
    pub fn insert(rules: Vec<Vec<String>>) -> Result<Rules> {
        let mut done = Rules { rules: Vec::new() };
        for r in rules {
            let mut args = vec!["-w".to_string(), "-I".to_string()];
            args.extend(r.iter().cloned());
            let out = Command::new("iptables").args(&args).output()?;
            ensure!(
                out.status.success(),
                "iptables {} failed (install iptables; needs root): {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
            done.rules.push(r);
        }
        Ok(done)
    }
}

impl Drop for Rules {
    fn drop(&mut self) {
        for r in self.rules.drain(..) {
            let mut args = vec!["-w".to_string(), "-D".to_string()];
            args.extend(r);
            let _ = Command::new("iptables").args(&args).output();
        }
    }
}

fn rule(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

/// Drops cluster RPC to and from `ip` (nodes connect from their advertised address).
pub fn isolate_rpc(ip: &str) -> Result<Rules> {
    let port = RPC_PORT.to_string();
    Rules::insert(vec![
        rule(&["INPUT", "-d", ip, "-p", "tcp", "--dport", &port, "-j", "DROP"]),
        rule(&["INPUT", "-s", ip, "-p", "tcp", "--dport", &port, "-j", "DROP"]),
    ])
}

/// Drops what reaches `ip`'s cluster RPC listener; `ip`'s own connections to the other nodes'
/// listeners (the leader's replication streams) and their answers still pass.
pub fn cut_rpc_inbound(ip: &str) -> Result<Rules> {
    let port = RPC_PORT.to_string();
    Rules::insert(vec![rule(&[
        "INPUT", "-d", ip, "-p", "tcp", "--dport", &port, "-j", "DROP",
    ])])
}

/// Drops the packets to `ip`'s iSCSI portal.
pub fn block_portal(ip: &str) -> Result<Rules> {
    Rules::insert(vec![rule(&[
        "INPUT", "-d", ip, "-p", "tcp", "--dport", "3260", "-j", "DROP",
    ])])
}

/// A fault in progress, healed by [`Injected::heal`].
pub enum Injected {
    Killed(Vec<u64>),
    Paused(u64),
    Rules(Rules),
    /// Delay or loss on a path (healed by dropping the guard).
    Net(netem::Degraded),
    /// The stale-write check; its heal delivers the held write and judges it.
    Stale(Box<stale::StaleWrite>),
    /// A node whose storage fails: healed by kill -9 and restart (`crate::disk`).
    Disk(u64),
    /// A new node is in; healed by removing and stopping the old one ([`crate::replace`]).
    Replace(crate::replace::Replacement),
}

impl Injected {
    pub fn heal(self, c: &mut Cluster) -> Result<()> {
        match self {
            Injected::Killed(ids) => {
                for id in ids {
                    c.spawn(id)?;
                }
            }
            Injected::Paused(id) => c.signal(id, libc::SIGCONT)?,
            Injected::Rules(r) => drop(r),
            Injected::Net(d) => drop(d),
            Injected::Stale(s) => s.finish(c)?,
            Injected::Disk(id) => crate::disk::heal(c, id)?,
            Injected::Replace(r) => {
                r.finish(c)?;
            }
        }
        Ok(())
    }
}

/// Injects `kind` with `leader` leading the volume and `follower` another node. For
/// kill-two-in-turn the caller has already killed and healed the follower half.
pub fn inject(c: &mut Cluster, kind: FaultKind, leader: u64, follower: u64) -> Result<Injected> {
    let ip = |c: &Cluster, id: u64| -> Result<String> { Ok(c.node(id)?.ip.to_string()) };
    Ok(match kind {
        FaultKind::KillLeader | FaultKind::KillTwoInTurn => {
            c.signal(leader, libc::SIGKILL)?;
            Injected::Killed(vec![leader])
        }
        FaultKind::KillFollower => {
            c.signal(follower, libc::SIGKILL)?;
            Injected::Killed(vec![follower])
        }
        FaultKind::PauseLeader => {
            c.signal(leader, libc::SIGSTOP)?;
            Injected::Paused(leader)
        }
        FaultKind::PartitionLeader => Injected::Rules(isolate_rpc(&ip(c, leader)?)?),
        FaultKind::PartitionFollower => Injected::Rules(isolate_rpc(&ip(c, follower)?)?),
        FaultKind::PartitionLeaderInbound => Injected::Rules(cut_rpc_inbound(&ip(c, leader)?)?),
        FaultKind::ClientCutFromLeader => Injected::Rules(block_portal(&ip(c, leader)?)?),
        FaultKind::NetemDelay => Injected::Net(netem::degrade_portal(
            c.node(leader)?.ip,
            NetFault::delay(netem::draw()),
        )?),
        FaultKind::NetemLoss => Injected::Net(netem::degrade_portal(
            c.node(leader)?.ip,
            NetFault::loss(netem::draw()),
        )?),
        FaultKind::DelayedStaleWrite => anyhow::bail!("delayed-stale-write is started by stale::StaleWrite::begin"),
        FaultKind::ReplaceNode => anyhow::bail!("replace-node is started by replace::Replacement::begin"),
        // The caller has completed the flush (crate::durability::flush_point).
        FaultKind::KillAllAfterFlush => Injected::Killed(crate::durability::kill_all(c)?),
        FaultKind::DiskFailFollower => {
            crate::disk::inject(c, follower, false)?;
            Injected::Disk(follower)
        }
        FaultKind::DiskFullLeader => {
            crate::disk::inject(c, leader, true)?;
            Injected::Disk(leader)
        }
    })
}

/// How long a fault is held, from the seeded schedule.
pub fn hold(kind: FaultKind, r: f64) -> Duration {
    let base = match kind {
        FaultKind::PauseLeader
        | FaultKind::PartitionLeader
        | FaultKind::PartitionFollower
        | FaultKind::PartitionLeaderInbound
        | FaultKind::DelayedStaleWrite => 4.0,
        // Four members serving I/O between the add and the removal.
        FaultKind::ReplaceNode => return Duration::from_secs_f64(1.0 + 2.0 * r),
        _ => 2.0,
    };
    Duration::from_secs_f64(base + 3.0 * r)
}
