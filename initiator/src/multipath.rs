//! Multipath: one logical unit reached through several portals.
//!
//! A [`Multipath`] keeps one session per portal (a *path*), each run by its own task that logs in,
//! probes the LU (INQUIRY, Device Identification, REPORT TARGET PORT GROUPS), and logs in again
//! with backoff when the session dies. Paths whose LU identity differs from the first path's are
//! refused, so a misconfigured portal can never mix two volumes.
//!
//! [`Multipath::execute`] sends a command down the best usable path: Active/Optimized first, then
//! Active/Non-optimized (or paths of a target without ALUA), then Transitioning, the least busy
//! path among equals. It retries the command when
//! - the path fails (connection loss, keepalive or command timeout, protocol error): the path is
//!   closed hard and the command goes down another path,
//! - the target reports a UNIT ATTENTION (the command was not executed; 2A/06 also refreshes the
//!   ALUA states), a NOT READY access state (04/0A, 04/0B, 04/0C: the path's state is updated
//!   from the sense and refreshed), BUSY, TASK SET FULL or ABORTED COMMAND.
//!
//! A command that failed with its path (connection lost, keepalive or command timeout) may still
//! be in the network and reach the target late, after it was re-sent elsewhere and newer data
//! was written (DESIGN.md invariant 3). Before the next command goes down any path, the layer
//! names such abandoned sessions to the target in a FENCE SESSIONS command
//! (`raftsan_proto::scsi::fence`): a raftsan cluster then refuses their writes. A target that
//! does not know the command (ILLEGAL REQUEST 20/00) is noted once and not asked again.
//!
//! While no path is usable, commands wait for one for at most `no_path_retry` (dm-multipath's
//! `no_path_retry` as a time), then fail with [`MultipathError::NoPath`]. A better path that
//! comes back is used by the next command (immediate failback). A failed path logs in again
//! with a growing backoff (up to 5 s), but when a path fails or commands have none, the failed
//! ones are told to try at once (at most every 250 ms) and SendTargets runs again (at most each
//! second, through any known portal), so a restarted node or one that joined since is used as
//! soon as it answers.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

pub use raftsan_proto::scsi::fence;
use raftsan_proto::scsi::fence::SessionRef;

use crate::metrics::TargetMetrics;
use crate::scsi::{self, AluaState, Designator, DeviceId, Sense, StandardInquiry, key, status};

/// A SCSI command as the multipath layer sends it.
#[derive(Clone, Debug)]
pub struct Request {
    pub lun: u64,
    pub cdb: Vec<u8>,
    pub data_out: Option<Bytes>,
    pub data_in_len: u32,
}

/// A target's answer to a command that completed on its path.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u8,
    /// Sense data (without the iSCSI length prefix).
    pub sense: Option<Bytes>,
    pub data: Bytes,
}

impl Reply {
    pub fn sense(&self) -> Option<Sense> {
        self.sense.as_deref().and_then(Sense::parse)
    }

    /// `Ok(data)` for GOOD; otherwise a description of the status and sense.
    pub fn good(self) -> Result<Bytes, String> {
        if self.status == status::GOOD || self.status == status::CONDITION_MET {
            return Ok(self.data);
        }
        Err(describe_status(self.status, self.sense()))
    }
}

fn describe_status(s: u8, sense: Option<Sense>) -> String {
    let name = match s {
        status::CHECK_CONDITION => "CHECK CONDITION",
        status::BUSY => "BUSY",
        status::RESERVATION_CONFLICT => "RESERVATION CONFLICT",
        status::TASK_SET_FULL => "TASK SET FULL",
        status::TASK_ABORTED => "TASK ABORTED",
        _ => "status",
    };
    match sense {
        Some(sense) => format!("{name} ({s:02x}h): {sense}"),
        None => format!("{name} ({s:02x}h)"),
    }
}

/// Why a path cannot carry a command (the session is gone or is being torn down).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PathFailure(pub String);

/// One logged-in session through one portal.
pub trait PathConn: Clone + Send + Sync + 'static {
    /// Runs a command; `Err` only when the path failed (the command's fate is unknown).
    fn execute(&self, req: Request) -> impl Future<Output = Result<Reply, PathFailure>> + Send;
    /// Resolves when the session is dead, with the reason.
    fn closed(&self) -> impl Future<Output = PathFailure> + Send;
    /// Drops the connection now; pending and later commands fail.
    fn close_hard(&self);
    /// Logs out cleanly (bounded).
    fn logout(&self) -> impl Future<Output = ()> + Send;
    /// Negotiated parameters and connection facts, for `session` output.
    fn details(&self) -> Vec<(String, String)>;
    /// The session as the target knows it (TPGT, TSIH, ISID), to fence it once abandoned.
    fn session_ref(&self) -> Option<SessionRef> {
        None
    }
}

/// A portal a target reported through SendTargets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveredPortal {
    pub address: String,
    pub tpgt: u16,
}

/// Creates paths.
pub trait Connector: Send + Sync + 'static {
    type Conn: PathConn;
    /// Logs into `target` through `portal` ("host:port").
    fn connect(&self, portal: &str, target: &str) -> impl Future<Output = Result<Self::Conn, PathFailure>> + Send;
    /// SendTargets through `portal`: every target with its portals.
    fn discover(
        &self,
        portal: &str,
    ) -> impl Future<Output = Result<Vec<(String, Vec<DiscoveredPortal>)>, PathFailure>> + Send;
}

/// Multipath settings.
#[derive(Clone, Debug)]
pub struct MultipathConfig {
    pub target: String,
    pub lun: u64,
    /// Portals to log in through ("host:port").
    pub portals: Vec<String>,
    /// Also log in through every portal SendTargets reports for the target.
    pub discover: bool,
    /// How long commands wait while no path is usable before they fail.
    pub no_path_retry: Duration,
    /// Backoff between login attempts on one portal: starts at the first, doubles up to the second.
    pub relogin_backoff: (Duration, Duration),
    /// Interval of the ALUA state poll (also refreshed on every 2A/06 and state sense).
    pub alua_refresh: Duration,
    /// How many failed paths one command may meet (connection lost, timeouts) before it fails.
    /// Re-sends after answers that say the command was not executed (unit attention,
    /// transitioning, busy) are not counted; they, and the whole command, are bounded in time
    /// by `no_path_retry`, after which the last answer is returned as is.
    pub max_retries: u32,
}

impl Default for MultipathConfig {
    fn default() -> Self {
        MultipathConfig {
            target: String::new(),
            lun: 0,
            portals: Vec::new(),
            discover: true,
            no_path_retry: Duration::from_secs(30),
            relogin_backoff: (Duration::from_millis(100), Duration::from_secs(5)),
            alua_refresh: Duration::from_secs(5),
            max_retries: 64,
        }
    }
}

/// A command that could not be completed on any path.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MultipathError {
    #[error("no usable path to {target} for {waited:?} (no_path_retry); paths: {paths}")]
    NoPath {
        target: String,
        waited: Duration,
        paths: String,
    },
    #[error("command sent {tries} times without success; last failure: {last}")]
    TooManyRetries { tries: u32, last: String },
    #[error("the multipath device is shut down")]
    ShutDown,
}

/// Where a path is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathStatus {
    Connecting,
    Up,
    Failed,
    /// Logged out by the administrator.
    Disabled,
}

impl fmt::Display for PathStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathStatus::Connecting => "connecting",
            PathStatus::Up => "up",
            PathStatus::Failed => "failed",
            PathStatus::Disabled => "disabled",
        })
    }
}

/// A path as `session` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PathView {
    pub portal: String,
    pub tpgt: Option<u16>,
    pub status: PathStatus,
    pub alua: String,
    pub port_group: Option<u16>,
    pub relative_port: Option<u16>,
    pub in_flight: u32,
    pub commands: u64,
    pub failures: u64,
    pub last_error: Option<String>,
    /// Seconds in the current status.
    pub for_secs: f64,
    pub details: BTreeMap<String, String>,
}

/// The whole device as `session` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MultipathView {
    pub target: String,
    pub lun: u64,
    pub identity: Option<String>,
    pub vendor: Option<String>,
    pub product: Option<String>,
    pub usable_paths: usize,
    pub failovers: u64,
    pub retried_commands: u64,
    pub queued_commands: u64,
    pub paths: Vec<PathView>,
}

/// Counters a metrics layer can read.
#[derive(Debug, Default)]
pub struct Counters {
    /// Path failures that sent commands to another path.
    pub failovers: AtomicU64,
    /// Commands re-sent (on any path, for any reason).
    pub retried: AtomicU64,
    /// Commands waiting now because no path is usable.
    pub queued: AtomicU64,
}

struct Path<P> {
    portal: String,
    tpgt: Option<u16>,
    conn: Option<P>,
    /// Bumped at every new session, so a late failure report of an old one is ignored.
    generation: u64,
    status: PathStatus,
    since: Instant,
    alua: AluaState,
    port_group: Option<u16>,
    relative_port: Option<u16>,
    in_flight: Arc<AtomicU32>,
    commands: u64,
    failures: u64,
    last_error: Option<String>,
    disabled: bool,
    /// Wakes the path's task (failure reported, disabled or enabled).
    kick: Arc<Notify>,
    /// Wakes the path task from a relogin backoff ([`Multipath::kick_failed_paths`]).
    relogin: Arc<Notify>,
}

impl<P> Path<P> {
    fn set_status(&mut self, s: PathStatus) {
        if self.status != s {
            self.status = s;
            self.since = Instant::now();
        }
    }
}

struct Shared<C: Connector> {
    cfg: MultipathConfig,
    connector: C,
    paths: Mutex<Vec<Path<C::Conn>>>,
    identity: Mutex<Option<(Designator, StandardInquiry)>>,
    /// Bumped whenever a path changes state (waiters re-pick).
    changed: watch::Sender<u64>,
    refresh: Notify,
    stop: watch::Sender<bool>,
    counters: Counters,
    /// Prometheus handles, registered once at start.
    metrics: TargetMetrics,
    /// Sessions abandoned with commands of unknown fate, not fenced yet.
    unfenced: Mutex<Vec<SessionRef>>,
    /// One FENCE SESSIONS at a time.
    fencing: tokio::sync::Mutex<()>,
    /// The target answered FENCE SESSIONS with INVALID COMMAND OPERATION CODE.
    fence_unsupported: AtomicBool,
    /// When failed paths were last told to log in again at once ([`Multipath::kick_failed_paths`]).
    relogin_kicked: Mutex<Option<Instant>>,
    /// Asks the discovery task for a SendTargets round now (rate-limited there).
    rediscover: Notify,
}

/// Failed paths are told to log in again at once at most this often while commands have no
/// usable path or a path has just failed; otherwise each waits out its own backoff.
const RELOGIN_KICK_EVERY: Duration = Duration::from_millis(250);

/// Discovery rounds asked for by path failures are at least this far apart.
const REDISCOVER_EVERY: Duration = Duration::from_secs(1);

/// A multipath logical unit. Cheap to clone.
pub struct Multipath<C: Connector> {
    shared: Arc<Shared<C>>,
}

impl<C: Connector> Clone for Multipath<C> {
    fn clone(&self) -> Self {
        Multipath {
            shared: self.shared.clone(),
        }
    }
}

struct Picked<P> {
    index: usize,
    generation: u64,
    conn: P,
    in_flight: Arc<AtomicU32>,
}

struct InFlight(Arc<AtomicU32>);

/// One command waiting for a usable path: counted in `Counters::queued` and the queued gauge
/// until dropped (also when the waiting command is cancelled).
struct Queued<'a, C: Connector>(&'a Shared<C>);

impl<'a, C: Connector> Queued<'a, C> {
    fn new(shared: &'a Shared<C>) -> Self {
        shared.counters.queued.fetch_add(1, Ordering::Relaxed);
        shared.metrics.queued.increment(1.0);
        Queued(shared)
    }
}

impl<C: Connector> Drop for Queued<'_, C> {
    fn drop(&mut self) {
        self.0.counters.queued.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.queued.decrement(1.0);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why the command waits instead of going down the picked path (the fence did not pass).
enum FenceHold {
    PathFailed(PathFailure),
    Retry(Duration),
}

/// What to do with a completed command.
enum Verdict {
    Done,
    /// Not executed; send again (2A/06 also refreshes ALUA).
    Again {
        refresh: bool,
    },
    /// The path's port is in this state; try another path.
    PathState(AluaState),
    /// Target busy: back off briefly, then send again.
    Backoff,
}

fn verdict(reply: &Reply) -> Verdict {
    match reply.status {
        status::BUSY | status::TASK_SET_FULL | status::TASK_ABORTED => return Verdict::Backoff,
        status::CHECK_CONDITION => {}
        _ => return Verdict::Done,
    }
    let Some(sense) = reply.sense() else {
        return Verdict::Done;
    };
    let c = sense.code;
    match c.key {
        key::UNIT_ATTENTION => Verdict::Again {
            refresh: c.asc == 0x2a && c.ascq == 0x06 || c.asc == 0x29,
        },
        key::NOT_READY if c.asc == 0x04 => match c.ascq {
            0x0a => Verdict::PathState(AluaState::Transitioning),
            0x0b => Verdict::PathState(AluaState::Standby),
            0x0c => Verdict::PathState(AluaState::Unavailable),
            // Becoming ready, or another transient reason: back off and retry.
            0x01 => Verdict::Backoff,
            _ => Verdict::Done,
        },
        key::ABORTED_COMMAND => Verdict::Backoff,
        _ => Verdict::Done,
    }
}

impl<C: Connector> Multipath<C> {
    /// Starts the path tasks; returns at once (see [`Multipath::wait_usable`]).
    pub fn start(connector: C, cfg: MultipathConfig) -> Multipath<C> {
        let (changed, _) = watch::channel(0);
        let (stop, _) = watch::channel(false);
        let metrics = TargetMetrics::new(&cfg.target);
        let shared = Arc::new(Shared {
            cfg,
            connector,
            paths: Mutex::new(Vec::new()),
            identity: Mutex::new(None),
            changed,
            refresh: Notify::new(),
            stop,
            counters: Counters::default(),
            metrics,
            unfenced: Mutex::new(Vec::new()),
            fencing: tokio::sync::Mutex::new(()),
            fence_unsupported: AtomicBool::new(false),
            relogin_kicked: Mutex::new(None),
            rediscover: Notify::new(),
        });
        let mp = Multipath { shared };
        for portal in mp.shared.cfg.portals.clone() {
            mp.add_portal(&portal, None);
        }
        if mp.shared.cfg.discover {
            let d = mp.clone();
            tokio::spawn(async move { d.discovery_task().await });
        }
        let r = mp.clone();
        tokio::spawn(async move { r.refresh_task().await });
        mp
    }

    pub fn config(&self) -> &MultipathConfig {
        &self.shared.cfg
    }

    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    fn paths(&self) -> MutexGuard<'_, Vec<Path<C::Conn>>> {
        self.shared.paths.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.shared.changed.send_modify(|g| *g = g.wrapping_add(1));
    }

    fn stopped(&self) -> bool {
        *self.shared.stop.borrow()
    }

    /// Adds a portal (no-op when known) and starts its path task.
    pub fn add_portal(&self, portal: &str, tpgt: Option<u16>) -> bool {
        let kick = Arc::new(Notify::new());
        let relogin = Arc::new(Notify::new());
        {
            let mut paths = self.paths();
            if let Some(p) = paths.iter_mut().find(|p| p.portal == portal) {
                p.tpgt = p.tpgt.or(tpgt);
                return false;
            }
            paths.push(Path {
                portal: portal.to_string(),
                tpgt,
                conn: None,
                generation: 0,
                status: PathStatus::Connecting,
                since: Instant::now(),
                alua: AluaState::Unknown,
                port_group: None,
                relative_port: None,
                in_flight: Arc::new(AtomicU32::new(0)),
                commands: 0,
                failures: 0,
                last_error: None,
                disabled: false,
                kick: kick.clone(),
                relogin: relogin.clone(),
            });
        }
        info!(target = %self.shared.cfg.target, portal, "path added");
        let mp = self.clone();
        let portal = portal.to_string();
        tokio::spawn(async move { mp.path_task(portal, kick, relogin).await });
        self.bump();
        true
    }

    /// Logs out of one portal and keeps it logged out until [`Multipath::enable`].
    pub fn disable(&self, portal: &str) -> bool {
        self.set_disabled(portal, true)
    }

    /// Lets a disabled portal log in again.
    pub fn enable(&self, portal: &str) -> bool {
        self.set_disabled(portal, false)
    }

    fn set_disabled(&self, portal: &str, disabled: bool) -> bool {
        let mut paths = self.paths();
        let Some(p) = paths.iter_mut().find(|p| p.portal == portal) else {
            return false;
        };
        p.disabled = disabled;
        p.kick.notify_one();
        true
    }

    /// Waits until a path is usable, or `within` passes.
    pub async fn wait_usable(&self, within: Duration) -> bool {
        let mut rx = self.shared.changed.subscribe();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.pick(false).is_some() {
                return true;
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return self.pick(false).is_some();
            }
        }
    }

    /// Logs out of every path and stops the tasks.
    pub async fn shutdown(&self) {
        self.shared.stop.send_replace(true);
        let conns: Vec<C::Conn> = self.paths().iter().filter_map(|p| p.conn.clone()).collect();
        for p in self.paths().iter() {
            p.kick.notify_one();
        }
        for c in conns {
            c.logout().await;
        }
        self.bump();
    }

    /// The LU identity (VPD 0x83) and INQUIRY data every path must match, once a path probed it.
    pub fn identity(&self) -> Option<(Designator, StandardInquiry)> {
        self.shared.identity.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The best usable path; `count` records a command sent on it (under the same lock).
    fn pick(&self, count: bool) -> Option<Picked<C::Conn>> {
        let mut paths = self.paths();
        let index = paths
            .iter()
            .enumerate()
            .filter(|(_, p)| p.status == PathStatus::Up && p.conn.is_some())
            .filter_map(|(i, p)| p.alua.rank().map(|r| (r, p.in_flight.load(Ordering::Relaxed), i)))
            .min_by_key(|&(r, load, i)| (r, load, i))
            .map(|(_, _, i)| i)?;
        let p = &mut paths[index];
        if count {
            p.commands += 1;
            p.in_flight.fetch_add(1, Ordering::Relaxed);
        }
        Some(Picked {
            index,
            generation: p.generation,
            conn: p.conn.clone()?,
            in_flight: p.in_flight.clone(),
        })
    }

    fn path_failed(&self, index: usize, generation: u64, why: &PathFailure) {
        let conn = {
            let mut paths = self.paths();
            let Some(p) = paths
                .get_mut(index)
                .filter(|p| p.generation == generation && p.status == PathStatus::Up)
            else {
                return;
            };
            p.set_status(PathStatus::Failed);
            p.failures += 1;
            p.last_error = Some(why.0.clone());
            warn!(target = %self.shared.cfg.target, portal = %p.portal, error = %why, "path failed; failing over");
            p.kick.notify_one();
            p.conn.take()
        };
        self.shared.counters.failovers.fetch_add(1, Ordering::Relaxed);
        self.shared.metrics.failovers.increment(1);
        if let Some(c) = conn {
            c.close_hard();
        }
        // One path fewer: the others that failed earlier may be back by now (a restarted node
        // waits out a backoff of up to 5 s otherwise), and a node that joined since the last
        // discovery may be the one to use.
        self.kick_failed_paths(Some(index));
        self.shared.rediscover.notify_one();
        self.bump();
    }

    /// Tells every failed (not disabled) path but `except` to try its login now instead of at
    /// the end of its backoff, at most once per [`RELOGIN_KICK_EVERY`].
    fn kick_failed_paths(&self, except: Option<usize>) {
        {
            let mut last = self.shared.relogin_kicked.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|t| t.elapsed() < RELOGIN_KICK_EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        for (i, p) in self.paths().iter().enumerate() {
            if p.status == PathStatus::Failed && !p.disabled && Some(i) != except {
                p.relogin.notify_one();
            }
        }
    }

    fn set_alua(&self, index: usize, generation: u64, state: AluaState) {
        let mut paths = self.paths();
        if let Some(p) = paths.get_mut(index).filter(|p| p.generation == generation)
            && p.alua != state
        {
            info!(target = %self.shared.cfg.target, portal = %p.portal, from = %p.alua, to = %state, "path access state");
            p.alua = state;
            drop(paths);
            self.bump();
        }
    }

    /// Sends a command down the best usable path, failing over and retrying as the module
    /// documentation describes.
    pub async fn execute(&self, req: Request) -> Result<Reply, MultipathError> {
        let started = Instant::now();
        let mut stalled = false;
        let result = self.execute_on_paths(req, &mut stalled).await;
        // A command held up by a path failure (transport failure, a path reporting it cannot
        // serve, or no usable path) adds its whole time to the stall histogram, however it ended.
        if stalled && !matches!(result, Err(MultipathError::ShutDown)) {
            self.shared
                .metrics
                .failover_stall
                .record(started.elapsed().as_secs_f64());
        }
        result
    }

    async fn execute_on_paths(&self, req: Request, stalled: &mut bool) -> Result<Reply, MultipathError> {
        let cfg = &self.shared.cfg;
        let mut rx = self.shared.changed.subscribe();
        let mut no_path_since: Option<Instant> = None;
        let mut tries = 0u32;
        // Paths that failed under this command, in a row: bounded by `max_retries`.
        let mut failures = 0u32;
        let started = Instant::now();
        // A command is re-sent for at most `no_path_retry`. Answers that say it was not executed
        // (unit attention, transitioning, busy) count only against that time, however many there
        // are: a leadership move on a loaded cluster can answer 04/0A for seconds at 50 ms a
        // try and end with a unit attention, and that must not fail the command.
        let timed_out = || started.elapsed() > cfg.no_path_retry;
        let too_many_failures = |failures: u32| failures > cfg.max_retries || timed_out();
        loop {
            if self.stopped() {
                return Err(MultipathError::ShutDown);
            }
            rx.borrow_and_update();
            let Some(picked) = self.pick(true) else {
                let since = *no_path_since.get_or_insert_with(Instant::now);
                let Some(left) = cfg.no_path_retry.checked_sub(since.elapsed()).filter(|d| !d.is_zero()) else {
                    return Err(MultipathError::NoPath {
                        target: cfg.target.clone(),
                        waited: since.elapsed(),
                        paths: self.summary(),
                    });
                };
                *stalled = true;
                // Nothing usable: failed paths log in again now (and again every
                // RELOGIN_KICK_EVERY while this lasts), and discovery looks for new portals.
                self.kick_failed_paths(None);
                self.shared.rediscover.notify_one();
                let queued = Queued::new(&self.shared);
                let _ = tokio::time::timeout(left.min(RELOGIN_KICK_EVERY), rx.changed()).await;
                drop(queued);
                continue;
            };
            no_path_since = None;
            if tries > 0 {
                self.shared.counters.retried.fetch_add(1, Ordering::Relaxed);
                self.shared.metrics.retried.increment(1);
            }
            tries += 1;
            let guard = InFlight(picked.in_flight.clone());
            match self.fence_abandoned(&picked).await {
                Ok(()) => {}
                Err(FenceHold::PathFailed(failure)) => {
                    drop(guard);
                    *stalled = true;
                    self.path_failed(picked.index, picked.generation, &failure);
                    failures += 1;
                    if too_many_failures(failures) {
                        return Err(MultipathError::TooManyRetries { tries, last: failure.0 });
                    }
                    continue;
                }
                Err(FenceHold::Retry(pause)) => {
                    drop(guard);
                    *stalled = true;
                    if timed_out() {
                        return Err(MultipathError::TooManyRetries {
                            tries,
                            last: "the target did not accept FENCE SESSIONS".into(),
                        });
                    }
                    tokio::time::sleep(pause).await;
                    continue;
                }
            }
            let result = picked.conn.execute(req.clone()).await;
            drop(guard);
            let reply = match result {
                Ok(reply) => reply,
                Err(failure) => {
                    *stalled = true;
                    // Its fate is unknown: the session must be fenced before anything else runs.
                    self.abandoned(&picked.conn);
                    self.path_failed(picked.index, picked.generation, &failure);
                    failures += 1;
                    if too_many_failures(failures) {
                        return Err(MultipathError::TooManyRetries { tries, last: failure.0 });
                    }
                    continue;
                }
            };
            if timed_out() {
                return Ok(reply);
            }
            match verdict(&reply) {
                Verdict::Done => return Ok(reply),
                Verdict::Again { refresh } => {
                    if refresh {
                        self.shared.refresh.notify_one();
                    }
                    // A unit attention is retried at once, but a target that keeps answering
                    // them (a node whose view of the leader lags while leadership moves) must
                    // not burn the retry budget in milliseconds and fail the command: back off.
                    if tries > 2 {
                        let pause = Duration::from_millis(10 * u64::from(tries - 2)).min(Duration::from_millis(200));
                        tokio::time::sleep(pause).await;
                    }
                }
                Verdict::PathState(state) => {
                    *stalled = true;
                    debug!(state = %state, "path reports its access state");
                    self.set_alua(picked.index, picked.generation, state);
                    self.shared.refresh.notify_one();
                    if state == AluaState::Transitioning {
                        // Every path may be transitioning (no leader yet): do not spin.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    } else if tries > 2 {
                        // Standby or unavailable while its ALUA report says otherwise: the
                        // refresh puts it back and it answers the same; back off as above.
                        let pause = Duration::from_millis(10 * u64::from(tries - 2)).min(Duration::from_millis(200));
                        tokio::time::sleep(pause).await;
                    }
                }
                Verdict::Backoff => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    fn unfenced(&self) -> MutexGuard<'_, Vec<SessionRef>> {
        self.shared.unfenced.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A command on `conn` failed with its path: remember the session for the next fence.
    fn abandoned(&self, conn: &C::Conn) {
        if self.shared.fence_unsupported.load(Ordering::Relaxed) {
            return;
        }
        match conn.session_ref() {
            Some(r) => {
                let mut list = self.unfenced();
                if !list.contains(&r) {
                    list.push(r);
                }
            }
            None => debug!("an abandoned session without a TSIH/TPGT cannot be fenced"),
        }
    }

    /// Fences the abandoned sessions through `picked` before a command goes down it: Ok when
    /// there is nothing (left) to fence.
    async fn fence_abandoned(&self, picked: &Picked<C::Conn>) -> Result<(), FenceHold> {
        if self.unfenced().is_empty() {
            return Ok(());
        }
        let _one = self.shared.fencing.lock().await;
        let own = picked.conn.session_ref();
        let list: Vec<SessionRef> = self
            .unfenced()
            .iter()
            .copied()
            .filter(|r| Some(*r) != own)
            .take(fence::MAX_SESSIONS)
            .collect();
        if list.is_empty() {
            return Ok(());
        }
        let req = Request {
            lun: self.shared.cfg.lun,
            cdb: fence::cdb(list.len()).to_vec(),
            data_out: Some(Bytes::from(fence::encode(&list))),
            data_in_len: 0,
        };
        let reply = picked.conn.execute(req).await.map_err(FenceHold::PathFailed)?;
        let done = |this: &Self| this.unfenced().retain(|r| !list.contains(r));
        if reply.status == status::GOOD {
            info!(
                target = %self.shared.cfg.target,
                sessions = ?list.iter().map(|r| format!("tpgt {} tsih {}", r.tpgt, r.tsih)).collect::<Vec<_>>(),
                "abandoned sessions fenced"
            );
            done(self);
            return Ok(());
        }
        let sense = reply.sense();
        if let Some(s) = sense.filter(|s| s.code.key == key::ILLEGAL_REQUEST) {
            // Not supported (20/00), or refused as malformed: fencing is off for this device
            // rather than holding every command up.
            warn!(
                target = %self.shared.cfg.target,
                answer = %s,
                "the target does not accept FENCE SESSIONS: a command held up on a failed path could \
                 still be executed after it was re-sent elsewhere"
            );
            self.shared.fence_unsupported.store(true, Ordering::Relaxed);
            self.unfenced().clear();
            return Ok(());
        }
        debug!(reply = %describe_status(reply.status, sense), "FENCE SESSIONS not accepted yet");
        Err(FenceHold::Retry(match verdict(&reply) {
            Verdict::PathState(state) => {
                self.set_alua(picked.index, picked.generation, state);
                self.shared.refresh.notify_one();
                Duration::from_millis(50)
            }
            Verdict::Again { refresh } => {
                if refresh {
                    self.shared.refresh.notify_one();
                }
                Duration::from_millis(10)
            }
            Verdict::Backoff => Duration::from_millis(20),
            Verdict::Done => Duration::from_millis(100),
        }))
    }

    fn summary(&self) -> String {
        let paths = self.paths();
        if paths.is_empty() {
            return "none configured".into();
        }
        paths
            .iter()
            .map(|p| match &p.last_error {
                Some(e) => format!("{} {} ({}; {e})", p.portal, p.status, p.alua),
                None => format!("{} {} ({})", p.portal, p.status, p.alua),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// A snapshot for `session` output.
    pub fn view(&self) -> MultipathView {
        let identity = self.identity();
        let guard = self.paths();
        let usable_paths = guard
            .iter()
            .filter(|p| p.status == PathStatus::Up && p.conn.is_some() && p.alua.rank().is_some())
            .count();
        let paths: Vec<PathView> = guard
            .iter()
            .map(|p| PathView {
                portal: p.portal.clone(),
                tpgt: p.tpgt,
                status: p.status,
                alua: p.alua.name().to_string(),
                port_group: p.port_group,
                relative_port: p.relative_port,
                in_flight: p.in_flight.load(Ordering::Relaxed),
                commands: p.commands,
                failures: p.failures,
                last_error: p.last_error.clone(),
                for_secs: p.since.elapsed().as_secs_f64(),
                details: p
                    .conn
                    .as_ref()
                    .map(|c| c.details().into_iter().collect())
                    .unwrap_or_default(),
            })
            .collect();
        drop(guard);
        let c = &self.shared.counters;
        MultipathView {
            target: self.shared.cfg.target.clone(),
            lun: self.shared.cfg.lun,
            identity: identity.as_ref().map(|(d, _)| d.to_string()),
            vendor: identity.as_ref().map(|(_, i)| i.vendor.clone()),
            product: identity.as_ref().map(|(_, i)| i.product.clone()),
            usable_paths,
            failovers: c.failovers.load(Ordering::Relaxed),
            retried_commands: c.retried.load(Ordering::Relaxed),
            queued_commands: c.queued.load(Ordering::Relaxed),
            paths,
        }
    }

    async fn discovery_task(&self) {
        let mut stop = self.shared.stop.subscribe();
        let mut interval = Duration::from_millis(500);
        loop {
            let round = Instant::now();
            let mut found_any = false;
            // The configured portals first, then any other known one (the configured ones may
            // all be down while a node that joined later is up).
            let mut portals = self.shared.cfg.portals.clone();
            for p in self.paths().iter() {
                if !portals.contains(&p.portal) {
                    portals.push(p.portal.clone());
                }
            }
            for portal in portals {
                match self.shared.connector.discover(&portal).await {
                    Ok(targets) => {
                        found_any = true;
                        let wanted = &self.shared.cfg.target;
                        for (_, portals) in targets.iter().filter(|(t, _)| t.eq_ignore_ascii_case(wanted)) {
                            for dp in portals {
                                self.add_portal(&dp.address, Some(dp.tpgt));
                            }
                        }
                        break;
                    }
                    Err(e) => debug!(portal, error = %e, "SendTargets failed"),
                }
            }
            // Retry soon until one discovery worked, then refresh now and then, and when a path
            // fails or no path is usable (at most once per REDISCOVER_EVERY).
            interval = if found_any {
                Duration::from_secs(60)
            } else {
                (interval * 2).min(Duration::from_secs(10))
            };
            let asked = tokio::select! {
                _ = tokio::time::sleep(interval) => false,
                _ = self.shared.rediscover.notified() => true,
                _ = stop.wait_for(|s| *s) => return,
            };
            if asked {
                tokio::select! {
                    _ = tokio::time::sleep_until((round + REDISCOVER_EVERY).into()) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        }
    }

    async fn path_task(&self, portal: String, kick: Arc<Notify>, relogin: Arc<Notify>) {
        let target = self.shared.cfg.target.clone();
        let (min, max) = self.shared.cfg.relogin_backoff;
        let mut backoff = min;
        let mut stop = self.shared.stop.subscribe();
        loop {
            if self.stopped() {
                return;
            }
            let disabled = self
                .paths()
                .iter()
                .find(|p| p.portal == portal)
                .is_some_and(|p| p.disabled);
            if disabled {
                self.update(&portal, |p| p.set_status(PathStatus::Disabled));
                tokio::select! {
                    _ = kick.notified() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                continue;
            }
            self.update(&portal, |p| p.set_status(PathStatus::Connecting));
            let attempt = async {
                let conn = self.shared.connector.connect(&portal, &target).await?;
                match self.probe(&conn).await {
                    Ok(probe) => Ok((conn, probe)),
                    Err(e) => {
                        conn.close_hard();
                        Err(e)
                    }
                }
            };
            let result = tokio::select! {
                r = attempt => r,
                _ = stop.wait_for(|s| *s) => return,
            };
            let (conn, probe) = match result {
                Ok(v) => v,
                Err(e) => {
                    warn!(%target, portal, error = %e, retry_in = ?backoff, "path login failed");
                    self.update(&portal, |p| {
                        p.set_status(PathStatus::Failed);
                        p.last_error = Some(e.0.clone());
                    });
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = kick.notified() => {}
                        _ = relogin.notified() => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                    backoff = (backoff * 2).min(max);
                    continue;
                }
            };
            backoff = min;
            let generation = {
                let mut paths = self.paths();
                let Some(p) = paths.iter_mut().find(|p| p.portal == portal) else {
                    return;
                };
                p.generation += 1;
                p.conn = Some(conn.clone());
                p.alua = probe.alua;
                p.port_group = probe.id.port_group;
                p.relative_port = probe.id.relative_port;
                p.last_error = None;
                p.set_status(PathStatus::Up);
                p.generation
            };
            info!(%target, portal, alua = %probe.alua, port_group = ?probe.id.port_group, "path up");
            self.bump();
            // Serve until the session dies, the path is failed by a command, or it is disabled.
            let why = tokio::select! {
                why = conn.closed() => Some(why),
                _ = kick.notified() => None,
                _ = stop.wait_for(|s| *s) => None,
            };
            let index = self.paths().iter().position(|p| p.portal == portal);
            match why {
                Some(why) => {
                    if let Some(i) = index {
                        self.path_failed(i, generation, &why);
                    }
                }
                None => {
                    let (still_up, disabled) = self
                        .paths()
                        .iter()
                        .find(|p| p.portal == portal)
                        .map(|p| (p.generation == generation && p.status == PathStatus::Up, p.disabled))
                        .unwrap_or((false, false));
                    if still_up && (disabled || self.stopped()) {
                        self.update(&portal, |p| {
                            p.conn = None;
                            p.set_status(PathStatus::Disabled);
                        });
                        self.bump();
                        info!(%target, portal, "path logged out by request");
                        conn.logout().await;
                    } else if still_up {
                        // A spurious wake-up: keep serving on this session.
                        self.update(&portal, |p| p.conn = Some(conn.clone()));
                        let why = conn.closed().await;
                        if let Some(i) = index {
                            self.path_failed(i, generation, &why);
                        }
                    }
                }
            }
            // Wait a little before the next login, so a flapping portal cannot spin (a kick, rate
            // limited, cuts it short when the path is needed).
            tokio::select! {
                _ = tokio::time::sleep(min) => {}
                _ = relogin.notified() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    fn update(&self, portal: &str, f: impl FnOnce(&mut Path<C::Conn>)) {
        let mut paths = self.paths();
        if let Some(p) = paths.iter_mut().find(|p| p.portal == portal) {
            f(p);
        }
        drop(paths);
        self.bump();
    }

    /// Identifies the LU behind a new session and learns the path's access state.
    async fn probe(&self, conn: &C::Conn) -> Result<Probe, PathFailure> {
        let lun = self.shared.cfg.lun;
        let run = |cdb: Vec<u8>, len: u32| {
            let conn = conn.clone();
            async move { command_ignoring_ua(&conn, lun, cdb, len).await }
        };
        let std = run(scsi::inquiry(None, 96), 96).await?;
        let std = StandardInquiry::parse(&std).map_err(|e| PathFailure(e.to_string()))?;
        if std.peripheral & 0xe0 != 0 {
            return Err(PathFailure(format!("no logical unit {lun} behind this portal")));
        }
        let id = run(scsi::inquiry(Some(0x83), 1024), 1024).await?;
        let id = DeviceId::parse(&id).map_err(|e| PathFailure(e.to_string()))?;
        let Some(designator) = id.lu.clone() else {
            return Err(PathFailure(
                "the LU reports no identity in VPD page 83h; paths cannot be grouped".into(),
            ));
        };
        {
            let mut known = self.shared.identity.lock().unwrap_or_else(|e| e.into_inner());
            match &*known {
                Some((d, _)) if *d != designator => {
                    return Err(PathFailure(format!(
                        "this portal exports a different LU ({designator}, expected {d}); path refused"
                    )));
                }
                Some(_) => {}
                None => *known = Some((designator, std.clone())),
            }
        }
        let alua = if std.tpgs == 0 {
            AluaState::Unknown
        } else {
            rtpg_state(conn, lun, &id).await.unwrap_or(AluaState::Unknown)
        };
        Ok(Probe { id, alua })
    }

    async fn refresh_task(&self) {
        let mut stop = self.shared.stop.subscribe();
        loop {
            tokio::select! {
                _ = self.shared.refresh.notified() => {}
                _ = tokio::time::sleep(self.shared.cfg.alua_refresh) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            if self.identity().is_none_or(|(_, inq)| inq.tpgs == 0) {
                continue;
            }
            let up: Vec<(usize, u64, C::Conn, DeviceId)> = self
                .paths()
                .iter()
                .enumerate()
                .filter(|(_, p)| p.status == PathStatus::Up)
                .filter_map(|(i, p)| {
                    let id = DeviceId {
                        lu: None,
                        relative_port: p.relative_port,
                        port_group: p.port_group,
                    };
                    Some((i, p.generation, p.conn.clone()?, id))
                })
                .collect();
            let lun = self.shared.cfg.lun;
            let checks = up.into_iter().map(|(i, generation, conn, id)| async move {
                let state = tokio::time::timeout(Duration::from_secs(5), rtpg_state(&conn, lun, &id))
                    .await
                    .ok()
                    .flatten();
                (i, generation, state)
            });
            for (i, generation, state) in futures_join_all(checks).await {
                if let Some(state) = state {
                    self.set_alua(i, generation, state);
                }
            }
        }
    }
}

struct Probe {
    id: DeviceId,
    alua: AluaState,
}

/// Runs a data-in command, re-sending it past unit attentions (a new nexus reports one first).
async fn command_ignoring_ua<P: PathConn>(conn: &P, lun: u64, cdb: Vec<u8>, len: u32) -> Result<Bytes, PathFailure> {
    let mut last = String::new();
    for _ in 0..8 {
        let reply = conn
            .execute(Request {
                lun,
                cdb: cdb.clone(),
                data_out: None,
                data_in_len: len,
            })
            .await?;
        match reply.sense() {
            Some(s) if reply.status == status::CHECK_CONDITION && s.code.key == key::UNIT_ATTENTION => {
                last = s.to_string();
            }
            _ => {
                return reply
                    .good()
                    .map_err(|e| PathFailure(format!("command {:02x}h: {e}", cdb[0])));
            }
        }
    }
    Err(PathFailure(format!("command {:02x}h kept reporting {last}", cdb[0])))
}

/// This path's access state from REPORT TARGET PORT GROUPS through it.
async fn rtpg_state<P: PathConn>(conn: &P, lun: u64, id: &DeviceId) -> Option<AluaState> {
    let data = command_ignoring_ua(conn, lun, scsi::report_target_port_groups(4096), 4096)
        .await
        .ok()?;
    let groups = scsi::parse_port_groups(&data).ok()?;
    let own = groups.iter().find(|g| Some(g.id) == id.port_group).or_else(|| {
        let rel = id.relative_port?;
        groups.iter().find(|g| g.ports.contains(&rel))
    });
    // A target that reports one group for everything: that group is ours.
    let own = own.or_else(|| if groups.len() == 1 { groups.first() } else { None })?;
    Some(own.state)
}

/// Polls futures concurrently (no extra crate for one join).
async fn futures_join_all<F>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send,
{
    let mut set = tokio::task::JoinSet::new();
    for f in futs {
        set.spawn(f);
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Ok(v) = r {
            out.push(v);
        }
    }
    out
}
