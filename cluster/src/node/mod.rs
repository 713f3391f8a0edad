//! A cluster node: the metadata group, one Raft group per volume, the portal that exports every
//! volume, and the cluster RPC listener.
//!
//! ```text
//!             ┌──────────── catalogue (metadata group, META_GROUP) ─────────────┐
//!             │ nodes, targets, volumes (id, size, NAA, serial, replicas)        │
//!             └───────┬─────────────────────────────────────────────────────────┘
//!                     │ watch: every node reconciles
//!                     ▼
//!   open/close volume groups ── set_targets on the portal ── ALUA view per volume
//!                     │
//!   leader of the metadata group: places replicas, adds/removes nodes (learner, then voter)
//!   leader of a volume group: grows the image on resize, changes the group's voters to match
//! ```
//!
//! Everything here runs on the tokio runtime except SCSI execution on a volume leader, which
//! runs on blocking threads (`volume.rs`).

mod admin;
mod metrics;
mod service;
mod volume;

use openraft::async_runtime::watch::WatchReceiver;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use openraft::BasicNode;
use raftsan_target::backing::FaultSwitch;
use raftsan_target::portal::{PortalServer, PortalSettings};
use tokio::sync::watch;

use crate::config::{ClusterSettings, FsyncMode};
use crate::pb::cluster::{Catalogue, NodeInfo, VolumeInfo};
use crate::raft::state_machine::GroupStateMachine;
use crate::raft::{FsyncPolicy, GroupId, LogStore, LogStoreOptions, META_GROUP, SnapshotBase, TypeConfig};
use crate::rpc::{Channels, GroupRegistry, NetworkFactory, SnapshotProgress, TlsFiles};

pub use admin::{AdminClient, TestingService};
pub use service::ClusterService;
pub use volume::VolumeRuntime;

/// Fuzzing entry point (fuzz/fuzz_targets/rpc.rs), not an API: the nexus of a forwarded command
/// (`Execute` RPC) as the receiving leader converts it, and that nexus encoded back.
#[doc(hidden)]
pub fn fuzz_nexus_from_pb(
    n: &crate::pb::cluster::Nexus,
) -> Option<(raftsan_target::lu::Nexus, crate::pb::cluster::Nexus)> {
    volume::nexus_from_pb(n).map(|x| {
        let back = volume::nexus_to_pb(&x);
        (x, back)
    })
}

/// How long a group that left the registry stays running for RPCs already inside it.
const IN_FLIGHT_RPC_GRACE: Duration = Duration::from_millis(200);

/// One Raft group's handle.
pub type RaftGroup = openraft::Raft<TypeConfig, GroupStateMachine>;

/// The marker `raftsan cluster init` leaves in the data directory: the first start of this node
/// creates the metadata group with itself as the only voter.
pub const BOOTSTRAP_MARKER: &str = "bootstrap";

/// What a node needs to start, beyond its config file.
pub struct NodeOptions {
    pub settings: ClusterSettings,
    pub data_dir: PathBuf,
    pub portals: Vec<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub portal_settings: PortalSettings,
}

/// A Raft group open on this node.
pub(crate) struct Group {
    pub id: GroupId,
    pub raft: RaftGroup,
    pub sm: GroupStateMachine,
    pub dir: PathBuf,
    /// The group's log store (a clone of the one openraft owns), for its size.
    pub log: LogStore,
    /// Volume groups: the SCSI side.
    pub volume: Option<Arc<VolumeRuntime>>,
    /// The switches of this group's storage faults (testing only: armed through the `Testing`
    /// RPC when `[testing] fault_injection` is on; unarmed they cost one relaxed load per I/O).
    pub faults: GroupFaults,
}

/// The fault switches of one group: its image (volumes) and its Raft log.
#[derive(Default)]
pub(crate) struct GroupFaults {
    pub image: Arc<FaultSwitch>,
    pub log: Arc<FaultSwitch>,
}

/// The node: shared by the RPC services, the portal router and the reconcile loop.
pub struct Node {
    pub(crate) id: u64,
    pub(crate) settings: ClusterSettings,
    pub(crate) data_dir: PathBuf,
    pub(crate) self_info: NodeInfo,
    pub(crate) channels: Channels,
    pub(crate) progress: SnapshotProgress,
    pub(crate) raft_config: Arc<openraft::Config>,
    pub(crate) groups: RwLock<HashMap<GroupId, Arc<Group>>>,
    /// The metadata group, also reachable after shutdown took it out of `groups`.
    meta_group: std::sync::OnceLock<Arc<Group>>,
    pub(crate) portal: Arc<PortalServer>,
    /// Serializes reconcile passes.
    reconcile_lock: tokio::sync::Mutex<()>,
    /// (volume, term) → when this node started leading it (leadership spreading).
    pub(crate) led_since: Mutex<HashMap<(GroupId, u64), std::time::Instant>>,
    /// Volume groups being removed (so a late RPC does not reopen them).
    closed: Mutex<BTreeSet<GroupId>>,
    shutdown: watch::Sender<bool>,
}

impl Node {
    /// Opens the metadata group (and, through the catalogue, every volume group of this node).
    pub async fn start(opts: NodeOptions) -> Result<Arc<Node>> {
        let s = opts.settings;
        let tls = TlsFiles {
            ca_cert: s.tls.ca.clone(),
            cert: s.tls.cert.clone(),
            key: s.tls.key.clone(),
        };
        for p in [&tls.ca_cert, &tls.cert, &tls.key] {
            if !p.exists() {
                return Err(anyhow!(
                    "certificate file {} does not exist; `raftsan cluster init` (first node) or \
                     `raftsan cluster issue-cert` (other nodes) create it",
                    p.display()
                ));
            }
        }
        // A node whose RPC listens on one address also connects from it.
        let source = Some(s.rpc_listen.ip()).filter(|ip| !ip.is_unspecified());
        let channels = Channels::new(Some(tls))
            .context("loading the node's certificates")?
            .with_local_address(source);
        let raft_config = raft_config(&s)?;
        let self_info = NodeInfo {
            id: s.node_id,
            rpc_addr: s.rpc_advertise.clone(),
            portals: opts.portals.iter().map(|p| p.to_string()).collect(),
            metrics_addr: opts.metrics_addr.map(|m| m.to_string()).unwrap_or_default(),
        };
        let mut portal_settings = opts.portal_settings;
        let port = u16::try_from(s.node_id).map_err(|_| anyhow!("node id {} is larger than 65535", s.node_id))?;
        portal_settings.tpgt = port;
        portal_settings.relative_port_id = port;
        portal_settings.port_group = port;
        let portal = PortalServer::empty(portal_settings);
        std::fs::create_dir_all(&opts.data_dir)
            .with_context(|| format!("creating the data directory {}", opts.data_dir.display()))?;
        let node = Arc::new(Node {
            id: s.node_id,
            settings: s,
            data_dir: opts.data_dir,
            self_info,
            channels,
            progress: SnapshotProgress::default(),
            raft_config,
            groups: RwLock::new(HashMap::new()),
            meta_group: std::sync::OnceLock::new(),
            portal,
            reconcile_lock: tokio::sync::Mutex::new(()),
            led_since: Mutex::new(HashMap::new()),
            closed: Mutex::new(BTreeSet::new()),
            shutdown: watch::channel(false).0,
        });
        node.open_meta().await?;
        Ok(node)
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn portal(&self) -> &Arc<PortalServer> {
        &self.portal
    }

    /// Snapshot transfers in and out of this node (for the RPC server and `raftsan status`).
    pub fn snapshot_progress(&self) -> SnapshotProgress {
        self.progress.clone()
    }

    fn group_dir(&self, group: GroupId) -> PathBuf {
        if group == META_GROUP {
            self.data_dir.join("meta")
        } else {
            self.data_dir.join(format!("volume-{group}"))
        }
    }

    fn log_options(&self, faults: &GroupFaults) -> LogStoreOptions {
        LogStoreOptions {
            faults: faults.log.clone(),
            fsync: match self.settings.raft.fsync {
                FsyncMode::Always => FsyncPolicy::Batch,
                FsyncMode::OnFlush => FsyncPolicy::OnFlush,
            },
            ..LogStoreOptions::default()
        }
    }

    async fn open_raft(
        &self,
        group: GroupId,
        sm: GroupStateMachine,
        dir: &Path,
        faults: &GroupFaults,
    ) -> Result<(RaftGroup, LogStore)> {
        let log = LogStore::open(dir.join("log"), self.log_options(faults))
            .with_context(|| format!("opening the Raft log of group {group} in {}", dir.display()))?;
        let net = NetworkFactory::new(group, self.channels.clone(), self.progress.clone());
        let raft = openraft::Raft::new(self.id, self.raft_config.clone(), net, log.clone(), sm)
            .await
            .map_err(|e| anyhow!("starting Raft group {group}: {e}"))?;
        #[cfg(feature = "raft-stats")]
        log_runtime_stats(group, &raft);
        Ok((raft, log))
    }

    async fn open_meta(self: &Arc<Self>) -> Result<()> {
        let dir = self.group_dir(META_GROUP);
        std::fs::create_dir_all(&dir)?;
        let sm = GroupStateMachine::open_meta(&dir.join("sm"))
            .with_context(|| format!("opening the catalogue in {}", dir.display()))?;
        let faults = GroupFaults::default();
        let (raft, log) = self.open_raft(META_GROUP, sm.clone(), &dir, &faults).await?;
        let group = Arc::new(Group {
            id: META_GROUP,
            raft,
            sm,
            dir,
            log,
            volume: None,
            faults,
        });
        self.write_groups().insert(META_GROUP, group.clone());
        let _ = self.meta_group.set(group);
        Ok(())
    }

    /// Starts background work: bootstrap (first start after `cluster init`), the reconcile loop
    /// and the leader duties. Call after the RPC listener is up.
    pub fn spawn_background(self: &Arc<Self>) {
        let node = self.clone();
        tokio::spawn(async move {
            if let Err(e) = node.bootstrap_if_marked().await {
                tracing::error!("bootstrapping the cluster: {e:#}");
            }
        });
        let node = self.clone();
        tokio::spawn(async move { node.reconcile_loop().await });
        let node = self.clone();
        tokio::spawn(async move { admin::leader_duties(node).await });
        let node = self.clone();
        tokio::spawn(async move { metrics::sample_loop(node).await });
    }

    async fn bootstrap_if_marked(self: &Arc<Self>) -> Result<()> {
        let marker = self.data_dir.join(BOOTSTRAP_MARKER);
        if !marker.exists() {
            return Ok(());
        }
        let meta = self.meta();
        if !meta.raft.is_initialized().await.map_err(|e| anyhow!("{e}"))? {
            let members = BTreeMap::from([(
                self.id,
                BasicNode {
                    addr: self.self_info.rpc_addr.clone(),
                },
            )]);
            meta.raft
                .initialize(members)
                .await
                .map_err(|e| anyhow!("initializing the metadata group: {e}"))?;
            tracing::info!(
                node = self.id,
                "created the cluster (metadata group with this node as voter)"
            );
        }
        // Record this node in the catalogue once it leads.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let cat = self.catalogue();
            if cat.nodes.iter().any(|n| n.id == self.id) {
                break;
            }
            match admin::propose_meta(
                &meta.raft,
                crate::pb::cluster::meta_command::Cmd::AddNode(self.self_info.clone()),
            )
            .await
            {
                Ok(_) => break,
                Err(e) if tokio::time::Instant::now() > deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        std::fs::remove_file(&marker).with_context(|| format!("removing {}", marker.display()))?;
        Ok(())
    }

    pub(crate) fn meta(&self) -> Arc<Group> {
        // `start` opens the metadata group before the node is handed out.
        self.meta_group
            .get()
            .cloned()
            .unwrap_or_else(|| unreachable!("metadata group is opened in Node::start"))
    }

    pub(crate) fn read_groups(&self) -> std::sync::RwLockReadGuard<'_, HashMap<GroupId, Arc<Group>>> {
        self.groups.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_groups(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<GroupId, Arc<Group>>> {
        self.groups.write().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn group(&self, id: GroupId) -> Option<Arc<Group>> {
        self.read_groups().get(&id).cloned()
    }

    /// The catalogue as this node last applied it.
    pub fn catalogue(&self) -> Arc<Catalogue> {
        self.meta()
            .sm
            .catalogue()
            .map(|rx| rx.borrow().clone())
            .unwrap_or_default()
    }

    pub(crate) fn node_info(&self, id: u64) -> Option<NodeInfo> {
        self.catalogue().nodes.iter().find(|n| n.id == id).cloned()
    }

    /// Address of the cluster RPC listener of node `id`: from the catalogue, else from the
    /// metadata group's membership.
    pub(crate) fn rpc_addr_of(&self, id: u64) -> Option<String> {
        if id == self.id {
            return Some(self.self_info.rpc_addr.clone());
        }
        if let Some(n) = self.node_info(id) {
            return Some(n.rpc_addr);
        }
        let m = self.meta().raft.metrics().borrow_watched().membership_config.clone();
        m.membership().get_node(&id).map(|n| n.addr.clone())
    }

    async fn reconcile_loop(self: Arc<Self>) {
        let Some(mut rx) = self.meta().sm.catalogue() else {
            return;
        };
        let mut shutdown = self.shutdown.subscribe();
        loop {
            let cat = rx.borrow_and_update().clone();
            if let Err(e) = self.reconcile(&cat).await {
                tracing::warn!("applying the catalogue on this node: {e:#}");
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Makes this node's open groups, portal targets and peer portals match the catalogue.
    async fn reconcile(self: &Arc<Self>, cat: &Catalogue) -> Result<()> {
        let _guard = self.reconcile_lock.lock().await;
        if *self.shutdown.borrow() {
            return Ok(());
        }
        // Volumes this node holds a replica of.
        let wanted: BTreeMap<GroupId, &VolumeInfo> = cat
            .volumes
            .iter()
            .filter(|v| v.replicas.contains(&self.id))
            .map(|v| (v.id, v))
            .collect();
        let open: Vec<GroupId> = self
            .read_groups()
            .keys()
            .copied()
            .filter(|g| *g != META_GROUP)
            .collect();
        for g in open {
            if !wanted.contains_key(&g) {
                self.close_volume(g, !cat.volumes.iter().any(|v| v.id == g)).await;
            }
        }
        for (id, info) in &wanted {
            match self.group(*id) {
                Some(g) => {
                    if let Some(v) = &g.volume {
                        v.update_info(info);
                    }
                }
                None => {
                    if let Err(e) = self.open_volume(info).await {
                        tracing::error!(volume = %info.name, "opening the volume's replica: {e:#}");
                    }
                }
            }
        }
        self.update_portal(cat);
        Ok(())
    }

    fn update_portal(self: &Arc<Self>, cat: &Catalogue) {
        let mut targets = Vec::new();
        let groups = self.read_groups();
        let mut by_target: BTreeMap<String, Vec<Arc<VolumeRuntime>>> = BTreeMap::new();
        for g in groups.values() {
            // Out of service after a storage failure (DESIGN.md invariant 7): not exported.
            if storage_failed(&g.raft.metrics().borrow_watched()) {
                continue;
            }
            if let Some(v) = &g.volume {
                by_target.entry(v.target_name()).or_default().push(v.clone());
            }
        }
        drop(groups);
        for (name, vols) in by_target {
            let def = cat.targets.iter().find(|t| t.name.eq_ignore_ascii_case(&name));
            match volume::target_runtime(self, def, &name, &vols) {
                Ok(t) => targets.push(t),
                Err(e) => tracing::error!(target = %name, "exporting the target: {e:#}"),
            }
        }
        self.portal.set_targets(targets);
        let mut peers = Vec::new();
        for n in cat.nodes.iter().filter(|n| n.id != self.id) {
            for p in &n.portals {
                if let (Ok(addr), Ok(tpgt)) = (p.parse::<SocketAddr>(), u16::try_from(n.id)) {
                    peers.push((addr, tpgt));
                }
            }
        }
        self.portal.set_peer_portals(peers);
    }

    async fn open_volume(self: &Arc<Self>, info: &VolumeInfo) -> Result<()> {
        if self.closed.lock().unwrap_or_else(|p| p.into_inner()).contains(&info.id) {
            return Ok(());
        }
        let dir = self.group_dir(info.id);
        std::fs::create_dir_all(&dir)?;
        let faults = GroupFaults::default();
        let sm = GroupStateMachine::open_volume_with_faults(&dir.join("sm"), info.size_bytes, faults.image.clone())
            .with_context(|| format!("opening the image of volume {} in {}", info.name, dir.display()))?;
        let (raft, log) = self.open_raft(info.id, sm.clone(), &dir, &faults).await?;
        let volume = VolumeRuntime::new(self.clone(), info, raft.clone(), sm.clone())?;
        let group = Arc::new(Group {
            id: info.id,
            raft: raft.clone(),
            sm,
            dir,
            log,
            volume: Some(volume.clone()),
            faults,
        });
        self.write_groups().insert(info.id, group);
        volume.spawn_watchers();
        self.spawn_out_of_service_watch(info, &raft);
        tracing::info!(volume = %info.name, group = info.id, "opened the volume's replica");
        // One replica creates the group (the metadata leader that created the volume, else the
        // lowest id); the others wait to be contacted. Leadership then moves to the volume's
        // preferred leader (admin.rs), so leaders spread over the nodes.
        let first = match info.initializer {
            0 => info.replicas.iter().min().copied(),
            n => Some(n),
        };
        if first == Some(self.id) && !raft.is_initialized().await.map_err(|e| anyhow!("{e}"))? {
            let members = replica_members(&self.catalogue(), info);
            if let Err(e) = raft.initialize(members).await {
                tracing::debug!(volume = %info.name, "initialize: {e}");
            }
        }
        Ok(())
    }

    /// DESIGN.md invariant 7: once the volume's Raft stopped on a storage error (the storage code
    /// logged the ERROR naming it), the volume is out of service on this node until it is
    /// restarted: its target leaves this node's portal (its sessions close, so initiators move
    /// to the other nodes' portals) and peers are told the group is not here.
    fn spawn_out_of_service_watch(self: &Arc<Self>, info: &VolumeInfo, raft: &RaftGroup) {
        let node = Arc::downgrade(self);
        let mut metrics = raft.metrics();
        let (id, name) = (info.id, info.name.clone());
        tokio::spawn(async move {
            loop {
                if storage_failed(&metrics.borrow_watched()) {
                    break;
                }
                if metrics.changed().await.is_err() {
                    if storage_failed(&metrics.borrow_watched()) {
                        break;
                    }
                    return;
                }
            }
            let Some(node) = node.upgrade() else { return };
            if *node.shutdown.borrow() || node.group(id).is_none() {
                return;
            }
            tracing::warn!(
                volume = %name,
                group = id,
                "volume out of service on this node after a storage failure: its target leaves this \
                 node's portal until the node is restarted"
            );
            node.update_portal(&node.catalogue());
        });
    }

    async fn close_volume(&self, id: GroupId, delete: bool) {
        let Some(g) = self.write_groups().remove(&id) else {
            return;
        };
        // RPCs that looked the group up before it left the registry finish first.
        tokio::time::sleep(IN_FLIGHT_RPC_GRACE).await;
        if let Err(e) = g.raft.shutdown().await {
            tracing::warn!(group = id, "stopping the volume's Raft group: {e}");
        }
        if delete {
            self.closed.lock().unwrap_or_else(|p| p.into_inner()).insert(id);
            g.sm.discard();
            if let Err(e) = std::fs::remove_dir_all(&g.dir) {
                tracing::warn!(group = id, "removing {}: {e}", g.dir.display());
            } else {
                tracing::info!(group = id, "volume deleted: removed its replica");
            }
        } else {
            tracing::info!(group = id, "this node no longer holds a replica of the volume");
        }
    }

    /// Graceful stop: hand over leadership of every group this node leads, then stop the groups.
    pub async fn shutdown(&self) {
        self.shutdown.send_replace(true);
        self.portal.shutdown();
        let groups: Vec<Arc<Group>> = self.read_groups().values().cloned().collect();
        let mut waits = Vec::new();
        for g in &groups {
            let m = g.raft.metrics().borrow_watched().clone();
            if m.current_leader != Some(self.id) {
                continue;
            }
            let to = m.membership_config.membership().voter_ids().find(|v| *v != self.id);
            if let Some(to) = to {
                tracing::info!(group = g.id, to, "transferring leadership before shutdown");
                let _ = g.raft.trigger().transfer_leader(to).await;
                let raft = g.raft.clone();
                let me = self.id;
                waits.push(async move {
                    let _ = raft
                        .wait(Some(Duration::from_secs(2)))
                        .metrics(
                            |m| m.current_leader.is_some() && m.current_leader != Some(me),
                            "leader moved",
                        )
                        .await;
                });
            }
        }
        futures_util::future::join_all(waits).await;
        // Out of the registry first (peers' RPCs get "no such group"), then stopped.
        self.write_groups().clear();
        tokio::time::sleep(IN_FLIGHT_RPC_GRACE).await;
        for g in groups {
            if let Err(e) = g.sm.persist() {
                tracing::warn!(group = g.id, "persisting the applied state at shutdown: {e}");
            }
            let _ = g.raft.shutdown().await;
        }
    }
}

/// Whether a group's Raft stopped on a storage error (it is then out of service on this node).
fn storage_failed(m: &openraft::RaftMetrics<TypeConfig>) -> bool {
    matches!(m.running_state, Err(openraft::error::Fatal::StorageError(_)))
}

/// The Raft members of volume `info`: its replicas with their RPC addresses from the catalogue.
pub(crate) fn replica_members(cat: &Catalogue, info: &VolumeInfo) -> BTreeMap<u64, BasicNode> {
    info.replicas
        .iter()
        .filter_map(|r| {
            cat.nodes.iter().find(|n| n.id == *r).map(|n| {
                (
                    *r,
                    BasicNode {
                        addr: n.rpc_addr.clone(),
                    },
                )
            })
        })
        .collect()
}

/// How status and metrics name group `id`: "metadata" or the volume's name.
pub(crate) fn group_name(cat: &Catalogue, id: GroupId) -> String {
    if id == META_GROUP {
        return "metadata".to_string();
    }
    cat.volumes
        .iter()
        .find(|v| v.id == id)
        .map(|v| v.name.clone())
        .unwrap_or_else(|| format!("volume-{id}"))
}

impl GroupRegistry<GroupStateMachine> for Node {
    fn raft(&self, group: GroupId) -> Option<RaftGroup> {
        let g = self.group(group)?;
        // A group whose Raft stopped on a storage error is out of service on this node (DESIGN.md
        // invariant 7): peers are told it is not here, rather than openraft logging its fatal
        // error again for every request they send until the node is restarted.
        if storage_failed(&g.raft.metrics().borrow_watched()) {
            return None;
        }
        Some(g.raft.clone())
    }

    fn snapshot_base(&self, group: GroupId) -> Option<SnapshotBase> {
        self.group(group).map(|g| g.sm.snapshot_base())
    }
}

/// Diagnostics build only (`--features raft-stats`): logs openraft's runtime statistics of the
/// group (batch sizes per stage, per-stage log latency) every `RAFTSAN_RAFT_STATS_SECS` seconds
/// (default 10) while the group runs. Used to find where a replicated write spends its time.
#[cfg(feature = "raft-stats")]
fn log_runtime_stats(group: GroupId, raft: &RaftGroup) {
    let every = std::env::var("RAFTSAN_RAFT_STATS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10u64);
    let raft = raft.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(every)).await;
            match raft.runtime_stats().await {
                Ok(stats) => tracing::info!(group, "openraft runtime stats:\n{}", stats.display().human_readable()),
                Err(_) => return,
            }
        }
    });
}

/// openraft settings of every group, from the node's `[raft]` section.
fn raft_config(s: &ClusterSettings) -> Result<Arc<openraft::Config>> {
    let c = openraft::Config {
        cluster_name: "raftsan".into(),
        heartbeat_interval: s.raft.heartbeat_ms,
        election_timeout_min: s.raft.election_timeout_min_ms,
        election_timeout_max: s.raft.election_timeout_max_ms,
        // Unary RPC budget (soft_ttl is 3/4 of it).
        install_snapshot_timeout: 1_000,
        max_payload_entries: 256,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(s.raft.snapshot_every_entries),
        max_in_snapshot_log_to_keep: s.raft.keep_entries,
        enable_pre_vote: Some(true),
        ..Default::default()
    };
    Ok(Arc::new(c.validate().map_err(|e| anyhow!("Raft settings: {e}"))?))
}
