//! One iSCSI connection: login phase, then discovery or full-feature phase (RFC 7143 §6, §4.2).
//!
//! Tasks per connection:
//! * the reader (this module's [`run`]) owns the byte buffer, the CmdSN window and the Data-Out
//!   collection of write commands; it never waits on the backing store;
//! * one writer task owns the socket's write half and StatSN: everything sent after login goes
//!   through its channel as [`Out`], so StatSN is assigned in send order;
//! * one task per ready SCSI command runs the logical unit and queues the reply.
//!
//! Bounds (DESIGN.md invariant 6): the CmdSN window (`cmd_window`, with MaxCmdSN closing as
//! commands stay in flight), out-of-order commands held (≤ window), write bytes buffered per
//! session (`max_session_write_bytes`, beyond it TASK SET FULL), R2Ts per task
//! (MaxOutstandingR2T), data segment length (our MaxRecvDataSegmentLength), login time.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use raftsan_proto::login::{LoginAuthority, LoginFailure, LoginStep, Lookup, TargetAuth, TargetLogin};
use raftsan_proto::pdu::{
    self, Bhs, DataIn, DataOut, Digests, Framing, LogoutRequest, NopIn, NopOut, Pdu, ReadyToTransfer, Reject, Request,
    Residual, ScsiCommand, ScsiResponse, TaskMgmtRequest, TaskMgmtResponse, TextRequest, TextResponse, reject_reason,
    tmf,
};
use raftsan_proto::scsi::sense::status;
use raftsan_proto::serial;
use raftsan_proto::text::{self, SendTarget, SessionParams, SessionType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, mpsc, watch};

use super::{OwnedCommand, PortalServer, Reset, SessionInfo, TargetRuntime, lock};
use crate::lu::{Command, Nexus, TargetPort};
use crate::metrics::Op;

/// Data segment limit while logging in, before MaxRecvDataSegmentLength is negotiated
/// (RFC 7143 §13.12 default 8192; leave room for initiators that send more text).
const LOGIN_MAX_DATA_SEGMENT: u32 = 65536;
/// PDUs queued for the writer; an initiator that lets more pile up is not reading responses.
const MAX_QUEUED_PDUS: usize = 4096;
/// Text accumulated across continued Text Requests.
const MAX_TEXT_BYTES: usize = 64 * 1024;

/// Why a connection ended (for the log line).
#[derive(Debug)]
enum End {
    Closed,
    Logout,
    Reinstated,
    Io(std::io::Error),
    Protocol(String),
}

/// How a queued PDU uses StatSN (RFC 7143 §4.2.2.2).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sn {
    /// A status-carrying PDU: takes the next StatSN.
    Advance,
    /// Carries the next StatSN without consuming it (R2T, target NOP-In ping).
    Peek,
}

/// What the reader and command tasks hand the writer.
enum Out {
    Pdu {
        bhs: Bhs,
        data: Bytes,
        sn: Sn,
    },
    Scsi(ScsiReply),
    /// Flush what is queued and close the connection (after a Logout Response).
    Close,
}

struct ScsiReply {
    itt: u32,
    lun: u64,
    status: u8,
    sense: Option<Vec<u8>>,
    data_in: Bytes,
    residual: Residual,
}

/// Sequence state shared by the reader (which advances ExpCmdSN) and the writer (which reports it).
struct Window {
    exp_cmdsn: AtomicU32,
    in_flight: AtomicU32,
    size: u32,
}

impl Window {
    fn exp(&self) -> u32 {
        self.exp_cmdsn.load(Ordering::Acquire)
    }
    /// MaxCmdSN closes as commands stay in flight, so the initiator can never have more than
    /// `size` commands queued or running (RFC 7143 §4.2.2.1: MaxCmdSN = ExpCmdSN - 1 closes it).
    fn max(&self) -> u32 {
        let free = self.size.saturating_sub(self.in_flight.load(Ordering::Acquire));
        self.exp().wrapping_add(free).wrapping_sub(1)
    }
}

/// A task the session knows about, for task management.
struct TaskCtl {
    lun: u64,
    aborted: AtomicBool,
    done: Notify,
    finished: AtomicBool,
}

/// Per-session state shared with command tasks.
struct Session {
    target: Arc<TargetRuntime>,
    nexus: Nexus,
    out: mpsc::Sender<Out>,
    window: Arc<Window>,
    tasks: Mutex<HashMap<u32, Arc<TaskCtl>>>,
    write_bytes: AtomicU64,
}

/// A write command collecting its Data-Out.
struct WriteTask {
    cmd: ScsiCommand,
    cdb: Vec<u8>,
    buf: Vec<u8>,
    received: u32,
    /// Offset from which the next R2T asks for data.
    next_r2t_offset: u32,
    outstanding_r2t: u32,
    next_r2tsn: u32,
    /// Expected DataSN of the next Data-Out per sequence (keyed by TTT).
    datasn: HashMap<u32, u32>,
}

pub(super) async fn run(server: Arc<PortalServer>, stream: TcpStream, peer: SocketAddr) {
    let local = stream.local_addr().unwrap_or(peer);
    let (rd, wr) = stream.into_split();
    let mut conn = Conn {
        server: server.clone(),
        peer,
        local,
        rd,
        buf: BytesMut::with_capacity(64 * 1024),
        digests: Digests::default(),
        max_recv: LOGIN_MAX_DATA_SEGMENT,
    };
    let mut wr = wr;
    let login = tokio::time::timeout(server.settings.login_timeout, conn.login(&mut wr)).await;
    let done = match login {
        Err(_) => {
            tracing::warn!(%peer, "login timed out; closing");
            return;
        }
        Ok(Err(end)) => {
            tracing::debug!(%peer, ?end, "connection ended during login");
            return;
        }
        Ok(Ok(done)) => done,
    };
    let tsih = done.tsih;
    let end = conn.full_feature(wr, done).await;
    server.unregister_session(tsih);
    match end {
        End::Closed | End::Logout => tracing::info!(%peer, tsih, "session closed ({end:?})"),
        End::Reinstated => tracing::info!(%peer, tsih, "session closed: reinstated by a new login"),
        End::Io(e) => tracing::info!(%peer, tsih, error = %e, "connection lost"),
        End::Protocol(why) => {
            server.metrics.protocol_errors.increment(1);
            tracing::warn!(%peer, tsih, "closing connection on protocol error: {why}");
        }
    }
}

struct LoginDone {
    tsih: u16,
    params: SessionParams,
    target: Option<Arc<TargetRuntime>>,
    isid: [u8; 6],
    exp_cmdsn: u32,
    statsn: u32,
    close: watch::Receiver<bool>,
}

struct Conn {
    server: Arc<PortalServer>,
    peer: SocketAddr,
    local: SocketAddr,
    rd: OwnedReadHalf,
    buf: BytesMut,
    digests: Digests,
    max_recv: u32,
}

/// Answers the login machine's questions from the catalog and the connection's peer address.
struct Authority<'a> {
    server: &'a PortalServer,
    peer: SocketAddr,
}

impl LoginAuthority for Authority<'_> {
    fn lookup(&self, session_type: SessionType, target_name: Option<&str>, initiator_name: &str) -> Lookup {
        let tpgt = self.server.settings.tpgt;
        let secret = |a: &crate::catalog::ChapAccount| (a.user.clone(), a.secret.as_bytes().to_vec());
        match session_type {
            SessionType::Discovery => Lookup::Allowed(TargetAuth {
                accounts: self.server.catalog.discovery_users.iter().map(secret).collect(),
                mutual: self.server.catalog.discovery_outgoing_user.as_ref().map(secret),
                target_alias: None,
                tpgt,
            }),
            SessionType::Normal => {
                let Some(t) = target_name.and_then(|n| self.server.target(n)) else {
                    tracing::warn!(peer = %self.peer, initiator = initiator_name, target = ?target_name, "login refused: no such target");
                    return Lookup::NotFound;
                };
                if let Err(why) = t.def.admits(initiator_name, self.peer.ip()) {
                    tracing::warn!(peer = %self.peer, initiator = initiator_name, target = %t.def.name, ?why, "login refused by the target's ACL");
                    return Lookup::Denied;
                }
                Lookup::Allowed(TargetAuth {
                    accounts: t.def.incoming_users.iter().map(secret).collect(),
                    mutual: t.def.outgoing_user.as_ref().map(secret),
                    target_alias: t.def.alias.clone(),
                    tpgt,
                })
            }
        }
    }
}

impl Conn {
    /// Reads one whole PDU. `Ok(None)` means the peer closed the connection cleanly.
    async fn read_pdu(&mut self) -> Result<Option<Pdu>, End> {
        loop {
            if let Some(p) = self.try_decode()? {
                return Ok(Some(p));
            }
            match self.rd.read_buf(&mut self.buf).await {
                Ok(0) => {
                    return if self.buf.is_empty() {
                        Ok(None)
                    } else {
                        Err(End::Closed)
                    };
                }
                Ok(_) => {}
                Err(e) => return Err(End::Io(e)),
            }
        }
    }

    /// Decodes a PDU if a whole one is buffered.
    fn try_decode(&mut self) -> Result<Option<Pdu>, End> {
        match pdu::check(&self.buf, self.digests, self.max_recv) {
            Ok(Framing::Incomplete { needed }) => {
                self.buf.reserve(needed.saturating_sub(self.buf.len()));
                Ok(None)
            }
            Ok(Framing::Complete { len }) => {
                let bytes = self.buf.split_to(len).freeze();
                pdu::decode(bytes, self.digests)
                    .map(Some)
                    .map_err(|e| End::Protocol(e.to_string()))
            }
            Err(e) => Err(End::Protocol(e.to_string())),
        }
    }

    async fn login(&mut self, wr: &mut OwnedWriteHalf) -> Result<LoginDone, End> {
        let server = self.server.clone();
        let settings = &server.settings;
        let challenge: Vec<u8> = (0..16).map(|_| rand::random::<u8>()).collect();
        let mut machine = TargetLogin::new(settings.iscsi.clone(), rand::random::<u8>(), challenge);
        let mut statsn: Option<u32> = None;
        loop {
            let Some(p) = self.read_pdu().await? else {
                return Err(End::Closed);
            };
            let Ok(Request::Login(req)) = Request::parse(&p.bhs) else {
                return Err(End::Protocol(format!("{:?} before login completed", p.bhs.opcode())));
            };
            // The first response's StatSN starts the connection's sequence (§11.13.4).
            let sn = *statsn.get_or_insert(req.exp_statsn);
            let step = machine.on_request(
                &raftsan_proto::login::LoginRequest {
                    header: req,
                    data: &p.data,
                },
                &Authority {
                    server: &self.server,
                    peer: self.peer,
                },
            );
            let respond = |r: &raftsan_proto::login::LoginResponse, tsih: u16| {
                let bhs = pdu::LoginResponse {
                    transit: r.transit,
                    cont: r.cont,
                    csg: r.csg,
                    nsg: r.nsg,
                    version_max: r.version_max,
                    version_active: r.version_active,
                    isid: req.isid,
                    tsih,
                    itt: req.itt,
                    seq: pdu::Sequence {
                        statsn: sn,
                        exp_cmdsn: req.cmdsn,
                        max_cmdsn: req.cmdsn.wrapping_add(settings.cmd_window).wrapping_sub(1),
                    },
                    status_class: r.status_class,
                    status_detail: r.status_detail,
                }
                .to_bhs();
                let mut out = BytesMut::new();
                pdu::encode_parts(bhs, &[], &r.data, Digests::default(), &mut out);
                out
            };
            statsn = Some(sn.wrapping_add(1));
            match step {
                LoginStep::Continue(r) => {
                    wr.write_all(&respond(&r, req.tsih)).await.map_err(End::Io)?;
                }
                LoginStep::Failed(r, why) => {
                    let m = &self.server.metrics;
                    match why {
                        LoginFailure::AuthenticationFailed => m.login_auth_failure.increment(1),
                        LoginFailure::AuthorizationFailed => m.login_acl_denied.increment(1),
                        LoginFailure::NotFound => m.login_not_found.increment(1),
                        _ => m.login_protocol_error.increment(1),
                    }
                    tracing::warn!(peer = %self.peer, reason = ?why, status = format_args!("{:02x}{:02x}", r.status_class, r.status_detail), "login failed");
                    let _ = wr.write_all(&respond(&r, 0)).await;
                    return Err(End::Closed);
                }
                LoginStep::FullFeature(mut r, params) => {
                    let target = match params.session_type {
                        SessionType::Normal => params.target_name.as_deref().and_then(|n| self.server.target(n)),
                        SessionType::Discovery => None,
                    };
                    if req.tsih != 0 {
                        // Adding a connection to a session (MC/S): MaxConnections is 1.
                        let detail = if self.server.session_exists(req.tsih) {
                            0x06
                        } else {
                            0x0a
                        };
                        fail_status(&mut r, 0x02, detail);
                        self.server.metrics.login_protocol_error.increment(1);
                        let _ = wr.write_all(&respond(&r, 0)).await;
                        return Err(End::Closed);
                    }
                    let info = SessionInfo {
                        tsih: 0,
                        nexus_id: 0,
                        target: target.as_ref().map(|t| t.def.name.clone()),
                        initiator_name: params.initiator_name.clone(),
                        isid: hex::encode(req.isid),
                        peer: self.peer,
                        local: self.local,
                        discovery: params.session_type == SessionType::Discovery,
                        chap_user: machine.authenticated_user().map(str::to_string),
                        header_digest: params.header_digest,
                        data_digest: params.data_digest,
                    };
                    let Some((tsih, close)) = self.server.register_session(info) else {
                        // Out of resources (§11.13.5, 0x0302).
                        fail_status(&mut r, 0x03, 0x02);
                        tracing::warn!(peer = %self.peer, "login refused: session limit reached");
                        let _ = wr.write_all(&respond(&r, 0)).await;
                        return Err(End::Closed);
                    };
                    wr.write_all(&respond(&r, tsih)).await.map_err(End::Io)?;
                    self.server.metrics.login_ok.increment(1);
                    tracing::info!(
                        peer = %self.peer, tsih, initiator = %params.initiator_name, target = ?params.target_name,
                        discovery = params.session_type == SessionType::Discovery, "login succeeded"
                    );
                    self.digests = Digests {
                        header: params.header_digest,
                        data: params.data_digest,
                    };
                    self.max_recv = params.target_max_recv_data_segment_length;
                    return Ok(LoginDone {
                        tsih,
                        target,
                        isid: req.isid,
                        exp_cmdsn: req.cmdsn,
                        statsn: sn.wrapping_add(1),
                        params,
                        close,
                    });
                }
            }
        }
    }

    async fn full_feature(mut self, wr: OwnedWriteHalf, login: LoginDone) -> End {
        let settings = self.server.settings.clone();
        let window = Arc::new(Window {
            exp_cmdsn: AtomicU32::new(login.exp_cmdsn),
            in_flight: AtomicU32::new(0),
            size: settings.cmd_window.max(1),
        });
        let (out_tx, out_rx) = mpsc::channel(MAX_QUEUED_PDUS);
        let writer = tokio::spawn(writer(
            wr,
            out_rx,
            window.clone(),
            login.statsn,
            self.digests,
            login.params.initiator_max_recv_data_segment_length.max(512),
        ));
        let session = login.target.as_ref().map(|t| {
            let nexus = Nexus {
                id: self.server.next_nexus_id(),
                initiator_name: login.params.initiator_name.clone(),
                initiator_port: format!("{},i,0x{}", login.params.initiator_name, hex::encode(login.isid)),
                isid: login.isid,
                tsih: login.tsih,
                target_port: TargetPort {
                    target_name: t.def.name.clone(),
                    tpgt: settings.tpgt,
                    relative_port_id: settings.relative_port_id,
                    port_group: settings.port_group,
                },
            };
            match &t.router {
                Some(r) => r.nexus_joined(&nexus),
                None => t.lus.nexus_joined(&nexus),
            }
            Arc::new(Session {
                target: t.clone(),
                nexus,
                out: out_tx.clone(),
                window: window.clone(),
                tasks: Mutex::new(HashMap::new()),
                write_bytes: AtomicU64::new(0),
            })
        });
        let mut ffp = FullFeature {
            overflow: std::cell::Cell::new(false),
            server: self.server.clone(),
            local: self.local,
            peer: self.peer,
            params: login.params,
            session,
            out: out_tx,
            window,
            writes: HashMap::new(),
            held: BTreeMap::new(),
            next_ttt: 1,
            text: Vec::new(),
            text_pending: None,
            nop_ttt: 0,
            nop_pending: None,
            tsih: login.tsih,
        };
        let mut close = login.close;
        let nop_interval = settings.nop_in_interval;
        let mut nop_timer = tokio::time::interval(if nop_interval.is_zero() {
            std::time::Duration::from_secs(3600)
        } else {
            nop_interval
        });
        nop_timer.tick().await;
        let end = loop {
            // Handle every whole PDU already buffered before reading again.
            let pdu = match self.try_decode() {
                Ok(Some(p)) => p,
                Ok(None) => {
                    tokio::select! {
                        r = self.rd.read_buf(&mut self.buf) => match r {
                            Ok(0) => break End::Closed,
                            Ok(_) => continue,
                            Err(e) => break End::Io(e),
                        },
                        _ = close.changed() => break End::Reinstated,
                        _ = nop_timer.tick(), if !nop_interval.is_zero() => {
                            if let Some(sent) = ffp.nop_pending
                                && sent.elapsed() > settings.nop_in_timeout
                            {
                                break End::Protocol(format!("no answer to NOP-In ping within {:?}", settings.nop_in_timeout));
                            }
                            ffp.ping();
                            continue;
                        }
                    }
                }
                Err(e) => break e,
            };
            match ffp.handle(pdu).await {
                Ok(true) if ffp.overflow.get() => {
                    break End::Protocol(format!(
                        "the initiator is not reading its responses ({MAX_QUEUED_PDUS} PDUs queued)"
                    ));
                }
                Ok(true) => {}
                Ok(false) => break End::Logout,
                Err(e) => break e,
            }
        };
        // Wait for running commands so the LU sees no I/O from a nexus that is gone.
        if let Some(s) = &ffp.session {
            let tasks: Vec<Arc<TaskCtl>> = lock(&s.tasks).values().cloned().collect();
            for t in tasks {
                t.aborted.store(true, Ordering::Release);
                wait_done(&t).await;
            }
            match &s.target.router {
                Some(r) => r.nexus_left(&s.nexus),
                None => s.target.lus.nexus_left(&s.nexus),
            }
        }
        let _ = ffp.out.try_send(Out::Close);
        drop(ffp);
        // A peer that stopped reading can hold the writer in a blocked write forever.
        let abort = writer.abort_handle();
        if tokio::time::timeout(std::time::Duration::from_secs(5), writer)
            .await
            .is_err()
        {
            abort.abort();
        }
        end
    }
}

fn fail_status(r: &mut raftsan_proto::login::LoginResponse, class: u8, detail: u8) {
    r.status_class = class;
    r.status_detail = detail;
    r.transit = false;
    r.data.clear();
}

/// The LU side of a reset: the router's when the target has one (the cluster resets the
/// volume's leader), else the target's own LUs.
async fn reset(s: &Session, what: Reset) -> bool {
    match &s.target.router {
        Some(r) => r.reset(s.target.clone(), s.nexus.clone(), what).await,
        None => s.target.reset_local(&s.nexus, what),
    }
}

async fn wait_done(t: &TaskCtl) {
    loop {
        let notified = t.done.notified();
        if t.finished.load(Ordering::Acquire) {
            return;
        }
        notified.await;
    }
}

struct FullFeature {
    /// Set when the writer queue is full: the initiator does not read its responses.
    overflow: std::cell::Cell<bool>,
    server: Arc<PortalServer>,
    local: SocketAddr,
    peer: SocketAddr,
    params: SessionParams,
    session: Option<Arc<Session>>,
    out: mpsc::Sender<Out>,
    window: Arc<Window>,
    writes: HashMap<u32, WriteTask>,
    /// Non-immediate commands that arrived ahead of ExpCmdSN, keyed by CmdSN.
    held: BTreeMap<u32, Pdu>,
    next_ttt: u32,
    text: Vec<u8>,
    /// A Text Response too long for one PDU: (TTT, remaining bytes).
    text_pending: Option<(u32, Vec<u8>)>,
    nop_ttt: u32,
    nop_pending: Option<Instant>,
    tsih: u16,
}

impl FullFeature {
    fn send(&self, bhs: Bhs, data: Bytes, sn: Sn) {
        if self.out.try_send(Out::Pdu { bhs, data, sn }).is_err() {
            // The initiator is not reading what we send: stop serving it (checked after each PDU).
            self.overflow.set(true);
        }
    }

    fn reject(&self, reason: u8, bhs: &Bhs) {
        tracing::debug!(tsih = self.tsih, reason, opcode = ?bhs.opcode(), "rejecting PDU");
        let r = Reject {
            reason,
            seq: Default::default(),
            datasn_r2tsn: 0,
        }
        .to_bhs();
        self.send(r, Bytes::copy_from_slice(&bhs.0), Sn::Advance);
    }

    fn ping(&mut self) {
        if self.nop_pending.is_some() {
            return;
        }
        self.nop_ttt = self.nop_ttt.wrapping_add(1).max(1);
        if self.nop_ttt == pdu::RESERVED_TAG {
            self.nop_ttt = 1;
        }
        self.nop_pending = Some(Instant::now());
        let b = NopIn {
            lun: 0,
            itt: pdu::RESERVED_TAG,
            ttt: self.nop_ttt,
            seq: Default::default(),
        }
        .to_bhs();
        self.send(b, Bytes::new(), Sn::Peek);
    }

    fn alloc_ttt(&mut self) -> u32 {
        let t = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1);
        if self.next_ttt == pdu::RESERVED_TAG {
            self.next_ttt = 1;
        }
        t
    }

    /// Handles one PDU; `Ok(false)` ends the session after a Logout.
    async fn handle(&mut self, p: Pdu) -> Result<bool, End> {
        let req = match Request::parse(&p.bhs) {
            Ok(r) => r,
            Err(_) => {
                self.reject(reject_reason::COMMAND_NOT_SUPPORTED, &p.bhs);
                return Ok(true);
            }
        };
        // Data-Out and SNACK carry no CmdSN; everything else goes through the window.
        match &req {
            Request::DataOut(d) => {
                self.data_out(d, &p)?;
                return Ok(true);
            }
            Request::Snack(_) => {
                // ErrorRecoveryLevel 0: SNACK is not supported (§11.16).
                self.reject(reject_reason::COMMAND_NOT_SUPPORTED, &p.bhs);
                return Ok(true);
            }
            Request::NopOut(n) if n.itt == pdu::RESERVED_TAG => {
                // The answer to our ping (immediate, no CmdSN advance).
                if n.ttt == self.nop_ttt {
                    self.nop_pending = None;
                }
                return Ok(true);
            }
            _ => {}
        }
        let immediate = p.bhs.immediate();
        let cmdsn = req.cmdsn().unwrap_or(0);
        if !immediate {
            let exp = self.window.exp();
            if cmdsn != exp {
                if serial::lt(exp, cmdsn)
                    && serial::le(cmdsn, self.window.max())
                    && self.held.len() < self.window.size as usize
                {
                    // Ahead of a gap: hold until the missing commands arrive (§3.2.2.1).
                    self.held.insert(cmdsn, p);
                } else {
                    // Outside the window: silently ignored (§4.2.2.1).
                    tracing::debug!(
                        tsih = self.tsih,
                        cmdsn,
                        exp,
                        max = self.window.max(),
                        "dropping command outside the CmdSN window"
                    );
                }
                return Ok(true);
            }
            self.window.exp_cmdsn.store(exp.wrapping_add(1), Ordering::Release);
        }
        let mut keep = self.dispatch(req, p).await?;
        // Commands held behind the gap may now be in order.
        while keep {
            let exp = self.window.exp();
            let Some(next) = self.held.remove(&exp) else { break };
            self.window.exp_cmdsn.store(exp.wrapping_add(1), Ordering::Release);
            match Request::parse(&next.bhs) {
                Ok(r) => keep = self.dispatch(r, next).await?,
                Err(_) => self.reject(reject_reason::COMMAND_NOT_SUPPORTED, &next.bhs),
            }
        }
        Ok(keep)
    }

    async fn dispatch(&mut self, req: Request, p: Pdu) -> Result<bool, End> {
        match req {
            Request::ScsiCommand(c) => self.scsi_command(c, p)?,
            Request::NopOut(n) => self.nop_out(n, p),
            Request::TaskMgmt(t) => self.task_mgmt(t).await,
            Request::Text(t) => self.text_request(t, p)?,
            Request::Logout(l) => {
                self.logout(l).await;
                return Ok(false);
            }
            Request::Login(_) => {
                self.reject(reject_reason::PROTOCOL_ERROR, &p.bhs);
            }
            Request::DataOut(_) | Request::Snack(_) => unreachable!("handled before the CmdSN window"),
        }
        Ok(true)
    }

    fn nop_out(&mut self, n: NopOut, p: Pdu) {
        // Echo the ping data (bounded by what the initiator accepts).
        let max = self.params.initiator_max_recv_data_segment_length as usize;
        let data = p.data.slice(..p.data.len().min(max));
        let b = NopIn {
            lun: n.lun,
            itt: n.itt,
            ttt: pdu::RESERVED_TAG,
            seq: Default::default(),
        }
        .to_bhs();
        self.send(b, data, Sn::Advance);
    }

    fn scsi_command(&mut self, c: ScsiCommand, p: Pdu) -> Result<(), End> {
        let Some(session) = self.session.clone() else {
            // Discovery sessions carry no SCSI commands (§4.3).
            self.reject(reject_reason::PROTOCOL_ERROR, &p.bhs);
            return Ok(());
        };
        let cdb = match c.full_cdb(&p.ahs) {
            Ok(cdb) => cdb,
            Err(_) => {
                self.reject(reject_reason::INVALID_PDU_FIELD, &p.bhs);
                return Ok(());
            }
        };
        if self.writes.contains_key(&c.itt) || lock(&session.tasks).contains_key(&c.itt) {
            // A task tag must be unique among running tasks (§11.1).
            self.reject(reject_reason::TASK_IN_PROGRESS, &p.bhs);
            return Ok(());
        }
        let edtl = c.expected_data_len;
        let immediate = p.data.len() as u32;
        if immediate > 0
            && (!c.write
                || !self.params.immediate_data
                || immediate > edtl
                || immediate > self.params.first_burst_length)
        {
            return Err(End::Protocol(format!(
                "SCSI command ITT {:#x} carries {immediate} bytes of immediate data (EDTL {edtl}, W {}, ImmediateData {}, FirstBurstLength {})",
                c.itt, c.write, self.params.immediate_data, self.params.first_burst_length
            )));
        }
        if edtl > self.server.settings.max_transfer_bytes {
            self.complete_now(
                &session,
                &c,
                Op::of(&cdb),
                status::CHECK_CONDITION,
                Some(fixed_sense(raftsan_proto::scsi::sense::INVALID_FIELD_IN_CDB)),
            );
            return Ok(());
        }
        if !c.write || edtl == immediate {
            let data = if c.write { p.data.clone() } else { Bytes::new() };
            self.execute(&session, c, cdb, data);
            return Ok(());
        }
        // A write that needs Data-Out: account for its buffer first.
        let budget = self.server.settings.max_session_write_bytes;
        if session.write_bytes.fetch_add(u64::from(edtl), Ordering::AcqRel) + u64::from(edtl) > budget {
            session.write_bytes.fetch_sub(u64::from(edtl), Ordering::AcqRel);
            self.complete_now(&session, &c, Op::of(&cdb), status::TASK_SET_FULL, None);
            return Ok(());
        }
        let mut buf = vec![0u8; edtl as usize];
        buf[..immediate as usize].copy_from_slice(&p.data);
        // Unsolicited Data-Out follows when InitialR2T=No and F is clear (§4.2.5.2).
        let unsolicited_end = if !self.params.initial_r2t && !c.final_ {
            self.params.first_burst_length.min(edtl).max(immediate)
        } else {
            immediate
        };
        let mut task = WriteTask {
            cmd: c,
            cdb,
            buf,
            received: immediate,
            next_r2t_offset: unsolicited_end,
            outstanding_r2t: 0,
            next_r2tsn: 0,
            datasn: HashMap::new(),
        };
        if unsolicited_end > immediate {
            task.datasn.insert(pdu::RESERVED_TAG, 0);
        }
        self.issue_r2ts(&mut task);
        self.window.in_flight.fetch_add(1, Ordering::AcqRel);
        self.writes.insert(c.itt, task);
        Ok(())
    }

    /// Sends R2Ts until MaxOutstandingR2T are out or everything is asked for (§4.2.5.3).
    fn issue_r2ts(&mut self, task: &mut WriteTask) {
        let edtl = task.cmd.expected_data_len;
        while task.outstanding_r2t < self.params.max_outstanding_r2t.max(1) && task.next_r2t_offset < edtl {
            let len = (edtl - task.next_r2t_offset).min(self.params.max_burst_length);
            let ttt = self.alloc_ttt();
            let b = ReadyToTransfer {
                lun: task.cmd.lun,
                itt: task.cmd.itt,
                ttt,
                seq: Default::default(),
                r2tsn: task.next_r2tsn,
                buffer_offset: task.next_r2t_offset,
                desired_len: len,
            }
            .to_bhs();
            self.send(b, Bytes::new(), Sn::Peek);
            task.datasn.insert(ttt, 0);
            task.next_r2tsn = task.next_r2tsn.wrapping_add(1);
            task.next_r2t_offset += len;
            task.outstanding_r2t += 1;
        }
    }

    fn data_out(&mut self, d: &DataOut, p: &Pdu) -> Result<(), End> {
        let Some(mut task) = self.writes.remove(&d.itt) else {
            // Data for a task we no longer have (aborted, or already failed): drop it.
            tracing::debug!(tsih = self.tsih, itt = d.itt, "Data-Out for an unknown task ignored");
            return Ok(());
        };
        let edtl = task.cmd.expected_data_len;
        let len = p.data.len() as u32;
        let Some(expected_sn) = task.datasn.get_mut(&d.ttt) else {
            self.fail_write(task, &format!("Data-Out with unknown TTT {:#x}", d.ttt));
            return Ok(());
        };
        if d.datasn != *expected_sn {
            // ERL 0 cannot recover a lost or reordered Data-Out (§7.1.4.1): the command fails,
            // the session stays up for everything else.
            let why = format!("Data-Out DataSN {} where {} was expected", d.datasn, expected_sn);
            self.fail_write(task, &why);
            return Ok(());
        }
        *expected_sn += 1;
        let end = d.buffer_offset.checked_add(len).filter(|&e| e <= edtl);
        let Some(end) = end else {
            return Err(End::Protocol(format!(
                "Data-Out at offset {} with {len} bytes overruns the expected data transfer length {edtl}",
                d.buffer_offset
            )));
        };
        task.buf[d.buffer_offset as usize..end as usize].copy_from_slice(&p.data);
        task.received += len;
        if d.final_ && d.ttt != pdu::RESERVED_TAG {
            task.outstanding_r2t = task.outstanding_r2t.saturating_sub(1);
            task.datasn.remove(&d.ttt);
            self.issue_r2ts(&mut task);
        } else if d.final_ {
            task.datasn.remove(&d.ttt);
        }
        if task.received >= edtl && task.outstanding_r2t == 0 && task.next_r2t_offset >= edtl {
            let session = self
                .session
                .clone()
                .ok_or_else(|| End::Protocol("Data-Out in a discovery session".into()))?;
            session.write_bytes.fetch_sub(u64::from(edtl), Ordering::AcqRel);
            // The command was counted in flight when it arrived.
            self.window.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.execute(&session, task.cmd, task.cdb, Bytes::from(task.buf));
        } else {
            self.writes.insert(d.itt, task);
        }
        Ok(())
    }

    /// Ends a write whose Data-Out went wrong with CHECK CONDITION, ABORTED COMMAND / DATA PHASE
    /// ERROR (4B/00), without touching the medium. Later Data-Out for it is ignored.
    fn fail_write(&mut self, task: WriteTask, why: &str) {
        tracing::warn!(tsih = self.tsih, itt = task.cmd.itt, "failing write command: {why}");
        self.server.metrics.protocol_errors.increment(1);
        let Some(session) = self.session.clone() else { return };
        session
            .write_bytes
            .fetch_sub(u64::from(task.cmd.expected_data_len), Ordering::AcqRel);
        self.window.in_flight.fetch_sub(1, Ordering::AcqRel);
        let code =
            raftsan_proto::scsi::sense::SenseCode::new(raftsan_proto::scsi::sense::key::ABORTED_COMMAND, 0x4b, 0x00);
        self.complete_now(
            &session,
            &task.cmd,
            Op::of(&task.cdb),
            status::CHECK_CONDITION,
            Some(fixed_sense(code)),
        );
    }

    /// Answers a command without running it (limits exceeded, failed Data-Out phase). It counts
    /// as a completed command of its op, and a CHECK CONDITION by its sense key, as in
    /// [`Self::execute`]; it has no latency sample (nothing ran).
    fn complete_now(&self, session: &Session, c: &ScsiCommand, op: Op, status: u8, sense: Option<Vec<u8>>) {
        let handles = session.target.metrics.lun(c.lun);
        handles.commands[op as usize].increment(1);
        if status == status::CHECK_CONDITION {
            handles.check_condition(sense.as_deref());
        }
        let reply = ScsiReply {
            itt: c.itt,
            lun: c.lun,
            status,
            sense,
            data_in: Bytes::new(),
            residual: Residual::between(c.expected_data_len, 0),
        };
        if session.out.try_send(Out::Scsi(reply)).is_err() {
            self.overflow.set(true);
        }
    }

    /// Runs a command whose data is complete on its own task.
    fn execute(&self, session: &Arc<Session>, c: ScsiCommand, cdb: Vec<u8>, data_out: Bytes) {
        let ctl = Arc::new(TaskCtl {
            lun: c.lun,
            aborted: AtomicBool::new(false),
            done: Notify::new(),
            finished: AtomicBool::new(false),
        });
        lock(&session.tasks).insert(c.itt, ctl.clone());
        self.window.in_flight.fetch_add(1, Ordering::AcqRel);
        let session = session.clone();
        tokio::spawn(async move {
            let handles = session.target.metrics.lun(c.lun);
            let op = Op::of(&cdb);
            handles.in_flight.increment(1.0);
            let start = Instant::now();
            let outcome = match &session.target.router {
                Some(router) => {
                    let cmd = OwnedCommand {
                        lun: c.lun,
                        cdb,
                        data_out,
                        expected_transfer_len: c.expected_data_len,
                        task_attr: c.attr,
                    };
                    router.execute(session.target.clone(), session.nexus.clone(), cmd).await
                }
                None => {
                    let cmd = Command {
                        lun: c.lun,
                        cdb: &cdb,
                        data_out: &data_out,
                        expected_transfer_len: c.expected_data_len,
                        task_attr: c.attr,
                    };
                    session.target.lus.execute(&session.nexus, &cmd).await
                }
            };
            handles.duration[op as usize].record(start.elapsed().as_secs_f64());
            handles.commands[op as usize].increment(1);
            handles.in_flight.decrement(1.0);
            if outcome.status == status::CHECK_CONDITION {
                handles.check_condition(outcome.sense.as_deref());
            }
            let edtl = c.expected_data_len;
            let (data_in, residual) = if c.write && !c.read {
                let wanted = outcome.scsi_transfer_len.unwrap_or(edtl);
                handles.write_bytes.increment(u64::from(wanted.min(edtl)));
                (Bytes::new(), Residual::between(edtl, wanted))
            } else {
                let produced = outcome.data_in.len() as u32;
                // Data beyond what the initiator expects is not sent (§11.4.5.2: overflow).
                let expected = if c.read { edtl } else { 0 };
                let mut data = outcome.data_in;
                data.truncate(expected as usize);
                handles.read_bytes.increment(data.len() as u64);
                (Bytes::from(data), Residual::between(expected, produced))
            };
            // A task aborted by task management gets no response (§4.2.3.4 / SAM-5 §7.11).
            if !ctl.aborted.load(Ordering::Acquire) {
                let _ = session
                    .out
                    .send(Out::Scsi(ScsiReply {
                        itt: c.itt,
                        lun: c.lun,
                        status: outcome.status,
                        sense: outcome.sense,
                        data_in,
                        residual,
                    }))
                    .await;
            }
            lock(&session.tasks).remove(&c.itt);
            session.window.in_flight.fetch_sub(1, Ordering::AcqRel);
            ctl.finished.store(true, Ordering::Release);
            ctl.done.notify_waiters();
        });
    }

    async fn task_mgmt(&mut self, t: TaskMgmtRequest) {
        let response = match self.session.clone() {
            None => tmf::FUNCTION_REJECTED,
            Some(s) => match t.function {
                tmf::ABORT_TASK => {
                    if let Some(w) = self.writes.remove(&t.referenced_task_tag) {
                        s.write_bytes
                            .fetch_sub(u64::from(w.cmd.expected_data_len), Ordering::AcqRel);
                        self.window.in_flight.fetch_sub(1, Ordering::AcqRel);
                        tmf::FUNCTION_COMPLETE
                    } else {
                        let ctl = lock(&s.tasks).get(&t.referenced_task_tag).cloned();
                        match ctl {
                            Some(ctl) => {
                                ctl.aborted.store(true, Ordering::Release);
                                wait_done(&ctl).await;
                                tmf::FUNCTION_COMPLETE
                            }
                            // Not received yet but within the window: it will be ignored when it
                            // comes; already completed: nothing to abort (§11.5.1).
                            None if serial::le(self.window.exp(), t.ref_cmdsn) => tmf::FUNCTION_COMPLETE,
                            None => tmf::TASK_DOES_NOT_EXIST,
                        }
                    }
                }
                tmf::ABORT_TASK_SET | tmf::CLEAR_TASK_SET => {
                    self.abort_where(&s, |lun| lun == t.lun).await;
                    tmf::FUNCTION_COMPLETE
                }
                tmf::LOGICAL_UNIT_RESET => {
                    self.abort_where(&s, |lun| lun == t.lun).await;
                    if reset(&s, Reset::Lun(t.lun)).await {
                        tracing::info!(tsih = self.tsih, lun = t.lun, "logical unit reset");
                        tmf::FUNCTION_COMPLETE
                    } else {
                        tmf::LUN_DOES_NOT_EXIST
                    }
                }
                tmf::TARGET_WARM_RESET | tmf::TARGET_COLD_RESET => {
                    self.abort_where(&s, |_| true).await;
                    reset(&s, Reset::Target).await;
                    tracing::info!(tsih = self.tsih, function = t.function, "target reset");
                    tmf::FUNCTION_COMPLETE
                }
                tmf::TASK_REASSIGN => tmf::TASK_REASSIGNMENT_NOT_SUPPORTED,
                _ => tmf::FUNCTION_NOT_SUPPORTED,
            },
        };
        let b = TaskMgmtResponse {
            response,
            itt: t.itt,
            seq: Default::default(),
        }
        .to_bhs();
        self.send(b, Bytes::new(), Sn::Advance);
    }

    /// Aborts this session's tasks on the LUNs `which` selects and waits until they are gone.
    async fn abort_where(&mut self, s: &Session, which: impl Fn(u64) -> bool) {
        let collecting: Vec<u32> = self
            .writes
            .iter()
            .filter(|(_, w)| which(w.cmd.lun))
            .map(|(i, _)| *i)
            .collect();
        for itt in collecting {
            if let Some(w) = self.writes.remove(&itt) {
                s.write_bytes
                    .fetch_sub(u64::from(w.cmd.expected_data_len), Ordering::AcqRel);
                self.window.in_flight.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let running: Vec<Arc<TaskCtl>> = lock(&s.tasks).values().filter(|c| which(c.lun)).cloned().collect();
        for ctl in running {
            ctl.aborted.store(true, Ordering::Release);
            wait_done(&ctl).await;
        }
    }

    fn text_request(&mut self, t: TextRequest, p: Pdu) -> Result<(), End> {
        let max = self.params.initiator_max_recv_data_segment_length.max(512) as usize;
        // An empty request with our TTT asks for the rest of a long response (§11.10.4).
        if t.ttt != pdu::RESERVED_TAG {
            match self.text_pending.take() {
                Some((ttt, rest)) if ttt == t.ttt => {
                    self.send_text_chunk(t, rest, max);
                }
                _ => self.reject(reject_reason::INVALID_PDU_FIELD, &p.bhs),
            }
            return Ok(());
        }
        if self.text.len() + p.data.len() > MAX_TEXT_BYTES {
            return Err(End::Protocol("Text Request longer than 64 KiB".into()));
        }
        self.text.extend_from_slice(&p.data);
        if t.cont {
            let b = TextResponse {
                final_: false,
                cont: false,
                lun: t.lun,
                itt: t.itt,
                ttt: self.alloc_ttt(),
                seq: Default::default(),
            };
            self.send(b.to_bhs(), Bytes::new(), Sn::Advance);
            return Ok(());
        }
        let text = std::mem::take(&mut self.text);
        let pairs = text::parse(&text).unwrap_or_default();
        let mut reply = Vec::new();
        let mut others: Vec<(String, &str)> = Vec::new();
        for (k, v) in &pairs {
            if k == "SendTargets" {
                reply.extend(self.send_targets(v));
            } else {
                others.push((k.clone(), "NotUnderstood"));
            }
        }
        let others: Vec<(&str, &str)> = others.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        text::encode(&others, &mut reply);
        self.send_text_chunk(t, reply, max);
        Ok(())
    }

    fn send_text_chunk(&mut self, t: TextRequest, mut data: Vec<u8>, max: usize) {
        let rest = if data.len() > max {
            data.split_off(max)
        } else {
            Vec::new()
        };
        let more = !rest.is_empty();
        let ttt = if more { self.alloc_ttt() } else { pdu::RESERVED_TAG };
        if more {
            self.text_pending = Some((ttt, rest));
        }
        let b = TextResponse {
            final_: !more,
            cont: more,
            lun: t.lun,
            itt: t.itt,
            ttt,
            seq: Default::default(),
        };
        self.send(b.to_bhs(), Bytes::from(data), Sn::Advance);
    }

    /// SendTargets (§12.3, Appendix C): only targets this initiator may log into are listed.
    fn send_targets(&self, value: &str) -> Vec<u8> {
        let server = &self.server;
        let addresses = server.send_targets_addresses(self.local);
        let visible = |t: &TargetRuntime| t.def.admits(&self.params.initiator_name, self.peer.ip()).is_ok();
        let mut targets: Vec<Arc<TargetRuntime>> = server.targets().into_iter().filter(|t| visible(t)).collect();
        targets.sort_by(|a, b| (a.def.tid, &a.def.name).cmp(&(b.def.tid, &b.def.name)));
        let chosen: Vec<SendTarget> = targets
            .into_iter()
            .filter(|t| match value {
                "All" => self.session.is_none(),
                "" => self
                    .session
                    .as_ref()
                    .is_some_and(|s| s.target.def.name.eq_ignore_ascii_case(&t.def.name)),
                name => t.def.name.eq_ignore_ascii_case(name),
            })
            .map(|t| SendTarget {
                name: t.def.name.clone(),
                addresses: addresses.clone(),
            })
            .collect();
        text::send_targets_response(&chosen)
    }

    async fn logout(&mut self, l: LogoutRequest) {
        let response = match l.reason {
            // Close the session / the connection: the same thing with one connection per session.
            0 | 1 => 0,
            // Remove the connection for recovery: not at ERL 0.
            _ => 2,
        };
        if let Some(s) = self.session.clone() {
            // Outstanding commands complete before the response (§11.14 at ERL 0).
            let running: Vec<Arc<TaskCtl>> = lock(&s.tasks).values().cloned().collect();
            for ctl in running {
                wait_done(&ctl).await;
            }
        }
        let b = pdu::LogoutResponse {
            response,
            itt: l.itt,
            seq: Default::default(),
            time2wait: 0,
            time2retain: 0,
        }
        .to_bhs();
        self.send(b, Bytes::new(), Sn::Advance);
        let _ = self.out.try_send(Out::Close);
    }
}

fn fixed_sense(c: raftsan_proto::scsi::sense::SenseCode) -> Vec<u8> {
    raftsan_proto::scsi::sense::Sense::from(c).encode_fixed()
}

/// The writer task: assigns StatSN in send order and batches queued PDUs into one write.
async fn writer(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Out>,
    window: Arc<Window>,
    mut statsn: u32,
    digests: Digests,
    max_send: u32,
) {
    let mut buf = BytesMut::with_capacity(256 * 1024);
    let mut closing = false;
    while let Some(first) = rx.recv().await {
        // Commands that complete together (the writes of one replicated log entry) are woken
        // together, and the first reply wakes this task before the others have queued theirs.
        // With other commands in flight, let every task that is ready run once, so their
        // replies go in the same send (one syscall and segment instead of one per reply).
        if window.in_flight.load(Ordering::Acquire) > 1 {
            tokio::task::yield_now().await;
        }
        let mut next = Some(first);
        // Drain what is already queued (bounded, so one busy session cannot starve the write).
        let mut batched = 0;
        while let Some(out) = next.take() {
            match out {
                Out::Close => closing = true,
                Out::Pdu { mut bhs, data, sn } => {
                    let s = match sn {
                        Sn::Advance => {
                            let s = statsn;
                            statsn = statsn.wrapping_add(1);
                            Some(s)
                        }
                        Sn::Peek => Some(statsn),
                    };
                    bhs.set_sequence(s, window.exp(), window.max());
                    pdu::encode_parts(bhs, &[], &data, digests, &mut buf);
                }
                Out::Scsi(r) => encode_scsi_reply(r, &mut statsn, &window, digests, max_send, &mut buf),
            }
            batched += 1;
            if closing || batched >= 64 || buf.len() >= 1 << 20 {
                break;
            }
            next = rx.try_recv().ok();
        }
        if !buf.is_empty() {
            if wr.write_all(&buf).await.is_err() {
                return;
            }
            buf.clear();
        }
        if closing {
            let _ = wr.shutdown().await;
            return;
        }
    }
}

/// Data-In PDUs of at most `max_send` bytes each, the last carrying the status when there is no
/// sense data (status collapse, §11.7.4); otherwise a SCSI Response follows (§11.4).
fn encode_scsi_reply(
    r: ScsiReply,
    statsn: &mut u32,
    window: &Window,
    digests: Digests,
    max_send: u32,
    buf: &mut BytesMut,
) {
    let exp = window.exp();
    let max = window.max();
    let collapse = r.sense.is_none() && !r.data_in.is_empty();
    let mut datasn = 0u32;
    let mut offset = 0usize;
    while offset < r.data_in.len() {
        let end = (offset + max_send as usize).min(r.data_in.len());
        let last = end == r.data_in.len();
        let with_status = last && collapse;
        let seq = pdu::Sequence {
            statsn: if with_status { *statsn } else { 0 },
            exp_cmdsn: exp,
            max_cmdsn: max,
        };
        let bhs = DataIn {
            final_: with_status,
            status: with_status.then_some(r.status),
            lun: r.lun,
            itt: r.itt,
            ttt: pdu::RESERVED_TAG,
            seq,
            datasn,
            buffer_offset: offset as u32,
            residual: if with_status { r.residual } else { Residual::None },
        }
        .to_bhs();
        pdu::encode_parts(bhs, &[], &r.data_in[offset..end], digests, buf);
        datasn += 1;
        offset = end;
    }
    if collapse {
        *statsn = statsn.wrapping_add(1);
        return;
    }
    let sense = r.sense.as_deref().map(pdu::sense_segment).unwrap_or_default();
    let bhs = ScsiResponse {
        response: 0,
        status: r.status,
        itt: r.itt,
        seq: pdu::Sequence {
            statsn: *statsn,
            exp_cmdsn: exp,
            max_cmdsn: max,
        },
        exp_datasn: datasn,
        residual: r.residual,
    }
    .to_bhs();
    *statsn = statsn.wrapping_add(1);
    pdu::encode_parts(bhs, &[], &sense, digests, buf);
}
