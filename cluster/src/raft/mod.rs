//! Raft replication building blocks (issue 3). This module holds the durable Raft log store; the
//! state machine, network and group management come with later parts of the cluster issue.

pub mod journal;
pub mod log_store;
pub mod record;
pub mod state_machine;
pub mod types;

pub use log_store::{FsyncPolicy, LogStore, LogStoreOptions};
pub use state_machine::{GroupSnapshotBuilder, GroupStateMachine, VolumeImage};
pub use types::{GroupId, META_GROUP, Request, Response, SnapshotBase, SnapshotData, TypeConfig};
