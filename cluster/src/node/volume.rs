//! One volume on one node: its SCSI logical unit over the replicated image, its ALUA view, and
//! the router that decides where each command runs.
//!
//! ```text
//! session on this node ──▶ ClusterRouter::execute
//!     ALUA epoch of the session older than the volume's?  ──▶ UNIT ATTENTION 2A/06, not executed
//!     INQUIRY, REPORT LUNS, REPORT TARGET PORT GROUPS     ──▶ local LU (same identity everywhere)
//!     this node leads the volume (term T)                  ──▶ LU on a blocking thread:
//!          writes → Raft log (quorum) → applied → GOOD;  reads → lease read barrier → image
//!          (plain WRITE(10)/(16) stay on the async task: the WriteBatcher coalesces those queued
//!          at one moment into one log entry)
//!     another node leads (term T)                          ──▶ Execute RPC {term T} to it
//!     no leader known within TRANSITION_WAIT               ──▶ NOT READY 04/0A
//! ```
//!
//! Nexus state (unit attentions, SPC-2 reservations, PR notifications) lives only in the
//! leader's LU: it learns of a nexus (UA 29/00) at login when it is local, else with the
//! nexus's first forwarded command; REQUEST SENSE and LOGICAL UNIT / target resets go to the
//! leader too (a forwarded reset is an Execute with `lu_reset` set); logouts
//! are forwarded with ForgetNexus. A node that stops leading forgets every nexus, so the next
//! leader gives each one 29/00 (mode pages and SPC-2 reservations are not replicated).
//!
//! Fencing (DESIGN.md invariant 3): a command is bound to the leader term seen when it arrived.
//! If leadership changes before it completes (a proposal or read barrier fails, or the leader
//! refuses the forwarded term), the command ends with UNIT ATTENTION 2A/06 and is never re-sent
//! elsewhere by the target; the initiator retries it on the current path.

use openraft::async_runtime::watch::WatchReceiver;
use std::cell::Cell;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, anyhow};
use bytes::Bytes;
use openraft::ReadPolicy;
use raftsan_proto::scsi::cdb::op;
use raftsan_proto::scsi::fence;
use raftsan_proto::scsi::sense::{self, status};
use raftsan_target::backing::BackingStore;
use raftsan_target::catalog::{Backing, ChapAccount, Cidr, LunDef, TargetDef};
use raftsan_target::lu::{
    Admission, AluaState, AluaView, Nexus, Outcome, PlainWrite, PortGroupState, TargetLus, TargetPort,
};
use raftsan_target::portal::{CommandRouter, OwnedCommand, Reset, TargetRuntime};

use super::{Node, RaftGroup};
use crate::pb::cluster::{ExecuteRequest, ExecuteResponse, TargetInfo, VolumeInfo};
use crate::raft::Request;
use crate::raft::state_machine::{GroupStateMachine, VolumeImage};
use crate::raft::types::{WriteItem, WriteResult};

/// How long a command waits for a leader before it gets NOT READY 04/0A (transitioning): a few
/// election timeouts, so an ordinary failover is seen as UNIT ATTENTION 2A/06 (retried by every
/// initiator) and only a lost quorum as transitioning.
pub const TRANSITION_WAIT: Duration = Duration::from_millis(3000);
/// Upper bound on one replicated write or barrier (then the command fails and is retried).
pub const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause before a proposal refused for a lapsed lease is tried again.
pub const PROPOSE_RETRY: Duration = Duration::from_millis(10);
/// A leader that no quorum acknowledged for this long considers itself cut off: it reports its
/// port group Transitioning and gives up on the commands it holds (a partitioned leader would
/// otherwise hold them until the initiator's command timeout). Several election timeouts, so a
/// loaded but connected leader is not taken for a cut-off one.
pub const ISOLATION_AFTER: Duration = Duration::from_millis(1000);

/// Whether this node leads but heard from no quorum for [`ISOLATION_AFTER`] (`None` acks count
/// from `leading_since`, so a fresh leader has time for its first round).
fn cut_off(m: &openraft::RaftMetrics<crate::raft::TypeConfig>, me: u64, leading_since: tokio::time::Instant) -> bool {
    if m.current_leader != Some(me) {
        return false;
    }
    use openraft::Instant as _;
    let acked_lately = m
        .last_quorum_acked
        .as_ref()
        .is_some_and(|t| t.elapsed() <= ISOLATION_AFTER);
    !acked_lately && leading_since.elapsed() > ISOLATION_AFTER
}

/// Resolves when this node, leading, has been cut off from a quorum or sees another leader.
async fn lost_quorum(raft: &RaftGroup, me: u64) {
    lost_quorum_since(raft, me, tokio::time::Instant::now()).await
}

/// [`lost_quorum`] for a command that has been waiting since `since`: cut off counts once no
/// quorum acknowledged this leader for [`ISOLATION_AFTER`] and the command waited that long, so
/// a write that queued behind other proposals is not given another full [`ISOLATION_AFTER`]
/// when its turn comes.
async fn lost_quorum_since(raft: &RaftGroup, me: u64, since: tokio::time::Instant) {
    loop {
        {
            let m = raft.metrics();
            let m = m.borrow_watched();
            if cut_off(&m, me, since) || m.current_leader.is_some_and(|l| l != me) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
/// Proposes `req` as the leader `me` and waits for it to be applied, bounded by
/// [`PROPOSE_TIMEOUT`]; a proposal refused while no other leader is known (a lapsed lease) is
/// retried. `Err` says why the command is fenced (another leader, cut off, timed out).
async fn propose(raft: RaftGroup, me: u64, req: Request) -> Result<crate::raft::Response, String> {
    let now = tokio::time::Instant::now();
    propose_until(raft, me, req, now, now + PROPOSE_TIMEOUT).await
}

/// [`propose`] for a command waiting since `since`, bounded by `deadline`.
async fn propose_until(
    raft: RaftGroup,
    me: u64,
    req: Request,
    since: tokio::time::Instant,
    deadline: tokio::time::Instant,
) -> Result<crate::raft::Response, String> {
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let attempt = tokio::select! {
            r = tokio::time::timeout(left, raft.client_write(req.clone())) => r,
            () = lost_quorum_since(&raft, me, since) => {
                return Err("no quorum acknowledged this leader lately (cut off?)".to_string());
            }
        };
        match attempt {
            Err(_) => return Err("timed out".to_string()),
            Ok(Ok(resp)) => return Ok(resp.data),
            Ok(Err(e)) => {
                // Refused before it was appended while no other leader is known (the leader's
                // lease lapsed under load; openraft refuses proposals until a quorum
                // acknowledges it again): nothing was written, so retrying is safe. Another
                // leader, or anything else, fences the command.
                let retry = e
                    .forward_to_leader()
                    .is_some_and(|f| f.leader_id.is_none() || f.leader_id == Some(me));
                let still_leads = raft.metrics().borrow_watched().current_leader.is_none_or(|l| l == me);
                if !(retry && still_leads) || tokio::time::Instant::now() >= deadline {
                    return Err(e.to_string());
                }
                tokio::time::sleep(PROPOSE_RETRY).await;
            }
        }
    }
}

/// Coalesced plain-write proposals a volume's [`WriteBatcher`] keeps in flight at once. While all
/// are in flight, new writes queue and go together into the next entry.
pub const WRITE_PROPOSALS_IN_FLIGHT: usize = 4;
/// At most this many writes share one log entry.
pub const MAX_WRITES_PER_ENTRY: usize = 64;
/// At most this many bytes of write data share one log entry (a single larger write is proposed
/// alone).
pub const MAX_ENTRY_WRITE_BYTES: usize = 1 << 20;
/// Writes that may wait for a proposal slot, per volume: enough to fill every slot's next
/// entry. A writer beyond it waits to enqueue (each waiting writer is an iSCSI command, already
/// bounded by its session's command window), and that wait counts against its
/// [`PROPOSE_TIMEOUT`].
pub const WRITE_QUEUE_LEN: usize = WRITE_PROPOSALS_IN_FLIGHT * MAX_WRITES_PER_ENTRY;

/// A plain write waiting for the batcher: the item, when it must have been answered, where its
/// result goes, and the shared [`VolumeRuntime::atomic_gate`] it holds from before its admission
/// until its result is known (so no COMPARE AND WRITE runs between them, even when the command
/// that queued it is dropped).
struct QueuedWrite {
    item: WriteItem,
    deadline: tokio::time::Instant,
    done: tokio::sync::oneshot::Sender<WriteAnswer>,
    _shared: tokio::sync::OwnedRwLockReadGuard<()>,
}

/// What became of a queued write: applied with this result, or `Err` why it is fenced (the
/// proposal failed: another leader, cut off, timed out), as [`propose`] says.
type WriteAnswer = Result<WriteResult, String>;

/// Coalesces the plain writes of one volume that are queued at the same moment into one log
/// entry (one RaftCore round, log append and replication message per entry, not per write).
///
/// ```text
/// plain_write ──(bounded queue, WRITE_QUEUE_LEN)──▶ batcher task
///     a proposal slot is free (≤ WRITE_PROPOSALS_IN_FLIGHT in flight)?
///         take everything queued, ≤ MAX_WRITES_PER_ENTRY writes and MAX_ENTRY_WRITE_BYTES:
///         one write  → Request::Write   (as without batching; never waits for company)
///         several    → Request::Writes  (items applied in order, one result each)
///     entry applied → each write's own result;  proposal failed → every write of it fenced
/// ```
///
/// The task ends when the volume is dropped, after its proposals in flight are answered.
struct WriteBatcher {
    queue: tokio::sync::mpsc::Sender<QueuedWrite>,
}

/// The batcher's counters (see `node::metrics`): entries it proposed and the writes in them, so
/// writes per entry is their ratio.
#[derive(Clone)]
struct BatchCounts {
    entries: metrics::Counter,
    writes: metrics::Counter,
}

impl BatchCounts {
    /// The volume's counters, exported from now on (at 0 until its first write here; never
    /// reset when the volume's runtime is rebuilt).
    fn new(volume_name: &str) -> Self {
        let c = BatchCounts {
            entries: metrics::counter!("raftsan_volume_write_entries_total", "volume" => volume_name.to_string()),
            writes: metrics::counter!("raftsan_volume_coalesced_writes_total", "volume" => volume_name.to_string()),
        };
        c.entries.increment(0);
        c.writes.increment(0);
        c
    }
}

impl WriteBatcher {
    fn spawn(raft: RaftGroup, me: u64, volume: u64, volume_name: &str) -> Self {
        let (queue, rx) = tokio::sync::mpsc::channel(WRITE_QUEUE_LEN);
        tokio::spawn(run_write_batcher(raft, me, volume, BatchCounts::new(volume_name), rx));
        WriteBatcher { queue }
    }
}

async fn run_write_batcher(
    raft: RaftGroup,
    me: u64,
    volume: u64,
    counts: BatchCounts,
    mut rx: tokio::sync::mpsc::Receiver<QueuedWrite>,
) {
    use futures_util::StreamExt as _;
    let propose = |batch: Vec<QueuedWrite>| {
        counts.entries.increment(1);
        counts.writes.increment(batch.len() as u64);
        propose_writes(raft.clone(), me, volume, batch)
    };
    let mut in_flight = futures_util::stream::FuturesUnordered::new();
    // A write taken from the queue that did not fit the previous entry: first of the next.
    let mut carry: Option<QueuedWrite> = None;
    let mut open = true;
    loop {
        if in_flight.len() < WRITE_PROPOSALS_IN_FLIGHT
            && let Some(first) = carry.take()
        {
            let batch = take_batch(first, &mut rx, &mut carry);
            in_flight.push(propose(batch));
            continue;
        }
        tokio::select! {
            biased;
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            w = rx.recv(), if open && in_flight.len() < WRITE_PROPOSALS_IN_FLIGHT => match w {
                None => open = false,
                Some(first) => {
                    let batch = take_batch(first, &mut rx, &mut carry);
                    in_flight.push(propose(batch));
                }
            },
            else => break,
        }
    }
}

/// `first` and what is queued behind it, within the bounds of one entry; the first write that
/// does not fit is left in `carry`.
fn take_batch(
    first: QueuedWrite,
    rx: &mut tokio::sync::mpsc::Receiver<QueuedWrite>,
    carry: &mut Option<QueuedWrite>,
) -> Vec<QueuedWrite> {
    let mut bytes = first.item.data.len();
    let mut batch = vec![first];
    while batch.len() < MAX_WRITES_PER_ENTRY {
        let Ok(w) = rx.try_recv() else { break };
        if bytes + w.item.data.len() > MAX_ENTRY_WRITE_BYTES {
            *carry = Some(w);
            break;
        }
        bytes += w.item.data.len();
        batch.push(w);
    }
    batch
}

/// The request one entry of `items` is: a lone write as a plain `Write`.
fn writes_request(mut items: Vec<WriteItem>) -> Request {
    if items.len() == 1
        && let Some(w) = items.pop()
    {
        return Request::Write {
            offset_bytes: w.offset_bytes,
            data: w.data,
            origin: w.origin,
        };
    }
    Request::Writes(items)
}

/// The result of each of `n` writes proposed together, from the entry's response.
fn write_results(n: usize, r: crate::raft::Response) -> Vec<WriteAnswer> {
    if r.items.len() == n {
        return r.items.into_iter().map(Ok).collect();
    }
    let one = if r.fenced {
        WriteResult::Fenced
    } else if let Some(e) = r.error {
        WriteResult::Refused(e)
    } else if n == 1 && r.items.is_empty() {
        WriteResult::Written
    } else {
        WriteResult::Refused(format!(
            "entry {}: {} results for {n} writes",
            r.applied_index,
            r.items.len()
        ))
    };
    vec![Ok(one); n]
}

/// Proposes `batch` as one entry and answers each of its writes.
async fn propose_writes(raft: RaftGroup, me: u64, volume: u64, batch: Vec<QueuedWrite>) {
    let n = batch.len();
    let deadline = batch
        .iter()
        .map(|w| w.deadline)
        .min()
        .unwrap_or_else(|| tokio::time::Instant::now() + PROPOSE_TIMEOUT);
    // The oldest write of the batch has waited since then (queued behind other proposals): a
    // cut-off leader fences it once ISOLATION_AFTER has passed since then, not since now. Before
    // this, every wave of queued writes waited another ISOLATION_AFTER (chaos: 6 s client
    // stalls partitioning a leader, against 1.1 s before the batcher).
    let since = deadline.checked_sub(PROPOSE_TIMEOUT).unwrap_or(deadline);
    let req = writes_request(batch.iter().map(|w| w.item.clone()).collect());
    let answers = match propose_until(raft, me, req, since, deadline).await {
        Ok(r) => write_results(n, r),
        Err(e) => {
            tracing::debug!(volume, writes = n, "coalesced writes not committed: {e}");
            vec![Err(e); n]
        }
    };
    for (w, a) in batch.into_iter().zip(answers) {
        // The command may be gone (its connection closed); its gate is released either way.
        let _ = w.done.send(a);
    }
}

/// Upper bound on a forwarded command.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(15);

/// INQUIRY identity of cluster volumes: the standalone defaults, so one dm-multipath `device`
/// stanza (docs/linux-clients.md) matches both.
pub const VENDOR: &str = "RAFTSAN";
pub const PRODUCT: &str = "VIRTUAL-DISK";

thread_local! {
    /// Set by [`ReplicatedStore`] when a proposal or read barrier failed because this node is no
    /// longer the leader; the router turns the command's error into UNIT ATTENTION 2A/06.
    static FENCED: Cell<bool> = const { Cell::new(false) };
    /// The session key (`fence::session_key`) of the command [`ReplicatedStore`] runs for; its
    /// writes carry it into the log, where a fence of the session refuses them.
    static ORIGIN: Cell<u64> = const { Cell::new(0) };
}

/// The volume's backing store on this node: writes go through the Raft log, reads come from the
/// image after a read barrier. Only used on the leader, on blocking threads.
pub struct ReplicatedStore {
    raft: RaftGroup,
    /// This node's id.
    me: u64,
    image: Arc<VolumeImage>,
    rt: tokio::runtime::Handle,
    name: String,
}

impl ReplicatedStore {
    fn fenced(&self, what: &str, e: impl std::fmt::Display) -> io::Error {
        FENCED.with(|f| f.set(true));
        raftsan_target::backing::Fenced(format!("volume {}: {what}: {e}", self.name)).into_io()
    }

    fn propose(&self, req: Request) -> io::Result<()> {
        let r = self.rt.block_on(propose(self.raft.clone(), self.me, req));
        match r {
            Ok(resp) if resp.fenced => Err(self.fenced(
                "replicating",
                "the initiator fenced this session (FENCE SESSIONS); not written",
            )),
            Ok(resp) => match resp.error {
                None => Ok(()),
                Some(e) => Err(io::Error::other(format!("volume {}: {e}", self.name))),
            },
            Err(e) => Err(self.fenced("replicating", e)),
        }
    }

    fn barrier(&self) -> io::Result<()> {
        let raft = self.raft.clone();
        // The lease is normally valid (heartbeats renew it); when it is not (just elected, or a
        // quiet spell), fall back to a read index round before calling the command fenced.
        let me = self.me;
        let r: Result<(), String> = self.rt.block_on(async move {
            let read_index = async {
                match raft.ensure_linearizable(ReadPolicy::LeaseRead).await {
                    Ok(_) => Ok(()),
                    Err(_) => raft
                        .ensure_linearizable(ReadPolicy::ReadIndex)
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string()),
                }
            };
            tokio::select! {
                r = tokio::time::timeout(PROPOSE_TIMEOUT, read_index) => r.unwrap_or_else(|_| Err("timed out".into())),
                () = lost_quorum(&raft, me) => Err("no quorum acknowledged this leader lately (cut off?)".into()),
            }
        });
        r.map_err(|e| self.fenced("read barrier", e))
    }
}

impl BackingStore for ReplicatedStore {
    fn size_bytes(&self) -> u64 {
        self.image.size_bytes()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.barrier()?;
        self.image.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.propose(Request::Write {
            offset_bytes: offset,
            data: Bytes::copy_from_slice(buf),
            origin: ORIGIN.with(|o| o.get()),
        })
    }

    fn flush(&self) -> io::Result<()> {
        // Every acknowledged write is already in a quorum's log; with fsync = on-flush the flush
        // entry is what makes those logs durable.
        self.propose(Request::Flush)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.propose(Request::Unmap {
            offset_bytes: offset,
            len_bytes: len,
            origin: ORIGIN.with(|o| o.get()),
        })
    }

    fn is_mapped(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        self.barrier()?;
        self.image.is_mapped(offset, len)
    }

    fn describe(&self) -> String {
        format!("replicated volume {}", self.name)
    }
}

/// The leadership of a volume as this node sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Leadership {
    leader: Option<u64>,
    term: u64,
}

/// A volume exported by this node.
pub struct VolumeRuntime {
    node: Arc<Node>,
    pub id: u64,
    info: Mutex<VolumeInfo>,
    raft: RaftGroup,
    sm: GroupStateMachine,
    pub lus: Arc<TargetLus>,
    lun: u64,
    /// Incremented at every leadership change (the ALUA epoch of DESIGN.md invariant 3).
    epoch: AtomicU64,
    /// This node leads but no quorum acknowledged it lately ([`ISOLATION_AFTER`]).
    cut_off: std::sync::atomic::AtomicBool,
    /// ALUA epoch each I_T nexus of this node last saw.
    nexus_epochs: Mutex<HashMap<u64, u64>>,
    /// The I_T nexuses (cluster-wide ids, any node's) this node's LU knows while it leads the
    /// volume: each got UNIT ATTENTION 29/00 when first seen, and unit attentions, SPC-2
    /// reservations and PR notifications for it live in this LU until it logs out or this node
    /// stops leading.
    known_nexuses: Mutex<HashMap<u64, Nexus>>,
    /// Plain writes proposed from the async path hold it shared, from before their admission
    /// until their result (a queued write's [`QueuedWrite`] holds it); COMPARE AND WRITE, ORWRITE
    /// and WRITE ATOMIC exclusively.
    atomic_gate: Arc<tokio::sync::RwLock<()>>,
    /// Coalesces the plain writes into log entries.
    writes: WriteBatcher,
    /// Term in which this node's LU last loaded the replicated PR state.
    pr_loaded_term: Mutex<u64>,
    leadership: tokio::sync::watch::Sender<Leadership>,
}

impl VolumeRuntime {
    pub(super) fn new(node: Arc<Node>, info: &VolumeInfo, raft: RaftGroup, sm: GroupStateMachine) -> Result<Arc<Self>> {
        let image = sm
            .image()
            .ok_or_else(|| anyhow!("volume {}: state machine has no image", info.name))?;
        let store = ReplicatedStore {
            raft: raft.clone(),
            me: node.id,
            image,
            rt: tokio::runtime::Handle::current(),
            name: info.name.clone(),
        };
        let mut naa = [0u8; 16];
        if info.naa.len() == 16 {
            naa.copy_from_slice(&info.naa);
        }
        let def = LunDef {
            lun: info.lun,
            backing: Backing::Memory {
                size_bytes: info.size_bytes,
            },
            serial: info.serial.clone(),
            naa,
            vendor: VENDOR.into(),
            product: PRODUCT.into(),
            revision: env!("CARGO_PKG_VERSION")
                .chars()
                .filter(|c| *c != '.')
                .take(4)
                .collect(),
            block_size: info.block_size,
            read_only: false,
            thin: true,
            write_cache: true,
        };
        let lus = Arc::new(TargetLus::with_stores(&info.target, vec![(def, Box::new(store))])?);
        let writes = WriteBatcher::spawn(raft.clone(), node.id, info.id, &info.name);
        let v = Arc::new(VolumeRuntime {
            node,
            id: info.id,
            info: Mutex::new(info.clone()),
            raft,
            sm,
            lus,
            lun: info.lun,
            epoch: AtomicU64::new(1),
            cut_off: std::sync::atomic::AtomicBool::new(false),
            nexus_epochs: Mutex::new(HashMap::new()),
            known_nexuses: Mutex::new(HashMap::new()),
            pr_loaded_term: Mutex::new(0),
            atomic_gate: Arc::new(tokio::sync::RwLock::new(())),
            writes,
            leadership: tokio::sync::watch::channel(Leadership { leader: None, term: 0 }).0,
        });
        v.lus.set_alua(Arc::new(VolumeAlua(Arc::downgrade(&v))));
        Ok(v)
    }

    pub fn target_name(&self) -> String {
        lock(&self.info).target.clone()
    }

    pub fn info(&self) -> VolumeInfo {
        lock(&self.info).clone()
    }

    pub(super) fn update_info(&self, info: &VolumeInfo) {
        *lock(&self.info) = info.clone();
    }

    /// Watches leadership (ALUA epoch, UA) and the state machine (capacity changes).
    pub(super) fn spawn_watchers(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let mut metrics = self.raft.metrics();
        tokio::spawn(async move {
            let mut leading_since = tokio::time::Instant::now();
            // The term this node last led in.
            let mut led_term: Option<u64> = None;
            loop {
                let Some(v) = weak.upgrade() else { return };
                let me = v.node.id;
                let (leader, term) = {
                    let m = metrics.borrow_and_update();
                    if m.current_leader == Some(me) && led_term != Some(m.current_term) {
                        led_term = Some(m.current_term);
                        leading_since = tokio::time::Instant::now();
                    }
                    // A leader cut off from every quorum does not claim the volume: its port
                    // group turns Transitioning and initiators move to the other nodes. While it
                    // tries pre-votes openraft's view of the leader flaps between itself and none,
                    // so the test is: it led in this term, no quorum acknowledged it lately, and
                    // it knows of no other leader (learning one, or a newer term, ends it).
                    let acked_lately = {
                        use openraft::Instant as _;
                        m.last_quorum_acked
                            .as_ref()
                            .is_some_and(|t| t.elapsed() <= ISOLATION_AFTER)
                    };
                    let cut = led_term == Some(m.current_term)
                        && m.current_leader.is_none_or(|l| l == me)
                        && !acked_lately
                        && leading_since.elapsed() > ISOLATION_AFTER;
                    // Commands arriving while cut off get NOT READY 04/0A at once (`route`)
                    // instead of waiting TRANSITION_WAIT for a leader this node cannot learn.
                    v.cut_off.store(cut, Ordering::Release);
                    let leader = if cut { None } else { m.current_leader };
                    (leader, m.current_term)
                };
                let now = Leadership { leader, term };
                let before = *v.leadership.borrow();
                if before != now {
                    if before.leader != now.leader {
                        v.epoch.fetch_add(1, Ordering::AcqRel);
                        tracing::info!(volume = v.id, leader = ?now.leader, term, "volume leadership changed");
                    }
                    if before.leader == Some(v.node.id) && now.leader != Some(v.node.id) {
                        // The nexus state of this LU is stale from now on: the next leader
                        // starts afresh (29/00 for every nexus it sees, SPC-2 reservations gone).
                        v.forget_all_nexuses();
                        // Leading again (even in this term, after a cut-off) reloads the
                        // replicated reservation state.
                        *lock(&v.pr_loaded_term) = 0;
                    }
                    v.leadership.send_replace(now);
                }
                drop(v);
                // Metrics changes, and a tick: being cut off shows as time passing without acks.
                tokio::select! {
                    r = metrics.changed() => if r.is_err() { return },
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        });
        let weak = Arc::downgrade(self);
        let mut changes = self.sm.changes();
        tokio::spawn(async move {
            let mut size = weak.upgrade().map(|v| v.lus_size()).unwrap_or(0);
            while changes.changed().await.is_ok() {
                let Some(v) = weak.upgrade() else { return };
                let now = v.lus_size();
                if now != size {
                    size = now;
                    tracing::info!(volume = v.id, size_bytes = now, "volume capacity changed");
                    v.lus.capacity_changed(v.lun);
                }
            }
        });
    }

    fn lus_size(&self) -> u64 {
        self.sm.image().map(|i| i.size_bytes()).unwrap_or(0)
    }

    fn current(&self) -> Leadership {
        *self.leadership.borrow()
    }

    /// Waits (bounded) until some node leads the volume; `None` at once when this node is cut off
    /// from the quorum (it would learn no leader before the bound).
    async fn wait_leader(&self, within: Duration) -> Option<Leadership> {
        let cut = || self.cut_off.load(Ordering::Acquire);
        let mut rx = self.leadership.subscribe();
        let r = tokio::time::timeout(within, rx.wait_for(|l| cut() || l.leader.is_some())).await;
        match r {
            Ok(Ok(l)) if !cut() => Some(*l),
            _ => None,
        }
    }

    /// Runs a command on this node as the leader of `term`. Used for local sessions and for
    /// commands other nodes forward.
    pub(super) async fn execute_as_leader(
        self: &Arc<Self>,
        term: u64,
        nexus: Nexus,
        cmd: OwnedCommand,
    ) -> Option<Outcome> {
        let l = self.current();
        if l.leader != Some(self.node.id) || l.term != term {
            return None;
        }
        // A new term: make sure everything committed before it is applied, then load the
        // replicated persistent-reservation state into the LU.
        if *lock(&self.pr_loaded_term) != term {
            let raft = self.raft.clone();
            match tokio::time::timeout(PROPOSE_TIMEOUT, raft.ensure_linearizable(ReadPolicy::ReadIndex)).await {
                Ok(Ok(_)) => {}
                _ => return None,
            }
            let mut loaded = lock(&self.pr_loaded_term);
            if *loaded != term {
                if let Some(state) = self.sm.pr_state(self.lun)
                    && let Err(e) = self.lus.pr_import(self.lun, &state)
                {
                    tracing::error!(volume = self.id, "loading the replicated reservation state: {e}");
                }
                *loaded = term;
            }
        }
        self.know_nexus(&nexus);
        let opcode = cmd.cdb.first().copied().unwrap_or(0);
        if opcode == fence::OPCODE {
            return self.fence_sessions(&nexus, &cmd).await;
        }
        let origin = origin_of(&nexus);
        // A plain WRITE, the bulk of the traffic, is proposed from this task: no hop to the
        // blocking pool and back (thread switches were a third of the leader's CPU per write).
        // It holds the shared gate from before its admission until its result, so no COMPARE
        // AND WRITE runs between them.
        let shared = match opcode {
            op::WRITE_10 | op::WRITE_16 => Some(self.atomic_gate.clone().read_owned().await),
            _ => None,
        };
        let admission = self.lus.admit_plain_write(
            &nexus,
            &raftsan_target::lu::Command {
                lun: cmd.lun,
                cdb: &cmd.cdb,
                data_out: &cmd.data_out,
                expected_transfer_len: cmd.expected_transfer_len,
                task_attr: cmd.task_attr,
            },
        );
        match admission {
            Admission::Done(o) => return Some(o),
            Admission::Write(w) => {
                let Some(shared) = shared else {
                    tracing::error!(volume = self.id, opcode, "plain write admitted without the shared gate");
                    return Some(Outcome::check_code(sense::INTERNAL_TARGET_FAILURE, false));
                };
                return Some(self.plain_write(cmd.lun, w, cmd.data_out, origin, shared).await);
            }
            Admission::Other => drop(shared),
        }
        // COMPARE AND WRITE, ORWRITE and WRITE ATOMIC read, decide and write as one: no plain
        // write of this volume runs meanwhile (the LU's own lock covers the other commands).
        let _exclusive = match opcode {
            op::COMPARE_AND_WRITE | op::ORWRITE_16 | op::WRITE_ATOMIC_16 => Some(self.atomic_gate.write().await),
            _ => None,
        };
        let v = self.clone();
        let joined = tokio::task::spawn_blocking(move || {
            FENCED.with(|f| f.set(false));
            ORIGIN.with(|o| o.set(origin));
            let command = raftsan_target::lu::Command {
                lun: cmd.lun,
                cdb: &cmd.cdb,
                data_out: &cmd.data_out,
                expected_transfer_len: cmd.expected_transfer_len,
                task_attr: cmd.task_attr,
            };
            let mut outcome = v.lus.execute_sync(&nexus, &command);
            let mut fenced = FENCED.with(|f| f.get());
            let pr_change = matches!(
                opcode,
                op::PERSISTENT_RESERVE_OUT | op::RESERVE_6 | op::RESERVE_10 | op::RELEASE_6 | op::RELEASE_10
            );
            if !fenced && pr_change && outcome.status == status::GOOD {
                // The reservation change counts only once it is in the log (it is cluster state).
                if let Some(state) = v.lus.pr_export(v.lun) {
                    let store_raft = v.raft.clone();
                    let req = Request::PrState {
                        lun: v.lun,
                        state: Bytes::from(state),
                    };
                    let r = tokio::runtime::Handle::current().block_on(async move {
                        tokio::time::timeout(PROPOSE_TIMEOUT, store_raft.client_write(req)).await
                    });
                    if !matches!(r, Ok(Ok(_))) {
                        fenced = true;
                    }
                }
            }
            if fenced {
                outcome = Outcome::check_code(sense::ASYMMETRIC_ACCESS_STATE_CHANGED, false);
            }
            outcome
        })
        .await;
        match joined {
            Ok(o) => Some(o),
            Err(e) => {
                tracing::error!(volume = self.id, "SCSI execution task failed: {e}");
                Some(Outcome::check_code(sense::INTERNAL_TARGET_FAILURE, false))
            }
        }
    }

    /// Replicates an admitted plain write (`Admission::Write`) through the [`WriteBatcher`] and
    /// answers it once its entry is applied. `shared` is the gate it was admitted under.
    async fn plain_write(
        &self,
        lun: u64,
        w: PlainWrite,
        data: Bytes,
        origin: u64,
        shared: tokio::sync::OwnedRwLockReadGuard<()>,
    ) -> Outcome {
        let fenced = |why: &str| {
            tracing::info!(volume = self.id, offset = w.offset, reason = why, "write fenced");
            Outcome::check_code(sense::ASYMMETRIC_ACCESS_STATE_CHANGED, false)
        };
        let (done, answer) = tokio::sync::oneshot::channel();
        let queued = QueuedWrite {
            item: WriteItem {
                offset_bytes: w.offset,
                data: data.slice(..w.len),
                origin,
            },
            deadline: tokio::time::Instant::now() + PROPOSE_TIMEOUT,
            done,
            _shared: shared,
        };
        if self.writes.queue.send(queued).await.is_err() {
            return fenced("the volume's write batcher has stopped");
        }
        match answer.await {
            Err(_) => fenced("the volume's write batcher has stopped"),
            Ok(Err(e)) => fenced(&e),
            Ok(Ok(WriteResult::Fenced)) => fenced("the initiator fenced this session (FENCE SESSIONS); not written"),
            Ok(Ok(WriteResult::Written)) => self.lus.finish_plain_write(lun, &w, Ok(())),
            Ok(Ok(WriteResult::Refused(e))) => {
                let e = io::Error::other(format!("volume {}: {e}", self.id));
                self.lus.finish_plain_write(lun, &w, Err(e))
            }
        }
    }

    /// FENCE SESSIONS on the leader: the named sessions of the requesting initiator are fenced
    /// in the log (their writes ordered after it are refused on every replica), then GOOD.
    /// `None` when the fence could not be committed under this leadership (the caller answers
    /// as for any command that lost its leader; the initiator sends the fence again).
    async fn fence_sessions(&self, nexus: &Nexus, cmd: &OwnedCommand) -> Option<Outcome> {
        let sessions = match fence::parse(&cmd.cdb, &cmd.data_out) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(volume = self.id, initiator = %nexus.initiator_name, "FENCE SESSIONS refused: {e}");
                let code = match e {
                    fence::FenceError::LengthMismatch { .. } | fence::FenceError::Ragged(_) => {
                        sense::PARAMETER_LIST_LENGTH_ERROR
                    }
                    fence::FenceError::ShortCdb(_) => sense::INVALID_FIELD_IN_CDB,
                    _ => sense::INVALID_FIELD_IN_PARAMETER_LIST,
                };
                return Some(Outcome::check_code(code, false));
            }
        };
        let own = origin_of(nexus);
        // An initiator can only fence its own sessions (the key includes its name), and never
        // the session it asks through.
        let keys: Vec<u64> = sessions
            .iter()
            .map(|s| fence::session_key(&nexus.initiator_name, s))
            .filter(|&k| k != own)
            .collect();
        tracing::info!(
            volume = self.id,
            initiator = %nexus.initiator_name,
            sessions = ?sessions.iter().map(|s| format!("tpgt {} tsih {}", s.tpgt, s.tsih)).collect::<Vec<_>>(),
            "fencing abandoned sessions of the initiator"
        );
        if keys.is_empty() {
            return Some(Outcome::good(Vec::new()));
        }
        let r = tokio::select! {
            r = tokio::time::timeout(PROPOSE_TIMEOUT, self.raft.client_write(Request::Fence { keys })) => r,
            () = lost_quorum(&self.raft, self.node.id) => return None,
        };
        match r {
            Ok(Ok(_)) => Some(Outcome::good(Vec::new())),
            Ok(Err(e)) => {
                tracing::debug!(volume = self.id, "fence not committed: {e}");
                None
            }
            Err(_) => None,
        }
    }

    /// The router's decision for a command of a local session.
    async fn route(self: Arc<Self>, nexus: Nexus, cmd: OwnedCommand) -> Outcome {
        let opcode = cmd.cdb.first().copied().unwrap_or(0);
        let exempt = matches!(opcode, op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE);
        let epoch = self.epoch.load(Ordering::Acquire);
        if !exempt {
            let mut seen = lock(&self.nexus_epochs);
            let e = seen.entry(nexus.id).or_insert(epoch);
            if *e != epoch {
                *e = epoch;
                return Outcome::check_code(sense::ASYMMETRIC_ACCESS_STATE_CHANGED, false);
            }
        }
        // Identity and path state are the same on every node: answer locally, even without a
        // leader (multipath needs them to classify paths). REQUEST SENSE goes to the leader,
        // whose LU holds the nexus's unit attentions.
        let local = matches!(opcode, op::INQUIRY | op::REPORT_LUNS)
            || (opcode == op::MAINTENANCE_IN && cmd.cdb.get(1).map(|b| b & 0x1f) == Some(0x0a));
        if local {
            return run_local(self.lus.clone(), nexus, cmd).await;
        }
        // Cut off from every quorum: no leader will be learned here soon; say so at once so the
        // initiator uses another path.
        if self.cut_off.load(Ordering::Acquire) && opcode != op::REQUEST_SENSE {
            return Outcome::check_code(sense::LOGICAL_UNIT_NOT_READY_TRANSITIONING, false);
        }
        let Some(l) = self.wait_leader(TRANSITION_WAIT).await else {
            if opcode == op::REQUEST_SENSE {
                return run_local(self.lus.clone(), nexus, cmd).await;
            }
            return Outcome::check_code(sense::LOGICAL_UNIT_NOT_READY_TRANSITIONING, false);
        };
        // The leadership changed while this command waited: the initiator learns it first.
        if !exempt && self.epoch.load(Ordering::Acquire) != epoch {
            lock(&self.nexus_epochs).insert(nexus.id, self.epoch.load(Ordering::Acquire));
            return Outcome::check_code(sense::ASYMMETRIC_ACCESS_STATE_CHANGED, false);
        }
        let leader = l.leader.unwrap_or_default();
        if leader == self.node.id {
            return match self.clone().execute_as_leader(l.term, nexus, cmd).await {
                Some(o) => o,
                None => self.lost_leader(l).await,
            };
        }
        // The leader may vanish with the command (killed, paused, partitioned): stop waiting for
        // it as soon as a newer leader is known, instead of the RPC's FORWARD_TIMEOUT. The
        // command's fate is then unknown, as after a failed RPC; it ends as one that lost its
        // leader and the initiator sends it again (a plain write rewrites the same data).
        let mut rx = self.leadership.subscribe();
        let moved = async {
            let _ = rx
                .wait_for(|now| now.term > l.term || (now.leader.is_some() && now.leader != l.leader))
                .await;
        };
        let forwarded = tokio::select! {
            r = self.forward(leader, l.term, &nexus, cmd) => r,
            () = moved => {
                tracing::debug!(volume = self.id, leader, "leadership moved while a forwarded command was out");
                return self.lost_leader(l).await;
            }
        };
        match forwarded {
            Ok(resp) if !resp.not_leader => Outcome {
                status: u8::try_from(resp.status).unwrap_or(status::CHECK_CONDITION),
                sense: resp.sense.map(|s| s.to_vec()),
                data_in: resp.data_in.to_vec(),
                scsi_transfer_len: resp.scsi_transfer_len,
            },
            Ok(_) => self.lost_leader(l).await,
            Err(e) => {
                tracing::debug!(volume = self.id, leader, "forwarding failed: {e:#}");
                self.lost_leader(l).await
            }
        }
    }

    /// The command could not run under the leadership `was` it was routed with: it was not
    /// executed (or its outcome is unknown). Wait (bounded) for a newer leader so the initiator's
    /// retry lands well and tell it the access state changed; without one, the LU is
    /// transitioning.
    async fn lost_leader(&self, was: Leadership) -> Outcome {
        let mut rx = self.leadership.subscribe();
        // A node cut off from the quorum learns no newer leader: it stops waiting when the cut
        // is noticed (the leadership watch changes at that moment).
        let cut = || self.cut_off.load(Ordering::Acquire);
        let newer = |l: &Leadership| cut() || (l.leader.is_some() && (l.term > was.term || l.leader != was.leader));
        let found = tokio::time::timeout(TRANSITION_WAIT, rx.wait_for(newer)).await;
        if !matches!(found, Ok(Ok(_))) || cut() {
            return Outcome::check_code(sense::LOGICAL_UNIT_NOT_READY_TRANSITIONING, false);
        }
        Outcome::check_code(sense::ASYMMETRIC_ACCESS_STATE_CHANGED, false)
    }

    async fn forward(&self, leader: u64, term: u64, nexus: &Nexus, cmd: OwnedCommand) -> Result<ExecuteResponse> {
        let attr = u32::from(cmd.task_attr);
        self.forward_with(leader, term, nexus, cmd, attr).await
    }

    /// Sends `cmd` to the leader with `task_attr` (an iSCSI task attribute, or
    /// [`FORWARDED_LU_RESET`]).
    async fn forward_with(
        &self,
        leader: u64,
        term: u64,
        nexus: &Nexus,
        cmd: OwnedCommand,
        task_attr: u32,
    ) -> Result<ExecuteResponse> {
        let addr = self
            .node
            .rpc_addr_of(leader)
            .ok_or_else(|| anyhow!("no address known for node {leader}"))?;
        let mut client = self.node.cluster_client(&addr)?;
        let req = ExecuteRequest {
            volume: self.id,
            term,
            nexus: Some(nexus_to_pb(nexus)),
            lun: cmd.lun,
            cdb: Bytes::from(cmd.cdb),
            data_out: cmd.data_out,
            expected_transfer_len: cmd.expected_transfer_len,
            task_attr: if task_attr == FORWARDED_LU_RESET { 0 } else { task_attr },
            lu_reset: task_attr == FORWARDED_LU_RESET,
        };
        let mut request = tonic::Request::new(req);
        request.set_timeout(FORWARD_TIMEOUT);
        let resp = client.execute(request).await.map_err(|s| anyhow!("{}", s.message()))?;
        Ok(resp.into_inner())
    }

    /// This node's view of every node's port group state for this volume.
    fn port_groups(&self) -> Vec<PortGroupState> {
        let l = self.current();
        let cat = self.node.catalogue();
        let mut ids: Vec<u64> = cat.nodes.iter().map(|n| n.id).collect();
        if !ids.contains(&self.node.id) {
            ids.push(self.node.id);
        }
        ids.sort_unstable();
        ids.into_iter()
            .filter_map(|id| u16::try_from(id).ok().map(|g| (id, g)))
            .map(|(id, g)| PortGroupState {
                group: g,
                state: match l.leader {
                    None => AluaState::Transitioning,
                    Some(x) if x == id => AluaState::ActiveOptimized,
                    Some(_) => AluaState::ActiveNonOptimized,
                },
                relative_ports: vec![g],
            })
            .collect()
    }

    /// The LU learns of `nexus` (UNIT ATTENTION 29/00) unless it already knows it.
    fn know_nexus(&self, nexus: &Nexus) {
        let mut known = lock(&self.known_nexuses);
        if let std::collections::hash_map::Entry::Vacant(e) = known.entry(nexus.id) {
            self.lus.nexus_joined(nexus);
            e.insert(nexus.clone());
        }
    }

    /// The nexus logged out (on any node): its unit attentions and SPC-2 reservation go.
    pub(super) fn forget_nexus(&self, nexus_id: u64) {
        let mut known = lock(&self.known_nexuses);
        if let Some(n) = known.remove(&nexus_id) {
            self.lus.nexus_left(&n);
        }
    }

    fn forget_all_nexuses(&self) {
        let mut known = lock(&self.known_nexuses);
        for (_, n) in known.drain() {
            self.lus.nexus_left(&n);
        }
    }

    /// LOGICAL UNIT RESET of the volume, requested through `nexus`: done by the leader's LU
    /// (UNIT ATTENTION 29/03 for every nexus it knows, SPC-2 reservation released). Without a
    /// reachable leader there is nothing to reset: the next leader's LU starts without SPC-2
    /// reservations and gives every nexus 29/00.
    async fn reset(self: Arc<Self>, nexus: Nexus) {
        let Some(l) = self.wait_leader(TRANSITION_WAIT).await else {
            tracing::warn!(volume = self.id, "logical unit reset without a volume leader");
            return;
        };
        let leader = l.leader.unwrap_or_default();
        if leader == self.node.id {
            if !self.reset_as_leader(l.term, &nexus) {
                tracing::warn!(volume = self.id, "logical unit reset: leadership changed meanwhile");
            }
            return;
        }
        let cmd = OwnedCommand {
            lun: self.lun,
            cdb: Vec::new(),
            data_out: Bytes::new(),
            expected_transfer_len: 0,
            task_attr: 0,
        };
        match self.forward_with(leader, l.term, &nexus, cmd, FORWARDED_LU_RESET).await {
            Ok(r) if !r.not_leader => {}
            Ok(_) => tracing::warn!(volume = self.id, leader, "logical unit reset: node no longer leads"),
            Err(e) => tracing::warn!(
                volume = self.id,
                leader,
                "forwarding a logical unit reset failed: {e:#}"
            ),
        }
    }

    /// The leader's part of [`VolumeRuntime::reset`] (also for resets other nodes forward).
    /// False when this node does not lead the volume in `term`.
    pub(super) fn reset_as_leader(&self, term: u64, nexus: &Nexus) -> bool {
        let l = self.current();
        if l.leader != Some(self.node.id) || l.term != term {
            return false;
        }
        self.know_nexus(nexus);
        self.lus.lu_reset(self.lun, nexus);
        true
    }
}

/// Marks a forwarded LOGICAL UNIT RESET inside this module (sent as `ExecuteRequest::lu_reset`;
/// iSCSI task attributes are 3 bits, so no initiator's command carries it).
const FORWARDED_LU_RESET: u32 = 0x100;

/// Bits of a cluster-wide nexus id below the originating node's id.
pub const NEXUS_NODE_SHIFT: u32 = 40;

/// A nexus as other nodes see it: the local id tagged with this node's id.
fn global_nexus(node: u64, nexus: &Nexus) -> Nexus {
    let mut n = nexus.clone();
    n.id = (node << NEXUS_NODE_SHIFT) | (nexus.id & ((1 << NEXUS_NODE_SHIFT) - 1));
    n
}

pub(super) fn nexus_to_pb(n: &Nexus) -> crate::pb::cluster::Nexus {
    crate::pb::cluster::Nexus {
        id: n.id,
        initiator_name: n.initiator_name.clone(),
        initiator_port: n.initiator_port.clone(),
        isid: Bytes::copy_from_slice(&n.isid),
        tsih: u32::from(n.tsih),
        target_name: n.target_port.target_name.clone(),
        tpgt: u32::from(n.target_port.tpgt),
        relative_port_id: u32::from(n.target_port.relative_port_id),
        port_group: u32::from(n.target_port.port_group),
    }
}

pub(super) fn nexus_from_pb(n: &crate::pb::cluster::Nexus) -> Option<Nexus> {
    let isid: [u8; 6] = n.isid.as_ref().try_into().ok()?;
    Some(Nexus {
        id: n.id,
        initiator_name: n.initiator_name.clone(),
        initiator_port: n.initiator_port.clone(),
        isid,
        tsih: u16::try_from(n.tsih).ok()?,
        target_port: TargetPort {
            target_name: n.target_name.clone(),
            tpgt: u16::try_from(n.tpgt).ok()?,
            relative_port_id: u16::try_from(n.relative_port_id).ok()?,
            port_group: u16::try_from(n.port_group).ok()?,
        },
    })
}

/// The key a session's writes carry into the log (0 for a nexus without an iSCSI session).
fn origin_of(nexus: &Nexus) -> u64 {
    if nexus.tsih == 0 {
        return 0;
    }
    fence::session_key(
        &nexus.initiator_name,
        &fence::SessionRef {
            tpgt: nexus.target_port.tpgt,
            tsih: nexus.tsih,
            isid: nexus.isid,
        },
    )
}

struct VolumeAlua(std::sync::Weak<VolumeRuntime>);

impl AluaView for VolumeAlua {
    fn port_groups(&self, _lun: u64) -> Vec<PortGroupState> {
        self.0.upgrade().map(|v| v.port_groups()).unwrap_or_default()
    }
}

/// Runs a command on this node's LU, on a blocking thread.
async fn run_local(lus: Arc<TargetLus>, nexus: Nexus, cmd: OwnedCommand) -> Outcome {
    tokio::task::spawn_blocking(move || {
        let command = raftsan_target::lu::Command {
            lun: cmd.lun,
            cdb: &cmd.cdb,
            data_out: &cmd.data_out,
            expected_transfer_len: cmd.expected_transfer_len,
            task_attr: cmd.task_attr,
        };
        lus.execute_sync(&nexus, &command)
    })
    .await
    .unwrap_or_else(|_| Outcome::check_code(sense::INTERNAL_TARGET_FAILURE, false))
}

/// Routes the commands of one target's sessions to the volumes (LUNs) behind it.
struct ClusterRouter {
    node: Arc<Node>,
    volumes: HashMap<u64, Arc<VolumeRuntime>>,
    /// Answers commands for LUNs without a volume (LUN 0 controller, unknown LUNs).
    lus: Arc<TargetLus>,
}

impl CommandRouter for ClusterRouter {
    fn execute(
        &self,
        _target: Arc<TargetRuntime>,
        nexus: Nexus,
        cmd: OwnedCommand,
    ) -> Pin<Box<dyn Future<Output = Outcome> + Send>> {
        let nexus = global_nexus(self.node.id, &nexus);
        match self.volumes.get(&cmd.lun) {
            Some(v) => Box::pin(v.clone().route(nexus, cmd)),
            None => Box::pin(run_local(self.lus.clone(), nexus, cmd)),
        }
    }

    /// A volume this node leads learns of the session now (29/00 on its first command, as a
    /// standalone target); a remote leader's LU learns of it with its first forwarded command.
    fn nexus_joined(&self, nexus: &Nexus) {
        let global = global_nexus(self.node.id, nexus);
        for v in self.volumes.values() {
            if v.current().leader == Some(self.node.id) {
                v.know_nexus(&global);
            }
        }
    }

    fn nexus_left(&self, nexus: &Nexus) {
        let global = global_nexus(self.node.id, nexus);
        for v in self.volumes.values() {
            lock(&v.nexus_epochs).remove(&global.id);
            v.forget_nexus(global.id);
            let leader = v.current().leader;
            if let Some(leader) = leader.filter(|l| *l != self.node.id) {
                let node = self.node.clone();
                let volume = v.id;
                tokio::spawn(async move { node.forget_remote_nexus(leader, volume, global.id).await });
            }
        }
    }

    /// LOGICAL UNIT RESET and target resets act on the volumes' leaders (where the nexuses'
    /// unit attentions and SPC-2 reservations are); LUNs without a volume reset locally.
    fn reset(
        &self,
        _target: Arc<TargetRuntime>,
        nexus: Nexus,
        reset: Reset,
    ) -> Pin<Box<dyn Future<Output = bool> + Send>> {
        let nexus = global_nexus(self.node.id, &nexus);
        let lus = self.lus.clone();
        let volumes: Vec<Arc<VolumeRuntime>> = match reset {
            Reset::Lun(lun) => self.volumes.get(&lun).cloned().into_iter().collect(),
            Reset::Target => self.volumes.values().cloned().collect(),
        };
        let local: Vec<u64> = match reset {
            Reset::Lun(lun) if !self.volumes.contains_key(&lun) => vec![lun],
            Reset::Lun(_) => Vec::new(),
            Reset::Target => lus
                .luns()
                .into_iter()
                .map(|l| l.lun)
                .filter(|l| !self.volumes.contains_key(l))
                .collect(),
        };
        Box::pin(async move {
            let mut found = !volumes.is_empty();
            for lun in local {
                found |= lus.lu_reset(lun, &nexus);
            }
            for v in volumes {
                v.reset(nexus.clone()).await;
            }
            found || reset == Reset::Target
        })
    }
}

/// Builds the portal's view of one target: its ACL/CHAP definition from the catalogue and one
/// LU per volume. With several volumes in one target, LUN 0's controller and REPORT LUNS come
/// from the first volume's LU set (each volume's `TargetLus` holds only its own LUN).
pub(super) fn target_runtime(
    node: &Arc<Node>,
    def: Option<&TargetInfo>,
    name: &str,
    vols: &[Arc<VolumeRuntime>],
) -> Result<Arc<TargetRuntime>> {
    let mut target = TargetDef {
        name: name.to_ascii_lowercase(),
        tid: u32::try_from(vols.first().map(|v| v.id).unwrap_or(0)).unwrap_or(u32::MAX),
        alias: None,
        luns: Vec::new(),
        incoming_users: Vec::new(),
        outgoing_user: None,
        initiator_names: Vec::new(),
        initiator_addresses: Vec::new(),
    };
    if let Some(d) = def {
        target.incoming_users = d
            .incoming
            .iter()
            .map(|a| ChapAccount {
                user: a.user.clone(),
                secret: a.secret.clone(),
            })
            .collect();
        target.outgoing_user = d.outgoing.as_ref().map(|a| ChapAccount {
            user: a.user.clone(),
            secret: a.secret.clone(),
        });
        target.initiator_names = d.initiator_names.clone();
        for a in &d.initiator_addresses {
            match a.parse::<Cidr>() {
                Ok(c) => target.initiator_addresses.push(c),
                Err(e) => tracing::warn!(target = %name, "ignoring initiator address {a:?}: {e}"),
            }
        }
    }
    let lus = vols
        .first()
        .map(|v| v.lus.clone())
        .ok_or_else(|| anyhow!("target {name} has no volume"))?;
    let router = ClusterRouter {
        node: node.clone(),
        volumes: vols.iter().map(|v| (v.lun, v.clone())).collect(),
        lus: lus.clone(),
    };
    Ok(TargetRuntime::new(target, lus, Some(Arc::new(router))))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nexus_ids_carry_the_node() {
        let n = Nexus {
            id: 7,
            initiator_name: "iqn.x".into(),
            initiator_port: "iqn.x,i,0x400000000001".into(),
            isid: [0x40, 0, 0, 0, 0, 1],
            tsih: 3,
            target_port: TargetPort {
                target_name: "iqn.t".into(),
                tpgt: 2,
                relative_port_id: 2,
                port_group: 2,
            },
        };
        let g = global_nexus(2, &n);
        assert_eq!(g.id >> NEXUS_NODE_SHIFT, 2);
        assert_eq!(g.id & 0xff, 7);
        let back = nexus_from_pb(&nexus_to_pb(&g)).unwrap();
        assert_eq!(back, g);
        let mut bad = nexus_to_pb(&g);
        bad.isid = Bytes::from_static(b"abc");
        assert!(nexus_from_pb(&bad).is_none());
    }

    /// A write for the batcher holding `gate` shared, and where its answer arrives.
    fn queued(
        gate: &Arc<tokio::sync::RwLock<()>>,
        offset_bytes: u64,
        data: Vec<u8>,
        origin: u64,
    ) -> (QueuedWrite, tokio::sync::oneshot::Receiver<WriteAnswer>) {
        let (done, answer) = tokio::sync::oneshot::channel();
        let shared = gate
            .clone()
            .try_read_owned()
            .expect("no exclusive holder in these tests");
        let w = QueuedWrite {
            item: WriteItem {
                offset_bytes,
                data: Bytes::from(data),
                origin,
            },
            deadline: tokio::time::Instant::now() + PROPOSE_TIMEOUT,
            done,
            _shared: shared,
        };
        (w, answer)
    }

    #[tokio::test]
    async fn an_entry_takes_what_is_queued_up_to_64_writes_or_1_mib() {
        let gate = Arc::new(tokio::sync::RwLock::new(()));
        let (tx, mut rx) = tokio::sync::mpsc::channel(WRITE_QUEUE_LEN);
        let mut answers = Vec::new();
        for i in 0..130u64 {
            let (w, a) = queued(&gate, i * 512, vec![1; 512], 0);
            tx.try_send(w).unwrap();
            answers.push(a);
        }
        let mut carry = None;
        let mut sizes = Vec::new();
        while let Ok(first) = rx.try_recv() {
            let batch = take_batch(first, &mut rx, &mut carry);
            assert!(carry.is_none());
            // In queue order.
            let offsets: Vec<u64> = batch.iter().map(|w| w.item.offset_bytes).collect();
            assert!(offsets.windows(2).all(|p| p[0] + 512 == p[1]), "{offsets:?}");
            sizes.push(batch.len());
        }
        assert_eq!(sizes, vec![64, 64, 2]);
        // Bytes: three 400 KiB writes do not fit one entry; a lone 2 MiB write is its own entry.
        for len in [400 << 10, 400 << 10, 400 << 10, 2 << 20, 10] {
            tx.try_send(queued(&gate, 0, vec![2; len], 0).0).unwrap();
        }
        let first = rx.try_recv().unwrap();
        let b = take_batch(first, &mut rx, &mut carry);
        assert_eq!(b.len(), 2);
        let b = take_batch(carry.take().unwrap(), &mut rx, &mut carry);
        assert_eq!(b.len(), 1, "the third 400 KiB write and the 2 MiB one exceed 1 MiB");
        let b = take_batch(carry.take().unwrap(), &mut rx, &mut carry);
        assert_eq!(b.iter().map(|w| w.item.data.len()).collect::<Vec<_>>(), vec![2 << 20]);
        let b = take_batch(carry.take().unwrap(), &mut rx, &mut carry);
        assert_eq!((b.len(), carry.is_none()), (1, true));
    }

    #[test]
    fn a_lone_write_is_a_plain_write_entry_and_results_map_per_item() {
        let item = |o: u64| WriteItem {
            offset_bytes: o,
            data: Bytes::from_static(b"x"),
            origin: 9,
        };
        assert_eq!(
            writes_request(vec![item(4)]),
            Request::Write {
                offset_bytes: 4,
                data: Bytes::from_static(b"x"),
                origin: 9
            }
        );
        assert_eq!(
            writes_request(vec![item(4), item(5)]),
            Request::Writes(vec![item(4), item(5)])
        );
        let resp = |fenced: bool, error: Option<&str>, items: Vec<WriteResult>| crate::raft::Response {
            applied_index: 3,
            error: error.map(String::from),
            value: 0,
            fenced,
            items,
        };
        // A lone write answered as a plain Write.
        assert_eq!(
            write_results(1, resp(false, None, vec![])),
            vec![Ok(WriteResult::Written)]
        );
        assert_eq!(
            write_results(1, resp(true, None, vec![])),
            vec![Ok(WriteResult::Fenced)]
        );
        assert_eq!(
            write_results(1, resp(false, Some("beyond"), vec![])),
            vec![Ok(WriteResult::Refused("beyond".into()))]
        );
        // Coalesced: one result per item, in order.
        let items = vec![WriteResult::Fenced, WriteResult::Written];
        assert_eq!(
            write_results(2, resp(false, None, items)),
            vec![Ok(WriteResult::Fenced), Ok(WriteResult::Written)]
        );
        // A response that does not fit (never from our state machine) acknowledges nothing.
        let r = write_results(2, resp(false, None, vec![WriteResult::Written]));
        assert!(r.iter().all(|a| matches!(a, Ok(WriteResult::Refused(_)))), "{r:?}");
    }

    /// A one-node volume group on the real log store and state machine.
    async fn single_node_group(dir: &std::path::Path, size_bytes: u64) -> (RaftGroup, GroupStateMachine) {
        let config = openraft::Config {
            heartbeat_interval: 100,
            election_timeout_min: 300,
            election_timeout_max: 600,
            ..Default::default()
        };
        let config = Arc::new(config.validate().unwrap());
        let channels = crate::rpc::Channels::new(None).unwrap();
        let net = crate::rpc::NetworkFactory::new(7, channels, crate::rpc::SnapshotProgress::default());
        let log = crate::raft::LogStore::open(dir.join("log"), crate::raft::LogStoreOptions::default()).unwrap();
        let sm = GroupStateMachine::open_volume(&dir.join("sm"), size_bytes).unwrap();
        let raft = openraft::Raft::new(1, config, net, log, sm.clone()).await.unwrap();
        let members = std::collections::BTreeMap::from([(1u64, openraft::BasicNode::new("127.0.0.1:1"))]);
        raft.initialize(members).await.unwrap();
        raft.wait(Some(Duration::from_secs(20)))
            .metrics(|m| m.current_leader == Some(1), "leader")
            .await
            .unwrap();
        // A fresh leader refuses proposals until its lease is established.
        for _ in 0..100 {
            if raft.ensure_linearizable(ReadPolicy::ReadIndex).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (raft, sm)
    }

    /// Writes queued at one moment become few entries; each gets its own result (a fenced
    /// session's write refused, an out-of-range one refused, the rest written in queue order),
    /// and each holds the shared gate until its answer (DESIGN.md invariant 1: answered after
    /// the entry is applied).
    #[tokio::test]
    async fn the_batcher_coalesces_queued_writes_and_answers_each() {
        const SIZE: u64 = 1 << 20;
        let dir = tempfile::tempdir().unwrap();
        let (raft, sm) = single_node_group(dir.path(), SIZE).await;
        let fenced_key = 0x99;
        propose(raft.clone(), 1, Request::Fence { keys: vec![fenced_key] })
            .await
            .unwrap();
        let before = sm.applied_index();
        let batcher = WriteBatcher::spawn(raft.clone(), 1, 7, "test");
        let gate = Arc::new(tokio::sync::RwLock::new(()));
        let mut answers = Vec::new();
        let mut expected = vec![0u8; SIZE as usize];
        // Queued without yielding (current-thread runtime): the batcher finds them all queued.
        for i in 0..200u64 {
            let origin = if i % 7 == 3 { fenced_key } else { 1 + i % 3 };
            let offset = if i == 150 { SIZE - 100 } else { (i % 50) * 4096 + i };
            let data = vec![i as u8 + 1; 4096];
            if origin != fenced_key && offset + 4096 <= SIZE {
                let o = offset as usize;
                expected[o..o + 4096].copy_from_slice(&data);
            }
            let (w, a) = queued(&gate, offset, data, origin);
            batcher.queue.try_send(w).unwrap();
            answers.push((i, origin, offset, a));
        }
        assert!(gate.try_write().is_err(), "queued writes hold the gate shared");
        for (i, origin, offset, a) in answers {
            let got = tokio::time::timeout(Duration::from_secs(30), a).await.unwrap().unwrap();
            let want = if origin == fenced_key {
                WriteResult::Fenced
            } else if offset + 4096 > SIZE {
                WriteResult::Refused(String::new())
            } else {
                WriteResult::Written
            };
            match (&got, &want) {
                (Ok(WriteResult::Refused(e)), WriteResult::Refused(_)) => assert!(e.contains("beyond the end"), "{e}"),
                (Ok(g), w) => assert_eq!(g, w, "write {i}"),
                (Err(e), _) => panic!("write {i} fenced: {e}"),
            }
        }
        // 64 + 64 + 64 + 8: four entries, not 200.
        assert_eq!(sm.applied_index() - before, 4);
        let img = sm.image().unwrap();
        let mut got = vec![0u8; SIZE as usize];
        img.read_at(&mut got, 0).unwrap();
        assert!(got == expected, "image differs from the writes applied in queue order");
        // Every answer released its gate: a COMPARE AND WRITE could run now.
        assert!(gate.try_write().is_ok());

        // A lone write is proposed at once, as one plain entry.
        let (w, a) = queued(&gate, 0, vec![0xAB; 512], 0);
        batcher.queue.send(w).await.unwrap();
        assert_eq!(a.await.unwrap(), Ok(WriteResult::Written));
        assert_eq!(sm.applied_index() - before, 5);

        // The group is gone: every write of the failed proposal is fenced (never acknowledged).
        raft.shutdown().await.unwrap();
        let mut answers = Vec::new();
        for i in 0..3 {
            let (w, a) = queued(&gate, i * 4096, vec![1; 4096], 0);
            batcher.queue.try_send(w).unwrap();
            answers.push(a);
        }
        for a in answers {
            let got = tokio::time::timeout(Duration::from_secs(30), a).await.unwrap().unwrap();
            assert!(got.is_err(), "{got:?}");
        }
        assert!(gate.try_write().is_ok());
    }
}
