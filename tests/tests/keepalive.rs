//! Target-initiated NOP-In pings (RFC 7143 §11.19, §6.1): an initiator that answers stays
//! connected; one that stays silent past `nop_in_timeout_ms` is disconnected, so a dead
//! initiator's session does not hold its reservations and buffers forever.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use raftsan_proto::pdu::{NopIn, NopOut, Opcode, RESERVED_TAG};
use raftsan_tests::raw::Raw;
use raftsan_tests::{Daemon, Loopback};

const IQN: &str = "iqn.2026-11.org.raftsan.test:keepalive";
const INITIATOR: &str = "iqn.2026-11.org.raftsan.test:keepalive-initiator";

fn daemon() -> Result<Daemon> {
    let config = format!(
        r#"[limits]
nop_in_interval_ms = 200
nop_in_timeout_ms = 800

[[target]]
name = "{IQN}"

[[target.lun]]
lun = 1
memory_size = "4M"
"#
    );
    Daemon::raftsan(&config, vec![Loopback::reserve()?])
}

/// A NOP-In ping from the target: ITT reserved, TTT not (§11.19.1.2).
fn is_ping(p: &raftsan_proto::pdu::Pdu) -> Option<u32> {
    if p.bhs.opcode() != Opcode::NopIn {
        return None;
    }
    let n = NopIn::parse(&p.bhs);
    (n.itt == RESERVED_TAG && n.ttt != RESERVED_TAG).then_some(n.ttt)
}

#[test]
fn answering_initiator_stays_silent_one_is_dropped() -> Result<()> {
    let d = daemon()?;

    // Answers every ping, on its own thread, for the whole test (≥ 4 s, 20 ping intervals).
    let mut good = Raw::connect(d.portal())?;
    good.login(INITIATOR, IQN)?;
    let answering = std::thread::spawn(move || -> Result<u32> {
        let until = Instant::now() + Duration::from_secs(4);
        let mut answered = 0;
        while Instant::now() < until {
            let p = good
                .recv()?
                .context("target closed a connection that answers its pings")?;
            if let Some(ttt) = is_ping(&p) {
                let answer = NopOut {
                    immediate: true,
                    lun: 0,
                    itt: RESERVED_TAG,
                    ttt,
                    cmdsn: good.cmdsn,
                    exp_statsn: 0,
                };
                good.send(answer.to_bhs(), &[])?;
                answered += 1;
            }
        }
        good.ping()?;
        Ok(answered)
    });

    // Never answers: the target gives up after the timeout (800 ms, checked each interval).
    let mut silent = Raw::connect(d.portal())?;
    silent.login("iqn.2026-11.org.raftsan.test:silent", IQN)?;
    let start = Instant::now();
    let mut pinged = false;
    let closed_after = loop {
        match silent.recv() {
            Ok(Some(p)) => pinged |= is_ping(&p).is_some(),
            Ok(None) => break start.elapsed(),
            Err(e) => return Err(e.context("the silent initiator's connection was neither pinged nor closed in time")),
        }
    };
    ensure!(
        pinged,
        "the target closed the silent connection without pinging it first"
    );
    ensure!(
        closed_after >= Duration::from_millis(700) && closed_after < Duration::from_secs(4),
        "silent connection closed after {closed_after:?}, expected about 1 s"
    );
    let answered = answering
        .join()
        .map_err(|_| anyhow::anyhow!("answering thread panicked"))??;
    ensure!(answered >= 8, "only {answered} pings in 4 s with a 200 ms interval");
    d.stop()?;
    Ok(())
}
