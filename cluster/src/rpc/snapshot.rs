//! Differential snapshot streaming.
//!
//! A snapshot is the group's file (a volume image) plus a small sidecar. The sender never holds
//! the file in memory and the receiver never overwrites its own file while the stream runs:
//!
//! 1. the sender opens the stream with `Begin` (vote, snapshot meta, file size, chunk size,
//!    sidecar);
//! 2. the receiver answers with the SHA-256 of each chunk of its current file (in batches), then
//!    `HashesEnd`;
//! 3. the sender reads its file chunk by chunk on the blocking pool and sends only the chunks whose
//!    hash differs (or that the receiver lacks), then `End`;
//! 4. the receiver appends those chunks to a journal (`raft/journal.rs`) in its staging
//!    directory, makes it durable, hands it to openraft (`install_full_snapshot`, which runs the
//!    state machine's `install_snapshot`) and answers `Done` with its vote.
//!
//! Every wait has an idle timeout ([`IDLE_TIMEOUT`]); there is no whole-transfer timeout. Both
//! sides record their progress in a [`SnapshotProgress`].

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use openraft::alias::{SnapshotMetaOf, SnapshotOf};
use openraft::errors::{NetworkError, ReplicationClosed, StreamingError, Unreachable};
use openraft::raft::SnapshotResponse;
use openraft::storage::RaftStateMachine;
use openraft::{Snapshot, SnapshotMeta};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::GroupRegistry;
use super::network::PeerNetwork;
use super::wire::{
    Vote, membership_from_bytes, membership_to_bytes, opt_log_id_from_pb, opt_log_id_to_pb, req_vote, vote_from_pb,
    vote_to_pb,
};
use crate::pb::raft as pb;
use crate::raft::journal::{self, JournalWriter};
use crate::raft::{GroupId, SnapshotData, TypeConfig};

/// Chunk size of a snapshot stream (the unit of comparison and transfer).
pub const CHUNK_BYTES: u32 = 1 << 20;
/// Longest wait for any single step of a transfer (a message, a chunk read, a hash).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Hashes per `ChunkHashes` message.
const HASH_BATCH: usize = 64;
/// Assumed lower bound of journal application speed, for the wait for `Done`.
const INSTALL_BYTES_PER_SEC: u64 = 50 << 20;

type Digest32 = [u8; 32];

/// Which way a snapshot flows, seen from this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SnapshotDirection {
    Sending { to: u64 },
    Receiving { from: u64 },
}

/// Progress of one snapshot transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotTransfer {
    pub group: GroupId,
    pub direction: SnapshotDirection,
    /// Bytes of the file covered so far (compared and skipped, or transferred).
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Chunks that travelled (sender: sent; receiver: received).
    pub chunks_sent: u64,
    /// Chunks that were identical on both sides and did not travel.
    pub chunks_skipped: u64,
    pub running: bool,
    /// Why the transfer failed, when it did.
    pub error: Option<String>,
}

impl fmt::Display for SnapshotTransfer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.direction {
            SnapshotDirection::Sending { to } => write!(f, "sending to node {to}")?,
            SnapshotDirection::Receiving { from } => write!(f, "receiving from node {from}")?,
        }
        write!(
            f,
            ": {}/{} bytes, {} chunks sent, {} skipped",
            self.bytes_done, self.bytes_total, self.chunks_sent, self.chunks_skipped
        )?;
        if let Some(e) = &self.error {
            write!(f, ", failed: {e}")?;
        } else if !self.running {
            f.write_str(", done")?;
        }
        Ok(())
    }
}

/// The snapshot transfers of a node (running and the last finished one per group and
/// direction), for `raftsan status`.
#[derive(Clone, Default)]
pub struct SnapshotProgress {
    inner: Arc<Mutex<HashMap<(GroupId, SnapshotDirection), SnapshotTransfer>>>,
}

impl SnapshotProgress {
    fn map(&self) -> MutexGuard<'_, HashMap<(GroupId, SnapshotDirection), SnapshotTransfer>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The transfers of `group`.
    pub fn group(&self, group: GroupId) -> Vec<SnapshotTransfer> {
        let mut v: Vec<_> = self.map().values().filter(|t| t.group == group).cloned().collect();
        v.sort_by_key(|t| format!("{:?}", t.direction));
        v
    }

    /// Every transfer known.
    pub fn all(&self) -> Vec<SnapshotTransfer> {
        let mut v: Vec<_> = self.map().values().cloned().collect();
        v.sort_by_key(|t| (t.group, format!("{:?}", t.direction)));
        v
    }

    fn start(&self, group: GroupId, direction: SnapshotDirection, bytes_total: u64) {
        let t = SnapshotTransfer {
            group,
            direction,
            bytes_done: 0,
            bytes_total,
            chunks_sent: 0,
            chunks_skipped: 0,
            running: true,
            error: None,
        };
        self.map().insert((group, direction), t);
    }

    fn update(&self, group: GroupId, direction: SnapshotDirection, f: impl FnOnce(&mut SnapshotTransfer)) {
        if let Some(t) = self.map().get_mut(&(group, direction)) {
            f(t);
        }
    }

    fn finish(&self, group: GroupId, direction: SnapshotDirection, error: Option<String>) {
        self.update(group, direction, |t| {
            t.running = false;
            t.error = error;
        });
    }
}

/// Number of chunks of a `size`-byte file.
fn chunk_count(size: u64, chunk: u32) -> u64 {
    size.div_ceil(u64::from(chunk))
}

/// Length of chunk `i` of a `size`-byte file.
fn chunk_len(size: u64, chunk: u32, i: u64) -> usize {
    let start = i * u64::from(chunk);
    (size.saturating_sub(start)).min(u64::from(chunk)) as usize
}

fn sha256(data: &[u8]) -> Digest32 {
    Sha256::digest(data).into()
}

/// Reads up to `buf.len()` bytes at `offset`; returns how many were read (short only at EOF).
fn read_at_full(f: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

// ---------------------------------------------------------------------------------------------
// Sender.

/// A chunk read by the sender: index, data, hash.
type ReadChunk = (u64, Bytes, Digest32);

/// Reads `path` chunk by chunk (bytes past its end read as zeros: the file may have shrunk since
/// the snapshot was built) and hands the chunks over a bounded channel.
fn spawn_reader(path: PathBuf, size: u64, chunk: u32) -> mpsc::Receiver<io::Result<ReadChunk>> {
    let (tx, rx) = mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                let e = io::Error::new(e.kind(), format!("open snapshot file {}: {e}", path.display()));
                let _ = tx.blocking_send(Err(e));
                return;
            }
        };
        for i in 0..chunk_count(size, chunk) {
            let mut buf = vec![0u8; chunk_len(size, chunk, i)];
            let item = read_at_full(&file, &mut buf, i * u64::from(chunk))
                .map(|_| {
                    let h = sha256(&buf);
                    (i, Bytes::from(buf), h)
                })
                .map_err(|e| io::Error::new(e.kind(), format!("read snapshot file {}: {e}", path.display())));
            let failed = item.is_err();
            if tx.blocking_send(item).is_err() || failed {
                return;
            }
        }
    });
    rx
}

/// Waits at most [`IDLE_TIMEOUT`] (or `limit`) for `fut`.
async fn idle<T>(what: &str, limit: Duration, fut: impl Future<Output = T>) -> Result<T, String> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| format!("{what}: no progress for {limit:?}"))
}

/// The sender's half, run by `PeerNetwork::full_snapshot`.
pub(crate) async fn send(
    net: &PeerNetwork,
    vote: Vote,
    snapshot: SnapshotOf<TypeConfig, SnapshotData>,
    cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
    let direction = SnapshotDirection::Sending { to: net.target };
    let (path, size, sidecar) = match snapshot.snapshot {
        SnapshotData::Local { path, len, sidecar } => (path, len, sidecar),
        SnapshotData::Received {
            journal: None,
            size_bytes,
            sidecar,
        } => (None, size_bytes, sidecar),
        SnapshotData::Received { journal: Some(j), .. } => {
            return Err(StreamingError::Network(NetworkError::from_string(format!(
                "group {}: snapshot for node {} is an uninstalled journal {}, not a local snapshot",
                net.group,
                net.target,
                j.display()
            ))));
        }
    };
    let size = if path.is_some() { size } else { 0 };
    net.progress.start(net.group, direction, size);
    let sent_bytes = Arc::new(AtomicU64::new(0));
    let transfer = transfer(net, vote, &snapshot.meta, path, size, sidecar, sent_bytes);
    let result = tokio::select! {
        r = transfer => r,
        closed = cancel => Err(StreamingError::Closed(closed)),
    };
    let err = result.as_ref().err().map(|e| e.to_string());
    if let Some(e) = &err {
        tracing::warn!(group = net.group, target = net.target, addr = %net.addr, "snapshot transfer failed: {e}");
    }
    net.progress.finish(net.group, direction, err);
    result
}

async fn transfer(
    net: &PeerNetwork,
    vote: Vote,
    meta: &SnapshotMetaOf<TypeConfig>,
    path: Option<PathBuf>,
    size: u64,
    sidecar: Bytes,
    sent_bytes: Arc<AtomicU64>,
) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
    let ctx = format!("snapshot of group {} to node {} ({})", net.group, net.target, net.addr);
    let fail = |msg: String| StreamingError::Network(NetworkError::from_string(format!("{ctx}: {msg}")));
    let direction = SnapshotDirection::Sending { to: net.target };
    let chunk = CHUNK_BYTES;
    let begin = pb::SnapshotBegin {
        group: net.group,
        target: net.target,
        vote: Some(vote_to_pb(&vote)),
        last_log_id: opt_log_id_to_pb(&meta.last_log_id),
        last_membership_log_id: opt_log_id_to_pb(meta.last_membership.log_id()),
        last_membership: membership_to_bytes(&meta.last_membership),
        has_file: path.is_some(),
        size_bytes: size,
        chunk_size: chunk,
        sidecar,
    };
    let (tx, rx) = mpsc::channel::<pb::SnapshotRequest>(4);
    let msg = |m| pb::SnapshotRequest { msg: Some(m) };
    tx.send(msg(pb::snapshot_request::Msg::Begin(begin)))
        .await
        .map_err(|_| fail("request stream closed".into()))?;
    let mut client = net
        .client()
        .map_err(|e| StreamingError::Unreachable(Unreachable::from_string(e)))?;
    let resp = idle("open stream", IDLE_TIMEOUT, client.snapshot(ReceiverStream::new(rx)))
        .await
        .map_err(fail)?
        .map_err(|s| match net.status_err("snapshot", s) {
            openraft::errors::RPCError::Unreachable(u) => StreamingError::Unreachable(u),
            e => StreamingError::Network(NetworkError::from_string(e)),
        })?;
    let mut replies = resp.into_inner();
    let mut next_reply = async || -> Result<pb::snapshot_reply::Msg, StreamingError<TypeConfig>> {
        match idle("waiting for the receiver", IDLE_TIMEOUT, replies.message())
            .await
            .map_err(fail)?
        {
            Ok(Some(pb::SnapshotReply { msg: Some(m) })) => Ok(m),
            Ok(Some(pb::SnapshotReply { msg: None })) => Err(fail("empty reply".into())),
            Ok(None) => Err(fail("receiver closed the stream".into())),
            Err(s) => Err(fail(format!("receiver: {}: {}", s.code(), s.message()))),
        }
    };

    let mut sent = 0u64;
    if let Some(path) = path {
        let mut reader = spawn_reader(path, size, chunk);
        // Hashes of the receiver's chunks, from chunk `base` on.
        let mut hashes: VecDeque<Digest32> = VecDeque::new();
        let mut base = 0u64;
        let mut ended: Option<u64> = None;
        for i in 0..chunk_count(size, chunk) {
            let (idx, data, hash) = idle("reading the snapshot file", IDLE_TIMEOUT, reader.recv())
                .await
                .map_err(fail)?
                .ok_or_else(|| fail("snapshot file reader stopped".into()))?
                .map_err(|e| StreamingError::Network(NetworkError::from_string(format!("{ctx}: {e}"))))?;
            if idx != i {
                return Err(fail(format!("reader returned chunk {idx}, expected {i}")));
            }
            while ended.is_none() && base + hashes.len() as u64 <= i {
                match next_reply().await? {
                    pb::snapshot_reply::Msg::Hashes(h) => {
                        if h.first != base + hashes.len() as u64 {
                            return Err(fail(format!("hash batch starts at chunk {}", h.first)));
                        }
                        for d in h.sha256 {
                            let d: Digest32 = d
                                .as_ref()
                                .try_into()
                                .map_err(|_| fail(format!("hash of {} bytes", d.len())))?;
                            hashes.push_back(d);
                        }
                    }
                    pb::snapshot_reply::Msg::HashesEnd(e) => ended = Some(e.count),
                    pb::snapshot_reply::Msg::Done(_) => return Err(fail("Done before End".into())),
                }
            }
            while base < i && !hashes.is_empty() {
                hashes.pop_front();
                base += 1;
            }
            let same = base == i && hashes.front() == Some(&hash);
            let len = data.len() as u64;
            if same {
                net.progress.update(net.group, direction, |t| {
                    t.chunks_skipped += 1;
                    t.bytes_done += len;
                });
            } else {
                let m = msg(pb::snapshot_request::Msg::Chunk(pb::SnapshotChunk { index: i, data }));
                idle("sending a chunk", IDLE_TIMEOUT, tx.send(m))
                    .await
                    .map_err(fail)?
                    .map_err(|_| fail("receiver closed the stream".into()))?;
                sent += 1;
                sent_bytes.fetch_add(len, Ordering::Relaxed);
                net.progress.update(net.group, direction, |t| {
                    t.chunks_sent += 1;
                    t.bytes_done += len;
                });
            }
        }
    }
    tx.send(msg(pb::snapshot_request::Msg::End(pb::SnapshotEnd { chunks: sent })))
        .await
        .map_err(|_| fail("receiver closed the stream".into()))?;
    // The receiver now makes the journal durable and openraft installs the snapshot, which lays
    // the journal over its file: allow for that, scaled by the bytes sent.
    let install = IDLE_TIMEOUT + Duration::from_secs(sent_bytes.load(Ordering::Relaxed) / INSTALL_BYTES_PER_SEC);
    loop {
        let m = idle("waiting for the install", install, replies.message())
            .await
            .map_err(fail)?;
        match m {
            Ok(Some(pb::SnapshotReply {
                msg: Some(pb::snapshot_reply::Msg::Done(d)),
            })) => {
                let v = d
                    .vote
                    .as_ref()
                    .map(vote_from_pb)
                    .ok_or_else(|| fail("Done without vote".into()))?;
                return Ok(SnapshotResponse::new(v));
            }
            Ok(Some(_)) => {} // Hashes the sender did not need.
            Ok(None) => return Err(fail("receiver closed the stream before Done".into())),
            Err(s) => return Err(fail(format!("receiver: {}: {}", s.code(), s.message()))),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Receiver.

type ReplyTx = mpsc::Sender<Result<pb::SnapshotReply, Status>>;

/// Hashes the chunks of `current` (within the snapshot's size) and sends them, then `HashesEnd`.
fn spawn_hasher(current: Option<PathBuf>, size: u64, chunk: u32, out: ReplyTx) {
    tokio::task::spawn_blocking(move || {
        let reply = |m| Ok(pb::SnapshotReply { msg: Some(m) });
        let mut count = 0u64;
        let file = current.and_then(|p| File::open(p).ok());
        if let Some(file) = file {
            let len = file.metadata().map(|m| m.len()).unwrap_or(0).min(size);
            let n = chunk_count(len, chunk);
            let mut batch = Vec::with_capacity(HASH_BATCH);
            let mut buf = vec![0u8; chunk as usize];
            while count < n {
                let want = chunk_len(len, chunk, count);
                match read_at_full(&file, &mut buf[..want], count * u64::from(chunk)) {
                    Ok(got) => batch.push(Bytes::copy_from_slice(&sha256(&buf[..got]))),
                    // An unreadable chunk of the receiver's own file: stop hashing, the sender
                    // then sends everything from here on.
                    Err(e) => {
                        tracing::warn!("snapshot receiver: reading own file at chunk {count}: {e}");
                        break;
                    }
                }
                count += 1;
                if batch.len() == HASH_BATCH || count == n {
                    let first = count - batch.len() as u64;
                    let m = pb::snapshot_reply::Msg::Hashes(pb::ChunkHashes {
                        first,
                        sha256: std::mem::take(&mut batch),
                    });
                    if out.blocking_send(reply(m)).is_err() {
                        return;
                    }
                }
            }
            if !batch.is_empty() {
                let first = count - batch.len() as u64;
                let m = pb::snapshot_reply::Msg::Hashes(pb::ChunkHashes { first, sha256: batch });
                if out.blocking_send(reply(m)).is_err() {
                    return;
                }
            }
        }
        let _ = out.blocking_send(reply(pb::snapshot_reply::Msg::HashesEnd(pb::HashesEnd { count })));
    });
}

/// A validated `Begin`.
pub(crate) struct Begin<SM: RaftStateMachine<TypeConfig, SnapshotData = SnapshotData>> {
    raft: openraft::Raft<TypeConfig, SM>,
    vote: Vote,
    meta: SnapshotMetaOf<TypeConfig>,
    current: Option<PathBuf>,
    staging_dir: PathBuf,
    group: GroupId,
    has_file: bool,
    size: u64,
    chunk: u32,
    sidecar: Bytes,
}

/// Checks the opening message of a stream; errors are the RPC's status.
pub(crate) fn begin<SM>(
    registry: &dyn GroupRegistry<SM>,
    b: pb::SnapshotBegin,
    this_node: impl Fn(&openraft::Raft<TypeConfig, SM>) -> u64,
) -> Result<Begin<SM>, Status>
where
    SM: RaftStateMachine<TypeConfig, SnapshotData = SnapshotData>,
{
    let group = b.group;
    let raft = registry
        .raft(group)
        .ok_or_else(|| Status::not_found(format!("snapshot: no Raft group {group} on this node")))?;
    let me = this_node(&raft);
    if me != b.target {
        return Err(Status::failed_precondition(format!(
            "snapshot for node {} reached node {me}",
            b.target
        )));
    }
    let base = registry
        .snapshot_base(group)
        .ok_or_else(|| Status::not_found(format!("snapshot: group {group} has no snapshot base on this node")))?;
    let vote = req_vote(&b.vote, "snapshot begin")?;
    if b.has_file && (b.chunk_size == 0 || b.chunk_size > journal::MAX_CHUNK) {
        return Err(Status::invalid_argument(format!(
            "snapshot: chunk size {}",
            b.chunk_size
        )));
    }
    let last_membership = membership_from_bytes(opt_log_id_from_pb(&b.last_membership_log_id), &b.last_membership)
        .map_err(|e| Status::invalid_argument(format!("snapshot of group {group}: {e}")))?;
    let meta = SnapshotMeta {
        last_log_id: opt_log_id_from_pb(&b.last_log_id),
        last_membership,
    };
    Ok(Begin {
        raft,
        vote,
        meta,
        current: base.current,
        staging_dir: base.staging_dir,
        group,
        has_file: b.has_file,
        size: if b.has_file { b.size_bytes } else { 0 },
        chunk: b.chunk_size,
        sidecar: b.sidecar,
    })
}

/// The receiver's half, run in its own task once `Begin` was accepted.
pub(crate) async fn receive<SM>(
    b: Begin<SM>,
    inbound: Streaming<pb::SnapshotRequest>,
    out: ReplyTx,
    progress: SnapshotProgress,
) where
    SM: RaftStateMachine<TypeConfig, SnapshotData = SnapshotData>,
{
    let from = b.vote.leader_id.node_id;
    let group = b.group;
    let direction = SnapshotDirection::Receiving { from };
    progress.start(group, direction, b.size);
    let mut journal_path = None;
    let result = receive_inner(b, inbound, &out, &progress, &mut journal_path).await;
    match result {
        Ok(vote) => {
            progress.finish(group, direction, None);
            let done = pb::snapshot_reply::Msg::Done(pb::SnapshotDone {
                vote: Some(vote_to_pb(&vote)),
            });
            let _ = out.send(Ok(pb::SnapshotReply { msg: Some(done) })).await;
        }
        Err(status) => {
            tracing::warn!(group, from, "snapshot receive failed: {}", status.message());
            if let Some(p) = journal_path {
                let _ = std::fs::remove_file(p);
            }
            progress.finish(group, direction, Some(status.message().to_string()));
            let _ = out.send(Err(status)).await;
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("blocking task: {e}")))?
}

async fn receive_inner<SM>(
    b: Begin<SM>,
    mut inbound: Streaming<pb::SnapshotRequest>,
    out: &ReplyTx,
    progress: &SnapshotProgress,
    journal_path: &mut Option<PathBuf>,
) -> Result<Vote, Status>
where
    SM: RaftStateMachine<TypeConfig, SnapshotData = SnapshotData>,
{
    let group = b.group;
    let from = b.vote.leader_id.node_id;
    let direction = SnapshotDirection::Receiving { from };
    let ctx = format!("snapshot of group {group} from node {from}");
    let storage = |what: &str, e: io::Error| Status::internal(format!("{ctx}: {what}: {e}"));
    let n = if b.has_file { chunk_count(b.size, b.chunk) } else { 0 };
    spawn_hasher(
        if b.has_file { b.current.clone() } else { None },
        b.size,
        b.chunk,
        out.clone(),
    );
    let mut writer = if b.has_file {
        std::fs::create_dir_all(&b.staging_dir).map_err(|e| storage("staging directory", e))?;
        let last = b.meta.last_log_id.as_ref().map(|l| l.index).unwrap_or(0);
        let nonce: u64 = rand::random();
        let path = b
            .staging_dir
            .join(format!("snapshot-{group}-{last}-{nonce:016x}.journal"));
        *journal_path = Some(path.clone());
        Some(
            blocking(move || JournalWriter::create(path))
                .await
                .map_err(|e| storage("create journal", e))?,
        )
    } else {
        None
    };
    let mut received = 0u64;
    let mut next_index = 0u64;
    loop {
        let m = idle("waiting for the sender", IDLE_TIMEOUT, inbound.message())
            .await
            .map_err(|e| Status::deadline_exceeded(format!("{ctx}: {e}")))?
            .map_err(|s| Status::aborted(format!("{ctx}: stream broke: {}", s.message())))?
            .ok_or_else(|| Status::aborted(format!("{ctx}: sender closed the stream before End")))?;
        match m.msg {
            Some(pb::snapshot_request::Msg::Chunk(c)) => {
                let Some(w) = writer.take() else {
                    return Err(Status::invalid_argument(format!(
                        "{ctx}: chunk for a snapshot without file"
                    )));
                };
                let want = if c.index < n {
                    chunk_len(b.size, b.chunk, c.index)
                } else {
                    0
                };
                if c.index < next_index || c.index >= n || c.data.len() != want {
                    return Err(Status::invalid_argument(format!(
                        "{ctx}: chunk {} of {} bytes (expected index >= {next_index} and < {n}, {want} bytes)",
                        c.index,
                        c.data.len()
                    )));
                }
                next_index = c.index + 1;
                let offset = c.index * u64::from(b.chunk);
                let len = c.data.len() as u64;
                let w = blocking(move || {
                    let mut w = w;
                    w.append(offset, &c.data)?;
                    Ok(w)
                })
                .await
                .map_err(|e| storage("write journal", e))?;
                writer = Some(w);
                received += 1;
                progress.update(group, direction, |t| {
                    t.chunks_sent += 1;
                    t.bytes_done += len;
                });
            }
            Some(pb::snapshot_request::Msg::End(e)) => {
                if e.chunks != received {
                    return Err(Status::invalid_argument(format!(
                        "{ctx}: sender sent {} chunks, {received} arrived",
                        e.chunks
                    )));
                }
                break;
            }
            Some(pb::snapshot_request::Msg::Begin(_)) | None => {
                return Err(Status::invalid_argument(format!("{ctx}: unexpected message")));
            }
        }
    }
    let journal = match writer {
        Some(w) => {
            let size = b.size;
            Some(
                blocking(move || w.finish(size))
                    .await
                    .map_err(|e| storage("finish journal", e))?,
            )
        }
        None => None,
    };
    progress.update(group, direction, |t| {
        t.chunks_skipped = n - received;
        t.bytes_done = t.bytes_total;
    });
    let snapshot = Snapshot {
        meta: b.meta,
        snapshot: SnapshotData::Received {
            journal,
            size_bytes: b.size,
            sidecar: b.sidecar,
        },
    };
    let resp = b
        .raft
        .install_full_snapshot(b.vote, snapshot)
        .await
        .map_err(|e| Status::unavailable(format!("{ctx}: install: {e}")))?;
    // The journal now belongs to the state machine (installed, or refused as stale: either way it
    // is no longer ours to delete).
    *journal_path = None;
    Ok(resp.vote)
}
