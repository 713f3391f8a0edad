//! The node's `[limits]` and transport options against the real daemon: login timeout,
//! connections per portal, the session limit, IPv6 portals, header digests, read-only LUNs and
//! several LUNs and targets, with real clients where one can observe the behaviour.
//!
//! These tests need the `raftsan` binary (see `raftsan_tests::raftsan_bin`); without it they fail.

use std::fs;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use raftsan_tests::raw::Raw;
use raftsan_tests::{CLIENT_TIMEOUT, Daemon, Kind, Loopback, Output, Scratch, raftsan_bin, run};
use rand::{RngCore, SeedableRng, rngs::StdRng};
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;
const INITIATOR: &str = "iqn.2026-11.org.raftsan.test:limits-initiator";
const IQN: &str = "iqn.2026-11.org.raftsan.test:limits";
/// The initiator name qemu logs in with where a test finds its session in `raftsan show`.
const QEMU_INITIATOR: &str = "iqn.2026-11.org.raftsan.test:limits-qemu";

/// A TOML config with `limits` (lines of the `[limits]` table) and one 16 MiB memory LUN.
fn config_with_limits(limits: &str) -> String {
    format!(
        r#"[limits]
{limits}

[[target]]
name = "{IQN}"

[[target.lun]]
lun = 1
memory_size = "16M"
"#
    )
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn iscsi_ls(args: &[&str], url: &str) -> Result<Output> {
    run(
        Command::new("iscsi-ls").args(["-i", INITIATOR]).args(args).arg(url),
        CLIENT_TIMEOUT,
    )
}

/// `qemu-img convert` 1 MiB of seeded random bytes into `target` (a filename qemu opens: an
/// `iscsi://` URL or a `json:` spec), then `qemu-img dd` 1 MiB back; both must be equal.
fn qemu_round_trip_1mib(target: &str, seed: u64) -> Result<()> {
    let work = Scratch::new()?;
    let source = work.path().join("source.raw");
    let mut data = vec![0u8; MIB as usize];
    StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    fs::write(&source, &data)?;
    let out = run(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&source)
            .arg(target),
        CLIENT_TIMEOUT,
    )?;
    ensure!(out.success(), "qemu-img write to {target} failed:\n{}", out.combined());
    let back = work.path().join("back.raw");
    let out = run(
        Command::new("qemu-img")
            .args(["dd", "-f", "raw", "-O", "raw", "bs=1M", "count=1"])
            .arg(format!("if={target}"))
            .arg(format!("of={}", back.display())),
        CLIENT_TIMEOUT,
    )?;
    ensure!(out.success(), "qemu-img read from {target} failed:\n{}", out.combined());
    ensure!(
        sha256(&fs::read(&back)?) == sha256(&data),
        "1 MiB read back through {target} differs from the one written"
    );
    Ok(())
}

// --- 1. login timeout -----------------------------------------------------------------------------

/// RFC 7143 §6.3 leaves the login-phase timeout to the implementation; `login_timeout_ms` bounds
/// it: a connection that sends nothing is closed after about that time (not at once, not never).
#[test]
fn login_timeout_closes_silent_connection_raftsan() -> Result<()> {
    let daemon = Daemon::raftsan(
        &config_with_limits("login_timeout_ms = 500"),
        vec![Loopback::reserve()?],
    )?;
    let mut r = Raw::connect(daemon.portal())?;
    let started = Instant::now();
    ensure!(r.closed(), "a silent connection was not closed within the read timeout");
    let took = started.elapsed();
    ensure!(
        took > Duration::from_millis(400),
        "closed after {took:?}, before the 500 ms login timeout"
    );
    ensure!(
        took < Duration::from_secs(3),
        "closed only after {took:?} with a 500 ms login timeout"
    );
    // A connection that does log in within the time stays up past it.
    let mut ok = Raw::connect(daemon.portal())?;
    ok.login(INITIATOR, IQN)?;
    thread::sleep(Duration::from_millis(900));
    ok.ping()
        .context("a logged-in session was closed by the login timeout")?;
    daemon.stop()?;
    Ok(())
}

// --- 2. connections per portal ---------------------------------------------------------------------

/// `max_connections_per_portal`: with the limit's connections open, the next one is closed at
/// accept; once one closes, a new connection is served again (it logs in).
#[test]
fn max_connections_per_portal_closes_extra_connection_raftsan() -> Result<()> {
    let daemon = Daemon::raftsan(
        &config_with_limits("max_connections_per_portal = 2"),
        vec![Loopback::reserve()?],
    )?;
    let mut a = Raw::connect(daemon.portal())?;
    a.login(INITIATOR, IQN)?;
    // `b` logs in too (another ISID, so it does not reinstate `a`'s session): the login response
    // proves the daemon accepted it before the third connection arrives.
    let mut b = Raw::connect(daemon.portal())?;
    b.login_isid(INITIATOR, IQN, [0x40, 0, 0, 0, 0xcc, 2])?;
    let mut c = Raw::connect(daemon.portal())?;
    let started = Instant::now();
    ensure!(c.closed(), "a third connection beyond the limit of 2 stayed open");
    ensure!(
        started.elapsed() < Duration::from_secs(1),
        "the extra connection was closed only after {:?} (expected at accept)",
        started.elapsed()
    );
    a.ping().context("the first connection suffered from the refused one")?;
    b.ping()?;
    drop(b);
    // The slot is released once the daemon sees the close.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let mut d = Raw::connect(daemon.portal())?;
        match d.login_isid(INITIATOR, IQN, [0x40, 0, 0, 0, 0xcc, 4]) {
            Ok(()) => {
                d.ping()?;
                break;
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                thread::sleep(Duration::from_millis(100));
            }
            Err(e) => bail!("no connection slot freed after closing one: {e:#}"),
        }
    }
    daemon.stop()?;
    Ok(())
}

// --- 3. session limit ------------------------------------------------------------------------------

/// `max_sessions`: while one session is alive, a second login is refused with status class 3,
/// detail 02 "Out of resources" (RFC 7143 §11.13.5); once the first logs out, a login works again.
#[test]
fn max_sessions_refuses_second_login_out_of_resources_raftsan() -> Result<()> {
    let daemon = Daemon::raftsan(&config_with_limits("max_sessions = 1"), vec![Loopback::reserve()?])?;
    let mut first = Raw::connect(daemon.portal())?;
    first.login_isid(INITIATOR, IQN, [0x40, 0, 0, 0, 0, 1])?;
    first.ping()?;
    let mut second = Raw::connect(daemon.portal())?;
    let (r, _) = second.login_response(INITIATOR, IQN, [0x40, 0, 0, 0, 0, 2], &[])?;
    ensure!(
        (r.status_class, r.status_detail) == (0x03, 0x02),
        "expected login status 0302 (out of resources), got {:02x}{:02x}",
        r.status_class,
        r.status_detail
    );
    // A real client sees the same refusal (its discovery session is a session too).
    let ls = iscsi_ls(&[], &daemon.portal_url())?;
    ensure!(!ls.success(), "a second session was admitted:\n{}", ls.combined());
    ensure!(ls.combined().contains("Out of resources"), "{}", ls.combined());
    first.ping().context("the live session suffered from the refused one")?;
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let mut again = Raw::connect(daemon.portal())?;
        match again.login_isid(INITIATOR, IQN, [0x40, 0, 0, 0, 0, 3]) {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                thread::sleep(Duration::from_millis(100));
            }
            Err(e) => bail!("the session slot was not released: {e:#}"),
        }
    }
    daemon.stop()?;
    Ok(())
}

// --- 4. IPv6 ---------------------------------------------------------------------------------------

fn free_ipv6_loopback_port() -> Result<u16> {
    let listener = TcpListener::bind(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 0, 0, 0)).context(
        "cannot bind [::1]:0: IPv6 loopback is missing on this machine (check `ip -6 addr show lo`); \
         the IPv6 portal test needs it",
    )?;
    Ok(listener.local_addr()?.port())
}

/// RFC 7143 §13.9 TargetAddress with an IPv6 literal in brackets (RFC 3986 §3.2.2): a portal on
/// `[::1]` serves discovery, SendTargets reports the IPv6 portal, and qemu's driver moves data.
#[test]
fn ipv6_portal_discovery_and_qemu_round_trip_raftsan() -> Result<()> {
    let port = free_ipv6_loopback_port()?;
    let portal = SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::LOCALHOST, port, 0, 0));
    let listen = format!("[::1]:{port}");
    let daemon = Daemon::raftsan_with_args(&config_with_limits(""), Vec::new(), &["--listen", &listen], &[portal])?;
    let url = format!("iscsi://[::1]:{port}");
    let ls = iscsi_ls(&[], &url)?;
    ensure!(ls.success(), "IPv6 discovery failed:\n{}", ls.combined());
    ensure!(
        ls.stdout
            .lines()
            .any(|l| l.starts_with(&format!("Target:{IQN} Portal:[::1]:{port},"))),
        "target or its IPv6 portal missing:\n{}",
        ls.combined()
    );
    qemu_round_trip_1mib(&format!("iscsi://[::1]:{port}/{IQN}/1"), 0x1b6)?;
    daemon.stop()?;
    Ok(())
}

// --- 5. header digest ------------------------------------------------------------------------------

/// The sessions `raftsan show --json` reports (admin socket `<data_dir>/admin.sock`).
fn show_sessions(daemon: &Daemon) -> Result<Vec<serde_json::Value>> {
    let out = run(
        Command::new(raftsan_bin()?)
            .arg("show")
            .arg("--json")
            .arg("--admin-socket")
            .arg(daemon.dir().join("data/admin.sock")),
        CLIENT_TIMEOUT,
    )?;
    ensure!(out.success(), "raftsan show --json failed:\n{}", out.combined());
    let state: serde_json::Value = serde_json::from_str(&out.stdout).context("decoding raftsan show --json")?;
    Ok(state
        .get("sessions")
        .and_then(|s| s.as_array())
        .cloned()
        .unwrap_or_default())
}

/// RFC 7143 §13.1 HeaderDigest=CRC32C, §11.1 / Appendix B: a raw client negotiates CRC32C header
/// digests and then pings with digested PDUs (a wrong digest either way would break the
/// exchange), `raftsan show --json` reports `header_digest: true` for that session and false for a
/// session without; qemu's driver with `header-digest=crc32c` moves 1 MiB both ways.
#[test]
fn header_digest_crc32c_negotiated_and_reported_raftsan() -> Result<()> {
    let daemon = Daemon::raftsan(&config_with_limits(""), vec![Loopback::reserve()?])?;
    let digested_isid = [0x40, 0, 0, 0, 0xdd, 1];
    let mut r = Raw::connect(daemon.portal())?;
    let (resp, keys) = r.login_response(INITIATOR, IQN, digested_isid, &[("HeaderDigest", "CRC32C")])?;
    ensure!(
        resp.status_class == 0,
        "login with HeaderDigest=CRC32C refused: {resp:?}"
    );
    ensure!(
        keys.iter().any(|(k, v)| k == "HeaderDigest" && v == "CRC32C"),
        "target did not answer HeaderDigest=CRC32C: {keys:?}"
    );
    ensure!(r.digests.header && !r.digests.data, "{:?}", r.digests);
    r.ping()?;
    let mut plain = Raw::connect(daemon.portal())?;
    plain.login_isid(INITIATOR, IQN, [0x40, 0, 0, 0, 0xdd, 2])?;

    let sessions = show_sessions(&daemon)?;
    let by_isid = |isid: &str| {
        sessions
            .iter()
            .find(|s| s.get("isid").and_then(|v| v.as_str()) == Some(isid))
            .cloned()
            .with_context(|| format!("session {isid} missing from raftsan show --json: {sessions:?}"))
    };
    let digested = by_isid("40000000dd01")?;
    ensure!(
        digested.get("header_digest") == Some(&serde_json::Value::Bool(true)),
        "header_digest not reported true: {digested}"
    );
    let undigested = by_isid("40000000dd02")?;
    ensure!(
        undigested.get("header_digest") == Some(&serde_json::Value::Bool(false)),
        "header_digest not reported false: {undigested}"
    );
    r.ping()?;

    drop(r);
    drop(plain);

    // qemu's driver with header-digest=crc32c: observed mid-session (qemu-io sleeps between a
    // write and its read-back), then a full round trip. libiscsi quietly falls back to no digest
    // when a target rejects CRC32C, so only `show` proves the digest is really on.
    let spec = format!(
        r#"json:{{"driver":"raw","file":{{"driver":"iscsi","transport":"tcp","portal":"{}","target":"{IQN}","lun":1,"initiator-name":"{QEMU_INITIATOR}","header-digest":"crc32c"}}}}"#,
        daemon.portal()
    );
    let mut qemu = Command::new("qemu-io")
        .args([
            "-c",
            "write -P 0xd1 0 1M",
            "-c",
            "sleep 3000",
            "-c",
            "read -P 0xd1 0 1M",
        ])
        .arg(&spec)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning qemu-io")?;
    let deadline = Instant::now() + Duration::from_secs(3);
    let seen = loop {
        let sessions = show_sessions(&daemon)?;
        if let Some(s) = sessions
            .iter()
            .find(|s| s.get("initiator_name").and_then(|v| v.as_str()) == Some(QEMU_INITIATOR))
        {
            break Some(s.clone());
        }
        if Instant::now() > deadline {
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let finished = Instant::now() + CLIENT_TIMEOUT;
    while qemu.try_wait()?.is_none() && Instant::now() < finished {
        thread::sleep(Duration::from_millis(50));
    }
    if qemu.try_wait()?.is_none() {
        let _ = qemu.kill();
    }
    let out = qemu.wait_with_output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success() && !text.contains("failed") && text.contains("read 1048576/1048576"),
        "qemu-io with header-digest=crc32c failed:\n{text}"
    );
    let seen = seen.context("qemu-io's session never appeared in raftsan show --json")?;
    ensure!(
        seen.get("header_digest") == Some(&serde_json::Value::Bool(true)),
        "qemu asked for header-digest=crc32c but the session runs without: {seen}"
    );
    qemu_round_trip_1mib(&spec, 0xd1)?;
    daemon.stop()?;
    Ok(())
}

// --- 6. read-only LUN ------------------------------------------------------------------------------

fn sha256_file(path: &Path) -> Result<String> {
    Ok(sha256(
        &fs::read(path).with_context(|| format!("reading {}", path.display()))?,
    ))
}

/// SBC-3 §6.4.1 (WP bit of the mode parameter header; writes end in DATA PROTECT): a `readonly 1`
/// backing store reads normally, refuses writes (qemu refuses to open it writable or gets DATA
/// PROTECT), and the backing file is unchanged.
fn read_only_lun(kind: Kind) -> Result<()> {
    let iqn = "iqn.2026-11.org.raftsan.test:readonly";
    let scratch = Scratch::new()?;
    let backing = scratch.path().join("ro.img");
    let mut content = vec![0u8; 4 * MIB as usize];
    StdRng::seed_from_u64(0x0f0).fill_bytes(&mut content);
    fs::write(&backing, &content)?;
    let before = sha256_file(&backing)?;
    let conf = format!(
        "<target {iqn}>\n  <backing-store {}>\n    readonly 1\n  </backing-store>\n</target>\n",
        backing.display()
    );
    let listen = vec![Loopback::reserve()?];
    let daemon = match kind {
        Kind::Raftsan => Daemon::raftsan_in(scratch, &conf, listen)?,
        Kind::Tgtd => Daemon::tgtd_in(scratch, &conf, listen)?,
    };
    let url = daemon.lun_url(iqn, 1);
    let work = Scratch::new()?;
    let back = work.path().join("back.raw");
    let out = run(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(&url)
            .arg(&back),
        CLIENT_TIMEOUT,
    )?;
    ensure!(out.success(), "reading the read-only LUN failed:\n{}", out.combined());
    ensure!(
        sha256_file(&back)? == before,
        "read-only LUN read back differs from its backing file"
    );

    let source = work.path().join("source.raw");
    fs::write(&source, vec![0x5au8; MIB as usize])?;
    let write = run(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&source)
            .arg(&url),
        CLIENT_TIMEOUT,
    )?;
    ensure!(
        !write.success(),
        "a write to a read-only LUN succeeded:\n{}",
        write.combined()
    );
    let io = run(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x77 0 64k"])
            .arg(&url),
        CLIENT_TIMEOUT,
    )?;
    ensure!(
        !io.success() || io.combined().contains("failed"),
        "qemu-io wrote to a read-only LUN:\n{}",
        io.combined()
    );
    // (The scratch dir, and so the backing file, goes with the daemon: check it first.)
    ensure!(
        sha256_file(&backing)? == before,
        "the read-only LUN's backing file changed"
    );
    daemon.stop()?;
    Ok(())
}

#[test]
fn read_only_lun_reads_refuses_writes_raftsan() -> Result<()> {
    read_only_lun(Kind::Raftsan)
}

#[test]
fn read_only_lun_reads_refuses_writes_tgtd() -> Result<()> {
    read_only_lun(Kind::Tgtd)
}

// --- 7. several LUNs, several targets --------------------------------------------------------------

/// SPC-4 §6.6.1 / SAM-5 §4.7: each target reports LUN 0 (the storage-array controller, as tgt)
/// and its backing stores as LUN 1..n with their sizes (SBC-3 §5.16 READ CAPACITY); SendTargets
/// (RFC 7143 §12.3) lists both targets.
fn several_luns_and_targets(kind: Kind) -> Result<()> {
    let t1 = "iqn.2026-11.org.raftsan.test:multi-one";
    let t2 = "iqn.2026-11.org.raftsan.test:multi-two";
    let scratch = Scratch::new()?;
    // tgt-admin numbers a target's backing stores in path order: a → LUN 1, b → 2, c → 3.
    let a = scratch.sparse_file("t1-a.img", 16 * MIB)?;
    let b = scratch.sparse_file("t1-b.img", 32 * MIB)?;
    let c = scratch.sparse_file("t1-c.img", 48 * MIB)?;
    let d = scratch.sparse_file("t2-a.img", 80 * MIB)?;
    let conf = format!(
        "<target {t1}>\n  backing-store {}\n  backing-store {}\n  backing-store {}\n</target>\n\
         <target {t2}>\n  backing-store {}\n</target>\n",
        c.display(),
        a.display(),
        b.display(),
        d.display()
    );
    let listen = vec![Loopback::reserve()?];
    let daemon = match kind {
        Kind::Raftsan => Daemon::raftsan_in(scratch, &conf, listen)?,
        Kind::Tgtd => Daemon::tgtd_in(scratch, &conf, listen)?,
    };
    let ls = iscsi_ls(&["-s"], &daemon.portal_url())?;
    ensure!(ls.success(), "{}", ls.combined());
    let text = &ls.stdout;
    // iscsi-ls -s prints, per target, "Target:… Portal:…" then one "Lun:N    Type:… (Size:…)"
    // line per LUN (size in MiB of the last LBA's byte address, hence one less than the size).
    let section = |iqn: &str| -> Result<Vec<String>> {
        let mut lines = text.lines().skip_while(|l| !l.starts_with(&format!("Target:{iqn} ")));
        lines.next().with_context(|| format!("target {iqn} missing:\n{text}"))?;
        Ok(lines
            .take_while(|l| !l.starts_with("Target:"))
            .filter(|l| l.trim_start().starts_with("Lun:"))
            .map(|l| l.trim().to_owned())
            .collect())
    };
    let one = section(t1)?;
    let two = section(t2)?;
    let expect = |luns: &[String], want: &[(u32, &str)]| -> Result<()> {
        ensure!(luns.len() == want.len(), "expected LUNs {want:?}, got {luns:?}\n{text}");
        for (line, (lun, what)) in luns.iter().zip(want) {
            ensure!(
                line.starts_with(&format!("Lun:{lun} ")) && line.contains(what),
                "expected LUN {lun} with {what}, got {line:?}\n{text}"
            );
        }
        Ok(())
    };
    expect(
        &one,
        &[
            (0, "Type:STORAGE_ARRAY_CONTROLLER"),
            (1, "Type:DIRECT_ACCESS (Size:15M)"),
            (2, "Type:DIRECT_ACCESS (Size:31M)"),
            (3, "Type:DIRECT_ACCESS (Size:47M)"),
        ],
    )?;
    expect(
        &two,
        &[
            (0, "Type:STORAGE_ARRAY_CONTROLLER"),
            (1, "Type:DIRECT_ACCESS (Size:79M)"),
        ],
    )?;
    // And the exact capacity of one of them (SBC-3 §5.16).
    let cap = run(
        Command::new("iscsi-readcapacity16")
            .args(["-i", INITIATOR])
            .arg(daemon.lun_url(t1, 3)),
        CLIENT_TIMEOUT,
    )?;
    ensure!(
        cap.stdout.contains(&format!("Total size:{}\n", 48 * MIB)),
        "{}",
        cap.combined()
    );
    daemon.stop()?;
    Ok(())
}

#[test]
fn several_luns_and_targets_listed_with_sizes_raftsan() -> Result<()> {
    several_luns_and_targets(Kind::Raftsan)
}

#[test]
fn several_luns_and_targets_listed_with_sizes_tgtd() -> Result<()> {
    several_luns_and_targets(Kind::Tgtd)
}
