//! The delayed stale write (DESIGN.md invariant 3: a stale command — late TCP delivery after
//! failover, a hung path — gets UNIT ATTENTION and is not executed), against the real cluster:
//!
//! ```text
//!  chaos ── session S1 ── holding proxy ── leader L's portal       (the path that hangs)
//!  chaos ── session S2 ─────────────────── new leader N's portal   (the path failed over to)
//!
//!  1. S1: WRITE w0 to block B (GOOD: L's nexus of S1 now carries L's ALUA epoch)
//!  2. S1: WRITE w_old to B; the proxy holds that one PDU (and Data-Out of its task)
//!  3. iptables cuts L's cluster RPC: the majority elects N; the client gives up on w_old
//!  4. S2: WRITE w_new to B through N's portal (GOOD)
//!  5. the cut heals; L learns that N leads (its ALUA epoch moves on)
//!  6. the proxy delivers w_old to L, late, on the still-open session S1
//!  7. w_old must come back CHECK CONDITION / UNIT ATTENTION 2A/06; B, read through N, must be
//!     w_new (the oracle judges the read: w_old there would be a "stale" violation)
//! ```
//!
//! Why a chaos-owned proxy and not netem: the target pings every session (NOP-In every 1 s,
//! 3 s timeout in the test cluster) and closes one that does not answer, and a netem delay
//! holds the answers behind the write, so a delay long enough to span a leader change kills the
//! session before the write arrives, and a shorter one races the election. The proxy frames the
//! iSCSI PDUs (no digests are negotiated) and holds only the write's PDUs: pings and their
//! answers keep flowing, the session stays up as long as needed, and the write is delivered at
//! exactly step 6, whatever the election took. The write is an immediate PDU-sequence of its own
//! CmdSN; nothing else is sent on S1 meanwhile, so the target sees no CmdSN gap besides it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::{Bytes, BytesMut};
use raftsan_initiator::scsi::{self, Capacity, Sense, key, status};
use raftsan_initiator::session::{Command, CommandResult, Session, SessionConfig};
use raftsan_tests::cluster::{Cluster, group_leader};
use serde::Serialize;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::faults::{self, Rules};
use crate::oracle::{BLOCK, Content, Violation, decode, encode};
use crate::workload::Shared;

/// Blocks used by the check: past the NBD workload's (its default is the first 4096).
const FIRST_BLOCK: u64 = 12_288;
const BHS: usize = 48;
const OP_SCSI_COMMAND: u8 = 0x01;
const OP_DATA_OUT: u8 = 0x05;
const FLAG_WRITE: u8 = 0x20;

/// What one check saw.
#[derive(Clone, Debug, Serialize)]
pub struct StaleOutcome {
    pub block: u64,
    pub old_write: u64,
    pub new_write: u64,
    /// How long the old write was held.
    pub held_ms: f64,
    /// The late write's outcome, e.g. "CHECK CONDITION UNIT ATTENTION 2A/06".
    pub late_status: String,
    /// The late write got UNIT ATTENTION 2A/06 (not executed).
    pub refused: bool,
    /// What block B held afterwards, read through the new leader.
    pub read_back: String,
}

static OUTCOMES: Mutex<Vec<StaleOutcome>> = Mutex::new(Vec::new());

/// Every check of this process so far.
pub fn outcomes() -> Vec<StaleOutcome> {
    OUTCOMES.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

// --- the holding proxy ---------------------------------------------------------------------

#[derive(Default)]
struct Hold {
    armed: Mutex<bool>,
    release: Notify,
}

struct Proxy {
    addr: SocketAddr,
    hold: Arc<Hold>,
    /// Turns true when the write's PDUs are held.
    held: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

/// Length of the PDU at the start of `b` (header and data digests off), if it is all there.
pub fn pdu_len(b: &[u8]) -> Option<usize> {
    if b.len() < BHS {
        return None;
    }
    let ahs = usize::from(b[4]) * 4;
    let dsl = (usize::from(b[5]) << 16) | (usize::from(b[6]) << 8) | usize::from(b[7]);
    let n = BHS + ahs + dsl.next_multiple_of(4);
    (b.len() >= n).then_some(n)
}

impl Proxy {
    async fn start(target: SocketAddr) -> Result<Proxy> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        let hold = Arc::new(Hold::default());
        let (held_tx, held) = watch::channel(false);
        let h = hold.clone();
        let task = tokio::spawn(async move {
            let Ok((client, _)) = l.accept().await else { return };
            let Ok(server) = TcpStream::connect(target).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let down = tokio::spawn(async move {
                let _ = tokio::io::copy(&mut sr, &mut cw).await;
                let _ = cw.shutdown().await;
            });
            let mut buf = BytesMut::with_capacity(1 << 16);
            let mut held: Vec<u8> = Vec::new();
            let mut held_itt: Option<[u8; 4]> = None;
            let mut released = false;
            loop {
                tokio::select! {
                    r = cr.read_buf(&mut buf) => {
                        match r {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        }
                        while let Some(n) = pdu_len(&buf) {
                            let pdu = buf.split_to(n);
                            let op = pdu[0] & 0x3f;
                            let itt = [pdu[16], pdu[17], pdu[18], pdu[19]];
                            let armed = *h.armed.lock().unwrap_or_else(|e| e.into_inner());
                            let hold_it = if held_itt.is_none() && !released && armed
                                && op == OP_SCSI_COMMAND && pdu[1] & FLAG_WRITE != 0 {
                                held_itt = Some(itt);
                                true
                            } else {
                                !released && op == OP_DATA_OUT && held_itt == Some(itt)
                            };
                            if hold_it {
                                held.extend_from_slice(&pdu);
                                held_tx.send_replace(true);
                            } else if sw.write_all(&pdu).await.is_err() {
                                break;
                            }
                        }
                    }
                    () = h.release.notified(), if held_itt.is_some() && !released => {
                        released = true;
                        if sw.write_all(&held).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = sw.shutdown().await;
            let _ = down.await;
        });
        Ok(Proxy { addr, hold, held, task })
    }
}

// --- SCSI over the direct sessions ---------------------------------------------------------

pub fn describe(r: &CommandResult) -> String {
    match r.status {
        status::GOOD => "GOOD".into(),
        status::CHECK_CONDITION => match r.sense.as_deref().and_then(Sense::parse) {
            Some(s) => format!("CHECK CONDITION {s}"),
            None => "CHECK CONDITION (no sense)".into(),
        },
        s => format!("status 0x{s:02x}"),
    }
}

fn is_retryable(r: &CommandResult) -> bool {
    r.status == status::BUSY
        || (r.status == status::CHECK_CONDITION
            && r.sense
                .as_deref()
                .and_then(Sense::parse)
                .is_some_and(|s| s.code.key == key::UNIT_ATTENTION || s.code.key == key::NOT_READY))
}

/// Runs `cmd`, retrying what a multipath initiator retries (UNIT ATTENTION, NOT READY, BUSY).
pub async fn execute(s: &Session, cmd: Command) -> Result<CommandResult> {
    for _ in 0..50 {
        let r = s.execute(cmd.clone()).await?;
        if !is_retryable(&r) {
            return Ok(r);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{:02x?} kept failing with a retryable status", cmd.cdb.first())
}

pub fn session_config(target: &str) -> SessionConfig {
    SessionConfig {
        initiator_name: "iqn.2026-11.org.raftsan.chaos:stale-write".into(),
        target_name: Some(target.to_string()),
        // No pings of ours (the proxy would hold nothing but the write anyway) and no abort:
        // the held write must stay the session's outstanding command until it is delivered.
        nop_interval: Duration::ZERO,
        command_timeout: Duration::from_secs(600),
        ..SessionConfig::default()
    }
}

/// The LU as the direct sessions address it (blocks of the oracle's [`BLOCK`] bytes).
pub struct Volume {
    pub lun: u64,
    pub block_size: u32,
}

impl Volume {
    pub async fn probe(s: &Session, lun: u64) -> Result<Volume> {
        let r = execute(
            s,
            Command {
                lun,
                cdb: scsi::read_capacity16(),
                data_in_len: 32,
                ..Command::default()
            },
        )
        .await?;
        let cap = Capacity::parse(&r.data).map_err(|e| anyhow!("READ CAPACITY (16): {e}"))?;
        Ok(Volume {
            lun,
            block_size: cap.block_size,
        })
    }

    fn lba(&self, block: u64) -> (u64, u32) {
        let per = (BLOCK as u32 / self.block_size).max(1);
        (block * u64::from(per), per)
    }

    pub fn write(&self, block: u64, id: u64) -> Command {
        let (lba, n) = self.lba(block);
        Command {
            lun: self.lun,
            cdb: scsi::write16(lba, n, false),
            data_out: Some(Bytes::from(encode(block, id))),
            data_in_len: 0,
        }
    }

    pub fn read(&self, block: u64) -> Command {
        let (lba, n) = self.lba(block);
        Command {
            lun: self.lun,
            cdb: scsi::read16(lba, n),
            data_in_len: BLOCK as u32,
            ..Command::default()
        }
    }
}

fn local_leader(c: &Cluster, id: u64, group: u64) -> Option<u64> {
    let out = c.raftsan_on(id, &["status", "--json", "--local"]).ok()?;
    let v: Value = serde_json::from_str(&out.stdout).ok()?;
    group_leader(&v, group)
}

// --- the check -----------------------------------------------------------------------------

/// Steps 1-3 done; [`StaleWrite::finish`] does the rest.
pub struct StaleWrite {
    rt: Handle,
    shared: Arc<Shared>,
    group: u64,
    target: String,
    leader: u64,
    /// The cluster's members when the check began.
    members: Vec<u64>,
    vol: Volume,
    block: u64,
    old_id: u64,
    s1: Arc<Session>,
    proxy: Proxy,
    late: JoinHandle<Result<CommandResult, String>>,
    cut: Rules,
    held_at: Instant,
}

impl StaleWrite {
    /// Opens S1 through the proxy to `leader`, writes w0, sends w_old (held) and cuts the
    /// leader's cluster RPC. `members` are the cluster's current nodes.
    #[allow(clippy::too_many_arguments)]
    pub fn begin(
        c: &Cluster,
        members: &[u64],
        rt: &Handle,
        shared: &Arc<Shared>,
        target: &str,
        lun: u64,
        group: u64,
        leader: u64,
    ) -> Result<StaleWrite> {
        // The check needs the node that leads now, in its own view and its peers' (a leadership
        // still settling after the previous fault would leave the cut node a follower whose
        // epoch never moves, and the late write would test nothing).
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut agreed = (None, 0);
        while agreed.1 < 3 {
            let views: Vec<Option<u64>> = members.iter().map(|&n| local_leader(c, n, group)).collect();
            let first = views.first().copied().flatten();
            agreed = if first.is_some() && views.iter().all(|v| *v == first) {
                (first, if agreed.0 == first { agreed.1 + 1 } else { 1 })
            } else {
                (None, 0)
            };
            if Instant::now() > deadline {
                bail!("the nodes did not agree on a leader of volume {group} within 30 s: {views:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let leader = match agreed.0 {
            Some(l) if l != leader => {
                println!("          (node {l} leads now, not node {leader}: the check uses node {l})");
                l
            }
            _ => leader,
        };
        let n = OUTCOMES.lock().unwrap_or_else(|e| e.into_inner()).len() as u64;
        let block = FIRST_BLOCK + n % 4096;
        let portal = SocketAddr::V4(c.node(leader)?.portal());
        let cfg = session_config(target);
        let (proxy, s1, vol, old_id, late) = rt.block_on(async {
            let proxy = Proxy::start(portal).await?;
            let s1 = Arc::new(
                Session::login(proxy.addr, cfg)
                    .await
                    .context("logging in to the leader through the proxy")?,
            );
            let vol = Volume::probe(&s1, lun).await?;
            let start = shared.now_ns();
            let w0 = shared.oracle().begin_write(block, start);
            let r = execute(&s1, vol.write(block, w0)).await;
            let ok = r.as_ref().is_ok_and(|r| r.status == status::GOOD);
            shared.oracle().end_write(block, w0, ok, shared.now_ns());
            let r = r?;
            if !ok {
                bail!("the first write of the stale-write check failed: {}", describe(&r));
            }
            *proxy.hold.armed.lock().unwrap_or_else(|e| e.into_inner()) = true;
            let old_id = shared.oracle().begin_write(block, shared.now_ns());
            let cmd = vol.write(block, old_id);
            let s = s1.clone();
            let late = tokio::spawn(async move { s.execute(cmd).await.map_err(|e| e.to_string()) });
            let mut held = proxy.held.clone();
            tokio::time::timeout(Duration::from_secs(10), held.wait_for(|h| *h))
                .await
                .context("the proxy never saw the write to hold")?
                .map_err(|_| anyhow!("the proxy stopped"))?;
            Ok::<_, anyhow::Error>((proxy, s1, vol, old_id, late))
        })?;
        let cut = faults::isolate_rpc(&c.node(leader)?.ip.to_string())?;
        Ok(StaleWrite {
            rt: rt.clone(),
            shared: shared.clone(),
            group,
            target: target.to_string(),
            leader,
            members: members.to_vec(),
            vol,
            block,
            old_id,
            s1,
            proxy,
            late,
            cut,
            held_at: Instant::now(),
        })
    }

    /// Steps 4-7. A late write that was executed, or a check that could not deliver it, is a
    /// `stale` violation.
    pub fn finish(self, c: &mut Cluster) -> Result<()> {
        let StaleWrite {
            rt,
            shared,
            group,
            target,
            leader,
            members,
            vol,
            block,
            old_id,
            s1,
            proxy,
            late,
            cut,
            held_at,
        } = self;
        // The client gave up on w_old (its fate is unknown) and fails over.
        shared.oracle().end_write(block, old_id, false, shared.now_ns());
        let others: Vec<u64> = members.iter().copied().filter(|&n| n != leader).collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        let new_leader = loop {
            if let Some(l) = others
                .iter()
                .find_map(|&n| local_leader(c, n, group).filter(|&l| l != leader))
            {
                break l;
            }
            if Instant::now() > deadline {
                bail!("no new leader of volume {group} within 30 s of cutting node {leader} off");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let portal = SocketAddr::V4(c.node(new_leader)?.portal());
        let (s2, new_id) = rt.block_on(async {
            let s2 = Session::login(portal, session_config(&target))
                .await
                .context("logging in to the new leader")?;
            let new_id = shared.oracle().begin_write(block, shared.now_ns());
            let r = execute(&s2, vol.write(block, new_id)).await;
            let ok = r.as_ref().is_ok_and(|r| r.status == status::GOOD);
            shared.oracle().end_write(block, new_id, ok, shared.now_ns());
            let r = r?;
            if !ok {
                bail!("the newer write through node {new_leader} failed: {}", describe(&r));
            }
            Ok::<_, anyhow::Error>((s2, new_id))
        })?;
        // Heal the cut; the old leader must see the new one before the late write arrives.
        drop(cut);
        let deadline = Instant::now() + Duration::from_secs(30);
        while local_leader(c, leader, group).is_none_or(|l| l == leader) {
            if Instant::now() > deadline {
                bail!("node {leader} did not learn the new leader within 30 s of the heal");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let held_ms = held_at.elapsed().as_secs_f64() * 1e3;
        proxy.hold.release.notify_one();
        let late = rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), late).await });
        let (late_status, refused, executed) = match late {
            Ok(Ok(Ok(r))) => {
                let refused = r.status == status::CHECK_CONDITION
                    && r.sense.as_deref().and_then(Sense::parse).is_some_and(|s| {
                        s.code.key == key::UNIT_ATTENTION && s.code.asc == 0x2a && s.code.ascq == 0x06
                    });
                (describe(&r), refused, r.status == status::GOOD)
            }
            Ok(Ok(Err(e))) => (format!("session error: {e}"), false, false),
            Ok(Err(e)) => (format!("task failed: {e}"), false, false),
            Err(_) => ("no answer within 30 s".into(), false, false),
        };
        // Read B back through the new leader; the oracle judges it.
        let read = rt.block_on(async {
            let start = shared.now_ns();
            let r = execute(&s2, vol.read(block)).await;
            (start, shared.now_ns(), r)
        });
        let read_back = match read {
            (start, end, Ok(r)) if r.status == status::GOOD => {
                let _ = shared.oracle().check_read(block, &r.data, start, end);
                match decode(&r.data) {
                    Content::Write { id, .. } if id == new_id => format!("write {id} (the newer one)"),
                    Content::Write { id, .. } if id == old_id => format!("write {id} (THE STALE ONE)"),
                    other => format!("{other:?}"),
                }
            }
            (_, _, Ok(r)) => format!("read failed: {}", describe(&r)),
            (_, _, Err(e)) => format!("read failed: {e:#}"),
        };
        let mut problems = Vec::new();
        if executed {
            problems.push(format!(
                "the late write {old_id} was executed (GOOD) on node {leader} after write {new_id} was acknowledged"
            ));
        } else if !refused {
            problems.push(format!(
                "the late write {old_id} was not refused with UNIT ATTENTION 2A/06: {late_status}"
            ));
        }
        if !read_back.contains("the newer one") {
            problems.push(format!(
                "block {block} read back through node {new_leader}: {read_back}"
            ));
        }
        {
            let mut o = shared.oracle();
            for p in problems {
                o.violations.push(Violation {
                    block,
                    kind: "stale",
                    detail: p,
                });
            }
        }
        println!(
            "          late write {old_id} to block {block}: {late_status}; block reads {read_back} (held {:.1} s)",
            held_ms / 1e3
        );
        OUTCOMES.lock().unwrap_or_else(|e| e.into_inner()).push(StaleOutcome {
            block,
            old_write: old_id,
            new_write: new_id,
            held_ms,
            late_status,
            refused,
            read_back,
        });
        rt.block_on(async {
            let _ = tokio::time::timeout(Duration::from_secs(5), s1.logout()).await;
            let _ = tokio::time::timeout(Duration::from_secs(5), s2.logout()).await;
        });
        proxy.task.abort();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pdus_are_framed_without_digests() {
        let mut b = vec![0u8; BHS];
        assert_eq!(pdu_len(&b), Some(48));
        assert_eq!(pdu_len(&b[..47]), None);
        b[4] = 1; // 4 bytes of AHS
        b[7] = 5; // 5 bytes of data, padded to 8
        assert_eq!(pdu_len(&b), None);
        b.resize(48 + 4 + 8, 0);
        assert_eq!(pdu_len(&b), Some(60));
        b[5] = 1; // 65541 bytes of data
        assert_eq!(pdu_len(&b), None);
    }
}
