//! `raftsan-initiator` against a three-node cluster: while fio writes and verifies (crc32c)
//! through the NBD export, the node leading the volume is killed (SIGKILL), hung (SIGSTOP, then
//! SIGCONT) or cut off from the client (an iptables rule drops its portal's packets). fio must see
//! no error and its verification must pass; the longest write latency (the client-visible stall)
//! is printed.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use raftsan_tests::Scratch;
use raftsan_tests::cluster::Cluster;
use raftsan_tests::initiator::{self, Attach, FioRun, fio_ios, fio_max_write_latency};

const INITIATOR: &str = "iqn.2026-11.org.raftsan.test:failover-client";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Kill,
    Stop,
    Firewall,
}

fn failover(fault: Fault) -> Result<()> {
    let mut c = Cluster::start(3)?;
    let (group, target, lun) = c.create_volume("failover", "128M")?;
    let leader = c.settled_leader(group, Duration::from_secs(7))?;
    let portals: Vec<String> = (1..=3)
        .map(|id| Ok(c.node(id)?.portal().to_string()))
        .collect::<Result<_>>()?;

    let scratch = Scratch::new()?;
    let dir = scratch.path();
    let cfg = initiator::write_config(
        dir,
        INITIATOR,
        "[timeouts]\nnoop_interval = \"500ms\"\nnoop_timeout = \"1s\"\ncommand = \"5s\"\nno_path_retry = \"30s\"",
    )?;
    let lun = lun.to_string();
    let attach = Attach::start(
        dir,
        &cfg,
        &target,
        &portals[..1],
        &["--lun", &lun],
        Duration::from_secs(30),
    )?;
    // SendTargets through the first portal adds the other two.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = attach.session()?;
        let up = s["device"]["paths"]
            .as_array()
            .map(|p| p.iter().filter(|p| p["status"] == "up").count());
        if up == Some(3) {
            let optimized: Vec<_> = s["device"]["paths"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["alua"] == "active/optimized")
                .map(|p| p["portal"].as_str().unwrap_or("").to_string())
                .collect();
            ensure!(
                optimized == vec![c.node(leader)?.portal().to_string()],
                "the optimized path should be the leader's portal only: {s}"
            );
            break;
        }
        ensure!(Instant::now() < deadline, "three paths not up: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }

    let fio = FioRun::start(&attach.uri(), dir, "48M", 16, 8)?;
    std::thread::sleep(Duration::from_secs(4));
    let leader_ip = c.node(leader)?.portal().ip().to_string();
    let injected = Instant::now();
    let firewall = match fault {
        Fault::Kill => {
            c.signal(leader, libc::SIGKILL)?;
            None
        }
        Fault::Stop => {
            c.signal(leader, libc::SIGSTOP)?;
            None
        }
        Fault::Firewall => Some(raftsan_tests::Iptables::insert(&[&[
            "INPUT", "-d", &leader_ip, "-p", "tcp", "--dport", "3260", "-j", "DROP",
        ]])?),
    };
    // Hold the fault for 6 s, then heal (a stopped node resumes believing it leads).
    std::thread::sleep(Duration::from_secs(6));
    match fault {
        Fault::Stop => c.signal(leader, libc::SIGCONT)?,
        Fault::Firewall => drop(firewall),
        Fault::Kill => {}
    }
    let v = fio
        .finish(Duration::from_secs(90))
        .with_context(|| format!("fio under {fault:?}"))?;
    let (writes, reads) = fio_ios(&v);
    let stall = fio_max_write_latency(&v);
    let s = attach.session()?;
    println!(
        "FAILOVER {fault:?}: leader node {leader} ({leader_ip}), fault 4 s into fio; longest write stall {:.0} ms; \
         {writes} writes, {reads} verify reads; initiator failovers {}, retried commands {}",
        stall.as_secs_f64() * 1000.0,
        s["device"]["failovers"],
        s["device"]["retried_commands"],
    );
    ensure!(
        writes > 500 && reads > 0,
        "fio did too little: {writes} writes, {reads} reads"
    );
    ensure!(injected.elapsed() > Duration::from_secs(6));
    ensure!(
        s["device"]["failovers"].as_u64().unwrap_or(0) >= 1,
        "no failover recorded: {s}"
    );
    // The cluster keeps a leader and the images converge once the fault is healed.
    if fault == Fault::Kill {
        c.spawn(leader)?;
    }
    let mut attach = attach;
    attach.stop()?;
    Ok(())
}

#[test]
fn fio_verifies_through_kill_of_the_leader() -> Result<()> {
    failover(Fault::Kill)
}

#[test]
fn fio_verifies_through_a_hung_leader() -> Result<()> {
    failover(Fault::Stop)
}

#[test]
fn fio_verifies_through_a_firewalled_leader_portal() -> Result<()> {
    failover(Fault::Firewall)
}
