//! Helpers for the real-process tests: spawn `raftsan` (or `tgtd`, as a reference that checks the
//! test itself) on loopback with a generated config and a log file per process, and run real
//! iSCSI clients against it.
//!
//! * Every daemon listens on its own loopback address (`127.0.<10..250>.<1..255>`, port 3260),
//!   reserved with a lock file so that nextest's parallel test processes never collide. Nothing
//!   here ever binds a non-loopback address.
//! * [`Daemon`] owns a temporary directory (config, backing files, data dir, log). Dropping it
//!   stops the process (SIGTERM, then SIGKILL after [`STOP_GRACE`]) and fails the test if the log
//!   holds a panic or an `ERROR` line the test did not announce with [`Daemon::expect_error`].
//! * A missing `raftsan` binary is a test failure with instructions, never a skip.

pub mod cluster;
pub mod initiator;
pub mod prometheus;
pub mod qemu;
pub mod raw;

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail, ensure};

/// The iSCSI well-known port (RFC 7143 §13.2); every test daemon gets its own address instead.
pub const ISCSI_PORT: u16 = 3260;
/// How long a daemon may take to accept TCP on all its portals.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a daemon gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// Default timeout for one client command.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Third octet range of the addresses handed out to tests (127.0.0.x is left to the scripts:
/// conformance 127.0.0.41/42, bench 127.0.0.51/52).
const LOOPBACK_NET_FIRST: u8 = 10;
const LOOPBACK_NET_LAST: u8 = 249;

/// Directory of the lock files that reserve addresses and tgtd control ports across processes.
fn lock_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join("raftsan-tests-loopback");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Takes the exclusive lock `name` in [`lock_dir`]; `None` if another process holds it.
fn try_lock(dir: &Path, name: &str) -> Result<Option<File>> {
    let path = dir.join(name);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    Ok(file.try_lock().is_ok().then_some(file))
}

/// A pseudo-random starting point so parallel processes rarely contend for the same lock.
fn spread(span: u32) -> u32 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (std::process::id().wrapping_mul(7919) ^ nanos) % span
}

fn reserve_tgtd_control_port() -> Result<(u32, File)> {
    const FIRST: u32 = 1000;
    const SPAN: u32 = 31_000;
    let dir = lock_dir()?;
    let start = spread(SPAN);
    for i in 0..SPAN {
        let port = FIRST + (start + i) % SPAN;
        if let Some(lock) = try_lock(&dir, &format!("tgtd-control-{port}.lock"))? {
            return Ok((port, lock));
        }
    }
    bail!("no free tgtd control port")
}

/// A loopback address reserved for this process until dropped.
#[derive(Debug)]
pub struct Loopback {
    ip: Ipv4Addr,
    /// Holds an exclusive `flock` on the address's lock file; released on drop or process exit.
    _lock: File,
}

impl Loopback {
    /// Reserves a loopback address no other test process holds and that nothing listens on at
    /// port 3260.
    pub fn reserve() -> Result<Loopback> {
        let dir = lock_dir()?;
        let span = u32::from(LOOPBACK_NET_LAST - LOOPBACK_NET_FIRST + 1) * 254;
        let start = spread(span);
        for i in 0..span {
            let slot = (start + i) % span;
            let third = LOOPBACK_NET_FIRST + u8::try_from(slot / 254).unwrap_or(0);
            let fourth = u8::try_from(slot % 254 + 1).unwrap_or(1);
            let ip = Ipv4Addr::new(127, 0, third, fourth);
            let Some(file) = try_lock(&dir, &format!("{ip}.lock"))? else {
                continue;
            };
            // Something outside the tests (a script's daemon) may use the address.
            if TcpListener::bind(SocketAddrV4::new(ip, ISCSI_PORT)).is_err() {
                continue;
            }
            return Ok(Loopback { ip, _lock: file });
        }
        bail!("no free loopback address in 127.0.{LOOPBACK_NET_FIRST}-{LOOPBACK_NET_LAST}.x")
    }

    /// Reserves `n` consecutive loopback addresses (for `raftsan demo --first-address`, which
    /// takes the next addresses after the first).
    pub fn reserve_consecutive(n: u8) -> Result<Vec<Loopback>> {
        let dir = lock_dir()?;
        let start = spread(200);
        for i in 0..200u32 {
            let base = 1 + (start + i) % 200;
            let third = LOOPBACK_NET_FIRST + u8::try_from(spread(200) % 200).unwrap_or(0);
            let mut got = Vec::new();
            for k in 0..u32::from(n) {
                let ip = Ipv4Addr::new(127, 0, third, u8::try_from(base + k).unwrap_or(255));
                let Some(file) = try_lock(&dir, &format!("{ip}.lock"))? else {
                    break;
                };
                if TcpListener::bind(SocketAddrV4::new(ip, ISCSI_PORT)).is_err() {
                    break;
                }
                got.push(Loopback { ip, _lock: file });
            }
            if got.len() == usize::from(n) {
                return Ok(got);
            }
        }
        bail!("no {n} consecutive free loopback addresses")
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The portal `ip:3260`.
    pub fn portal(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.ip, ISCSI_PORT)
    }
}

/// A temporary directory for one daemon: config, backing files, data dir, log.
#[derive(Debug)]
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Result<Scratch> {
        let dir = tempfile::Builder::new()
            .prefix("raftsan-test-")
            .tempdir()
            .context("creating the test's temporary directory")?;
        Ok(Scratch { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Creates a sparse file of `size_bytes` (a backing store) and returns its path.
    pub fn sparse_file(&self, name: &str, size_bytes: u64) -> Result<PathBuf> {
        let path = self.dir.path().join(name);
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        file.set_len(size_bytes)
            .with_context(|| format!("sizing {}", path.display()))?;
        Ok(path)
    }
}

/// Which daemon a [`Daemon`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Raftsan,
    Tgtd,
}

/// The `raftsan` binary: `$RAFTSAN_BIN`, else `raftsan` in the profile directory of this test
/// executable (`<target dir>/<profile>/deps/<test>` → `<target dir>/<profile>/raftsan`).
pub fn raftsan_bin() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("RAFTSAN_BIN") {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("RAFTSAN_BIN={} does not exist", path.display());
        }
        return Ok(path);
    }
    let exe = std::env::current_exe().context("locating the test executable")?;
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir.pop();
    }
    let path = dir.join("raftsan");
    if !path.is_file() {
        bail!(
            "raftsan binary not found at {}: build it in the same profile as the tests \
             (`cargo build -p raftsan-cluster [--release]`, or run `cargo nextest run --workspace`) \
             or set RAFTSAN_BIN",
            path.display()
        );
    }
    Ok(path)
}

/// A running daemon on loopback. Dropping it stops it and checks its log.
#[derive(Debug)]
pub struct Daemon {
    kind: Kind,
    child: Option<Child>,
    portals: Vec<SocketAddrV4>,
    _addresses: Vec<Loopback>,
    scratch: Scratch,
    log_path: PathBuf,
    expected_errors: Vec<String>,
    tgtd_control_port: Option<u32>,
    _tgtd_control_lock: Option<File>,
}

impl Daemon {
    /// `raftsan serve --config FILE --listen ADDR:3260 ... --data-dir DIR` with `config_text`
    /// (TOML, or a tgt `targets.conf` when it contains `<target`), in a fresh scratch dir.
    /// `@DIR@` in `config_text` is replaced by the scratch dir's path.
    pub fn raftsan(config_text: &str, listen: Vec<Loopback>) -> Result<Daemon> {
        Daemon::raftsan_in(Scratch::new()?, config_text, listen)
    }

    /// Like [`Daemon::raftsan`] in a prepared scratch dir (backing files already created).
    pub fn raftsan_in(scratch: Scratch, config_text: &str, listen: Vec<Loopback>) -> Result<Daemon> {
        Daemon::raftsan_in_with_args(scratch, config_text, listen, &[], &[])
    }

    /// Like [`Daemon::raftsan`] with `extra_args` appended to `raftsan serve` (e.g. `--listen
    /// [::1]:PORT`) and `extra_portals` (IPv4 or IPv6) waited for at start besides `listen`'s.
    pub fn raftsan_with_args(
        config_text: &str,
        listen: Vec<Loopback>,
        extra_args: &[&str],
        extra_portals: &[SocketAddr],
    ) -> Result<Daemon> {
        Daemon::raftsan_in_with_args(Scratch::new()?, config_text, listen, extra_args, extra_portals)
    }

    /// [`Daemon::raftsan_with_args`] in a prepared scratch dir.
    pub fn raftsan_in_with_args(
        scratch: Scratch,
        config_text: &str,
        listen: Vec<Loopback>,
        extra_args: &[&str],
        extra_portals: &[SocketAddr],
    ) -> Result<Daemon> {
        let bin = raftsan_bin()?;
        let config_text = config_text.replace("@DIR@", &scratch.path().display().to_string());
        let name = if config_text.contains("<target") {
            "targets.conf"
        } else {
            "raftsan.toml"
        };
        let config = scratch.path().join(name);
        fs::write(&config, &config_text).with_context(|| format!("writing {}", config.display()))?;
        let data_dir = scratch.path().join("data");
        fs::create_dir_all(&data_dir)?;
        let log_path = scratch.path().join("raftsan.log");
        let log = File::create(&log_path)?;
        let mut cmd = Command::new(&bin);
        cmd.arg("serve").arg("--config").arg(&config);
        for addr in &listen {
            cmd.arg("--listen").arg(addr.portal().to_string());
        }
        cmd.arg("--data-dir").arg(&data_dir);
        cmd.args(extra_args);
        cmd.process_group(0)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", std::env::var("RAFTSAN_TEST_LOG").unwrap_or("info".into()))
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().with_context(|| format!("spawning {}", bin.display()))?;
        let mut daemon = Daemon {
            kind: Kind::Raftsan,
            child: Some(child),
            portals: listen.iter().map(Loopback::portal).collect(),
            _addresses: listen,
            scratch,
            log_path,
            expected_errors: Vec::new(),
            tgtd_control_port: None,
            _tgtd_control_lock: None,
        };
        daemon.wait_portals()?;
        for portal in extra_portals {
            daemon.wait_portal(*portal)?;
        }
        Ok(daemon)
    }

    /// `tgtd -f` on the given portals, configured from `targets_conf` with `tgt-admin -e` (as tgt
    /// users run it), in a fresh scratch dir. `@DIR@` is replaced as for [`Daemon::raftsan`].
    pub fn tgtd(targets_conf: &str, listen: Vec<Loopback>) -> Result<Daemon> {
        Daemon::tgtd_in(Scratch::new()?, targets_conf, listen)
    }

    /// Like [`Daemon::tgtd`] in a prepared scratch dir.
    pub fn tgtd_in(scratch: Scratch, targets_conf: &str, listen: Vec<Loopback>) -> Result<Daemon> {
        let first = listen.first().ok_or_else(|| anyhow!("tgtd needs a portal"))?;
        // tgtd's management socket is /var/run/tgtd/socket.<control port>, a short (< 32768);
        // the scripts use numbers below 100.
        let (control_port, control_lock) = reserve_tgtd_control_port()?;
        let config_text = targets_conf.replace("@DIR@", &scratch.path().display().to_string());
        let config = scratch.path().join("targets.conf");
        fs::write(&config, &config_text)?;
        let log_path = scratch.path().join("tgtd.log");
        let log = File::create(&log_path)?;
        fs::create_dir_all("/var/run/tgtd").context("creating /var/run/tgtd (tgtd needs root)")?;
        let child = Command::new("tgtd")
            .process_group(0)
            .arg("-f")
            .arg("-C")
            .arg(control_port.to_string())
            .arg("--iscsi")
            .arg(format!("portal={}", first.portal()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning tgtd (install it with scripts/install-deps.sh)")?;
        let mut daemon = Daemon {
            kind: Kind::Tgtd,
            child: Some(child),
            portals: listen.iter().map(Loopback::portal).collect(),
            _addresses: listen,
            scratch,
            log_path,
            expected_errors: Vec::new(),
            tgtd_control_port: Some(control_port),
            _tgtd_control_lock: Some(control_lock),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let probe = daemon.tgtadm(&["--mode", "sys", "--op", "show"]);
            if probe.is_ok() {
                break;
            }
            daemon.check_alive()?;
            if Instant::now() > deadline {
                bail!("tgtd management socket not up: {probe:?}");
            }
            thread::sleep(Duration::from_millis(50));
        }
        for portal in daemon.portals.clone().iter().skip(1) {
            daemon.tgtadm(&[
                "--lld",
                "iscsi",
                "--op",
                "new",
                "--mode",
                "portal",
                "--param",
                &format!("portal={portal}"),
            ])?;
        }
        let out = run(
            Command::new("tgt-admin")
                .arg("-C")
                .arg(control_port.to_string())
                .arg("-e")
                .arg("-c")
                .arg(&config),
            CLIENT_TIMEOUT,
        )?;
        if !out.status.success() {
            bail!("tgt-admin -e failed:\n{}", out.combined());
        }
        daemon.wait_portals()?;
        Ok(daemon)
    }

    /// Runs `tgtadm -C <this tgtd's control port> ARGS` (tgtd only).
    pub fn tgtadm(&self, args: &[&str]) -> Result<Output> {
        let port = self
            .tgtd_control_port
            .ok_or_else(|| anyhow!("tgtadm on a raftsan daemon"))?;
        let out = run(
            Command::new("tgtadm").arg("-C").arg(port.to_string()).args(args),
            CLIENT_TIMEOUT,
        )?;
        if !out.status.success() {
            bail!("tgtadm {args:?} failed:\n{}", out.combined());
        }
        Ok(out)
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The first portal.
    pub fn portal(&self) -> SocketAddrV4 {
        self.portals[0]
    }

    pub fn portals(&self) -> &[SocketAddrV4] {
        &self.portals
    }

    /// The scratch directory (config, backing files, log).
    pub fn dir(&self) -> &Path {
        self.scratch.path()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Announces that an `ERROR` log line containing `fragment` is expected (e.g. a refused
    /// login the test provokes on purpose), so the log check accepts it.
    pub fn expect_error(&mut self, fragment: &str) {
        self.expected_errors.push(fragment.to_owned());
    }

    /// `iscsi://ADDR:3260` (discovery URL).
    pub fn portal_url(&self) -> String {
        format!("iscsi://{}", self.portal())
    }

    /// `iscsi://ADDR:3260/IQN/LUN`.
    pub fn lun_url(&self, iqn: &str, lun: u32) -> String {
        format!("iscsi://{}/{iqn}/{lun}", self.portal())
    }

    /// `iscsi://USER%SECRET@ADDR:3260` (discovery URL with CHAP).
    pub fn portal_url_chap(&self, user: &str, secret: &str) -> String {
        format!("iscsi://{user}%{secret}@{}", self.portal())
    }

    /// `iscsi://USER%SECRET@ADDR:3260/IQN/LUN`.
    pub fn lun_url_chap(&self, user: &str, secret: &str, iqn: &str, lun: u32) -> String {
        format!("iscsi://{user}%{secret}@{}/{iqn}/{lun}", self.portal())
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            self.child = None;
            bail!(
                "{:?} exited at start with {status}; log {}:\n{}",
                self.kind,
                self.log_path.display(),
                tail(&self.log(), 40)
            );
        }
        Ok(())
    }

    fn wait_portals(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        for portal in self.portals.clone() {
            loop {
                if TcpStream::connect_timeout(&portal.into(), Duration::from_millis(200)).is_ok() {
                    break;
                }
                self.check_alive()?;
                if Instant::now() > deadline {
                    bail!(
                        "{:?} did not accept TCP on {portal} within {START_TIMEOUT:?}; log:\n{}",
                        self.kind,
                        tail(&self.log(), 40)
                    );
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Waits until `portal` (any address family) accepts TCP.
    fn wait_portal(&mut self, portal: SocketAddr) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        while TcpStream::connect_timeout(&portal, Duration::from_millis(200)).is_err() {
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "{:?} did not accept TCP on {portal} within {START_TIMEOUT:?}; log:\n{}",
                    self.kind,
                    tail(&self.log(), 40)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Stops the daemon (SIGTERM, SIGKILL after [`STOP_GRACE`]; tgtd, which ignores SIGTERM
    /// once it has targets, gets SIGKILL at once) and checks its log. Returns the log.
    pub fn stop(mut self) -> Result<String> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<String> {
        if let Some(mut child) = self.child.take()
            && child.try_wait()?.is_none()
        {
            if self.kind == Kind::Raftsan {
                terminate(&child);
                let deadline = Instant::now() + STOP_GRACE;
                while child.try_wait()?.is_none() && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(20));
                }
            }
            if child.try_wait()?.is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
            // Whatever the daemon left behind in its process group goes too.
            kill_group(child.id(), libc::SIGKILL);
        }
        let log = self.log();
        check_log(self.kind, &log, &self.expected_errors)
            .with_context(|| format!("log {}", self.log_path.display()))?;
        Ok(log)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let result = self.shutdown();
        if let Err(err) = result
            && !thread::panicking()
        {
            panic!("{err:#}");
        }
    }
}

fn terminate(child: &Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped) and a valid signal.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
}

/// Sends `signal` to the process group led by `pid` (children spawned with `process_group(0)`).
pub(crate) fn kill_group(pid: u32, signal: libc::c_int) {
    if let Ok(pgid) = libc::pid_t::try_from(pid)
        && pgid > 0
    {
        // SAFETY: kill(2) on a negative pid signals that process group; the group was created by
        // us for this child, and a group that no longer exists just yields ESRCH.
        unsafe {
            libc::kill(-pgid, signal);
        }
    }
}

/// Fails on a panic, or (raftsan only) on an `ERROR` line not matching `expected`.
pub fn check_log(kind: Kind, log: &str, expected: &[String]) -> Result<()> {
    for line in log.lines() {
        let line = strip_ansi(line);
        if line.contains("panicked") {
            bail!("{kind:?} panicked: {line}");
        }
        if kind == Kind::Raftsan
            && line.split_whitespace().any(|word| word == "ERROR")
            && !expected.iter().any(|fragment| line.contains(fragment.as_str()))
        {
            bail!("unexpected ERROR line in the {kind:?} log: {line}");
        }
    }
    Ok(())
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ params final-byte (0x40..=0x7e).
            for c in chars.by_ref() {
                if ('\u{40}'..='\u{7e}').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub(crate) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// What a client command printed and how it ended.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// stdout then stderr, for messages.
    pub fn combined(&self) -> String {
        format!(
            "status: {}\n--- stdout\n{}--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// How long to wait for a client's output pipes to close after it exited (a grandchild that
/// inherited them could hold them open forever).
const PIPE_DRAIN: Duration = Duration::from_secs(5);

/// Runs `cmd` to completion with captured output, killing it (and its process group) after
/// `timeout`.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let description = format!("{cmd:?}");
    let mut child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {description} (missing? see scripts/install-deps.sh)"))?;
    let stdout = reader(child.stdout.take());
    let stderr = reader(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            kill_group(child.id(), libc::SIGKILL);
            let _ = child.kill();
            let _ = child.wait();
            let out = drain(&stdout);
            let err = drain(&stderr);
            bail!("{description} timed out after {timeout:?}\n--- stdout\n{out}--- stderr\n{err}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    // A client leaves nothing behind; a leftover would hold the pipes open.
    kill_group(child.id(), libc::SIGKILL);
    let stdout = drain(&stdout);
    let stderr = drain(&stderr);
    Ok(Output { status, stdout, stderr })
}

/// Like [`run`] with [`CLIENT_TIMEOUT`], failing unless the command exits 0.
pub fn run_ok(cmd: &mut Command) -> Result<Output> {
    let description = format!("{cmd:?}");
    let out = run(cmd, CLIENT_TIMEOUT)?;
    if !out.success() {
        bail!("{description} failed:\n{}", out.combined());
    }
    Ok(out)
}

fn reader<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
    });
    rx
}

fn drain(rx: &mpsc::Receiver<String>) -> String {
    rx.recv_timeout(PIPE_DRAIN)
        .unwrap_or_else(|_| "<output pipe still held open by a leftover process>\n".to_owned())
}

/// One target with one file-backed LUN (LUN 1, as tgt numbers them), as a tgt `targets.conf`
/// block; `extra` lines (ACLs, accounts) go inside the block.
pub fn targets_conf(iqn: &str, backing: &Path, extra: &[&str]) -> String {
    let mut text = format!("<target {iqn}>\n    backing-store {}\n", backing.display());
    for line in extra {
        text.push_str("    ");
        text.push_str(line);
        text.push('\n');
    }
    text.push_str("</target>\n");
    text
}

/// Starts `kind` with one target `iqn` backed by a sparse file `lun1.img` of `lun_bytes`, with the
/// `extra` config lines. Returns the daemon and the backing file's path.
pub fn start_single_target(kind: Kind, iqn: &str, lun_bytes: u64, extra: &[&str]) -> Result<(Daemon, PathBuf)> {
    let scratch = Scratch::new()?;
    let backing = scratch.sparse_file("lun1.img", lun_bytes)?;
    let conf = targets_conf(iqn, &backing, extra);
    let listen = vec![Loopback::reserve()?];
    let daemon = match kind {
        Kind::Raftsan => Daemon::raftsan_in(scratch, &conf, listen)?,
        Kind::Tgtd => Daemon::tgtd_in(scratch, &conf, listen)?,
    };
    Ok((daemon, backing))
}

/// iptables rules inserted for a test (`iptables -w -I RULE...`) and deleted when dropped, also
/// when the test fails half-way.
pub struct Iptables(Vec<Vec<String>>);

impl Iptables {
    pub fn insert(rules: &[&[&str]]) -> Result<Iptables> {
        let mut done = Iptables(Vec::new());
        for r in rules {
            let rule: Vec<String> = r.iter().map(|s| s.to_string()).collect();
            let out = run(
                Command::new("iptables").arg("-w").arg("-I").args(&rule),
                Duration::from_secs(20),
            )?;
            ensure!(
                out.success(),
                "iptables -I failed (install it with scripts/install-deps.sh):\n{}",
                out.combined()
            );
            done.0.push(rule);
        }
        Ok(done)
    }
}

impl Drop for Iptables {
    fn drop(&mut self) {
        for rule in self.0.drain(..) {
            let _ = run(
                Command::new("iptables").arg("-w").arg("-D").args(&rule),
                Duration::from_secs(20),
            );
        }
    }
}

/// Waits (at most 5 s) until every thread of `pid` is stopped (state `T` in
/// `/proc/PID/task/*/stat`): kill(2) with SIGSTOP returns before the process has actually stopped,
/// and on a busy machine it may still serve a request sent right after.
pub fn wait_stopped(pid: u32) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let tasks = fs::read_dir(format!("/proc/{pid}/task"))?;
        let mut all = true;
        for t in tasks {
            let stat = fs::read_to_string(t?.path().join("stat")).unwrap_or_default();
            // "pid (comm) S ...": the state follows the last ')'.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            if !matches!(state, Some("T" | "t") | None) {
                all = false;
            }
        }
        if all {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "process {pid} did not stop within 5 s of SIGSTOP"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_loopback_addresses_are_distinct_and_loopback() {
        let a = Loopback::reserve().unwrap();
        let b = Loopback::reserve().unwrap();
        assert_ne!(a.ip(), b.ip());
        assert!(a.ip().is_loopback() && b.ip().is_loopback());
        assert_eq!(a.portal().port(), ISCSI_PORT);
    }

    #[test]
    fn log_check_flags_panics_and_unexpected_errors() {
        let ok = "2026-11-23T20:00:00Z  INFO raftsan: listening\n";
        assert!(check_log(Kind::Raftsan, ok, &[]).is_ok());
        let panic = "thread 'main' panicked at src/main.rs:1:1\n";
        assert!(check_log(Kind::Raftsan, panic, &[]).is_err());
        assert!(check_log(Kind::Tgtd, panic, &[]).is_err());
        let error = "\u{1b}[31m2026-11-23T20:00:00Z ERROR\u{1b}[0m raftsan_target: login refused\n";
        assert!(check_log(Kind::Raftsan, error, &[]).is_err());
        assert!(check_log(Kind::Raftsan, error, &["login refused".to_owned()]).is_ok());
        assert!(check_log(Kind::Tgtd, error, &[]).is_ok());
    }

    #[test]
    fn run_times_out_and_captures_output() {
        let out = run(Command::new("sh").args(["-c", "echo hi; echo err >&2"]), CLIENT_TIMEOUT).unwrap();
        assert!(out.success());
        assert_eq!(out.stdout, "hi\n");
        assert_eq!(out.stderr, "err\n");
        let slow = run(Command::new("sleep").arg("5"), Duration::from_millis(100));
        assert!(slow.is_err());
    }

    #[test]
    fn run_is_not_held_up_by_grandchildren() {
        let started = Instant::now();
        let hung = run(
            Command::new("sh").args(["-c", "sleep 30 & sleep 30"]),
            Duration::from_millis(200),
        );
        assert!(hung.is_err());
        let left = run(Command::new("sh").args(["-c", "sleep 30 & echo done"]), CLIENT_TIMEOUT).unwrap();
        assert_eq!(left.stdout, "done\n");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
