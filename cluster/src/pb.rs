//! Generated protobuf messages and tonic services of `proto/rpc/*.proto`.
#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// `proto/rpc/cluster.proto`: catalogue, SCSI forwarding and admin API.
pub mod cluster {
    tonic::include_proto!("raftsan.cluster.v1");
}

/// `proto/rpc/raft.proto`: the Raft RPC between nodes (AppendEntries, votes, snapshots).
pub mod raft {
    tonic::include_proto!("raftsan.raft.v1");
}
