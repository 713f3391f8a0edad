//! Conversions between openraft's types and the `raftsan.raft.v1` messages. Entries, log ids and
//! votes go through the persisted records of `raft/record.rs`, so the wire format of an entry is
//! the log store's.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use openraft::alias::{EntryOf, LogIdOf, SnapshotMetaOf, StoredMembershipOf, VoteOf};
use openraft::raft::{AppendEntriesRequest, StreamAppendError, StreamAppendResult, TransferLeaderRequest, VoteRequest};
use openraft::{BasicNode, Membership, SnapshotMeta, StoredMembership};
use prost::Message;
use tonic::Status;

use crate::pb::raft as pb;
use crate::raft::TypeConfig;
use crate::raft::record::{
    EntryRecord, LogIdRecord, MembershipRecord, NodeRecord, NodeSetRecord, VoteRecord, entry_to_record, record_to_entry,
};

pub(crate) type Entry = EntryOf<TypeConfig>;
pub(crate) type LogId = LogIdOf<TypeConfig>;
pub(crate) type Vote = VoteOf<TypeConfig>;
pub(crate) type StoredMem = StoredMembershipOf<TypeConfig>;

pub(crate) fn log_id_to_pb(id: &LogId) -> pb::LogId {
    let r = LogIdRecord::from(id);
    pb::LogId {
        term: r.term,
        node_id: r.node_id,
        index: r.index,
    }
}

pub(crate) fn log_id_from_pb(id: &pb::LogId) -> LogId {
    LogId::from(&LogIdRecord {
        term: id.term,
        node_id: id.node_id,
        index: id.index,
    })
}

pub(crate) fn opt_log_id_to_pb(id: &Option<LogId>) -> Option<pb::LogId> {
    id.as_ref().map(log_id_to_pb)
}

pub(crate) fn opt_log_id_from_pb(id: &Option<pb::LogId>) -> Option<LogId> {
    id.as_ref().map(log_id_from_pb)
}

pub(crate) fn vote_to_pb(v: &Vote) -> pb::Vote {
    let r = VoteRecord::from(v);
    pb::Vote {
        term: r.term,
        node_id: r.node_id,
        committed: r.committed,
    }
}

pub(crate) fn vote_from_pb(v: &pb::Vote) -> Vote {
    Vote::from(&VoteRecord {
        term: v.term,
        node_id: v.node_id,
        committed: v.committed,
    })
}

/// A required vote field; absent is a malformed message.
pub(crate) fn req_vote(v: &Option<pb::Vote>, what: &str) -> Result<Vote, Status> {
    v.as_ref()
        .map(vote_from_pb)
        .ok_or_else(|| Status::invalid_argument(format!("{what}: missing vote")))
}

/// One entry as an encoded EntryRecord.
pub(crate) fn encode_entry(e: &Entry) -> Bytes {
    Bytes::from(entry_to_record(e).encode_to_vec())
}

pub(crate) fn decode_entry(b: &[u8]) -> Result<Entry, String> {
    let rec = EntryRecord::decode(b).map_err(|e| format!("entry record: {e}"))?;
    record_to_entry(&rec).map_err(|e| e.to_string())
}

/// An AppendEntries request as openraft takes it. The entries must follow `prev_log_id` one
/// index at a time with log ids that never go backwards: openraft only debug-asserts that a
/// segment is consecutive, so a malformed batch from a peer is refused here, not stored.
pub(crate) fn append_from_pb(r: &pb::AppendRequest) -> Result<AppendEntriesRequest<TypeConfig>, String> {
    let vote = r.vote.as_ref().map(vote_from_pb).ok_or("missing vote")?;
    let prev_log_id = opt_log_id_from_pb(&r.prev_log_id);
    let mut entries: Vec<Entry> = Vec::with_capacity(r.entries.len());
    for (i, b) in r.entries.iter().enumerate() {
        let e = decode_entry(b).map_err(|e| format!("entry #{i}: {e}"))?;
        let before = entries.last().map(|p| &p.log_id).or(prev_log_id.as_ref());
        if let Some(before) = before {
            let consecutive = before.index.checked_add(1) == Some(e.log_id.index);
            if !consecutive || e.log_id.leader_id < before.leader_id {
                return Err(format!("entry #{i} {} does not follow {before}", e.log_id));
            }
        } else if e.log_id.index != 0 {
            return Err(format!("entry #{i} {} does not start the log", e.log_id));
        }
        entries.push(e);
    }
    Ok(AppendEntriesRequest {
        vote,
        prev_log_id,
        entries,
        leader_commit: opt_log_id_from_pb(&r.leader_commit),
    })
}

/// A follower's answer to one request of a StreamAppend, as it travels.
pub(crate) fn stream_reply_to_pb(r: &StreamAppendResult<TypeConfig>) -> pb::StreamAppendReply {
    use pb::stream_append_reply::Kind;
    match r {
        Ok(matching) => pb::StreamAppendReply {
            kind: Kind::Success as i32,
            matching: opt_log_id_to_pb(matching),
            ..Default::default()
        },
        Err(StreamAppendError::Conflict(l)) => pb::StreamAppendReply {
            kind: Kind::Conflict as i32,
            conflict: Some(log_id_to_pb(l)),
            ..Default::default()
        },
        Err(StreamAppendError::HigherVote(v)) => pb::StreamAppendReply {
            kind: Kind::HigherVote as i32,
            vote: Some(vote_to_pb(v)),
            ..Default::default()
        },
    }
}

/// The answer to a StreamAppend request whose entries end at `last` (its prev_log_id when it has
/// none). A SUCCESS must not claim more than was sent.
pub(crate) fn stream_reply_from_pb(
    r: &pb::StreamAppendReply,
    last: Option<&LogId>,
) -> Result<StreamAppendResult<TypeConfig>, String> {
    use pb::stream_append_reply::Kind;
    match Kind::try_from(r.kind) {
        Ok(Kind::Success) => {
            let matching = opt_log_id_from_pb(&r.matching);
            if matching.as_ref() > last {
                return Err(format!(
                    "success up to {} beyond the last entry sent ({})",
                    matching.map_or("none".to_string(), |l| l.to_string()),
                    last.map_or("none".to_string(), |l| l.to_string())
                ));
            }
            Ok(Ok(matching))
        }
        Ok(Kind::Conflict) => r
            .conflict
            .as_ref()
            .map(|l| Err(StreamAppendError::Conflict(log_id_from_pb(l))))
            .ok_or_else(|| "conflict without a log id".to_string()),
        Ok(Kind::HigherVote) => r
            .vote
            .as_ref()
            .map(|v| Err(StreamAppendError::HigherVote(vote_from_pb(v))))
            .ok_or_else(|| "higher vote without a vote".to_string()),
        Ok(Kind::Unspecified) | Err(_) => Err(format!("kind {}", r.kind)),
    }
}

pub(crate) fn membership_to_bytes(m: &StoredMem) -> Bytes {
    let rec = MembershipRecord {
        configs: m
            .get_joint_config()
            .iter()
            .map(|set| NodeSetRecord {
                ids: set.iter().copied().collect(),
            })
            .collect(),
        nodes: m
            .nodes()
            .map(|(id, n)| NodeRecord {
                id: *id,
                addr: n.addr.clone(),
            })
            .collect(),
    };
    Bytes::from(rec.encode_to_vec())
}

pub(crate) fn membership_from_bytes(log_id: Option<LogId>, b: &[u8]) -> Result<StoredMem, String> {
    let rec = MembershipRecord::decode(b).map_err(|e| format!("membership record: {e}"))?;
    let configs: Vec<BTreeSet<u64>> = rec.configs.iter().map(|c| c.ids.iter().copied().collect()).collect();
    let nodes: BTreeMap<u64, BasicNode> = rec
        .nodes
        .iter()
        .map(|n| (n.id, BasicNode { addr: n.addr.clone() }))
        .collect();
    let membership = if configs.is_empty() && nodes.is_empty() {
        Membership::default()
    } else {
        Membership::new(configs, nodes).map_err(|e| format!("bad membership: {e}"))?
    };
    Ok(StoredMembership::new(log_id, membership))
}

// ---------------------------------------------------------------------------------------------
// Fuzzing entry points (fuzz/fuzz_targets/rpc.rs), re-exported hidden from `rpc`: the decoders
// of bytes a peer sends, reachable from outside the crate. Not an API.

/// Decodes an `AppendRequest` and converts it as the server does.
#[doc(hidden)]
pub fn fuzz_decode_append(bytes: &[u8]) -> Result<AppendEntriesRequest<TypeConfig>, String> {
    let r = pb::AppendRequest::decode(bytes).map_err(|e| e.to_string())?;
    append_from_pb(&r)
}

/// Encodes `rpc` as the client does (every entry, no byte cap).
#[doc(hidden)]
pub fn fuzz_encode_append(rpc: &AppendEntriesRequest<TypeConfig>) -> Vec<u8> {
    pb::AppendRequest {
        group: 0,
        target: 0,
        vote: Some(vote_to_pb(&rpc.vote)),
        prev_log_id: opt_log_id_to_pb(&rpc.prev_log_id),
        entries: rpc.entries.iter().map(encode_entry).collect(),
        leader_commit: opt_log_id_to_pb(&rpc.leader_commit),
    }
    .encode_to_vec()
}

/// Decodes a `StreamAppendReply` and converts it as the client does for a request whose entries
/// end at `last`.
#[doc(hidden)]
pub fn fuzz_decode_stream_reply(
    bytes: &[u8],
    last: Option<&pb::LogId>,
) -> Result<StreamAppendResult<TypeConfig>, String> {
    let r = pb::StreamAppendReply::decode(bytes).map_err(|e| e.to_string())?;
    stream_reply_from_pb(&r, last.map(log_id_from_pb).as_ref())
}

/// Encodes a follower's answer as the server does.
#[doc(hidden)]
pub fn fuzz_encode_stream_reply(r: &StreamAppendResult<TypeConfig>) -> Vec<u8> {
    stream_reply_to_pb(r).encode_to_vec()
}

/// Decodes a `VoteRequest` and converts it as the server does.
#[doc(hidden)]
pub fn fuzz_decode_vote(bytes: &[u8]) -> Result<VoteRequest<TypeConfig>, String> {
    let r = pb::VoteRequest::decode(bytes).map_err(|e| e.to_string())?;
    Ok(VoteRequest {
        vote: req_vote(&r.vote, "vote").map_err(|s| s.message().to_string())?,
        last_log_id: opt_log_id_from_pb(&r.last_log_id),
        leadership_transfer: r.leadership_transfer,
    })
}

/// Decodes a `TransferLeaderRequest` and converts it as the server does.
#[doc(hidden)]
pub fn fuzz_decode_transfer(bytes: &[u8]) -> Result<TransferLeaderRequest<TypeConfig>, String> {
    let r = pb::TransferLeaderRequest::decode(bytes).map_err(|e| e.to_string())?;
    Ok(TransferLeaderRequest::new(
        req_vote(&r.from_leader, "transfer leader").map_err(|s| s.message().to_string())?,
        r.to_node_id,
        opt_log_id_from_pb(&r.last_log_id),
    ))
}

/// Decodes a `SnapshotRequest`; a `Begin` is converted to the vote and snapshot meta as the
/// receiver does (`snapshot::begin`), other messages only decode.
#[doc(hidden)]
pub fn fuzz_decode_snapshot(bytes: &[u8]) -> Result<Option<(Vote, SnapshotMetaOf<TypeConfig>)>, String> {
    let r = pb::SnapshotRequest::decode(bytes).map_err(|e| e.to_string())?;
    let Some(pb::snapshot_request::Msg::Begin(b)) = r.msg else {
        return Ok(None);
    };
    let vote = req_vote(&b.vote, "snapshot begin").map_err(|s| s.message().to_string())?;
    let last_membership = membership_from_bytes(opt_log_id_from_pb(&b.last_membership_log_id), &b.last_membership)?;
    Ok(Some((
        vote,
        SnapshotMeta {
            last_log_id: opt_log_id_from_pb(&b.last_log_id),
            last_membership,
        },
    )))
}

/// [`membership_to_bytes`], to check that a decoded membership encodes back.
#[doc(hidden)]
pub fn fuzz_membership_to_bytes(m: &StoredMem) -> Vec<u8> {
    membership_to_bytes(m).to_vec()
}
