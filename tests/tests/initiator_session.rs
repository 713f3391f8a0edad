//! `raftsan_initiator::session` against real targets (standalone raftsan and tgtd) and against a
//! hostile fake target.
//!
//! * Real targets: SendTargets discovery, CHAP (right, wrong, mutual right, mutual with a wrong
//!   target secret), READ CAPACITY(16), 1 MiB written with WRITE(10)/WRITE(16) in pieces larger
//!   than FirstBurstLength (R2T path) with and without immediate data, with digests, 64
//!   concurrent commands, logout, and a SIGSTOPped target (command timeout with ABORT TASK, NOP
//!   keepalive timeout), both bounded in time.
//! * Fault model of the fake target: it logs in correctly (proto's own target login machine) and
//!   then answers a command with one malformed or unexpected PDU. Invariant: `execute` returns a
//!   Protocol/ConnectionLost error naming the problem, the session is closed, nothing panics.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::{Bytes, BytesMut};
use raftsan_initiator::session::{
    ChapCredentials, Command, CommandResult, Session, SessionConfig, SessionError, TmfResponse,
};
use raftsan_proto::chap::ChapAlgorithm;
use raftsan_proto::login::{self, LoginAuthority, LoginStep, Lookup, TargetAuth, TargetLogin};
use raftsan_proto::pdu::{
    self, Bhs, DataIn, Digests, Framing, LoginResponse, Opcode, RESERVED_TAG, ReadyToTransfer, Residual, ScsiCommand,
    ScsiResponse, Sequence,
};
use raftsan_proto::text::{SessionType, TargetLimits};
use raftsan_tests::{Daemon, Kind, start_single_target};
use rand::{RngCore, SeedableRng, rngs::StdRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: u64 = 1 << 20;
const BLOCK: usize = 512;
const LUN: u64 = 1;
const INITIATOR: &str = "iqn.2026-11.org.raftsan.test:session-initiator";

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn portal(d: &Daemon) -> SocketAddr {
    SocketAddr::V4(d.portal())
}

fn config(iqn: &str) -> SessionConfig {
    SessionConfig {
        initiator_name: INITIATOR.into(),
        target_name: Some(iqn.into()),
        ..SessionConfig::default()
    }
}

fn read_capacity16() -> Command {
    Command {
        lun: LUN,
        cdb: vec![0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
        data_out: None,
        data_in_len: 32,
    }
}

fn write10(lba: u32, data: Bytes) -> Command {
    let blocks = (data.len() / BLOCK) as u16;
    let l = lba.to_be_bytes();
    let b = blocks.to_be_bytes();
    Command {
        lun: LUN,
        cdb: vec![0x2a, 0, l[0], l[1], l[2], l[3], 0, b[0], b[1], 0],
        data_out: Some(data),
        data_in_len: 0,
    }
}

fn rw16(opcode: u8, lba: u64, blocks: u32) -> Vec<u8> {
    let mut cdb = vec![opcode, 0];
    cdb.extend_from_slice(&lba.to_be_bytes());
    cdb.extend_from_slice(&blocks.to_be_bytes());
    cdb.extend_from_slice(&[0, 0]);
    cdb
}

fn write16(lba: u64, data: Bytes) -> Command {
    Command {
        lun: LUN,
        cdb: rw16(0x8a, lba, (data.len() / BLOCK) as u32),
        data_out: Some(data),
        data_in_len: 0,
    }
}

fn read16(lba: u64, blocks: u32) -> Command {
    Command {
        lun: LUN,
        cdb: rw16(0x88, lba, blocks),
        data_out: None,
        data_in_len: blocks * BLOCK as u32,
    }
}

/// Runs `cmd`, retrying on UNIT ATTENTION (SPC-4 §5.14: the first command of a new I_T nexus
/// reports power on/reset 29/00), as a SCSI layer above the session would.
async fn exec(s: &Session, cmd: Command) -> Result<CommandResult, SessionError> {
    let mut tries = 0;
    loop {
        let r = s.execute(cmd.clone()).await?;
        let unit_attention = r.status == 2 && r.sense.as_ref().is_some_and(|d| d.len() > 2 && d[2] & 0x0f == 6);
        tries += 1;
        if !unit_attention || tries == 4 {
            return Ok(r);
        }
    }
}

fn good(r: &CommandResult, what: &str) -> Result<()> {
    ensure!(
        r.status == 0,
        "{what}: status {:#04x}, sense {:02x?}",
        r.status,
        r.sense.as_deref()
    );
    Ok(())
}

fn random(len: usize, seed: u64) -> Bytes {
    let mut v = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    Bytes::from(v)
}

/// Writes `data` at `lba` in pieces of `piece` bytes (WRITE(10) or WRITE(16)), reads it back in
/// 256 KiB READ(16)s and compares.
async fn write_read_back(s: &Session, lba: u64, data: &Bytes, piece: usize, use16: bool) -> Result<()> {
    let mut off = 0;
    while off < data.len() {
        let len = piece.min(data.len() - off);
        let chunk = data.slice(off..off + len);
        let at = lba + (off / BLOCK) as u64;
        let cmd = if use16 {
            write16(at, chunk)
        } else {
            write10(at as u32, chunk)
        };
        good(&exec(s, cmd).await?, "write")?;
        off += len;
    }
    let mut back = BytesMut::new();
    let step = 256 * 1024;
    let mut off = 0;
    while off < data.len() {
        let len = step.min(data.len() - off);
        let r = exec(s, read16(lba + (off / BLOCK) as u64, (len / BLOCK) as u32)).await?;
        good(&r, "read")?;
        ensure!(
            r.data.len() == len,
            "read returned {} bytes, wanted {len}",
            r.data.len()
        );
        ensure!(r.residual == Residual::None, "unexpected residual {:?}", r.residual);
        back.extend_from_slice(&r.data);
        off += len;
    }
    ensure!(
        back.as_ref() == data.as_ref(),
        "data read back differs from the data written"
    );
    Ok(())
}

// --- discovery, I/O, digests, concurrency, logout --------------------------------------------

fn io_suite(kind: Kind) -> Result<()> {
    let iqn = "iqn.2026-11.org.raftsan.test:session-io";
    let (daemon, backing) = start_single_target(kind, iqn, 64 * MIB, &[])?;
    let p = portal(&daemon);
    runtime()?.block_on(async {
        // RFC 7143 §12.3 SendTargets.
        let targets = raftsan_initiator::session::discover(p, &config(iqn)).await?;
        let t = targets
            .iter()
            .find(|t| t.name == iqn)
            .with_context(|| format!("{iqn} not discovered: {targets:?}"))?;
        ensure!(
            t.portals.iter().any(|tp| tp.address == p.to_string()),
            "portal {p} not listed: {targets:?}"
        );

        // Defaults: ImmediateData=Yes, InitialR2T=No, FirstBurstLength 256 KiB.
        let s = Session::login(p, config(iqn)).await?;
        let n = s.negotiated().clone();
        ensure!(n.tsih != 0 && n.tpgt.is_some(), "{n:?}");
        let cap = exec(&s, read_capacity16()).await?;
        good(&cap, "READ CAPACITY(16)")?;
        ensure!(cap.data.len() >= 12, "short READ CAPACITY data");
        let last_lba = u64::from_be_bytes(cap.data[..8].try_into()?);
        let block = u32::from_be_bytes(cap.data[8..12].try_into()?);
        ensure!(
            (last_lba + 1) * u64::from(block) == 64 * MIB && block as usize == BLOCK,
            "capacity {last_lba}/{block}"
        );
        let first = random(MIB as usize, 1);
        let piece = (n.params.first_burst_length as usize * 2).min(MIB as usize);
        write_read_back(&s, 0, &first, piece, false).await?;

        // 64 concurrent writers then readers on distinct 16 KiB extents.
        let mut jobs = Vec::new();
        for i in 0..64u64 {
            let s = s.clone();
            jobs.push(tokio::spawn(async move {
                let data = random(16 * 1024, 100 + i);
                let lba = 8192 + i * 32;
                good(&exec(&s, write16(lba, data.clone())).await?, "concurrent write")?;
                let r = exec(&s, read16(lba, 32)).await?;
                good(&r, "concurrent read")?;
                ensure!(r.data == data, "concurrent extent {i} differs");
                Ok::<_, anyhow::Error>(())
            }));
        }
        for j in jobs {
            j.await??;
        }
        // RFC 7143 §11.5: task management on an idle LU.
        let r = s.lun_reset(LUN).await?;
        ensure!(r == TmfResponse::FunctionComplete, "LUN reset: {r:?}");
        let r = s.abort_task(LUN, 0x7777).await?;
        ensure!(
            matches!(r, TmfResponse::TaskDoesNotExist | TmfResponse::FunctionComplete),
            "abort of an unknown task: {r:?}"
        );
        good(&exec(&s, read_capacity16()).await?, "READ CAPACITY after LUN reset")?;
        s.logout().await?;
        ensure!(!s.is_alive(), "session alive after logout");
        ensure!(
            matches!(s.closed().await, SessionError::Closed),
            "closed() after logout"
        );
        match exec(&s, read_capacity16()).await {
            Err(SessionError::Closed) => {}
            other => bail!("execute after logout: {other:?}"),
        }

        // Digests, InitialR2T=Yes, ImmediateData=No: every byte goes by R2T; WRITE(16). tgtd
        // negotiates digests only once its target asks for them (tgtadm(8)).
        if kind == Kind::Tgtd {
            for key in ["HeaderDigest", "DataDigest"] {
                daemon.tgtadm(&[
                    "--lld", "iscsi", "--op", "update", "--mode", "target", "--tid", "1", "-n", key, "-v", "CRC32C",
                ])?;
            }
        }
        let cfg = SessionConfig {
            header_digest: true,
            data_digest: true,
            initial_r2t: true,
            immediate_data: false,
            max_burst_length: 128 * 1024,
            first_burst_length: 64 * 1024,
            ..config(iqn)
        };
        let s = Session::login(p, cfg).await?;
        let q = &s.negotiated().params;
        ensure!(q.header_digest && q.data_digest, "digests not negotiated: {q:?}");
        ensure!(q.initial_r2t && !q.immediate_data, "{q:?}");
        let second = random(MIB as usize, 2);
        write_read_back(&s, 2048, &second, 320 * 1024, true).await?;

        // Immediate data only (writes within FirstBurstLength and one PDU).
        let cfg = SessionConfig {
            initial_r2t: true,
            immediate_data: true,
            header_digest: true,
            data_digest: true,
            ..config(iqn)
        };
        let s2 = Session::login(p, cfg).await?;
        let third = random(64 * 1024, 3);
        write_read_back(&s2, 4096, &third, 16 * 1024, false).await?;
        s.logout().await?;
        s2.logout().await?;
        Ok::<_, anyhow::Error>(())
    })?;
    let stored = std::fs::read(&backing)?;
    daemon.stop()?;
    ensure!(
        stored[..MIB as usize] == random(MIB as usize, 1)[..],
        "backing file differs from the first MiB written"
    );
    ensure!(
        stored[MIB as usize..2 * MIB as usize] == random(MIB as usize, 2)[..],
        "backing file differs from the second MiB written"
    );
    Ok(())
}

#[test]
fn discovery_io_digests_concurrency_logout_raftsan() -> Result<()> {
    io_suite(Kind::Raftsan)
}

#[test]
fn discovery_io_digests_concurrency_logout_tgtd() -> Result<()> {
    io_suite(Kind::Tgtd)
}

// --- CHAP ----------------------------------------------------------------------------------

const CHAP_IQN: &str = "iqn.2026-11.org.raftsan.test:session-chap";
const IN_USER: &str = "diskuser";
const IN_SECRET: &str = "Eupen2marron";
const OUT_USER: &str = "sanside";
const OUT_SECRET: &str = "Targetside4marron";

fn chap_suite(kind: Kind) -> Result<()> {
    let (mut daemon, _) = start_single_target(
        kind,
        CHAP_IQN,
        16 * MIB,
        &[
            &format!("incominguser {IN_USER} {IN_SECRET}"),
            &format!("outgoinguser {OUT_USER} {OUT_SECRET}"),
        ],
    )?;
    daemon.expect_error(IN_USER);
    daemon.expect_error("CHAP");
    daemon.expect_error("authentication");
    let p = portal(&daemon);
    runtime()?.block_on(async {
        // tgt (like IET) uses CHAP_A 7 for SHA-1 where IANA and RFC 9266 say SHA-256, so it
        // would pick 7 from our default offer and expect a SHA-1 response: offer MD5 only there.
        let algorithms = match kind {
            Kind::Tgtd => vec![ChapAlgorithm::Md5],
            Kind::Raftsan => SessionConfig::default().chap_algorithms,
        };
        let with = |secret: &str, mutual: Option<&str>| SessionConfig {
            chap: Some(ChapCredentials::new(IN_USER, secret)),
            mutual_chap: mutual.map(|m| ChapCredentials::new(OUT_USER, m)),
            chap_algorithms: algorithms.clone(),
            ..config(CHAP_IQN)
        };
        // RFC 7143 §12.1.3: the right secret logs in.
        let s = Session::login(p, with(IN_SECRET, None)).await?;
        ensure!(s.negotiated().chap_algorithm.is_some() && !s.negotiated().target_authenticated);
        good(&exec(&s, read_capacity16()).await?, "READ CAPACITY after CHAP")?;
        s.logout().await?;
        // A wrong secret: 0201.
        match Session::login(p, with("wrong-secret", None)).await {
            Err(SessionError::AuthFailed(m)) => ensure!(!m.contains("wrong-secret"), "secret in message"),
            other => bail!("wrong secret: {other:?}"),
        }
        // No credentials at all.
        match Session::login(p, config(CHAP_IQN)).await {
            Err(SessionError::AuthFailed(_)) => {}
            other => bail!("no CHAP: {other:?}"),
        }
        // Mutual CHAP with the target's right secret: the target proved itself.
        let s = Session::login(p, with(IN_SECRET, Some(OUT_SECRET))).await?;
        ensure!(s.negotiated().target_authenticated, "target not authenticated");
        s.logout().await?;
        // The target does not know the secret we expect: we refuse it.
        match Session::login(p, with(IN_SECRET, Some("Notthetargetsecret"))).await {
            Err(SessionError::AuthFailed(m)) => {
                ensure!(m.contains("mutual"), "{m}");
                ensure!(!m.contains("Notthetargetsecret"), "secret in message");
            }
            other => bail!("mutual CHAP with a wrong target secret: {other:?}"),
        }
        Ok::<_, anyhow::Error>(())
    })?;
    let log = daemon.stop()?;
    ensure!(!log.contains("wrong-secret"), "a secret reached the target log");
    Ok(())
}

#[test]
fn chap_right_wrong_mutual_raftsan() -> Result<()> {
    chap_suite(Kind::Raftsan)
}

#[test]
fn chap_right_wrong_mutual_tgtd() -> Result<()> {
    chap_suite(Kind::Tgtd)
}

// --- a stalled target ---------------------------------------------------------------------

/// The pid of the daemon's main process, found by its command line (the scratch dir for
/// raftsan, the portal argument for tgtd).
fn daemon_pid(d: &Daemon) -> Result<libc::pid_t> {
    let needle = match d.kind() {
        Kind::Raftsan => d.dir().display().to_string(),
        Kind::Tgtd => format!("portal={}", d.portal()),
    };
    let me = std::process::id();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let daemon_name = match d.kind() {
            Kind::Raftsan => "raftsan",
            Kind::Tgtd => "tgtd",
        };
        if cmdline.contains(&needle) && cmdline.split(' ').next().is_some_and(|b| b.ends_with(daemon_name)) {
            return Ok(libc::pid_t::try_from(pid)?);
        }
    }
    bail!("no process with {needle:?} in its command line")
}

fn signal(pid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: kill(2) on the daemon this test started (still running: it is only stopped and
    // continued) with a valid signal number.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Continues the target even when the test fails half-way.
struct Resume(libc::pid_t);

impl Drop for Resume {
    fn drop(&mut self) {
        signal(self.0, libc::SIGCONT);
    }
}

fn stall_suite(kind: Kind) -> Result<()> {
    let iqn = "iqn.2026-11.org.raftsan.test:session-stall";
    let (daemon, _) = start_single_target(kind, iqn, 16 * MIB, &[])?;
    let p = portal(&daemon);
    let pid = daemon_pid(&daemon)?;
    runtime()?.block_on(async {
        let keepalive = Session::login(
            p,
            SessionConfig {
                nop_interval: Duration::from_millis(300),
                nop_timeout: Duration::from_secs(1),
                ..config(iqn)
            },
        )
        .await?;
        let commands = Session::login(
            p,
            SessionConfig {
                nop_interval: Duration::ZERO,
                command_timeout: Duration::from_secs(2),
                abort_timeout: Duration::from_secs(2),
                ..config(iqn)
            },
        )
        .await?;
        good(&exec(&commands, read16(0, 8)).await?, "read before the stall")?;
        // Let a few pings pass while the target is healthy.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        ensure!(keepalive.is_alive(), "keepalive session died on a healthy target");

        signal(pid, libc::SIGSTOP);
        let resume = Resume(pid);
        raftsan_tests::wait_stopped(pid as u32)?;
        let started = Instant::now();
        let (timed_out, dead) = tokio::join!(exec(&commands, read16(0, 8)), keepalive.closed());
        let elapsed = started.elapsed();
        match timed_out {
            Err(SessionError::Timeout(_)) | Err(SessionError::ConnectionLost(_)) => {}
            other => bail!("command against a stopped target: {other:?}"),
        }
        ensure!(
            matches!(dead, SessionError::Timeout(ref m) if m.contains("NOP-In")),
            "keepalive: {dead:?}"
        );
        // command_timeout + abort_timeout + slack.
        ensure!(elapsed < Duration::from_secs(7), "took {elapsed:?}");
        ensure!(!keepalive.is_alive());
        ensure!(!commands.is_alive(), "the unanswered abort must close the connection");
        drop(resume);

        // After the target resumes, a new session works.
        let s = Session::login(p, config(iqn)).await?;
        good(&exec(&s, read_capacity16()).await?, "READ CAPACITY after resume")?;
        s.logout().await?;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(())
}

#[test]
fn stopped_target_times_out_commands_and_keepalive_raftsan() -> Result<()> {
    stall_suite(Kind::Raftsan)
}

#[test]
fn stopped_target_times_out_commands_and_keepalive_tgtd() -> Result<()> {
    stall_suite(Kind::Tgtd)
}

// --- a hostile target ---------------------------------------------------------------------

const FAKE_IQN: &str = "iqn.2026-11.org.raftsan.test:fake";

struct Open;

impl LoginAuthority for Open {
    fn lookup(&self, _: SessionType, _: Option<&str>, _: &str) -> Lookup {
        Lookup::Allowed(TargetAuth {
            accounts: Vec::new(),
            mutual: None,
            target_alias: None,
            tpgt: 1,
        })
    }
}

/// What the fake target answers a SCSI command with: raw bytes to write.
type Misbehave = fn(&ScsiCommand, Sequence) -> Vec<u8>;

fn frame(bhs: Bhs, data: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    pdu::encode_parts(bhs, &[], data, Digests::default(), &mut out);
    out.to_vec()
}

/// What the fake target saw.
#[derive(Debug, Default)]
struct FakeLog {
    commands: u32,
    tmfs: u32,
    logouts: u32,
}

/// Accepts one connection, logs it in with proto's target login machine, then answers every SCSI
/// command with `answer`, with a CmdSN window of `window` commands (RFC 7143 §4.2.2.1; a command
/// beyond the window is an error of the initiator), and answers a Logout Request. Runs until the
/// initiator closes the connection.
async fn fake_target(listener: tokio::net::TcpListener, answer: Misbehave, window: u32) -> Result<FakeLog> {
    let (mut sock, _) = listener.accept().await?;
    let mut buf = BytesMut::new();
    let mut login = TargetLogin::new(TargetLimits::default(), 1, vec![9; 16]);
    let mut statsn = 1u32;
    let mut logged_in = false;
    let mut exp_cmdsn = 0u32;
    let mut log = FakeLog::default();
    loop {
        let len = loop {
            if let Framing::Complete { len } = pdu::check(&buf, Digests::default(), 1 << 20)? {
                break len;
            }
            if sock.read_buf(&mut buf).await? == 0 {
                return Ok(log);
            }
        };
        let p = pdu::decode(buf.split_to(len).freeze(), Digests::default())?;
        if !logged_in {
            let header = pdu::LoginRequest::parse(&p.bhs);
            let step = login.on_request(&login::LoginRequest { header, data: &p.data }, &Open);
            let (r, done) = match step {
                LoginStep::Continue(r) => (r, false),
                LoginStep::FullFeature(r, _) => (r, true),
                LoginStep::Failed(r, f) => bail!("fake target: login failed: {f:?} {r:?}"),
            };
            exp_cmdsn = header.cmdsn;
            let bhs = LoginResponse {
                transit: r.transit,
                cont: r.cont,
                csg: r.csg,
                nsg: r.nsg,
                version_max: 0,
                version_active: 0,
                isid: header.isid,
                tsih: if done { 1 } else { 0 },
                itt: header.itt,
                seq: Sequence {
                    statsn,
                    exp_cmdsn,
                    max_cmdsn: exp_cmdsn.wrapping_add(window - 1),
                },
                status_class: 0,
                status_detail: 0,
            }
            .to_bhs();
            statsn += 1;
            sock.write_all(&frame(bhs, &r.data)).await?;
            logged_in = done;
            continue;
        }
        match p.bhs.opcode() {
            Opcode::ScsiCommand => {
                let cmd = ScsiCommand::parse(&p.bhs);
                // Answered in order, so the window is [exp_cmdsn, exp_cmdsn + window - 1].
                ensure!(
                    cmd.cmdsn == exp_cmdsn,
                    "fake target: CmdSN {} outside the window starting at {exp_cmdsn}",
                    cmd.cmdsn
                );
                if window == 1 {
                    // Give the initiator time to (wrongly) send the next command before we
                    // open the window with our answer.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let _ = tokio::time::timeout(Duration::from_millis(5), sock.read_buf(&mut buf)).await;
                    ensure!(
                        buf.is_empty(),
                        "fake target: the initiator sent a PDU while the CmdSN window was closed"
                    );
                }
                exp_cmdsn = exp_cmdsn.wrapping_add(1);
                log.commands += 1;
                let seq = Sequence {
                    statsn,
                    exp_cmdsn,
                    max_cmdsn: exp_cmdsn.wrapping_add(window - 1),
                };
                statsn += 1;
                sock.write_all(&answer(&cmd, seq)).await?;
            }
            Opcode::TaskMgmtRequest => {
                let r = pdu::TaskMgmtRequest::parse(&p.bhs);
                log.tmfs += 1;
                let bhs = pdu::TaskMgmtResponse {
                    response: pdu::tmf::FUNCTION_COMPLETE,
                    itt: r.itt,
                    seq: Sequence {
                        statsn,
                        exp_cmdsn,
                        max_cmdsn: exp_cmdsn.wrapping_add(window - 1),
                    },
                }
                .to_bhs();
                statsn += 1;
                sock.write_all(&frame(bhs, &[])).await?;
            }
            Opcode::LogoutRequest => {
                let r = pdu::LogoutRequest::parse(&p.bhs);
                log.logouts += 1;
                let bhs = pdu::LogoutResponse {
                    response: 0,
                    itt: r.itt,
                    seq: Sequence {
                        statsn,
                        exp_cmdsn,
                        max_cmdsn: exp_cmdsn.wrapping_add(window - 1),
                    },
                    time2wait: 0,
                    time2retain: 0,
                }
                .to_bhs();
                statsn += 1;
                sock.write_all(&frame(bhs, &[])).await?;
            }
            _ => {}
        }
    }
}

fn data_in(cmd: &ScsiCommand, seq: Sequence, offset: u32, datasn: u32, status: bool, data: &[u8]) -> Vec<u8> {
    let bhs = DataIn {
        final_: status,
        status: status.then_some(0),
        lun: cmd.lun,
        itt: cmd.itt,
        ttt: RESERVED_TAG,
        seq,
        datasn,
        buffer_offset: offset,
        residual: Residual::None,
    }
    .to_bhs();
    frame(bhs, data)
}

fn well_behaved(cmd: &ScsiCommand, seq: Sequence) -> Vec<u8> {
    data_in(cmd, seq, 0, 0, true, &vec![0xab; cmd.expected_data_len as usize])
}

fn bad_opcode(_: &ScsiCommand, seq: Sequence) -> Vec<u8> {
    let mut bhs = ScsiResponse {
        response: 0,
        status: 0,
        itt: 1,
        seq,
        exp_datasn: 0,
        residual: Residual::None,
    }
    .to_bhs();
    bhs.0[0] = 0x3a;
    frame(bhs, &[])
}

fn wrong_offset(cmd: &ScsiCommand, seq: Sequence) -> Vec<u8> {
    data_in(cmd, seq, 512, 0, true, &[0xab; 512])
}

fn wrong_datasn(cmd: &ScsiCommand, seq: Sequence) -> Vec<u8> {
    let mut out = data_in(cmd, seq, 0, 0, false, &[0xab; 512]);
    out.extend(data_in(cmd, seq, 512, 5, true, &[0xab; 512]));
    out
}

fn data_beyond_length(cmd: &ScsiCommand, seq: Sequence) -> Vec<u8> {
    data_in(cmd, seq, 0, 0, true, &vec![0xab; cmd.expected_data_len as usize + 512])
}

fn oversized_segment(cmd: &ScsiCommand, seq: Sequence) -> Vec<u8> {
    // The header claims 16 MiB - 1 bytes of data, far above our MaxRecvDataSegmentLength.
    let mut out = data_in(cmd, seq, 0, 0, true, &[]);
    out[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
    out
}

fn unknown_itt(cmd: &ScsiCommand, seq: Sequence) -> Vec<u8> {
    let bhs = ScsiResponse {
        response: 0,
        status: 0,
        itt: cmd.itt ^ 0xdead_0000,
        seq,
        exp_datasn: 0,
        residual: Residual::None,
    }
    .to_bhs();
    frame(bhs, &[])
}

fn r2t_for_read(cmd: &ScsiCommand, seq: Sequence) -> Vec<u8> {
    let bhs = ReadyToTransfer {
        lun: cmd.lun,
        itt: cmd.itt,
        ttt: 7,
        seq,
        r2tsn: 0,
        buffer_offset: 0,
        desired_len: 512,
    }
    .to_bhs();
    frame(bhs, &[])
}

fn bad_sense_length(cmd: &ScsiCommand, seq: Sequence) -> Vec<u8> {
    let bhs = ScsiResponse {
        response: 0,
        status: 2,
        itt: cmd.itt,
        seq,
        exp_datasn: 0,
        residual: Residual::None,
    }
    .to_bhs();
    frame(bhs, &[0x01, 0x00, 0x70, 0, 5])
}

type FakeRun = (
    Result<CommandResult, SessionError>,
    Session,
    tokio::task::JoinHandle<Result<FakeLog>>,
);

fn fake_config() -> SessionConfig {
    SessionConfig {
        nop_interval: Duration::ZERO,
        command_timeout: Duration::from_secs(10),
        ..config(FAKE_IQN)
    }
}

/// Logs in to a fresh fake target and runs one READ(16) of 8 blocks against it.
async fn against_fake(answer: Misbehave) -> Result<FakeRun> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let target = tokio::spawn(fake_target(listener, answer, 32));
    let s = Session::login(addr, fake_config()).await?;
    let result = tokio::time::timeout(Duration::from_secs(10), s.execute(read16(0, 8)))
        .await
        .context("execute hung against the fake target")?;
    Ok((result, s, target))
}

fn async_logout_request(cmd: &ScsiCommand, seq: Sequence) -> Vec<u8> {
    let mut out = well_behaved(cmd, seq);
    let bhs = pdu::AsyncMessage {
        lun: 0,
        seq,
        event: 1,
        vcode: 0,
        param1: 0,
        param2: 0,
        param3: 5,
    }
    .to_bhs();
    out.extend(frame(bhs, &[]));
    out
}

fn reject_command(cmd: &ScsiCommand, seq: Sequence) -> Vec<u8> {
    let bhs = pdu::Reject {
        reason: pdu::reject_reason::INVALID_PDU_FIELD,
        seq,
        datasn_r2tsn: 0,
    }
    .to_bhs();
    frame(bhs, &cmd.to_bhs().0)
}

/// RFC 7143 §4.2.2.1: with a window of one command, 16 concurrent commands are queued and sent
/// one at a time as MaxCmdSN advances; none is sent outside the window.
#[test]
fn fake_target_cmdsn_window_is_respected() -> Result<()> {
    runtime()?.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let target = tokio::spawn(fake_target(listener, well_behaved, 1));
        let s = Session::login(addr, fake_config()).await?;
        let mut jobs = Vec::new();
        for _ in 0..16 {
            let s = s.clone();
            jobs.push(tokio::spawn(async move { s.execute(read16(0, 8)).await }));
        }
        for j in jobs {
            let r = j.await??;
            ensure!(r.status == 0 && r.data.len() == 4096, "{r:?}");
        }
        s.close_hard();
        let log = target.await??;
        ensure!(log.commands == 16, "{log:?}");
        Ok(())
    })
}

/// §11.9.1 event 1: the target asks for a logout; the session logs out once the command in
/// flight is done and reports TargetLogout; a Reject (§11.17) fails only its command.
#[test]
fn fake_target_async_logout_and_reject() -> Result<()> {
    runtime()?.block_on(async {
        let (ok, s, target) = against_fake(async_logout_request).await?;
        ensure!(ok?.status == 0);
        let why = tokio::time::timeout(Duration::from_secs(3), s.closed())
            .await
            .context("no logout after the target asked for one")?;
        ensure!(why == SessionError::TargetLogout, "{why:?}");
        ensure!(why.is_path_failure());
        let log = target.await??;
        ensure!(log.logouts == 1, "{log:?}");

        let (rejected, s, target) = against_fake(reject_command).await?;
        match rejected {
            Err(SessionError::Rejected { reason: 9, .. }) => {}
            other => bail!("rejected command: {other:?}"),
        }
        ensure!(s.is_alive(), "a Reject must not end the session");
        s.logout().await?;
        target.await??;
        Ok(())
    })
}

#[test]
fn hostile_target_malformed_pdus_fail_cleanly() -> Result<()> {
    runtime()?.block_on(async {
        // The fake target itself is sound.
        let (ok, s, target) = against_fake(well_behaved).await?;
        let ok = ok?;
        ensure!(ok.status == 0 && ok.data.len() == 4096, "{ok:?}");
        ensure!(s.is_alive());
        s.close_hard();
        ensure!(matches!(s.closed().await, SessionError::Closed));
        target.abort();

        let cases: [(&str, Misbehave, &str); 8] = [
            ("bad opcode", bad_opcode, "opcode"),
            ("Data-In with a wrong offset", wrong_offset, "offset"),
            ("Data-In with a DataSN gap", wrong_datasn, "DataSN"),
            ("Data-In beyond the expected length", data_beyond_length, "beyond"),
            ("oversized data segment length", oversized_segment, "exceeds"),
            ("SCSI Response for an unknown ITT", unknown_itt, "unknown ITT"),
            ("R2T for a read", r2t_for_read, "not a write"),
            ("sense length beyond the segment", bad_sense_length, "sense length"),
        ];
        for (name, answer, fragment) in cases {
            let (result, s, target) = against_fake(answer).await?;
            match result {
                Err(SessionError::Protocol(m)) => {
                    ensure!(m.contains(fragment), "{name}: message {m:?} lacks {fragment:?}")
                }
                // The command can lose the race with the session's end; the session's own
                // reason is checked below.
                Err(SessionError::Closed) => {}
                other => bail!("{name}: expected a protocol error, got {other:?}"),
            }
            let why = tokio::time::timeout(Duration::from_secs(5), s.closed())
                .await
                .with_context(|| format!("{name}: session not closed"))?;
            ensure!(
                matches!(&why, SessionError::Protocol(m) if m.contains(fragment)),
                "{name}: closed with {why:?}"
            );
            ensure!(why.is_path_failure(), "{name}");
            ensure!(!s.is_alive(), "{name}: still alive");
            target.abort();
        }
        Ok(())
    })
}

/// RFC 7143 §11.19: the target's NOP-In pings are answered, so a session with our own keepalive
/// off survives a target that drops initiators silent for 800 ms.
#[test]
fn target_pings_answered_raftsan() -> Result<()> {
    let iqn = "iqn.2026-11.org.raftsan.test:session-pings";
    let config_text = format!(
        "[limits]\nnop_in_interval_ms = 200\nnop_in_timeout_ms = 800\n\n[[target]]\nname = \"{iqn}\"\n\n\
         [[target.lun]]\nlun = 1\nmemory_size = \"4M\"\n"
    );
    let daemon = Daemon::raftsan(&config_text, vec![raftsan_tests::Loopback::reserve()?])?;
    let p = portal(&daemon);
    runtime()?.block_on(async {
        let s = Session::login(
            p,
            SessionConfig {
                nop_interval: Duration::ZERO,
                ..config(iqn)
            },
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        ensure!(s.is_alive(), "session dropped: {:?}", s.closed().await);
        good(&exec(&s, read_capacity16()).await?, "READ CAPACITY after idling")?;
        s.logout().await?;
        Ok::<_, anyhow::Error>(())
    })?;
    daemon.stop()?;
    Ok(())
}

fn silent(_: &ScsiCommand, _: Sequence) -> Vec<u8> {
    Vec::new()
}

/// A command the target never answers is aborted after `command_timeout` (RFC 7143 §11.5.1
/// ABORT TASK); the target confirms the abort, so the caller gets Timeout and the session lives.
#[test]
fn fake_target_command_timeout_aborts_task() -> Result<()> {
    runtime()?.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let target = tokio::spawn(fake_target(listener, silent, 32));
        let s = Session::login(
            addr,
            SessionConfig {
                command_timeout: Duration::from_millis(500),
                abort_timeout: Duration::from_secs(2),
                ..fake_config()
            },
        )
        .await?;
        let started = Instant::now();
        match s.execute(read16(0, 8)).await {
            Err(SessionError::Timeout(m)) => ensure!(m.contains("aborted"), "{m}"),
            other => bail!("unanswered command: {other:?}"),
        }
        ensure!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
        ensure!(s.is_alive(), "a confirmed abort must not end the session");
        s.logout().await?;
        let log = target.await??;
        ensure!(log.tmfs == 1 && log.commands == 1, "{log:?}");
        Ok(())
    })
}
