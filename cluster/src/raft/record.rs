//! On-disk record framing and the prost messages persisted by the log store.
//!
//! A record is a 12-byte header followed by a prost payload:
//!
//! ```text
//! offset 0  magic   u32 LE  RECORD_MAGIC
//! offset 4  len     u32 LE  payload length in bytes (<= MAX_PAYLOAD_LEN)
//! offset 8  crc     u32 LE  CRC-32C (Castagnoli) of the payload bytes
//! offset 12 payload len bytes
//! ```
//!
//! Segment files are a sequence of records; the vote, committed and purged files each hold one.

use std::collections::{BTreeMap, BTreeSet};
use std::io;

use bytes::Bytes;
use openraft::alias::{EntryOf, LogIdOf, VoteOf};
use openraft::vote::RaftLeaderId;
use openraft::{BasicNode, EntryPayload, Membership};
use prost::Message;

use super::types::{Request, TypeConfig, WriteItem};

/// Magic number opening every record ("RSLG" in ASCII, little-endian on disk).
pub const RECORD_MAGIC: u32 = 0x4753_4C52;
/// Byte offset of the magic field in a record header.
pub const MAGIC_OFFSET: usize = 0;
/// Byte offset of the payload length field.
pub const LEN_OFFSET: usize = 4;
/// Byte offset of the payload CRC-32C field.
pub const CRC_OFFSET: usize = 8;
/// Size of the record header; the payload starts here.
pub const HEADER_LEN: usize = 12;
const _: () = assert!(LEN_OFFSET == MAGIC_OFFSET + 4 && CRC_OFFSET == LEN_OFFSET + 4 && HEADER_LEN == CRC_OFFSET + 4);

/// Largest payload accepted (a 64 MiB write plus encoding overhead).
pub const MAX_PAYLOAD_LEN: u32 = 64 * 1024 * 1024 + 4096;

/// `EntryRecord::kind` of a blank entry.
pub const KIND_BLANK: u32 = 0;
/// `EntryRecord::kind` of a normal entry carrying a [`Request`].
pub const KIND_NORMAL: u32 = 1;
/// `EntryRecord::kind` of a membership entry.
pub const KIND_MEMBERSHIP: u32 = 2;

/// `AppDataRecord::op` of [`Request::Write`].
pub const OP_WRITE: u32 = 0;
/// `AppDataRecord::op` of [`Request::Unmap`].
pub const OP_UNMAP: u32 = 1;
/// `AppDataRecord::op` of [`Request::Flush`].
pub const OP_FLUSH: u32 = 2;
/// `AppDataRecord::op` of [`Request::PrState`] (`offset_bytes` holds the LUN).
pub const OP_PR_STATE: u32 = 3;
/// `AppDataRecord::op` of [`Request::Resize`] (`len_bytes` holds the new size).
pub const OP_RESIZE: u32 = 4;
/// `AppDataRecord::op` of [`Request::Meta`].
pub const OP_META: u32 = 5;
/// `AppDataRecord::op` of [`Request::Fence`] (`keys` holds the session keys).
pub const OP_FENCE: u32 = 6;
/// `AppDataRecord::op` of [`Request::Writes`] (`writes` holds the items; added after the
/// others: a node that predates it refuses such an entry as an unknown op).
pub const OP_WRITES: u32 = 7;

/// One framed record found by [`decode_records`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    /// Byte offset of the record header in the decoded buffer.
    pub offset: usize,
    /// The payload bytes (CRC verified).
    pub payload: &'a [u8],
}

impl Record<'_> {
    /// Total size of the framed record (header plus payload).
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }
}

/// Why decoding stopped before the end of the buffer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TailError {
    #[error("record at offset {offset}: {available} bytes left, {needed} needed")]
    Truncated {
        offset: usize,
        needed: usize,
        available: usize,
    },
    #[error("record at offset {offset}: bad magic {found:#010x}")]
    BadMagic { offset: usize, found: u32 },
    #[error("record at offset {offset}: payload length {len} exceeds {MAX_PAYLOAD_LEN}")]
    TooLong { offset: usize, len: u32 },
    #[error("record at offset {offset}: crc32c {actual:#010x} != stored {stored:#010x}")]
    CrcMismatch { offset: usize, stored: u32, actual: u32 },
    /// Only from [`decode_log_records`]: a magic followed by zeros reads as a valid empty record
    /// (the crc32c of nothing is 0), which is what a header torn over preallocated zeros leaves.
    #[error("record at offset {offset}: empty payload where a log entry must be")]
    Empty { offset: usize },
}

impl TailError {
    /// Offset of the record that failed.
    pub fn offset(&self) -> usize {
        match self {
            Self::Truncated { offset, .. }
            | Self::BadMagic { offset, .. }
            | Self::TooLong { offset, .. }
            | Self::CrcMismatch { offset, .. }
            | Self::Empty { offset } => *offset,
        }
    }
}

fn read_u32(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(b)
}

/// Frame `payload` as one record.
pub fn encode_record(payload: &[u8], out: &mut Vec<u8>) {
    // Callers never pass more than MAX_PAYLOAD_LEN; the log store checks before encoding.
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Decode consecutive records from `buf`. Returns the records, the length of the valid prefix
/// (the end of the last good record) and, when decoding stopped before the end of `buf`, why.
/// Never panics.
pub fn decode_records(buf: &[u8]) -> (Vec<Record<'_>>, usize, Option<TailError>) {
    let mut records = Vec::new();
    let mut pos = 0usize;
    while pos < buf.len() {
        let available = buf.len() - pos;
        if available < HEADER_LEN {
            let err = TailError::Truncated {
                offset: pos,
                needed: HEADER_LEN,
                available,
            };
            return (records, pos, Some(err));
        }
        let magic = read_u32(buf, pos + MAGIC_OFFSET);
        if magic != RECORD_MAGIC {
            return (
                records,
                pos,
                Some(TailError::BadMagic {
                    offset: pos,
                    found: magic,
                }),
            );
        }
        let len = read_u32(buf, pos + LEN_OFFSET);
        if len > MAX_PAYLOAD_LEN {
            return (records, pos, Some(TailError::TooLong { offset: pos, len }));
        }
        let needed = HEADER_LEN + len as usize;
        if available < needed {
            let err = TailError::Truncated {
                offset: pos,
                needed,
                available,
            };
            return (records, pos, Some(err));
        }
        let payload = &buf[pos + HEADER_LEN..pos + needed];
        let stored = read_u32(buf, pos + CRC_OFFSET);
        let actual = crc32c::crc32c(payload);
        if stored != actual {
            let err = TailError::CrcMismatch {
                offset: pos,
                stored,
                actual,
            };
            return (records, pos, Some(err));
        }
        records.push(Record { offset: pos, payload });
        pos += needed;
    }
    (records, pos, None)
}

/// [`decode_records`] for a log segment, whose records are entries and never empty: decoding
/// stops at the first empty record ([`TailError::Empty`]).
pub fn decode_log_records(buf: &[u8]) -> (Vec<Record<'_>>, usize, Option<TailError>) {
    let (mut records, valid, err) = decode_records(buf);
    match records.iter().position(|r| r.payload.is_empty()) {
        Some(i) => {
            let offset = records[i].offset;
            records.truncate(i);
            (records, offset, Some(TailError::Empty { offset }))
        }
        None => (records, valid, err),
    }
}

/// A log id: leader term, leader node id, index.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LogIdRecord {
    #[prost(uint64, tag = "1")]
    pub term: u64,
    #[prost(uint64, tag = "2")]
    pub node_id: u64,
    #[prost(uint64, tag = "3")]
    pub index: u64,
}

/// The persisted vote.
#[derive(Clone, PartialEq, prost::Message)]
pub struct VoteRecord {
    #[prost(uint64, tag = "1")]
    pub term: u64,
    #[prost(uint64, tag = "2")]
    pub node_id: u64,
    #[prost(bool, tag = "3")]
    pub committed: bool,
}

/// A [`Request`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct AppDataRecord {
    /// One of `OP_*`.
    #[prost(uint32, tag = "1")]
    pub op: u32,
    #[prost(uint64, tag = "2")]
    pub offset_bytes: u64,
    /// Length of an unmap; unused for writes (the data carries its length).
    #[prost(uint64, tag = "3")]
    pub len_bytes: u64,
    #[prost(bytes = "bytes", tag = "4")]
    pub data: Bytes,
    /// Session key of a write or unmap (0: none).
    #[prost(uint64, tag = "5")]
    pub origin: u64,
    /// Session keys of a fence.
    #[prost(uint64, repeated, tag = "6")]
    pub keys: Vec<u64>,
    /// The items of coalesced writes ([`OP_WRITES`]), in apply order.
    #[prost(message, repeated, tag = "7")]
    pub writes: Vec<WriteItemRecord>,
}

/// One item of a [`Request::Writes`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct WriteItemRecord {
    #[prost(uint64, tag = "1")]
    pub offset_bytes: u64,
    #[prost(bytes = "bytes", tag = "2")]
    pub data: Bytes,
    /// Session key (0: none).
    #[prost(uint64, tag = "3")]
    pub origin: u64,
}

/// A set of voter ids (one config of a possibly joint membership).
#[derive(Clone, PartialEq, prost::Message)]
pub struct NodeSetRecord {
    #[prost(uint64, repeated, tag = "1")]
    pub ids: Vec<u64>,
}

/// A node of the membership and its RPC address.
#[derive(Clone, PartialEq, prost::Message)]
pub struct NodeRecord {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(string, tag = "2")]
    pub addr: String,
}

/// A membership config: joint configs and all nodes (voters and learners).
#[derive(Clone, PartialEq, prost::Message)]
pub struct MembershipRecord {
    #[prost(message, repeated, tag = "1")]
    pub configs: Vec<NodeSetRecord>,
    #[prost(message, repeated, tag = "2")]
    pub nodes: Vec<NodeRecord>,
}

/// One Raft log entry as persisted in a segment file.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EntryRecord {
    #[prost(message, optional, tag = "1")]
    pub log_id: Option<LogIdRecord>,
    /// One of `KIND_*`.
    #[prost(uint32, tag = "2")]
    pub kind: u32,
    #[prost(message, optional, tag = "3")]
    pub app: Option<AppDataRecord>,
    #[prost(message, optional, tag = "4")]
    pub membership: Option<MembershipRecord>,
}

type Entry = EntryOf<TypeConfig>;
type LogId = LogIdOf<TypeConfig>;
type Vote = VoteOf<TypeConfig>;

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl From<&LogId> for LogIdRecord {
    fn from(id: &LogId) -> Self {
        Self {
            term: id.leader_id.term,
            node_id: id.leader_id.node_id,
            index: id.index,
        }
    }
}

impl From<&LogIdRecord> for LogId {
    fn from(r: &LogIdRecord) -> Self {
        LogId::new(
            openraft::impls::leader_id_adv::LeaderId::new(r.term, r.node_id),
            r.index,
        )
    }
}

impl From<&Vote> for VoteRecord {
    fn from(v: &Vote) -> Self {
        Self {
            term: v.leader_id.term,
            node_id: v.leader_id.node_id,
            committed: v.committed,
        }
    }
}

impl From<&VoteRecord> for Vote {
    fn from(r: &VoteRecord) -> Self {
        if r.committed {
            Vote::new_committed(r.term, r.node_id)
        } else {
            Vote::new(r.term, r.node_id)
        }
    }
}

/// Convert an openraft entry to its persisted form.
pub fn entry_to_record(entry: &Entry) -> EntryRecord {
    let log_id = Some(LogIdRecord::from(&entry.log_id));
    match &entry.payload {
        EntryPayload::Blank => EntryRecord {
            log_id,
            kind: KIND_BLANK,
            app: None,
            membership: None,
        },
        EntryPayload::Normal(req) => {
            let app = match req {
                Request::Write {
                    offset_bytes,
                    data,
                    origin,
                } => AppDataRecord {
                    op: OP_WRITE,
                    offset_bytes: *offset_bytes,
                    data: data.clone(),
                    origin: *origin,
                    ..Default::default()
                },
                Request::Writes(items) => AppDataRecord {
                    op: OP_WRITES,
                    writes: items
                        .iter()
                        .map(|w| WriteItemRecord {
                            offset_bytes: w.offset_bytes,
                            data: w.data.clone(),
                            origin: w.origin,
                        })
                        .collect(),
                    ..Default::default()
                },
                Request::Unmap {
                    offset_bytes,
                    len_bytes,
                    origin,
                } => AppDataRecord {
                    op: OP_UNMAP,
                    offset_bytes: *offset_bytes,
                    len_bytes: *len_bytes,
                    origin: *origin,
                    ..Default::default()
                },
                Request::Fence { keys } => AppDataRecord {
                    op: OP_FENCE,
                    keys: keys.clone(),
                    ..Default::default()
                },
                Request::Flush => AppDataRecord {
                    op: OP_FLUSH,
                    ..Default::default()
                },
                Request::PrState { lun, state } => AppDataRecord {
                    op: OP_PR_STATE,
                    offset_bytes: *lun,
                    data: state.clone(),
                    ..Default::default()
                },
                Request::Resize { size_bytes } => AppDataRecord {
                    op: OP_RESIZE,
                    len_bytes: *size_bytes,
                    ..Default::default()
                },
                Request::Meta(cmd) => AppDataRecord {
                    op: OP_META,
                    data: cmd.clone(),
                    ..Default::default()
                },
            };
            EntryRecord {
                log_id,
                kind: KIND_NORMAL,
                app: Some(app),
                membership: None,
            }
        }
        EntryPayload::Membership(m) => EntryRecord {
            log_id,
            kind: KIND_MEMBERSHIP,
            app: None,
            membership: Some(membership_to_record(m)),
        },
    }
}

/// Convert a persisted entry back; a malformed record is an `InvalidData` error.
pub fn record_to_entry(rec: &EntryRecord) -> io::Result<Entry> {
    let log_id = LogId::from(
        rec.log_id
            .as_ref()
            .ok_or_else(|| invalid("entry record without log id".into()))?,
    );
    let payload = match rec.kind {
        KIND_BLANK => EntryPayload::Blank,
        KIND_NORMAL => {
            let app = rec
                .app
                .as_ref()
                .ok_or_else(|| invalid(format!("normal entry {} without app data", log_id.index)))?;
            let req = match app.op {
                OP_WRITE => Request::Write {
                    offset_bytes: app.offset_bytes,
                    data: app.data.clone(),
                    origin: app.origin,
                },
                OP_WRITES => Request::Writes(
                    app.writes
                        .iter()
                        .map(|w| WriteItem {
                            offset_bytes: w.offset_bytes,
                            data: w.data.clone(),
                            origin: w.origin,
                        })
                        .collect(),
                ),
                OP_UNMAP => Request::Unmap {
                    offset_bytes: app.offset_bytes,
                    len_bytes: app.len_bytes,
                    origin: app.origin,
                },
                OP_FENCE => Request::Fence { keys: app.keys.clone() },
                OP_FLUSH => Request::Flush,
                OP_PR_STATE => Request::PrState {
                    lun: app.offset_bytes,
                    state: app.data.clone(),
                },
                OP_RESIZE => Request::Resize {
                    size_bytes: app.len_bytes,
                },
                OP_META => Request::Meta(app.data.clone()),
                op => return Err(invalid(format!("entry {}: unknown op {op}", log_id.index))),
            };
            EntryPayload::Normal(req)
        }
        KIND_MEMBERSHIP => {
            let m = rec
                .membership
                .as_ref()
                .ok_or_else(|| invalid(format!("membership entry {} without membership", log_id.index)))?;
            EntryPayload::Membership(membership_from_record(m, &format!("entry {}", log_id.index))?)
        }
        kind => return Err(invalid(format!("entry {}: unknown kind {kind}", log_id.index))),
    };
    Ok(Entry { log_id, payload })
}

/// A membership config in its persisted form (log entries, state-machine state, the wire).
pub fn membership_to_record(m: &Membership<u64, BasicNode>) -> MembershipRecord {
    let configs = m
        .get_joint_config()
        .iter()
        .map(|set| NodeSetRecord {
            ids: set.iter().copied().collect(),
        })
        .collect();
    let nodes = m
        .nodes()
        .map(|(id, n)| NodeRecord {
            id: *id,
            addr: n.addr.clone(),
        })
        .collect();
    MembershipRecord { configs, nodes }
}

/// The inverse of [`membership_to_record`]; `what` names the record in the error.
pub fn membership_from_record(m: &MembershipRecord, what: &str) -> io::Result<Membership<u64, BasicNode>> {
    let configs: Vec<BTreeSet<u64>> = m.configs.iter().map(|c| c.ids.iter().copied().collect()).collect();
    let nodes: BTreeMap<u64, BasicNode> = m
        .nodes
        .iter()
        .map(|n| (n.id, BasicNode { addr: n.addr.clone() }))
        .collect();
    Membership::new(configs, nodes).map_err(|e| invalid(format!("{what}: bad membership: {e}")))
}

/// Encode `entry` as a framed record appended to `out`.
pub fn encode_entry(entry: &Entry, out: &mut Vec<u8>) -> io::Result<()> {
    let payload = entry_to_record(entry).encode_to_vec();
    if payload.len() > MAX_PAYLOAD_LEN as usize {
        return Err(invalid(format!(
            "entry {} encodes to {} bytes, more than {MAX_PAYLOAD_LEN}",
            entry.log_id.index,
            payload.len()
        )));
    }
    encode_record(&payload, out);
    Ok(())
}

/// Decode an entry from a (CRC-verified) record payload.
pub fn decode_entry(payload: &[u8]) -> io::Result<Entry> {
    let rec = EntryRecord::decode(payload).map_err(|e| invalid(format!("entry record: {e}")))?;
    record_to_entry(&rec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::entry::RaftEntry;
    use proptest::prelude::*;

    fn framed(payloads: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in payloads {
            encode_record(p, &mut out);
        }
        out
    }

    #[test]
    fn header_layout_is_exact() {
        let mut out = Vec::new();
        encode_record(b"abc", &mut out);
        assert_eq!(&out[MAGIC_OFFSET..LEN_OFFSET], &[0x52, 0x4C, 0x53, 0x47]);
        assert_eq!(&out[LEN_OFFSET..CRC_OFFSET], &[3, 0, 0, 0]);
        // CRC-32C of "abc" is 0x364b3fb7.
        assert_eq!(&out[CRC_OFFSET..HEADER_LEN], &0x364b_3fb7u32.to_le_bytes());
        assert_eq!(&out[HEADER_LEN..], b"abc");
    }

    #[test]
    fn entry_round_trip() {
        let lid = LogId::new(openraft::impls::leader_id_adv::LeaderId::new(3, 2), 7);
        let entries = vec![
            Entry::new_blank(lid),
            Entry::new_normal(
                lid,
                Request::Write {
                    offset_bytes: 4096,
                    data: Bytes::from_static(b"hello"),
                    origin: 77,
                },
            ),
            Entry::new_normal(
                lid,
                Request::Unmap {
                    offset_bytes: 8192,
                    len_bytes: 512,
                    origin: 0,
                },
            ),
            Entry::new_normal(
                lid,
                Request::Writes(vec![
                    WriteItem {
                        offset_bytes: 0,
                        data: Bytes::from_static(b"first"),
                        origin: 5,
                    },
                    WriteItem {
                        offset_bytes: u64::MAX,
                        data: Bytes::new(),
                        origin: 0,
                    },
                    WriteItem {
                        offset_bytes: 2,
                        data: Bytes::from_static(b"overlaps the first"),
                        origin: u64::MAX,
                    },
                ]),
            ),
            Entry::new_normal(lid, Request::Writes(Vec::new())),
            Entry::new_normal(lid, Request::Flush),
            Entry::new_normal(
                lid,
                Request::Fence {
                    keys: vec![3, u64::MAX],
                },
            ),
            Entry::new_normal(
                lid,
                Request::PrState {
                    lun: 1,
                    state: Bytes::from_static(b"pr"),
                },
            ),
            Entry::new_normal(lid, Request::Resize { size_bytes: 1 << 30 }),
            Entry::new_normal(lid, Request::Meta(Bytes::from_static(b"\x0a\x00"))),
            Entry::new_membership(
                lid,
                Membership::new(
                    vec![BTreeSet::from([1, 2]), BTreeSet::from([2, 3])],
                    BTreeMap::from([
                        (1, BasicNode::new("a:1")),
                        (2, BasicNode::new("b:2")),
                        (3, BasicNode::new("c:3")),
                        (4, BasicNode::new("d:4")),
                    ]),
                )
                .unwrap(),
            ),
        ];
        for e in entries {
            let mut out = Vec::new();
            encode_entry(&e, &mut out).unwrap();
            let (recs, valid, err) = decode_records(&out);
            assert_eq!((recs.len(), valid, err), (1, out.len(), None));
            assert_eq!(decode_entry(recs[0].payload).unwrap(), e);
        }
    }

    #[test]
    fn tail_errors_are_typed() {
        let buf = framed(&[b"one".to_vec(), b"two".to_vec()]);
        let first = HEADER_LEN + 3;
        let (recs, valid, err) = decode_records(&buf[..buf.len() - 1]);
        assert_eq!(recs.len(), 1);
        assert_eq!(valid, first);
        assert_eq!(
            err,
            Some(TailError::Truncated {
                offset: first,
                needed: HEADER_LEN + 3,
                available: HEADER_LEN + 2
            })
        );
        let mut bad = buf.clone();
        bad[first + HEADER_LEN] ^= 1;
        let (recs, valid, err) = decode_records(&bad);
        assert_eq!((recs.len(), valid), (1, first));
        assert!(matches!(err, Some(TailError::CrcMismatch { offset, .. }) if offset == first));
        let mut bad = buf.clone();
        bad[first] = 0;
        assert!(matches!(decode_records(&bad).2, Some(TailError::BadMagic { .. })));
        let mut bad = buf.clone();
        bad[first + LEN_OFFSET + 3] = 0xff;
        assert!(matches!(decode_records(&bad).2, Some(TailError::TooLong { .. })));
        // A header torn after its magic, over zeros: a valid empty record to `decode_records`,
        // the end of the records to `decode_log_records`.
        let mut torn = buf[..first + 4].to_vec();
        torn.resize(first + 64, 0);
        let (recs, _, err) = decode_records(&torn);
        assert_eq!(
            (recs.len(), recs[1].payload.len(), err),
            (
                2,
                0,
                Some(TailError::BadMagic {
                    offset: first + HEADER_LEN,
                    found: 0
                })
            )
        );
        let (recs, valid, err) = decode_log_records(&torn);
        assert_eq!(
            (recs.len(), valid, err),
            (1, first, Some(TailError::Empty { offset: first }))
        );
        assert_eq!(decode_log_records(&buf), decode_records(&buf));
    }

    proptest! {
        #[test]
        fn decode_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let (recs, valid, err) = decode_records(&bytes);
            prop_assert!(valid <= bytes.len());
            prop_assert_eq!(err.is_none(), valid == bytes.len());
            let total: usize = recs.iter().map(|r| r.frame_len()).sum();
            prop_assert_eq!(total, valid);
        }

        #[test]
        fn valid_prefix_round_trips(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8),
            garbage in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let good = framed(&payloads);
            let mut buf = good.clone();
            buf.extend_from_slice(&garbage);
            let (recs, valid, _) = decode_records(&buf);
            // The garbage may by chance be a valid record only if it starts with the magic.
            prop_assert!(valid >= good.len());
            prop_assert!(recs.len() >= payloads.len());
            for (r, p) in recs.iter().zip(&payloads) {
                prop_assert_eq!(r.payload, p.as_slice());
            }
            let (recs, valid, err) = decode_records(&good);
            prop_assert_eq!((recs.len(), valid, err), (payloads.len(), good.len(), None));
        }
    }
}
