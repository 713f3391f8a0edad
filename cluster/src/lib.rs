//! The `raftsan` daemon's library side: node configuration (TOML or tgt `targets.conf`), the admin
//! surface, and, with the cluster issue, Raft replication.

pub mod config;
pub mod meta;
pub mod node;
pub mod pb;
pub mod raft;
pub mod rpc;
