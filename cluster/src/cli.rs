//! The cluster side of the `raftsan` binary: `serve` of a cluster node, `cluster ...`,
//! `volume ...`, `status` and `fault ...` (testing-only storage fault injection).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Subcommand;
use raftsan_cluster::config::{ClusterSettings, NodeConfig};
use raftsan_cluster::node::{AdminClient, BOOTSTRAP_MARKER, Node, NodeOptions, TestingService};
use raftsan_cluster::pb::cluster::testing_server::TestingServer;
use raftsan_cluster::pb::cluster::{
    AddNodeRequest, CreateVolume, Empty, NodeInfo, RemoveNodeRequest, ResizeVolume, StatusRequest, StatusResponse,
    VolumeRequest, cluster_server::ClusterServer,
};
use raftsan_cluster::rpc::{self, TlsFiles};

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Create a new cluster on this node: the cluster CA (if missing), this node's certificate,
    /// an admin certificate, and a marker that makes the next `raftsan serve` create the
    /// metadata group with this node as its only voter. Run once, before the first `serve`.
    Init {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Issue a certificate for another node (needs the CA key, so run it where `init` ran).
    IssueCert {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// The new node's id (never reused).
        #[arg(long)]
        node_id: u64,
        /// IP addresses the certificate is valid for (the node's RPC address).
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        /// Directory to write ca.crt, node-<id>.crt and node-<id>.key into.
        #[arg(long)]
        out: PathBuf,
    },
    /// Add a running node (started with `raftsan serve`, not initialized) to the cluster: it
    /// becomes a learner, catches up, then a voter, and gets a replica of every volume.
    AddNode {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        id: u64,
        /// The node's cluster RPC address.
        #[arg(long)]
        rpc: String,
        /// The node's iSCSI portals (repeatable).
        #[arg(long = "portal")]
        portals: Vec<String>,
        #[arg(long, default_value = "")]
        metrics: String,
    },
    /// Ask the cluster at VIA to add this node (reads id and addresses from --config).
    Join {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Any member's RPC address.
        #[arg(long)]
        via: String,
    },
    /// Remove a node: its replicas leave every group, then it leaves the metadata group. Its id
    /// is never used again.
    RemoveNode {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        id: u64,
    },
}

#[derive(Subcommand)]
pub enum VolumeCmd {
    /// Create a volume replicated on every node, exported by every node's portal.
    Create {
        #[command(flatten)]
        conn: Conn,
        name: String,
        /// Size: bytes or with a suffix K, M, G, T (powers of 1024).
        #[arg(long)]
        size: String,
        /// Target name; default iqn.2026-11.org.raftsan:<name>.
        #[arg(long, default_value = "")]
        target: String,
        #[arg(long, default_value_t = 512)]
        block_size: u32,
    },
    Delete {
        #[command(flatten)]
        conn: Conn,
        name: String,
    },
    /// Grow a volume (initiators get UNIT ATTENTION 2A/09 CAPACITY DATA HAS CHANGED).
    Resize {
        #[command(flatten)]
        conn: Conn,
        name: String,
        #[arg(long)]
        size: String,
    },
    List {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
}

/// `raftsan fault`: storage fault injection, for testing only. The node must run with
/// `[testing] fault_injection = true` in its config, or it refuses (and changes nothing).
#[derive(Subcommand)]
pub enum FaultCmd {
    /// Arm a storage fault on one node: every later matching I/O of the volume's image or Raft
    /// log fails with the chosen errno (after `--after` more successes) until cleared or the node
    /// restarts. A failed write or fsync takes the group out of service on that node.
    Inject {
        #[command(flatten)]
        conn: Conn,
        /// The volume (default: every volume the node holds).
        #[arg(long, default_value = "")]
        volume: String,
        #[arg(long, value_enum)]
        target: FaultTargetArg,
        #[arg(long, value_enum)]
        op: FaultOpArg,
        #[arg(long, value_enum)]
        error: FaultErrnoArg,
        /// Let this many more matching operations succeed first.
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
    /// Disarm the node's storage faults (of `--volume`, default every volume).
    Clear {
        #[command(flatten)]
        conn: Conn,
        #[arg(long, default_value = "")]
        volume: String,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum FaultTargetArg {
    /// The volume's image file.
    Image,
    /// The volume group's Raft log.
    Log,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum FaultOpArg {
    Write,
    /// fsync / fdatasync.
    Flush,
    Read,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum FaultErrnoArg {
    Eio,
    /// Disk full.
    Enospc,
}

pub const DEFAULT_CONFIG: &str = "/etc/raftsan/node.toml";

/// How an admin command reaches the cluster: a node's config (its certificate and RPC address),
/// or explicit certificate files and an address.
#[derive(clap::Args, Clone)]
pub struct Conn {
    /// A node configuration to take the RPC address and certificates from.
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// RPC address of the node to talk to (default: the config's node).
    #[arg(long)]
    pub node: Option<String>,
    /// Client certificate and key signed by the cluster CA (default: the config's node
    /// certificate), and the CA certificate.
    #[arg(long, requires_all = ["key", "ca"])]
    pub cert: Option<PathBuf>,
    #[arg(long)]
    pub key: Option<PathBuf>,
    #[arg(long)]
    pub ca: Option<PathBuf>,
}

impl Conn {
    /// Like [`Conn::connect`], but `--node` may also be a node id: the node's RPC address is then
    /// looked up in the catalogue (through the config's node or the address of `--node` ...).
    pub async fn connect_node(&self) -> Result<AdminClient> {
        let Some(id) = self.node.as_deref().and_then(|n| n.parse::<u64>().ok()) else {
            return self.connect();
        };
        let via = Conn {
            node: None,
            ..self.clone()
        };
        let mut c = via.connect()?;
        let cat = c.catalogue().await?;
        let addr = cat
            .nodes
            .iter()
            .find(|n| n.id == id)
            .map(|n| n.rpc_addr.clone())
            .ok_or_else(|| anyhow!("node {id} is not a member of the cluster ({})", c.addr))?;
        Conn {
            node: Some(addr),
            ..self.clone()
        }
        .connect()
    }

    pub fn connect(&self) -> Result<AdminClient> {
        let (addr, tls) = match (&self.cert, &self.key, &self.ca) {
            (Some(cert), Some(key), Some(ca)) => {
                let addr = self
                    .node
                    .clone()
                    .ok_or_else(|| anyhow!("--node ADDR is needed with --cert/--key/--ca"))?;
                (
                    addr,
                    TlsFiles {
                        ca_cert: ca.clone(),
                        cert: cert.clone(),
                        key: key.clone(),
                    },
                )
            }
            _ => {
                let cs = cluster_settings(&self.config)?;
                (
                    self.node.clone().unwrap_or(cs.rpc_advertise.clone()),
                    TlsFiles {
                        ca_cert: cs.tls.ca,
                        cert: cs.tls.cert,
                        key: cs.tls.key,
                    },
                )
            }
        };
        AdminClient::connect(&addr, tls)
    }
}

fn cluster_settings(config: &Path) -> Result<ClusterSettings> {
    let cfg = super::load(config)?;
    cfg.cluster.ok_or_else(|| {
        anyhow!(
            "{} is not a cluster node configuration ([node] id is not set)",
            config.display()
        )
    })
}

/// Parses `10G`, `512M`, `1048576`.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        None => (t, 1u64),
        Some((i, _)) => {
            let unit = t[i..].to_ascii_uppercase();
            let m = match unit.trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => bail!("size {s:?}: unknown unit (use K, M, G or T)"),
            };
            (&t[..i], m)
        }
    };
    let n: u64 = num.trim().parse().map_err(|_| anyhow!("size {s:?} is not a number"))?;
    n.checked_mul(mult).ok_or_else(|| anyhow!("size {s:?} is too large"))
}

fn status_err(addr: &str, s: tonic::Status) -> anyhow::Error {
    anyhow!("{addr}: {}", s.message())
}

/// `raftsan serve` of a cluster node.
pub async fn serve_cluster(cfg: NodeConfig, cs: ClusterSettings) -> Result<()> {
    if let Some(addr) = cfg.metrics_listen {
        super::install_metrics(addr).with_context(|| format!("starting the metrics listener on {addr}"))?;
    }
    let data_dir = cfg
        .data_dir
        .clone()
        .ok_or_else(|| anyhow!("a cluster node needs data_dir in [node]"))?;
    let tls = TlsFiles {
        ca_cert: cs.tls.ca.clone(),
        cert: cs.tls.cert.clone(),
        key: cs.tls.key.clone(),
    };
    let node = Node::start(NodeOptions {
        settings: cs.clone(),
        data_dir,
        portals: cfg.portals.clone(),
        metrics_addr: cfg.metrics_listen,
        portal_settings: super::portal_settings(&cfg),
    })
    .await?;
    let rpc_listener = tokio::net::TcpListener::bind(cs.rpc_listen)
        .await
        .with_context(|| format!("listening for cluster RPC on {}", cs.rpc_listen))?;
    tracing::info!(rpc = %cs.rpc_listen, node = cs.node_id, "cluster RPC listening (mutual TLS)");
    let (stop_rpc, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let registry: Arc<dyn rpc::GroupRegistry<_>> = node.clone();
    let service = raftsan_cluster::node::ClusterService { node: node.clone() };
    let mut builder = rpc::server_builder(Some(&tls))?;
    let router = builder
        .add_service(rpc::raft_service(registry, node.snapshot_progress()))
        .add_service(
            ClusterServer::new(service)
                .max_decoding_message_size(rpc::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(rpc::MAX_MESSAGE_BYTES),
        )
        .add_service(TestingServer::new(TestingService { node: node.clone() }));
    let incoming = rpc::incoming(rpc_listener);
    let rpc_task = tokio::spawn(async move {
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            })
            .await
        {
            tracing::error!("cluster RPC server stopped: {e}");
        }
    });
    let mut tasks = Vec::new();
    for addr in &cfg.portals {
        let l = node
            .portal()
            .bind(*addr)
            .await
            .with_context(|| format!("listening on portal {addr}"))?;
        tracing::info!(portal = %l.local_addr()?, "portal listening");
        tasks.push(tokio::spawn(node.portal().clone().serve(l)));
    }
    let admin = cfg.admin_socket_path();
    super::spawn_admin(node.portal().clone(), &admin)
        .with_context(|| format!("opening the admin socket {}", admin.display()))?;
    node.spawn_background();
    super::wait_for_signal().await;
    tracing::info!("shutting down: handing over leadership");
    node.shutdown().await;
    let _ = stop_rpc.send(());
    let _ = tokio::time::timeout(Duration::from_secs(3), rpc_task).await;
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(3), t).await;
    }
    let _ = std::fs::remove_file(admin);
    Ok(())
}

pub async fn cluster(cmd: ClusterCmd) -> Result<()> {
    match cmd {
        ClusterCmd::Init { config } => init(&config),
        ClusterCmd::IssueCert {
            config,
            node_id,
            ips,
            out,
        } => {
            let cs = cluster_settings(&config)?;
            let pki = pki_dir(&cs)?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let files = rpc::issue_node_cert(&pki, node_id, &ips, &out)
                .with_context(|| format!("issuing a certificate for node {node_id}"))?;
            let ca_copy = out.join("ca.crt");
            // Copying a file onto itself would truncate it.
            let same = std::fs::canonicalize(&cs.tls.ca).ok() == std::fs::canonicalize(&ca_copy).ok();
            if !same {
                std::fs::copy(&cs.tls.ca, &ca_copy).context("copying the CA certificate")?;
            }
            println!(
                "node {node_id}: {} and {} (CA: {})",
                files.cert.display(),
                files.key.display(),
                out.join("ca.crt").display()
            );
            Ok(())
        }
        ClusterCmd::AddNode {
            conn,
            id,
            rpc,
            portals,
            metrics,
        } => {
            let node = NodeInfo {
                id,
                rpc_addr: rpc,
                portals,
                metrics_addr: metrics,
            };
            add_node(conn.connect()?, node).await
        }
        ClusterCmd::Join { config, via } => {
            let cfg = super::load(&config)?;
            let cs = cfg
                .cluster
                .clone()
                .ok_or_else(|| anyhow!("{} is not a cluster node configuration", config.display()))?;
            let node = NodeInfo {
                id: cs.node_id,
                rpc_addr: cs.rpc_advertise.clone(),
                portals: cfg.portals.iter().map(|p| p.to_string()).collect(),
                metrics_addr: cfg.metrics_listen.map(|m| m.to_string()).unwrap_or_default(),
            };
            let client = AdminClient::connect(
                &via,
                TlsFiles {
                    ca_cert: cs.tls.ca,
                    cert: cs.tls.cert,
                    key: cs.tls.key,
                },
            )?;
            add_node(client, node).await
        }
        ClusterCmd::RemoveNode { conn, id } => {
            let mut c = conn.connect()?;
            let addr = c.addr.clone();
            c.inner()
                .remove_node(RemoveNodeRequest { id })
                .await
                .map_err(|s| status_err(&addr, s))?;
            println!("node {id} removed from the catalogue; waiting for the groups to drop it");
            let ok = wait_status(&mut c, Duration::from_secs(60), |s| {
                s.nodes
                    .iter()
                    .filter(|n| n.reachable && n.id != id)
                    .flat_map(|n| n.groups.iter())
                    .all(|g| !g.voters.contains(&id) && !g.learners.contains(&id))
            })
            .await;
            if ok {
                println!("node {id} is out of every group; it can be stopped");
                Ok(())
            } else {
                bail!("node {id} is still a member of some group after 60 s; see `raftsan status`")
            }
        }
    }
}

fn pki_dir(cs: &ClusterSettings) -> Result<PathBuf> {
    cs.tls
        .ca
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| anyhow!("the CA path {} has no directory", cs.tls.ca.display()))
}

fn init(config: &Path) -> Result<()> {
    let cfg = super::load(config)?;
    let cs = cfg.cluster.clone().ok_or_else(|| {
        anyhow!(
            "{} is not a cluster node configuration ([node] id is not set)",
            config.display()
        )
    })?;
    let data_dir = cfg
        .data_dir
        .clone()
        .ok_or_else(|| anyhow!("{}: a cluster node needs data_dir in [node]", config.display()))?;
    if data_dir.join("meta").exists() {
        bail!(
            "{} already holds cluster state (meta/); a node joins an existing cluster with `raftsan cluster join`",
            data_dir.display()
        );
    }
    let pki = pki_dir(&cs)?;
    std::fs::create_dir_all(&pki).with_context(|| format!("creating {}", pki.display()))?;
    if !cs.tls.ca.exists() {
        rpc::create_ca(&pki).with_context(|| format!("creating the cluster CA in {}", pki.display()))?;
        println!("created the cluster CA: {}", cs.tls.ca.display());
    }
    if !cs.tls.cert.exists() || !cs.tls.key.exists() {
        let ips = vec![cs.rpc_listen.ip()];
        let out = cs.tls.cert.parent().unwrap_or(&pki).to_path_buf();
        let files = rpc::issue_node_cert(&pki, cs.node_id, &ips, &out)?;
        place(&files.cert, &cs.tls.cert)?;
        place(&files.key, &cs.tls.key)?;
        println!("issued node {}'s certificate: {}", cs.node_id, cs.tls.cert.display());
    }
    if !pki.join("admin.crt").exists() {
        let files = rpc::issue_admin_cert(&pki, &pki)?;
        println!("issued an admin certificate: {}", files.cert.display());
    }
    std::fs::create_dir_all(&data_dir)?;
    std::fs::write(data_dir.join(BOOTSTRAP_MARKER), format!("{}\n", cs.node_id))?;
    println!(
        "node {} will create the cluster when `raftsan serve --config {}` starts",
        cs.node_id,
        config.display()
    );
    Ok(())
}

fn place(from: &Path, to: &Path) -> Result<()> {
    if from != to {
        std::fs::rename(from, to).with_context(|| format!("moving {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}

async fn add_node(mut c: AdminClient, node: NodeInfo) -> Result<()> {
    let id = node.id;
    let addr = c.addr.clone();
    c.inner()
        .add_node(AddNodeRequest { node: Some(node) })
        .await
        .map_err(|s| status_err(&addr, s))?;
    println!("node {id} is in the catalogue; waiting for it to become a voter");
    let ok = wait_status(&mut c, Duration::from_secs(120), |s| {
        s.nodes
            .iter()
            .flat_map(|n| n.groups.iter())
            .any(|g| g.group == 0 && g.leader == n_leader(s) && g.voters.contains(&id))
    })
    .await;
    if ok {
        println!("node {id} is a voter of the metadata group; volume replicas follow (see `raftsan status`)");
        Ok(())
    } else {
        bail!("node {id} did not become a voter within 120 s: is `raftsan serve` running there and reachable?")
    }
}

/// The metadata leader as the answering node reports it.
fn n_leader(s: &StatusResponse) -> u64 {
    s.nodes
        .iter()
        .flat_map(|n| n.groups.iter())
        .find(|g| g.group == 0 && g.leader != 0)
        .map(|g| g.leader)
        .unwrap_or(0)
}

async fn wait_status(c: &mut AdminClient, within: Duration, ok: impl Fn(&StatusResponse) -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if let Ok(s) = c.inner().status(StatusRequest {}).await
            && ok(&s.into_inner())
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    false
}

pub async fn volume(cmd: VolumeCmd) -> Result<()> {
    match cmd {
        VolumeCmd::Create {
            conn,
            name,
            size,
            target,
            block_size,
        } => {
            let mut c = conn.connect()?;
            let addr = c.addr.clone();
            let v = c
                .inner()
                .create_volume(CreateVolume {
                    name,
                    size_bytes: parse_size(&size)?,
                    block_size,
                    target,
                    replicas: Vec::new(),
                    initializer: 0,
                })
                .await
                .map_err(|s| status_err(&addr, s))?
                .into_inner();
            println!(
                "volume {} (id {}): {} bytes, target {} LUN {}, replicas {:?}",
                v.name, v.id, v.size_bytes, v.target, v.lun, v.replicas
            );
            Ok(())
        }
        VolumeCmd::Delete { conn, name } => {
            let mut c = conn.connect()?;
            let addr = c.addr.clone();
            c.inner()
                .delete_volume(VolumeRequest { name: name.clone() })
                .await
                .map_err(|s| status_err(&addr, s))?;
            println!("volume {name} deleted");
            Ok(())
        }
        VolumeCmd::Resize { conn, name, size } => {
            let mut c = conn.connect()?;
            let addr = c.addr.clone();
            let v = c
                .inner()
                .resize_volume(ResizeVolume {
                    name,
                    size_bytes: parse_size(&size)?,
                })
                .await
                .map_err(|s| status_err(&addr, s))?
                .into_inner();
            println!("volume {} is now {} bytes", v.name, v.size_bytes);
            Ok(())
        }
        VolumeCmd::List { conn, json } => {
            let mut c = conn.connect()?;
            let addr = c.addr.clone();
            let list = c
                .inner()
                .list_volumes(Empty {})
                .await
                .map_err(|s| status_err(&addr, s))?
                .into_inner();
            if json {
                let v: Vec<serde_json::Value> = list
                    .volumes
                    .iter()
                    .map(|v| {
                        serde_json::json!({"id": v.id, "name": v.name, "size_bytes": v.size_bytes,
                            "block_size": v.block_size, "target": v.target, "lun": v.lun,
                            "serial": v.serial, "naa": hex::encode(&v.naa), "replicas": v.replicas})
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                println!(
                    "{:<4} {:<20} {:>14} {:<44} {:>3}  REPLICAS",
                    "ID", "NAME", "BYTES", "TARGET", "LUN"
                );
                for v in &list.volumes {
                    println!(
                        "{:<4} {:<20} {:>14} {:<44} {:>3}  {:?}",
                        v.id, v.name, v.size_bytes, v.target, v.lun, v.replicas
                    );
                }
            }
            Ok(())
        }
    }
}

pub async fn status(conn: Conn, json: bool, local: bool) -> Result<()> {
    let mut c = conn.connect()?;
    let addr = c.addr.clone();
    let s = if local {
        let node = c
            .inner()
            .local_status(StatusRequest {})
            .await
            .map_err(|s| status_err(&addr, s))?
            .into_inner()
            .node
            .ok_or_else(|| anyhow!("{addr}: empty answer"))?;
        StatusResponse {
            answered_by: node.id,
            nodes: vec![node],
            ..Default::default()
        }
    } else {
        c.inner()
            .status(StatusRequest {})
            .await
            .map_err(|s| status_err(&addr, s))?
            .into_inner()
    };
    if json {
        println!("{}", status_json(&s));
    } else {
        print!("{}", render_status(&s));
    }
    Ok(())
}

pub async fn fault(cmd: FaultCmd) -> Result<()> {
    use raftsan_cluster::pb::cluster::{ClearFaultsRequest, FaultErrno, FaultOp, FaultTarget, InjectFaultRequest};
    let (c, resp) = match cmd {
        FaultCmd::Inject {
            conn,
            volume,
            target,
            op,
            error,
            after,
        } => {
            let c = conn.connect_node().await?;
            let req = InjectFaultRequest {
                volume,
                target: match target {
                    FaultTargetArg::Image => FaultTarget::Image,
                    FaultTargetArg::Log => FaultTarget::Log,
                } as i32,
                op: match op {
                    FaultOpArg::Write => FaultOp::Write,
                    FaultOpArg::Flush => FaultOp::Flush,
                    FaultOpArg::Read => FaultOp::Read,
                } as i32,
                error: match error {
                    FaultErrnoArg::Eio => FaultErrno::Eio,
                    FaultErrnoArg::Enospc => FaultErrno::Enospc,
                } as i32,
                after_ops: after,
            };
            let r = c.testing().inject_fault(req).await;
            (c, r)
        }
        FaultCmd::Clear { conn, volume } => {
            let c = conn.connect_node().await?;
            let r = c.testing().clear_faults(ClearFaultsRequest { volume }).await;
            (c, r)
        }
    };
    let resp = resp.map_err(|s| status_err(&c.addr, s))?.into_inner();
    if resp.armed.is_empty() {
        println!("node {}: no storage fault armed", resp.node);
    }
    for f in &resp.armed {
        let name = |s: &str, prefix: &str| s.trim_start_matches(prefix).to_ascii_lowercase();
        println!(
            "node {}: volume {} {} {} fails with {} after {} more",
            resp.node,
            f.volume,
            name(f.target().as_str_name(), "FAULT_TARGET_"),
            name(f.op().as_str_name(), "FAULT_OP_"),
            name(f.error().as_str_name(), "FAULT_ERRNO_"),
            f.after_ops
        );
    }
    Ok(())
}

pub fn status_json(s: &StatusResponse) -> serde_json::Value {
    let nodes: Vec<serde_json::Value> = s
        .nodes
        .iter()
        .map(|n| {
            let groups: Vec<serde_json::Value> = n
                .groups
                .iter()
                .map(|g| {
                    serde_json::json!({"group": g.group, "name": g.name, "leader": g.leader, "term": g.term,
                        "commit_index": g.commit_index, "applied_index": g.applied_index,
                        "voters": g.voters, "learners": g.learners, "snapshot_progress": g.snapshot_progress,
                        "followers": g.followers.iter().map(|f| serde_json::json!({"node": f.node,
                            "matched_index": f.matched_index, "lag_entries": f.lag_entries})).collect::<Vec<_>>()})
                })
                .collect();
            serde_json::json!({"id": n.id, "rpc_addr": n.rpc_addr, "portals": n.portals,
                "metrics_addr": n.metrics_addr, "reachable": n.reachable, "error": n.error, "groups": groups})
        })
        .collect();
    serde_json::json!({"answered_by": s.answered_by, "nodes": nodes})
}

/// Text form of `raftsan status`: every node, then every group with leader, term, indexes and
/// each follower's lag as the leader sees it.
pub fn render_status(s: &StatusResponse) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(o, "NODES (answered by node {})", s.answered_by);
    for n in &s.nodes {
        let state = if n.reachable {
            "up".to_string()
        } else {
            format!("UNREACHABLE ({})", n.error)
        };
        let _ = writeln!(
            o,
            "  node {:<3} rpc {:<22} portals {:<24} metrics {:<22} {}",
            n.id,
            n.rpc_addr,
            n.portals.join(","),
            if n.metrics_addr.is_empty() {
                "-"
            } else {
                &n.metrics_addr
            },
            state
        );
    }
    let _ = writeln!(o, "GROUPS");
    let mut seen = std::collections::BTreeSet::new();
    for n in &s.nodes {
        for g in &n.groups {
            // Each group once, from its leader's report when reachable.
            if g.leader != n.id || !seen.insert(g.group) {
                continue;
            }
            let _ = writeln!(
                o,
                "  {:<20} leader {:<3} term {:<4} commit {:<8} applied {:<8} voters {:?}{}",
                g.name,
                g.leader,
                g.term,
                g.commit_index,
                g.applied_index,
                g.voters,
                if g.learners.is_empty() {
                    String::new()
                } else {
                    format!(" learners {:?}", g.learners)
                }
            );
            for f in &g.followers {
                let _ = writeln!(
                    o,
                    "      follower {:<3} matched {:<8} lag {} entries",
                    f.node, f.matched_index, f.lag_entries
                );
            }
        }
    }
    for n in &s.nodes {
        for g in &n.groups {
            if !seen.contains(&g.group) && seen.insert(g.group) {
                let _ = writeln!(
                    o,
                    "  {:<20} NO LEADER (node {} sees term {}, applied {})",
                    g.name, n.id, g.term, g.applied_index
                );
            }
            if !g.snapshot_progress.is_empty() {
                let _ = writeln!(o, "      node {} snapshot: {}", n.id, g.snapshot_progress);
            }
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("4KiB").unwrap(), 4096);
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        assert!(parse_size("10Q").is_err());
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
