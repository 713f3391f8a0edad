//! `raftsan-initiator`: discover, log in, attach a multipath volume as an NBD export, show
//! sessions. The commands follow iscsiadm's habits (see `--help` of each).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use raftsan_initiator::connector::{IscsiConnector, describe, normalize_portal, resolve};
use raftsan_initiator::control::{self, AttachStatus, ControlReply, ControlRequest};
use raftsan_initiator::multipath::{Multipath, MultipathConfig, PathStatus};
use raftsan_initiator::nbd::{self, NbdConfig, NbdListen};
use raftsan_initiator::session::{self, Session};
use raftsan_initiator::settings::InitiatorConfig;
use raftsan_initiator::volume::Volume;
use tracing::{error, info};

#[derive(Parser)]
#[command(
    name = "raftsan-initiator",
    version,
    about = "Multipath iSCSI initiator with an NBD export"
)]
struct Cli {
    /// Initiator config file (initiator name, CHAP, timeouts).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// SendTargets discovery: list the targets and portals a portal reports.
    Discover {
        /// Portal to ask, HOST[:PORT] (repeatable; the first that answers is used).
        #[arg(long, required = true)]
        portal: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Log in: re-enables a logged-out path of a running attach, or else checks that a session
    /// can be established (credentials, ACL) and prints its parameters.
    Login {
        #[arg(long)]
        target: Option<String>,
        /// HOST[:PORT]
        #[arg(long)]
        portal: Option<String>,
        /// Every target the portal reports (test login).
        #[arg(long)]
        all: bool,
    },
    /// Log out of a portal (that path of running attaches goes down), a target (its attaches
    /// flush and end) or everything (--all).
    Logout {
        #[arg(long)]
        target: Option<String>,
        #[arg(long)]
        portal: Option<String>,
        #[arg(long)]
        all: bool,
    },
    /// Show running attachments: paths, their ALUA states and (-P 3) negotiated parameters.
    Session {
        /// Detail level like iscsiadm's -P: 0, 1 or 3.
        #[arg(short = 'P', long = "print", default_value_t = 1)]
        print: u8,
        #[arg(long)]
        json: bool,
    },
    /// Attach a volume through every portal and export it over NBD until stopped.
    Attach {
        /// Target IQN, or a volume name (matched against discovered target names ending in ":NAME").
        target: String,
        /// NBD listener: unix:PATH or HOST:PORT (repeatable).
        #[arg(long, required = true)]
        nbd: Vec<NbdListen>,
        /// Portal HOST[:PORT] (repeatable); SendTargets through it adds the others.
        #[arg(long, required = true)]
        portal: Vec<String>,
        #[arg(long, default_value_t = 0)]
        lun: u64,
        /// Use only the given portals (no SendTargets).
        #[arg(long)]
        no_discover: bool,
        /// Export read-only.
        #[arg(long)]
        read_only: bool,
        /// Serve Prometheus metrics on this address (`/metrics`); overrides `[metrics] listen`.
        #[arg(long, value_name = "ADDR:PORT")]
        metrics: Option<std::net::SocketAddr>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("RAFTSAN_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("raftsan-initiator: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("raftsan-initiator: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let cfg = InitiatorConfig::load(cli.config.as_deref())?;
    match cli.cmd {
        Cmd::Discover { portal, json } => discover(&cfg, &portal, json).await,
        Cmd::Login { target, portal, all } => login(&cfg, target, portal, all).await,
        Cmd::Logout { target, portal, all } => logout(&cfg, target, portal, all),
        Cmd::Session { print, json } => show_sessions(&cfg, print, json),
        Cmd::Attach {
            target,
            nbd,
            portal,
            lun,
            no_discover,
            read_only,
            metrics,
        } => {
            if let Some(addr) = metrics.or(cfg.metrics.listen) {
                raftsan_initiator::metrics::install(addr)
                    .with_context(|| format!("starting the metrics listener on {addr}"))?;
                info!(%addr, "metrics listening");
            }
            attach(&cfg, target, nbd, portal, lun, !no_discover, read_only).await
        }
    }
}

async fn discover_any(cfg: &InitiatorConfig, portals: &[String]) -> Result<Vec<session::DiscoveredTarget>> {
    let scfg = cfg.session_config(None);
    let mut errors = Vec::new();
    for p in portals {
        let addr = match resolve(p).await {
            Ok(a) => a,
            Err(e) => {
                errors.push(e.to_string());
                continue;
            }
        };
        match session::discover(addr, &scfg).await {
            Ok(t) => return Ok(t),
            Err(e) => errors.push(format!("{}: {e}", normalize_portal(p))),
        }
    }
    bail!("discovery failed on every portal: {}", errors.join("; "))
}

async fn discover(cfg: &InitiatorConfig, portals: &[String], json: bool) -> Result<ExitCode> {
    let targets = discover_any(cfg, portals).await?;
    if json {
        let v: Vec<_> = targets
            .iter()
            .map(|t| {
                serde_json::json!({
                    "target": t.name,
                    "portals": t.portals.iter().map(|p| serde_json::json!({"address": p.address, "tpgt": p.tpgt})).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for t in &targets {
            for p in &t.portals {
                println!("{},{} {}", normalize_portal(&p.address), p.tpgt, t.name);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Running attachments with their status.
fn attachments(cfg: &InitiatorConfig) -> Vec<(PathBuf, AttachStatus)> {
    control::running(&cfg.run_dir)
        .into_iter()
        .filter_map(|p| match control::request(&p, &ControlRequest::Status) {
            Ok(ControlReply::Status(s)) => Some((p, *s)),
            _ => None,
        })
        .collect()
}

fn target_matches(name: &str, wanted: &str) -> bool {
    name.eq_ignore_ascii_case(wanted) || name.rsplit(':').next().is_some_and(|tail| tail == wanted)
}

async fn login(cfg: &InitiatorConfig, target: Option<String>, portal: Option<String>, all: bool) -> Result<ExitCode> {
    // A running attachment: bring a portal's path back.
    let portal = portal.map(|p| normalize_portal(&p));
    let mut enabled = 0;
    for (sock, st) in attachments(cfg) {
        if target.as_deref().is_some_and(|t| !target_matches(&st.target, t)) {
            continue;
        }
        let Some(p) = &portal else { continue };
        if let ControlReply::Done { message } = control::request(&sock, &ControlRequest::Enable { portal: p.clone() })?
        {
            println!("{message}");
            enabled += 1;
        }
    }
    if enabled > 0 {
        return Ok(ExitCode::SUCCESS);
    }
    // Otherwise a test login.
    let Some(portal) = portal else {
        bail!("login needs --portal HOST[:PORT] (and --target IQN or --all)");
    };
    let targets = discover_any(cfg, std::slice::from_ref(&portal)).await?;
    let chosen: Vec<_> = targets
        .into_iter()
        .filter(|t| all || target.as_deref().is_some_and(|w| target_matches(&t.name, w)))
        .collect();
    if chosen.is_empty() {
        bail!("no matching target at {portal} (give --target IQN or --all)");
    }
    let mut failed = false;
    for t in chosen {
        let addr = resolve(&portal).await?;
        let scfg = cfg.session_config(Some(&t.name));
        match Session::login(addr, scfg).await {
            Ok(s) => {
                println!("Login to [target: {}, portal: {portal}] successful.", t.name);
                for (k, v) in describe(s.negotiated()) {
                    println!("\t{k}: {v}");
                }
                let _ = tokio::time::timeout(Duration::from_secs(3), s.logout()).await;
            }
            Err(e) => {
                failed = true;
                println!("Login to [target: {}, portal: {portal}] failed: {e}", t.name);
            }
        }
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

fn logout(cfg: &InitiatorConfig, target: Option<String>, portal: Option<String>, all: bool) -> Result<ExitCode> {
    if target.is_none() && portal.is_none() && !all {
        bail!("logout needs --portal, --target or --all");
    }
    let portal = portal.map(|p| normalize_portal(&p));
    let mut done = 0;
    for (sock, st) in attachments(cfg) {
        if target.as_deref().is_some_and(|t| !target_matches(&st.target, t)) {
            continue;
        }
        let req = match &portal {
            Some(p) => ControlRequest::Disable { portal: p.clone() },
            None => ControlRequest::Stop,
        };
        match control::request(&sock, &req)? {
            ControlReply::Done { message } => {
                println!("{message}");
                done += 1;
            }
            ControlReply::Error { message } => println!("{}: {message}", st.target),
            ControlReply::Status(_) => {}
        }
    }
    if done == 0 {
        bail!("no matching session");
    }
    Ok(ExitCode::SUCCESS)
}

fn show_sessions(cfg: &InitiatorConfig, print: u8, json: bool) -> Result<ExitCode> {
    let list = attachments(cfg);
    if json {
        let v: Vec<_> = list.iter().map(|(_, s)| s).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    if list.is_empty() {
        println!("No active sessions.");
        return Ok(ExitCode::SUCCESS);
    }
    for (_, s) in &list {
        let d = &s.device;
        println!("Target: {} (LUN {})", s.target, s.lun);
        if print >= 1 {
            println!(
                "\tAttach pid {}, NBD {}, {} bytes ({}-byte blocks), up {:.0} s",
                s.pid, s.nbd, s.size_bytes, s.block_size, s.uptime_secs
            );
            println!(
                "\tIdentity: {} ({} {})",
                d.identity.as_deref().unwrap_or("?"),
                d.vendor.as_deref().unwrap_or("?"),
                d.product.as_deref().unwrap_or("?")
            );
            println!(
                "\tUsable paths: {}, failovers: {}, retried commands: {}, queued now: {}",
                d.usable_paths, d.failovers, d.retried_commands, d.queued_commands
            );
        }
        for p in &d.paths {
            let tpgt = p.tpgt.map(|t| t.to_string()).unwrap_or_else(|| "?".into());
            println!("\tCurrent Portal: {},{tpgt}", p.portal);
            if print == 0 {
                continue;
            }
            println!("\t\tPath State: {} for {:.0} s", p.status, p.for_secs);
            println!(
                "\t\tALUA: {} (port group {}, relative port {})",
                p.alua,
                p.port_group.map(|g| g.to_string()).unwrap_or_else(|| "?".into()),
                p.relative_port.map(|g| g.to_string()).unwrap_or_else(|| "?".into())
            );
            println!(
                "\t\tCommands: {} sent, {} in flight, {} path failures",
                p.commands, p.in_flight, p.failures
            );
            if let Some(e) = &p.last_error {
                println!("\t\tLast error: {e}");
            }
            if print >= 3 && p.status == PathStatus::Up {
                println!("\t\tNegotiated iSCSI params:");
                for (k, v) in &p.details {
                    println!("\t\t\t{k}: {v}");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn attach(
    cfg: &InitiatorConfig,
    target: String,
    listens: Vec<NbdListen>,
    portals: Vec<String>,
    lun: u64,
    discover: bool,
    read_only: bool,
) -> Result<ExitCode> {
    let portals: Vec<String> = portals.iter().map(|p| normalize_portal(p)).collect();
    // A volume name: find its IQN through discovery.
    let target = if target.contains(':') || target.starts_with("iqn.") || target.starts_with("eui.") {
        target
    } else {
        let found = discover_any(cfg, &portals).await?;
        let m: Vec<_> = found.iter().filter(|t| target_matches(&t.name, &target)).collect();
        match m.as_slice() {
            [one] => one.name.clone(),
            [] => bail!("no target named {target:?} at {}", portals.join(", ")),
            _ => bail!("{target:?} matches several targets; give the full IQN"),
        }
    };
    let mp_cfg = MultipathConfig {
        target: target.clone(),
        lun,
        portals,
        discover,
        no_path_retry: cfg.timeouts.no_path_retry.0,
        ..MultipathConfig::default()
    };
    let connector = IscsiConnector {
        cfg: cfg.session_config(Some(&target)),
    };
    let mp = Multipath::start(connector, mp_cfg);
    let sampler = {
        let mp = mp.clone();
        tokio::spawn(async move {
            loop {
                raftsan_initiator::metrics::sample_paths(&mp.view());
                tokio::time::sleep(raftsan_initiator::metrics::SAMPLE_EVERY).await;
            }
        })
    };
    let volume = Volume::open(mp.clone(), cfg.timeouts.login.0.max(cfg.timeouts.no_path_retry.0))
        .await
        .with_context(|| format!("attaching {target}"))?;
    let volume = Arc::new(volume);
    let nbd_text = listens.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(", ");
    info!(%target, size = volume.size(), nbd = %nbd_text, "attached");
    println!("Attached {target} LUN {lun}: {} bytes, NBD {nbd_text}", volume.size());

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let sock = control::socket_path(&cfg.run_dir);
    let handler = {
        let mp = mp.clone();
        let volume = volume.clone();
        let target = target.clone();
        let nbd_text = nbd_text.clone();
        let stop_tx = stop_tx.clone();
        Arc::new(move |req: ControlRequest| match req {
            ControlRequest::Status => ControlReply::Status(Box::new(AttachStatus {
                pid: std::process::id(),
                target: target.clone(),
                lun,
                nbd: nbd_text.clone(),
                size_bytes: volume.size(),
                block_size: volume.block_size(),
                uptime_secs: started.elapsed().as_secs_f64(),
                device: mp.view(),
            })),
            ControlRequest::Disable { portal } => {
                if mp.disable(&portal) {
                    ControlReply::Done {
                        message: format!("Logout of [target: {target}, portal: {portal}] successful."),
                    }
                } else {
                    ControlReply::Error {
                        message: format!("no path through {portal}"),
                    }
                }
            }
            ControlRequest::Enable { portal } => {
                if !mp.enable(&portal) {
                    mp.add_portal(&portal, None);
                }
                ControlReply::Done {
                    message: format!("Login to [target: {target}, portal: {portal}] requested."),
                }
            }
            ControlRequest::Stop => {
                stop_tx.send_replace(true);
                ControlReply::Done {
                    message: format!("Logout of [target: {target}] (all paths) successful."),
                }
            }
        }) as Arc<dyn Fn(ControlRequest) -> ControlReply + Send + Sync>
    };
    let control_task = tokio::spawn(control::serve(sock.clone(), handler));

    let nbd_cfg = NbdConfig {
        export_name: target.clone(),
        description: format!("raftsan {target} LUN {lun}"),
        read_only,
        multi_conn: true,
        ..NbdConfig::default()
    };
    let shutdown = {
        let mut stop_rx = stop_rx.clone();
        async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
                _ = stop_rx.wait_for(|s| *s) => {}
            }
        }
    };
    let shutdown = futures_shared(shutdown);
    let mut servers = Vec::new();
    for l in listens {
        let dev = volume.clone();
        let cfg = nbd_cfg.clone();
        let sd = shutdown.clone();
        servers.push(tokio::spawn(async move {
            nbd::serve(l, dev, cfg, async move { sd.wait().await }).await
        }));
    }
    let mut result = Ok(());
    for s in servers {
        match s.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                error!(error = %e, "NBD server failed");
                stop_tx.send_replace(true);
                result = Err(e);
            }
            Err(e) => result = Err(anyhow::anyhow!("NBD server task: {e}")),
        }
    }
    info!(%target, "detaching: flushing and logging out");
    if let Err(e) = volume.flush().await {
        error!(error = %e, "final flush failed");
    }
    mp.shutdown().await;
    sampler.abort();
    control_task.abort();
    let _ = std::fs::remove_file(&sock);
    result.map(|()| ExitCode::SUCCESS)
}

/// A one-shot signal many waiters can await.
#[derive(Clone)]
struct Shared(tokio::sync::watch::Receiver<bool>);

impl Shared {
    async fn wait(mut self) {
        let _ = self.0.wait_for(|s| *s).await;
    }
}

fn futures_shared(f: impl std::future::Future<Output = ()> + Send + 'static) -> Shared {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        f.await;
        tx.send_replace(true);
    });
    Shared(rx)
}
