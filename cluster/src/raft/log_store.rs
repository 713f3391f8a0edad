//! The durable Raft log store of one Raft group: segmented append-only files plus small vote,
//! committed and purged files, all framed as CRC-checked records (`record.rs`).
//!
//! Directory layout:
//!
//! ```text
//! <dir>/<16 hex digits>.seg   log segments, ascending ids; the last one is the active segment,
//!                             its records followed by zeros written ahead (preallocation)
//! <dir>/vote                  the vote, replaced atomically and durably before save_vote returns
//! <dir>/purged                the last purged log id, replaced atomically and durably
//! <dir>/committed             the committed log id, a hint: written after the log it covers is
//!                             durable, never fsynced itself (losing it is allowed by openraft)
//! ```
//!
//! I/O ordering (openraft `docs/protocol/io_ordering.md`): every write is issued synchronously from
//! the caller in submission order. `append` writes the records and returns (they are readable at
//! once); durability is reported through the callback. With [`FsyncPolicy::Batch`], one flusher
//! thread fdatasyncs every file written since its last round and then completes every callback
//! queued before that round began (group commit). With [`FsyncPolicy::Always`], `append` syncs
//! before it returns. `save_vote`, `truncate_after` and `purge` first make all earlier appends
//! durable, then their own change, before they return.
//!
//! Storage errors are sticky (DESIGN.md invariant 7): after the first failed write or fsync every
//! later call fails, and openraft stops the group.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::ops::{Bound, RangeBounds};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use openraft::OptionalSend;
use openraft::alias::{EntryOf, LogIdOf, VoteOf};
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use prost::Message;
use raftsan_target::backing::{FaultOp, FaultSwitch};

use super::record::{self, LogIdRecord, TailError, VoteRecord};
use super::types::TypeConfig;

type C = TypeConfig;
type Entry = EntryOf<C>;
type LogId = LogIdOf<C>;
type Vote = VoteOf<C>;
type Callback = IOFlushed<C>;

/// File name of the vote.
pub const VOTE_FILE: &str = "vote";
/// File name of the last purged log id.
pub const PURGED_FILE: &str = "purged";
/// File name of the committed log id.
pub const COMMITTED_FILE: &str = "committed";
/// Least time between two writes of the committed hint. The hint only shortens the replay after a
/// restart (losing it is allowed), so writing it once per group-commit round is not worth the
/// rename each write costs.
pub const COMMITTED_EVERY: Duration = Duration::from_millis(100);
/// Default for [`LogStoreOptions::background_sync`]: with [`FsyncPolicy::OnFlush`], written
/// segments are fdatasynced in the background once they have waited this long.
pub const DEFAULT_BACKGROUND_SYNC: Duration = Duration::from_secs(1);
/// Suffix of segment files.
pub const SEGMENT_SUFFIX: &str = ".seg";
/// Default segment size at which the active segment is rotated.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Default step of the zeros written ahead of the active segment's end (see
/// [`LogStoreOptions::prealloc_bytes`]).
pub const DEFAULT_PREALLOC_BYTES: u64 = 1024 * 1024;
/// Zeros for preallocation, one step at most (in `.bss`, no page is touched until written from).
static ZEROS: [u8; DEFAULT_PREALLOC_BYTES as usize] = [0; DEFAULT_PREALLOC_BYTES as usize];
/// Default cap on the bytes one `limited_get_log_entries` returns (bounds AppendEntries).
pub const DEFAULT_MAX_READ_BYTES: usize = 4 * 1024 * 1024;
/// Default size of the cache of recently appended entries.
pub const DEFAULT_CACHE_BYTES: usize = 32 * 1024 * 1024;

/// When appended entries are fsynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// `append` fdatasyncs before it returns and completes its callback itself.
    Always,
    /// A flusher thread fdatasyncs once for all appends queued since its last round.
    Batch,
    /// Appends count as flushed once written (page cache), unless they hold a flush entry
    /// ([`Request::Flush`](super::types::Request::Flush)) or a membership change: those wait for
    /// the flusher's fdatasync, which also covers everything written before them. Callbacks
    /// still complete in order (an append never overtakes one that waits for a sync). Otherwise
    /// the flusher fdatasyncs written segments only once they have waited
    /// [`LogStoreOptions::background_sync`], and no zeros are written ahead (`prealloc_bytes`
    /// is ignored: appends are not synced one round at a time, and the zeros would double the
    /// bytes written).
    OnFlush,
}

/// Tunables of a [`LogStore`].
#[derive(Debug, Clone)]
pub struct LogStoreOptions {
    /// Rotate the active segment once it holds at least this many bytes.
    pub segment_bytes: u64,
    /// When an append reaches the end of what the active segment's file holds, the file is
    /// extended by zeros up to the next multiple of this many bytes (at most
    /// [`DEFAULT_PREALLOC_BYTES`], never past `segment_bytes`), so the appends after it overwrite
    /// blocks that already exist: their fdatasync writes data only, not the file's size and block
    /// map (on ext4 about 40 % less kernel time and latency per round). Zeros after the last
    /// record are the log's normal end on open. 0 turns it off; [`FsyncPolicy::OnFlush`] ignores
    /// it.
    pub prealloc_bytes: u64,
    /// With [`FsyncPolicy::OnFlush`]: how long written segments may wait for a background
    /// fdatasync (a flush entry syncs them at once). This bounds what a power loss on a majority
    /// at once can take of acknowledged writes that no SYNCHRONIZE CACHE covered, without an
    /// fdatasync (and a flusher wake-up) per append. Unused by the other policies, which sync
    /// every append.
    pub background_sync: Duration,
    /// Fsync policy of appends.
    pub fsync: FsyncPolicy,
    /// Byte cap of one `limited_get_log_entries` result (at least one entry is always returned).
    pub max_read_bytes: usize,
    /// Byte budget of the in-memory cache of recent entries.
    pub cache_bytes: usize,
    /// Testing-only fault injection: segment writes (`Write`), segment fdatasyncs of the
    /// group-commit rounds (`Flush`) and segment reads (`Read`) check it first. Unarmed, a check
    /// is one relaxed atomic load.
    pub faults: Arc<FaultSwitch>,
}

impl Default for LogStoreOptions {
    fn default() -> Self {
        Self {
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            prealloc_bytes: DEFAULT_PREALLOC_BYTES,
            background_sync: DEFAULT_BACKGROUND_SYNC,
            fsync: FsyncPolicy::Batch,
            max_read_bytes: DEFAULT_MAX_READ_BYTES,
            cache_bytes: DEFAULT_CACHE_BYTES,
            faults: Arc::new(FaultSwitch::new()),
        }
    }
}

/// Location of one entry on disk.
#[derive(Debug, Clone)]
struct Loc {
    seg: u64,
    offset: u64,
    frame_len: u32,
    log_id: LogId,
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    file: Arc<File>,
    /// End of the records: where the next append goes.
    len: u64,
    /// Length of the file: `len` plus the zeros written ahead of it.
    alloc: u64,
    /// Highest index physically stored in the segment, purged or not.
    last_index: Option<u64>,
}

struct Inner {
    segments: BTreeMap<u64, Segment>,
    /// Locations of the live (unpurged) entries; `locs[i]` has index `first_index + i`.
    locs: VecDeque<Loc>,
    first_index: u64,
    last_purged: Option<LogId>,
    vote: Option<Vote>,
    committed: Option<LogId>,
    cache: BTreeMap<u64, Entry>,
    cache_bytes: usize,
    failed: Option<String>,
}

#[derive(Default)]
struct FlushQueue {
    waiters: Vec<Callback>,
    files: Vec<Arc<File>>,
    /// When `files` last went from empty to not empty (how long the oldest unsynced write has
    /// waited).
    files_since: Option<Instant>,
    sync_dir: bool,
    /// Highest log index written to a file (durable or not).
    written_index: Option<u64>,
    /// Highest log index known durable.
    durable_index: Option<u64>,
    pending_committed: Option<LogId>,
    /// When the committed hint was last written (it is written at most every
    /// [`COMMITTED_EVERY`]: a rename per group-commit round would double the round's time).
    committed_written_at: Option<Instant>,
    shutdown: bool,
    error: Option<String>,
}

struct FlushCtl {
    dir: PathBuf,
    queue: Mutex<FlushQueue>,
    cv: Condvar,
    /// Serializes flush rounds between the flusher thread and synchronous callers.
    round: Mutex<()>,
    fsyncs: AtomicU64,
    faults: Arc<FaultSwitch>,
    /// `Some(wait)` with [`FsyncPolicy::OnFlush`]: written files alone start a round only once
    /// they have waited this long. `None`: at once.
    lazy: Option<Duration>,
}

struct Shared {
    dir: PathBuf,
    opts: LogStoreOptions,
    inner: Mutex<Inner>,
    ctl: Arc<FlushCtl>,
    flusher: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        lock(&self.ctl.queue).shutdown = true;
        self.ctl.cv.notify_all();
        if let Some(h) = lock(&self.flusher).take() {
            let _ = h.join();
        }
    }
}

/// The durable log store of one Raft group. Cheap to clone; clones share the same store, and a
/// clone is the [`RaftLogReader`] handed to replication.
#[derive(Clone)]
pub struct LogStore {
    shared: Arc<Shared>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock leaves plain data behind; keep going rather than cascade.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn corrupt(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}{SEGMENT_SUFFIX}"))
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replace `dir/name` with `bytes`: write a temporary file, fsync it, rename, fsync the directory
/// (all only when `durable`).
fn write_atomic(dir: &Path, name: &str, bytes: &[u8], durable: bool) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        if durable {
            f.sync_all()?;
        }
    }
    fs::rename(&tmp, &path)?;
    if durable {
        fsync_dir(dir)?;
    }
    Ok(())
}

fn framed<M: Message>(msg: &M) -> Vec<u8> {
    let mut out = Vec::new();
    record::encode_record(&msg.encode_to_vec(), &mut out);
    out
}

/// Read a one-record file; `Ok(None)` when absent.
fn read_single<M: Message + Default>(path: &Path) -> io::Result<Option<M>> {
    let buf = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let (recs, _, err) = record::decode_records(&buf);
    if let Some(err) = err {
        return Err(corrupt(format!("{}: {err}", path.display())));
    }
    let [rec] = recs.as_slice() else {
        return Err(corrupt(format!(
            "{}: {} records, expected 1",
            path.display(),
            recs.len()
        )));
    };
    M::decode(rec.payload)
        .map(Some)
        .map_err(|e| corrupt(format!("{}: {e}", path.display())))
}

/// Whether a valid record starts anywhere in `buf` after `from` (then the damage at `from` is not
/// a torn tail but corruption in the middle of the log).
fn valid_record_after(buf: &[u8], from: usize) -> Option<usize> {
    let magic = record::RECORD_MAGIC.to_le_bytes();
    (from + 1..buf.len().saturating_sub(record::HEADER_LEN - 1))
        .filter(|&p| buf[p..p + 4] == magic)
        .find(|&p| !record::decode_log_records(&buf[p..]).0.is_empty())
}

impl FlushCtl {
    /// One group-commit round: fdatasync every file written so far, then complete the callbacks
    /// queued before the round began, then write a pending committed id the log now covers (at
    /// most every [`COMMITTED_EVERY`]).
    fn round(&self) {
        self.round_inner(false, true);
    }

    /// Whether the committed hint may be written now (or `force`d, at shutdown).
    fn committed_due(q: &FlushQueue, force: bool) -> bool {
        force || q.committed_written_at.is_none_or(|t| t.elapsed() >= COMMITTED_EVERY)
    }

    /// A round; without `sync` it only writes a committed hint the log already holds durably
    /// (written files, callbacks and the directory wait for a round that syncs).
    fn round_inner(&self, force_committed: bool, sync: bool) {
        let _round = lock(&self.round);
        let (waiters, files, sync_dir, written) = {
            let mut q = lock(&self.queue);
            if sync {
                q.files_since = None;
                (
                    std::mem::take(&mut q.waiters),
                    std::mem::take(&mut q.files),
                    std::mem::take(&mut q.sync_dir),
                    q.written_index,
                )
            } else {
                (Vec::new(), Vec::new(), false, q.durable_index)
            }
        };
        let mut result = Ok(());
        if let Some(e) = lock(&self.queue).error.clone() {
            result = Err(e);
        } else {
            for f in &files {
                self.fsyncs.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = self.faults.check(FaultOp::Flush, 0, 0).and_then(|()| f.sync_data()) {
                    result = Err(format!("fdatasync of log segment: {e}"));
                    break;
                }
            }
            if result.is_ok() && sync_dir {
                self.fsyncs.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = fsync_dir(&self.dir) {
                    result = Err(format!("fsync of log directory: {e}"));
                }
            }
        }
        match &result {
            Ok(()) => {
                let committed = {
                    let mut q = lock(&self.queue);
                    q.durable_index = q.durable_index.max(written);
                    match q.pending_committed {
                        Some(c) if Some(c.index) <= q.durable_index && Self::committed_due(&q, force_committed) => {
                            q.committed_written_at = Some(Instant::now());
                            q.pending_committed.take()
                        }
                        _ => None,
                    }
                };
                for w in waiters {
                    w.io_completed(Ok(()));
                }
                if let Some(c) = committed {
                    // A hint only: a lost or torn committed file reads back as None.
                    if let Err(e) = write_atomic(&self.dir, COMMITTED_FILE, &framed(&LogIdRecord::from(&c)), false) {
                        tracing::warn!(dir = %self.dir.display(), "writing committed log id: {e}");
                    }
                }
            }
            Err(msg) => {
                tracing::error!(dir = %self.dir.display(), "raft log storage failed, node out of service: {msg}");
                raftsan_target::metrics::storage_error(raftsan_target::metrics::StorageOp::Flush);
                lock(&self.queue).error = Some(msg.clone());
                for w in waiters {
                    w.io_completed(Err(io::Error::other(msg.clone())));
                }
            }
        }
    }

    /// How long the written files may still wait for a round: `None` when none wait, zero when
    /// they are due.
    fn files_left(&self, q: &FlushQueue) -> Option<Duration> {
        if q.files.is_empty() {
            return None;
        }
        Some(match (self.lazy, q.files_since) {
            (Some(wait), Some(since)) => wait.saturating_sub(since.elapsed()),
            _ => Duration::ZERO,
        })
    }

    /// Whether a round must sync now: callbacks or the directory wait, written files are due,
    /// or the store shuts down.
    fn sync_due(&self, q: &FlushQueue) -> bool {
        q.shutdown || !q.waiters.is_empty() || q.sync_dir || self.files_left(q) == Some(Duration::ZERO)
    }

    fn run(self: Arc<Self>) {
        loop {
            let sync = {
                let mut q = lock(&self.queue);
                loop {
                    // A hint waits until the log holds it durably (a round that syncs appends
                    // makes it so; none is started for the hint alone), and for its turn. None
                    // is written once the log has failed (it is out of service).
                    let hint_waits = q.error.is_none()
                        && matches!(&q.pending_committed, Some(c) if Some(c.index) <= q.durable_index);
                    let hint_ready = hint_waits && Self::committed_due(&q, false);
                    if hint_ready || self.sync_due(&q) {
                        break;
                    }
                    let hint_left = q
                        .committed_written_at
                        .filter(|_| hint_waits)
                        .map(|t| COMMITTED_EVERY.saturating_sub(t.elapsed()));
                    q = match [hint_left, self.files_left(&q)].into_iter().flatten().min() {
                        // The hint or the written files wait for their turn.
                        Some(left) => self.cv.wait_timeout(q, left).unwrap_or_else(|e| e.into_inner()).0,
                        None => self.cv.wait(q).unwrap_or_else(|e| e.into_inner()),
                    };
                }
                if q.shutdown && q.waiters.is_empty() && q.files.is_empty() && !q.sync_dir {
                    let last_hint = q.pending_committed.is_some();
                    drop(q);
                    if last_hint {
                        self.round_inner(true, false);
                    }
                    return;
                }
                self.sync_due(&q)
            };
            self.round_inner(false, sync);
        }
    }
}

impl LogStore {
    /// Open (or create) the log store in `dir`: scan and verify every segment (a segment's
    /// records end at the first byte that starts no record when only zeros follow it), truncate a
    /// torn tail of the last segment, and fail on corruption anywhere else.
    pub fn open(dir: impl AsRef<Path>, opts: LogStoreOptions) -> io::Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir)?;
        let vote = read_single::<VoteRecord>(&dir.join(VOTE_FILE))?.map(|r| Vote::from(&r));
        let last_purged = read_single::<LogIdRecord>(&dir.join(PURGED_FILE))?.map(|r| LogId::from(&r));
        let committed = match read_single::<LogIdRecord>(&dir.join(COMMITTED_FILE)) {
            Ok(c) => c.map(|r| LogId::from(&r)),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), "ignoring unreadable committed hint: {e}");
                None
            }
        };

        let mut ids = Vec::new();
        for ent in fs::read_dir(&dir)? {
            let name = ent?.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(hex) = name.strip_suffix(SEGMENT_SUFFIX)
                && let Ok(id) = u64::from_str_radix(hex, 16)
            {
                ids.push(id);
            }
        }
        ids.sort_unstable();

        let purged_index = last_purged.as_ref().map(|l| l.index);
        let mut segments = BTreeMap::new();
        let mut locs: VecDeque<Loc> = VecDeque::new();
        let mut first_index = purged_index.map_or(0, |i| i + 1);
        let mut prev_index: Option<u64> = None;
        for (n, &id) in ids.iter().enumerate() {
            let path = segment_path(&dir, id);
            let is_last = n + 1 == ids.len();
            let buf = fs::read(&path)?;
            let (recs, valid, err) = record::decode_log_records(&buf);
            let mut len = buf.len() as u64;
            let mut alloc = len;
            if err.is_some() && buf[valid..].iter().all(|&b| b == 0) {
                // Preallocated zeros (or blocks extended but never written): the normal end.
                len = valid as u64;
            } else if let Some(err) = err {
                if !is_last || valid_record_after(&buf, err.offset()).is_some() {
                    return Err(corrupt(format!("{}: corrupt log record: {err}", path.display())));
                }
                tracing::warn!(
                    segment = %path.display(),
                    valid_bytes = valid,
                    dropped_bytes = buf.len() - valid,
                    "truncating torn tail of the raft log: {err}"
                );
                let f = OpenOptions::new().write(true).open(&path)?;
                f.set_len(valid as u64)?;
                f.sync_all()?;
                len = valid as u64;
                alloc = len;
            }
            let mut last_index = None;
            for rec in &recs {
                let entry = record::decode_entry(rec.payload)
                    .map_err(|e| corrupt(format!("{} offset {}: {e}", path.display(), rec.offset)))?;
                let index = entry.log_id.index;
                if let Some(p) = prev_index
                    && index != p + 1
                {
                    return Err(corrupt(format!(
                        "{} offset {}: log index {index} follows {p}",
                        path.display(),
                        rec.offset
                    )));
                }
                prev_index = Some(index);
                last_index = Some(index);
                if Some(index) <= purged_index {
                    continue;
                }
                if locs.is_empty() {
                    if let Some(p) = purged_index
                        && index != p + 1
                    {
                        return Err(corrupt(format!(
                            "{} offset {}: first live log index {index} does not follow purged index {p}",
                            path.display(),
                            rec.offset
                        )));
                    }
                    first_index = index;
                }
                locs.push_back(Loc {
                    seg: id,
                    offset: rec.offset as u64,
                    frame_len: rec.frame_len() as u32,
                    log_id: entry.log_id,
                });
            }
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            segments.insert(
                id,
                Segment {
                    path,
                    file: Arc::new(file),
                    len,
                    alloc,
                    last_index,
                },
            );
        }
        let mut sync_dir = false;
        if segments.is_empty() {
            let path = segment_path(&dir, 0);
            let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
            segments.insert(
                0,
                Segment {
                    path,
                    file: Arc::new(file),
                    len: 0,
                    alloc: 0,
                    last_index: None,
                },
            );
            sync_dir = true;
        }
        let written = locs.back().map(|l| l.log_id.index);
        let ctl = Arc::new(FlushCtl {
            dir: dir.clone(),
            queue: Mutex::new(FlushQueue {
                written_index: written,
                durable_index: written,
                sync_dir,
                ..Default::default()
            }),
            cv: Condvar::new(),
            round: Mutex::new(()),
            fsyncs: AtomicU64::new(0),
            faults: opts.faults.clone(),
            lazy: (opts.fsync == FsyncPolicy::OnFlush).then_some(opts.background_sync),
        });
        let flusher = {
            let ctl = ctl.clone();
            std::thread::Builder::new()
                .name("raft-log-flush".into())
                .spawn(move || ctl.run())?
        };
        let shared = Shared {
            dir,
            opts,
            inner: Mutex::new(Inner {
                segments,
                locs,
                first_index,
                last_purged,
                vote,
                committed,
                cache: BTreeMap::new(),
                cache_bytes: 0,
                failed: None,
            }),
            ctl,
            flusher: Mutex::new(Some(flusher)),
        };
        Ok(Self {
            shared: Arc::new(shared),
        })
    }

    /// The directory of this store.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Bytes of records in the segment files (purged entries included until their segment is
    /// deleted; preallocated zeros not).
    pub fn record_bytes(&self) -> u64 {
        lock(&self.shared.inner).segments.values().map(|s| s.len).sum()
    }

    /// Number of fdatasync/fsync calls made for appends so far (group-commit measurement).
    pub fn fsync_count(&self) -> u64 {
        self.shared.ctl.fsyncs.load(Ordering::Relaxed)
    }

    /// Number of segment files currently on disk.
    pub fn segment_count(&self) -> usize {
        lock(&self.shared.inner).segments.len()
    }

    /// Make every append issued so far durable before returning (completing their callbacks).
    pub fn sync(&self) -> io::Result<()> {
        self.shared.ctl.round();
        self.check_flush_error()
    }

    fn check_flush_error(&self) -> io::Result<()> {
        match lock(&self.shared.ctl.queue).error.clone() {
            Some(e) => Err(io::Error::other(format!("raft log storage failed earlier: {e}"))),
            None => Ok(()),
        }
    }

    fn check_failed(&self, inner: &Inner) -> io::Result<()> {
        if let Some(e) = &inner.failed {
            return Err(io::Error::other(format!("raft log storage failed earlier: {e}")));
        }
        self.check_flush_error()
    }

    /// Run blocking file work (fsync, rename, unlink) on tokio's blocking pool when called inside
    /// a tokio runtime, so one group's fsync does not stall the other groups sharing a worker.
    /// The caller awaits the result, so operations stay in submission order.
    async fn off_runtime<T: Send + 'static>(
        &self,
        f: impl FnOnce(&LogStore) -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let this = self.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(h) => h
                .spawn_blocking(move || f(&this))
                .await
                .map_err(|e| io::Error::other(format!("raft log storage task: {e}")))?,
            Err(_) => f(&this),
        }
    }

    /// Run `f` on the locked state; an error is made sticky and logged.
    fn mutate<T>(&self, what: &str, f: impl FnOnce(&Shared, &mut Inner) -> io::Result<T>) -> io::Result<T> {
        let mut inner = lock(&self.shared.inner);
        self.check_failed(&inner)?;
        let r = f(&self.shared, &mut inner);
        if let Err(e) = &r {
            tracing::error!(dir = %self.shared.dir.display(), "raft log {what} failed, node out of service: {e}");
            raftsan_target::metrics::storage_error(raftsan_target::metrics::StorageOp::Write);
            inner.failed = Some(format!("{what}: {e}"));
        }
        r
    }

    fn read_range(&self, start: u64, end: u64, max_bytes: Option<usize>) -> io::Result<Vec<Entry>> {
        let inner = lock(&self.shared.inner);
        self.check_failed(&inner)?;
        let first = inner.first_index;
        let last_excl = first + inner.locs.len() as u64;
        let (start, end) = (start.max(first), end.min(last_excl));
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for index in start..end {
            let loc = &inner.locs[(index - first) as usize];
            if let Some(max) = max_bytes
                && !out.is_empty()
                && bytes + loc.frame_len as usize > max
            {
                break;
            }
            bytes += loc.frame_len as usize;
            if let Some(e) = inner.cache.get(&index) {
                out.push(e.clone());
                continue;
            }
            let seg = inner
                .segments
                .get(&loc.seg)
                .ok_or_else(|| corrupt(format!("log index {index}: segment {} missing", loc.seg)))?;
            let mut buf = vec![0u8; loc.frame_len as usize];
            self.shared
                .opts
                .faults
                .check(FaultOp::Read, loc.offset, buf.len() as u64)
                .and_then(|()| seg.file.read_exact_at(&mut buf, loc.offset))
                .map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", seg.path.display())))?;
            let (recs, _, err) = record::decode_log_records(&buf);
            let rec = match (recs.first(), err) {
                (Some(r), None) => r,
                (_, err) => {
                    return Err(corrupt(format!(
                        "{} offset {}: re-reading log index {index}: {}",
                        seg.path.display(),
                        loc.offset,
                        err.map_or_else(|| "no record".to_string(), |e: TailError| e.to_string())
                    )));
                }
            };
            let entry = record::decode_entry(rec.payload)?;
            if entry.log_id != loc.log_id {
                return Err(corrupt(format!(
                    "{}: log index {index} changed on disk",
                    seg.path.display()
                )));
            }
            out.push(entry);
        }
        Ok(out)
    }
}

impl Shared {
    fn active(inner: &Inner) -> u64 {
        inner.segments.keys().next_back().copied().unwrap_or(0)
    }

    fn cache_insert(&self, inner: &mut Inner, entry: Entry, size: usize) {
        inner.cache_bytes += size;
        inner.cache.insert(entry.log_id.index, entry);
        while inner.cache_bytes > self.opts.cache_bytes {
            let Some((index, _)) = inner.cache.pop_first() else {
                break;
            };
            let first = inner.first_index;
            let freed = index
                .checked_sub(first)
                .and_then(|i| inner.locs.get(i as usize))
                .map_or(0, |l| l.frame_len as usize);
            inner.cache_bytes = inner.cache_bytes.saturating_sub(freed);
            if inner.cache.is_empty() {
                inner.cache_bytes = 0;
            }
        }
    }

    fn cache_recount(inner: &mut Inner) {
        let first = inner.first_index;
        inner.cache_bytes = inner
            .cache
            .keys()
            .filter_map(|i| i.checked_sub(first).and_then(|i| inner.locs.get(i as usize)))
            .map(|l| l.frame_len as usize)
            .sum();
    }

    /// Start a new active segment after the current one; queues the directory sync. The old
    /// segment is cut to its records (its preallocated zeros go) and synced first, so only the
    /// last segment can ever have a torn tail.
    fn rotate(&self, inner: &mut Inner) -> io::Result<()> {
        let old = Self::active(inner);
        if let Some(seg) = inner.segments.get_mut(&old) {
            if seg.alloc > seg.len {
                seg.file.set_len(seg.len)?;
                seg.alloc = seg.len;
            }
            self.ctl.fsyncs.fetch_add(1, Ordering::Relaxed);
            seg.file.sync_data()?;
        }
        let id = old + 1;
        let path = segment_path(&self.dir, id);
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
        inner.segments.insert(
            id,
            Segment {
                path,
                file: Arc::new(file),
                len: 0,
                alloc: 0,
                last_index: None,
            },
        );
        lock(&self.ctl.queue).sync_dir = true;
        Ok(())
    }

    fn append_entries(&self, inner: &mut Inner, entries: Vec<Entry>) -> io::Result<Option<u64>> {
        let mut buf = Vec::new();
        let mut pending: Vec<(Entry, u64, u32)> = Vec::new(); // entry, offset in segment, frame len
        let mut last = None;
        let mut next = inner.locs.back().map(|l| l.log_id.index + 1);
        for entry in entries {
            let index = entry.log_id.index;
            match next {
                Some(n) if n != index => {
                    return Err(io::Error::other(format!("append of log index {index}, expected {n}")));
                }
                None if Some(index) <= inner.last_purged.as_ref().map(|l| l.index) => {
                    return Err(io::Error::other(format!("append of purged log index {index}")));
                }
                _ => {}
            }
            next = Some(index + 1);
            let start = buf.len();
            record::encode_entry(&entry, &mut buf)?;
            let frame = (buf.len() - start) as u32;
            let active = Self::active(inner);
            let seg_len = inner.segments.get(&active).map_or(0, |s| s.len);
            if seg_len + start as u64 > 0 && seg_len + buf.len() as u64 > self.opts.segment_bytes {
                // Flush what belongs to the current segment, then rotate.
                self.write_to_active(inner, &buf[..start], &mut pending)?;
                let tail = buf.split_off(start);
                buf = tail;
                self.rotate(inner)?;
            }
            let seg_len = inner.segments.get(&Self::active(inner)).map_or(0, |s| s.len);
            let off_in_buf = buf.len() as u64 - frame as u64;
            pending.push((entry, seg_len + off_in_buf, frame));
            last = Some(index);
        }
        self.write_to_active(inner, &buf, &mut pending)?;
        Ok(last)
    }

    /// Write `bytes` at the end of the active segment and index the `pending` entries it holds.
    fn write_to_active(&self, inner: &mut Inner, bytes: &[u8], pending: &mut Vec<(Entry, u64, u32)>) -> io::Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let active = Self::active(inner);
        let seg = inner
            .segments
            .get_mut(&active)
            .ok_or_else(|| io::Error::other("no active segment"))?;
        self.opts
            .faults
            .check(FaultOp::Write, seg.len, bytes.len() as u64)
            .and_then(|()| seg.file.write_all_at(bytes, seg.len))
            .map_err(|e| io::Error::new(e.kind(), format!("writing {}: {e}", seg.path.display())))?;
        seg.len += bytes.len() as u64;
        let step = match self.opts.fsync {
            FsyncPolicy::OnFlush => 0,
            FsyncPolicy::Always | FsyncPolicy::Batch => self.opts.prealloc_bytes.min(DEFAULT_PREALLOC_BYTES),
        };
        if step > 0 && seg.len >= seg.alloc {
            let end = ((seg.len / step + 1) * step).min(self.opts.segment_bytes);
            let from = seg.len.max(seg.alloc);
            if end > from {
                let zeros = &ZEROS[..(end - from) as usize];
                self.opts
                    .faults
                    .check(FaultOp::Write, from, zeros.len() as u64)
                    .and_then(|()| seg.file.write_all_at(zeros, from))
                    .map_err(|e| io::Error::new(e.kind(), format!("preallocating {}: {e}", seg.path.display())))?;
                seg.alloc = end;
            }
        }
        seg.alloc = seg.alloc.max(seg.len);
        let file = seg.file.clone();
        for (entry, offset, frame_len) in pending.drain(..) {
            let index = entry.log_id.index;
            if let Some(seg) = inner.segments.get_mut(&active) {
                seg.last_index = Some(index);
            }
            if inner.locs.is_empty() {
                inner.first_index = index;
            }
            inner.locs.push_back(Loc {
                seg: active,
                offset,
                frame_len,
                log_id: entry.log_id,
            });
            self.cache_insert(inner, entry, frame_len as usize);
        }
        let mut q = lock(&self.ctl.queue);
        if q.files.is_empty() {
            q.files_since = Some(Instant::now());
            if self.ctl.lazy.is_some() {
                // The flusher learns when to sync these in the background (the other policies
                // wake it with their callbacks).
                self.ctl.cv.notify_one();
            }
        }
        if !q.files.iter().any(|f| Arc::ptr_eq(f, &file)) {
            q.files.push(file);
        }
        q.written_index = inner.locs.back().map(|l| l.log_id.index);
        Ok(())
    }

    fn truncate_after(&self, inner: &mut Inner, keep: Option<u64>) -> io::Result<()> {
        let first = inner.first_index;
        let cut = match keep {
            Some(k) => k + 1,
            None => 0,
        }
        .max(first);
        let Some(loc) = inner.locs.get((cut - first) as usize).cloned() else {
            return Ok(()); // nothing after `keep`
        };
        // Earlier appends first, so the truncation never reorders with them.
        self.ctl.round();
        let later: Vec<u64> = inner.segments.range(loc.seg + 1..).map(|(id, _)| *id).collect();
        // Highest first: a crash part way leaves a consistent (longer) prefix of the old log.
        for id in later.iter().rev() {
            if let Some(seg) = inner.segments.remove(id) {
                fs::remove_file(&seg.path)?;
            }
        }
        let seg = inner
            .segments
            .get_mut(&loc.seg)
            .ok_or_else(|| corrupt(format!("segment {} missing", loc.seg)))?;
        // Cut, zeros included: stale records past the end must never be readable again.
        seg.file.set_len(loc.offset)?;
        seg.file.sync_all()?;
        seg.len = loc.offset;
        seg.alloc = loc.offset;
        inner.locs.truncate((cut - first) as usize);
        if let Some(seg) = inner.segments.get_mut(&loc.seg) {
            // Records left in the segment (live or purged) end just below the cut.
            seg.last_index = if loc.offset == 0 { None } else { Some(cut - 1) };
        }
        if !later.is_empty() {
            fsync_dir(&self.dir)?;
        }
        inner.cache.retain(|i, _| *i < cut);
        Shared::cache_recount(inner);
        let mut q = lock(&self.ctl.queue);
        let last = inner.locs.back().map(|l| l.log_id.index);
        q.written_index = last;
        q.durable_index = q.durable_index.min(last);
        // Files of deleted segments may still sit in the queue; syncing them is harmless.
        Ok(())
    }

    fn purge(&self, inner: &mut Inner, log_id: LogId) -> io::Result<()> {
        if inner.last_purged.as_ref().is_some_and(|p| p.index >= log_id.index) {
            return Ok(());
        }
        self.ctl.round();
        write_atomic(&self.dir, PURGED_FILE, &framed(&LogIdRecord::from(&log_id)), true)?;
        let upto = log_id.index;
        while inner.locs.front().is_some_and(|l| l.log_id.index <= upto) {
            inner.locs.pop_front();
        }
        inner.first_index = inner.locs.front().map_or(upto + 1, |l| l.log_id.index);
        inner.last_purged = Some(log_id);
        inner.cache.retain(|i, _| *i > upto);
        Shared::cache_recount(inner);
        // The whole log is purged: start a fresh active segment so the old one can go too.
        let active = Self::active(inner);
        if inner.locs.is_empty() && inner.segments.get(&active).is_some_and(|s| s.len > 0) {
            self.rotate(inner)?;
        }
        let active = Self::active(inner);
        let dead: Vec<u64> = inner
            .segments
            .iter()
            .filter(|(id, s)| **id != active && s.last_index.is_none_or(|l| l <= upto))
            .map(|(id, _)| *id)
            .collect();
        for id in &dead {
            if let Some(seg) = inner.segments.remove(id) {
                fs::remove_file(&seg.path)?;
            }
        }
        if !dead.is_empty() {
            fsync_dir(&self.dir)?;
        }
        Ok(())
    }
}

impl RaftLogReader<C> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(s) => *s,
            Bound::Excluded(s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(e) => e.saturating_add(1),
            Bound::Excluded(e) => *e,
            Bound::Unbounded => u64::MAX,
        };
        self.read_range(start, end, None)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(lock(&self.shared.inner).vote)
    }

    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> Result<Vec<Entry>, io::Error> {
        self.read_range(start, end, Some(self.shared.opts.max_read_bytes))
    }
}

impl RaftLogStorage<C> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<C>, io::Error> {
        let inner = lock(&self.shared.inner);
        self.check_failed(&inner)?;
        let last_purged_log_id = inner.last_purged;
        let last_log_id = inner.locs.back().map(|l| l.log_id).or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let vote = *vote;
        self.off_runtime(move |this| {
            this.mutate("save_vote", |shared, inner| {
                // Appends issued before this vote become durable first (ordered I/O).
                shared.ctl.round();
                write_atomic(&shared.dir, VOTE_FILE, &framed(&VoteRecord::from(&vote)), true)?;
                inner.vote = Some(vote);
                Ok(())
            })?;
            this.check_flush_error()
        })
        .await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        let mut inner = lock(&self.shared.inner);
        inner.committed = committed;
        if let Some(c) = committed {
            let mut q = lock(&self.shared.ctl.queue);
            // The flusher already waits for a pending hint's turn; only a first one wakes it.
            if q.pending_committed.replace(c).is_none() {
                self.shared.ctl.cv.notify_one();
            }
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(lock(&self.shared.inner).committed)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<C>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let needs_sync = entries.iter().any(|e| {
            matches!(
                &e.payload,
                openraft::EntryPayload::Membership(_) | openraft::EntryPayload::Normal(super::types::Request::Flush)
            )
        });
        self.mutate("append", |shared, inner| shared.append_entries(inner, entries))?;
        if self.shared.opts.fsync == FsyncPolicy::OnFlush && !needs_sync {
            let q = lock(&self.shared.ctl.queue);
            if let Some(e) = q.error.clone() {
                drop(q);
                callback.io_completed(Err(io::Error::other(e.clone())));
                return Err(io::Error::other(e));
            }
            if q.waiters.is_empty() {
                drop(q);
                callback.io_completed(Ok(()));
                return Ok(());
            }
        }
        match self.shared.opts.fsync {
            FsyncPolicy::Always => {
                self.off_runtime(move |this| {
                    this.shared.ctl.round();
                    let r = this.check_flush_error();
                    callback.io_completed(match &r {
                        Ok(()) => Ok(()),
                        Err(e) => Err(io::Error::other(e.to_string())),
                    });
                    r
                })
                .await
            }
            FsyncPolicy::Batch | FsyncPolicy::OnFlush => {
                let mut q = lock(&self.shared.ctl.queue);
                if let Some(e) = q.error.clone() {
                    drop(q);
                    callback.io_completed(Err(io::Error::other(e.clone())));
                    return Err(io::Error::other(e));
                }
                q.waiters.push(callback);
                drop(q);
                self.shared.ctl.cv.notify_one();
                Ok(())
            }
        }
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let keep = last_log_id.map(|l| l.index);
        self.off_runtime(move |this| this.mutate("truncate_after", |shared, inner| shared.truncate_after(inner, keep)))
            .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        self.off_runtime(move |this| this.mutate("purge", |shared, inner| shared.purge(inner, log_id)))
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use futures_util::StreamExt;
    use openraft::alias::{SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
    use openraft::entry::RaftEntry;
    use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
    use openraft::testing::log::{StoreBuilder, Suite};
    use openraft::type_config::TypeConfigExt;
    use openraft::vote::RaftLeaderId;
    use openraft::{BasicNode, Membership, StorageError};
    use tempfile::TempDir;

    use super::*;
    use crate::raft::types::{Request, Response};

    /// Minimal in-memory state machine, only for openraft's storage conformance suite.
    #[derive(Clone, Default)]
    struct MemSm {
        last_applied: Option<LogId>,
        membership: StoredMembershipOf<C>,
        snapshot: Option<(SnapshotMetaOf<C>, Vec<u8>)>,
    }

    impl RaftSnapshotBuilder<C> for MemSm {
        type SnapshotData = Vec<u8>;

        async fn build_snapshot(&mut self) -> Result<SnapshotOf<C, Vec<u8>>, io::Error> {
            Ok(SnapshotOf::<C, Vec<u8>> {
                meta: SnapshotMetaOf::<C> {
                    last_log_id: self.last_applied,
                    last_membership: self.membership.clone(),
                },
                snapshot: Vec::new(),
            })
        }
    }

    /// The suite's state machine shares its snapshot slot with the builders it hands out.
    #[derive(Clone, Default)]
    struct SharedSm(Arc<Mutex<MemSm>>);

    impl RaftSnapshotBuilder<C> for SharedSm {
        type SnapshotData = Vec<u8>;

        async fn build_snapshot(&mut self) -> Result<SnapshotOf<C, Vec<u8>>, io::Error> {
            let mut sm = lock(&self.0).clone();
            let snap = sm.build_snapshot().await?;
            lock(&self.0).snapshot = Some((snap.meta.clone(), Vec::new()));
            Ok(snap)
        }
    }

    impl RaftStateMachine<C> for SharedSm {
        type SnapshotData = Vec<u8>;
        type SnapshotBuilder = SharedSm;

        async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembershipOf<C>), io::Error> {
            let sm = lock(&self.0);
            Ok((sm.last_applied, sm.membership.clone()))
        }

        async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
        where
            Strm: futures_util::Stream<Item = Result<EntryResponder<C>, io::Error>> + Unpin + OptionalSend,
        {
            while let Some(item) = entries.next().await {
                let (entry, responder) = item?;
                {
                    let mut sm = lock(&self.0);
                    sm.last_applied = Some(entry.log_id);
                    if let openraft::EntryPayload::Membership(m) = &entry.payload {
                        sm.membership = StoredMembershipOf::<C>::new(Some(entry.log_id), m.clone());
                    }
                }
                if let Some(r) = responder {
                    r.send(Response {
                        applied_index: entry.log_id.index,
                        ..Default::default()
                    });
                }
            }
            Ok(())
        }

        async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
            self.clone()
        }

        async fn install_snapshot(&mut self, meta: &SnapshotMetaOf<C>, _snapshot: Vec<u8>) -> Result<(), io::Error> {
            let mut sm = lock(&self.0);
            sm.last_applied = meta.last_log_id;
            sm.membership = meta.last_membership.clone();
            sm.snapshot = Some((meta.clone(), Vec::new()));
            Ok(())
        }

        async fn get_current_snapshot(&mut self) -> Result<Option<SnapshotOf<C, Vec<u8>>>, io::Error> {
            Ok(lock(&self.0)
                .snapshot
                .clone()
                .map(|(meta, snapshot)| SnapshotOf::<C, Vec<u8>> { meta, snapshot }))
        }
    }

    struct Builder(FsyncPolicy);

    impl StoreBuilder<C, LogStore, SharedSm, TempDir> for Builder {
        async fn build(&self) -> Result<(TempDir, LogStore, SharedSm), StorageError<C>> {
            let dir = TempDir::new().map_err(|e| StorageError::write(C::err_from_error(&e)))?;
            let store =
                LogStore::open(dir.path(), opts(self.0)).map_err(|e| StorageError::write(C::err_from_error(&e)))?;
            Ok((dir, store, SharedSm::default()))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn openraft_storage_conformance_suite_batch() {
        Suite::test_all(Builder(FsyncPolicy::Batch)).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn openraft_storage_conformance_suite_always() {
        Suite::test_all(Builder(FsyncPolicy::Always)).await.unwrap();
    }

    #[tokio::test]
    async fn missing_middle_segment_fails_open() {
        let dir = TempDir::new().unwrap();
        let o = LogStoreOptions {
            segment_bytes: 8 * 1024,
            ..opts(FsyncPolicy::Batch)
        };
        {
            let mut s = LogStore::open(dir.path(), o.clone()).unwrap();
            append_durable(&mut s, (0..12).map(|i| write_entry(1, i, 4096)).collect())
                .await
                .unwrap();
        }
        let segs = seg_files(dir.path());
        assert!(segs.len() >= 4);
        fs::remove_file(&segs[1]).unwrap();
        let err = LogStore::open(dir.path(), o).err().unwrap();
        assert!(err.to_string().contains("follows"), "{err}");
    }

    fn lid(term: u64, index: u64) -> LogId {
        LogId::new(openraft::impls::leader_id_adv::LeaderId::new(term, 1), index)
    }

    fn write_entry(term: u64, index: u64, len: usize) -> Entry {
        let data = Bytes::from(vec![(index % 251) as u8; len]);
        Entry::new_normal(
            lid(term, index),
            Request::Write {
                offset_bytes: index * 4096,
                data,
                origin: 0,
            },
        )
    }

    fn opts(fsync: FsyncPolicy) -> LogStoreOptions {
        LogStoreOptions {
            fsync,
            ..Default::default()
        }
    }

    /// Append and wait until the callback reports durability.
    async fn append_durable(store: &mut LogStore, entries: Vec<Entry>) -> io::Result<()> {
        let (tx, rx) = C::oneshot();
        store.append(entries, IOFlushed::signal(tx)).await?;
        rx.await.map_err(|e| io::Error::other(e.to_string()))?
    }

    async fn all_entries(store: &mut LogStore) -> Vec<Entry> {
        store.try_get_log_entries(..).await.unwrap()
    }

    fn seg_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "seg"))
            .collect();
        v.sort();
        v
    }

    /// DESIGN.md invariant 7 through the fault switch: an armed fdatasync ENOSPC fails the
    /// append's durability callback and every later call (sticky); an armed write EIO fails the
    /// append itself. Nothing fails before the switch is armed or after `after_ops` successes.
    #[tokio::test]
    async fn armed_faults_fail_the_log_and_stay_failed() {
        use raftsan_target::backing::{Fault, FaultOp};
        for (op, errno) in [(FaultOp::Flush, libc::ENOSPC), (FaultOp::Write, libc::EIO)] {
            let dir = TempDir::new().unwrap();
            let o = opts(FsyncPolicy::Batch);
            let faults = o.faults.clone();
            let mut store = LogStore::open(dir.path(), o).unwrap();
            append_durable(&mut store, vec![write_entry(1, 1, 100)]).await.unwrap();
            faults.inject(Fault {
                op,
                after_ops: 1,
                range: None,
                errno,
            });
            append_durable(&mut store, vec![write_entry(1, 2, 100)]).await.unwrap();
            let e = append_durable(&mut store, vec![write_entry(1, 3, 100)])
                .await
                .unwrap_err();
            assert!(
                e.to_string().contains(&io::Error::from_raw_os_error(errno).to_string()),
                "{e}"
            );
            faults.clear();
            assert!(append_durable(&mut store, vec![write_entry(1, 4, 100)]).await.is_err());
        }
    }

    /// Raft §5.1 / Figure 2: currentTerm, votedFor and log[] are persistent state, updated on
    /// stable storage before responding; they must all come back after a restart.
    #[tokio::test]
    async fn reopen_shows_same_entries_vote_and_committed() {
        let dir = TempDir::new().unwrap();
        let membership = Membership::new(
            vec![BTreeSet::from([1, 2, 3])],
            BTreeMap::from([
                (1, BasicNode::new("a")),
                (2, BasicNode::new("b")),
                (3, BasicNode::new("c")),
            ]),
        )
        .unwrap();
        let mut entries = vec![
            Entry::new_blank(lid(1, 0)),
            Entry::new_membership(lid(1, 1), membership),
        ];
        entries.extend((2..20).map(|i| write_entry(1, i, 4096)));
        entries.push(Entry::new_normal(
            lid(2, 20),
            Request::Unmap {
                offset_bytes: 0,
                len_bytes: 1 << 20,
                origin: 0,
            },
        ));
        entries.push(Entry::new_normal(lid(2, 21), Request::Flush));
        let vote = Vote::new_committed(2, 1);
        {
            let mut s = LogStore::open(dir.path(), opts(FsyncPolicy::Batch)).unwrap();
            append_durable(&mut s, entries.clone()).await.unwrap();
            s.save_vote(&vote).await.unwrap();
            s.save_committed(Some(lid(2, 21))).await.unwrap();
            s.sync().unwrap();
            // The committed hint is written by the flusher once the log covers it.
            let deadline = Instant::now() + Duration::from_secs(5);
            while !dir.path().join(COMMITTED_FILE).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let mut s = LogStore::open(dir.path(), opts(FsyncPolicy::Batch)).unwrap();
        assert_eq!(all_entries(&mut s).await, entries);
        assert_eq!(s.read_vote().await.unwrap(), Some(vote));
        assert_eq!(s.read_committed().await.unwrap(), Some(lid(2, 21)));
        let st = s.get_log_state().await.unwrap();
        assert_eq!((st.last_purged_log_id, st.last_log_id), (None, Some(lid(2, 21))));
        // Entries read back from disk (cache is empty after reopen) equal the cached ones.
        assert_eq!(s.try_get_log_entries(5..7).await.unwrap(), entries[5..7].to_vec());
        // Appending continues after the reopened tail.
        append_durable(&mut s, vec![write_entry(2, 22, 10)]).await.unwrap();
        assert_eq!(s.get_log_state().await.unwrap().last_log_id, Some(lid(2, 22)));
    }

    /// A crash part way through an append leaves a torn last record; its callback never fired,
    /// so dropping it loses nothing acknowledged (openraft io_ordering: durable before callback).
    #[tokio::test]
    async fn torn_tail_is_truncated_to_the_complete_prefix() {
        let src = TempDir::new().unwrap();
        let entries: Vec<Entry> = (0..5).map(|i| write_entry(1, i, 300)).collect();
        {
            let mut s = LogStore::open(src.path(), opts(FsyncPolicy::Always)).unwrap();
            append_durable(&mut s, entries.clone()).await.unwrap();
        }
        let seg = seg_files(src.path()).remove(0);
        let full = fs::read(&seg).unwrap();
        let (recs, _, _) = record::decode_records(&full);
        let last_start = recs[4].offset;
        // Every cut inside the last record, and each followed by zeros (a record torn inside the
        // preallocated area).
        let full = &full[..recs[4].offset + recs[4].frame_len()];
        let mut cases: Vec<Vec<u8>> = (last_start + 1..full.len()).map(|cut| full[..cut].to_vec()).collect();
        for cut in last_start + 1..full.len() {
            let mut b = full[..cut].to_vec();
            b.resize(full.len() + 4096, 0);
            cases.push(b);
        }
        for (n, bytes) in cases.iter().enumerate() {
            let dir = TempDir::new().unwrap();
            let path = dir.path().join(seg.file_name().unwrap());
            fs::write(&path, bytes).unwrap();
            let mut s = LogStore::open(dir.path(), LogStoreOptions::default()).unwrap();
            assert_eq!(all_entries(&mut s).await, entries[..4].to_vec(), "case {n}");
            assert_eq!(fs::metadata(&path).unwrap().len(), last_start as u64, "case {n}");
            // The repaired log accepts the lost index again.
            append_durable(&mut s, vec![entries[4].clone()]).await.unwrap();
            drop(s);
            let mut s = LogStore::open(dir.path(), LogStoreOptions::default()).unwrap();
            assert_eq!(all_entries(&mut s).await, entries, "case {n} after re-append");
        }
    }

    /// Appends overwrite zeros written ahead of them; zeros after the last record are the normal
    /// end of the log on open (not a torn tail: nothing is cut), later appends go after the last
    /// record, and a rotated segment keeps only its records.
    #[tokio::test]
    async fn preallocated_zeros_are_the_end_of_the_log_and_appends_overwrite_them() {
        let dir = TempDir::new().unwrap();
        let o = LogStoreOptions {
            segment_bytes: 64 * 1024,
            prealloc_bytes: 16 * 1024,
            ..opts(FsyncPolicy::Batch)
        };
        let entries: Vec<Entry> = (0..30).map(|i| write_entry(1, i, 3000)).collect();
        let records_len = |path: &Path| {
            let b = fs::read(path).unwrap();
            let (recs, valid, _) = record::decode_records(&b);
            assert!(
                b[valid..].iter().all(|&x| x == 0),
                "{}: only zeros after the records",
                path.display()
            );
            (recs.len(), valid as u64, b.len() as u64)
        };
        {
            let mut s = LogStore::open(dir.path(), o.clone()).unwrap();
            append_durable(&mut s, entries[..3].to_vec()).await.unwrap();
        }
        let seg = seg_files(dir.path()).remove(0);
        let (n, valid, file_len) = records_len(&seg);
        assert_eq!(
            (n, file_len),
            (3, 16 * 1024),
            "three records, then zeros to the first step"
        );
        assert!(valid < file_len);
        let s = LogStore::open(dir.path(), o.clone()).unwrap();
        assert_eq!(s.record_bytes(), valid, "zeros are not records");
        drop(s);
        for round in 1..=3 {
            // Reopen: same entries, file untouched, and the next append lands after the records.
            let before = fs::metadata(&seg).unwrap().len();
            let mut s = LogStore::open(dir.path(), o.clone()).unwrap();
            assert_eq!(
                fs::metadata(&seg).unwrap().len(),
                before,
                "round {round}: zeros kept on open"
            );
            assert_eq!(
                all_entries(&mut s).await,
                entries[..3 * round].to_vec(),
                "round {round}"
            );
            append_durable(&mut s, entries[3 * round..3 * round + 3].to_vec())
                .await
                .unwrap();
        }
        let mut s = LogStore::open(dir.path(), o.clone()).unwrap();
        assert_eq!(all_entries(&mut s).await, entries[..12].to_vec());
        let (n, _, file_len) = records_len(&seg);
        assert_eq!(n, 12);
        assert_eq!(file_len % (16 * 1024), 0);
        append_durable(&mut s, entries[12..].to_vec()).await.unwrap();
        let segs = seg_files(dir.path());
        assert!(segs.len() >= 2, "{segs:?}");
        for old in &segs[..segs.len() - 1] {
            let (_, valid, file_len) = records_len(old);
            assert_eq!(
                valid,
                file_len,
                "{}: a rotated segment keeps only its records",
                old.display()
            );
        }
        drop(s);
        let mut s = LogStore::open(dir.path(), o.clone()).unwrap();
        assert_eq!(all_entries(&mut s).await, entries);
        // Truncation cuts the zeros too, and what it removed stays gone after a reopen.
        s.truncate_after(Some(lid(1, 27))).await.unwrap();
        drop(s);
        let mut s = LogStore::open(dir.path(), o).unwrap();
        assert_eq!(all_entries(&mut s).await, entries[..28].to_vec());
    }

    /// A durable log of five 300-byte entries in one segment, with `damage` done to the bytes
    /// of its segment file (given the offset and frame length of the third record): the store's
    /// directory, the segment's path and the bytes now in it.
    async fn log_with_damaged_third_record(
        damage: impl FnOnce(&mut [u8], usize, usize),
    ) -> (TempDir, PathBuf, Vec<u8>) {
        let dir = TempDir::new().unwrap();
        {
            let mut s = LogStore::open(dir.path(), opts(FsyncPolicy::Always)).unwrap();
            append_durable(&mut s, (0..5).map(|i| write_entry(1, i, 300)).collect())
                .await
                .unwrap();
        }
        let seg = seg_files(dir.path()).remove(0);
        let mut bytes = fs::read(&seg).unwrap();
        let (offset, frame_len) = {
            let (recs, _, _) = record::decode_records(&bytes);
            (recs[2].offset, recs[2].frame_len())
        };
        damage(&mut bytes, offset, frame_len);
        fs::write(&seg, &bytes).unwrap();
        (dir, seg, bytes)
    }

    /// A record after a run of zeros is damage, not the end of the log.
    #[tokio::test]
    async fn a_record_after_zeros_fails_open() {
        let (dir, seg, bytes) = log_with_damaged_third_record(|b, at, len| b[at..at + len].fill(0)).await;
        let err = LogStore::open(dir.path(), LogStoreOptions::default()).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("corrupt log record"), "{err}");
        assert_eq!(fs::read(&seg).unwrap(), bytes, "nothing is silently repaired");
    }

    /// DESIGN.md invariant 7: corruption that is not a torn tail is a storage error, never hidden.
    #[tokio::test]
    async fn corrupt_middle_record_fails_open() {
        let (dir, seg, bytes) = log_with_damaged_third_record(|b, at, _| b[at + record::HEADER_LEN + 10] ^= 0x40).await;
        let err = LogStore::open(dir.path(), LogStoreOptions::default()).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let msg = err.to_string();
        assert!(msg.contains("corrupt log record") && msg.contains("crc32c"), "{msg}");
        // The file is left as it was: nothing is silently repaired.
        assert_eq!(fs::read(&seg).unwrap(), bytes);
    }

    #[tokio::test]
    async fn corrupt_vote_fails_open() {
        let dir = TempDir::new().unwrap();
        {
            let mut s = LogStore::open(dir.path(), LogStoreOptions::default()).unwrap();
            s.save_vote(&Vote::new(3, 1)).await.unwrap();
        }
        let path = dir.path().join(VOTE_FILE);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, bytes).unwrap();
        assert!(LogStore::open(dir.path(), LogStoreOptions::default()).is_err());
    }

    /// Raft §7: entries covered by a snapshot are discarded, so disk use stays bounded.
    #[tokio::test]
    async fn segments_rotate_and_purge_deletes_them_across_reopen() {
        let dir = TempDir::new().unwrap();
        let o = LogStoreOptions {
            segment_bytes: 16 * 1024,
            ..opts(FsyncPolicy::Batch)
        };
        let entries: Vec<Entry> = (0..40).map(|i| write_entry(1, i, 4096)).collect();
        let mut s = LogStore::open(dir.path(), o.clone()).unwrap();
        for chunk in entries.chunks(7) {
            append_durable(&mut s, chunk.to_vec()).await.unwrap();
        }
        let before = seg_files(dir.path()).len();
        assert!(before >= 10, "{before} segments");
        assert_eq!(s.segment_count(), before);
        s.purge(lid(1, 25)).await.unwrap();
        let after = seg_files(dir.path()).len();
        assert!(after < before && after >= 4, "{before} -> {after}");
        assert_eq!(all_entries(&mut s).await, entries[26..].to_vec());
        drop(s);
        let mut s = LogStore::open(dir.path(), o.clone()).unwrap();
        let st = s.get_log_state().await.unwrap();
        assert_eq!(
            (st.last_purged_log_id, st.last_log_id),
            (Some(lid(1, 25)), Some(lid(1, 39)))
        );
        assert_eq!(all_entries(&mut s).await, entries[26..].to_vec());
        assert!(s.try_get_log_entries(0..26).await.unwrap().is_empty());
        // Purging past the end (after a snapshot install) leaves one empty segment.
        s.purge(lid(3, 100)).await.unwrap();
        assert_eq!(seg_files(dir.path()).len(), 1);
        drop(s);
        let mut s = LogStore::open(dir.path(), o).unwrap();
        let st = s.get_log_state().await.unwrap();
        assert_eq!(
            (st.last_purged_log_id, st.last_log_id),
            (Some(lid(3, 100)), Some(lid(3, 100)))
        );
        append_durable(&mut s, vec![write_entry(3, 101, 10)]).await.unwrap();
        assert_eq!(all_entries(&mut s).await, vec![write_entry(3, 101, 10)]);
    }

    /// Raft §5.3: a follower deletes a conflicting entry and all that follow it, then appends the
    /// leader's entries; the result must survive a restart.
    #[tokio::test]
    async fn truncate_after_across_segments_survives_reopen() {
        let dir = TempDir::new().unwrap();
        let o = LogStoreOptions {
            segment_bytes: 16 * 1024,
            ..opts(FsyncPolicy::Batch)
        };
        let entries: Vec<Entry> = (0..30).map(|i| write_entry(1, i, 4096)).collect();
        let mut s = LogStore::open(dir.path(), o.clone()).unwrap();
        append_durable(&mut s, entries.clone()).await.unwrap();
        s.truncate_after(Some(lid(1, 9))).await.unwrap();
        assert_eq!(all_entries(&mut s).await, entries[..10].to_vec());
        let replaced: Vec<Entry> = (10..15).map(|i| write_entry(2, i, 100)).collect();
        append_durable(&mut s, replaced.clone()).await.unwrap();
        drop(s);
        let mut s = LogStore::open(dir.path(), o).unwrap();
        let mut expect = entries[..10].to_vec();
        expect.extend(replaced);
        assert_eq!(all_entries(&mut s).await, expect);
        s.truncate_after(None).await.unwrap();
        assert!(all_entries(&mut s).await.is_empty());
        assert_eq!(s.get_log_state().await.unwrap().last_log_id, None);
    }

    #[tokio::test]
    async fn limited_get_caps_bytes_but_never_returns_nothing() {
        let dir = TempDir::new().unwrap();
        let o = LogStoreOptions {
            max_read_bytes: 64 * 1024,
            ..Default::default()
        };
        let mut s = LogStore::open(dir.path(), o).unwrap();
        append_durable(&mut s, (0..40).map(|i| write_entry(1, i, 4096)).collect())
            .await
            .unwrap();
        // Each record is 4096 data bytes plus ~30 bytes of framing and prost encoding.
        let got = s.limited_get_log_entries(0, 40).await.unwrap();
        assert_eq!(got.len(), 15);
        append_durable(&mut s, vec![write_entry(1, 40, 200 * 1024)])
            .await
            .unwrap();
        let got = s.limited_get_log_entries(40, 41).await.unwrap();
        assert_eq!(got.len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn openraft_storage_conformance_suite_on_flush() {
        Suite::test_all(Builder(FsyncPolicy::OnFlush)).await.unwrap();
    }

    #[tokio::test]
    async fn on_flush_syncs_only_for_flush_entries() {
        let dir = TempDir::new().unwrap();
        let mut s = LogStore::open(dir.path(), opts(FsyncPolicy::OnFlush)).unwrap();
        s.sync().unwrap();
        let base = s.fsync_count();
        for i in 1..=10 {
            append_durable(&mut s, vec![write_entry(1, i, 4096)]).await.unwrap();
        }
        assert_eq!(s.fsync_count(), base, "plain writes must not fsync under on-flush");
        append_durable(&mut s, vec![Entry::new_normal(lid(1, 11), Request::Flush)])
            .await
            .unwrap();
        assert!(
            s.fsync_count() > base,
            "a flush entry must be durable before its callback"
        );
        assert_eq!(all_entries(&mut s).await.len(), 11);
    }

    #[tokio::test]
    async fn on_flush_syncs_written_segments_in_the_background_once_they_waited() {
        let dir = TempDir::new().unwrap();
        let o = |wait| LogStoreOptions {
            background_sync: wait,
            ..opts(FsyncPolicy::OnFlush)
        };
        {
            // Appends never wait, and while the written segment waits nothing is synced.
            let mut s = LogStore::open(dir.path(), o(Duration::from_secs(3600))).unwrap();
            s.sync().unwrap();
            let base = s.fsync_count();
            for i in 0..20 {
                append_durable(&mut s, vec![write_entry(1, i, 4096)]).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(s.fsync_count(), base, "no sync before the segment waited its time");
            // No zeros are written ahead under on-flush.
            let seg = seg_files(dir.path()).remove(0);
            assert_eq!(fs::metadata(&seg).unwrap().len(), s.record_bytes());
        }
        // Reopened: every entry is there (from the page cache or the disk alike).
        let mut s = LogStore::open(dir.path(), o(Duration::from_millis(100))).unwrap();
        assert_eq!(all_entries(&mut s).await.len(), 20);
        let base = s.fsync_count();
        let t0 = Instant::now();
        append_durable(&mut s, vec![write_entry(1, 20, 4096)]).await.unwrap();
        while s.fsync_count() == base {
            assert!(t0.elapsed() < Duration::from_secs(10), "written segment never synced");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            t0.elapsed() >= Duration::from_millis(100),
            "synced before it waited: {:?}",
            t0.elapsed()
        );
        // Once synced, nothing waits: no further round.
        let after = s.fsync_count();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(s.fsync_count(), after);
    }

    #[tokio::test]
    async fn group_commit_fires_every_callback_with_fewer_fsyncs() {
        let dir = TempDir::new().unwrap();
        let mut s = LogStore::open(dir.path(), opts(FsyncPolicy::Batch)).unwrap();
        s.sync().unwrap();
        let base = s.fsync_count();
        let mut rxs = Vec::new();
        let t0 = Instant::now();
        for i in 0..100 {
            let (tx, rx) = C::oneshot();
            s.append([write_entry(1, i, 4096)], IOFlushed::signal(tx))
                .await
                .unwrap();
            rxs.push(rx);
        }
        let mut done = 0;
        for rx in rxs {
            rx.await.unwrap().unwrap();
            done += 1;
        }
        let elapsed = t0.elapsed();
        let fsyncs = s.fsync_count() - base;
        println!("group commit: 100 appends of 4 KiB, {done} callbacks, {fsyncs} fsyncs, {elapsed:?}");
        assert_eq!(done, 100);
        assert!(fsyncs < 100, "{fsyncs} fsyncs");

        // Baseline: FsyncPolicy::Always syncs once per append.
        let dir = TempDir::new().unwrap();
        let mut s = LogStore::open(dir.path(), opts(FsyncPolicy::Always)).unwrap();
        s.sync().unwrap();
        let base = s.fsync_count();
        let t0 = Instant::now();
        for i in 0..100 {
            append_durable(&mut s, vec![write_entry(1, i, 4096)]).await.unwrap();
        }
        let elapsed = t0.elapsed();
        println!(
            "always: 100 appends of 4 KiB, {} fsyncs, {:?} per append+fsync",
            s.fsync_count() - base,
            elapsed / 100
        );
        assert_eq!(s.fsync_count() - base, 100);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append { n: usize, len: usize },
        Truncate { keep_pct: usize },
        Purge { upto_pct: usize },
        NewTerm,
        Reopen,
    }

    fn op_strategy() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (1usize..6, 0usize..1500).prop_map(|(n, len)| Op::Append { n, len }),
            1 => (0usize..100).prop_map(|keep_pct| Op::Truncate { keep_pct }),
            1 => (0usize..100).prop_map(|upto_pct| Op::Purge { upto_pct }),
            1 => Just(Op::NewTerm),
            1 => Just(Op::Reopen),
        ]
    }

    /// Apply `ops` to a store with tiny segments and to a plain vector, comparing after each step.
    async fn check_against_model(ops: Vec<Op>) {
        let dir = TempDir::new().unwrap();
        let o = LogStoreOptions {
            segment_bytes: 2048,
            cache_bytes: 3000,
            ..opts(FsyncPolicy::Batch)
        };
        let mut s = LogStore::open(dir.path(), o.clone()).unwrap();
        let mut model: Vec<Entry> = Vec::new();
        let mut purged: Option<LogId> = None;
        let mut term = 1;
        for op in ops {
            match op {
                Op::Append { n, len } => {
                    let next = model
                        .last()
                        .map(|e| e.log_id.index + 1)
                        .or(purged.map(|p| p.index + 1))
                        .unwrap_or(0);
                    let new: Vec<Entry> = (next..next + n as u64).map(|i| write_entry(term, i, len)).collect();
                    append_durable(&mut s, new.clone()).await.unwrap();
                    model.extend(new);
                }
                Op::Truncate { keep_pct } => {
                    let keep = model.len() * keep_pct / 100;
                    let after = if keep == 0 {
                        purged
                    } else {
                        Some(model[keep - 1].log_id)
                    };
                    s.truncate_after(after).await.unwrap();
                    model.truncate(keep);
                }
                Op::Purge { upto_pct } => {
                    if !model.is_empty() {
                        let upto = model.len() * upto_pct / 100;
                        let id = model[upto].log_id;
                        s.purge(id).await.unwrap();
                        model.drain(..=upto);
                        purged = Some(id);
                    }
                }
                Op::NewTerm => term += 1,
                Op::Reopen => {
                    drop(s);
                    s = LogStore::open(dir.path(), o.clone()).unwrap();
                }
            }
            assert_eq!(all_entries(&mut s).await, model);
            let st = s.get_log_state().await.unwrap();
            assert_eq!(st.last_purged_log_id, purged);
            assert_eq!(st.last_log_id, model.last().map(|e| e.log_id).or(purged));
        }
        drop(s);
        let mut s = LogStore::open(dir.path(), o).unwrap();
        assert_eq!(all_entries(&mut s).await, model);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        #[test]
        fn store_matches_model(ops in proptest::collection::vec(op_strategy(), 1..40)) {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(check_against_model(ops));
        }
    }

    #[tokio::test]
    async fn append_with_a_hole_is_an_error() {
        let dir = TempDir::new().unwrap();
        let mut s = LogStore::open(dir.path(), LogStoreOptions::default()).unwrap();
        append_durable(&mut s, vec![write_entry(1, 0, 1)]).await.unwrap();
        let (tx, _rx) = C::oneshot();
        assert!(s.append([write_entry(1, 2, 1)], IOFlushed::signal(tx)).await.is_err());
        // DESIGN.md invariant 7: the failure is sticky; the store is out of service.
        let (tx, _rx) = C::oneshot();
        let err = s
            .append([write_entry(1, 1, 1)], IOFlushed::signal(tx))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("failed earlier"), "{err}");
        assert!(s.get_log_state().await.is_err());
        assert!(s.save_vote(&Vote::new(1, 1)).await.is_err());
    }
}
