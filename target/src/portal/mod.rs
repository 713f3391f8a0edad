//! The tokio portal server: listeners, connection limits, the session table and what
//! `raftsan show` reports.
//!
//! Each accepted TCP connection runs [`conn::run`], which moves bytes and timers only; protocol
//! decisions come from `raftsan_proto` (framing, login machine) and [`crate::lu`] (SCSI).
//!
//! ```text
//!  accept ──▶ login phase (bounded by login_timeout) ──▶ discovery: Text/SendTargets, Logout
//!                                                   └──▶ normal: full-feature phase, Logout
//! ```
//!
//! Sessions: MaxConnections is negotiated to 1, so a session is one connection. A login with the
//! same initiator name, ISID and target as a live session and TSIH 0 reinstates it (RFC 7143
//! §6.3.5): the old connection is closed before the new session starts.
//!
//! Targets: [`PortalServer::new`] serves a static catalog (standalone `raftsan serve`);
//! [`PortalServer::empty`] starts with none and the cluster sets them with
//! [`PortalServer::set_targets`]. A session holds the [`TargetRuntime`] it logged into, so the
//! targets map is read at login and SendTargets only, never per command. A target built with a
//! [`CommandRouter`] has every SCSI command of its sessions run by the router instead of its
//! logical units; the portal keeps doing everything else (CmdSN window, R2T, Data-In, aborting
//! its own tasks, metrics). The LUs of a routed target hear of sessions and resets only through
//! the router ([`CommandRouter::nexus_joined`], [`CommandRouter::reset`]).

mod conn;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use raftsan_proto::text::TargetLimits;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::catalog::{Catalog, TargetDef};
use crate::lu::{Nexus, Outcome, TargetLus};
use crate::metrics::{LuMetrics, PortalMetrics};

/// Portal-wide settings (from the node config).
#[derive(Clone, Debug)]
pub struct PortalSettings {
    /// What the login machine offers and accepts.
    pub iscsi: TargetLimits,
    /// Connections a portal accepts at once; more are closed right after accept.
    pub max_connections: u32,
    /// Sessions the node keeps at once; more logins fail with "out of resources" (0x0302).
    pub max_sessions: u32,
    /// A login must complete within this time.
    pub login_timeout: Duration,
    /// The CmdSN window: commands a session may have queued or running.
    pub cmd_window: u32,
    /// Write data a session may hold in memory while collecting Data-Out (commands beyond it get
    /// TASK SET FULL).
    pub max_session_write_bytes: u64,
    /// Largest expected data transfer length of one command.
    pub max_transfer_bytes: u32,
    /// Target-initiated NOP-In ping interval (zero: off) and how long to wait for the answer.
    pub nop_in_interval: Duration,
    pub nop_in_timeout: Duration,
    /// This node's target portal group tag, relative target port id and ALUA port group.
    pub tpgt: u16,
    pub relative_port_id: u16,
    pub port_group: u16,
}

impl Default for PortalSettings {
    fn default() -> Self {
        PortalSettings {
            iscsi: TargetLimits::default(),
            max_connections: 1024,
            max_sessions: 1024,
            login_timeout: Duration::from_secs(15),
            cmd_window: 128,
            max_session_write_bytes: 256 << 20,
            max_transfer_bytes: 32 << 20,
            nop_in_interval: Duration::from_secs(5),
            nop_in_timeout: Duration::from_secs(15),
            tpgt: 1,
            relative_port_id: 1,
            port_group: 1,
        }
    }
}

/// One SCSI command of a session, owned, for a [`CommandRouter`].
#[derive(Clone, Debug)]
pub struct OwnedCommand {
    pub lun: u64,
    /// The CDB field of the SCSI Command PDU (16 bytes, zero-padded after the CDB) plus any
    /// extended-CDB AHS, as the logical units get it.
    pub cdb: Vec<u8>,
    /// All Data-Out the initiator sent, at most `expected_transfer_len` bytes.
    pub data_out: Bytes,
    /// iSCSI Expected Data Transfer Length.
    pub expected_transfer_len: u32,
    pub task_attr: u8,
}

/// Runs the SCSI commands of a target's sessions in place of its logical units (the cluster
/// forwards them to the volume leader). The portal calls `execute` once per command whose
/// Data-Out is complete, on a task of its own, several at once up to the CmdSN window; the
/// [`Outcome`] is sent as for a local command (Data-In cut to the expected length, residuals).
pub trait CommandRouter: Send + Sync + 'static {
    /// Runs one command of a session on this target.
    fn execute(
        &self,
        target: Arc<TargetRuntime>,
        nexus: Nexus,
        cmd: OwnedCommand,
    ) -> Pin<Box<dyn Future<Output = Outcome> + Send>>;
    /// A session of this node started. The portal does not tell the target's LUs of a routed
    /// target's sessions: the router decides which LU keeps the nexus's state (unit attentions,
    /// SPC-2 reservations).
    fn nexus_joined(&self, _nexus: &Nexus) {}
    /// A session of this node ended (logout, connection loss), after its last command finished.
    /// As for [`CommandRouter::nexus_joined`], the LUs hear of it only through the router.
    fn nexus_left(&self, _nexus: &Nexus) {}
    /// The LU side of LOGICAL UNIT RESET or a target reset requested on a session of this node,
    /// after the portal aborted the session's own tasks. True: done (false: no such LUN). The
    /// default resets the target's local LUs, as a target without a router does.
    fn reset(
        &self,
        target: Arc<TargetRuntime>,
        nexus: Nexus,
        reset: Reset,
    ) -> Pin<Box<dyn Future<Output = bool> + Send>> {
        Box::pin(std::future::ready(target.reset_local(&nexus, reset)))
    }
}

/// What a task management function resets (the portal aborts the session's tasks itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reset {
    /// LOGICAL UNIT RESET of this LUN.
    Lun(u64),
    /// TARGET WARM RESET or TARGET COLD RESET: every LU.
    Target,
}

/// A target as the portal serves it: its definition, its logical units, an optional command
/// router and the LUs' metrics.
pub struct TargetRuntime {
    pub def: TargetDef,
    pub(crate) lus: Arc<TargetLus>,
    pub(crate) router: Option<Arc<dyn CommandRouter>>,
    pub(crate) metrics: LuMetrics,
}

impl TargetRuntime {
    /// A target serving `lus`; with a `router`, SCSI commands go to the router instead.
    /// Metrics handles are registered here for every LUN of `lus`.
    pub fn new(def: TargetDef, lus: Arc<TargetLus>, router: Option<Arc<dyn CommandRouter>>) -> Arc<Self> {
        let metrics = LuMetrics::new(&def.name, lus.lun_list().into_iter());
        Arc::new(TargetRuntime {
            def,
            lus,
            router,
            metrics,
        })
    }

    pub fn lus(&self) -> &Arc<TargetLus> {
        &self.lus
    }

    pub fn router(&self) -> Option<&Arc<dyn CommandRouter>> {
        self.router.as_ref()
    }

    /// `reset` on this target's own LUs. False when `reset` names a LUN it does not have.
    pub fn reset_local(&self, nexus: &Nexus, reset: Reset) -> bool {
        match reset {
            Reset::Lun(lun) => self.lus.lu_reset(lun, nexus),
            Reset::Target => {
                self.lus.target_reset(nexus);
                true
            }
        }
    }
}

/// A live session, as the session table and `raftsan show` see it.
#[derive(Clone, Debug, Serialize)]
pub struct SessionInfo {
    pub tsih: u16,
    pub nexus_id: u64,
    pub target: Option<String>,
    pub initiator_name: String,
    pub isid: String,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub discovery: bool,
    pub chap_user: Option<String>,
    pub header_digest: bool,
    pub data_digest: bool,
}

struct SessionEntry {
    info: SessionInfo,
    /// Sending `true` asks the session's connection to close (reinstatement, shutdown).
    close: watch::Sender<bool>,
}

/// The node's iSCSI service: every portal listener shares one of these.
pub struct PortalServer {
    pub(crate) catalog: Catalog,
    /// Keyed by lower-case target name. Lock order: `sessions` before `targets`.
    targets: RwLock<HashMap<String, Arc<TargetRuntime>>>,
    pub(crate) settings: PortalSettings,
    /// Addresses of this node's portals, for SendTargets.
    pub(crate) portal_addrs: Mutex<Vec<SocketAddr>>,
    /// The other nodes' portals (address, TPGT), listed in SendTargets after this node's.
    peer_portals: Mutex<Vec<(SocketAddr, u16)>>,
    sessions: Mutex<HashMap<u16, SessionEntry>>,
    next_tsih: AtomicU16,
    next_nexus: AtomicU64,
    pub(crate) metrics: PortalMetrics,
    shutdown: watch::Sender<bool>,
}

/// What `raftsan show` prints about a running daemon.
#[derive(Clone, Debug, Serialize)]
pub struct ShowState {
    pub portals: Vec<SocketAddr>,
    pub targets: Vec<ShowTarget>,
    pub sessions: Vec<SessionInfo>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ShowTarget {
    pub tid: u32,
    pub name: String,
    pub luns: Vec<crate::lu::LunInfo>,
    pub accounts: Vec<String>,
    pub outgoing_account: Option<String>,
    pub initiator_names: Vec<String>,
    pub initiator_addresses: Vec<String>,
}

impl PortalServer {
    /// Opens every target's logical units. `state_dir` holds persistent-reservation state.
    pub fn new(catalog: Catalog, settings: PortalSettings, state_dir: Option<&Path>) -> std::io::Result<Arc<Self>> {
        let mut targets = HashMap::new();
        for def in &catalog.targets {
            let dir = state_dir.map(|d| d.join(format!("tid{}", def.tid)));
            if let Some(d) = &dir {
                std::fs::create_dir_all(d)?;
            }
            let lus = TargetLus::open(def, dir.as_deref())?;
            targets.insert(
                def.name.to_ascii_lowercase(),
                TargetRuntime::new(def.clone(), Arc::new(lus), None),
            );
        }
        Ok(Self::with_targets(catalog, targets, settings))
    }

    /// A portal server with no targets yet (cluster mode); targets come from
    /// [`PortalServer::set_targets`]. Discovery sessions need no CHAP.
    pub fn empty(settings: PortalSettings) -> Arc<Self> {
        Self::with_targets(Catalog::default(), HashMap::new(), settings)
    }

    fn with_targets(
        catalog: Catalog,
        targets: HashMap<String, Arc<TargetRuntime>>,
        settings: PortalSettings,
    ) -> Arc<Self> {
        Arc::new(PortalServer {
            catalog,
            targets: RwLock::new(targets),
            settings,
            portal_addrs: Mutex::new(Vec::new()),
            peer_portals: Mutex::new(Vec::new()),
            sessions: Mutex::new(HashMap::new()),
            // A random start: a restarted node does not hand out the TSIHs of its last run again
            // at once, so a session key a FENCE SESSIONS named (initiator, ISID, TPGT, TSIH) is
            // not met again by a new session of an initiator with a fixed ISID.
            next_tsih: AtomicU16::new(rand::random::<u16>().max(1)),
            next_nexus: AtomicU64::new(1),
            metrics: PortalMetrics::new(),
            shutdown: watch::channel(false).0,
        })
    }

    pub(crate) fn target(&self, name: &str) -> Option<Arc<TargetRuntime>> {
        read(&self.targets).get(&name.to_ascii_lowercase()).cloned()
    }

    /// Every served target.
    pub(crate) fn targets(&self) -> Vec<Arc<TargetRuntime>> {
        read(&self.targets).values().cloned().collect()
    }

    /// Replaces the served targets (keyed by lower-case name).
    ///
    /// Sessions of a target whose name is gone are closed (as on reinstatement: running commands
    /// finish first, no Logout). Sessions of a name that stays keep the [`TargetRuntime`] they
    /// logged into: when a new `Arc` replaces it, they go on with the old one (its LUs and
    /// router) until they log out, and only new logins see the new one. Pass the same `Arc` to
    /// leave a target's sessions untouched.
    pub fn set_targets(&self, targets: Vec<Arc<TargetRuntime>>) {
        let map: HashMap<String, Arc<TargetRuntime>> = targets
            .into_iter()
            .map(|t| (t.def.name.to_ascii_lowercase(), t))
            .collect();
        let sessions = lock(&self.sessions);
        for s in sessions.values() {
            if let Some(name) = &s.info.target
                && !map.contains_key(&name.to_ascii_lowercase())
            {
                tracing::info!(tsih = s.info.tsih, target = %name, "target removed: closing its session");
                let _ = s.close.send(true);
            }
        }
        *self.targets.write().unwrap_or_else(|p| p.into_inner()) = map;
    }

    /// Portals of the other nodes (address, TPGT), added to SendTargets answers after this
    /// node's own.
    pub fn set_peer_portals(&self, portals: Vec<(SocketAddr, u16)>) {
        *lock(&self.peer_portals) = portals;
    }

    /// Binds a portal listener (IPv4 or IPv6).
    pub async fn bind(self: &Arc<Self>, addr: SocketAddr) -> std::io::Result<TcpListener> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        lock(&self.portal_addrs).push(local);
        Ok(listener)
    }

    /// Accepts connections on `listener` until shutdown.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        let slots = Arc::new(Semaphore::new(self.settings.max_connections as usize));
        let mut shutdown = self.shutdown.subscribe();
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.changed() => return Ok(()),
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                tracing::warn!(%peer, limit = self.settings.max_connections, "connection limit reached; closing new connection");
                self.metrics.connections_refused.increment(1);
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let server = self.clone();
            tokio::spawn(async move {
                conn::run(server, stream, peer).await;
                drop(permit);
            });
        }
    }

    /// Asks every listener and session to stop.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
        for s in lock(&self.sessions).values() {
            let _ = s.close.send(true);
        }
    }

    pub(crate) fn next_nexus_id(&self) -> u64 {
        self.next_nexus.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a new session, closing any session it reinstates (same initiator name, ISID and
    /// target). Returns its TSIH and the receiver that tells it to close, or `None` when the node
    /// has no room for another session.
    pub(crate) fn register_session(&self, mut info: SessionInfo) -> Option<(u16, watch::Receiver<bool>)> {
        let mut sessions = lock(&self.sessions);
        if let Some(name) = &info.target
            && self.target(name).is_none()
        {
            // Removed by set_targets while this login ran.
            return None;
        }
        let old: Vec<u16> = sessions
            .iter()
            .filter(|(_, s)| {
                s.info.isid == info.isid
                    && s.info.initiator_name.eq_ignore_ascii_case(&info.initiator_name)
                    && s.info.target == info.target
                    && s.info.discovery == info.discovery
            })
            .map(|(t, _)| *t)
            .collect();
        for tsih in old {
            if let Some(s) = sessions.remove(&tsih) {
                tracing::info!(tsih, initiator = %s.info.initiator_name, isid = %s.info.isid, "session reinstated: closing the old connection");
                let _ = s.close.send(true);
            }
        }
        if sessions.len() >= self.settings.max_sessions as usize {
            return None;
        }
        // TSIH 0 is reserved (RFC 7143 §11.12.6).
        let tsih = loop {
            let t = self.next_tsih.fetch_add(1, Ordering::Relaxed);
            if t != 0 && !sessions.contains_key(&t) {
                break t;
            }
        };
        info.tsih = tsih;
        let (tx, rx) = watch::channel(false);
        sessions.insert(tsih, SessionEntry { info, close: tx });
        self.metrics.sessions.set(sessions.len() as f64);
        Some((tsih, rx))
    }

    pub(crate) fn unregister_session(&self, tsih: u16) {
        let mut sessions = lock(&self.sessions);
        sessions.remove(&tsih);
        self.metrics.sessions.set(sessions.len() as f64);
    }

    pub(crate) fn session_exists(&self, tsih: u16) -> bool {
        lock(&self.sessions).contains_key(&tsih)
    }

    /// The portals SendTargets reports for a connection that arrived on `local`: every bound
    /// portal, with wildcard addresses replaced by the address the initiator reached.
    pub(crate) fn send_targets_addresses(&self, local: SocketAddr) -> Vec<(String, u16)> {
        let tpgt = self.settings.tpgt;
        let mut out = Vec::new();
        for a in lock(&self.portal_addrs).iter() {
            let ip = if a.ip().is_unspecified() { local.ip() } else { a.ip() };
            let s = match ip {
                IpAddr::V4(v4) => format!("{v4}:{}", a.port()),
                IpAddr::V6(v6) => format!("[{v6}]:{}", a.port()),
            };
            if !out.iter().any(|(x, _)| *x == s) {
                out.push((s, tpgt));
            }
        }
        for (a, tpgt) in lock(&self.peer_portals).iter() {
            let s = a.to_string();
            if !out.iter().any(|(x, _)| *x == s) {
                out.push((s, *tpgt));
            }
        }
        out
    }

    /// A snapshot for `raftsan show`. Secrets are never included.
    pub fn show(&self) -> ShowState {
        let mut targets: Vec<ShowTarget> = self
            .targets()
            .iter()
            .map(|t| ShowTarget {
                tid: t.def.tid,
                name: t.def.name.clone(),
                luns: t.lus.luns(),
                accounts: t.def.incoming_users.iter().map(|a| a.user.clone()).collect(),
                outgoing_account: t.def.outgoing_user.as_ref().map(|a| a.user.clone()),
                initiator_names: t.def.initiator_names.clone(),
                initiator_addresses: t
                    .def
                    .initiator_addresses
                    .iter()
                    .map(|c| format!("{}/{}", c.addr, c.prefix_len))
                    .collect(),
            })
            .collect();
        targets.sort_by_key(|t| t.tid);
        let mut sessions: Vec<SessionInfo> = lock(&self.sessions).values().map(|s| s.info.clone()).collect();
        sessions.sort_by_key(|s| s.tsih);
        ShowState {
            portals: lock(&self.portal_addrs).clone(),
            targets,
            sessions,
        }
    }
}

/// Locks a mutex, recovering from poisoning: every critical section here leaves the data
/// consistent, so a panic elsewhere must not take the portal down with it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// [`lock`] for a read lock.
fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|p| p.into_inner())
}
