//! The path faults against the real kernel (needs root; skipped otherwise): a delay slows the
//! round trips of one portal path and no other address's, a heal removes every rule, and a full
//! loss cuts the path.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use raftsan_chaos::netem::{self, NetFault};
use raftsan_tests::Loopback;

/// An echo server on `lo`'s portal port; returns the median round trip of 10 one-byte pings.
fn median_rtt(lo: &Loopback) -> Duration {
    let l = TcpListener::bind(lo.portal()).expect("bind");
    let srv = thread::spawn(move || {
        if let Ok((mut s, _)) = l.accept() {
            let mut b = [0u8; 1];
            while s.read_exact(&mut b).is_ok() && s.write_all(&b).is_ok() {}
        }
    });
    let mut c = TcpStream::connect_timeout(&lo.portal().into(), Duration::from_secs(10)).expect("connect");
    c.set_nodelay(true).expect("nodelay");
    let mut rtts = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        c.write_all(&[7]).expect("write");
        let mut b = [0u8; 1];
        c.read_exact(&mut b).expect("read");
        rtts.push(t.elapsed());
    }
    drop(c);
    let _ = srv.join();
    rtts.sort();
    rtts[5]
}

fn rules_mentioning(ip: &str) -> usize {
    let out = Command::new("iptables").args(["-w", "-S"]).output().expect("iptables");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(ip))
        .count()
}

#[test]
fn delay_hits_one_path_only_and_heals() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root (iptables, tc)");
        return;
    }
    let victim = Loopback::reserve().expect("loopback");
    let other = Loopback::reserve().expect("loopback");
    let before = median_rtt(&victim);
    let d = netem::degrade_portal(
        victim.ip(),
        NetFault::Delay {
            delay_ms: 100,
            jitter_ms: 0,
        },
    )
    .expect("degrade");
    let slow = median_rtt(&victim);
    let untouched = median_rtt(&other);
    drop(d);
    let after = median_rtt(&victim);
    assert!(
        slow >= Duration::from_millis(190),
        "delayed round trip {slow:?} (before {before:?})"
    );
    assert!(
        untouched < Duration::from_millis(50),
        "another address was slowed: {untouched:?}"
    );
    assert!(after < Duration::from_millis(50), "not healed: {after:?}");
    assert_eq!(rules_mentioning(&victim.ip().to_string()), 0, "rules left behind");
}

#[test]
fn full_loss_cuts_the_path_and_heals() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root (iptables, tc)");
        return;
    }
    let victim = Loopback::reserve().expect("loopback");
    let _l = TcpListener::bind(victim.portal()).expect("bind");
    let d = netem::degrade_portal(victim.ip(), NetFault::Loss { percent: 100.0 }).expect("degrade");
    let r = TcpStream::connect_timeout(&victim.portal().into(), Duration::from_millis(500));
    assert!(r.is_err(), "a fully lossy path accepted a connection");
    drop(d);
    TcpStream::connect_timeout(&victim.portal().into(), Duration::from_secs(5)).expect("healed path");
    assert_eq!(rules_mentioning(&victim.ip().to_string()), 0, "rules left behind");
}
