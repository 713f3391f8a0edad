//! Cluster RPC messages a peer sends (`proto/rpc/raft.proto`, `proto/rpc/cluster.proto`) → prost
//! and the conversions the server applies before handing them to openraft or the volume leader.
//!
//! Input layout: byte 0 selects the message (mod 6), the rest is its protobuf encoding:
//! 0 `AppendRequest` (entries are encoded `EntryRecord`s), 1 `VoteRequest`, 2
//! `TransferLeaderRequest`, 3 `SnapshotRequest` (a `Begin` is converted to vote and snapshot
//! meta), 4 `ExecuteRequest` (its nexus through `nexus_from_pb`), 5 `StreamAppendReply` (a
//! follower's answer, converted as the leader does for a request ending at index 100).
//!
//! Invariants: no panic; an accepted AppendEntries has entries that follow `prev_log_id` one index
//! at a time with log ids that never go backwards, and encodes (as the client does) to bytes that
//! decode to the same request; a snapshot's membership encodes back to the same membership; a
//! nexus converts exactly when its ISID has 6 bytes and its port fields fit 16 bits, and converts
//! back to the same message; an accepted stream reply never acknowledges more than was sent and
//! encodes back to a reply that converts to the same answer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use raftsan_cluster::node::fuzz_nexus_from_pb;
use raftsan_cluster::pb::{cluster, raft as pb};
use raftsan_cluster::rpc::{
    fuzz_decode_append, fuzz_decode_snapshot, fuzz_decode_stream_reply, fuzz_decode_transfer, fuzz_decode_vote,
    fuzz_encode_append, fuzz_encode_stream_reply, fuzz_membership_to_bytes,
};

fn append(body: &[u8]) {
    let Ok(rpc) = fuzz_decode_append(body) else {
        return;
    };
    let mut prev = rpc.prev_log_id.clone();
    for e in &rpc.entries {
        let want = prev.as_ref().map_or(0, |p| p.index + 1);
        assert_eq!(e.log_id.index, want, "accepted entries are consecutive");
        if let Some(p) = &prev {
            assert!(e.log_id.leader_id >= p.leader_id, "accepted log ids never go backwards");
        }
        prev = Some(e.log_id.clone());
    }
    let bytes = fuzz_encode_append(&rpc);
    let back = fuzz_decode_append(&bytes).expect("an encoded AppendEntries decodes");
    assert_eq!(format!("{rpc:?}"), format!("{back:?}"));
    assert_eq!(fuzz_encode_append(&back), bytes, "encoding is deterministic");
    let _ = format!("{rpc}");
}

fn snapshot(body: &[u8]) {
    let Ok(Some((vote, meta))) = fuzz_decode_snapshot(body) else {
        return;
    };
    let _ = format!("{vote} {meta}");
    let Ok(pb::SnapshotRequest {
        msg: Some(pb::snapshot_request::Msg::Begin(mut begin)),
    }) = pb::SnapshotRequest::decode(body)
    else {
        panic!("a converted Begin decodes");
    };
    begin.last_membership = fuzz_membership_to_bytes(&meta.last_membership).into();
    let again = pb::SnapshotRequest {
        msg: Some(pb::snapshot_request::Msg::Begin(begin)),
    }
    .encode_to_vec();
    let Ok(Some((_, back))) = fuzz_decode_snapshot(&again) else {
        panic!("a re-encoded membership decodes");
    };
    assert_eq!(
        format!("{:?}", meta.last_membership),
        format!("{:?}", back.last_membership)
    );
}

fn stream_reply(body: &[u8]) {
    // The request the reply answers: entries up to index 100 of term 3, or (first byte odd) an
    // entry-less request after an empty log.
    let sent = body.first().is_none_or(|b| b % 2 == 0).then_some(pb::LogId {
        term: 3,
        node_id: 1,
        index: 100,
    });
    let Ok(r) = fuzz_decode_stream_reply(body, sent.as_ref()) else {
        return;
    };
    if let Ok(Some(m)) = &r {
        let sent = sent.as_ref().expect("a reply to an empty request acknowledged an entry");
        assert!(
            (m.leader_id.term, m.leader_id.node_id, m.index) <= (sent.term, sent.node_id, sent.index),
            "a reply acknowledged more than was sent"
        );
    }
    let again = fuzz_encode_stream_reply(&r);
    let back = fuzz_decode_stream_reply(&again, sent.as_ref()).expect("an encoded reply decodes");
    assert_eq!(r, back);
}

fn execute(body: &[u8]) {
    let Ok(req) = cluster::ExecuteRequest::decode(body) else {
        return;
    };
    let Some(n) = &req.nexus else {
        return;
    };
    let fits = n.isid.len() == 6 && [n.tpgt, n.relative_port_id, n.port_group].iter().all(|&v| v <= 0xffff);
    match fuzz_nexus_from_pb(n) {
        Some((nexus, back)) => {
            assert!(fits, "nexus with a bad ISID or port field accepted");
            assert_eq!(&back, n, "a nexus converts back to the same message");
            assert_eq!(&nexus.isid[..], &n.isid[..]);
        }
        None => assert!(!fits, "valid nexus refused"),
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&sel, body)) = input.split_first() else {
        return;
    };
    match sel % 6 {
        0 => append(body),
        1 => {
            if let Ok(v) = fuzz_decode_vote(body) {
                let _ = format!("{v}");
            }
        }
        2 => {
            if let Ok(t) = fuzz_decode_transfer(body) {
                let _ = format!("{t}");
            }
        }
        3 => snapshot(body),
        4 => execute(body),
        _ => stream_reply(body),
    }
});
