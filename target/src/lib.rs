//! The raftsan iSCSI target: what a portal serves and how.
//!
//! * [`catalog`]: targets, LUNs, CHAP accounts and ACLs as the daemon serves them
//!   (built from a TOML file or a tgt `targets.conf` by the `raftsan` binary).
//! * [`backing`]: backing stores behind one trait (file or block device, memory, fault-injecting).
//! * [`lu`]: logical-unit execution: CDB in, data and status or sense out (SPC-4, SBC-3, PR, ALUA).
//! * [`portal`]: the tokio portal server: connections, login, sessions, full-feature phase.

pub mod backing;
pub mod catalog;
pub mod lu;
pub mod metrics;
pub mod portal;
