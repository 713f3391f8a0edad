//! Raft log segment bytes (what a crash or bit rot can leave on disk) → the record framer and the
//! entry decoder of `raftsan_cluster::raft::record`.
//!
//! Input layout: the whole input is a segment file's contents. The same bytes are also read as
//! the items of a coalesced-writes entry (`OP_WRITES`, which random bytes rarely spell as nested
//! protobuf): repeated `[len u8][origin u8][offset u8 x 8 LE][len bytes of data]`, a short tail
//! ending the list; that entry is built as a prost `EntryRecord`, decoded, and corrupted at the
//! position the first input byte names.
//!
//! Invariants: no panic; the valid prefix never exceeds the input and covers all of it when no
//! tail error is reported; re-framing the decoded records reproduces the valid prefix byte for
//! byte; an entry that decodes re-encodes to one whole record whose entry decodes to the same value;
//! a well-formed coalesced-writes record decodes to its items in order and converts back to the
//! same record.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use raftsan_cluster::raft::record::{
    AppDataRecord, EntryRecord, KIND_NORMAL, LogIdRecord, OP_WRITES, WriteItemRecord, decode_entry, decode_log_records, decode_records,
    encode_entry, encode_record, entry_to_record,
};

/// The input read as the items of a coalesced-writes entry (layout in the module doc).
fn writes_record(data: &[u8]) -> EntryRecord {
    let mut writes = Vec::new();
    let mut rest = data;
    while let [len, origin, tail @ ..] = rest {
        let Some((offset, tail)) = tail.split_first_chunk::<8>() else { break };
        let Some((item, tail)) = tail.split_at_checked(usize::from(*len)) else { break };
        writes.push(WriteItemRecord {
            offset_bytes: u64::from_le_bytes(*offset),
            data: Bytes::copy_from_slice(item),
            origin: u64::from(*origin),
        });
        rest = tail;
    }
    EntryRecord {
        log_id: Some(LogIdRecord {
            term: 1,
            node_id: 1,
            index: data.len() as u64,
        }),
        kind: KIND_NORMAL,
        app: Some(AppDataRecord {
            op: OP_WRITES,
            writes,
            ..Default::default()
        }),
        membership: None,
    }
}

/// Decodes `payload`; when it is an entry, it re-encodes to one whole record decoding equal.
fn check_entry(payload: &[u8]) {
    if let Ok(entry) = decode_entry(payload) {
        // encode_entry writes a framed record; decode_entry takes its payload.
        let mut again = Vec::new();
        if encode_entry(&entry, &mut again).is_ok() {
            let (framed, valid, tail) = decode_records(&again);
            assert!(
                tail.is_none() && valid == again.len() && framed.len() == 1,
                "re-encoded entry is one whole record"
            );
            let back = decode_entry(framed[0].payload).expect("a re-encoded entry decodes");
            assert_eq!(format!("{entry:?}"), format!("{back:?}"));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (records, valid, tail) = decode_records(data);
    assert!(valid <= data.len());
    if tail.is_none() {
        assert_eq!(valid, data.len(), "no tail error but not all bytes consumed");
    }
    let mut reframed = Vec::new();
    for r in &records {
        encode_record(r.payload, &mut reframed);
    }
    assert_eq!(
        &reframed[..],
        &data[..valid],
        "re-framing differs from the valid prefix"
    );
    for r in records.iter().map(|r| r.payload).chain(std::iter::once(data)) {
        check_entry(r);
    }
    // A log segment's view: the same records up to the first empty one.
    let (log_records, log_valid, log_tail) = decode_log_records(data);
    let empty = records.iter().position(|r| r.payload.is_empty());
    assert_eq!(log_records[..], records[..empty.unwrap_or(records.len())]);
    assert_eq!(log_valid, empty.map_or(valid, |i| records[i].offset));
    assert_eq!(log_tail.is_none(), tail.is_none() && empty.is_none());

    let rec = writes_record(data);
    let payload = rec.encode_to_vec();
    let entry = decode_entry(&payload).expect("a well-formed coalesced-writes record decodes");
    assert_eq!(entry_to_record(&entry), rec, "coalesced writes convert back to the same record");
    check_entry(&payload);
    if let Some(&at) = data.first() {
        let mut bad = payload;
        let at = usize::from(at) % bad.len();
        bad[at] ^= data.get(1).copied().unwrap_or(0) | 1;
        check_entry(&bad);
    }
});
