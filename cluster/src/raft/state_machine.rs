//! The Raft state machine of every group: a volume image, or the cluster catalogue.
//!
//! Directory layout of one group:
//!
//! ```text
//! <dir>/image     volume only: the sparse image file, written in place by apply (no fsync)
//! <dir>/state     one CRC-framed record (`record.rs` framing, payload `SmStateRecord`): the
//!                 durable applied log id and membership, the PR states (volume) or catalogue
//!                 (meta), the current snapshot's meta and sidecar, and an interrupted install
//! <dir>/staging/  where a snapshot receiver writes its chunk journal (`journal.rs`)
//! ```
//!
//! The state file is replaced atomically (tmp, fsync, rename, fsync dir).
//!
//! # Durability (DESIGN.md "Durability")
//!
//! `apply` writes the image without fsync. The state file is persisted, always after an
//! fdatasync of the image, at least every [`PERSIST_EVERY_ENTRIES`] applied entries or
//! [`PERSIST_EVERY`] of applying, on `Flush` (before its response), when PR state, size or
//! membership changed (end of the batch), on snapshot build, and best effort on drop. So the
//! persisted applied log id never claims more than the image durably holds, and it never goes
//! backwards (except through a snapshot install, which replaces the state). `applied_state()`
//! reports the in-memory state, which right after open is the persisted one: openraft replays
//! the committed entries after it, and since every [`Request`] is an absolute change, replaying
//! over an image that already holds some of them is exact. The metadata group persists at the
//! end of every apply batch (its entries are rare).
//!
//! Storage errors are sticky (DESIGN.md invariant 7): after a failed write or fsync of the image
//! or the state file, every later apply, build and install fails, and nothing more is persisted
//! (a later fsync may "succeed" after the kernel dropped the dirty pages).
//!
//! # Snapshots
//!
//! Fuzzy and cheap (see [`SnapshotData`]). Building a volume snapshot is an fdatasync plus a
//! state write; the snapshot is the live image file with the PR states captured at the snapshot's
//! log id as sidecar. A metadata snapshot is the catalogue at its log id, all in the sidecar.
//! `try_create_snapshot_builder` captures the point-in-time fields (it runs serialized with
//! apply); `build_snapshot` does the I/O and may run concurrently with apply.
//!
//! Installing a [`SnapshotData::Received`] is a crash-atomic redo: the journal is verified, an
//! "installing" record naming it is persisted, then the file is set to the final size, every
//! chunk is laid over it, the image is fdatasynced and the state (applied = the snapshot's log id,
//! membership, sidecar) is persisted, and the journal deleted. [`GroupStateMachine::open_volume`]
//! finishes an install a crash interrupted before anything else. A [`SnapshotData::Local`] of this
//! group's own image (openraft's restore at startup) only resets the state; a `Local` naming
//! another file is first turned into a journal of the differing chunks, then installed the same
//! way.
//!
//! openraft 0.10.0-alpha.37's `RaftStateMachine` has no `begin_receiving_snapshot`: our network
//! streams a snapshot into a journal in [`GroupStateMachine::snapshot_base`]'s staging directory
//! itself and hands over a `Received`. Files left in `staging/` by an interrupted receive are
//! deleted on open (except the journal of an interrupted install).
//!
//! openraft 0.10's `SnapshotMeta` has no `snapshot_id` any more (it identified a transfer, not a
//! snapshot), so none is kept.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use openraft::alias::{EntryOf, LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, Membership, OptionalSend};
use prost::Message;
use raftsan_target::backing::{BackingStore, FaultSwitch, FaultyStore, FileStore};
use raftsan_target::metrics::{StorageOp, storage_error};
use tokio::sync::watch;

use super::journal::{JournalReader, JournalWriter, MAX_CHUNK};
use super::record::{self, LogIdRecord, MembershipRecord};
use super::types::{Request, Response, SnapshotBase, SnapshotData, TypeConfig, WriteResult};
use crate::pb::cluster::{Catalogue, MetaCommand};

type C = TypeConfig;
type Entry = EntryOf<C>;
type LogId = LogIdOf<C>;
type StoredMembership = StoredMembershipOf<C>;
type SnapshotMeta = SnapshotMetaOf<C>;
type Snapshot = SnapshotOf<C, SnapshotData>;

/// File name of the volume image.
pub const IMAGE_FILE: &str = "image";
/// File name of the durable state.
pub const STATE_FILE: &str = "state";
/// Directory where snapshot journals are staged.
pub const STAGING_DIR: &str = "staging";
/// Persist the state at least after this many applied entries...
pub const PERSIST_EVERY_ENTRIES: u64 = 1024;
/// ...or after this long of applying without a persist.
pub const PERSIST_EVERY: Duration = Duration::from_secs(1);
/// Most entries handed to one blocking apply batch.
const APPLY_BATCH: usize = 256;
/// Most data bytes of a batch applied on the async worker instead of the blocking pool.
const INLINE_APPLY_BYTES: usize = 1 << 20;
/// A batch applied inline must not be the one that makes a persist due by time.
const INLINE_APPLY_MARGIN: Duration = Duration::from_millis(100);
/// Chunk size when a `Local` snapshot of another file is turned into a journal.
const COPY_CHUNK: usize = 1 << 20;
const _: () = assert!(COPY_CHUNK as u64 <= MAX_CHUNK as u64);

/// `SmStateRecord::kind` of a volume group.
pub const KIND_VOLUME: u32 = 1;
/// `SmStateRecord::kind` of the metadata group.
pub const KIND_META: u32 = 2;

/// An applied membership config and the log id of its entry.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredMembershipRecord {
    #[prost(message, optional, tag = "1")]
    pub log_id: Option<LogIdRecord>,
    #[prost(message, optional, tag = "2")]
    pub membership: Option<MembershipRecord>,
}

/// The persistent-reservation state of one LUN.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PrStateRecord {
    #[prost(uint64, tag = "1")]
    pub lun: u64,
    #[prost(bytes = "bytes", tag = "2")]
    pub state: Bytes,
}

/// A fenced session (FENCE SESSIONS): its key and the index of the fence entry.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FenceRecord {
    #[prost(uint64, tag = "1")]
    pub key: u64,
    #[prost(uint64, tag = "2")]
    pub index: u64,
}

/// The sidecar of a volume snapshot: every LUN's PR state and the fenced sessions.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PrStatesRecord {
    #[prost(message, repeated, tag = "1")]
    pub luns: Vec<PrStateRecord>,
    #[prost(message, repeated, tag = "2")]
    pub fenced: Vec<FenceRecord>,
}

/// How many fenced sessions a volume remembers; the oldest fence is forgotten first. A fence
/// only matters while writes of the abandoned session can still arrive (seconds), and every
/// fence names at most `fence::MAX_SESSIONS` sessions.
pub const FENCE_LIMIT: usize = 4096;

/// A snapshot: its meta, the file length it had (volume) and its sidecar.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapshotRecord {
    #[prost(message, optional, tag = "1")]
    pub last_log_id: Option<LogIdRecord>,
    #[prost(message, optional, tag = "2")]
    pub last_membership: Option<StoredMembershipRecord>,
    #[prost(uint64, tag = "3")]
    pub len: u64,
    #[prost(bytes = "bytes", tag = "4")]
    pub sidecar: Bytes,
}

/// A snapshot install in progress: the journal (empty: none) and the snapshot it yields (`len`
/// is the final file size).
#[derive(Clone, PartialEq, prost::Message)]
pub struct InstallRecord {
    #[prost(bytes = "vec", tag = "1")]
    pub journal: Vec<u8>,
    #[prost(message, optional, tag = "2")]
    pub snapshot: Option<SnapshotRecord>,
}

/// The whole durable state of a group (`<dir>/state`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct SmStateRecord {
    /// [`KIND_VOLUME`] or [`KIND_META`].
    #[prost(uint32, tag = "1")]
    pub kind: u32,
    #[prost(message, optional, tag = "2")]
    pub applied: Option<LogIdRecord>,
    #[prost(message, optional, tag = "3")]
    pub membership: Option<StoredMembershipRecord>,
    /// Volume: the image size at `applied`.
    #[prost(uint64, tag = "4")]
    pub size_bytes: u64,
    #[prost(message, repeated, tag = "5")]
    pub pr_states: Vec<PrStateRecord>,
    #[prost(message, optional, tag = "6")]
    pub catalogue: Option<Catalogue>,
    /// The current snapshot (what `get_current_snapshot` returns).
    #[prost(message, optional, tag = "7")]
    pub snapshot: Option<SnapshotRecord>,
    /// An install to finish before anything else.
    #[prost(message, optional, tag = "8")]
    pub installing: Option<InstallRecord>,
    /// Volume: the fenced sessions at `applied`.
    #[prost(message, repeated, tag = "9")]
    pub fenced: Vec<FenceRecord>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock leaves plain data behind; keep going rather than cascade.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn index_of(id: Option<&LogIdRecord>) -> Option<u64> {
    id.map(|l| l.index)
}

fn membership_to_record(m: &StoredMembership) -> StoredMembershipRecord {
    StoredMembershipRecord {
        log_id: m.log_id().as_ref().map(LogIdRecord::from),
        membership: Some(record::membership_to_record(m.membership())),
    }
}

fn membership_from_record(r: Option<&StoredMembershipRecord>, what: &str) -> io::Result<StoredMembership> {
    let Some(r) = r else {
        return Ok(StoredMembership::default());
    };
    let membership = match &r.membership {
        None => Membership::default(),
        Some(m) => record::membership_from_record(m, what)?,
    };
    Ok(StoredMembership::new(r.log_id.as_ref().map(LogId::from), membership))
}

fn pr_states_to_records(m: &BTreeMap<u64, Bytes>) -> Vec<PrStateRecord> {
    m.iter()
        .map(|(lun, state)| PrStateRecord {
            lun: *lun,
            state: state.clone(),
        })
        .collect()
}

fn pr_states_from_records(v: &[PrStateRecord]) -> BTreeMap<u64, Bytes> {
    v.iter().map(|r| (r.lun, r.state.clone())).collect()
}

fn fenced_to_records(m: &BTreeMap<u64, u64>) -> Vec<FenceRecord> {
    m.iter().map(|(&key, &index)| FenceRecord { key, index }).collect()
}

fn fenced_from_records(v: &[FenceRecord]) -> BTreeMap<u64, u64> {
    let mut m = BTreeMap::new();
    for r in v {
        fence(&mut m, r.key, r.index);
    }
    m
}

/// Adds a fenced session, forgetting the oldest fences beyond [`FENCE_LIMIT`].
fn fence(m: &mut BTreeMap<u64, u64>, key: u64, index: u64) {
    m.insert(key, index);
    while m.len() > FENCE_LIMIT {
        let Some((&oldest, _)) = m.iter().min_by_key(|&(&k, &i)| (i, k)) else {
            break;
        };
        m.remove(&oldest);
    }
}

fn snapshot_record(meta: &SnapshotMeta, len: u64, sidecar: Bytes) -> SnapshotRecord {
    SnapshotRecord {
        last_log_id: meta.last_log_id.as_ref().map(LogIdRecord::from),
        last_membership: Some(membership_to_record(&meta.last_membership)),
        len,
        sidecar,
    }
}

fn snapshot_meta(r: &SnapshotRecord, what: &str) -> io::Result<SnapshotMeta> {
    Ok(SnapshotMeta {
        last_log_id: r.last_log_id.as_ref().map(LogId::from),
        last_membership: membership_from_record(r.last_membership.as_ref(), what)?,
    })
}

fn read_state(path: &Path) -> io::Result<Option<SmStateRecord>> {
    let buf = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io::Error::new(e.kind(), format!("state file {}: {e}", path.display()))),
    };
    let (recs, _, err) = record::decode_records(&buf);
    if let Some(err) = err {
        return Err(invalid(format!("state file {}: {err}", path.display())));
    }
    let [rec] = recs.as_slice() else {
        return Err(invalid(format!(
            "state file {}: {} records, expected 1",
            path.display(),
            recs.len()
        )));
    };
    SmStateRecord::decode(rec.payload)
        .map(Some)
        .map_err(|e| invalid(format!("state file {}: {e}", path.display())))
}

/// A volume's image file as a [`BackingStore`] whose size follows applied resizes and snapshot
/// installs. The leader serves reads from it; only the state machine writes it.
pub struct VolumeImage {
    /// The file behind the node's fault switch (testing-only fault injection; unarmed, a check
    /// is one relaxed atomic load).
    store: FaultyStore<FileStore>,
    /// A second handle for `set_len`.
    file: File,
    path: PathBuf,
    size_bytes: AtomicU64,
    resize: Mutex<()>,
}

impl VolumeImage {
    fn open(path: &Path, min_size_bytes: u64, faults: Arc<FaultSwitch>) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let len = file.metadata()?.len();
        if len < min_size_bytes {
            file.set_len(min_size_bytes)?;
        }
        let store = FaultyStore::with_switch(FileStore::open(path, false)?, faults);
        Ok(VolumeImage {
            store,
            file,
            path: path.to_path_buf(),
            size_bytes: AtomicU64::new(len.max(min_size_bytes)),
            resize: Mutex::new(()),
        })
    }

    /// The image file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The switch that arms faults on this image's reads, writes and fdatasyncs.
    pub fn faults(&self) -> &Arc<FaultSwitch> {
        self.store.switch()
    }

    /// Grows the file to `size_bytes` (never shrinks).
    fn grow(&self, size_bytes: u64) -> io::Result<()> {
        let _g = lock(&self.resize);
        if size_bytes > self.size_bytes.load(Ordering::Acquire) {
            self.file.set_len(size_bytes)?;
            self.size_bytes.store(size_bytes, Ordering::Release);
        }
        Ok(())
    }

    /// Sets the file to exactly `size_bytes` (a snapshot install makes the image identical to
    /// the leader's).
    fn set_size(&self, size_bytes: u64) -> io::Result<()> {
        let _g = lock(&self.resize);
        self.file.set_len(size_bytes)?;
        self.size_bytes.store(size_bytes, Ordering::Release);
        Ok(())
    }

    /// Counts a failed image write or sync and names it (the error keeps its kind).
    fn failed(&self, op: StorageOp, what: &str, e: io::Error) -> io::Error {
        storage_error(op);
        io::Error::new(e.kind(), format!("{what} of volume image {}: {e}", self.path.display()))
    }

    fn in_range(&self, offset: u64, len: u64) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.size_bytes())
    }
}

impl BackingStore for VolumeImage {
    fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.store.read_at(buf, offset)
    }
    // Only the state machine writes and syncs the image: its failures are counted here (reads
    // are counted by the SCSI layer that issued them).
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.store
            .write_at(buf, offset)
            .map_err(|e| self.failed(StorageOp::Write, &format!("write at byte {offset}"), e))
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        self.store.write_vectored_at(bufs, offset).map_err(|e| {
            let len: usize = bufs.iter().map(|b| b.len()).sum();
            self.failed(StorageOp::Write, &format!("write of {len} bytes at byte {offset}"), e)
        })
    }
    fn flush(&self) -> io::Result<()> {
        self.store
            .flush()
            .map_err(|e| self.failed(StorageOp::Flush, "fdatasync", e))
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.store
            .punch_hole(offset, len)
            .map_err(|e| self.failed(StorageOp::Write, &format!("unmap at byte {offset}"), e))
    }
    fn is_mapped(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        self.store.is_mapped(offset, len)
    }
    fn describe(&self) -> String {
        format!("raft volume image {}", self.path.display())
    }
}

enum Kind {
    Volume(Arc<VolumeImage>),
    Meta(watch::Sender<Arc<Catalogue>>),
}

/// The in-memory state, as applied.
struct Live {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    pr_states: BTreeMap<u64, Bytes>,
    /// Volume: fenced session keys and the index of their fence.
    fenced: BTreeMap<u64, u64>,
    catalogue: Arc<Catalogue>,
    snapshot: Option<SnapshotRecord>,
    /// Entries applied since the last persist.
    unpersisted: u64,
    /// When the first of them was applied.
    unpersisted_since: Option<Instant>,
    /// PR state, size or membership changed since the last persist.
    changed: bool,
}

struct Inner {
    dir: PathBuf,
    state_path: PathBuf,
    staging: PathBuf,
    kind: Kind,
    live: Mutex<Live>,
    /// The record last written to the state file; its lock serializes state writes.
    persisted: Mutex<SmStateRecord>,
    applied: AtomicU64,
    changes: watch::Sender<u64>,
    /// Sticky storage failure.
    failed: Mutex<Option<String>>,
}

/// What a snapshot builder captured, serialized with apply.
struct Captured {
    last_log_id: Option<LogId>,
    membership: StoredMembership,
    len: u64,
    sidecar: Bytes,
}

/// The state machine of one Raft group (a volume or the metadata group). Clones share it.
#[derive(Clone)]
pub struct GroupStateMachine {
    inner: Arc<Inner>,
}

/// Builds a snapshot at the point captured when it was created.
pub struct GroupSnapshotBuilder {
    inner: Arc<Inner>,
    point: Captured,
}

impl GroupStateMachine {
    /// Volume group in `dir` (created if missing): `dir/image` (sparse, grown to `size_bytes` if
    /// smaller) and `dir/state`. An interrupted snapshot install is finished first.
    pub fn open_volume(dir: &Path, size_bytes: u64) -> io::Result<Self> {
        Self::open(dir, Some(size_bytes), Arc::new(FaultSwitch::new()))
    }

    /// [`GroupStateMachine::open_volume`] with the image's I/O behind `faults` (the node's
    /// testing-only fault injection arms it).
    pub fn open_volume_with_faults(dir: &Path, size_bytes: u64, faults: Arc<FaultSwitch>) -> io::Result<Self> {
        Self::open(dir, Some(size_bytes), faults)
    }

    /// Metadata group in `dir`: the catalogue lives in `dir/state` with the applied log id.
    pub fn open_meta(dir: &Path) -> io::Result<Self> {
        Self::open(dir, None, Arc::new(FaultSwitch::new()))
    }

    fn open(dir: &Path, volume_size: Option<u64>, faults: Arc<FaultSwitch>) -> io::Result<Self> {
        let kind_code = if volume_size.is_some() { KIND_VOLUME } else { KIND_META };
        let staging = dir.join(STAGING_DIR);
        fs::create_dir_all(&staging)?;
        let state_path = dir.join(STATE_FILE);
        let existing = read_state(&state_path)?;
        let fresh = existing.is_none();
        let rec = existing.unwrap_or_else(|| SmStateRecord {
            kind: kind_code,
            ..Default::default()
        });
        let what = format!("state file {}", state_path.display());
        if rec.kind != kind_code {
            return Err(invalid(format!(
                "{what}: kind {} but opened as {}",
                rec.kind,
                if kind_code == KIND_VOLUME {
                    "a volume"
                } else {
                    "the metadata group"
                }
            )));
        }
        let last_applied = rec.applied.as_ref().map(LogId::from);
        let membership = membership_from_record(rec.membership.as_ref(), &what)?;
        if let Some(s) = &rec.snapshot {
            snapshot_meta(s, &what)?;
        }
        let catalogue = Arc::new(rec.catalogue.clone().unwrap_or_default());
        let kind = match volume_size {
            Some(size) => {
                let path = dir.join(IMAGE_FILE);
                let img = VolumeImage::open(&path, size.max(rec.size_bytes), faults)
                    .map_err(|e| io::Error::new(e.kind(), format!("volume image {}: {e}", path.display())))?;
                Kind::Volume(Arc::new(img))
            }
            None => Kind::Meta(watch::Sender::new(catalogue.clone())),
        };
        let applied_index = last_applied.map_or(0, |l| l.index);
        let installing = rec.installing.clone();
        let live = Live {
            last_applied,
            membership,
            pr_states: pr_states_from_records(&rec.pr_states),
            fenced: fenced_from_records(&rec.fenced),
            catalogue,
            snapshot: rec.snapshot.clone(),
            unpersisted: 0,
            unpersisted_since: None,
            changed: false,
        };
        let inner = Arc::new(Inner {
            dir: dir.to_path_buf(),
            state_path,
            staging,
            kind,
            live: Mutex::new(live),
            persisted: Mutex::new(rec),
            applied: AtomicU64::new(applied_index),
            changes: watch::Sender::new(applied_index),
            failed: Mutex::new(None),
        });
        let _ = fs::remove_file(inner.dir.join(format!("{STATE_FILE}.tmp")));
        if fresh {
            // Records the group's kind, so a directory is never opened as the other kind.
            inner.persist(|_| {})?;
        }
        if let Some(plan) = &installing {
            tracing::info!(dir = %dir.display(), "finishing an interrupted snapshot install");
            inner.finish_install(plan)?;
        }
        inner.clean_staging()?;
        Ok(GroupStateMachine { inner })
    }

    /// Volume: the image, for the leader's read path.
    pub fn image(&self) -> Option<Arc<VolumeImage>> {
        match &self.inner.kind {
            Kind::Volume(img) => Some(img.clone()),
            Kind::Meta(_) => None,
        }
    }

    /// Meta: the catalogue as last applied; changes on every applied change and install.
    pub fn catalogue(&self) -> Option<watch::Receiver<Arc<Catalogue>>> {
        match &self.inner.kind {
            Kind::Volume(_) => None,
            Kind::Meta(tx) => Some(tx.subscribe()),
        }
    }

    /// Volume: the PR state blob of `lun` as last applied, None if never set.
    pub fn pr_state(&self, lun: u64) -> Option<Bytes> {
        lock(&self.inner.live).pr_states.get(&lun).cloned()
    }

    /// Volume: whether writes of the session with `key` are refused (FENCE SESSIONS).
    pub fn is_fenced(&self, key: u64) -> bool {
        lock(&self.inner.live).fenced.contains_key(&key)
    }

    /// A watch that changes whenever PR state or the size changes by apply or snapshot install
    /// (for the metadata group: on install). The value is the applied index of the change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// Highest applied log index (in memory; 0 before the first).
    pub fn applied_index(&self) -> u64 {
        self.inner.applied.load(Ordering::Acquire)
    }

    /// For a snapshot receiver: the current file (the image; None for meta) and the staging dir.
    pub fn snapshot_base(&self) -> SnapshotBase {
        SnapshotBase {
            current: match &self.inner.kind {
                Kind::Volume(img) => Some(img.path.clone()),
                Kind::Meta(_) => None,
            },
            staging_dir: self.inner.staging.clone(),
        }
    }

    /// The group is being deleted with its directory: nothing is persisted any more (every later
    /// call fails, as after a storage error, but without an error log at drop).
    pub fn discard(&self) {
        *lock(&self.inner.failed) = Some("the group was deleted".into());
    }

    /// Makes everything applied so far durable (fdatasync + state), e.g. before a clean shutdown.
    pub fn persist(&self) -> io::Result<()> {
        self.inner.check_failed()?;
        self.inner.guard("persist", |i| i.persist(|_| {}))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let inner = self.inner.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(h) => h
                .spawn_blocking(move || f(&inner))
                .await
                .map_err(|e| io::Error::other(format!("state machine task: {e}")))?,
            Err(_) => f(&inner),
        }
    }

    fn capture(&self) -> GroupSnapshotBuilder {
        let live = lock(&self.inner.live);
        let (len, sidecar) = match &self.inner.kind {
            Kind::Volume(img) => (img.size_bytes(), encode_sidecar(&live.pr_states, &live.fenced)),
            Kind::Meta(_) => (0, Bytes::from(live.catalogue.encode_to_vec())),
        };
        GroupSnapshotBuilder {
            inner: self.inner.clone(),
            point: Captured {
                last_log_id: live.last_applied,
                membership: live.membership.clone(),
                len,
                sidecar,
            },
        }
    }
}

fn encode_sidecar(pr: &BTreeMap<u64, Bytes>, fenced: &BTreeMap<u64, u64>) -> Bytes {
    Bytes::from(
        PrStatesRecord {
            luns: pr_states_to_records(pr),
            fenced: fenced_to_records(fenced),
        }
        .encode_to_vec(),
    )
}

impl Inner {
    fn check_failed(&self) -> io::Result<()> {
        match &*lock(&self.failed) {
            Some(e) => Err(io::Error::other(format!(
                "state machine {} failed earlier: {e}",
                self.dir.display()
            ))),
            None => Ok(()),
        }
    }

    /// Runs `f`; an error is made sticky and logged.
    fn guard<T>(&self, what: &str, f: impl FnOnce(&Self) -> io::Result<T>) -> io::Result<T> {
        self.check_failed()?;
        let r = f(self);
        if let Err(e) = &r {
            tracing::error!(dir = %self.dir.display(), "state machine {what} failed, group out of service: {e}");
            let mut failed = lock(&self.failed);
            if failed.is_none() {
                *failed = Some(format!("{what}: {e}"));
            }
        }
        r
    }

    fn image(&self) -> Option<&VolumeImage> {
        match &self.kind {
            Kind::Volume(img) => Some(img),
            Kind::Meta(_) => None,
        }
    }

    /// Replaces the state file with `rec` changed by `f` (under the persist lock).
    fn write_state(&self, f: impl FnOnce(&mut SmStateRecord)) -> io::Result<()> {
        let mut persisted = lock(&self.persisted);
        let mut rec = persisted.clone();
        f(&mut rec);
        let mut out = Vec::new();
        record::encode_record(&rec.encode_to_vec(), &mut out);
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        {
            let mut file = File::create(&tmp)?;
            file.write_all(&out)?;
            file.sync_all()?;
        }
        fs::rename(&tmp, &self.state_path)?;
        fsync_dir(&self.dir)?;
        *persisted = rec;
        Ok(())
    }

    /// Makes the applied state durable: capture it, fdatasync the image (covering every write
    /// the captured index includes), then write the state file with `extra` applied too. The
    /// persisted applied index never goes backwards.
    fn persist(&self, extra: impl FnOnce(&mut SmStateRecord)) -> io::Result<()> {
        let (applied, membership, pr_states, fenced, catalogue) = {
            let mut live = lock(&self.live);
            live.unpersisted = 0;
            live.unpersisted_since = None;
            live.changed = false;
            (
                live.last_applied.as_ref().map(LogIdRecord::from),
                membership_to_record(&live.membership),
                pr_states_to_records(&live.pr_states),
                fenced_to_records(&live.fenced),
                match &self.kind {
                    Kind::Meta(_) => Some((*live.catalogue).clone()),
                    Kind::Volume(_) => None,
                },
            )
        };
        let size_bytes = match self.image() {
            Some(img) => {
                let size = img.size_bytes();
                img.flush()?;
                size
            }
            None => 0,
        };
        self.write_state(|rec| {
            if index_of(applied.as_ref()) >= index_of(rec.applied.as_ref()) {
                rec.applied = applied;
                rec.membership = Some(membership);
                rec.pr_states = pr_states;
                rec.fenced = fenced;
                rec.catalogue = catalogue;
                rec.size_bytes = size_bytes;
            }
            extra(rec);
        })
    }

    /// Applies one entry. An `Err` is a storage failure; refused requests are `Response.error`.
    fn apply_entry(&self, entry: &Entry) -> io::Result<Response> {
        let index = entry.log_id.index;
        let mut response = Response {
            applied_index: index,
            ..Default::default()
        };
        let mut flush = false;
        let mut notify = false;
        let mut catalogue = None;
        let mut pr = None;
        match &entry.payload {
            EntryPayload::Blank | EntryPayload::Membership(_) => {}
            EntryPayload::Normal(req) => match (&self.kind, req) {
                (Kind::Volume(_), Request::Write { origin, .. } | Request::Unmap { origin, .. })
                    if *origin != 0 && lock(&self.live).fenced.contains_key(origin) =>
                {
                    // A late command of a session its initiator abandoned (DESIGN.md invariant
                    // 3): refused, the same way on every replica.
                    tracing::debug!(dir = %self.dir.display(), index, "{req} of a fenced session refused");
                    response.fenced = true;
                }
                (Kind::Volume(img), Request::Write { offset_bytes, data, .. }) => {
                    if img.in_range(*offset_bytes, data.len() as u64) {
                        img.write_at(data, *offset_bytes)?;
                    } else {
                        response.error = Some(self.out_of_range(index, req, img.size_bytes()));
                    }
                }
                (Kind::Volume(img), Request::Writes(items)) => {
                    // In order, each as a `Write` of its own: a later item over an earlier one
                    // wins, and every replica refuses the same items. Items written back to back
                    // (each starting where the one before it ended) go to the image as one
                    // vectored write: same bytes, same order, one call.
                    response.items.reserve_exact(items.len());
                    let mut run: Vec<&[u8]> = Vec::new();
                    let mut run_start = 0u64;
                    let mut run_end = 0u64;
                    for (i, w) in items.iter().enumerate() {
                        let fenced = w.origin != 0 && lock(&self.live).fenced.contains_key(&w.origin);
                        let result = if fenced {
                            tracing::debug!(dir = %self.dir.display(), index, item = i, "write of a fenced session refused");
                            WriteResult::Fenced
                        } else if img.in_range(w.offset_bytes, w.data.len() as u64) {
                            if !run.is_empty() && w.offset_bytes != run_end {
                                img.write_vectored_at(&run, run_start)?;
                                run.clear();
                            }
                            if run.is_empty() {
                                run_start = w.offset_bytes;
                                run_end = w.offset_bytes;
                            }
                            run.push(&w.data);
                            run_end += w.data.len() as u64;
                            WriteResult::Written
                        } else {
                            let what = format!("item {i} of {req}, write({}+{})", w.offset_bytes, w.data.len());
                            WriteResult::Refused(self.out_of_range_msg(index, &what, img.size_bytes()))
                        };
                        response.items.push(result);
                    }
                    if !run.is_empty() {
                        img.write_vectored_at(&run, run_start)?;
                    }
                }
                (
                    Kind::Volume(img),
                    Request::Unmap {
                        offset_bytes,
                        len_bytes,
                        ..
                    },
                ) => {
                    if img.in_range(*offset_bytes, *len_bytes) {
                        img.punch_hole(*offset_bytes, *len_bytes)?;
                    } else {
                        response.error = Some(self.out_of_range(index, req, img.size_bytes()));
                    }
                }
                (_, Request::Flush) => flush = true,
                (Kind::Volume(_), Request::Fence { keys }) => {
                    let mut live = lock(&self.live);
                    for &k in keys {
                        fence(&mut live.fenced, k, index);
                    }
                    live.changed = true;
                }
                (Kind::Volume(_), Request::PrState { lun, state }) => {
                    pr = Some((*lun, state.clone()));
                    notify = true;
                }
                (Kind::Volume(img), Request::Resize { size_bytes }) => {
                    img.grow(*size_bytes)?;
                    notify = true;
                }
                (Kind::Meta(_), Request::Meta(bytes)) => match MetaCommand::decode(bytes.as_ref()) {
                    Err(e) => response.error = Some(format!("catalogue command does not decode: {e}")),
                    Ok(cmd) => {
                        let mut cat = (*lock(&self.live).catalogue).clone();
                        match crate::meta::apply(&mut cat, &cmd) {
                            Ok(v) => {
                                response.value = v;
                                catalogue = Some(Arc::new(cat));
                            }
                            Err(e) => response.error = Some(e),
                        }
                    }
                },
                (Kind::Volume(_), Request::Meta(_)) => {
                    response.error = Some("a catalogue command was proposed to a volume group".into());
                }
                (Kind::Meta(_), _) => {
                    response.error = Some(format!("volume request {req} was proposed to the metadata group"));
                }
            },
        }
        {
            let mut live = lock(&self.live);
            live.last_applied = Some(entry.log_id);
            if let EntryPayload::Membership(m) = &entry.payload {
                live.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                live.changed = true;
            }
            if let Some((lun, state)) = pr {
                live.pr_states.insert(lun, state);
            }
            if notify {
                live.changed = true;
            }
            if let Some(cat) = &catalogue {
                live.catalogue = cat.clone();
            }
            live.unpersisted += 1;
            live.unpersisted_since.get_or_insert_with(Instant::now);
        }
        self.applied.store(index, Ordering::Release);
        if let (Kind::Meta(tx), Some(cat)) = (&self.kind, catalogue) {
            tx.send_replace(cat);
        }
        if notify {
            self.changes.send_replace(index);
        }
        if flush {
            // SYNCHRONIZE CACHE / FUA: durable before the response.
            self.persist(|_| {})?;
        }
        Ok(response)
    }

    fn out_of_range(&self, index: u64, req: &Request, size: u64) -> String {
        self.out_of_range_msg(index, &req.to_string(), size)
    }

    fn out_of_range_msg(&self, index: u64, what: &str, size: u64) -> String {
        let msg = format!("entry {index}: {what} is beyond the end of the volume ({size} bytes); nothing written");
        tracing::error!(dir = %self.dir.display(), "{msg}");
        msg
    }

    /// Whether applying `batch` is only writes and unmaps into the image's page cache, small
    /// enough to run on the async worker: no flush, no state change that persists at the batch
    /// end, no persist due, at most [`INLINE_APPLY_BYTES`] of data.
    fn cheap<R>(&self, batch: &[(Entry, Option<R>)]) -> bool {
        let mut bytes = 0usize;
        for (e, _) in batch {
            match &e.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(Request::Write { data, .. }) => bytes += data.len(),
                EntryPayload::Normal(Request::Writes(items)) => {
                    bytes += items.iter().map(|w| w.data.len()).sum::<usize>()
                }
                EntryPayload::Normal(Request::Unmap { .. }) => {}
                _ => return false,
            }
        }
        if bytes > INLINE_APPLY_BYTES || !matches!(self.kind, Kind::Volume(_)) {
            return false;
        }
        let live = lock(&self.live);
        live.unpersisted + batch.len() as u64 + 1 < PERSIST_EVERY_ENTRIES
            && live
                .unpersisted_since
                .is_none_or(|t| t.elapsed() + INLINE_APPLY_MARGIN < PERSIST_EVERY)
    }

    /// Applies a batch; each `respond` gets its entry's response right after the entry.
    fn apply_batch<R: FnOnce(Response)>(&self, batch: Vec<(Entry, Option<R>)>) -> io::Result<()> {
        let applied_any = !batch.is_empty();
        for (entry, respond) in batch {
            let response = self.apply_entry(&entry)?;
            if let Some(r) = respond {
                r(response);
            }
            let due = {
                let live = lock(&self.live);
                live.unpersisted >= PERSIST_EVERY_ENTRIES
                    || live.unpersisted_since.is_some_and(|t| t.elapsed() >= PERSIST_EVERY)
            };
            if due {
                self.persist(|_| {})?;
            }
        }
        let changed = lock(&self.live).changed;
        if applied_any && (changed || matches!(self.kind, Kind::Meta(_))) {
            self.persist(|_| {})?;
        }
        Ok(())
    }

    /// Builds the snapshot captured in `point`: make the state durable and record the snapshot.
    fn build(&self, point: &Captured) -> io::Result<Snapshot> {
        let meta = SnapshotMeta {
            last_log_id: point.last_log_id,
            last_membership: point.membership.clone(),
        };
        let snap = snapshot_record(&meta, point.len, point.sidecar.clone());
        self.persist(|rec| {
            // A build that finishes after a newer snapshot was installed or built keeps that one.
            let newer = rec
                .snapshot
                .as_ref()
                .is_some_and(|cur| index_of(cur.last_log_id.as_ref()) > index_of(snap.last_log_id.as_ref()));
            if !newer {
                rec.snapshot = Some(snap.clone());
            }
        })?;
        {
            let mut live = lock(&self.live);
            let newer = live
                .snapshot
                .as_ref()
                .is_some_and(|cur| index_of(cur.last_log_id.as_ref()) > index_of(snap.last_log_id.as_ref()));
            if !newer {
                live.snapshot = Some(snap);
            }
        }
        Ok(Snapshot {
            meta,
            snapshot: SnapshotData::Local {
                path: self.image().map(|i| i.path.clone()),
                len: point.len,
                sidecar: point.sidecar.clone(),
            },
        })
    }

    fn current_snapshot(&self) -> io::Result<Option<Snapshot>> {
        let Some(rec) = lock(&self.live).snapshot.clone() else {
            return Ok(None);
        };
        let meta = snapshot_meta(&rec, &format!("state file {}", self.state_path.display()))?;
        Ok(Some(Snapshot {
            meta,
            snapshot: SnapshotData::Local {
                path: self.image().map(|i| i.path.clone()),
                len: rec.len,
                sidecar: rec.sidecar,
            },
        }))
    }

    fn install(&self, meta: &SnapshotMeta, data: SnapshotData) -> io::Result<()> {
        match (&self.kind, data) {
            (
                Kind::Volume(_),
                SnapshotData::Received {
                    journal,
                    size_bytes,
                    sidecar,
                },
            ) => self.install_journal(meta, journal, size_bytes, sidecar),
            (Kind::Volume(img), SnapshotData::Local { path, len, sidecar }) => {
                PrStatesRecord::decode(sidecar.as_ref())
                    .map_err(|e| invalid(format!("snapshot sidecar (PR states): {e}")))?;
                let own = match &path {
                    None => true,
                    Some(p) => same_file(p, &img.path)?,
                };
                if own {
                    // openraft restores this group's own snapshot: the image already holds it.
                    img.grow(len)?;
                    let plan = InstallRecord {
                        journal: Vec::new(),
                        snapshot: Some(snapshot_record(meta, img.size_bytes(), sidecar)),
                    };
                    return self.finish_install(&plan);
                }
                let src = path.unwrap_or_default();
                let journal = self.journal_from_file(&src, img)?;
                let size = JournalReader::verify(&journal)?;
                self.install_journal(meta, Some(journal), size, sidecar)
            }
            (Kind::Meta(_), SnapshotData::Received { journal: Some(j), .. }) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("metadata snapshot with a chunk journal {}", j.display()),
            )),
            (Kind::Meta(_), SnapshotData::Received { sidecar, .. } | SnapshotData::Local { sidecar, .. }) => {
                Catalogue::decode(sidecar.as_ref())
                    .map_err(|e| invalid(format!("snapshot sidecar (catalogue): {e}")))?;
                let plan = InstallRecord {
                    journal: Vec::new(),
                    snapshot: Some(snapshot_record(meta, 0, sidecar)),
                };
                self.finish_install(&plan)
            }
        }
    }

    fn install_journal(
        &self,
        meta: &SnapshotMeta,
        journal: Option<PathBuf>,
        size_bytes: u64,
        sidecar: Bytes,
    ) -> io::Result<()> {
        if let Some(j) = &journal {
            let size = JournalReader::verify(j)?;
            if size != size_bytes {
                return Err(invalid(format!(
                    "snapshot journal {} ends with {size} bytes, the snapshot says {size_bytes}",
                    j.display()
                )));
            }
        }
        PrStatesRecord::decode(sidecar.as_ref()).map_err(|e| invalid(format!("snapshot sidecar (PR states): {e}")))?;
        let plan = InstallRecord {
            journal: journal.map(|j| j.as_os_str().as_bytes().to_vec()).unwrap_or_default(),
            snapshot: Some(snapshot_record(meta, size_bytes, sidecar)),
        };
        self.write_state(|rec| rec.installing = Some(plan.clone()))?;
        self.finish_install(&plan)
    }

    /// The redo part of an install (also run by open): lay the journal over the image, make it
    /// durable, persist the snapshot's state, delete the journal.
    fn finish_install(&self, plan: &InstallRecord) -> io::Result<()> {
        let what = format!("state file {}", self.state_path.display());
        let snap = plan
            .snapshot
            .clone()
            .ok_or_else(|| invalid(format!("{what}: install without a snapshot")))?;
        let meta = snapshot_meta(&snap, &what)?;
        let journal = (!plan.journal.is_empty()).then(|| PathBuf::from(std::ffi::OsStr::from_bytes(&plan.journal)));
        let mut pr_states = BTreeMap::new();
        let mut fenced = BTreeMap::new();
        let mut catalogue = None;
        match &self.kind {
            Kind::Volume(img) => {
                let recs = PrStatesRecord::decode(snap.sidecar.as_ref())
                    .map_err(|e| invalid(format!("{what}: snapshot sidecar (PR states): {e}")))?;
                pr_states = pr_states_from_records(&recs.luns);
                fenced = fenced_from_records(&recs.fenced);
                img.set_size(snap.len)?;
                if let Some(j) = &journal {
                    let mut r = JournalReader::open(j)
                        .map_err(|e| io::Error::new(e.kind(), format!("snapshot journal {}: {e}", j.display())))?;
                    while let Some((offset, data)) = r.next_chunk()? {
                        if !img.in_range(offset, data.len() as u64) {
                            return Err(invalid(format!(
                                "snapshot journal {}: chunk at {offset} of {} bytes beyond the size {}",
                                j.display(),
                                data.len(),
                                snap.len
                            )));
                        }
                        img.write_at(&data, offset)?;
                    }
                    if r.size_bytes() != Some(snap.len) {
                        return Err(invalid(format!(
                            "snapshot journal {} does not end with size {}",
                            j.display(),
                            snap.len
                        )));
                    }
                }
                img.flush()?;
            }
            Kind::Meta(_) => {
                catalogue = Some(
                    Catalogue::decode(snap.sidecar.as_ref())
                        .map_err(|e| invalid(format!("{what}: snapshot sidecar (catalogue): {e}")))?,
                );
            }
        }
        self.write_state(|rec| {
            rec.applied = snap.last_log_id.clone();
            rec.membership = snap.last_membership.clone();
            rec.pr_states = pr_states_to_records(&pr_states);
            rec.fenced = fenced_to_records(&fenced);
            rec.catalogue = catalogue.clone();
            rec.size_bytes = snap.len;
            rec.snapshot = Some(snap.clone());
            rec.installing = None;
        })?;
        if let Some(j) = &journal {
            match fs::remove_file(j) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!("cannot delete the installed snapshot journal {}: {e}", j.display()),
            }
        }
        let index = meta.last_log_id.map_or(0, |l| l.index);
        {
            let mut live = lock(&self.live);
            live.last_applied = meta.last_log_id;
            live.membership = meta.last_membership.clone();
            live.pr_states = pr_states;
            live.fenced = fenced;
            if let Some(cat) = &catalogue {
                live.catalogue = Arc::new(cat.clone());
            }
            live.snapshot = Some(snap);
            live.unpersisted = 0;
            live.unpersisted_since = None;
            live.changed = false;
        }
        self.applied.store(index, Ordering::Release);
        if let (Kind::Meta(tx), Some(cat)) = (&self.kind, catalogue) {
            tx.send_replace(Arc::new(cat));
        }
        self.changes.send_replace(index);
        Ok(())
    }

    /// Writes a journal (in staging) of the chunks of `src` that differ from the image.
    fn journal_from_file(&self, src: &Path, img: &VolumeImage) -> io::Result<PathBuf> {
        let mut input = File::open(src)?;
        let size = input.metadata()?.len();
        let path = self.staging.join(format!("local-{}.journal", std::process::id()));
        let mut w = JournalWriter::create(&path)?;
        let mut theirs = vec![0u8; COPY_CHUNK];
        let mut ours = vec![0u8; COPY_CHUNK];
        let mut offset = 0u64;
        while offset < size {
            let n = (size - offset).min(COPY_CHUNK as u64) as usize;
            input.read_exact(&mut theirs[..n])?;
            let have = img.size_bytes().saturating_sub(offset).min(n as u64) as usize;
            ours[..n].fill(0);
            img.file.read_exact_at(&mut ours[..have], offset)?;
            if theirs[..n] != ours[..n] {
                w.append(offset, &theirs[..n])?;
            }
            offset += n as u64;
        }
        w.finish(size)
    }

    /// Deletes what an interrupted receive left in staging.
    fn clean_staging(&self) -> io::Result<()> {
        for e in fs::read_dir(&self.staging)? {
            let e = e?;
            if e.file_type()?.is_file() {
                tracing::info!("deleting the leftover snapshot file {}", e.path().display());
                fs::remove_file(e.path())?;
            }
        }
        Ok(())
    }
}

fn same_file(a: &Path, b: &Path) -> io::Result<bool> {
    let (ma, mb) = (fs::metadata(a)?, fs::metadata(b)?);
    Ok(ma.dev() == mb.dev() && ma.ino() == mb.ino())
}

impl Drop for Inner {
    fn drop(&mut self) {
        if lock(&self.failed).is_some() {
            return;
        }
        let pending = lock(&self.live).unpersisted > 0;
        if pending && let Err(e) = self.persist(|_| {}) {
            tracing::error!(dir = %self.dir.display(), "persisting the state machine on shutdown failed: {e}");
        }
    }
}

impl RaftSnapshotBuilder<C> for GroupSnapshotBuilder {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let sm = GroupStateMachine {
            inner: self.inner.clone(),
        };
        let point = Captured {
            last_log_id: self.point.last_log_id,
            membership: self.point.membership.clone(),
            len: self.point.len,
            sidecar: self.point.sidecar.clone(),
        };
        sm.blocking(move |i| i.guard("snapshot build", |i| i.build(&point)))
            .await
    }
}

impl RaftStateMachine<C> for GroupStateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = GroupSnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        self.inner.check_failed()?;
        let live = lock(&self.inner.live);
        Ok((live.last_applied, live.membership.clone()))
    }

    async fn apply<Strm>(&mut self, entries: Strm) -> Result<(), io::Error>
    where
        Strm: futures_util::Stream<Item = Result<EntryResponder<C>, io::Error>> + Unpin + OptionalSend,
    {
        let mut chunks = entries.ready_chunks(APPLY_BATCH);
        while let Some(chunk) = chunks.next().await {
            let mut batch = Vec::with_capacity(chunk.len());
            let mut failed = None;
            for item in chunk {
                match item {
                    Ok((entry, responder)) => batch.push((entry, responder.map(|r| move |resp| r.send(resp)))),
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            if self.inner.cheap(&batch) {
                // Page-cache writes only: no hop to the blocking pool (it cost a replicated
                // write about 1 ms between commit and apply under load).
                self.inner.check_failed()?;
                self.inner.guard("apply", |i| i.apply_batch(batch))?;
            } else {
                self.blocking(move |i| i.guard("apply", |i| i.apply_batch(batch)))
                    .await?;
            }
            if let Some(e) = failed {
                return Err(e);
            }
        }
        Ok(())
    }

    async fn try_create_snapshot_builder(&mut self, _force: bool) -> Option<Self::SnapshotBuilder> {
        Some(self.capture())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.capture()
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: SnapshotData) -> Result<(), io::Error> {
        let meta = meta.clone();
        self.blocking(move |i| i.guard("snapshot install", |i| i.install(&meta, snapshot)))
            .await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        self.inner.check_failed()?;
        self.inner.current_snapshot()
    }
}

#[cfg(test)]
mod tests;
