//! Disk faults through the node's testing-only fault injection (`[testing] fault_injection =
//! true`, which every node of a chaos run gets through [`NODE_TOML`]):
//!
//! | fault | what happens | what must hold |
//! | --- | --- | --- |
//! | `disk-fail-follower` | a follower's volume image fails every write with EIO | the follower logs the storage failure and leaves the group; the other two carry on |
//! | `disk-full-leader` | the leader's Raft log fdatasync fails with ENOSPC (disk full) | the leader leaves the group; the others elect a new leader within the failover budget |
//!
//! Healed as DESIGN.md invariant 7 says a storage failure is: the node is never resumed, it is
//! killed (SIGKILL) and restarted without the fault, then catches up from the others. The
//! faulted node's ERROR lines about the failure are expected ([`STORAGE_ERRORS`]); any other
//! ERROR still fails the run.

use anyhow::{Result, ensure};
use raftsan_tests::cluster::Cluster;

/// Appended to every node's config in a chaos run: allows `raftsan fault inject`.
pub const NODE_TOML: &str = "[testing]\nfault_injection = true\n";

/// The ERROR lines a node whose storage failed logs (shared with the tests).
pub use raftsan_tests::cluster::STORAGE_FAILURE_ERRORS as STORAGE_ERRORS;

/// The `raftsan fault inject` arguments of each kind: (target, op, error).
pub fn fault_args(leader_fault: bool) -> [&'static str; 6] {
    if leader_fault {
        ["--target", "log", "--op", "flush", "--error", "enospc"]
    } else {
        ["--target", "image", "--op", "write", "--error", "eio"]
    }
}

/// Arms the disk fault on `victim` (every volume it holds) and marks its storage ERROR lines as
/// expected. The fault fires on the victim's next write or fsync (the workload keeps writing).
pub fn inject(c: &mut Cluster, victim: u64, leader_fault: bool) -> Result<()> {
    let victim_s = victim.to_string();
    let mut args = vec!["fault", "inject", "--node", victim_s.as_str()];
    args.extend_from_slice(&fault_args(leader_fault));
    let out = c.raftsan_on(victim, &args)?;
    ensure!(
        out.success(),
        "raftsan fault inject on node {victim} failed:\n{}",
        out.combined()
    );
    let n = c.node_mut(victim)?;
    for e in STORAGE_ERRORS {
        if !n.expected_errors.iter().any(|x| x == e) {
            n.expected_errors.push(e.to_string());
        }
    }
    Ok(())
}

/// kill -9 and restart of the faulted node: the restart drops the fault (it lives in memory).
pub fn heal(c: &mut Cluster, victim: u64) -> Result<()> {
    c.signal(victim, libc::SIGKILL)?;
    c.spawn(victim)
}
