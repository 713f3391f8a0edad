//! `raftsan-initiator` as a real process for the tests: attach a volume and use its NBD export
//! with real clients (nbdcopy, nbdinfo, qemu-img, fio's nbd engine).

use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::Value;

use crate::{Output, Scratch};

/// The `raftsan-initiator` binary: `$RAFTSAN_INITIATOR_BIN`, else next to the test executable's
/// profile directory like [`crate::raftsan_bin`].
pub fn initiator_bin() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("RAFTSAN_INITIATOR_BIN") {
        return Ok(PathBuf::from(path));
    }
    let raftsan = crate::raftsan_bin()?;
    let path = raftsan.with_file_name("raftsan-initiator");
    ensure!(
        path.is_file(),
        "raftsan-initiator not found at {}: build it in the same profile (`cargo build -p raftsan-initiator`)",
        path.display()
    );
    Ok(path)
}

/// A config file for the initiator in `dir` (CHAP lines optional), with fast path-failure
/// detection as the failover tests want it.
pub fn write_config(dir: &Path, initiator_name: &str, extra: &str) -> Result<PathBuf> {
    let path = dir.join("initiator.toml");
    let text = format!(
        "initiator_name = \"{initiator_name}\"\nrun_dir = \"{run}\"\n{extra}\n",
        run = dir.join("run").display()
    );
    fs::write(&path, text)?;
    Ok(path)
}

/// Runs a one-shot `raftsan-initiator` command.
pub fn run(config: &Path, args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new(initiator_bin()?);
    cmd.arg("--config").arg(config).args(args).env("NO_COLOR", "1");
    crate::run(&mut cmd, Duration::from_secs(60))
}

/// A running `raftsan-initiator attach`.
pub struct Attach {
    child: Option<Child>,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub target: String,
    _scratch: Option<Scratch>,
}

impl Attach {
    /// Attaches `target` through `portals` and exports it on a Unix socket in `dir`; waits until
    /// the export is up (at most `within`).
    pub fn start(
        dir: &Path,
        config: &Path,
        target: &str,
        portals: &[String],
        extra_args: &[&str],
        within: Duration,
    ) -> Result<Attach> {
        let socket = dir.join("nbd.sock");
        let log = dir.join("initiator.log");
        let _ = fs::remove_file(&socket);
        let mut cmd = Command::new(initiator_bin()?);
        cmd.arg("--config")
            .arg(config)
            .arg("attach")
            .arg(target)
            .arg("--nbd")
            .arg(format!("unix:{}", socket.display()));
        for p in portals {
            cmd.arg("--portal").arg(p);
        }
        cmd.args(extra_args);
        cmd.process_group(0)
            .env(
                "RAFTSAN_LOG",
                std::env::var("RAFTSAN_TEST_LOG").unwrap_or("info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(File::create(dir.join("initiator.out"))?)
            .stderr(File::create(&log)?);
        let child = cmd.spawn().context("spawning raftsan-initiator attach")?;
        let mut a = Attach {
            child: Some(child),
            config: config.to_path_buf(),
            socket,
            log,
            target: target.to_string(),
            _scratch: None,
        };
        let deadline = Instant::now() + within;
        while !a.socket.exists() {
            if let Some(status) = a.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!(
                    "raftsan-initiator attach exited ({status}) before exporting:\n{}",
                    a.log_text()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "NBD export not up in {within:?}:\n{}",
                a.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(a)
    }

    /// The libnbd URI of the export.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `raftsan-initiator session --json`, this attachment's entry.
    pub fn session(&self) -> Result<Value> {
        let out = run(&self.config, &["session", "--json"])?;
        ensure!(out.success(), "session --json failed:\n{}", out.combined());
        let v: Value = serde_json::from_str(&out.stdout)?;
        v.as_array()
            .and_then(|a| {
                a.iter()
                    .find(|s| s["pid"].as_u64() == self.child.as_ref().map(|c| u64::from(c.id())))
            })
            .cloned()
            .ok_or_else(|| anyhow!("this attachment is not in `session --json`: {v}"))
    }

    /// SIGTERM, then waits for a clean exit (flush and logout).
    pub fn stop(&mut self) -> Result<()> {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) on a child we spawned and have not reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        self.wait_exit()
    }

    /// Waits (20 s at most) for the attachment to end on its own, cleanly.
    pub fn wait_exit(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait()? {
                ensure!(
                    status.success(),
                    "raftsan-initiator exited with {status}:\n{}",
                    self.log_text()
                );
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("raftsan-initiator did not stop on SIGTERM:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = self.log_text();
        ensure!(!log.contains("panicked"), "raftsan-initiator panicked:\n{log}");
        Ok(())
    }
}

impl Drop for Attach {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// fio through the NBD export: random 4 KiB writes verified with crc32c while they run and at the
/// end. Returns fio's JSON output.
pub struct FioRun {
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl FioRun {
    pub fn start(uri: &str, dir: &Path, size: &str, runtime_s: u32, iodepth: u32) -> Result<FioRun> {
        let out = dir.join("fio.json");
        let err = dir.join("fio.err");
        let child = Command::new("fio")
            .args([
                "--name=verify",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                "--bs=4k",
                &format!("--iodepth={iodepth}"),
                &format!("--size={size}"),
                "--verify=crc32c",
                "--verify_backlog=64",
                "--verify_fatal=1",
                "--do_verify=1",
                "--time_based=1",
                &format!("--runtime={runtime_s}"),
                "--randrepeat=0",
                "--output-format=json",
                &format!("--output={}", out.display()),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&err)?)
            .spawn()
            .context("spawning fio (install it with scripts/install-deps.sh)")?;
        Ok(FioRun { child, out, err })
    }

    /// Waits for fio; fails when fio reported any error. Returns its JSON.
    pub fn finish(mut self, within: Duration) -> Result<Value> {
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(s) = self.child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("fio did not finish in {within:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let err = fs::read_to_string(&self.err).unwrap_or_default();
        let json = fs::read_to_string(&self.out).unwrap_or_default();
        ensure!(status.success(), "fio failed ({status}):\n{err}\n{json}");
        // fio may print notices before the JSON object.
        let start = json.find('{').ok_or_else(|| anyhow!("fio wrote no JSON:\n{err}"))?;
        let v: Value = serde_json::from_str(&json[start..]).context("parsing fio JSON")?;
        let job = &v["jobs"][0];
        ensure!(
            job["error"].as_i64() == Some(0),
            "fio job error {}:\n{err}",
            job["error"]
        );
        Ok(v)
    }
}

/// The longest write completion latency fio saw, the client-visible stall.
pub fn fio_max_write_latency(v: &Value) -> Duration {
    let ns = v["jobs"][0]["write"]["lat_ns"]["max"].as_f64().unwrap_or(0.0);
    Duration::from_nanos(ns as u64)
}

/// Completed write and verify-read I/Os.
pub fn fio_ios(v: &Value) -> (u64, u64) {
    let j = &v["jobs"][0];
    (
        j["write"]["total_ios"].as_u64().unwrap_or(0),
        j["read"]["total_ios"].as_u64().unwrap_or(0),
    )
}
