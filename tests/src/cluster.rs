//! A real raftsan cluster on loopback for the tests: N `raftsan serve` processes, each on its
//! own reserved loopback address (portal :3260, cluster RPC :7000, metrics :9520), set up with
//! the real CLI exactly as an administrator would: `raftsan cluster init` on node 1,
//! `raftsan cluster issue-cert` for the others, `raftsan cluster add-node`, `raftsan volume
//! create`. Dropping the cluster kills every node and fails the test on a panic (or an
//! unannounced ERROR line) in any node's log.

use std::fs::{self, File};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::{CLIENT_TIMEOUT, Kind, Loopback, Output, START_TIMEOUT, Scratch, check_log, raftsan_bin, run};

pub const RPC_PORT: u16 = 7000;

/// The ERROR lines a node whose storage failed logs (DESIGN.md invariant 7): raftsan's own, naming
/// the failure and that the node or group is out of service, and openraft's echoes of the same
/// failure (the state machine worker, the core's exit, the log's durability callback, and any
/// later use of the failed store, e.g. a replication stream reading the log: "... failed earlier").
/// Tests and the chaos harness expect exactly these on a node whose storage they broke.
pub const STORAGE_FAILURE_ERRORS: &[&str] = &[
    "failed, node out of service",
    "failed, group out of service",
    "when Write Apply(",
    "when Write Log(",
    "IOFlushed error",
    "failed to send HeartbeatProgress",
    "failed earlier: ",
    // openraft, when a call into the group (a client write, a vote) finds its core gone, which
    // it is once the storage failure stopped it (chaos seed 1001, `disk-full-leader`).
    "failed to receive from RaftCore",
];
pub const METRICS_PORT: u16 = 9520;

/// One node of a test cluster.
#[derive(Debug)]
pub struct ClusterNode {
    pub id: u64,
    pub ip: Ipv4Addr,
    pub config: PathBuf,
    pub dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    _lo: Loopback,
    /// Fragments of ERROR lines this node is expected to log (faults the test injects).
    pub expected_errors: Vec<String>,
}

impl ClusterNode {
    pub fn portal(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.ip, crate::ISCSI_PORT)
    }
    pub fn rpc(&self) -> String {
        format!("{}:{RPC_PORT}", self.ip)
    }
    pub fn metrics_url(&self) -> String {
        format!("http://{}:{METRICS_PORT}/metrics", self.ip)
    }
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
    /// The volume image of group `volume` on this node.
    pub fn image_path(&self, volume: u64) -> PathBuf {
        self.dir
            .join("data")
            .join(format!("volume-{volume}"))
            .join("sm")
            .join("image")
    }
}

/// A test cluster.
#[derive(Debug)]
pub struct Cluster {
    pub nodes: Vec<ClusterNode>,
    scratch: Scratch,
    pki: PathBuf,
    /// Extra `[raft]` lines for every node's config.
    raft_toml: String,
    /// Extra sections appended to every node's config (e.g. `[testing]`).
    extra_toml: String,
}

impl Cluster {
    /// Starts `n` nodes and forms the cluster (node 1 creates it, the others are added).
    pub fn start(n: usize) -> Result<Cluster> {
        Cluster::start_with(n, "")
    }

    /// Like [`Cluster::start`] with extra `[raft]` settings (e.g. `snapshot_every_entries = 200`).
    pub fn start_with(n: usize, raft_toml: &str) -> Result<Cluster> {
        Cluster::start_configured(n, raft_toml, "")
    }

    /// Like [`Cluster::start_with`], with `extra_toml` (whole sections, e.g. `[testing]\n
    /// fault_injection = true`) appended to every node's config.
    pub fn start_configured(n: usize, raft_toml: &str, extra_toml: &str) -> Result<Cluster> {
        ensure!(n >= 1, "a cluster needs a node");
        let scratch = Scratch::new()?;
        let pki = scratch.path().join("pki");
        fs::create_dir_all(&pki)?;
        let mut c = Cluster {
            nodes: Vec::new(),
            scratch,
            pki,
            raft_toml: raft_toml.to_string(),
            extra_toml: extra_toml.to_string(),
        };
        c.prepare_node(1)?;
        let init = c.raftsan_on(1, &["cluster", "init"])?;
        ensure!(init.success(), "raftsan cluster init failed:\n{}", init.combined());
        c.spawn(1)?;
        c.wait_for("node 1 to lead the metadata group", Duration::from_secs(30), |s| {
            meta_leader(s).is_some()
        })?;
        for id in 2..=n as u64 {
            c.add_node(id)?;
        }
        Ok(c)
    }

    /// Writes node `id`'s config and certificate (does not start it).
    fn prepare_node(&mut self, id: u64) -> Result<()> {
        let lo = Loopback::reserve()?;
        let ip = lo.ip();
        let dir = self.scratch.path().join(format!("node{id}"));
        fs::create_dir_all(dir.join("data"))?;
        let config = dir.join("node.toml");
        let text = format!(
            "[node]\nid = {id}\ndata_dir = \"{data}\"\nportals = [\"{ip}:3260\"]\nrpc_listen = \"{ip}:{RPC_PORT}\"\n\
             metrics = \"{ip}:{METRICS_PORT}\"\nadmin_socket = \"{dir}/admin.sock\"\n\
             [limits]\nnop_in_interval_ms = 1000\nnop_in_timeout_ms = 3000\n\
             [tls]\nca = \"{pki}/ca.crt\"\ncert = \"{pki}/node-{id}.crt\"\nkey = \"{pki}/node-{id}.key\"\n\
             [raft]\n{raft}\n{extra}\n",
            data = dir.join("data").display(),
            dir = dir.display(),
            pki = self.pki.display(),
            raft = self.raft_toml,
            extra = self.extra_toml,
        );
        fs::write(&config, text)?;
        let node = ClusterNode {
            id,
            ip,
            config,
            log: dir.join("raftsan.log"),
            dir,
            child: None,
            _lo: lo,
            expected_errors: Vec::new(),
        };
        self.nodes.push(node);
        if id != 1 {
            let out = self.raftsan_on(
                1,
                &[
                    "cluster",
                    "issue-cert",
                    "--node-id",
                    &id.to_string(),
                    "--ip",
                    &ip.to_string(),
                    "--out",
                    &self.pki.display().to_string(),
                ],
            )?;
            ensure!(out.success(), "issue-cert for node {id} failed:\n{}", out.combined());
        }
        Ok(())
    }

    /// Starts a new node `id` and adds it with `raftsan cluster add-node` through a live node.
    pub fn add_node(&mut self, id: u64) -> Result<()> {
        self.prepare_node(id)?;
        self.spawn(id)?;
        let n = self.node(id)?;
        let args = [
            "cluster".to_string(),
            "add-node".into(),
            "--id".into(),
            id.to_string(),
            "--rpc".into(),
            n.rpc(),
            "--portal".into(),
            n.portal().to_string(),
            "--metrics".into(),
            format!("{}:{METRICS_PORT}", n.ip),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.admin(&args)?;
        ensure!(out.success(), "add-node {id} failed:\n{}", out.combined());
        Ok(())
    }

    pub fn node(&self, id: u64) -> Result<&ClusterNode> {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .ok_or_else(|| anyhow!("no node {id} in the test cluster"))
    }

    pub fn node_mut(&mut self, id: u64) -> Result<&mut ClusterNode> {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .ok_or_else(|| anyhow!("no node {id} in the test cluster"))
    }

    /// Starts (or restarts) node `id`'s `raftsan serve` and waits for its portal and RPC port.
    pub fn spawn(&mut self, id: u64) -> Result<()> {
        let bin = raftsan_bin()?;
        let n = self.node_mut(id)?;
        let log = fs::OpenOptions::new().create(true).append(true).open(&n.log)?;
        let child = Command::new(&bin)
            .arg("serve")
            .arg("--config")
            .arg(&n.config)
            .process_group(0)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", std::env::var("RAFTSAN_TEST_LOG").unwrap_or("info".into()))
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        n.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        for addr in [n.portal().to_string(), n.rpc()] {
            let sock: std::net::SocketAddr = addr.parse()?;
            while TcpStream::connect_timeout(&sock, Duration::from_millis(200)).is_err() {
                if !n.is_running() {
                    bail!("node {id} exited at start; log:\n{}", crate::tail(&n.log_text(), 40));
                }
                if Instant::now() > deadline {
                    bail!(
                        "node {id} did not listen on {addr}; log:\n{}",
                        crate::tail(&n.log_text(), 40)
                    );
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// The leader of `group` once it stayed the same for `quiet` (leadership moves to a volume's
    /// preferred replica a few seconds after an election); at most 60 s.
    pub fn settled_leader(&mut self, group: u64, quiet: Duration) -> Result<u64> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = None;
        let mut since = Instant::now();
        loop {
            let leader = group_leader(&self.status()?, group);
            if leader != last {
                last = leader;
                since = Instant::now();
            }
            if let Some(l) = last
                && since.elapsed() >= quiet
            {
                return Ok(l);
            }
            ensure!(Instant::now() < deadline, "group {group} has no settled leader");
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Sends `signal` to node `id` (SIGKILL: the process is reaped; SIGSTOP/SIGCONT: it stays).
    pub fn signal(&mut self, id: u64, signal: libc::c_int) -> Result<()> {
        let n = self.node_mut(id)?;
        let pid = n.pid().ok_or_else(|| anyhow!("node {id} is not running"))?;
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        unsafe {
            libc::kill(pid as libc::pid_t, signal);
        }
        if signal == libc::SIGKILL
            && let Some(mut c) = n.child.take()
        {
            let _ = c.wait();
        }
        if signal == libc::SIGSTOP {
            crate::wait_stopped(pid)?;
        }
        Ok(())
    }

    /// Graceful stop (SIGTERM) of node `id`, waiting for it to exit.
    pub fn stop(&mut self, id: u64) -> Result<()> {
        let n = self.node_mut(id)?;
        if let Some(mut c) = n.child.take() {
            // SAFETY: as in `signal`.
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(15);
            while c.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    bail!("node {id} did not stop within 15 s of SIGTERM");
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Runs `raftsan ARGS --config <node id's config>`.
    pub fn raftsan_on(&self, id: u64, args: &[&str]) -> Result<Output> {
        let n = self.node(id)?;
        run(
            Command::new(raftsan_bin()?)
                .args(args)
                .arg("--config")
                .arg(&n.config)
                .env("NO_COLOR", "1"),
            CLIENT_TIMEOUT * 3,
        )
    }

    /// Runs an admin command through the first running node.
    pub fn admin(&mut self, args: &[&str]) -> Result<Output> {
        let id = self
            .nodes
            .iter_mut()
            .find_map(|n| n.is_running().then_some(n.id))
            .ok_or_else(|| anyhow!("no node is running"))?;
        self.raftsan_on(id, args)
    }

    /// `raftsan status --json` through a running node.
    pub fn status(&mut self) -> Result<Value> {
        let out = self.admin(&["status", "--json"])?;
        ensure!(out.success(), "raftsan status failed:\n{}", out.combined());
        serde_json::from_str(&out.stdout).with_context(|| format!("status is not JSON:\n{}", out.stdout))
    }

    /// Polls status until `ok` holds.
    pub fn wait_for(&mut self, what: &str, within: Duration, ok: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = Instant::now() + within;
        let mut last = Value::Null;
        loop {
            if let Ok(s) = self.status() {
                if ok(&s) {
                    return Ok(s);
                }
                last = s;
            }
            if Instant::now() > deadline {
                bail!("timed out after {within:?} waiting for {what}; last status:\n{last:#}");
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// `raftsan volume create NAME --size SIZE`; returns (id, target, lun) and waits until the
    /// volume's group has a leader and every node as voter.
    pub fn create_volume(&mut self, name: &str, size: &str) -> Result<(u64, String, u64)> {
        let out = self.admin(&["volume", "create", name, "--size", size])?;
        ensure!(out.success(), "volume create failed:\n{}", out.combined());
        let list = self.admin(&["volume", "list", "--json"])?;
        let v: Value = serde_json::from_str(&list.stdout)?;
        let vol = v
            .as_array()
            .and_then(|a| a.iter().find(|x| x["name"] == name))
            .ok_or_else(|| anyhow!("volume {name} not listed:\n{}", list.stdout))?;
        let id = vol["id"].as_u64().unwrap_or(0);
        let target = vol["target"].as_str().unwrap_or_default().to_string();
        let lun = vol["lun"].as_u64().unwrap_or(0);
        let voters = self.nodes.len();
        self.wait_for(
            "the volume to have a leader and all voters",
            Duration::from_secs(60),
            |s| group_leader(s, id).is_some() && group_voters(s, id) == voters,
        )?;
        Ok((id, target, lun))
    }

    /// SHA-256 of node `id`'s image of `volume`.
    pub fn image_sha(&self, id: u64, volume: u64) -> Result<String> {
        let p = self.node(id)?.image_path(volume);
        let mut f = File::open(&p).with_context(|| format!("opening {}", p.display()))?;
        let mut h = Sha256::new();
        std::io::copy(&mut f, &mut h)?;
        Ok(hex::encode(h.finalize()))
    }

    pub fn pki(&self) -> &Path {
        &self.pki
    }

    pub fn dir(&self) -> &Path {
        self.scratch.path()
    }

    fn shutdown(&mut self) -> Result<()> {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
                crate::kill_group(c.id(), libc::SIGKILL);
            }
        }
        for n in &self.nodes {
            check_log(Kind::Raftsan, &n.log_text(), &n.expected_errors)
                .with_context(|| format!("node {} log {}", n.id, n.log.display()))?;
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown()
            && !thread::panicking()
        {
            panic!("{e:#}");
        }
    }
}

/// The metadata group's leader in a status document.
pub fn meta_leader(s: &Value) -> Option<u64> {
    group_leader(s, 0)
}

/// The leader of `group` with the highest term any node reports.
pub fn group_leader(s: &Value, group: u64) -> Option<u64> {
    groups(s)
        .filter(|g| g["group"] == group && g["leader"].as_u64().unwrap_or(0) != 0)
        .max_by_key(|g| g["term"].as_u64().unwrap_or(0))
        .and_then(|g| g["leader"].as_u64())
}

/// Voter count of `group` as its leader reports it.
pub fn group_voters(s: &Value, group: u64) -> usize {
    let Some(leader) = group_leader(s, group) else { return 0 };
    s["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["id"] == leader)
        .flat_map(|n| n["groups"].as_array().into_iter().flatten())
        .find(|g| g["group"] == group)
        .and_then(|g| g["voters"].as_array().map(Vec::len))
        .unwrap_or(0)
}

/// Applied index of `group` on node `node`.
pub fn applied_index(s: &Value, node: u64, group: u64) -> Option<u64> {
    group_field(s, node, group, "applied_index")?.as_u64()
}

/// A field of `group` in node `node`'s part of a `raftsan status --json` answer.
pub fn group_field<'a>(s: &'a Value, node: u64, group: u64, field: &str) -> Option<&'a Value> {
    s["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["id"] == node)?
        .get("groups")?
        .as_array()?
        .iter()
        .find(|g| g["group"] == group)?
        .get(field)
}

fn groups(s: &Value) -> impl Iterator<Item = &Value> {
    s["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|n| n["groups"].as_array().into_iter().flatten())
}
