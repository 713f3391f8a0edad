//! Catalogue commands (the payload of `Request::Meta` entries of the metadata group) → prost
//! `MetaCommand` → `raftsan_cluster::meta::apply`.
//!
//! Input layout: byte 0 bit 0 set: a u16 LE length and that many bytes of an encoded `Catalogue`
//! to start from (as a snapshot or the state file could hold); clear: the empty catalogue. Then
//! records `u16 LE len, len bytes of an encoded MetaCommand` (the last may be short).
//!
//! Invariants, from any start: no panic; a refused command leaves the catalogue unchanged; a node
//! id in `used_node_ids` is never added again and `used_node_ids` only grows. From the empty
//! catalogue also (what the cluster ever holds): node ids and RPC addresses unique and every node
//! id in `used_node_ids`; volume ids unique, non-zero and below `next_volume_id`; volume names
//! unique and valid; (target, LUN) unique with iSCSI names compared case-insensitively; every
//! volume's target exists; replicas sorted, unique and members; sizes in range.
#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use raftsan_cluster::meta::{MAX_VOLUME_BYTES, apply, check_volume_name};
use raftsan_cluster::pb::cluster::{Catalogue, MetaCommand, meta_command::Cmd};

fn take<'a>(input: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (len, rest) = input.split_first_chunk::<2>()?;
    let n = usize::from(u16::from_le_bytes(*len)).min(rest.len());
    let (item, rest) = rest.split_at(n);
    *input = rest;
    Some(item)
}

fn check_consistent(cat: &Catalogue) {
    let used: BTreeSet<u64> = cat.used_node_ids.iter().copied().collect();
    assert_eq!(used.len(), cat.used_node_ids.len(), "used_node_ids unique");
    let mut ids = BTreeSet::new();
    let mut addrs = BTreeSet::new();
    for n in &cat.nodes {
        assert!(n.id != 0 && ids.insert(n.id), "node ids non-zero and unique: {cat:?}");
        assert!(used.contains(&n.id), "node {} missing from used_node_ids", n.id);
        assert!(
            !n.rpc_addr.is_empty() && addrs.insert(n.rpc_addr.clone()),
            "RPC addresses unique: {cat:?}"
        );
    }
    let mut vids = BTreeSet::new();
    let mut names = BTreeSet::new();
    let mut luns = BTreeSet::new();
    for v in &cat.volumes {
        assert!(
            v.id != 0 && v.id < cat.next_volume_id && vids.insert(v.id),
            "volume ids: {cat:?}"
        );
        assert!(
            check_volume_name(&v.name).is_ok() && names.insert(v.name.clone()),
            "volume names: {cat:?}"
        );
        assert!(
            luns.insert((v.target.to_ascii_lowercase(), v.lun)),
            "two volumes at LUN {} of target {}: {cat:?}",
            v.lun,
            v.target
        );
        assert!(
            cat.targets.iter().any(|t| t.name.eq_ignore_ascii_case(&v.target)),
            "volume {} in a missing target {}: {cat:?}",
            v.name,
            v.target
        );
        assert!(v.replicas.windows(2).all(|w| w[0] < w[1]), "replicas sorted and unique");
        assert!(
            v.replicas.iter().all(|r| ids.contains(r)),
            "replicas are members: {cat:?}"
        );
        assert!(matches!(v.block_size, 512 | 4096));
        assert!(v.size_bytes > 0 && v.size_bytes <= MAX_VOLUME_BYTES);
        assert!(v.size_bytes.is_multiple_of(u64::from(v.block_size)));
        assert_eq!(v.naa.len(), 16);
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&flags, mut rest)) = input.split_first() else {
        return;
    };
    let from_empty = flags & 1 == 0;
    let mut cat = if from_empty {
        Catalogue::default()
    } else {
        let Some(Ok(c)) = take(&mut rest).map(Catalogue::decode) else {
            return;
        };
        c
    };
    while let Some(bytes) = take(&mut rest) {
        let Ok(cmd) = MetaCommand::decode(bytes) else {
            continue;
        };
        let before = cat.clone();
        match apply(&mut cat, &cmd) {
            Err(e) => {
                assert_eq!(cat, before, "refused command {cmd:?} ({e}) changed the catalogue");
                continue;
            }
            Ok(v) => {
                if let Some(Cmd::CreateVolume(_)) = &cmd.cmd {
                    assert!(
                        cat.volumes.iter().any(|x| x.id == v),
                        "the created volume's id is returned"
                    );
                    assert!(
                        before.volumes.iter().all(|x| x.id != v),
                        "the created volume's id is new"
                    );
                }
            }
        }
        assert!(
            cat.used_node_ids.starts_with(&before.used_node_ids),
            "used_node_ids only grows: {before:?} → {cat:?}"
        );
        for n in &cat.nodes {
            let new = before.nodes.iter().all(|b| b.id != n.id);
            assert!(
                !(new && before.used_node_ids.contains(&n.id)),
                "used node id {} added again by {cmd:?}",
                n.id
            );
        }
        if from_empty {
            check_consistent(&cat);
        }
    }
});
