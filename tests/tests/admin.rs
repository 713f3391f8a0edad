//! `raftsan show` and `/metrics` against a running daemon: the admin view lists targets, LUNs,
//! live I_T nexuses and ACLs without secrets, and the I/O path's counters move with real I/O.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use raftsan_tests::raw::Raw;
use raftsan_tests::{CLIENT_TIMEOUT, Daemon, Loopback, raftsan_bin, run};

const IQN: &str = "iqn.2026-11.org.raftsan.test:admin";
const INITIATOR: &str = "iqn.2026-11.org.raftsan.test:admin-initiator";
const METRICS_PORT: u16 = 9860;

fn config(ip: std::net::Ipv4Addr) -> String {
    format!(
        r#"[node]
metrics = "{ip}:{METRICS_PORT}"

[[target]]
name = "{IQN}"
incoming_users = [{{ user = "adminuser", secret = "Sup3rSecret99" }}]
initiator_names = ["{INITIATOR}", "iqn.2008-11.org.linux-kvm"]

[[target.lun]]
lun = 1
memory_size = "16M"
"#
    )
}

/// Plain HTTP/1.0 GET of `/metrics` (no client library needed for one request).
fn scrape(ip: std::net::Ipv4Addr) -> Result<String> {
    let mut s = TcpStream::connect((ip, METRICS_PORT)).context("connecting to the metrics listener")?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: raftsan\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

/// The value of the first sample whose line starts with `prefix` and contains every `labels`.
fn sample(text: &str, prefix: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(prefix) && labels.iter().all(|x| l.contains(x)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn show_lists_sessions_and_metrics_follow_io() -> Result<()> {
    let lo = Loopback::reserve()?;
    let ip = lo.ip();
    let d = Daemon::raftsan(&config(ip), vec![lo])?;

    // A live session for `show` to list (CHAP is required by the target: log in with it).
    let mut r = Raw::connect(d.portal())?;
    r.login_chap(INITIATOR, IQN, "adminuser", "Sup3rSecret99")?;
    r.clear_unit_attention()?;

    // Real I/O through a real client: 4 MiB in with qemu-img.
    let src = d.dir().join("in.raw");
    std::fs::write(&src, vec![0xa5u8; 4 << 20])?;
    let url = format!("iscsi://adminuser%Sup3rSecret99@{}/{IQN}/1", d.portal());
    let out = run(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&url),
        CLIENT_TIMEOUT,
    )?;
    ensure!(out.success(), "qemu-img convert failed: {}", out.combined());

    let show = run(
        Command::new(raftsan_bin()?)
            .arg("show")
            .arg("--admin-socket")
            .arg(d.dir().join("data/admin.sock")),
        CLIENT_TIMEOUT,
    )?;
    ensure!(show.success(), "raftsan show failed: {}", show.combined());
    let text = show.combined();
    assert!(text.contains(&format!("Target 1: {IQN}")), "{text}");
    assert!(
        text.contains(&format!("Initiator: {INITIATOR}")),
        "live nexus missing:\n{text}"
    );
    assert!(text.contains("CHAP account: adminuser"), "{text}");
    assert!(text.contains("LUN: 1"), "{text}");
    assert!(text.contains("size_bytes: 16777216"), "{text}");
    assert!(text.contains(INITIATOR) && text.contains("adminuser"), "{text}");
    assert!(
        !text.contains("Sup3rSecret99"),
        "raftsan show printed a CHAP secret:\n{text}"
    );

    let m = scrape(ip)?;
    let lun = "lun=\"1\"".to_string();
    let writes = sample(&m, "raftsan_scsi_commands_total{", &[&lun, "op=\"write\""]).context("no write counter")?;
    assert!(writes >= 1.0, "write counter did not move:\n{m}");
    let bytes = sample(&m, "raftsan_scsi_bytes_total{", &[&lun, "direction=\"write\""]).context("no write bytes")?;
    assert!(bytes >= f64::from(4u32 << 20), "wrote 4 MiB, counter says {bytes}");
    let logins = sample(&m, "raftsan_iscsi_logins_total{", &["outcome=\"ok\""]).context("no login counter")?;
    assert!(logins >= 2.0, "{m}");
    assert!(
        m.contains("raftsan_scsi_command_duration_seconds_bucket{"),
        "no latency histogram:\n{m}"
    );
    assert_eq!(sample(&m, "raftsan_up", &[]), Some(1.0));
    assert!(!m.contains("Sup3rSecret99"));
    r.ping()?;
    drop(r);
    d.stop()?;
    Ok(())
}

/// The README's run command: `raftsan demo` starts three real nodes, forms the cluster with a
/// replicated volume, and its own client check passes (iscsi-ls discovery through node 2, which
/// lists every node's portal; 16 MiB written by qemu-img through node 1 and read back identical
/// through nodes 2 and 3).
#[test]
fn demo_starts_a_three_node_cluster_and_its_client_check_passes() -> Result<()> {
    let lo = Loopback::reserve_consecutive(3)?;
    let dir = tempfile::tempdir()?;
    let out = run(
        Command::new(raftsan_bin()?)
            .args(["demo", "--check-only", "--size", "64M", "--first-address"])
            .arg(lo[0].ip().to_string())
            .arg("--dir")
            .arg(dir.path()),
        CLIENT_TIMEOUT * 3,
    )?;
    let text = out.combined();
    ensure!(out.success(), "raftsan demo failed:\n{text}");
    assert!(text.contains("client check: OK"), "{text}");
    for (i, l) in lo.iter().enumerate() {
        assert!(
            text.contains(&format!("Portal:{}:3260,{}", l.ip(), i + 1)),
            "SendTargets through node 2 does not list node {}'s portal:\n{text}",
            i + 1
        );
    }
    assert!(
        text.contains("read it back through node 3") && text.contains("identical"),
        "{text}"
    );
    assert!(!text.contains("panicked"), "{text}");
    for n in 1..=3 {
        let log = std::fs::read_to_string(dir.path().join(format!("node{n}/raftsan.log")))?;
        assert!(!log.contains("panicked"), "node {n} panicked:\n{log}");
    }
    drop(lo);
    Ok(())
}
