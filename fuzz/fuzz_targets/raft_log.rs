//! Raft log segment bytes (what a crash or bit rot can leave on disk) → the record framer and the
//! entry decoder of `raftsan_cluster::raft::record`.
//!
//! Input layout: the whole input is a segment file's contents.
//!
//! Invariants: no panic; the valid prefix never exceeds the input and covers all of it when no
//! tail error is reported; re-framing the decoded records reproduces the valid prefix byte for
//! byte; an entry that decodes re-encodes to one whole record whose entry decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use raftsan_cluster::raft::record::{decode_entry, decode_records, encode_entry, encode_record};

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
        if let Ok(entry) = decode_entry(r) {
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
});
