//! Every metric name the dashboards and alert rules use is exported, with its type, by a real
//! `raftsan` (standalone and cluster node) and a real `raftsan-initiator attach`, and the text
//! passes `promtool check metrics` (Prometheus's lint: HELP text, `_total` on counters, base
//! units) when promtool is installed (Debian package `prometheus`, scripts/install-deps.sh).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use raftsan_tests::cluster::Cluster;
use raftsan_tests::initiator::{self, Attach};
use raftsan_tests::{CLIENT_TIMEOUT, Daemon, Kind, Loopback, Scratch, run, start_single_target};

const MIB: u64 = 1 << 20;

/// The I/O-path names every node exports (standalone and cluster).
const NODE: &[(&str, &str)] = &[
    ("raftsan_up", "gauge"),
    ("raftsan_build_info", "gauge"),
    ("raftsan_scsi_command_duration_seconds", "histogram"),
    ("raftsan_scsi_commands_total", "counter"),
    ("raftsan_scsi_bytes_total", "counter"),
    ("raftsan_scsi_commands_in_flight", "gauge"),
    ("raftsan_scsi_check_conditions_total", "counter"),
    ("raftsan_iscsi_sessions", "gauge"),
    ("raftsan_iscsi_logins_total", "counter"),
    ("raftsan_iscsi_connections_refused_total", "counter"),
    ("raftsan_iscsi_protocol_errors_total", "counter"),
    ("raftsan_storage_errors_total", "counter"),
];

/// The names a cluster node adds.
const RAFT: &[(&str, &str)] = &[
    ("raftsan_raft_term", "gauge"),
    ("raftsan_raft_is_leader", "gauge"),
    ("raftsan_raft_commit_index", "gauge"),
    ("raftsan_raft_applied_index", "gauge"),
    ("raftsan_raft_follower_lag_entries", "gauge"),
    ("raftsan_raft_follower_lag_bytes", "gauge"),
    ("raftsan_raft_leader_changes_total", "counter"),
    ("raftsan_raft_elections_total", "counter"),
    ("raftsan_raft_snapshot_transfers_total", "counter"),
    ("raftsan_raft_snapshot_bytes_total", "counter"),
    ("raftsan_alua_state", "gauge"),
    ("raftsan_volume_write_entries_total", "counter"),
    ("raftsan_volume_coalesced_writes_total", "counter"),
];

const INITIATOR: &[(&str, &str)] = &[
    ("raftsan_initiator_up", "gauge"),
    ("raftsan_initiator_build_info", "gauge"),
    ("raftsan_initiator_path_up", "gauge"),
    ("raftsan_initiator_path_alua_state", "gauge"),
    ("raftsan_initiator_usable_paths", "gauge"),
    ("raftsan_initiator_failovers_total", "counter"),
    ("raftsan_initiator_retried_commands_total", "counter"),
    ("raftsan_initiator_queued_commands", "gauge"),
    ("raftsan_initiator_failover_stall_seconds", "histogram"),
    ("raftsan_initiator_nbd_requests_total", "counter"),
    ("raftsan_initiator_nbd_request_duration_seconds", "histogram"),
    ("raftsan_initiator_nbd_errors_total", "counter"),
];

/// Plain HTTP/1.0 GET of `/metrics`; the body.
fn scrape(addr: &str) -> Result<String> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to the metrics listener {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: raftsan\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or(&text);
    Ok(body.to_string())
}

/// Scrapes until `ok` holds (series sampled once a second appear after the first sample).
fn scrape_until(addr: &str, within: Duration, ok: impl Fn(&str) -> bool) -> Result<String> {
    let deadline = Instant::now() + within;
    loop {
        let text = scrape(addr)?;
        if ok(&text) || Instant::now() > deadline {
            return Ok(text);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every `(name, type)` has its `# TYPE` line and at least one sample.
fn check_names(text: &str, names: &[(&str, &str)]) -> Result<()> {
    let mut missing = Vec::new();
    for (name, kind) in names {
        let type_line = format!("# TYPE {name} {kind}");
        let sample = if *kind == "histogram" {
            format!("{name}_bucket")
        } else {
            name.to_string()
        };
        // The name exactly: followed by its labels or its value, not by a longer name.
        let has_sample = text
            .lines()
            .any(|l| l.strip_prefix(&sample).is_some_and(|rest| rest.starts_with(['{', ' '])));
        if !text.lines().any(|l| l == type_line) || !has_sample {
            missing.push(format!("{name} ({kind})"));
        }
    }
    ensure!(
        missing.is_empty(),
        "missing or mistyped: {}\n{text}",
        missing.join(", ")
    );
    Ok(())
}

/// Whether a sample of `name` carries every label in `labels` (`key="value"`).
fn has_series(text: &str, name: &str, labels: &[&str]) -> bool {
    text.lines()
        .any(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{')) && labels.iter().all(|x| l.contains(x)))
}

/// `promtool check metrics` on `text`, when promtool is installed.
fn promtool_check(text: &str) -> Result<()> {
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        eprintln!("promtool not installed: skipping `promtool check metrics`");
        return Ok(());
    };
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The label sets known up front are exported at 0 from the start.
fn check_zero_series(text: &str) -> Result<()> {
    for outcome in ["ok", "auth_failure", "acl_denied", "protocol_error"] {
        ensure!(
            has_series(text, "raftsan_iscsi_logins_total", &[&format!("outcome=\"{outcome}\"")]),
            "no login series for outcome {outcome}:\n{text}"
        );
    }
    ensure!(
        !text.contains("outcome=\"not_found\""),
        "a fifth login outcome:\n{text}"
    );
    for op in ["read", "write", "flush"] {
        ensure!(
            has_series(text, "raftsan_storage_errors_total", &[&format!("op=\"{op}\"")]),
            "no storage error series for {op}:\n{text}"
        );
    }
    for key in [
        "not_ready",
        "medium_error",
        "hardware_error",
        "illegal_request",
        "unit_attention",
        "data_protect",
        "aborted_command",
        "miscompare",
        "other",
    ] {
        ensure!(
            has_series(
                text,
                "raftsan_scsi_check_conditions_total",
                &[&format!("sense_key=\"{key}\"")]
            ),
            "no check condition series for {key}:\n{text}"
        );
    }
    Ok(())
}

fn write_through_qemu(url: &str, dir: &std::path::Path) -> Result<()> {
    let src = dir.join("in.raw");
    std::fs::write(&src, vec![0x5au8; MIB as usize])?;
    let out = run(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(url),
        CLIENT_TIMEOUT,
    )?;
    ensure!(out.success(), "qemu-img convert to {url} failed: {}", out.combined());
    Ok(())
}

#[test]
fn standalone_node_exports_every_name() -> Result<()> {
    let lo = Loopback::reserve()?;
    let ip = lo.ip();
    let conf = format!(
        "[node]\nmetrics = \"{ip}:9860\"\n\n[[target]]\nname = \"iqn.2026-11.org.raftsan.test:names\"\n\n[[target.lun]]\nlun = 1\nmemory_size = \"16M\"\n"
    );
    let d = Daemon::raftsan(&conf, vec![lo])?;
    let addr = format!("{ip}:9860");
    // Zero series before any session or I/O.
    let before = scrape(&addr)?;
    check_zero_series(&before)?;

    let url = format!("iscsi://{}/iqn.2026-11.org.raftsan.test:names/1", d.portal());
    write_through_qemu(&url, d.dir())?;
    let text = scrape(&addr)?;
    check_names(&text, NODE)?;
    check_zero_series(&text)?;
    ensure!(
        has_series(&text, "raftsan_scsi_commands_total", &["lun=\"1\"", "op=\"write\""]),
        "{text}"
    );
    promtool_check(&text)?;
    d.stop()?;
    Ok(())
}

#[test]
fn cluster_node_exports_raft_names() -> Result<()> {
    let mut c = Cluster::start(2)?;
    let (_vol, target, lun) = c.create_volume("names", "16M")?;
    let n1 = c.node(1)?;
    let url = format!("iscsi://{}/{target}/{lun}", n1.portal());
    let scratch = Scratch::new()?;
    // The leader may be on either node; a write through node 1 goes to it either way.
    write_through_qemu(&url, scratch.path())?;
    let mut missing = Vec::new();
    for id in [1, 2] {
        let n = c.node(id)?;
        let addr = format!("{}:{}", n.ip, raftsan_tests::cluster::METRICS_PORT);
        // The sampler runs once a second: wait until it has seen the volume's group (and, on
        // its leader, the follower).
        let text = scrape_until(&addr, Duration::from_secs(10), |t| {
            t.contains("raftsan_alua_state{volume=\"names\"}")
                && t.contains("raftsan_raft_snapshot_transfers_total{group=\"names\"")
                && (t.contains("raftsan_raft_follower_lag_bytes{group=\"names\"")
                    || !t.contains("raftsan_raft_is_leader{group=\"names\"} 1"))
        })?;
        check_names(&text, NODE)?;
        check_zero_series(&text)?;
        let leads = has_series(&text, "raftsan_raft_is_leader", &["group=\"names\""])
            && text.lines().any(|l| l == "raftsan_raft_is_leader{group=\"names\"} 1");
        let wanted: Vec<_> = RAFT
            .iter()
            .copied()
            .filter(|(n, _)| leads || !n.starts_with("raftsan_raft_follower_lag"))
            .collect();
        if let Err(e) = check_names(&text, &wanted) {
            missing.push(format!("node {id}: {e}"));
        }
        for dir in ["sent", "received"] {
            ensure!(
                has_series(
                    &text,
                    "raftsan_raft_snapshot_transfers_total",
                    &["group=\"names\"", &format!("direction=\"{dir}\"")]
                ),
                "no snapshot series {dir} on node {id}:\n{text}"
            );
        }
        ensure!(has_series(&text, "raftsan_alua_state", &["volume=\"names\""]), "{text}");
        promtool_check(&text)?;
    }
    if !missing.is_empty() {
        bail!("{}", missing.join("\n"));
    }
    Ok(())
}

#[test]
fn initiator_exports_every_name_after_nbd_io() -> Result<()> {
    let iqn = "iqn.2026-11.org.raftsan.test:names-initiator";
    let (daemon, _) = start_single_target(Kind::Raftsan, iqn, 32 * MIB, &[])?;
    let portal = daemon.portal().to_string();
    // The target's reserved loopback address is ours for the test: the exporter listens there.
    let addr = format!("{}:9701", daemon.portal().ip());
    let scratch = Scratch::new()?;
    let dir = scratch.path();
    let cfg = initiator::write_config(
        dir,
        "iqn.2026-11.org.raftsan.test:names-client",
        &format!("[metrics]\nlisten = \"{addr}\""),
    )?;
    let mut attach = Attach::start(
        dir,
        &cfg,
        iqn,
        std::slice::from_ref(&portal),
        &["--lun", "1"],
        Duration::from_secs(30),
    )?;
    // Reads, writes and a flush through the NBD export.
    let src = dir.join("src.img");
    std::fs::write(&src, vec![0xc3u8; (4 * MIB) as usize])?;
    let uri = attach.uri();
    let out = run(
        Command::new("nbdcopy").args([src.to_str().unwrap_or_default(), &uri]),
        CLIENT_TIMEOUT,
    )?;
    ensure!(out.success(), "nbdcopy in failed:\n{}", out.combined());
    let back = dir.join("back.img");
    let out = run(
        Command::new("nbdcopy").args([&uri, back.to_str().unwrap_or_default()]),
        CLIENT_TIMEOUT,
    )?;
    ensure!(out.success(), "nbdcopy out failed:\n{}", out.combined());

    // Path gauges are sampled once a second.
    let text = scrape_until(&addr, Duration::from_secs(5), |t| {
        t.lines()
            .any(|l| l.starts_with("raftsan_initiator_path_up{") && l.ends_with(" 1"))
    })?;
    check_names(&text, INITIATOR)?;
    for op in ["read", "write", "flush", "trim", "write_zeroes"] {
        ensure!(
            has_series(
                &text,
                "raftsan_initiator_nbd_requests_total",
                &[&format!("op=\"{op}\"")]
            ),
            "no NBD series for {op}:\n{text}"
        );
    }
    ensure!(
        text.lines()
            .any(|l| l.starts_with("raftsan_initiator_path_up{") && l.contains(&portal) && l.ends_with(" 1")),
        "path through {portal} not up:\n{text}"
    );
    ensure!(
        text.lines()
            .any(|l| l.starts_with("raftsan_initiator_path_alua_state{") && l.ends_with(" 0")),
        "no active/optimized path:\n{text}"
    );
    promtool_check(&text)?;
    attach.stop()?;
    drop(daemon);
    Ok(())
}
