//! Generated protobuf messages and tonic services of `proto/rpc/*.proto`.
#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// `proto/rpc/cluster.proto`: catalogue, SCSI forwarding and admin API.
pub mod cluster {
    tonic::include_proto!("raftsan.cluster.v1");
}
