//! The openraft type configuration shared by every Raft group of a node.
//!
//! A node runs one metadata group ([`META_GROUP`], the cluster catalogue) and one group per
//! volume. All of them use the same [`TypeConfig`], log store and network; the state machine
//! decides by its kind what an entry means. openraft's default `Entry`, `Vote` and `LeaderId`
//! types are kept; conversion to the persisted prost format happens at the storage and network
//! boundaries (`record.rs`).

use std::fmt;
use std::path::PathBuf;

use bytes::Bytes;

/// Identifies a Raft group on every node: [`META_GROUP`] or a volume id.
pub type GroupId = u64;

/// The metadata group: cluster membership and the catalogue.
pub const META_GROUP: GroupId = 0;

/// One replicated operation, the application data of a log entry. Every variant is an absolute
/// state change, so applying a suffix of the log twice (after a crash, or over a snapshot image
/// that already holds some of its effects) gives the same result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Write `data` at byte offset `offset_bytes` of the volume image, on behalf of the session
    /// with key `origin` (`raftsan_proto::scsi::fence::session_key`; 0: none). Not applied when
    /// that session was fenced earlier in the log.
    Write {
        offset_bytes: u64,
        data: Bytes,
        origin: u64,
    },
    /// Several plain writes coalesced into one entry by the leader (they were queued at the same
    /// moment), applied in order: each exactly as a `Write` of its own, with its own fenced and
    /// range checks and its own [`WriteResult`] in [`Response::items`]; a later item that
    /// overlaps an earlier one wins.
    Writes(Vec<WriteItem>),
    /// Deallocate `len_bytes` bytes starting at `offset_bytes` (UNMAP, WRITE SAME with UNMAP);
    /// `origin` as for `Write`.
    Unmap {
        offset_bytes: u64,
        len_bytes: u64,
        origin: u64,
    },
    /// FENCE SESSIONS: writes of these session keys later in the log are refused (DESIGN.md
    /// invariant 3: commands of an abandoned path delivered late).
    Fence { keys: Vec<u64> },
    /// Make everything applied so far durable in the image (SYNCHRONIZE CACHE, FUA).
    Flush,
    /// The persistent-reservation state of LUN `lun` as decided by the leader (the encoded
    /// `PersistentReservations` export of the target layer).
    PrState { lun: u64, state: Bytes },
    /// The volume's new capacity in bytes.
    Resize { size_bytes: u64 },
    /// A change to the cluster catalogue: a prost-encoded `pb::MetaCommand` (metadata group only).
    Meta(Bytes),
}

/// One write of a [`Request::Writes`] entry: the fields of a [`Request::Write`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteItem {
    pub offset_bytes: u64,
    pub data: Bytes,
    /// Session key, as `Request::Write::origin`.
    pub origin: u64,
}

/// What applying one item of a [`Request::Writes`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteResult {
    /// In the image.
    Written,
    /// The item's session was fenced earlier in the log: nothing written.
    Fenced,
    /// Refused (beyond the end of the volume): nothing written; the reason.
    Refused(String),
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Write { offset_bytes, data, .. } => write!(f, "write({offset_bytes}+{})", data.len()),
            Self::Writes(items) => write!(
                f,
                "writes({} items, {} bytes)",
                items.len(),
                items.iter().map(|w| w.data.len()).sum::<usize>()
            ),
            Self::Unmap {
                offset_bytes,
                len_bytes,
                ..
            } => write!(f, "unmap({offset_bytes}+{len_bytes})"),
            Self::Fence { keys } => write!(f, "fence({} sessions)", keys.len()),
            Self::Flush => f.write_str("flush"),
            Self::PrState { lun, state } => write!(f, "pr-state(lun {lun}, {} bytes)", state.len()),
            Self::Resize { size_bytes } => write!(f, "resize({size_bytes})"),
            Self::Meta(m) => write!(f, "meta({} bytes)", m.len()),
        }
    }
}

/// What applying a [`Request`] returns to the proposer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Response {
    /// Log index at which the request was applied.
    pub applied_index: u64,
    /// A catalogue change the metadata state machine refused (name taken, unknown volume, ...).
    pub error: Option<String>,
    /// A value the change produced (the id of a created volume).
    pub value: u64,
    /// A write or unmap of a fenced session: nothing was changed.
    pub fenced: bool,
    /// A [`Request::Writes`]: one result per item, in order (empty for every other request).
    pub items: Vec<WriteResult>,
}

/// A snapshot's data as openraft hands it between the state machine and the network.
///
/// Snapshots are "fuzzy": a snapshot with last log id L is the state machine's file (volume
/// image or catalogue file) made durable at L and read live while it is sent, so it may already
/// hold effects of entries after L. Replaying the log after L over it is still exact, because
/// every [`Request`] is an absolute, idempotent change.
///
/// `sidecar` is the small part of the state that is not in the file, sent whole: a volume's
/// persistent-reservation states; for the metadata group the whole catalogue (which has no file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotData {
    /// A snapshot this node built: send the current contents of `path` (`len` bytes at build
    /// time; a volume may have been resized since) and the sidecar.
    Local {
        path: Option<PathBuf>,
        len: u64,
        sidecar: Bytes,
    },
    /// A snapshot received from the leader: a chunk journal (`journal.rs`) to lay over this
    /// node's current file, which then has `size_bytes` bytes, and the sidecar.
    Received {
        journal: Option<PathBuf>,
        size_bytes: u64,
        sidecar: Bytes,
    },
}

/// Where a snapshot receiver compares and stages: the group's current file (None: the group
/// has no file, only a sidecar) and a directory for the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotBase {
    pub current: Option<PathBuf>,
    pub staging_dir: PathBuf,
}

openraft::declare_raft_types!(
    /// The Raft type configuration of every group (metadata and volumes).
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = openraft::BasicNode,
);
