//! The direct iSCSI workload: workers that speak iSCSI to the portals themselves, one session
//! per portal (`raftsan_initiator::session`), with no initiator daemon and no NBD in between.
//!
//! * Writes go to the portal that reports Active/Optimized (REPORT TARGET PORT GROUPS, matched to
//!   a portal through the port group of its VPD page 0x83). A write that gets CHECK CONDITION
//!   with UNIT ATTENTION (2A/06 after a leadership change) is sent again on the same portal: it
//!   was not executed (DESIGN.md invariant 3). NOT READY (the LU is transitioning) or a portal
//!   that cannot be logged in to moves the write to the next portal. A write whose session broke
//!   or timed out after it was sent has an unknown fate: the oracle keeps it as possibly landed
//!   (`end_write(.., false, ..)`) and the worker moves on.
//! * Reads go to every portal in turn, non-leader portals included (they forward to the leader),
//!   so every path must return linearizable data, also right after failovers.
//! * A broken session is dropped and logged in again, with a backoff per portal.
//! * The portal set changes with the cluster's members (`replace-node`): a new node's portal is
//!   added ([`Direct::add_portal`]), a removed node's portal is retired ([`Direct::retire_portal`]):
//!   its session is closed and no command goes there again. A command already sent to it when it
//!   went away has an unknown outcome, as with any broken session; data it returned is judged.
//!
//! The workers use their own block range, disjoint from the NBD workers', and judge everything
//! with the same [`Oracle`](crate::oracle::Oracle) and stall records as the NBD workload.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bytes::Bytes;
use raftsan_initiator::scsi::{self, AluaState, Capacity, DeviceId, Sense, key, status};
use raftsan_initiator::session::{Command, Session, SessionConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::watch;

use crate::oracle::{BLOCK, encode};
use crate::workload::{Op, Shared};

/// How long one operation keeps retrying (UNIT ATTENTION, NOT READY, no portal) before it is
/// reported as an I/O error; the initiator's `no_path_retry` of the run is the same.
const OP_DEADLINE: Duration = Duration::from_secs(60);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
pub struct IscsiConfig {
    /// First block (of [`BLOCK`] bytes) of the range; the NBD workers use `[0, 4096)` by default.
    pub first_block: u64,
    /// Blocks in the range.
    pub blocks: u64,
    /// Concurrent workers.
    pub workers: usize,
    /// Share of reads among operations.
    pub read_fraction: f64,
}

impl Default for IscsiConfig {
    fn default() -> Self {
        IscsiConfig {
            first_block: 8192,
            blocks: 2048,
            workers: 4,
            read_fraction: 0.5,
        }
    }
}

/// The target the workers log in to.
#[derive(Clone, Debug)]
pub struct IscsiTarget {
    pub iqn: String,
    pub lun: u64,
    /// One per node.
    pub portals: Vec<SocketAddr>,
    pub initiator_name: String,
}

/// What the direct workers did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct IscsiFigures {
    pub writes_acked: u64,
    /// Every portal the workload used, in the order of the per-portal figures (the run's
    /// portals, then those of nodes added during the run).
    pub portals: Vec<String>,
    /// Portals of nodes removed during the run (no longer read or written).
    pub retired: Vec<String>,
    /// Writes acknowledged, per portal (in the order of [`IscsiFigures::portals`]).
    pub writes_per_portal: Vec<u64>,
    /// Fate unknown (the session broke after the write was sent) or given up.
    pub writes_failed: u64,
    pub reads_checked: u64,
    /// Reads judged, per portal (in the order of [`IscsiFigures::portals`]).
    pub reads_per_portal: Vec<u64>,
    /// Commands sent again after CHECK CONDITION / UNIT ATTENTION.
    pub retried_unit_attention: u64,
    /// Commands moved to another portal after NOT READY.
    pub retried_not_ready: u64,
    /// Sessions that broke or timed out under a command.
    pub session_failures: u64,
    pub logins: u64,
    pub syncs: u64,
    /// Blocks read back on every portal after the run.
    pub final_reads: u64,
}

#[derive(Default)]
struct Counters {
    writes_acked: AtomicU64,
    writes_failed: AtomicU64,
    reads_checked: AtomicU64,
    ua: AtomicU64,
    not_ready: AtomicU64,
    session_failures: AtomicU64,
    logins: AtomicU64,
    syncs: AtomicU64,
    final_reads: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

struct Path {
    addr: SocketAddr,
    /// The portal's node left the cluster: no command goes here any more.
    retired: AtomicBool,
    session: tokio::sync::Mutex<Option<Session>>,
    /// No login before this instant (backoff after a failed one), and the current backoff.
    retry: Mutex<(Instant, Duration)>,
    /// This portal's target port group (VPD 0x83).
    group: Mutex<Option<u16>>,
    reads: AtomicU64,
    writes: AtomicU64,
}

impl Path {
    fn new(addr: SocketAddr) -> Path {
        Path {
            addr,
            retired: AtomicBool::new(false),
            session: tokio::sync::Mutex::new(None),
            retry: Mutex::new((Instant::now(), BACKOFF_MIN)),
            group: Mutex::new(None),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
        }
    }
}

/// The outcome of sending a command once.
enum Attempt {
    Good(Bytes),
    /// Not executed; send it again on the same portal.
    Again {
        unit_attention: bool,
    },
    /// Not executed; the LU is not ready through this portal: try the next one.
    NotReady,
    /// Not sent: no session to this portal (or it is retired).
    Unsent,
    /// Sent, but the session broke or timed out: the outcome is unknown.
    Unknown(String),
    /// An error status the workload does not expect.
    Failed(String),
}

/// Why a command did not complete GOOD.
#[derive(Debug)]
enum Fail {
    /// The session broke or timed out after it was sent: it may or may not have executed. Under
    /// faults this is expected on a single path (there is no multipath here), so it is not an
    /// I/O error by itself.
    Unknown(String),
    /// The target returned an error status, or no portal executed it in time: an I/O error
    /// returned to the client.
    Error(String),
}

impl std::fmt::Display for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fail::Unknown(e) => write!(f, "outcome unknown: {e}"),
            Fail::Error(e) => f.write_str(e),
        }
    }
}

impl Fail {
    fn io_error(&self, what: impl FnOnce() -> String) -> Option<String> {
        match self {
            Fail::Unknown(_) => None,
            Fail::Error(e) => Some(format!("{}: {e}", what())),
        }
    }
}

/// The direct sessions and their workers' shared state.
pub struct Direct {
    target: IscsiTarget,
    cfg: IscsiConfig,
    /// Every portal the workload ever used, in the order they were added (indexes are stable;
    /// a removed node's portal stays, retired).
    paths: RwLock<Vec<Arc<Path>>>,
    /// The portal reported Active/Optimized (writes go there first).
    preferred: AtomicUsize,
    /// Logical blocks per oracle block.
    lbs_per_block: AtomicU64,
    refreshing: tokio::sync::Mutex<()>,
    n: Counters,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Direct {
    /// Logs in to the portals, reads the capacity and the ALUA states.
    pub async fn connect(target: IscsiTarget, cfg: IscsiConfig) -> Result<Arc<Direct>> {
        if target.portals.is_empty() {
            bail!("no portal for the direct iSCSI workload");
        }
        let paths = target.portals.iter().map(|&addr| Arc::new(Path::new(addr))).collect();
        let d = Arc::new(Direct {
            target,
            cfg,
            paths: RwLock::new(paths),
            preferred: AtomicUsize::new(0),
            lbs_per_block: AtomicU64::new(1),
            refreshing: tokio::sync::Mutex::new(()),
            n: Counters::default(),
        });
        let started = Instant::now();
        let cap = loop {
            match d.command_anywhere(scsi::read_capacity16(), None, 32).await {
                Ok(data) => break Capacity::parse(&data)?,
                Err(e) if started.elapsed() > Duration::from_secs(30) => {
                    bail!("READ CAPACITY over the direct sessions: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        let bs = u64::from(cap.block_size);
        if bs == 0 || !(BLOCK as u64).is_multiple_of(bs) {
            bail!("logical block size {bs} does not divide {BLOCK}");
        }
        d.lbs_per_block.store(BLOCK as u64 / bs, Ordering::Relaxed);
        let end = (d.cfg.first_block + d.cfg.blocks) * BLOCK as u64;
        if end > cap.bytes() {
            bail!(
                "the direct iSCSI range ends at byte {end}, past the volume's {} bytes",
                cap.bytes()
            );
        }
        for i in 0..d.path_count() {
            let _ = d.session(i).await;
        }
        d.refresh_alua().await;
        Ok(d)
    }

    fn paths_now(&self) -> Vec<Arc<Path>> {
        self.paths.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn path(&self, i: usize) -> Option<Arc<Path>> {
        self.paths.read().unwrap_or_else(|e| e.into_inner()).get(i).cloned()
    }

    fn path_count(&self) -> usize {
        self.paths.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Adds a portal (a node that joined the cluster); the workers log in on their next command
    /// to it. Adding a portal already listed does nothing.
    pub async fn add_portal(&self, addr: SocketAddr) {
        let i = {
            let mut paths = self.paths.write().unwrap_or_else(|e| e.into_inner());
            if paths.iter().any(|p| p.addr == addr) {
                return;
            }
            paths.push(Arc::new(Path::new(addr)));
            paths.len() - 1
        };
        let _ = self.session(i).await;
        self.refresh_alua().await;
    }

    /// Retires a portal (its node left the cluster): no command is sent there again, and its
    /// session is closed. Commands in flight on it end with an unknown outcome.
    pub async fn retire_portal(&self, addr: SocketAddr) {
        let Some(p) = self.paths_now().into_iter().find(|p| p.addr == addr) else {
            return;
        };
        p.retired.store(true, Ordering::Relaxed);
        if let Some(s) = p.session.lock().await.take() {
            s.close_hard();
        }
        self.refresh_alua().await;
    }

    fn session_config(&self) -> SessionConfig {
        SessionConfig {
            initiator_name: self.target.initiator_name.clone(),
            target_name: Some(self.target.iqn.clone()),
            queue_depth: 32,
            connect_timeout: Duration::from_secs(2),
            login_timeout: Duration::from_secs(3),
            nop_interval: Duration::from_millis(500),
            nop_timeout: Duration::from_secs(1),
            command_timeout: Duration::from_secs(5),
            abort_timeout: Duration::from_secs(2),
            logout_timeout: Duration::from_secs(2),
            ..SessionConfig::default()
        }
    }

    /// The live session to portal `i`, logging in again when it is gone (not during backoff).
    async fn session(&self, i: usize) -> Option<Session> {
        let p = self.path(i)?;
        if p.retired.load(Ordering::Relaxed) {
            return None;
        }
        let mut slot = p.session.lock().await;
        if let Some(s) = slot.as_ref().filter(|s| s.is_alive()) {
            return Some(s.clone());
        }
        *slot = None;
        if Instant::now() < lock(&p.retry).0 {
            return None;
        }
        match Session::login(p.addr, self.session_config()).await {
            Ok(s) => {
                bump(&self.n.logins);
                *lock(&p.retry) = (Instant::now(), BACKOFF_MIN);
                *slot = Some(s.clone());
                Some(s)
            }
            Err(_) => {
                let mut r = lock(&p.retry);
                let backoff = r.1;
                *r = (Instant::now() + backoff, (backoff * 2).min(BACKOFF_MAX));
                None
            }
        }
    }

    /// Sends a command once on portal `i`.
    async fn attempt(&self, i: usize, cdb: Vec<u8>, data_out: Option<Bytes>, data_in_len: u32) -> Attempt {
        let Some(s) = self.session(i).await else {
            return Attempt::Unsent;
        };
        let cmd = Command {
            lun: self.target.lun,
            cdb,
            data_out,
            data_in_len,
        };
        let r = match s.execute(cmd).await {
            Ok(r) => r,
            Err(e) => {
                bump(&self.n.session_failures);
                s.close_hard();
                let addr = self.path(i).map(|p| p.addr.to_string()).unwrap_or_default();
                return Attempt::Unknown(format!("{addr}: {e}"));
            }
        };
        match r.status {
            status::GOOD => return Attempt::Good(r.data),
            status::BUSY | status::TASK_SET_FULL | status::TASK_ABORTED => {
                return Attempt::Again { unit_attention: false };
            }
            status::CHECK_CONDITION => {}
            other => return Attempt::Failed(format!("SCSI status {other:#04x}")),
        }
        let Some(sense) = r.sense.as_deref().and_then(Sense::parse) else {
            return Attempt::Failed("CHECK CONDITION without sense data".into());
        };
        match sense.code.key {
            key::UNIT_ATTENTION => Attempt::Again { unit_attention: true },
            key::NOT_READY => Attempt::NotReady,
            key::ABORTED_COMMAND => Attempt::Again { unit_attention: false },
            _ => Attempt::Failed(format!("CHECK CONDITION: {sense}")),
        }
    }

    /// Sends a command, retrying as the module explains, starting on portal `first`; returns
    /// the data and the portal that executed it.
    async fn command(
        &self,
        first: usize,
        cdb: Vec<u8>,
        data_out: Option<Bytes>,
        data_in_len: u32,
        started: Instant,
    ) -> std::result::Result<(Bytes, usize), Fail> {
        let mut i = first % self.path_count().max(1);
        let mut unsent_in_a_row = 0;
        loop {
            let n = self.path_count().max(1);
            if started.elapsed() > OP_DEADLINE {
                return Err(Fail::Error(format!("no portal executed it within {OP_DEADLINE:?}")));
            }
            match self.attempt(i, cdb.clone(), data_out.clone(), data_in_len).await {
                Attempt::Good(d) => return Ok((d, i)),
                Attempt::Again { unit_attention } => {
                    unsent_in_a_row = 0;
                    if unit_attention {
                        bump(&self.n.ua);
                        self.refresh_alua().await;
                    } else {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                Attempt::NotReady => {
                    bump(&self.n.not_ready);
                    i = (i + 1) % n;
                    unsent_in_a_row = 0;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    self.refresh_alua().await;
                }
                Attempt::Unsent => {
                    i = (i + 1) % n;
                    unsent_in_a_row += 1;
                    if unsent_in_a_row >= n {
                        unsent_in_a_row = 0;
                        tokio::time::sleep(BACKOFF_MIN).await;
                    }
                }
                Attempt::Unknown(e) => {
                    self.refresh_alua().await;
                    return Err(Fail::Unknown(e));
                }
                Attempt::Failed(e) => return Err(Fail::Error(e)),
            }
        }
    }

    /// A command through any portal (identity and setup commands).
    async fn command_anywhere(
        &self,
        cdb: Vec<u8>,
        data_out: Option<Bytes>,
        data_in_len: u32,
    ) -> std::result::Result<Bytes, String> {
        let first = self.preferred.load(Ordering::Relaxed);
        self.command(first, cdb, data_out, data_in_len, Instant::now())
            .await
            .map(|(d, _)| d)
            .map_err(|e| e.to_string())
    }

    /// Learns each live portal's port group and which group is Active/Optimized; writes go to
    /// that portal first. Best effort: a failure leaves the preference as it was.
    async fn refresh_alua(&self) {
        let Ok(_one) = self.refreshing.try_lock() else {
            return;
        };
        let mut groups = Vec::new();
        let mut states = None;
        let paths = self.paths_now();
        for (i, p) in paths.iter().enumerate() {
            if p.retired.load(Ordering::Relaxed) {
                continue;
            }
            let Some(s) = p.session.lock().await.clone().filter(Session::is_alive) else {
                continue;
            };
            let known = *lock(&p.group);
            let group = match known {
                Some(g) => Some(g),
                None => {
                    let r = s
                        .execute(Command {
                            lun: self.target.lun,
                            cdb: scsi::inquiry(Some(0x83), 1024),
                            data_out: None,
                            data_in_len: 1024,
                        })
                        .await;
                    let g = r
                        .ok()
                        .filter(|r| r.status == status::GOOD)
                        .and_then(|r| DeviceId::parse(&r.data).ok())
                        .and_then(|d| d.port_group);
                    *lock(&p.group) = g;
                    g
                }
            };
            if let Some(g) = group {
                groups.push((i, g));
            }
            if states.is_none() {
                let r = s
                    .execute(Command {
                        lun: self.target.lun,
                        cdb: scsi::report_target_port_groups(1024),
                        data_out: None,
                        data_in_len: 1024,
                    })
                    .await;
                states = r
                    .ok()
                    .filter(|r| r.status == status::GOOD)
                    .and_then(|r| scsi::parse_port_groups(&r.data).ok());
            }
        }
        let Some(states) = states else { return };
        let optimized = states.iter().find(|g| g.state == AluaState::Optimized).map(|g| g.id);
        if let Some(&(i, _)) = groups.iter().find(|(_, g)| Some(*g) == optimized) {
            self.preferred.store(i, Ordering::Relaxed);
        }
    }

    fn lba(&self, block: u64) -> (u64, u32) {
        let per = self.lbs_per_block.load(Ordering::Relaxed);
        (block * per, per as u32)
    }

    /// One write of `block`, judged by the oracle; false when its outcome is unknown.
    async fn write(&self, shared: &Shared, block: u64) -> bool {
        let started = Instant::now();
        let start = shared.now_ns();
        let id = shared.oracle().begin_write(block, start);
        let (lba, n) = self.lba(block);
        let first = self.preferred.load(Ordering::Relaxed);
        let data = Bytes::from(encode(block, id));
        let r = self
            .command(first, scsi::write16(lba, n, false), Some(data), 0, started)
            .await;
        let end = shared.now_ns();
        let ok = r.is_ok();
        shared.oracle().end_write(block, id, ok, end);
        let error = match r {
            Ok((_, i)) => {
                self.preferred.store(i, Ordering::Relaxed);
                if let Some(p) = self.path(i) {
                    p.writes.fetch_add(1, Ordering::Relaxed);
                }
                bump(&self.n.writes_acked);
                None
            }
            Err(f) => {
                bump(&self.n.writes_failed);
                f.io_error(|| format!("direct write of block {block}"))
            }
        };
        shared.record_op(
            Op {
                start_ns: start,
                end_ns: end,
                ok,
                direct: true,
            },
            error,
        );
        ok
    }

    /// One read of `block` on portal `portal` (or the next one that answers), judged by the
    /// oracle against the interval of the attempt that returned the data.
    async fn read(&self, shared: &Shared, block: u64, portal: usize) {
        let started = Instant::now();
        let start = shared.now_ns();
        let (lba, n) = self.lba(block);
        let r = self
            .command(portal, scsi::read16(lba, n), None, BLOCK as u32, started)
            .await;
        let end = shared.now_ns();
        let (ok, error) = match r {
            // Attempts before the one that returned the data were not executed (or were reads
            // that broke): the whole interval is a valid interval of the read.
            Ok((data, used)) => {
                let _ = shared.oracle().check_read(block, &data, start, end);
                bump(&self.n.reads_checked);
                if let Some(p) = self.path(used) {
                    p.reads.fetch_add(1, Ordering::Relaxed);
                }
                (true, None)
            }
            Err(f) => (false, f.io_error(|| format!("direct read of block {block}"))),
        };
        shared.record_op(
            Op {
                start_ns: start,
                end_ns: end,
                ok,
                direct: true,
            },
            error,
        );
    }

    /// SYNCHRONIZE CACHE (16) through the preferred portal (retried like a write); true when it
    /// completed GOOD.
    pub async fn synchronize_cache(&self) -> bool {
        let first = self.preferred.load(Ordering::Relaxed);
        let ok = self
            .command(first, scsi::synchronize_cache16(), None, 0, Instant::now())
            .await
            .is_ok();
        if ok {
            bump(&self.n.syncs);
        }
        ok
    }

    /// Runs the workers until `stop` turns true.
    pub async fn run(self: Arc<Self>, shared: Arc<Shared>, seed: u64, stop: watch::Receiver<bool>) {
        let mut tasks = Vec::new();
        for w in 0..self.cfg.workers {
            let d = self.clone();
            let shared = shared.clone();
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(seed ^ 0x15c5_1000 ^ (w as u64).wrapping_mul(0x9e37_79b9));
                let (lo, hi) = (d.cfg.first_block, d.cfg.first_block + d.cfg.blocks);
                let mut next_portal = w;
                while !*stop.borrow() {
                    let b = shared.claim_range(&mut rng, lo, hi);
                    if rng.random_bool(d.cfg.read_fraction) {
                        d.read(&shared, b, next_portal).await;
                        next_portal = next_portal.wrapping_add(1);
                    } else if !d.write(&shared, b).await {
                        // A broken session: give the portal a moment before the next command.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    shared.release(b);
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Reads every written block of the range once on every live (not retired) portal and
    /// judges it (after the faults are healed); returns how many reads were judged.
    pub async fn verify_all_portals(&self, shared: &Shared) -> u64 {
        let (lo, hi) = (self.cfg.first_block, self.cfg.first_block + self.cfg.blocks);
        let blocks: Vec<u64> = shared
            .oracle()
            .written_blocks()
            .into_iter()
            .filter(|b| (lo..hi).contains(b))
            .collect();
        let before = self.n.reads_checked.load(Ordering::Relaxed);
        for (i, p) in self.paths_now().iter().enumerate() {
            if p.retired.load(Ordering::Relaxed) {
                continue;
            }
            for &b in &blocks {
                self.read(shared, b, i).await;
            }
        }
        let n = self.n.reads_checked.load(Ordering::Relaxed) - before;
        self.n.final_reads.fetch_add(n, Ordering::Relaxed);
        n
    }

    /// Logs out of every session.
    pub async fn logout(&self) {
        for p in self.paths_now() {
            if let Some(s) = p.session.lock().await.take() {
                let _ = s.logout().await;
            }
        }
    }

    pub fn figures(&self) -> IscsiFigures {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        IscsiFigures {
            writes_acked: g(&self.n.writes_acked),
            writes_per_portal: self.paths_now().iter().map(|p| g(&p.writes)).collect(),
            writes_failed: g(&self.n.writes_failed),
            reads_checked: g(&self.n.reads_checked),
            reads_per_portal: self.paths_now().iter().map(|p| g(&p.reads)).collect(),
            portals: self.paths_now().iter().map(|p| p.addr.to_string()).collect(),
            retired: self
                .paths_now()
                .iter()
                .filter(|p| p.retired.load(Ordering::Relaxed))
                .map(|p| p.addr.to_string())
                .collect(),
            retried_unit_attention: g(&self.n.ua),
            retried_not_ready: g(&self.n.not_ready),
            session_failures: g(&self.n.session_failures),
            logins: g(&self.n.logins),
            syncs: g(&self.n.syncs),
            final_reads: g(&self.n.final_reads),
        }
    }
}
