//! Conversions between openraft's types and the `raftsan.raft.v1` messages. Entries, log ids and
//! votes go through the persisted records of `raft/record.rs`, so the wire format of an entry is
//! the log store's.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use openraft::alias::{EntryOf, LogIdOf, StoredMembershipOf, VoteOf};
use openraft::{BasicNode, Membership, StoredMembership};
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
