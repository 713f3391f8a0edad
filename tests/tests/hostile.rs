//! Hostile input against the real daemon (DESIGN.md invariant 5: no bytes from the network crash
//! a process; invariant 6: everything bounded). Fault model: one misbehaving initiator sends
//! garbage, truncated, oversized or nonsensical PDUs, before and after login. Expected: a Reject,
//! a CHECK CONDITION, a login failure status or a closed connection for that initiator; the
//! daemon keeps serving every other session, and its log shows no panic.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use raftsan_proto::pdu::{Bhs, DataOut, LoginResponse, Opcode, RESERVED_TAG, Reject, ScsiResponse};
use raftsan_tests::raw::Raw;
use raftsan_tests::{CLIENT_TIMEOUT, Daemon, Kind, run, start_single_target};

const IQN: &str = "iqn.2026-11.org.raftsan.test:hostile";
const INITIATOR: &str = "iqn.2026-11.org.raftsan.test:hostile-initiator";

fn start() -> Result<Daemon> {
    Ok(start_single_target(Kind::Raftsan, IQN, 64 << 20, &[])?.0)
}

/// A real client still gets through: the daemon serves everyone else.
fn real_client_works(d: &Daemon) -> Result<()> {
    let out = run(
        std::process::Command::new("iscsi-inq").arg(d.lun_url(IQN, 1)),
        CLIENT_TIMEOUT,
    )?;
    ensure!(
        out.success(),
        "iscsi-inq failed after hostile input: {}",
        out.combined()
    );
    Ok(())
}

/// RFC 7143 §7.8 / ERL 0: bytes that are not a PDU end that connection, nothing else.
#[test]
fn garbage_before_login_closes_only_that_connection() -> Result<()> {
    let d = start()?;
    let mut bystander = Raw::connect(d.portal())?;
    bystander.login(INITIATOR, IQN)?;
    for seed in 0..8u64 {
        let mut r = Raw::connect(d.portal())?;
        let junk = noise(4096, seed);
        let _ = r.s.write_all(&junk);
        assert!(
            r.closed(),
            "the target kept a connection that sent garbage (seed {seed})"
        );
    }
    // Half a header, then the peer goes away.
    let mut r = Raw::connect(d.portal())?;
    r.s.write_all(&[0x43, 0x87, 0, 0])?;
    drop(r);
    bystander.ping()?;
    real_client_works(&d)?;
    d.stop()?;
    Ok(())
}

/// Invariant 6: a declared data segment beyond the limit is refused before any allocation.
#[test]
fn oversized_data_segment_is_refused() -> Result<()> {
    let d = start()?;
    let mut r = Raw::connect(d.portal())?;
    let (bhs, _) = r.login_request(&[]);
    let mut raw = bhs.0;
    raw[5..8].copy_from_slice(&[0xff, 0xff, 0xff]); // 16 MiB - 1 of login text
    r.s.write_all(&raw)?;
    assert!(r.closed(), "the target waited for 16 MiB of login text");
    real_client_works(&d)?;
    d.stop()?;
    Ok(())
}

/// RFC 7143 §11.13.5: malformed login text is an initiator error (class 2), not a crash.
#[test]
fn malformed_login_text_gets_a_login_failure() -> Result<()> {
    let d = start()?;
    for text in [
        &b"no-equals-sign\0"[..],
        b"=empty-key\0",
        b"\xff\xfe=\x80\0",
        b"InitiatorName\0TargetName\0",
    ] {
        let mut r = Raw::connect(d.portal())?;
        let (bhs, data) = r.login_request(text);
        r.send(bhs, &data)?;
        let p = r.recv()?.context("no login response")?;
        let resp = LoginResponse::parse(&p.bhs);
        assert_eq!(resp.status_class, 2, "text {text:?} got {resp:?}");
        assert!(r.closed(), "connection stays open after a failed login");
    }
    real_client_works(&d)?;
    d.stop()?;
    Ok(())
}

/// Full-feature phase: an unknown opcode gets a Reject quoting its header (§11.17); a READ
/// beyond the medium gets CHECK CONDITION ILLEGAL REQUEST / LBA OUT OF RANGE (SBC-3 §4.5);
/// Data-Out for a task that does not exist is ignored; the session stays usable.
#[test]
fn nonsense_in_full_feature_phase_gets_protocol_answers() -> Result<()> {
    let d = start()?;
    let mut r = Raw::connect(d.portal())?;
    r.login(INITIATOR, IQN)?;

    let mut unknown = Bhs::default();
    unknown.0[0] = 0x1f;
    unknown.0[1] = 0x80;
    r.send(unknown, &[])?;
    let p = r.recv()?.context("no answer to an unknown opcode")?;
    assert_eq!(p.bhs.opcode(), Opcode::Reject);
    assert_eq!(&p.data[..], &unknown.0[..], "Reject must carry the rejected header");
    let _ = Reject::parse(&p.bhs);

    let mut read16 = [0u8; 16];
    read16[0] = 0x88;
    read16[2..10].copy_from_slice(&u64::MAX.to_be_bytes());
    read16[13] = 1;
    r.clear_unit_attention()?;
    r.scsi(read16, 512)?;
    let p = r.response()?;
    let resp = ScsiResponse::parse(&p.bhs);
    assert_eq!(resp.status, 0x02, "READ(16) beyond the medium: {resp:?}");
    let sense = &p.data[2..];
    assert_eq!((sense[2] & 0x0f, sense[12], sense[13]), (0x05, 0x21, 0x00));

    let stray = DataOut {
        final_: true,
        lun: 1,
        itt: 0xdead,
        ttt: RESERVED_TAG,
        exp_statsn: r.statsn,
        datasn: 0,
        buffer_offset: 0,
    };
    r.send(stray.to_bhs(), &[0u8; 512])?;
    r.ping()?;
    d.stop()?;
    Ok(())
}

/// Seeded storm: random CDBs on a logged-in session, then random header mutations of valid PDUs
/// on fresh connections. Bounded in count and time. Afterwards the daemon serves a real client and
/// logged no panic (`Daemon::stop` checks the log).
#[test]
fn random_pdu_storm_does_not_crash_the_daemon() -> Result<()> {
    let d = start()?;
    let seed: u64 = std::env::var("RAFTSAN_STORM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_1234);
    eprintln!("storm seed {seed} (set RAFTSAN_STORM_SEED to replay)");
    let mut rng = seed;
    let deadline = Instant::now() + Duration::from_secs(20);

    // Random CDBs (writes excluded so the LU's data stays as it was), in batches inside the
    // CmdSN window (commands beyond MaxCmdSN are ignored by design, RFC 7143 §4.2.2.1).
    let mut r = Raw::connect(d.portal())?;
    r.login(INITIATOR, IQN)?;
    for _batch in 0..8 {
        for _ in 0..64 {
            let mut cdb = [0u8; 16];
            for b in cdb.iter_mut() {
                *b = next(&mut rng) as u8;
            }
            if matches!(
                cdb[0],
                0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e | 0x41 | 0x93 | 0x42 | 0x89 | 0x8b | 0x9c | 0x04 | 0x48
            ) {
                cdb[0] = 0x12;
            }
            let len = (next(&mut rng) % 8192) as u32;
            r.scsi(cdb, len)?;
        }
        // Every command gets exactly one status (a SCSI Response or a Data-In with status).
        let mut statuses = 0;
        while statuses < 64 {
            let p = r.recv()?.context("session closed during the CDB storm")?;
            match p.bhs.opcode() {
                Opcode::ScsiResponse => statuses += 1,
                Opcode::DataIn if p.bhs.flags() & 0x01 != 0 => statuses += 1,
                _ => {}
            }
        }
    }
    r.ping()?;

    // Mutated headers of valid PDUs on fresh connections.
    let mut sent = 0;
    while sent < 300 && Instant::now() < deadline {
        let mut c = Raw::connect(d.portal())?;
        if next(&mut rng).is_multiple_of(2) {
            let _ = c.login(INITIATOR, IQN);
        }
        for _ in 0..10 {
            let mut raw = [0u8; 48];
            for b in raw.iter_mut() {
                *b = next(&mut rng) as u8;
            }
            raw[0] = [0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x10, 0x1c, 0x3f][(next(&mut rng) % 10) as usize]
                | (raw[0] & 0x40);
            raw[4] = (next(&mut rng) % 3) as u8; // a little AHS
            let dlen = (next(&mut rng) % 4096) as u32;
            raw[5..8].copy_from_slice(&dlen.to_be_bytes()[1..]);
            let ahs = noise(usize::from(raw[4]) * 4, next(&mut rng));
            let data = noise(dlen as usize + (4 - dlen as usize % 4) % 4, next(&mut rng));
            let mut wire = raw.to_vec();
            wire.extend_from_slice(&ahs);
            wire.extend_from_slice(&data);
            sent += 1;
            if c.s.write_all(&wire).is_err() {
                break;
            }
        }
        drop(c);
    }
    assert!(sent >= 100, "storm sent only {sent} PDUs");
    real_client_works(&d)?;
    let mut after = Raw::connect(d.portal())?;
    after.login(INITIATOR, IQN)?;
    after.ping()?;
    d.stop()?;
    Ok(())
}

fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len).map(|_| next(&mut x) as u8).collect()
}

/// Invariant 6: an initiator that sends but never reads cannot make the target queue without
/// bound. It floods pings with 4 KiB of data and reads nothing. Once the socket buffers and the
/// target's bounded response queue are full, the target closes that connection, and everyone
/// else is still served.
#[test]
fn an_initiator_that_never_reads_is_disconnected() -> Result<()> {
    use raftsan_proto::pdu::NopOut;
    let d = start()?;
    let mut r = Raw::connect(d.portal())?;
    r.login(INITIATOR, IQN)?;
    r.s.set_write_timeout(Some(Duration::from_secs(10)))?;
    let ping = vec![0x5au8; 4096];
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut sent = 0u32;
    let cut = loop {
        let n = NopOut {
            immediate: true,
            lun: 0,
            itt: sent + 2,
            ttt: RESERVED_TAG,
            cmdsn: r.cmdsn,
            exp_statsn: 0,
        };
        if r.send(n.to_bhs(), &ping).is_err() {
            break true;
        }
        sent += 1;
        if Instant::now() > deadline || sent > 200_000 {
            break false;
        }
    };
    assert!(
        cut,
        "the target kept accepting {sent} pings from an initiator that reads nothing"
    );
    real_client_works(&d)?;
    let log = d.stop()?;
    assert!(
        log.contains("not reading its responses"),
        "no log line says why the connection was closed"
    );
    Ok(())
}
