//! `raftsan demo`: a three-node cluster on loopback, a replicated volume, and a client check.
//!
//! Spawns three real `raftsan serve` processes (this binary) on 127.0.0.11-13 with portals on
//! port 3260, cluster RPC on 7000 and metrics on 9520, each with its own data directory and a
//! certificate from a cluster CA created for the demo. Node 1 creates the cluster
//! (`cluster init`), nodes 2 and 3 are added (`cluster add-node`), and a 256 MiB volume is
//! created. The check writes 16 MiB of pseudo-random data with `qemu-img` through node 1's
//! portal and reads it back through nodes 2 and 3 (which forward to the leader), comparing
//! bytes. Then a client attaches: `raftsan-initiator` (from the same build directory) logs into
//! all three portals and exports the volume over NBD on a Unix socket; 16 MiB written through the
//! NBD export with qemu-img are read back through node 3's portal. Then the demo keeps running
//! and reports leadership changes and the client's paths, so `kill -9` of the leader's node shows
//! the others carrying on and the client failing over. Unless `--no-client-writes` is given, it
//! also writes 4 KiB every 20 ms through the NBD export (a minimal NBD client below) and prints
//! every write that took longer than 100 ms: the stall an application sees during a failover.
//! `--no-client` starts no client at all (the benchmarks bring their own).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use raftsan_cluster::node::{AdminClient, BOOTSTRAP_MARKER};
use raftsan_cluster::pb::cluster::{AddNodeRequest, CreateVolume, NodeInfo, StatusRequest, StatusResponse, VolumeInfo};
use raftsan_cluster::rpc::{self, TlsFiles};

const VOLUME: &str = "demo";
const CHECK_BYTES: usize = 16 << 20;
const ISCSI_PORT: u16 = 3260;
const RPC_PORT: u16 = 7000;
const METRICS_PORT: u16 = 9520;
/// The demo client's background writer: one 4 KiB write per period...
const WRITE_EVERY: Duration = Duration::from_millis(20);
/// ...and writes slower than this are reported as a stall.
const STALL_REPORT: Duration = Duration::from_millis(100);
/// Where it writes: 1 MiB after the region the NBD check used.
const WRITER_BASE: u64 = 2 * CHECK_BYTES as u64;
const WRITER_SPAN: u64 = 1 << 20;

struct DemoNode {
    id: u64,
    ip: IpAddr,
    config: PathBuf,
    log: PathBuf,
    child: Option<tokio::process::Child>,
}

impl DemoNode {
    fn portal(&self) -> SocketAddr {
        SocketAddr::new(self.ip, ISCSI_PORT)
    }
    fn rpc(&self) -> SocketAddr {
        SocketAddr::new(self.ip, RPC_PORT)
    }
    fn metrics(&self) -> SocketAddr {
        SocketAddr::new(self.ip, METRICS_PORT)
    }
    fn pid(&self) -> u32 {
        self.child.as_ref().and_then(|c| c.id()).unwrap_or(0)
    }
}

/// What the demo does besides starting the cluster.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Stop after the client check instead of serving until Ctrl-C.
    pub check_only: bool,
    /// Start the client (`raftsan-initiator attach` over NBD) and check it.
    pub client: bool,
    /// While serving, write through the client's NBD export in the background and report stalls.
    pub client_writes: bool,
    /// The `[raft] fsync` policy of the nodes ("always" or "on-flush").
    pub fsync: &'static str,
}

pub async fn run(first_ip: Ipv4Addr, dir: Option<PathBuf>, volume_bytes: u64, opts: Options) -> Result<()> {
    let (_tmp, dir) = match dir {
        Some(d) => {
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            (None, d)
        }
        None => {
            let t = tempfile::tempdir().context("creating a temporary directory")?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    let pki = dir.join("pki");
    if !pki.join("ca.crt").exists() {
        std::fs::create_dir_all(&pki)?;
        rpc::create_ca(&pki).context("creating the demo's cluster CA")?;
        rpc::issue_admin_cert(&pki, &pki)?;
    }
    let base = u32::from(first_ip);
    let mut nodes = Vec::new();
    for id in 1..=3u64 {
        let ip = IpAddr::V4(Ipv4Addr::from(base + (id as u32 - 1)));
        let ndir = dir.join(format!("node{id}"));
        std::fs::create_dir_all(&ndir)?;
        if !pki.join(format!("node-{id}.crt")).exists() {
            rpc::issue_node_cert(&pki, id, &[ip], &pki)?;
        }
        let config = ndir.join("node.toml");
        std::fs::write(&config, node_toml(id, ip, &ndir, &pki, opts.fsync))?;
        nodes.push(DemoNode {
            id,
            ip,
            config,
            log: ndir.join("raftsan.log"),
            child: None,
        });
    }
    let fresh = !dir.join("node1/data/meta").exists();
    if fresh {
        std::fs::create_dir_all(dir.join("node1/data"))?;
        std::fs::write(dir.join("node1/data").join(BOOTSTRAP_MARKER), "1\n")?;
    }
    let exe = std::env::current_exe().context("locating the raftsan binary")?;
    for n in &mut nodes {
        n.child = Some(spawn_node(&exe, &n.config, &n.log)?);
    }
    let result = drive(&mut nodes, &dir, &pki, fresh, volume_bytes, opts).await;
    if let Err(e) = &result {
        println!("demo failed: {e:#}");
        for n in &nodes {
            println!("  node {} log: {}", n.id, n.log.display());
        }
    }
    stop_all(&mut nodes).await;
    if let (Err(_), Some(t)) = (&result, _tmp) {
        // Keep the logs of a failed demo.
        let kept = t.keep();
        println!("kept {} for inspection", kept.display());
    }
    result
}

/// Async worker threads of each demo node: the three nodes share this host's CPUs, so each gets
/// a third of them (at least one). A runtime per node with a thread per CPU would put three times
/// as many busy threads as CPUs on the host, and the context switches between them cost more
/// than the parallelism gains (on 2 CPUs: about 20 % less CPU per replicated write with one
/// thread per node; bench/README.md).
fn demo_worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get() / 3).max(1)
}

fn node_toml(id: u64, ip: IpAddr, dir: &Path, pki: &Path, fsync: &str) -> String {
    let workers = demo_worker_threads();
    format!(
        "# raftsan demo node {id}\n\
         [node]\n\
         id = {id}\n\
         data_dir = \"{data}\"\n\
         portals = [\"{ip}:{ISCSI_PORT}\"]\n\
         rpc_listen = \"{ip}:{RPC_PORT}\"\n\
         metrics = \"{ip}:{METRICS_PORT}\"\n\
         admin_socket = \"{sock}\"\n\
         worker_threads = {workers}\n\
         \n[tls]\n\
         ca = \"{pki}/ca.crt\"\n\
         cert = \"{pki}/node-{id}.crt\"\n\
         key = \"{pki}/node-{id}.key\"\n\
         \n[raft]\n\
         fsync = \"{fsync}\"\n\
         heartbeat_ms = 50\n\
         election_timeout_ms = [150, 300]\n",
        data = dir.join("data").display(),
        sock = dir.join("admin.sock").display(),
        pki = pki.display(),
    )
}

fn spawn_node(exe: &Path, config: &Path, log: &Path) -> Result<tokio::process::Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("serve")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true);
    // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag of the child process; it is
    // async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    cmd.spawn().context("starting raftsan serve")
}

async fn stop_all(nodes: &mut [DemoNode]) {
    for n in nodes.iter() {
        let pid = n.pid();
        if pid != 0 {
            // SAFETY: sending SIGTERM to our own child process.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
    }
    for n in nodes.iter_mut() {
        if let Some(c) = n.child.as_mut()
            && tokio::time::timeout(Duration::from_secs(10), c.wait()).await.is_err()
        {
            let _ = c.kill().await;
        }
    }
}

fn admin(node: &DemoNode, pki: &Path) -> Result<AdminClient> {
    AdminClient::connect(
        &node.rpc().to_string(),
        TlsFiles {
            ca_cert: pki.join("ca.crt"),
            cert: pki.join("admin.crt"),
            key: pki.join("admin.key"),
        },
    )
}

async fn status(c: &mut AdminClient) -> Option<StatusResponse> {
    let mut req = tonic::Request::new(StatusRequest {});
    req.set_timeout(Duration::from_secs(3));
    c.inner().status(req).await.ok().map(|r| r.into_inner())
}

fn leader_of(s: &StatusResponse, group: u64) -> Option<u64> {
    s.nodes
        .iter()
        .flat_map(|n| n.groups.iter())
        .filter(|g| g.group == group && g.leader != 0)
        .max_by_key(|g| g.term)
        .map(|g| g.leader)
}

async fn wait_until(
    c: &mut AdminClient,
    what: &str,
    within: Duration,
    ok: impl Fn(&StatusResponse) -> bool,
) -> Result<StatusResponse> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = status(c).await
            && ok(&s)
        {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn drive(
    nodes: &mut [DemoNode],
    dir: &Path,
    pki: &Path,
    fresh: bool,
    volume_bytes: u64,
    opts: Options,
) -> Result<()> {
    let t0 = Instant::now();
    let mut c = admin(&nodes[0], pki)?;
    wait_until(&mut c, "node 1 to create the cluster", Duration::from_secs(30), |s| {
        leader_of(s, 0).is_some()
    })
    .await?;
    if fresh {
        for n in &nodes[1..] {
            let info = NodeInfo {
                id: n.id,
                rpc_addr: n.rpc().to_string(),
                portals: vec![n.portal().to_string()],
                metrics_addr: n.metrics().to_string(),
            };
            c.inner()
                .add_node(AddNodeRequest { node: Some(info) })
                .await
                .map_err(|s| anyhow!("adding node {}: {}", n.id, s.message()))?;
        }
    }
    wait_until(
        &mut c,
        "three voters in the metadata group",
        Duration::from_secs(60),
        |s| {
            s.nodes
                .iter()
                .flat_map(|n| n.groups.iter())
                .any(|g| g.group == 0 && g.leader != 0 && g.voters.len() == 3)
        },
    )
    .await?;
    let cat = c.catalogue().await?;
    let volume: VolumeInfo = match cat.volumes.iter().find(|v| v.name == VOLUME) {
        Some(v) => v.clone(),
        None => c
            .inner()
            .create_volume(CreateVolume {
                name: VOLUME.into(),
                size_bytes: volume_bytes,
                block_size: 512,
                target: String::new(),
                replicas: Vec::new(),
                initializer: 0,
            })
            .await
            .map_err(|s| anyhow!("creating the volume: {}", s.message()))?
            .into_inner(),
    };
    let s = wait_until(
        &mut c,
        "the volume's group to elect a leader with 3 voters",
        Duration::from_secs(60),
        |s| {
            s.nodes
                .iter()
                .flat_map(|n| n.groups.iter())
                .any(|g| g.group == volume.id && g.leader != 0 && g.voters.len() == 3)
        },
    )
    .await?;
    println!(
        "raftsan demo: three nodes, one replicated volume (ready in {:.1} s)",
        t0.elapsed().as_secs_f64()
    );
    println!("  data directory : {}", dir.display());
    println!(
        "  {:<6} {:<8} {:<18} {:<18} {:<32} log",
        "node", "pid", "portal", "rpc", "metrics"
    );
    for n in nodes.iter() {
        println!(
            "  {:<6} {:<8} {:<18} {:<18} {:<32} {}",
            n.id,
            n.pid(),
            n.portal().to_string(),
            n.rpc().to_string(),
            format!("http://{}/metrics", n.metrics()),
            n.log.display()
        );
    }
    let leader = leader_of(&s, volume.id).unwrap_or(0);
    println!(
        "  volume         : {} ({} MiB), target {} LUN {}, leader node {leader}",
        volume.name,
        volume.size_bytes >> 20,
        volume.target,
        volume.lun
    );
    println!(
        "  admin          : raftsan status --config {}",
        nodes[0].config.display()
    );
    println!(
        "  try            : iscsi-ls -s iscsi://{}   |   qemu-img info iscsi://{}/{}/{}",
        nodes[1].portal(),
        nodes[1].portal(),
        volume.target,
        volume.lun
    );
    let mut checked = check(nodes, &volume, dir).await;
    match &checked {
        Ok(()) => println!("client check: OK"),
        Err(e) => println!("client check: FAILED: {e:#}"),
    }
    let mut client = None;
    if checked.is_ok() && opts.client {
        match Client::start(nodes, &volume, dir).await {
            Ok(Some(c)) => {
                let nbd = c.check(nodes, &volume, dir).await;
                match &nbd {
                    Ok(()) => println!("NBD check: OK"),
                    Err(e) => println!("NBD check: FAILED: {e:#}"),
                }
                checked = nbd;
                client = Some(c);
            }
            Ok(None) => {}
            Err(e) => {
                println!("client: FAILED: {e:#}");
                checked = Err(e);
            }
        }
    }
    if opts.check_only || checked.is_err() {
        if let Some(c) = client.as_mut() {
            c.stop().await;
        }
        return checked;
    }
    println!(
        "running until Ctrl-C. Try `kill -9 {}` (the volume leader's node) and watch the others carry on{}.",
        nodes.iter().find(|n| n.id == leader).map(|n| n.pid()).unwrap_or(0),
        if client.is_some() {
            " and the client fail over"
        } else {
            ""
        }
    );
    let writer = match client.as_ref() {
        Some(c) if opts.client_writes => {
            println!(
                "client writes  : 4 KiB every {} ms through the NBD export; every write slower than {} ms is reported",
                WRITE_EVERY.as_millis(),
                STALL_REPORT.as_millis()
            );
            Some(tokio::spawn(client_writer(c.socket.clone(), Instant::now())))
        }
        _ => None,
    };
    watch(nodes, pki, volume.id, client.as_ref()).await;
    if let Some(w) = writer {
        w.abort();
    }
    if let Some(c) = client.as_mut() {
        c.stop().await;
    }
    checked
}

/// `raftsan-initiator attach` of the demo volume, exported over NBD.
struct Client {
    exe: PathBuf,
    config: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    child: tokio::process::Child,
}

impl Client {
    /// Starts the client when `raftsan-initiator` was built next to this binary.
    async fn start(nodes: &[DemoNode], volume: &VolumeInfo, dir: &Path) -> Result<Option<Client>> {
        let exe = std::env::current_exe()?.with_file_name("raftsan-initiator");
        if !exe.is_file() {
            println!(
                "client: {} not built; `cargo build --release --bins` builds it (the demo then attaches it)",
                exe.display()
            );
            return Ok(None);
        }
        let cdir = dir.join("client");
        std::fs::create_dir_all(&cdir)?;
        let config = cdir.join("initiator.toml");
        std::fs::write(
            &config,
            format!(
                "# raftsan demo client\ninitiator_name = \"iqn.2026-11.org.raftsan:demo-client\"\n\
                 run_dir = \"{}\"\n\n[timeouts]\nnoop_interval = \"500ms\"\nnoop_timeout = \"1s\"\n\
                 command = \"5s\"\nno_path_retry = \"30s\"\n",
                cdir.join("run").display()
            ),
        )?;
        let socket = cdir.join("nbd.sock");
        let _ = std::fs::remove_file(&socket);
        let log = cdir.join("initiator.log");
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.arg("--config")
            .arg(&config)
            .arg("attach")
            .arg(&volume.target)
            .arg("--lun")
            .arg(volume.lun.to_string())
            .arg("--portal")
            .arg(nodes[0].portal().to_string())
            .arg("--nbd")
            .arg(format!("unix:{}", socket.display()))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true);
        // SAFETY: as in spawn_node.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = cmd.spawn().context("starting raftsan-initiator attach")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            if let Some(st) = child.try_wait()? {
                bail!("raftsan-initiator exited ({st}); see {}", log.display());
            }
            if Instant::now() > deadline {
                bail!("the NBD export did not come up in 30 s; see {}", log.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let c = Client {
            exe,
            config,
            socket,
            log,
            child,
        };
        println!(
            "  client         : raftsan-initiator pid {}, log {}",
            c.child.id().unwrap_or(0),
            c.log.display()
        );
        println!("  NBD export     : {}", c.uri());
        println!(
            "  try            : nbdinfo '{}'   |   {} --config {} session -P 1",
            c.uri(),
            c.exe.display(),
            c.config.display()
        );
        Ok(Some(c))
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// 16 MiB through the NBD export (multipath), read back directly through node 3's portal.
    async fn check(&self, nodes: &[DemoNode], volume: &VolumeInfo, dir: &Path) -> Result<()> {
        let src = dir.join("check-nbd.raw");
        let data = pseudo_random(CHECK_BYTES, 0xb10c);
        std::fs::write(&src, &data)?;
        let t = Instant::now();
        qemu_img(&["convert", "-n", "-f", "raw", "-O", "raw", path(&src), &self.uri()]).await?;
        println!(
            "$ qemu-img convert: wrote {} MiB through the NBD export in {:.0} ms",
            CHECK_BYTES >> 20,
            t.elapsed().as_secs_f64() * 1e3
        );
        let _ = std::fs::remove_file(&src);
        let n = &nodes[2];
        let back = dir.join("check-nbd-out.raw");
        let url = format!("iscsi://{}/{}/{}", n.portal(), volume.target, volume.lun);
        qemu_img(&["convert", "-f", "raw", "-O", "raw", &url, path(&back)]).await?;
        let got = std::fs::read(&back)?;
        let _ = std::fs::remove_file(&back);
        if got.len() < data.len() || got[..data.len()] != data[..] {
            bail!(
                "node {} returned different data than the client wrote through NBD",
                n.id
            );
        }
        println!("$ qemu-img convert: read it back through node {}: identical", n.id);
        Ok(())
    }

    /// One line per path: "127.0.0.11:3260 up active/optimized".
    async fn paths(&self) -> Option<(Vec<String>, u64)> {
        let o = tokio::process::Command::new(&self.exe)
            .arg("--config")
            .arg(&self.config)
            .args(["session", "--json"])
            .output()
            .await
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        let d = &v.as_array()?.first()?["device"];
        let paths = d["paths"]
            .as_array()?
            .iter()
            .map(|p| {
                format!(
                    "{} {} {}",
                    p["portal"].as_str().unwrap_or("?"),
                    p["status"].as_str().unwrap_or("?"),
                    p["alua"].as_str().unwrap_or("?")
                )
            })
            .collect();
        Some((paths, d["failovers"].as_u64().unwrap_or(0)))
    }

    async fn stop(&mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: sending SIGTERM to our own child process.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// Prints leadership, reachability and client path changes until Ctrl-C.
async fn watch(nodes: &[DemoNode], pki: &Path, volume: u64, client: Option<&Client>) {
    let mut last: Option<(Option<u64>, Vec<bool>)> = None;
    let mut last_paths: Option<(Vec<String>, u64)> = None;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let start = Instant::now();
    // One admin connection per node, kept while it answers (a TLS handshake per poll would cost
    // the nodes more CPU than the polls themselves).
    let mut admins: Vec<Option<AdminClient>> = nodes.iter().map(|_| None).collect();
    loop {
        tokio::select! {
            _ = &mut ctrl_c => { println!("stopping the nodes"); return; }
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        if let Some(c) = client
            && let Some(now) = c.paths().await
            && last_paths.as_ref() != Some(&now)
        {
            println!(
                "[{:>7.2} s] client paths: {} (failovers so far: {})",
                start.elapsed().as_secs_f64(),
                now.0.join(", "),
                now.1
            );
            last_paths = Some(now);
        }
        // Ask any node that answers.
        let mut seen = None;
        for (n, cached) in nodes.iter().zip(admins.iter_mut()) {
            if cached.is_none() {
                *cached = admin(n, pki).ok();
            }
            let Some(c) = cached.as_mut() else { continue };
            match status(c).await {
                Some(s) => {
                    seen = Some(s);
                    break;
                }
                None => *cached = None,
            }
        }
        let Some(s) = seen else { continue };
        let up: Vec<bool> = nodes
            .iter()
            .map(|n| s.nodes.iter().any(|x| x.id == n.id && x.reachable))
            .collect();
        let now = (leader_of(&s, volume), up);
        if last.as_ref() != Some(&now) {
            let ups: Vec<String> = nodes
                .iter()
                .zip(&now.1)
                .map(|(n, u)| format!("node {} {}", n.id, if *u { "up" } else { "DOWN" }))
                .collect();
            println!(
                "[{:>7.2} s] volume leader: {}; {}",
                start.elapsed().as_secs_f64(),
                now.0
                    .map(|l| format!("node {l}"))
                    .unwrap_or_else(|| "none (election)".into()),
                ups.join(", ")
            );
            last = Some(now);
        }
    }
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("      {l}\n")).collect()
}

/// `iscsi-ls` discovery on node 2, then 16 MiB written with qemu-img through node 1's portal and
/// read back through nodes 2 and 3.
async fn check(nodes: &[DemoNode], volume: &VolumeInfo, dir: &Path) -> Result<()> {
    let ls = tokio::process::Command::new("iscsi-ls")
        .arg("-s")
        .arg(format!("iscsi://{}", nodes[1].portal()))
        .output()
        .await;
    match ls {
        Err(_) => bail!("iscsi-ls not found: install libiscsi-bin (scripts/install-deps.sh does)"),
        Ok(o) if !o.status.success() => bail!("iscsi-ls failed: {}", String::from_utf8_lossy(&o.stderr)),
        Ok(o) => print!(
            "$ iscsi-ls -s iscsi://{}\n{}",
            nodes[1].portal(),
            indent(&String::from_utf8_lossy(&o.stdout))
        ),
    }
    let url = |n: &DemoNode| format!("iscsi://{}/{}/{}", n.portal(), volume.target, volume.lun);
    let src = dir.join("check-in.raw");
    let data = pseudo_random(CHECK_BYTES, 0x5eed);
    std::fs::write(&src, &data)?;
    let t = Instant::now();
    qemu_img(&["convert", "-n", "-f", "raw", "-O", "raw", path(&src), &url(&nodes[0])]).await?;
    println!(
        "$ qemu-img convert: wrote {} MiB through node 1 in {:.0} ms",
        CHECK_BYTES >> 20,
        t.elapsed().as_secs_f64() * 1e3
    );
    let _ = std::fs::remove_file(&src);
    for n in &nodes[1..] {
        let back = dir.join(format!("check-out-{}.raw", n.id));
        let t = Instant::now();
        qemu_img(&["convert", "-f", "raw", "-O", "raw", &url(n), path(&back)]).await?;
        let got = std::fs::read(&back)?;
        let _ = std::fs::remove_file(&back);
        if got.len() < data.len() || got[..data.len()] != data[..] {
            bail!("node {} returned different data than node 1 wrote", n.id);
        }
        println!(
            "$ qemu-img convert: read it back through node {} in {:.0} ms: identical",
            n.id,
            t.elapsed().as_secs_f64() * 1e3
        );
    }
    Ok(())
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

async fn qemu_img(args: &[&str]) -> Result<()> {
    let o = tokio::process::Command::new("qemu-img")
        .args(args)
        .output()
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "qemu-img not found: install qemu-utils and qemu-block-extra (scripts/install-deps.sh does)"
            )
        })?;
    if !o.status.success() {
        bail!(
            "qemu-img {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(())
}

/// xorshift64* bytes: reproducible, incompressible enough to catch misplaced blocks.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Connects to the NBD export on `socket` (fixed newstyle, NBD_OPT_GO of the default export).
async fn nbd_connect(socket: &Path) -> Result<tokio::net::UnixStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
    const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
    const OPT_GO: u32 = 7;
    const REP_ACK: u32 = 1;
    let mut s = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("connecting to {}", socket.display()))?;
    anyhow::ensure!(s.read_u64().await? == NBDMAGIC, "not an NBD server");
    anyhow::ensure!(s.read_u64().await? == IHAVEOPT, "not a newstyle NBD server");
    let _flags = s.read_u16().await?;
    s.write_u32(3).await?; // FIXED_NEWSTYLE | NO_ZEROES
    let mut opt = Vec::with_capacity(22);
    opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&OPT_GO.to_be_bytes());
    opt.extend_from_slice(&6u32.to_be_bytes());
    opt.extend_from_slice(&0u32.to_be_bytes()); // export name ""
    opt.extend_from_slice(&0u16.to_be_bytes()); // no information requests
    s.write_all(&opt).await?;
    loop {
        anyhow::ensure!(s.read_u64().await? == REPLY_MAGIC, "bad NBD option reply");
        let _opt = s.read_u32().await?;
        let kind = s.read_u32().await?;
        let len = s.read_u32().await? as usize;
        anyhow::ensure!(len <= 65536, "NBD option reply of {len} bytes");
        let mut data = vec![0u8; len];
        s.read_exact(&mut data).await?;
        if kind == REP_ACK {
            return Ok(s);
        }
        anyhow::ensure!(kind & 0x8000_0000 == 0, "NBD_OPT_GO refused ({kind:#x})");
    }
}

/// One NBD write of `data` at `offset`, waiting for its reply; the server's errno on failure.
async fn nbd_write(s: &mut tokio::net::UnixStream, handle: u64, offset: u64, data: &[u8]) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut req = Vec::with_capacity(28 + data.len());
    req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes()); // flags
    req.extend_from_slice(&1u16.to_be_bytes()); // NBD_CMD_WRITE
    req.extend_from_slice(&handle.to_be_bytes());
    req.extend_from_slice(&offset.to_be_bytes());
    req.extend_from_slice(&(data.len() as u32).to_be_bytes());
    req.extend_from_slice(data);
    s.write_all(&req).await?;
    anyhow::ensure!(s.read_u32().await? == 0x6744_6698, "bad NBD reply");
    let error = s.read_u32().await?;
    anyhow::ensure!(s.read_u64().await? == handle, "NBD reply for another request");
    anyhow::ensure!(error == 0, "the NBD export answered errno {error}");
    Ok(())
}

/// The demo client's application: writes 4 KiB every [`WRITE_EVERY`] through the NBD export and
/// prints each write that took longer than [`STALL_REPORT`] (a failover as an application sees
/// it) and each failed one. Runs until aborted.
async fn client_writer(socket: PathBuf, start: Instant) {
    let block = pseudo_random(4096, 0xd3e0);
    let mut conn = None;
    let mut handle = 0u64;
    let mut ticker = tokio::time::interval(WRITE_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if conn.is_none() {
            match nbd_connect(&socket).await {
                Ok(s) => conn = Some(s),
                Err(e) => {
                    println!("[{:>7.2} s] client writer: {e:#}", start.elapsed().as_secs_f64());
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        let Some(s) = conn.as_mut() else { continue };
        handle += 1;
        let offset = WRITER_BASE + (handle * 4096) % WRITER_SPAN;
        let issued = Instant::now();
        let r = nbd_write(s, handle, offset, &block).await;
        let took = issued.elapsed();
        let at = start.elapsed().as_secs_f64();
        match r {
            Ok(()) if took >= STALL_REPORT => println!(
                "[{at:>7.2} s] client write stalled {} ms (issued at {:.2} s), then completed",
                took.as_millis(),
                at - took.as_secs_f64()
            ),
            Ok(()) => {}
            Err(e) => {
                println!("[{at:>7.2} s] client write FAILED after {} ms: {e:#}", took.as_millis());
                conn = None;
            }
        }
    }
}
