use std::sync::mpsc;

use openraft::entry::RaftEntry;
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::TypeConfigExt;
use openraft::vote::RaftLeaderId;
use openraft::{BasicNode, StorageError};
use tempfile::TempDir;

use super::*;
use crate::pb::cluster::meta_command::Cmd;
use crate::pb::cluster::{CreateVolume, NodeInfo};
use crate::raft::log_store::{LogStore, LogStoreOptions};
use crate::raft::types::WriteItem;

const KIB: u64 = 1024;

fn lid(term: u64, index: u64) -> LogId {
    LogId::new(openraft::impls::leader_id_adv::LeaderId::new(term, 1), index)
}

fn normal(index: u64, req: Request) -> Entry {
    Entry::new_normal(lid(1, index), req)
}

fn write(index: u64, offset_bytes: u64, byte: u8, len: usize) -> Entry {
    normal(
        index,
        Request::Write {
            offset_bytes,
            data: Bytes::from(vec![byte; len]),
            origin: 0,
        },
    )
}

fn membership() -> StoredMembership {
    let nodes = BTreeMap::from([
        (1, BasicNode::new("a")),
        (2, BasicNode::new("b")),
        (3, BasicNode::new("c")),
    ]);
    StoredMembership::new(
        Some(lid(1, 1)),
        Membership::new(vec![[1u64, 2, 3].into()], nodes).unwrap(),
    )
}

/// Applies `entries` in one batch and returns every response (what the responders got).
fn apply_sync(sm: &GroupStateMachine, entries: Vec<Entry>) -> io::Result<Vec<Response>> {
    let (tx, rx) = mpsc::channel();
    let batch = entries
        .into_iter()
        .map(|e| {
            let tx = tx.clone();
            (
                e,
                Some(move |r: Response| {
                    let _ = tx.send(r);
                }),
            )
        })
        .collect();
    sm.inner.apply_batch(batch)?;
    drop(tx);
    Ok(rx.iter().collect())
}

/// Applies through openraft's stream API (no responders: a follower).
async fn apply_stream(sm: &mut GroupStateMachine, entries: Vec<Entry>) -> io::Result<()> {
    sm.apply(futures_util::stream::iter(entries.into_iter().map(|e| Ok((e, None)))))
        .await
}

/// What applying `entries` to a zeroed image of `size` gives (writes, unmaps and grows only).
fn model(size: u64, entries: &[Entry]) -> Vec<u8> {
    let mut img = vec![0u8; size as usize];
    let mut fenced = std::collections::HashSet::new();
    for e in entries {
        if let EntryPayload::Normal(req) = &e.payload {
            match req {
                Request::Write { origin, .. } | Request::Unmap { origin, .. }
                    if *origin != 0 && fenced.contains(origin) => {}
                Request::Fence { keys } => fenced.extend(keys.iter().copied()),
                Request::Write { offset_bytes, data, .. } => model_write(&mut img, *offset_bytes, data),
                Request::Writes(items) => {
                    for w in items.iter().filter(|w| w.origin == 0 || !fenced.contains(&w.origin)) {
                        model_write(&mut img, w.offset_bytes, &w.data);
                    }
                }
                Request::Unmap {
                    offset_bytes,
                    len_bytes,
                    ..
                } => {
                    let (o, l) = (*offset_bytes as usize, *len_bytes as usize);
                    if o.checked_add(l).is_some_and(|end| end <= img.len()) {
                        img[o..o + l].fill(0);
                    }
                }
                Request::Resize { size_bytes } if *size_bytes as usize > img.len() => {
                    img.resize(*size_bytes as usize, 0);
                }
                _ => {}
            }
        }
    }
    img
}

fn model_write(img: &mut [u8], offset_bytes: u64, data: &[u8]) {
    let o = offset_bytes as usize;
    if o.checked_add(data.len()).is_some_and(|end| end <= img.len()) {
        img[o..o + data.len()].copy_from_slice(data);
    }
}

fn image_bytes(dir: &Path) -> Vec<u8> {
    fs::read(dir.join(IMAGE_FILE)).unwrap()
}

fn persisted(dir: &Path) -> SmStateRecord {
    read_state(&dir.join(STATE_FILE)).unwrap().unwrap()
}

fn meta_cmd(cmd: Cmd) -> Request {
    Request::Meta(Bytes::from(MetaCommand { cmd: Some(cmd) }.encode_to_vec()))
}

fn add_node(id: u64) -> Cmd {
    Cmd::AddNode(NodeInfo {
        id,
        rpc_addr: format!("127.0.0.1:{}", 7000 + id),
        ..Default::default()
    })
}

fn create_volume(name: &str) -> Cmd {
    Cmd::CreateVolume(CreateVolume {
        name: name.into(),
        size_bytes: 1 << 20,
        ..Default::default()
    })
}

fn pr_sidecar(luns: &[(u64, &'static [u8])]) -> Bytes {
    encode_sidecar(
        &luns.iter().map(|(l, s)| (*l, Bytes::from_static(s))).collect(),
        &BTreeMap::new(),
    )
}

#[tokio::test]
async fn volume_apply_writes_unmaps_resizes_and_pr_state_exactly() {
    let dir = TempDir::new().unwrap();
    let sm = GroupStateMachine::open_volume(dir.path(), 64 * KIB).unwrap();
    let changes = sm.changes();
    let entries = vec![
        write(1, 0, 1, 4096),
        write(2, 8192, 2, 4096),
        normal(
            3,
            Request::Unmap {
                offset_bytes: 0,
                len_bytes: 4096,
                origin: 0,
            },
        ),
        write(4, 6000, 4, 3000),
        normal(
            5,
            Request::PrState {
                lun: 1,
                state: Bytes::from_static(b"pr-1"),
            },
        ),
        normal(6, Request::Resize { size_bytes: 128 * KIB }),
        write(7, 100 * KIB, 7, 1000),
        // Beyond the end: refused, nothing written.
        write(8, 128 * KIB - 10, 8, 100),
        normal(9, Request::Meta(Bytes::from_static(b"\x0a\x00"))),
        normal(
            10,
            Request::Unmap {
                offset_bytes: u64::MAX - 1,
                len_bytes: 4096,
                origin: 0,
            },
        ),
        // Resize never shrinks.
        normal(11, Request::Resize { size_bytes: 4096 }),
        Entry::new_blank(lid(1, 12)),
    ];
    let responses = apply_sync(&sm, entries.clone()).unwrap();
    assert_eq!(responses.len(), entries.len());
    for (i, r) in responses.iter().enumerate() {
        let index = i as u64 + 1;
        assert_eq!(r.applied_index, index);
        assert_eq!(r.error.is_some(), matches!(index, 8..=10), "entry {index}: {r:?}");
    }
    assert!(responses[7].error.as_ref().unwrap().contains("beyond the end"));
    assert_eq!(image_bytes(dir.path()), model(64 * KIB, &entries));
    let img = sm.image().unwrap();
    assert_eq!(img.size_bytes(), 128 * KIB);
    let mut b = [0u8; 4];
    img.read_at(&mut b, 100 * KIB + 996).unwrap();
    assert_eq!(b, [7; 4]);
    assert_eq!(sm.pr_state(1), Some(Bytes::from_static(b"pr-1")));
    assert_eq!(sm.pr_state(2), None);
    assert_eq!(sm.applied_index(), 12);
    assert_eq!(*changes.borrow(), 11);
    assert!(sm.catalogue().is_none());
    // PR state and size changed, so the batch end persisted.
    let rec = persisted(dir.path());
    assert_eq!(rec.applied.unwrap().index, 12);
    assert_eq!(rec.size_bytes, 128 * KIB);
    assert_eq!(
        pr_states_from_records(&rec.pr_states).get(&1).map(|b| b.as_ref()),
        Some(&b"pr-1"[..])
    );
}

fn session_write(index: u64, offset_bytes: u64, byte: u8, origin: u64) -> Entry {
    normal(
        index,
        Request::Write {
            offset_bytes,
            data: Bytes::from(vec![byte; 512]),
            origin,
        },
    )
}

#[tokio::test]
async fn writes_of_a_fenced_session_are_refused_on_every_replica_and_across_restarts() {
    let (da, db) = (TempDir::new().unwrap(), TempDir::new().unwrap());
    let (s1, s2) = (0x51, 0x52);
    let entries = vec![
        session_write(1, 0, 1, s1),
        normal(2, Request::Fence { keys: vec![s1] }),
        // Delivered late on the abandoned session, after the initiator moved on: refused.
        session_write(3, 0, 3, s1),
        normal(
            4,
            Request::Unmap {
                offset_bytes: 0,
                len_bytes: 512,
                origin: s1,
            },
        ),
        // Another session, and a write without a session, are not.
        session_write(5, 512, 5, s2),
        write(6, 1024, 6, 512),
    ];
    let a = GroupStateMachine::open_volume(da.path(), 64 * KIB).unwrap();
    let responses = apply_sync(&a, entries.clone()).unwrap();
    let refused: Vec<u64> = responses.iter().filter(|r| r.fenced).map(|r| r.applied_index).collect();
    assert_eq!(refused, vec![3, 4]);
    assert!(responses.iter().all(|r| r.error.is_none()), "{responses:?}");
    let mut b = [0u8; 1];
    a.image().unwrap().read_at(&mut b, 0).unwrap();
    assert_eq!(b, [1], "the first write stays, the late write and unmap did nothing");
    assert_eq!(image_bytes(da.path()), model(64 * KIB, &entries));
    assert!(a.is_fenced(s1) && !a.is_fenced(s2));
    // The fence is persisted with the applied index (the batch end persists a change).
    assert_eq!(fenced_from_records(&persisted(da.path()).fenced).get(&s1), Some(&2));
    drop(a);
    let mut a = GroupStateMachine::open_volume(da.path(), 64 * KIB).unwrap();
    assert!(a.is_fenced(s1), "the fence survives a restart");
    // Replaying after the persisted point still refuses the session.
    apply_stream(&mut a, vec![session_write(7, 0, 7, s1)]).await.unwrap();
    a.image().unwrap().read_at(&mut b, 0).unwrap();
    assert_eq!(b, [1]);
    // A follower rebuilt from a snapshot knows the fence too (it travels in the sidecar).
    let snap = a.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let mut f = GroupStateMachine::open_volume(db.path(), 64 * KIB).unwrap();
    f.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
    assert!(f.is_fenced(s1) && !f.is_fenced(s2));
    apply_stream(&mut f, vec![session_write(8, 0, 8, s1)]).await.unwrap();
    assert_eq!(image_bytes(db.path()), image_bytes(da.path()));
}

fn item(offset_bytes: u64, byte: u8, len: usize, origin: u64) -> WriteItem {
    WriteItem {
        offset_bytes,
        data: Bytes::from(vec![byte; len]),
        origin,
    }
}

/// Coalesced writes (`Request::Writes`): each item is applied in order as a `Write` of its own,
/// with its own fenced and range checks and its own result (DESIGN.md invariant 3 per item).
#[tokio::test]
async fn coalesced_writes_apply_in_order_each_with_its_own_checks() {
    let (da, db) = (TempDir::new().unwrap(), TempDir::new().unwrap());
    let (s1, s2) = (0x61, 0x62);
    let entries = vec![
        write(1, 0, 9, 16 * 1024),
        normal(2, Request::Fence { keys: vec![s2] }),
        normal(
            3,
            Request::Writes(vec![
                item(0, 1, 4096, s1),
                // Overlaps the first item: applied after it, so it wins where they overlap.
                item(2048, 2, 4096, 0),
                // A fenced session's item is refused; the others of the entry still apply.
                item(8192, 3, 4096, s2),
                // Beyond the end: refused, nothing written.
                item(64 * KIB - 100, 4, 200, s1),
                item(u64::MAX - 10, 5, 100, s1),
                item(12288, 6, 512, s1),
            ]),
        ),
        // A single item entry and an empty one are legal too.
        normal(4, Request::Writes(vec![item(4096, 7, 100, s1)])),
        normal(5, Request::Writes(Vec::new())),
    ];
    let a = GroupStateMachine::open_volume(da.path(), 64 * KIB).unwrap();
    let responses = apply_sync(&a, entries.clone()).unwrap();
    assert_eq!(responses.len(), 5);
    let r = &responses[2];
    assert_eq!((r.applied_index, r.fenced, r.error.clone()), (3, false, None));
    assert_eq!(r.items.len(), 6);
    assert_eq!(
        &r.items[..3],
        &[WriteResult::Written, WriteResult::Written, WriteResult::Fenced]
    );
    for i in [3, 4] {
        assert!(
            matches!(&r.items[i], WriteResult::Refused(e) if e.contains("beyond the end") && e.contains(&format!("item {i}"))),
            "{:?}",
            r.items[i]
        );
    }
    assert_eq!(r.items[5], WriteResult::Written);
    assert_eq!(responses[3].items, vec![WriteResult::Written]);
    assert!(responses[4].items.is_empty());
    assert!(responses[0].items.is_empty(), "a single Write reports no items");
    let mut b = [0u8; 1];
    let img = a.image().unwrap();
    for (at, want) in [
        (0, 1),
        (2047, 1),
        (2048, 2),
        (4095, 2),
        (4096, 7),
        (4195, 7),
        (4196, 2),
        (6143, 2),
        (6144, 9),
        (8192, 9),
        (12288, 6),
    ] {
        img.read_at(&mut b, at).unwrap();
        assert_eq!(b, [want], "byte {at}");
    }
    let expected = model(64 * KIB, &entries);
    assert_eq!(image_bytes(da.path()), expected);

    // A follower applying the same entries through the stream, and then replaying them over
    // the result (a crash before the state was persisted), ends with the same bytes.
    let mut f = GroupStateMachine::open_volume(db.path(), 64 * KIB).unwrap();
    apply_stream(&mut f, entries.clone()).await.unwrap();
    assert_eq!(image_bytes(db.path()), expected);
    apply_stream(&mut f, entries[2..].to_vec()).await.unwrap();
    assert_eq!(image_bytes(db.path()), expected);
}

/// Items written back to back go to the image as one vectored write: runs broken by gaps, by
/// fenced or out-of-range items between them, and later items over earlier runs all end in the
/// bytes of applying every item on its own, in order (checked against the model, also for
/// random entries).
#[tokio::test]
async fn back_to_back_items_written_as_one_run_match_item_by_item() {
    let d = TempDir::new().unwrap();
    let (s1, s2) = (0x71, 0x72);
    let entries = vec![
        normal(1, Request::Fence { keys: vec![s2] }),
        normal(
            2,
            Request::Writes(vec![
                item(0, 1, 4096, s1),
                item(4096, 2, 4096, s1),
                // Fenced, back to back with the run: refused, the run goes on after it.
                item(8192, 3, 4096, s2),
                item(8192, 4, 512, s1),
                // Beyond the end between two back-to-back items.
                item(64 * KIB - 10, 5, 100, s1),
                item(8704, 6, 3584, s1),
                // A gap, then a new run; then an item over the first run (written after it).
                item(20480, 7, 4096, s1),
                item(24576, 8, 0, s1),
                item(24576, 9, 1024, s1),
                item(2048, 10, 4096, s1),
                item(6144, 11, 100, s1),
            ]),
        ),
    ];
    let sm = GroupStateMachine::open_volume(d.path(), 64 * KIB).unwrap();
    let responses = apply_sync(&sm, entries.clone()).unwrap();
    assert_eq!(responses[1].items[2], WriteResult::Fenced);
    assert!(matches!(responses[1].items[4], WriteResult::Refused(_)));
    assert_eq!(image_bytes(d.path()), model(64 * KIB, &entries));

    let mut rng = rand::rng();
    for round in 0..40u8 {
        use rand::Rng as _;
        let d = TempDir::new().unwrap();
        let mut at = 0u64;
        let items: Vec<WriteItem> = (0..rng.random_range(1..24u8))
            .map(|i| {
                // Mostly back to back, sometimes a jump (backwards too) or an item past the end.
                if rng.random_bool(0.25) {
                    at = rng.random_range(0..72u64) * 1024;
                }
                let len = rng.random_range(0..5usize) * 1024 + rng.random_range(0..2usize) * 512;
                let origin = if rng.random_bool(0.15) { s2 } else { s1 };
                let w = item(at, round.wrapping_mul(31).wrapping_add(i + 1), len, origin);
                at += len as u64;
                w
            })
            .collect();
        let entries = vec![
            normal(1, Request::Fence { keys: vec![s2] }),
            normal(2, Request::Writes(items)),
        ];
        let sm = GroupStateMachine::open_volume(d.path(), 64 * KIB).unwrap();
        apply_sync(&sm, entries.clone()).unwrap();
        assert_eq!(
            image_bytes(d.path()),
            model(64 * KIB, &entries),
            "round {round}: {entries:?}"
        );
    }
}

#[test]
fn coalesced_writes_up_to_the_inline_bound_are_cheap() {
    let dir = TempDir::new().unwrap();
    let sm = GroupStateMachine::open_volume(dir.path(), 4 << 20).unwrap();
    type Batch = Vec<(Entry, Option<fn(Response)>)>;
    let writes = |n: usize, len: usize| -> Batch {
        let items = (0..n).map(|i| item((i * len) as u64, 1, len, 0)).collect();
        vec![(normal(1, Request::Writes(items)), None)]
    };
    assert!(sm.inner.cheap(&writes(64, 4096)));
    assert!(sm.inner.cheap(&writes(16, INLINE_APPLY_BYTES / 16)));
    assert!(
        !sm.inner.cheap(&writes(17, INLINE_APPLY_BYTES / 16)),
        "more data than the inline bound"
    );
}

#[test]
fn the_oldest_fences_are_forgotten_beyond_the_limit() {
    let mut m = BTreeMap::new();
    for i in 0..FENCE_LIMIT as u64 + 10 {
        // Keys in descending order, so forgetting by index is not forgetting by key.
        fence(&mut m, u64::MAX - i, i + 1);
    }
    assert_eq!(m.len(), FENCE_LIMIT);
    assert!(!m.contains_key(&u64::MAX), "the first fence went first");
    assert!(m.contains_key(&(u64::MAX - FENCE_LIMIT as u64 - 9)), "the newest stays");
    assert_eq!(fenced_from_records(&fenced_to_records(&m)), m);
}

#[tokio::test]
async fn restart_reports_persisted_state_and_replay_gives_identical_bytes() {
    let dir = TempDir::new().unwrap();
    let mut entries: Vec<Entry> = (1..=3).map(|i| write(i, i * 4096, i as u8, 4096)).collect();
    entries.push(normal(4, Request::Flush));
    let later: Vec<Entry> = (5..=10)
        .map(|i| write(i, (i % 4) * 4096 + 100, i as u8, 5000))
        .collect();
    {
        let mut sm = GroupStateMachine::open_volume(dir.path(), 64 * KIB).unwrap();
        apply_stream(&mut sm, entries.clone()).await.unwrap();
        assert_eq!(persisted(dir.path()).applied.unwrap().index, 4, "Flush persists");
        apply_stream(&mut sm, later.clone()).await.unwrap();
        assert_eq!(persisted(dir.path()).applied.unwrap().index, 4, "writes alone do not");
        // Crash: no drop, no persist. Lose what the page cache held for entry 7 as power loss would.
        std::mem::forget(sm);
    }
    let f = OpenOptions::new()
        .write(true)
        .open(dir.path().join(IMAGE_FILE))
        .unwrap();
    f.write_all_at(&[0xEE; 5000], (7 % 4) * 4096 + 100).unwrap();
    drop(f);

    let mut sm = GroupStateMachine::open_volume(dir.path(), 64 * KIB).unwrap();
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(lid(1, 4)));
    assert_eq!(sm.applied_index(), 4);
    // openraft replays the committed entries after the persisted applied id.
    apply_stream(&mut sm, later.clone()).await.unwrap();
    let all: Vec<Entry> = entries.iter().chain(&later).cloned().collect();
    assert_eq!(image_bytes(dir.path()), model(64 * KIB, &all));
    // A clean drop persists.
    drop(sm);
    let mut sm = GroupStateMachine::open_volume(dir.path(), 64 * KIB).unwrap();
    assert_eq!(sm.applied_state().await.unwrap().0, Some(lid(1, 10)));
}

#[tokio::test]
async fn persisted_applied_index_never_goes_backwards() {
    let dir = TempDir::new().unwrap();
    let sm = GroupStateMachine::open_volume(dir.path(), 64 * KIB).unwrap();
    apply_sync(&sm, vec![write(1, 0, 1, 10), normal(2, Request::Flush)]).unwrap();
    // A persist that captured an older point (a slow snapshot build) does not lower it.
    lock(&sm.inner.live).last_applied = Some(lid(1, 1));
    sm.inner.persist(|_| {}).unwrap();
    assert_eq!(persisted(dir.path()).applied.unwrap().index, 2);
}

#[tokio::test]
async fn persists_every_1024_entries() {
    let dir = TempDir::new().unwrap();
    let mut sm = GroupStateMachine::open_volume(dir.path(), 64 * KIB).unwrap();
    let entries = (1..=1100).map(|i| Entry::new_blank(lid(1, i))).collect();
    apply_stream(&mut sm, entries).await.unwrap();
    assert_eq!(sm.applied_index(), 1100);
    assert_eq!(persisted(dir.path()).applied.unwrap().index, PERSIST_EVERY_ENTRIES);
}

#[tokio::test]
async fn persists_after_one_second_of_applying() {
    let dir = TempDir::new().unwrap();
    let sm = GroupStateMachine::open_volume(dir.path(), 64 * KIB).unwrap();
    apply_sync(&sm, vec![write(1, 0, 1, 10)]).unwrap();
    assert_eq!(persisted(dir.path()).applied, None);
    lock(&sm.inner.live).unpersisted_since = Instant::now().checked_sub(PERSIST_EVERY);
    apply_sync(&sm, vec![write(2, 0, 2, 10)]).unwrap();
    assert_eq!(persisted(dir.path()).applied.unwrap().index, 2);
}

#[tokio::test]
async fn meta_refused_command_leaves_catalogue_unchanged() {
    let dir = TempDir::new().unwrap();
    let sm = GroupStateMachine::open_meta(dir.path()).unwrap();
    let mut cat = sm.catalogue().unwrap();
    assert!(sm.image().is_none());
    let r = apply_sync(
        &sm,
        vec![
            normal(1, meta_cmd(add_node(1))),
            normal(2, meta_cmd(create_volume("v"))),
        ],
    )
    .unwrap();
    assert_eq!((r[0].error.clone(), r[0].value), (None, 1));
    assert_eq!(r[1].error, None);
    let id = r[1].value;
    assert!(id > 0);
    assert!(cat.has_changed().unwrap());
    let before = cat.borrow_and_update().clone();
    assert_eq!(before.volumes.len(), 1);

    let r = apply_sync(
        &sm,
        vec![
            normal(3, meta_cmd(create_volume("v"))),
            normal(4, Request::Meta(Bytes::from_static(b"\xff\xff\xff"))),
            write(5, 0, 1, 10),
        ],
    )
    .unwrap();
    assert!(r[0].error.as_ref().unwrap().contains("exists already"), "{r:?}");
    assert!(r[1].error.as_ref().unwrap().contains("does not decode"), "{r:?}");
    assert!(r[2].error.as_ref().unwrap().contains("metadata group"), "{r:?}");
    assert_eq!(r.iter().map(|x| x.applied_index).collect::<Vec<_>>(), vec![3, 4, 5]);
    assert!(!cat.has_changed().unwrap());
    assert_eq!(*sm.catalogue().unwrap().borrow(), before);
    assert_eq!(sm.applied_index(), 5);

    // Every meta batch is persisted: a crash keeps it.
    std::mem::forget(sm);
    let mut sm = GroupStateMachine::open_meta(dir.path()).unwrap();
    assert_eq!(sm.applied_state().await.unwrap().0, Some(lid(1, 5)));
    assert_eq!(*sm.catalogue().unwrap().borrow(), before);
}

#[tokio::test]
async fn built_snapshot_survives_reopen() {
    let dir = TempDir::new().unwrap();
    let mut sm = GroupStateMachine::open_volume(dir.path(), 64 * KIB).unwrap();
    assert!(sm.get_current_snapshot().await.unwrap().is_none());
    apply_stream(
        &mut sm,
        vec![
            Entry::new_membership(lid(1, 1), membership().membership().clone()),
            write(2, 0, 2, 4096),
            normal(
                3,
                Request::PrState {
                    lun: 1,
                    state: Bytes::from_static(b"old"),
                },
            ),
        ],
    )
    .await
    .unwrap();
    let mut builder = sm.try_create_snapshot_builder(true).await.unwrap();
    // Applied after the capture: not in the snapshot's meta or sidecar.
    apply_stream(
        &mut sm,
        vec![normal(
            4,
            Request::PrState {
                lun: 1,
                state: Bytes::from_static(b"new"),
            },
        )],
    )
    .await
    .unwrap();
    let snap = builder.build_snapshot().await.unwrap();
    assert_eq!(snap.meta.last_log_id, Some(lid(1, 3)));
    assert_eq!(
        snap.meta.last_membership,
        StoredMembership::new(Some(lid(1, 1)), membership().membership().clone())
    );
    let want = SnapshotData::Local {
        path: Some(dir.path().join(IMAGE_FILE)),
        len: 64 * KIB,
        sidecar: pr_sidecar(&[(1, b"old")]),
    };
    assert_eq!(snap.snapshot, want);
    let cur = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(
        (cur.meta.clone(), cur.snapshot.clone()),
        (snap.meta.clone(), want.clone())
    );
    // The build made everything applied so far durable.
    assert_eq!(persisted(dir.path()).applied.unwrap().index, 4);
    std::mem::forget(sm);

    let mut sm = GroupStateMachine::open_volume(dir.path(), 64 * KIB).unwrap();
    let cur = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!((cur.meta, cur.snapshot), (snap.meta, want));
    let (applied, m) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(lid(1, 4)));
    assert_eq!(m.log_id(), &Some(lid(1, 1)));
    assert_eq!(sm.pr_state(1), Some(Bytes::from_static(b"new")));
}

#[tokio::test]
async fn meta_snapshot_carries_the_catalogue() {
    let dir = TempDir::new().unwrap();
    let mut sm = GroupStateMachine::open_meta(dir.path()).unwrap();
    apply_stream(&mut sm, vec![normal(1, meta_cmd(add_node(1)))])
        .await
        .unwrap();
    let snap = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let SnapshotData::Local { path, len, sidecar } = &snap.snapshot else {
        panic!("{:?}", snap.snapshot)
    };
    assert_eq!((path, *len), (&None, 0));
    assert_eq!(
        Catalogue::decode(sidecar.as_ref()).unwrap(),
        *sm.catalogue().unwrap().borrow().as_ref()
    );

    // Installed on another node's metadata group, as received (sidecar only).
    let dir2 = TempDir::new().unwrap();
    let mut other = GroupStateMachine::open_meta(dir2.path()).unwrap();
    let mut cat = other.catalogue().unwrap();
    let received = SnapshotData::Received {
        journal: None,
        size_bytes: 0,
        sidecar: sidecar.clone(),
    };
    other.install_snapshot(&snap.meta, received).await.unwrap();
    assert!(cat.has_changed().unwrap());
    assert_eq!(cat.borrow_and_update().nodes.len(), 1);
    drop(other);
    let mut other = GroupStateMachine::open_meta(dir2.path()).unwrap();
    assert_eq!(other.applied_state().await.unwrap().0, Some(lid(1, 1)));
    assert_eq!(other.catalogue().unwrap().borrow().nodes.len(), 1);
}

/// An old image, a journal of new chunks, and the bytes the install must give.
struct InstallCase {
    journal: PathBuf,
    size: u64,
    expected: Vec<u8>,
    meta: SnapshotMeta,
}

fn install_case(sm: &GroupStateMachine, dir: &Path) -> InstallCase {
    apply_sync(sm, vec![write(1, 0, 1, 8192), write(2, 60 * KIB, 2, 4096)]).unwrap();
    let size = 96 * KIB;
    let chunks: Vec<(u64, Vec<u8>)> = vec![
        (4096, vec![7; 4096]),
        (62 * KIB, vec![8; 5000]),
        (90 * KIB, vec![9; 100]),
    ];
    let mut expected = image_bytes(dir);
    expected.resize(size as usize, 0);
    let journal = sm.snapshot_base().staging_dir.join("recv.journal");
    let mut w = JournalWriter::create(&journal).unwrap();
    for (o, d) in &chunks {
        w.append(*o, d).unwrap();
        expected[*o as usize..*o as usize + d.len()].copy_from_slice(d);
    }
    w.finish(size).unwrap();
    InstallCase {
        journal,
        size,
        expected,
        meta: SnapshotMeta {
            last_log_id: Some(lid(3, 50)),
            last_membership: membership(),
        },
    }
}

#[tokio::test]
async fn install_from_journal_over_older_image() {
    let dir = TempDir::new().unwrap();
    let mut sm = GroupStateMachine::open_volume(dir.path(), 64 * KIB).unwrap();
    assert_eq!(
        sm.snapshot_base(),
        SnapshotBase {
            current: Some(dir.path().join(IMAGE_FILE)),
            staging_dir: dir.path().join(STAGING_DIR),
        }
    );
    let case = install_case(&sm, dir.path());
    let changes = sm.changes();
    let data = SnapshotData::Received {
        journal: Some(case.journal.clone()),
        size_bytes: case.size,
        sidecar: pr_sidecar(&[(1, b"x")]),
    };
    sm.install_snapshot(&case.meta, data).await.unwrap();
    assert_eq!(image_bytes(dir.path()), case.expected);
    assert_eq!(sm.image().unwrap().size_bytes(), case.size);
    assert_eq!(sm.applied_state().await.unwrap(), (Some(lid(3, 50)), membership()));
    assert_eq!(sm.pr_state(1), Some(Bytes::from_static(b"x")));
    assert_eq!(*changes.borrow(), 50);
    assert!(!case.journal.exists());
    let want = SnapshotData::Local {
        path: Some(dir.path().join(IMAGE_FILE)),
        len: case.size,
        sidecar: pr_sidecar(&[(1, b"x")]),
    };
    let cur = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!((&cur.meta, &cur.snapshot), (&case.meta, &want));
    drop(sm);
    let mut sm = GroupStateMachine::open_volume(dir.path(), 64 * KIB).unwrap();
    assert_eq!(sm.applied_state().await.unwrap(), (Some(lid(3, 50)), membership()));
    assert_eq!(image_bytes(dir.path()), case.expected);
    assert_eq!(sm.pr_state(1), Some(Bytes::from_static(b"x")));
}

#[tokio::test]
async fn crash_during_install_is_finished_on_open() {
    let dir = TempDir::new().unwrap();
    let sm = GroupStateMachine::open_volume(dir.path(), 64 * KIB).unwrap();
    let case = install_case(&sm, dir.path());
    // What install_snapshot persists before touching the image, then half of the chunks laid.
    let plan = InstallRecord {
        journal: case.journal.as_os_str().as_bytes().to_vec(),
        snapshot: Some(snapshot_record(&case.meta, case.size, pr_sidecar(&[(2, b"y")]))),
    };
    sm.inner.write_state(|r| r.installing = Some(plan)).unwrap();
    let img = sm.image().unwrap();
    img.set_size(case.size).unwrap();
    img.write_at(&[7; 2048], 4096).unwrap();
    drop(img);
    std::mem::forget(sm);
    // A leftover of an interrupted receive is cleaned, the install's journal is not.
    let leftover = dir.path().join(STAGING_DIR).join("partial");
    fs::write(&leftover, b"junk").unwrap();

    let mut sm = GroupStateMachine::open_volume(dir.path(), 64 * KIB).unwrap();
    assert_eq!(image_bytes(dir.path()), case.expected);
    assert_eq!(sm.applied_state().await.unwrap(), (Some(lid(3, 50)), membership()));
    assert_eq!(sm.pr_state(2), Some(Bytes::from_static(b"y")));
    assert_eq!(persisted(dir.path()).installing, None);
    assert!(!case.journal.exists());
    assert!(!leftover.exists());
}

#[tokio::test]
async fn corrupt_journal_is_refused_before_anything_changes() {
    let dir = TempDir::new().unwrap();
    let mut sm = GroupStateMachine::open_volume(dir.path(), 64 * KIB).unwrap();
    let case = install_case(&sm, dir.path());
    sm.inner.persist(|_| {}).unwrap();
    let before = image_bytes(dir.path());
    let mut bytes = fs::read(&case.journal).unwrap();
    bytes.truncate(bytes.len() - 3);
    fs::write(&case.journal, &bytes).unwrap();
    let data = SnapshotData::Received {
        journal: Some(case.journal.clone()),
        size_bytes: case.size,
        sidecar: Bytes::new(),
    };
    let err = sm.install_snapshot(&case.meta, data).await.unwrap_err();
    assert!(err.to_string().contains("recv.journal"), "{err}");
    assert_eq!(image_bytes(dir.path()), before);
    assert_eq!(persisted(dir.path()).installing, None);
    // Storage errors are sticky: the group is out of service until reopened.
    assert!(sm.applied_state().await.is_err());
    drop(sm);
    let mut sm = GroupStateMachine::open_volume(dir.path(), 64 * KIB).unwrap();
    assert_eq!(sm.applied_state().await.unwrap().0, Some(lid(1, 2)));
}

#[tokio::test]
async fn local_snapshot_of_another_image_installs_its_bytes() {
    let (da, db) = (TempDir::new().unwrap(), TempDir::new().unwrap());
    let mut a = GroupStateMachine::open_volume(da.path(), 64 * KIB).unwrap();
    let mut b = GroupStateMachine::open_volume(db.path(), 32 * KIB).unwrap();
    apply_sync(&b, vec![write(1, 0, 9, 32 * KIB as usize)]).unwrap();
    apply_sync(
        &a,
        vec![
            write(1, 4096, 1, 10000),
            normal(2, Request::Resize { size_bytes: 3 << 20 }),
            write(3, 2 << 20, 3, 4096),
            normal(
                4,
                Request::PrState {
                    lun: 3,
                    state: Bytes::from_static(b"pr"),
                },
            ),
        ],
    )
    .unwrap();
    let snap = a.get_snapshot_builder().await.build_snapshot().await.unwrap();
    b.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
    assert_eq!(image_bytes(db.path()), image_bytes(da.path()));
    assert_eq!(b.pr_state(3), Some(Bytes::from_static(b"pr")));
    assert_eq!(b.applied_state().await.unwrap().0, Some(lid(1, 4)));
    // Restoring the own current snapshot (openraft at startup) keeps the image.
    let cur = a.get_current_snapshot().await.unwrap().unwrap();
    let before = image_bytes(da.path());
    a.install_snapshot(&cur.meta, cur.snapshot).await.unwrap();
    assert_eq!(image_bytes(da.path()), before);
    assert_eq!(a.pr_state(3), Some(Bytes::from_static(b"pr")));
}

#[test]
fn corrupt_state_file_is_refused_naming_the_file() {
    let dir = TempDir::new().unwrap();
    {
        let sm = GroupStateMachine::open_volume(dir.path(), 64 * KIB).unwrap();
        apply_sync(&sm, vec![write(1, 0, 1, 10), normal(2, Request::Flush)]).unwrap();
    }
    let state = dir.path().join(STATE_FILE);
    let mut bytes = fs::read(&state).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    fs::write(&state, &bytes).unwrap();
    let err = GroupStateMachine::open_volume(dir.path(), 64 * KIB).err().unwrap();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    assert!(err.to_string().contains(&state.display().to_string()), "{err}");
    // A volume's directory is not a metadata group.
    bytes[last] ^= 0x40;
    fs::write(&state, &bytes).unwrap();
    let err = GroupStateMachine::open_meta(dir.path()).err().unwrap();
    assert!(err.to_string().contains("state file"), "{err}");
}

struct Builder {
    volume: bool,
}

impl StoreBuilder<C, LogStore, GroupStateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, GroupStateMachine), StorageError<C>> {
        let err = |e: io::Error| StorageError::write(C::err_from_error(&e));
        let dir = TempDir::new().map_err(err)?;
        let store = LogStore::open(dir.path().join("log"), LogStoreOptions::default()).map_err(err)?;
        let sm_dir = dir.path().join("sm");
        let sm = if self.volume {
            GroupStateMachine::open_volume(&sm_dir, 64 * KIB)
        } else {
            GroupStateMachine::open_meta(&sm_dir)
        }
        .map_err(err)?;
        Ok((dir, store, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_conformance_suite_volume() {
    Suite::test_all(Builder { volume: true }).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_conformance_suite_meta() {
    Suite::test_all(Builder { volume: false }).await.unwrap();
}
