//! The cluster catalogue: what the metadata Raft group replicates, and how one
//! [`MetaCommand`] changes it. Pure functions, so every node applies the log identically.

use std::collections::BTreeSet;

use crate::pb::cluster::{Catalogue, CreateVolume, MetaCommand, NodeInfo, TargetInfo, VolumeInfo, meta_command::Cmd};

/// The IQN prefix of targets created for a volume without `--target`.
pub const DEFAULT_TARGET_PREFIX: &str = "iqn.2026-11.org.raftsan:";
/// LUN of the first volume of a target (LUN 0 is the storage-array controller, as in tgt).
pub const FIRST_LUN: u64 = 1;
/// Largest volume (and the largest size a resize may ask for): 64 TiB.
pub const MAX_VOLUME_BYTES: u64 = 64 << 40;

/// The target a volume lands in when none is named.
pub fn default_target(volume: &str) -> String {
    format!("{DEFAULT_TARGET_PREFIX}{volume}")
}

/// A volume name is what an administrator types: 1..=64 of `[A-Za-z0-9._-]`, starting with a
/// letter or digit.
pub fn check_volume_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "volume name {name:?} is not valid: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        ))
    }
}

fn check_target_name(name: &str) -> Result<(), String> {
    let lower = name.to_ascii_lowercase();
    let ok = (lower.starts_with("iqn.") || lower.starts_with("eui.") || lower.starts_with("naa."))
        && name.len() <= 223
        && name.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "target name {name:?} is not an iSCSI name (iqn., eui. or naa.)"
        ))
    }
}

/// The VPD 0x83 NAA designator of a volume: derived from the target, LUN and the volume id, so a
/// volume deleted and created again under the same name is a different disk to initiators.
pub fn volume_naa(target: &str, lun: u64, id: u64) -> [u8; 16] {
    raftsan_target::catalog::derive_naa(&format!("{target}#{id}"), lun)
}

/// The VPD 0x80 serial of a volume.
pub fn volume_serial(id: u64) -> String {
    format!("RAFTSAN{id:08X}")
}

/// Applies `cmd` to `cat`. Returns the value the change produced (the id of a created volume,
/// else 0), or why it was refused; a refused command leaves `cat` unchanged.
pub fn apply(cat: &mut Catalogue, cmd: &MetaCommand) -> Result<u64, String> {
    let Some(cmd) = &cmd.cmd else {
        return Err("empty catalogue command".into());
    };
    match cmd {
        Cmd::AddNode(n) => add_node(cat, n),
        Cmd::UpdateNode(n) => {
            if n.rpc_addr.is_empty() {
                return Err(format!("node {} has no RPC address", n.id));
            }
            if let Some(other) = cat.nodes.iter().find(|x| x.rpc_addr == n.rpc_addr && x.id != n.id) {
                return Err(format!("RPC address {} is already node {}'s", n.rpc_addr, other.id));
            }
            let node = cat
                .nodes
                .iter_mut()
                .find(|x| x.id == n.id)
                .ok_or_else(|| format!("node {} is not a member", n.id))?;
            *node = n.clone();
            Ok(0)
        }
        Cmd::RemoveNode(id) => {
            let before = cat.nodes.len();
            cat.nodes.retain(|n| n.id != *id);
            if cat.nodes.len() == before {
                return Err(format!("node {id} is not a member"));
            }
            for v in &mut cat.volumes {
                v.replicas.retain(|r| r != id);
            }
            Ok(0)
        }
        Cmd::CreateVolume(c) => create_volume(cat, c),
        Cmd::DeleteVolume(name) => {
            let i = cat
                .volumes
                .iter()
                .position(|v| v.name == *name)
                .ok_or_else(|| format!("no volume named {name:?}"))?;
            let v = cat.volumes.remove(i);
            // A target created for the volume goes with it once empty (iSCSI names compare
            // case-insensitively).
            if v.target == default_target(&v.name)
                && !cat.volumes.iter().any(|o| o.target.eq_ignore_ascii_case(&v.target))
            {
                cat.targets.retain(|t| !t.name.eq_ignore_ascii_case(&v.target));
            }
            Ok(v.id)
        }
        Cmd::ResizeVolume(r) => {
            let v = cat
                .volumes
                .iter_mut()
                .find(|v| v.name == r.name)
                .ok_or_else(|| format!("no volume named {:?}", r.name))?;
            if r.size_bytes < v.size_bytes {
                return Err(format!(
                    "volume {:?} is {} bytes; shrinking to {} would destroy data (only growing is supported)",
                    r.name, v.size_bytes, r.size_bytes
                ));
            }
            check_size(r.size_bytes, v.block_size)?;
            v.size_bytes = r.size_bytes;
            Ok(v.id)
        }
        Cmd::PutTarget(t) => {
            check_target_name(&t.name)?;
            match cat.targets.iter_mut().find(|x| x.name.eq_ignore_ascii_case(&t.name)) {
                Some(x) => *x = t.clone(),
                None => cat.targets.push(t.clone()),
            }
            Ok(0)
        }
        Cmd::DeleteTarget(name) => {
            if cat.volumes.iter().any(|v| v.target.eq_ignore_ascii_case(name)) {
                return Err(format!("target {name:?} still has volumes; delete them first"));
            }
            let before = cat.targets.len();
            cat.targets.retain(|t| !t.name.eq_ignore_ascii_case(name));
            if before == cat.targets.len() {
                return Err(format!("no target named {name:?}"));
            }
            Ok(0)
        }
    }
}

fn add_node(cat: &mut Catalogue, n: &NodeInfo) -> Result<u64, String> {
    if n.id == 0 {
        return Err("node id 0 is reserved".into());
    }
    if cat.used_node_ids.contains(&n.id) {
        // DESIGN.md invariant 8: an id names one node's data forever.
        return Err(format!(
            "node id {} was used before; node ids are never reused (give the node a new id)",
            n.id
        ));
    }
    if n.rpc_addr.is_empty() {
        return Err(format!("node {} has no RPC address", n.id));
    }
    if let Some(other) = cat.nodes.iter().find(|x| x.rpc_addr == n.rpc_addr) {
        return Err(format!("RPC address {} is already node {}'s", n.rpc_addr, other.id));
    }
    cat.used_node_ids.push(n.id);
    cat.nodes.push(n.clone());
    cat.nodes.sort_by_key(|x| x.id);
    // Placement: every node holds a replica of every volume (the reference deployment is three
    // nodes); the volume leaders then add the node to their groups.
    for v in &mut cat.volumes {
        if !v.replicas.contains(&n.id) {
            v.replicas.push(n.id);
            v.replicas.sort_unstable();
        }
    }
    Ok(n.id)
}

fn check_size(size: u64, block_size: u32) -> Result<(), String> {
    if size == 0 || size > MAX_VOLUME_BYTES {
        return Err(format!("size {size} bytes is out of range (1 block to 64 TiB)"));
    }
    if !size.is_multiple_of(u64::from(block_size)) {
        return Err(format!("size {size} is not a multiple of the block size {block_size}"));
    }
    Ok(())
}

fn create_volume(cat: &mut Catalogue, c: &CreateVolume) -> Result<u64, String> {
    check_volume_name(&c.name)?;
    if cat.volumes.iter().any(|v| v.name == c.name) {
        return Err(format!("a volume named {:?} exists already", c.name));
    }
    let block_size = if c.block_size == 0 { 512 } else { c.block_size };
    if !matches!(block_size, 512 | 4096) {
        return Err(format!("block size {block_size} is not supported (512 or 4096)"));
    }
    check_size(c.size_bytes, block_size)?;
    let target = if c.target.is_empty() {
        default_target(&c.name)
    } else {
        check_target_name(&c.target)?;
        c.target.to_ascii_lowercase()
    };
    let members: BTreeSet<u64> = cat.nodes.iter().map(|n| n.id).collect();
    let replicas: Vec<u64> = if c.replicas.is_empty() {
        members.iter().copied().collect()
    } else {
        let set: BTreeSet<u64> = c.replicas.iter().copied().collect();
        if let Some(bad) = set.iter().find(|r| !members.contains(r)) {
            return Err(format!("replica node {bad} is not a member of the cluster"));
        }
        set.into_iter().collect()
    };
    if replicas.is_empty() {
        return Err("the cluster has no nodes to hold the volume".into());
    }
    // iSCSI names compare case-insensitively: "iqn.x:A" and "iqn.x:a" are one target.
    let lun = (FIRST_LUN..)
        .find(|l| {
            !cat.volumes
                .iter()
                .any(|v| v.target.eq_ignore_ascii_case(&target) && v.lun == *l)
        })
        .unwrap_or(FIRST_LUN);
    let id = cat.next_volume_id.max(1);
    let next_id = id
        .checked_add(1)
        .ok_or_else(|| "volume ids are exhausted".to_string())?;
    cat.next_volume_id = next_id;
    if !cat.targets.iter().any(|t| t.name.eq_ignore_ascii_case(&target)) {
        cat.targets.push(TargetInfo {
            name: target.clone(),
            ..Default::default()
        });
    }
    cat.volumes.push(VolumeInfo {
        id,
        name: c.name.clone(),
        size_bytes: c.size_bytes,
        block_size,
        naa: volume_naa(&target, lun, id).to_vec().into(),
        serial: volume_serial(id),
        target,
        lun,
        initializer: if replicas.contains(&c.initializer) {
            c.initializer
        } else {
            0
        },
        replicas,
    });
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::cluster::ResizeVolume;

    fn node(id: u64) -> MetaCommand {
        MetaCommand {
            cmd: Some(Cmd::AddNode(NodeInfo {
                id,
                rpc_addr: format!("127.0.0.{}:7000", 10 + id),
                portals: vec![format!("127.0.0.{}:3260", 10 + id)],
                metrics_addr: String::new(),
            })),
        }
    }

    fn create(name: &str, size: u64) -> MetaCommand {
        MetaCommand {
            cmd: Some(Cmd::CreateVolume(CreateVolume {
                name: name.into(),
                size_bytes: size,
                ..Default::default()
            })),
        }
    }

    #[test]
    fn node_ids_are_never_reused() {
        let mut c = Catalogue::default();
        apply(&mut c, &node(1)).unwrap();
        apply(&mut c, &node(2)).unwrap();
        apply(
            &mut c,
            &MetaCommand {
                cmd: Some(Cmd::RemoveNode(2)),
            },
        )
        .unwrap();
        let err = apply(&mut c, &node(2)).unwrap_err();
        assert!(err.contains("never reused"), "{err}");
        assert_eq!(c.nodes.len(), 1);
    }

    #[test]
    fn volumes_get_unique_ids_identity_and_all_members() {
        let mut c = Catalogue::default();
        for id in 1..=3 {
            apply(&mut c, &node(id)).unwrap();
        }
        let a = apply(&mut c, &create("a", 1 << 20)).unwrap();
        assert!(apply(&mut c, &create("a", 1 << 20)).is_err());
        assert!(apply(&mut c, &create("b c", 1 << 20)).is_err());
        assert!(apply(&mut c, &create("b", 1000)).is_err());
        let b = apply(&mut c, &create("b", 1 << 20)).unwrap();
        assert_ne!(a, b);
        let va = &c.volumes[0];
        assert_eq!(va.replicas, vec![1, 2, 3]);
        assert_eq!(va.target, "iqn.2026-11.org.raftsan:a");
        assert_eq!(va.lun, 1);
        assert_eq!(va.naa.len(), 16);
        assert_ne!(c.volumes[0].naa, c.volumes[1].naa);
        // Deleting and re-creating gives a new id and a new identity.
        let old_naa = va.naa.clone();
        apply(
            &mut c,
            &MetaCommand {
                cmd: Some(Cmd::DeleteVolume("a".into())),
            },
        )
        .unwrap();
        assert!(c.targets.iter().all(|t| t.name != "iqn.2026-11.org.raftsan:a"));
        let a2 = apply(&mut c, &create("a", 1 << 20)).unwrap();
        assert!(a2 > b);
        assert_ne!(c.volumes.iter().find(|v| v.name == "a").unwrap().naa, old_naa);
    }

    #[test]
    fn resize_only_grows() {
        let mut c = Catalogue::default();
        apply(&mut c, &node(1)).unwrap();
        apply(&mut c, &create("v", 1 << 20)).unwrap();
        let resize = |size| MetaCommand {
            cmd: Some(Cmd::ResizeVolume(ResizeVolume {
                name: "v".into(),
                size_bytes: size,
            })),
        };
        assert!(apply(&mut c, &resize(1 << 19)).unwrap_err().contains("shrinking"));
        apply(&mut c, &resize(2 << 20)).unwrap();
        assert_eq!(c.volumes[0].size_bytes, 2 << 20);
    }

    #[test]
    fn target_names_compare_case_insensitively() {
        // Found by fuzz/fuzz_targets/meta.rs (fuzz/seeds/meta/case_target): the volume of a
        // default target "…:A" and one created in "…:a" both got LUN 1 of the same target.
        let mut c = Catalogue::default();
        apply(&mut c, &node(1)).unwrap();
        apply(&mut c, &create("A", 1 << 20)).unwrap();
        let x = MetaCommand {
            cmd: Some(Cmd::CreateVolume(CreateVolume {
                name: "x".into(),
                size_bytes: 1 << 20,
                target: default_target("A"),
                ..Default::default()
            })),
        };
        apply(&mut c, &x).unwrap();
        assert_eq!(c.volumes.iter().map(|v| v.lun).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(c.targets.len(), 1);
        // Deleting "A" keeps the target while "x" is in it.
        apply(
            &mut c,
            &MetaCommand {
                cmd: Some(Cmd::DeleteVolume("A".into())),
            },
        )
        .unwrap();
        assert_eq!(c.targets.len(), 1);
    }

    #[test]
    fn volume_ids_never_wrap_and_addresses_stay_unique() {
        let mut c = Catalogue::default();
        apply(&mut c, &node(1)).unwrap();
        apply(&mut c, &node(2)).unwrap();
        c.next_volume_id = u64::MAX;
        let before = c.clone();
        assert!(apply(&mut c, &create("v", 1 << 20)).unwrap_err().contains("exhausted"));
        assert_eq!(c, before);
        let Some(Cmd::AddNode(mut n)) = node(2).cmd else {
            unreachable!()
        };
        n.rpc_addr = c.nodes[0].rpc_addr.clone();
        let update = MetaCommand {
            cmd: Some(Cmd::UpdateNode(n)),
        };
        assert!(apply(&mut c, &update).unwrap_err().contains("already node 1's"));
        assert_eq!(c, before);
    }

    #[test]
    fn removing_a_node_drops_it_from_replica_sets() {
        let mut c = Catalogue::default();
        for id in 1..=3 {
            apply(&mut c, &node(id)).unwrap();
        }
        apply(&mut c, &create("v", 1 << 20)).unwrap();
        apply(
            &mut c,
            &MetaCommand {
                cmd: Some(Cmd::RemoveNode(3)),
            },
        )
        .unwrap();
        assert_eq!(c.volumes[0].replicas, vec![1, 2]);
        // A new node gets a replica of every volume.
        apply(&mut c, &node(4)).unwrap();
        assert_eq!(c.volumes[0].replicas, vec![1, 2, 4]);
    }
}
