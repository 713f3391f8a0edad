//! The openraft type configuration of a volume's Raft group.
//!
//! openraft's default `Entry`, `Vote` and `LeaderId` types are kept; conversion to the persisted
//! prost format happens at the storage boundary (`record.rs`).

use std::fmt;

use bytes::Bytes;

/// One replicated block operation, the application data of a log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeRequest {
    /// Write `data` at byte offset `offset_bytes` of the volume image.
    Write { offset_bytes: u64, data: Bytes },
    /// Deallocate `len_bytes` bytes starting at `offset_bytes` (UNMAP, WRITE SAME with UNMAP).
    Unmap { offset_bytes: u64, len_bytes: u64 },
    /// Make everything applied so far durable in the image (SYNCHRONIZE CACHE, FUA).
    Flush,
}

impl fmt::Display for VolumeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Write { offset_bytes, data } => write!(f, "write({offset_bytes}+{})", data.len()),
            Self::Unmap {
                offset_bytes,
                len_bytes,
            } => write!(f, "unmap({offset_bytes}+{len_bytes})"),
            Self::Flush => f.write_str("flush"),
        }
    }
}

/// What applying a [`VolumeRequest`] returns to the proposer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeResponse {
    /// Log index at which the request was applied.
    pub applied_index: u64,
}

openraft::declare_raft_types!(
    /// The Raft type configuration of one volume group.
    pub VolumeTypeConfig:
        D = VolumeRequest,
        R = VolumeResponse,
        NodeId = u64,
        Node = openraft::BasicNode,
);
