//! `raftsan`: the storage-node daemon and its admin commands.
//!
//! * `raftsan serve --config FILE [--listen ADDR:PORT]... [--data-dir DIR] [--metrics ADDR:PORT]`
//!   serves the targets of FILE (the project's TOML or a tgt `targets.conf`).
//! * `raftsan show [--admin-socket PATH] [--json]` prints the targets, LUNs, sessions (I_T
//!   nexus), accounts and ACLs of a running daemon, like `tgtadm --mode target --op show`.
//! * `raftsan check-config FILE` validates a configuration without serving it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use raftsan_cluster::config::{self, NodeConfig};
use raftsan_target::portal::{PortalServer, PortalSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
#[command(
    name = "raftsan",
    version,
    about = "raftsan storage node: a highly available iSCSI target"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the targets of a configuration file (TOML or tgt targets.conf).
    Serve {
        /// The node configuration: raftsan TOML, or a tgt targets.conf with <target> blocks.
        #[arg(long, short)]
        config: PathBuf,
        /// iSCSI portal address (repeatable; IPv4 `127.0.0.1:3260` or IPv6 `[::1]:3260`).
        /// Overrides the portals of the configuration file.
        #[arg(long = "listen", short)]
        listen: Vec<SocketAddr>,
        /// Directory for persistent state (persistent reservations with APTPL); overrides the file.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Serve Prometheus metrics on this address (`/metrics`); overrides the file.
        #[arg(long)]
        metrics: Option<SocketAddr>,
        /// Unix socket `raftsan show` reads from; overrides the file.
        #[arg(long)]
        admin_socket: Option<PathBuf>,
    },
    /// Show targets, LUNs, sessions, accounts and ACLs of a running daemon.
    Show {
        /// The daemon's admin socket.
        #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Validate a configuration file and print what it defines.
    CheckConfig { config: PathBuf },
    /// Cluster membership: init, issue-cert, add-node, join, remove-node.
    #[command(subcommand)]
    Cluster(cli::ClusterCmd),
    /// Volumes: create, delete, resize, list.
    #[command(subcommand)]
    Volume(cli::VolumeCmd),
    /// Storage fault injection on one node, for testing only (the node's config must have
    /// `[testing] fault_injection = true`): inject, clear.
    #[command(subcommand)]
    Fault(cli::FaultCmd),
    /// Every node, every group's leader, term, commit/applied index and each follower's lag.
    Status {
        #[command(flatten)]
        conn: cli::Conn,
        #[arg(long)]
        json: bool,
        /// Only the answering node's own view (no calls to the other nodes): quick even while a
        /// node hangs.
        #[arg(long)]
        local: bool,
    },
    /// Start a three-node cluster on loopback (real `raftsan serve` processes on 127.0.0.11-13,
    /// portals on port 3260), create a replicated 256 MiB volume, check it with real iSCSI
    /// clients (iscsi-ls, qemu-img: written through node 1, read through nodes 2 and 3) and keep
    /// running until Ctrl-C, reporting leadership changes (try kill -9 of the leader's node).
    Demo {
        /// Address of node 1; nodes 2 and 3 take the next two addresses.
        #[arg(long, default_value = "127.0.0.11")]
        first_address: std::net::Ipv4Addr,
        /// Keep the data in this directory instead of a temporary one.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Size of the demo volume.
        #[arg(long, default_value = "256M")]
        size: String,
        /// Stop after the client check instead of serving until Ctrl-C.
        #[arg(long)]
        check_only: bool,
        /// Do not run the demo client's background writer (4 KiB every 20 ms through the NBD
        /// export, reporting every write that stalls), e.g. when benchmarking the cluster.
        #[arg(long)]
        no_client_writes: bool,
        /// Do not start the demo client (`raftsan-initiator attach` exporting the volume over NBD)
        /// at all, nor its background writer: only the three nodes, e.g. when benchmarking the
        /// cluster with your own clients.
        #[arg(long)]
        no_client: bool,
        /// The nodes' Raft log fsync policy: `on-flush` (the default: durable on SYNCHRONIZE CACHE
        /// and FUA, like a disk's write cache) or `always` (every append batch is durable before
        /// it counts towards a quorum); see docs/configuration.md.
        #[arg(long, default_value = "on-flush", value_parser = ["always", "on-flush"])]
        fsync: String,
    },
}

const DEFAULT_ADMIN_SOCKET: &str = "/run/raftsan/admin.sock";

/// mimalloc: the I/O path allocates and frees a few buffers per command on every node; glibc's
/// malloc was 7 % of a replicated write's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    if let Err(e) = run() {
        // The error chain says what was being done and why; no backtrace for operators.
        eprintln!("raftsan: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RAFTSAN_LOG")
                .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Cmd::Serve {
            config,
            listen,
            data_dir,
            metrics,
            admin_socket,
        } => {
            let mut cfg = load(&config)?;
            if !listen.is_empty() {
                cfg.portals = listen;
            }
            if data_dir.is_some() {
                cfg.data_dir = data_dir;
            }
            if metrics.is_some() {
                cfg.metrics_listen = metrics;
            }
            if admin_socket.is_some() {
                cfg.admin_socket = admin_socket;
            }
            // One worker thread: a current-thread runtime (every task on this thread, no work
            // stealing or cross-thread wake-ups); blocking work still goes to the blocking pool.
            let mut rt = match cfg.worker_threads {
                Some(1) => tokio::runtime::Builder::new_current_thread(),
                Some(n) => {
                    let mut b = tokio::runtime::Builder::new_multi_thread();
                    b.worker_threads(n);
                    b
                }
                None => tokio::runtime::Builder::new_multi_thread(),
            };
            let rt = rt.enable_all().build()?;
            match cfg.cluster.clone() {
                Some(cs) => rt.block_on(cli::serve_cluster(cfg, cs)),
                None => rt.block_on(serve(cfg)),
            }
        }
        Cmd::Cluster(c) => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(cli::cluster(c))
        }
        Cmd::Volume(c) => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(cli::volume(c))
        }
        Cmd::Fault(c) => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(cli::fault(c))
        }
        Cmd::Status { conn, json, local } => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(cli::status(conn, json, local))
        }
        Cmd::Show { admin_socket, json } => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(show(&admin_socket, json))
        }
        Cmd::Demo {
            first_address,
            dir,
            size,
            check_only,
            no_client_writes,
            no_client,
            fsync,
        } => {
            let size = cli::parse_size(&size)?;
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let opts = demo::Options {
                check_only,
                client: !no_client,
                client_writes: !no_client_writes && !no_client,
                fsync: if fsync == "always" { "always" } else { "on-flush" },
            };
            rt.block_on(demo::run(first_address, dir, size, opts))
        }
        Cmd::CheckConfig { config } => {
            let cfg = load(&config)?;
            for t in &cfg.catalog.targets {
                println!("target {} (tid {}): {} LUN(s)", t.name, t.tid, t.luns.len());
            }
            println!("{}: OK", config.display());
            Ok(())
        }
    }
}

fn load(path: &Path) -> Result<NodeConfig> {
    let cfg = config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
    Ok(cfg)
}

mod cli;
mod demo;

/// Builds the portal settings of a node configuration.
fn portal_settings(cfg: &NodeConfig) -> PortalSettings {
    PortalSettings {
        iscsi: raftsan_proto::text::TargetLimits {
            max_recv_data_segment_length: cfg.iscsi.max_recv_data_segment_length,
            max_burst_length: cfg.iscsi.max_burst_length,
            first_burst_length: cfg.iscsi.first_burst_length,
            max_outstanding_r2t: cfg.iscsi.max_outstanding_r2t,
            allow_header_digest: cfg.iscsi.header_digests.contains(&config::Digest::Crc32c),
            allow_data_digest: cfg.iscsi.data_digests.contains(&config::Digest::Crc32c),
            initial_r2t: cfg.iscsi.initial_r2t,
            immediate_data: cfg.iscsi.immediate_data,
        },
        max_connections: cfg.limits.max_connections_per_portal,
        max_sessions: cfg.limits.max_sessions,
        login_timeout: Duration::from_millis(cfg.limits.login_timeout_ms),
        cmd_window: cfg.limits.max_cmds_per_session,
        nop_in_interval: Duration::from_millis(cfg.limits.nop_in_interval_ms),
        nop_in_timeout: Duration::from_millis(cfg.limits.nop_in_timeout_ms),
        ..PortalSettings::default()
    }
}

async fn serve(cfg: NodeConfig) -> Result<()> {
    if let Some(addr) = cfg.metrics_listen {
        install_metrics(addr).with_context(|| format!("starting the metrics listener on {addr}"))?;
    }
    let settings = portal_settings(&cfg);
    if let Some(d) = &cfg.data_dir {
        std::fs::create_dir_all(d).with_context(|| format!("creating the data directory {}", d.display()))?;
    }
    let server = PortalServer::new(cfg.catalog.clone(), settings, cfg.data_dir.as_deref())
        .context("opening the backing stores")?;
    if cfg.portals.is_empty() {
        bail!("no portal to listen on: give --listen ADDR:PORT or portals in the configuration");
    }
    let mut listeners = Vec::new();
    for addr in &cfg.portals {
        let l = server
            .bind(*addr)
            .await
            .with_context(|| format!("listening on portal {addr}"))?;
        tracing::info!(portal = %l.local_addr()?, "portal listening");
        listeners.push(l);
    }
    let admin = cfg.admin_socket_path();
    spawn_admin(server.clone(), &admin).with_context(|| format!("opening the admin socket {}", admin.display()))?;
    for t in &cfg.catalog.targets {
        tracing::info!(target = %t.name, tid = t.tid, luns = t.luns.len(), "serving target");
    }
    let mut tasks = Vec::new();
    for l in listeners {
        tasks.push(tokio::spawn(server.clone().serve(l)));
    }
    wait_for_signal().await;
    tracing::info!("shutting down");
    server.shutdown();
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    let _ = std::fs::remove_file(admin);
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing the SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Latency buckets from 50 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn install_metrics(addr: SocketAddr) -> Result<()> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_duration_seconds".into()), LATENCY_BUCKETS)?
        .install()?;
    metrics::gauge!("raftsan_up").set(1.0);
    metrics::gauge!("raftsan_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(())
}

/// Serves `raftsan show`: each connection gets one JSON document of the current state.
fn spawn_admin(server: Arc<PortalServer>, path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A stale socket from an earlier run would make bind fail.
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    tracing::info!(socket = %path.display(), "admin socket listening");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let state = server.show();
            tokio::spawn(async move {
                if let Ok(json) = serde_json::to_vec(&state) {
                    let _ = s.write_all(&json).await;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(())
}

async fn show(path: &Path, json: bool) -> Result<()> {
    let mut s = tokio::net::UnixStream::connect(path).await.with_context(|| {
        format!(
            "connecting to the daemon's admin socket {} (is `raftsan serve` running?)",
            path.display()
        )
    })?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.context("reading the daemon's state")?;
    if json {
        println!("{}", String::from_utf8_lossy(&buf));
        return Ok(());
    }
    let state: serde_json::Value = serde_json::from_slice(&buf).context("decoding the daemon's state")?;
    print!("{}", render_show(&state));
    Ok(())
}

/// Renders the state like `tgtadm --mode target --op show`.
fn render_show(state: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let empty = Vec::new();
    let arr = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_array()).cloned().unwrap_or_default();
    let s = |v: &serde_json::Value, k: &str| {
        v.get(k)
            .map(|x| x.as_str().map(str::to_string).unwrap_or_else(|| x.to_string()))
            .unwrap_or_default()
    };
    let portals: Vec<String> = arr(state, "portals")
        .iter()
        .map(|p| p.as_str().unwrap_or("").to_string())
        .collect();
    let _ = writeln!(o, "Portals: {}", portals.join(", "));
    let sessions = arr(state, "sessions");
    for t in state.get("targets").and_then(|t| t.as_array()).unwrap_or(&empty) {
        let name = s(t, "name");
        let _ = writeln!(o, "Target {}: {}", s(t, "tid"), name);
        let _ = writeln!(o, "    I_T nexus information:");
        for sess in sessions
            .iter()
            .filter(|x| x.get("target").and_then(|n| n.as_str()) == Some(name.as_str()))
        {
            let _ = writeln!(o, "        I_T nexus: {} (TSIH)", s(sess, "tsih"));
            let _ = writeln!(o, "            Initiator: {} alias: none", s(sess, "initiator_name"));
            let _ = writeln!(o, "            ISID: {}", s(sess, "isid"));
            let _ = writeln!(o, "            Connection: 0");
            let _ = writeln!(o, "                IP Address: {}", s(sess, "peer"));
            if let Some(u) = sess.get("chap_user").and_then(|u| u.as_str()) {
                let _ = writeln!(o, "                CHAP account: {u}");
            }
        }
        let _ = writeln!(o, "    LUN information:");
        for l in arr(t, "luns") {
            let _ = writeln!(o, "        LUN: {}", s(&l, "lun"));
            if let Some(obj) = l.as_object() {
                for (k, v) in obj.iter().filter(|(k, _)| k.as_str() != "lun") {
                    let v = v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
                    let _ = writeln!(o, "            {k}: {v}");
                }
            }
        }
        let _ = writeln!(o, "    Account information:");
        for a in arr(t, "accounts") {
            let _ = writeln!(o, "        {}", a.as_str().unwrap_or(""));
        }
        if let Some(a) = t.get("outgoing_account").and_then(|a| a.as_str()) {
            let _ = writeln!(o, "        {a} (outgoing)");
        }
        let _ = writeln!(o, "    ACL information:");
        let names = arr(t, "initiator_names");
        let addrs = arr(t, "initiator_addresses");
        if names.is_empty() && addrs.is_empty() {
            let _ = writeln!(o, "        ALL");
        }
        for a in addrs.iter().chain(names.iter()) {
            let _ = writeln!(o, "        {}", a.as_str().unwrap_or(""));
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_renders_sessions_and_acls() {
        let state = serde_json::json!({
            "portals": ["127.0.0.1:3260"],
            "targets": [{"tid": 1, "name": "iqn.x:t", "luns": [{"lun": 1, "size_bytes": 1048576}],
                         "accounts": ["diskuser"], "outgoing_account": null,
                         "initiator_names": ["iqn.y:i"], "initiator_addresses": ["127.0.0.1/32"]}],
            "sessions": [{"tsih": 3, "target": "iqn.x:t", "initiator_name": "iqn.y:i", "isid": "400001370000",
                          "peer": "127.0.0.1:5000", "chap_user": "diskuser"}]
        });
        let out = render_show(&state);
        assert!(out.contains("Target 1: iqn.x:t"), "{out}");
        assert!(out.contains("I_T nexus: 3"), "{out}");
        assert!(out.contains("CHAP account: diskuser"), "{out}");
        assert!(out.contains("        127.0.0.1/32"), "{out}");
        assert!(out.contains("size_bytes: 1048576"), "{out}");
    }
}
