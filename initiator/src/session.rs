//! One iSCSI session over one TCP connection at ErrorRecoveryLevel 0 (RFC 7143): the tokio shell
//! around [`raftsan_proto::initiator`]'s login machine and the full-feature phase.
//!
//! ```text
//!  Session::login ─▶ connect (connect_timeout, TCP_NODELAY) ─▶ login (login_timeout) ─▶ spawn:
//!
//!    execute()/abort_task()/logout() ──mpsc──▶ driver task ──frames──▶ writer task ──▶ socket
//!                                                  ▲  owns all session state
//!    socket ──▶ reader task (framing, digests) ────┘
//! ```
//!
//! * The driver task owns every piece of session state (ITTs, CmdSN/ExpStatSN, the MaxCmdSN
//!   window, tasks, timers); the reader and writer only move bytes, so no lock guards the state.
//! * A command waits in a bounded queue until the MaxCmdSN window (RFC 7143 §4.2.2.1) is open
//!   and fewer than `queue_depth` commands are in flight.
//! * Write data goes as immediate data, unsolicited Data-Out (up to FirstBurstLength) and
//!   solicited Data-Out on R2T (§11.8), each PDU at most the target's MaxRecvDataSegmentLength.
//! * Read data is reassembled in order (DataPDUInOrder=Yes): wrong offsets, DataSN gaps or data
//!   beyond the expected length are protocol errors.
//! * Keepalive: a NOP-Out ping every `nop_interval`; no NOP-In within `nop_timeout` kills the
//!   session ([`SessionError::Timeout`]). Target pings are answered.
//! * A command older than `command_timeout` is aborted with ABORT TASK (bounded by
//!   `abort_timeout`; an unanswered or refused abort closes the connection) and returns
//!   [`SessionError::Timeout`].
//! * Any malformed or unexpected PDU from the target is a [`SessionError::Protocol`]: the
//!   connection is closed and every command in flight fails with that error. Never a panic.
//!
//! Not done: multiple connections, ERL 1/2 (SNACK, connection recovery), bidirectional commands,
//! re-login (the caller — multipath — logs in again).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use raftsan_proto::chap::ChapAlgorithm;
use raftsan_proto::initiator::{
    self as proto_init, ChapAccount, InitiatorLogin, InitiatorSettings, LoginError, LoginEvent, LoginOutcome, LoginPdu,
    NegotiatedParams, Proposals,
};
use raftsan_proto::pdu::{
    self, Bhs, DataIn, DataOut, Digests, Framing, NopIn, NopOut, Opcode, Pdu, RESERVED_TAG, ReadyToTransfer,
    ScsiCommand, ScsiResponse, TaskMgmtRequest, TaskMgmtResponse, tmf,
};
use raftsan_proto::serial;
use rand::RngCore;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, warn};

pub use raftsan_proto::initiator::{DiscoveredTarget, TargetPortal};
pub use raftsan_proto::pdu::Residual;

/// Most commands waiting for the CmdSN window or a queue slot inside the session (callers beyond
/// this wait in `execute` itself).
pub const MAX_WAITING_COMMANDS: usize = 1024;
/// Capacity of the caller-to-driver channel.
const SUBMIT_CHANNEL: usize = 256;
/// PDUs the reader may have decoded ahead of the driver.
const INBOUND_CHANNEL: usize = 256;
/// Most bytes the writer gathers into one write.
const WRITER_BATCH_BYTES: usize = 1 << 20;
/// Longest CDB we send (16 in the BHS + an extended-CDB AHS, RFC 7143 §11.3.5).
pub const MAX_CDB_LEN: usize = pdu::MAX_CDB_LEN;
/// Largest read or write of one command (a limit of ours, far above any target's VPD B0 limit).
pub const MAX_TRANSFER_BYTES: u32 = 64 << 20;
/// Extra time `execute` waits for the driver beyond `command_timeout + abort_timeout`.
const BACKSTOP_SLACK: Duration = Duration::from_secs(5);

/// A secret that never shows in logs: Debug and Display print `***`.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    /// The secret itself, for computing CHAP responses.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// A CHAP account (RFC 7143 §12.1.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChapCredentials {
    pub user: String,
    pub secret: Secret,
}

impl ChapCredentials {
    pub fn new(user: &str, secret: &str) -> Self {
        Self {
            user: user.to_owned(),
            secret: Secret::new(secret),
        }
    }
    fn account(&self) -> ChapAccount {
        ChapAccount {
            user: self.user.clone(),
            secret: self.secret.expose().as_bytes().to_vec(),
        }
    }
}

/// How to log in and run a session. Defaults follow open-iscsi's iscsid.conf.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub initiator_name: String,
    pub initiator_alias: Option<String>,
    /// `None` for a discovery session.
    pub target_name: Option<String>,
    /// Our CHAP account (the target authenticates us).
    pub chap: Option<ChapCredentials>,
    /// The target's account for mutual CHAP (we authenticate the target); needs `chap`.
    pub mutual_chap: Option<ChapCredentials>,
    /// Offer CRC32C header digests (RFC 7143 §13.1).
    pub header_digest: bool,
    /// Offer CRC32C data digests.
    pub data_digest: bool,
    /// Most SCSI commands in flight (the target's MaxCmdSN window may allow fewer).
    pub queue_depth: u32,
    pub connect_timeout: Duration,
    pub login_timeout: Duration,
    /// Time between NOP-Out pings; zero disables them.
    pub nop_interval: Duration,
    /// How long a ping may go unanswered before the session is declared dead.
    pub nop_timeout: Duration,
    /// How long a command may take (from `execute`) before it is aborted.
    pub command_timeout: Duration,
    /// How long the target gets to answer ABORT TASK before the connection is closed.
    pub abort_timeout: Duration,
    /// How long a logout may take.
    pub logout_timeout: Duration,
    /// Declared to the target (RFC 7143 §13.12).
    pub max_recv_data_segment_length: u32,
    /// Proposed MaxBurstLength (§13.13).
    pub max_burst_length: u32,
    /// Proposed FirstBurstLength (§13.14).
    pub first_burst_length: u32,
    /// Proposed ImmediateData (§13.11).
    pub immediate_data: bool,
    /// Proposed InitialR2T (§13.10).
    pub initial_r2t: bool,
    /// The ISID; `None` picks a random one (RFC 7143 §11.12.5, type 10b "random").
    pub isid: Option<[u8; 6]>,
    /// CHAP_A offer, most preferred first.
    pub chap_algorithms: Vec<ChapAlgorithm>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            initiator_name: "iqn.2026-11.org.raftsan:initiator".to_owned(),
            initiator_alias: None,
            target_name: None,
            chap: None,
            mutual_chap: None,
            header_digest: false,
            data_digest: false,
            queue_depth: 128,
            connect_timeout: Duration::from_secs(10),
            login_timeout: Duration::from_secs(15),
            nop_interval: Duration::from_secs(5),
            nop_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(30),
            abort_timeout: Duration::from_secs(15),
            logout_timeout: Duration::from_secs(15),
            max_recv_data_segment_length: 262_144,
            max_burst_length: 16_776_192,
            first_burst_length: 262_144,
            immediate_data: true,
            initial_r2t: false,
            isid: None,
            chap_algorithms: vec![ChapAlgorithm::Sha256, ChapAlgorithm::Sha1, ChapAlgorithm::Md5],
        }
    }
}

impl SessionConfig {
    /// Checks the configuration before any socket is opened; the message says what to fix.
    pub fn validate(&self) -> Result<(), SessionError> {
        let bad = |m: String| Err(SessionError::Config(m));
        if self.queue_depth == 0 || self.queue_depth > 4096 {
            return bad(format!("queue_depth = {} must be 1..=4096", self.queue_depth));
        }
        for (name, d) in [
            ("connect_timeout", self.connect_timeout),
            ("login_timeout", self.login_timeout),
            ("command_timeout", self.command_timeout),
            ("abort_timeout", self.abort_timeout),
            ("logout_timeout", self.logout_timeout),
        ] {
            if d.is_zero() {
                return bad(format!("{name} must be greater than zero"));
            }
        }
        if !self.nop_interval.is_zero() && self.nop_timeout.is_zero() {
            return bad("nop_timeout must be greater than zero when nop_interval is set".into());
        }
        // The ISID and mutual challenge are chosen at login; stand-ins of the right shape here.
        self.settings([0x80, 0, 0, 0, 0, 0], 0, vec![0; 16])
            .validate()
            .map_err(SessionError::Config)
    }

    fn settings(&self, isid: [u8; 6], mutual_id: u8, mutual_challenge: Vec<u8>) -> InitiatorSettings {
        let mut s = InitiatorSettings::new(&self.initiator_name, self.target_name.as_deref(), isid);
        s.initiator_alias = self.initiator_alias.clone();
        s.chap = self.chap.as_ref().map(ChapCredentials::account);
        s.mutual_chap = self.mutual_chap.as_ref().map(ChapCredentials::account);
        s.mutual_chap_id = mutual_id;
        s.mutual_chap_challenge = mutual_challenge;
        s.chap_algorithms = self.chap_algorithms.clone();
        s.proposals = Proposals {
            header_digest: self.header_digest,
            data_digest: self.data_digest,
            max_recv_data_segment_length: self.max_recv_data_segment_length,
            max_burst_length: self.max_burst_length,
            first_burst_length: self.first_burst_length,
            initial_r2t: self.initial_r2t,
            immediate_data: self.immediate_data,
            ..Proposals::default()
        };
        s
    }
}

/// Why a session operation failed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SessionError {
    /// The configuration is unusable (caller's fault; nothing was sent).
    #[error("invalid session configuration: {0}")]
    Config(String),
    /// A command the caller built is unusable (caller's fault; nothing was sent).
    #[error("invalid command: {0}")]
    InvalidCommand(String),
    /// TCP connect failed or timed out.
    #[error("connecting to {portal}: {reason}")]
    Connect { portal: SocketAddr, reason: String },
    /// The target refused the login (not an authentication failure).
    #[error("login to {portal} failed: {reason}")]
    LoginFailed { portal: SocketAddr, reason: String },
    /// Authentication failed: the target refused our CHAP response (0201) or the target failed
    /// mutual CHAP.
    #[error("authentication failed: {0}")]
    AuthFailed(String),
    /// The target redirected the login (status class 1) to this TargetAddress.
    #[error("login redirected to {address}")]
    Redirected { address: String, temporary: bool },
    /// A deadline passed: connect/login/logout, an unanswered keepalive, or a command (which has
    /// been aborted or its connection closed).
    #[error("timeout: {0}")]
    Timeout(String),
    /// The connection broke (reset, EOF, write error) or the target announced it drops it.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// The target sent a malformed or unexpected PDU; the connection was closed hard.
    #[error("protocol error from the target: {0}")]
    Protocol(String),
    /// The target rejected a PDU (RFC 7143 §11.17) with this reason code.
    #[error("target rejected the {what} (reason {reason:#04x})")]
    Rejected { reason: u8, what: String },
    /// The target could not execute the command (iSCSI response "target failure", §11.4.3).
    #[error("target failure (iSCSI response {0:#04x})")]
    TargetFailure(u8),
    /// The command was aborted by a task management function this session sent.
    #[error("command aborted: {0}")]
    Aborted(String),
    /// The target asked us to log out (Async Message, §11.9.1); we did.
    #[error("target requested logout")]
    TargetLogout,
    /// The session was closed by `logout`, `close_hard` or by dropping every handle.
    #[error("session closed")]
    Closed,
}

impl SessionError {
    /// Whether another path to the same LU may succeed where this one failed (multipath retries
    /// the command there).
    pub fn is_path_failure(&self) -> bool {
        matches!(
            self,
            SessionError::Connect { .. }
                | SessionError::Redirected { .. }
                | SessionError::Timeout(_)
                | SessionError::ConnectionLost(_)
                | SessionError::Protocol(_)
                | SessionError::TargetFailure(_)
                | SessionError::TargetLogout
                | SessionError::Closed
        )
    }

    fn from_login(portal: SocketAddr, e: LoginError) -> SessionError {
        match e {
            LoginError::Settings(m) => SessionError::Config(m),
            LoginError::Redirect { address, temporary } => SessionError::Redirected { address, temporary },
            LoginError::AuthenticationFailed => {
                SessionError::AuthFailed("the target refused our CHAP credentials (login status 0201)".into())
            }
            LoginError::TargetAuthentication(m) => SessionError::AuthFailed(format!("mutual CHAP: {m}")),
            LoginError::Protocol(m) => SessionError::Protocol(format!("login: {m}")),
            other => SessionError::LoginFailed {
                portal,
                reason: other.to_string(),
            },
        }
    }
}

/// One SCSI command. `data_out` for writes, `data_in_len` for reads; not both.
#[derive(Clone, Debug, Default)]
pub struct Command {
    pub lun: u64,
    pub cdb: Vec<u8>,
    pub data_out: Option<Bytes>,
    pub data_in_len: u32,
}

/// A command's outcome as the target reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandResult {
    /// SCSI status (SAM-5 §5.3): 0 GOOD, 2 CHECK CONDITION, 8 BUSY, 0x18 RESERVATION CONFLICT...
    pub status: u8,
    /// Sense data (the 2-byte length prefix stripped), with CHECK CONDITION.
    pub sense: Option<Bytes>,
    /// Data-In received.
    pub data: Bytes,
    pub residual: Residual,
}

/// A task management response (RFC 7143 §11.6.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TmfResponse {
    FunctionComplete,
    TaskDoesNotExist,
    LunDoesNotExist,
    TaskStillAllegiant,
    TaskReassignmentNotSupported,
    FunctionNotSupported,
    AuthorizationFailed,
    FunctionRejected,
    Other(u8),
}

impl TmfResponse {
    fn from_code(c: u8) -> Self {
        match c {
            tmf::FUNCTION_COMPLETE => Self::FunctionComplete,
            tmf::TASK_DOES_NOT_EXIST => Self::TaskDoesNotExist,
            tmf::LUN_DOES_NOT_EXIST => Self::LunDoesNotExist,
            tmf::TASK_STILL_ALLEGIANT => Self::TaskStillAllegiant,
            tmf::TASK_REASSIGNMENT_NOT_SUPPORTED => Self::TaskReassignmentNotSupported,
            tmf::FUNCTION_NOT_SUPPORTED => Self::FunctionNotSupported,
            tmf::AUTHORIZATION_FAILED => Self::AuthorizationFailed,
            tmf::FUNCTION_REJECTED => Self::FunctionRejected,
            other => Self::Other(other),
        }
    }
}

/// What the login negotiated, for display and for the multipath layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// Digests, both MaxRecvDataSegmentLengths, bursts, ImmediateData, InitialR2T, ...
    pub params: NegotiatedParams,
    pub tsih: u16,
    pub isid: [u8; 6],
    pub tpgt: Option<u16>,
    pub target_name: Option<String>,
    pub target_alias: Option<String>,
    pub portal: SocketAddr,
    pub chap_algorithm: Option<ChapAlgorithm>,
    /// Whether the target proved itself with mutual CHAP.
    pub target_authenticated: bool,
}

impl Negotiated {
    fn digests(&self) -> Digests {
        Digests {
            header: self.params.header_digest,
            data: self.params.data_digest,
        }
    }
}

// --- connection plumbing ---------------------------------------------------------------------

/// Reads whole PDUs (two-phase framing, digests verified) from a byte stream.
struct PduReader<R> {
    r: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> PduReader<R> {
    fn new(r: R, buf: BytesMut) -> Self {
        Self { r, buf }
    }

    async fn next(&mut self, digests: Digests, max_data: u32) -> Result<Pdu, SessionError> {
        loop {
            match pdu::check(&self.buf, digests, max_data) {
                Ok(Framing::Complete { len }) => {
                    return pdu::decode(self.buf.split_to(len).freeze(), digests)
                        .map_err(|e| SessionError::Protocol(e.to_string()));
                }
                Ok(Framing::Incomplete { needed }) => {
                    self.buf.reserve(needed.saturating_sub(self.buf.len()).max(4096));
                }
                Err(e) => return Err(SessionError::Protocol(e.to_string())),
            }
            match self.r.read_buf(&mut self.buf).await {
                Ok(0) => return Err(SessionError::ConnectionLost("the target closed the connection".into())),
                Ok(_) => {}
                Err(e) => return Err(SessionError::ConnectionLost(format!("reading: {e}"))),
            }
        }
    }
}

async fn write_pdu<W: AsyncWrite + Unpin>(w: &mut W, bhs: Bhs, data: &[u8], d: Digests) -> Result<(), SessionError> {
    let mut out = BytesMut::new();
    pdu::encode_parts(bhs, &[], data, d, &mut out);
    w.write_all(&out)
        .await
        .map_err(|e| SessionError::ConnectionLost(format!("writing: {e}")))
}

async fn connect(portal: SocketAddr, cfg: &SessionConfig) -> Result<TcpStream, SessionError> {
    let stream = tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(portal))
        .await
        .map_err(|_| SessionError::Connect {
            portal,
            reason: format!("no answer within {:?}", cfg.connect_timeout),
        })?
        .map_err(|e| SessionError::Connect {
            portal,
            reason: e.to_string(),
        })?;
    stream.set_nodelay(true).map_err(|e| SessionError::Connect {
        portal,
        reason: format!("TCP_NODELAY: {e}"),
    })?;
    // Closing the connection resets it and discards what the kernel has not delivered yet (DESIGN.md
    // invariant 3). With a graceful close, a path cut by the network keeps its unsent commands in
    // the kernel, which retransmits them when the network heals: a WRITE this initiator already
    // re-sent on another path, and that newer writes to the same blocks followed, would then be
    // executed late. SO_LINGER 0 cannot block the close (tokio deprecates non-zero lingers).
    #[allow(deprecated)]
    stream
        .set_linger(Some(Duration::ZERO))
        .map_err(|e| SessionError::Connect {
            portal,
            reason: format!("SO_LINGER: {e}"),
        })?;
    Ok(stream)
}

fn random_isid() -> [u8; 6] {
    // RFC 7143 §11.12.5: T=10b (random), A reserved, B and C random, D qualifier.
    let mut isid = [0u8; 6];
    rand::rng().fill_bytes(&mut isid[1..]);
    isid[0] = 0x80;
    isid
}

/// Connects and logs in; returns the stream, the bytes read past the last Login Response, and
/// the outcome.
async fn connect_and_login(
    portal: SocketAddr,
    cfg: &SessionConfig,
) -> Result<(TcpStream, BytesMut, LoginOutcome), SessionError> {
    cfg.validate()?;
    let mut challenge = vec![0u8; 16];
    rand::rng().fill_bytes(&mut challenge);
    let mutual_id = (rand::rng().next_u32() & 0xff) as u8;
    let settings = cfg.settings(cfg.isid.unwrap_or_else(random_isid), mutual_id, challenge);
    let mut machine = InitiatorLogin::new(settings).map_err(|e| SessionError::from_login(portal, e))?;
    let mut stream = connect(portal, cfg).await?;
    let login = async {
        let (r, mut w) = stream.split();
        let mut reader = PduReader::new(r, BytesMut::with_capacity(8192));
        let mut next: LoginPdu = machine.start();
        loop {
            write_pdu(&mut w, next.bhs(), &next.data, Digests::default()).await?;
            let p = reader
                .next(Digests::default(), proto_init::MAX_LOGIN_TEXT_BYTES as u32)
                .await?;
            match machine
                .on_response(&p.bhs, &p.data)
                .map_err(|e| SessionError::from_login(portal, e))?
            {
                LoginEvent::Send(pdu) => next = pdu,
                LoginEvent::Done(outcome) => return Ok::<_, SessionError>((reader.buf, outcome)),
            }
        }
    };
    let (leftover, outcome) = tokio::time::timeout(cfg.login_timeout, login)
        .await
        .map_err(|_| SessionError::Timeout(format!("login to {portal} took longer than {:?}", cfg.login_timeout)))??;
    Ok((stream, leftover, outcome))
}

/// SendTargets discovery (RFC 7143 §12.3): a discovery session on `portal`, `SendTargets=All`,
/// logout. A target listed without TargetAddress is reachable at `portal` (reported with TPGT 1).
pub async fn discover(portal: SocketAddr, cfg: &SessionConfig) -> Result<Vec<DiscoveredTarget>, SessionError> {
    let cfg = SessionConfig {
        target_name: None,
        ..cfg.clone()
    };
    let (mut stream, leftover, outcome) = connect_and_login(portal, &cfg).await?;
    let digests = Digests {
        header: outcome.params.header_digest,
        data: outcome.params.data_digest,
    };
    let max_in = outcome.params.initiator_max_recv_data_segment_length;
    let work = async {
        let (r, mut w) = stream.split();
        let mut reader = PduReader::new(r, leftover);
        let itt = 1;
        let cmdsn = outcome.cmdsn;
        let mut exp_statsn = outcome.exp_statsn;
        let (bhs, data) = proto_init::send_targets_request(itt, cmdsn, exp_statsn);
        write_pdu(&mut w, bhs, &data, digests).await?;
        let mut text = Vec::new();
        loop {
            let p = reader.next(digests, max_in).await?;
            match p.bhs.opcode() {
                Opcode::TextResponse => {}
                Opcode::NopIn => continue,
                Opcode::Reject => {
                    return Err(SessionError::Rejected {
                        reason: p.bhs.0[2],
                        what: "SendTargets request".into(),
                    });
                }
                other => {
                    return Err(SessionError::Protocol(format!(
                        "expected a Text Response, got opcode {:#04x}",
                        other.to_u8()
                    )));
                }
            }
            let r = pdu::TextResponse::parse(&p.bhs);
            if r.itt != itt {
                return Err(SessionError::Protocol("Text Response for another ITT".into()));
            }
            exp_statsn = r.seq.statsn.wrapping_add(1);
            if text.len() + p.data.len() > proto_init::MAX_SEND_TARGETS_BYTES {
                return Err(SessionError::Protocol("SendTargets answer too long".into()));
            }
            text.extend_from_slice(&p.data);
            if r.final_ {
                break;
            }
            if r.ttt == RESERVED_TAG {
                return Err(SessionError::Protocol(
                    "continued Text Response without a target transfer tag".into(),
                ));
            }
            let bhs = proto_init::text_continue_request(itt, r.ttt, cmdsn, exp_statsn);
            write_pdu(&mut w, bhs, &[], digests).await?;
        }
        // Logout (§11.14); a target that does not answer is simply disconnected.
        let bhs = pdu::LogoutRequest {
            immediate: true,
            reason: 0,
            itt: 2,
            cid: 0,
            cmdsn,
            exp_statsn,
        }
        .to_bhs();
        if write_pdu(&mut w, bhs, &[], digests).await.is_ok() {
            let _ = tokio::time::timeout(cfg.logout_timeout, reader.next(digests, max_in)).await;
        }
        Ok(text)
    };
    let text = tokio::time::timeout(cfg.login_timeout, work).await.map_err(|_| {
        SessionError::Timeout(format!(
            "SendTargets on {portal} took longer than {:?}",
            cfg.login_timeout
        ))
    })??;
    let mut targets = proto_init::parse_send_targets(&text).map_err(|e| SessionError::Protocol(e.to_string()))?;
    for t in &mut targets {
        if t.portals.is_empty() {
            t.portals.push(TargetPortal {
                address: portal.to_string(),
                tpgt: 1,
            });
        }
    }
    Ok(targets)
}

// --- the session handle ----------------------------------------------------------------------

enum Request {
    Scsi {
        cmd: Command,
        deadline: Instant,
        reply: oneshot::Sender<Result<CommandResult, SessionError>>,
    },
    Tmf {
        function: u8,
        lun: u64,
        referenced_itt: u32,
        reply: oneshot::Sender<Result<TmfResponse, SessionError>>,
    },
    Logout {
        reply: oneshot::Sender<Result<(), SessionError>>,
    },
}

struct Inner {
    submit: mpsc::Sender<Request>,
    close: watch::Sender<bool>,
    dead: watch::Receiver<Option<SessionError>>,
    io_tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    negotiated: Negotiated,
    command_timeout: Duration,
    logout_timeout: Duration,
    /// How long a caller waits for the driver at most (its own deadlines come first).
    backstop: Duration,
}

/// A logged-in session: one TCP connection, ErrorRecoveryLevel 0. Cheap to clone; the
/// connection lives until `logout`, `close_hard`, a failure, or the last clone is dropped.
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("portal", &self.inner.negotiated.portal)
            .field("target", &self.inner.negotiated.target_name)
            .field("tsih", &self.inner.negotiated.tsih)
            .finish()
    }
}

impl Session {
    /// Connects to `portal`, logs in to `cfg.target_name` and starts the full-feature phase.
    pub async fn login(portal: SocketAddr, cfg: SessionConfig) -> Result<Session, SessionError> {
        if cfg.target_name.is_none() {
            return Err(SessionError::Config(
                "target_name is required for a normal session (use discover() for discovery)".into(),
            ));
        }
        let (stream, leftover, outcome) = connect_and_login(portal, &cfg).await?;
        let negotiated = Negotiated {
            params: outcome.params.clone(),
            tsih: outcome.tsih,
            isid: outcome.isid,
            tpgt: outcome.tpgt,
            target_name: cfg.target_name.clone(),
            target_alias: outcome.target_alias.clone(),
            portal,
            chap_algorithm: outcome.chap_algorithm,
            target_authenticated: outcome.target_authenticated,
        };
        let target = cfg.target_name.clone().unwrap_or_default();
        info!(%portal, %target, tsih = outcome.tsih, "iSCSI session logged in: {:?}", negotiated.params);
        let digests = negotiated.digests();
        let (read_half, write_half) = stream.into_split();
        let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_CHANNEL);
        let max_in = negotiated.params.initiator_max_recv_data_segment_length;
        let reader = tokio::spawn(reader_task(
            PduReader::new(read_half, leftover),
            digests,
            max_in,
            inbound_tx,
        ));
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(writer_task(write_half, out_rx));
        let (submit_tx, submit_rx) = mpsc::channel(SUBMIT_CHANNEL);
        let (close_tx, close_rx) = watch::channel(false);
        let (dead_tx, dead_rx) = watch::channel(None);
        let io_tasks = vec![reader.abort_handle(), writer.abort_handle()];
        let now = Instant::now();
        let driver = Driver {
            cfg: cfg.clone(),
            negotiated: negotiated.clone(),
            digests,
            out: out_tx,
            cmdsn: outcome.cmdsn,
            exp_cmdsn: outcome.exp_cmdsn,
            max_cmdsn: outcome.max_cmdsn,
            exp_statsn: outcome.exp_statsn,
            next_itt: 1,
            scsi: HashMap::new(),
            tmfs: HashMap::new(),
            waiting: VecDeque::new(),
            ping: None,
            next_ping_at: now + cfg.nop_interval,
            logout: None,
            logout_requested_by_target: None,
            dead: dead_tx,
        };
        let span = tracing::info_span!("iscsi", %portal, %target);
        tokio::spawn(
            driver
                .run(inbound_rx, submit_rx, close_rx, reader, writer)
                .instrument(span),
        );
        Ok(Session {
            inner: Arc::new(Inner {
                submit: submit_tx,
                close: close_tx,
                dead: dead_rx,
                io_tasks: Mutex::new(io_tasks),
                negotiated,
                command_timeout: cfg.command_timeout,
                logout_timeout: cfg.logout_timeout,
                backstop: cfg.command_timeout + cfg.abort_timeout + BACKSTOP_SLACK,
            }),
        })
    }

    /// Runs one SCSI command. Many callers may run commands concurrently.
    pub async fn execute(&self, cmd: Command) -> Result<CommandResult, SessionError> {
        if cmd.cdb.is_empty() || cmd.cdb.len() > MAX_CDB_LEN {
            return Err(SessionError::InvalidCommand(format!(
                "CDB of {} bytes (1..={MAX_CDB_LEN})",
                cmd.cdb.len()
            )));
        }
        let out_len = cmd.data_out.as_ref().map_or(0, Bytes::len);
        if out_len > 0 && cmd.data_in_len > 0 {
            return Err(SessionError::InvalidCommand(
                "bidirectional commands are not supported".into(),
            ));
        }
        if out_len > MAX_TRANSFER_BYTES as usize || cmd.data_in_len > MAX_TRANSFER_BYTES {
            return Err(SessionError::InvalidCommand(format!(
                "transfer larger than {MAX_TRANSFER_BYTES} bytes"
            )));
        }
        let (reply, rx) = oneshot::channel();
        let deadline = Instant::now() + self.inner.command_timeout;
        self.submit(Request::Scsi { cmd, deadline, reply }).await?;
        self.wait(rx, self.inner.backstop).await
    }

    /// What the login negotiated.
    pub fn negotiated(&self) -> &Negotiated {
        &self.inner.negotiated
    }

    /// Resolves when the session is dead, with the reason.
    pub async fn closed(&self) -> SessionError {
        let mut rx = self.inner.dead.clone();
        loop {
            if let Some(e) = rx.borrow_and_update().clone() {
                return e;
            }
            if rx.changed().await.is_err() {
                return rx.borrow().clone().unwrap_or(SessionError::Closed);
            }
        }
    }

    pub fn is_alive(&self) -> bool {
        self.inner.dead.borrow().is_none()
    }

    /// Logs out (RFC 7143 §11.14, close the session) and closes the connection. Commands still
    /// in flight fail with [`SessionError::Closed`].
    pub async fn logout(&self) -> Result<(), SessionError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Request::Logout { reply }).await?;
        let limit = self.inner.logout_timeout + BACKSTOP_SLACK;
        self.wait(rx, limit).await
    }

    /// Drops the connection now; every command in flight fails with [`SessionError::Closed`].
    pub fn close_hard(&self) {
        // The driver must see the close before the I/O tasks' ends: otherwise, on another
        // worker thread, it can take the cancelled writer for a lost connection.
        self.inner.close.send_replace(true);
        if let Ok(tasks) = self.inner.io_tasks.lock() {
            for t in tasks.iter() {
                t.abort();
            }
        }
    }

    /// ABORT TASK (RFC 7143 §11.5.1) for the task with `task_tag` on `lun`.
    pub async fn abort_task(&self, lun: u64, task_tag: u32) -> Result<TmfResponse, SessionError> {
        self.tmf(tmf::ABORT_TASK, lun, task_tag).await
    }

    /// ABORT TASK SET: every task of this session on `lun`; they fail with
    /// [`SessionError::Aborted`].
    pub async fn abort_task_set(&self, lun: u64) -> Result<TmfResponse, SessionError> {
        self.tmf(tmf::ABORT_TASK_SET, lun, RESERVED_TAG).await
    }

    /// LOGICAL UNIT RESET; this session's tasks on `lun` fail with [`SessionError::Aborted`].
    pub async fn lun_reset(&self, lun: u64) -> Result<TmfResponse, SessionError> {
        self.tmf(tmf::LOGICAL_UNIT_RESET, lun, RESERVED_TAG).await
    }

    async fn tmf(&self, function: u8, lun: u64, referenced_itt: u32) -> Result<TmfResponse, SessionError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Request::Tmf {
            function,
            lun,
            referenced_itt,
            reply,
        })
        .await?;
        self.wait(rx, self.inner.backstop).await
    }

    fn reason(&self) -> SessionError {
        self.inner.dead.borrow().clone().unwrap_or(SessionError::Closed)
    }

    async fn submit(&self, req: Request) -> Result<(), SessionError> {
        if let Some(e) = self.inner.dead.borrow().clone() {
            return Err(e);
        }
        self.inner.submit.send(req).await.map_err(|_| self.reason())
    }

    async fn wait<T>(
        &self,
        rx: oneshot::Receiver<Result<T, SessionError>>,
        limit: Duration,
    ) -> Result<T, SessionError> {
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(self.reason()),
            Err(_) => Err(SessionError::Timeout(format!(
                "no answer from the session within {limit:?}"
            ))),
        }
    }
}

async fn reader_task<R: AsyncRead + Unpin>(
    mut reader: PduReader<R>,
    digests: Digests,
    max_in: u32,
    tx: mpsc::Sender<Result<Pdu, SessionError>>,
) {
    loop {
        let next = reader.next(digests, max_in).await;
        let stop = next.is_err();
        if tx.send(next).await.is_err() || stop {
            return;
        }
    }
}

async fn writer_task<W: AsyncWrite + Unpin>(mut w: W, mut rx: mpsc::UnboundedReceiver<Bytes>) -> String {
    while let Some(first) = rx.recv().await {
        // Small PDUs queued together go out in one write; a lone (large) one is not copied.
        let result = match rx.try_recv() {
            Err(_) => w.write_all(&first).await,
            Ok(second) => {
                let mut batch = BytesMut::with_capacity(first.len() + second.len());
                batch.extend_from_slice(&first);
                batch.extend_from_slice(&second);
                while batch.len() < WRITER_BATCH_BYTES {
                    match rx.try_recv() {
                        Ok(more) => batch.extend_from_slice(&more),
                        Err(_) => break,
                    }
                }
                w.write_all(&batch).await
            }
        };
        if let Err(e) = result {
            return format!("writing: {e}");
        }
    }
    let _ = w.shutdown().await;
    "writer closed".to_owned()
}

// --- the driver: all session state ----------------------------------------------------------

struct ScsiTask {
    lun: u64,
    cmdsn: u32,
    write: bool,
    data_out: Bytes,
    next_r2tsn: u32,
    expected_in: u32,
    data_in: BytesMut,
    next_datasn: u32,
    deadline: Instant,
    /// `None` while an abort for it is outstanding (the abort holds the reply).
    reply: Option<oneshot::Sender<Result<CommandResult, SessionError>>>,
}

struct Waiting {
    cmd: Command,
    deadline: Instant,
    reply: oneshot::Sender<Result<CommandResult, SessionError>>,
}

enum TmfReply {
    User {
        function: u8,
        lun: u64,
        referenced_itt: u32,
        reply: oneshot::Sender<Result<TmfResponse, SessionError>>,
    },
    /// Our abort of a timed-out command; the command's caller gets Timeout either way.
    Timeout {
        task_itt: u32,
        reply: oneshot::Sender<Result<CommandResult, SessionError>>,
    },
}

struct TmfTask {
    deadline: Instant,
    reply: TmfReply,
}

struct Driver {
    cfg: SessionConfig,
    negotiated: Negotiated,
    digests: Digests,
    out: mpsc::UnboundedSender<Bytes>,
    /// CmdSN of the next non-immediate command.
    cmdsn: u32,
    exp_cmdsn: u32,
    max_cmdsn: u32,
    exp_statsn: u32,
    next_itt: u32,
    scsi: HashMap<u32, ScsiTask>,
    tmfs: HashMap<u32, TmfTask>,
    waiting: VecDeque<Waiting>,
    /// Our outstanding NOP-Out ping: ITT and deadline.
    ping: Option<(u32, Instant)>,
    next_ping_at: Instant,
    logout: Option<(u32, Instant, Option<LogoutReply>)>,
    /// The target asked for a logout (Async event 1) by this time.
    logout_requested_by_target: Option<Instant>,
    dead: watch::Sender<Option<SessionError>>,
}

type LogoutReply = oneshot::Sender<Result<(), SessionError>>;

/// How the driver loop ends.
type Flow = Result<(), SessionError>;

impl Driver {
    async fn run(
        mut self,
        mut inbound: mpsc::Receiver<Result<Pdu, SessionError>>,
        mut submit: mpsc::Receiver<Request>,
        mut close: watch::Receiver<bool>,
        reader: JoinHandle<()>,
        mut writer: JoinHandle<String>,
    ) {
        let reason = loop {
            if let Err(e) = self.dispatch().and_then(|()| self.maybe_target_logout(Instant::now())) {
                break e;
            }
            let deadline = self.next_deadline();
            let accepting = self.waiting.len() < MAX_WAITING_COMMANDS && self.logout.is_none();
            let step: Flow = tokio::select! {
                biased;
                changed = close.changed() => {
                    let _ = changed;
                    Err(SessionError::Closed)
                }
                w = &mut writer => Err(SessionError::ConnectionLost(w.unwrap_or_else(|e| format!("writer task: {e}")))),
                pdu = inbound.recv() => match pdu {
                    Some(Ok(pdu)) => self.on_pdu(pdu),
                    Some(Err(e)) => Err(e),
                    None => Err(SessionError::ConnectionLost("reader task ended".into())),
                },
                req = submit.recv(), if accepting => match req {
                    Some(req) => self.on_request(req),
                    None => Err(SessionError::Closed),
                },
                _ = tokio::time::sleep_until(deadline) => self.on_timer(Instant::now()),
            };
            if let Err(e) = step {
                break e;
            }
        };
        reader.abort();
        writer.abort();
        self.fail_all(&reason, &mut submit);
    }

    /// Ends the session: every caller gets `reason` (aborted commands get Timeout).
    fn fail_all(&mut self, reason: &SessionError, submit: &mut mpsc::Receiver<Request>) {
        match reason {
            SessionError::Closed => info!("session closed"),
            other => warn!("session failed: {other}"),
        }
        self.dead.send_replace(Some(reason.clone()));
        for (_, t) in self.scsi.drain() {
            if let Some(r) = t.reply {
                let _ = r.send(Err(reason.clone()));
            }
        }
        for (_, t) in self.tmfs.drain() {
            match t.reply {
                TmfReply::User { reply, .. } => {
                    let _ = reply.send(Err(reason.clone()));
                }
                TmfReply::Timeout { reply, .. } => {
                    let _ = reply.send(Err(SessionError::Timeout(format!(
                        "command timed out after {:?}; its abort ended with: {reason}",
                        self.cfg.command_timeout
                    ))));
                }
            }
        }
        for w in self.waiting.drain(..) {
            let _ = w.reply.send(Err(reason.clone()));
        }
        if let Some((_, _, Some(reply))) = self.logout.take() {
            let _ = reply.send(match reason {
                SessionError::Closed => Ok(()),
                other => Err(other.clone()),
            });
        }
        submit.close();
        while let Ok(req) = submit.try_recv() {
            match req {
                Request::Scsi { reply, .. } => {
                    let _ = reply.send(Err(reason.clone()));
                }
                Request::Tmf { reply, .. } => {
                    let _ = reply.send(Err(reason.clone()));
                }
                Request::Logout { reply } => {
                    let _ = reply.send(Err(reason.clone()));
                }
            }
        }
    }

    fn next_deadline(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        let mut d = far;
        if !self.cfg.nop_interval.is_zero() {
            d = d.min(match self.ping {
                Some((_, at)) => at,
                None => self.next_ping_at,
            });
        }
        for t in self.scsi.values() {
            if t.reply.is_some() {
                d = d.min(t.deadline);
            }
        }
        for t in self.tmfs.values() {
            d = d.min(t.deadline);
        }
        if let Some(w) = self.waiting.front() {
            // Waiting commands are in submission order, so the first has the earliest deadline.
            d = d.min(w.deadline);
        }
        if let Some((_, at, _)) = &self.logout {
            d = d.min(*at);
        }
        if let Some(at) = self.logout_requested_by_target {
            d = d.min(at);
        }
        d
    }

    fn alloc_itt(&mut self) -> u32 {
        loop {
            let itt = self.next_itt;
            self.next_itt = self.next_itt.wrapping_add(1);
            if itt != RESERVED_TAG
                && !self.scsi.contains_key(&itt)
                && !self.tmfs.contains_key(&itt)
                && self.ping.map(|(p, _)| p) != Some(itt)
                && self.logout.as_ref().map(|(l, _, _)| *l) != Some(itt)
            {
                return itt;
            }
        }
    }

    fn send(&self, bhs: Bhs, ahs: &[u8], data: &[u8]) -> Flow {
        let mut out = BytesMut::new();
        pdu::encode_parts(bhs, ahs, data, self.digests, &mut out);
        self.send_bytes(out.freeze())
    }

    fn send_bytes(&self, bytes: Bytes) -> Flow {
        self.out
            .send(bytes)
            .map_err(|_| SessionError::ConnectionLost("the writer task ended".into()))
    }

    fn on_request(&mut self, req: Request) -> Flow {
        match req {
            Request::Scsi { cmd, deadline, reply } => {
                if self.logout_requested_by_target.is_some() {
                    let _ = reply.send(Err(SessionError::TargetLogout));
                    return Ok(());
                }
                self.waiting.push_back(Waiting { cmd, deadline, reply });
                Ok(())
            }
            Request::Tmf {
                function,
                lun,
                referenced_itt,
                reply,
            } => {
                let referenced = self.scsi.get(&referenced_itt).map(|t| t.cmdsn);
                self.send_tmf(
                    function,
                    lun,
                    referenced_itt,
                    referenced.unwrap_or(self.cmdsn),
                    self.cfg.abort_timeout,
                    TmfReply::User {
                        function,
                        lun,
                        referenced_itt,
                        reply,
                    },
                )
            }
            Request::Logout { reply } => self.send_logout(Some(reply)),
        }
    }

    fn send_logout(&mut self, reply: Option<LogoutReply>) -> Flow {
        if self.logout.is_some() {
            if let Some(reply) = reply {
                let _ = reply.send(Err(SessionError::Closed));
            }
            return Ok(());
        }
        let itt = self.alloc_itt();
        let bhs = pdu::LogoutRequest {
            immediate: true,
            reason: 0,
            itt,
            cid: 0,
            cmdsn: self.cmdsn,
            exp_statsn: self.exp_statsn,
        }
        .to_bhs();
        self.logout = Some((itt, Instant::now() + self.cfg.logout_timeout, reply));
        info!("logging out");
        self.send(bhs, &[], &[])
    }

    fn send_tmf(
        &mut self,
        function: u8,
        lun: u64,
        referenced_itt: u32,
        ref_cmdsn: u32,
        timeout: Duration,
        reply: TmfReply,
    ) -> Flow {
        let itt = self.alloc_itt();
        let bhs = TaskMgmtRequest {
            immediate: true,
            function,
            lun,
            itt,
            referenced_task_tag: referenced_itt,
            cmdsn: self.cmdsn,
            exp_statsn: self.exp_statsn,
            ref_cmdsn,
            exp_datasn: 0,
        }
        .to_bhs();
        self.tmfs.insert(
            itt,
            TmfTask {
                deadline: Instant::now() + timeout,
                reply,
            },
        );
        self.send(bhs, &[], &[])
    }

    /// Sends waiting commands while the CmdSN window and the queue depth allow.
    fn dispatch(&mut self) -> Flow {
        if self.logout.is_some() {
            return Ok(());
        }
        while !self.waiting.is_empty()
            && self.scsi.len() < self.cfg.queue_depth as usize
            && serial::le(self.cmdsn, self.max_cmdsn)
        {
            let Some(w) = self.waiting.pop_front() else {
                break;
            };
            if w.reply.is_closed() {
                continue;
            }
            self.send_command(w)?;
        }
        Ok(())
    }

    fn send_command(&mut self, w: Waiting) -> Flow {
        let itt = self.alloc_itt();
        let cmdsn = self.cmdsn;
        self.cmdsn = self.cmdsn.wrapping_add(1);
        let p = &self.negotiated.params;
        let data_out = w.cmd.data_out.unwrap_or_default();
        let write = !data_out.is_empty();
        let total = data_out.len() as u32;
        let max_pdu = p.target_max_recv_data_segment_length as usize;
        let first_burst = p.first_burst_length.min(total) as usize;
        let immediate = if write && p.immediate_data {
            first_burst.min(max_pdu)
        } else {
            0
        };
        let unsolicited_end = if write && !p.initial_r2t {
            first_burst
        } else {
            immediate
        };
        let mut cdb16 = [0u8; 16];
        let head = w.cmd.cdb.len().min(16);
        cdb16[..head].copy_from_slice(&w.cmd.cdb[..head]);
        let ahs = extended_cdb_ahs(&w.cmd.cdb);
        let bhs = ScsiCommand {
            immediate: false,
            final_: unsolicited_end == immediate,
            read: w.cmd.data_in_len > 0,
            write,
            attr: 1,
            lun: w.cmd.lun,
            itt,
            expected_data_len: if write { total } else { w.cmd.data_in_len },
            cmdsn,
            exp_statsn: self.exp_statsn,
            cdb: cdb16,
        }
        .to_bhs();
        let mut out = BytesMut::new();
        pdu::encode_parts(bhs, &ahs, &data_out[..immediate], self.digests, &mut out);
        if unsolicited_end > immediate {
            self.encode_data_out(
                &mut out,
                w.cmd.lun,
                itt,
                RESERVED_TAG,
                &data_out,
                immediate,
                unsolicited_end,
            );
        }
        self.scsi.insert(
            itt,
            ScsiTask {
                lun: w.cmd.lun,
                cmdsn,
                write,
                data_out,
                next_r2tsn: 0,
                expected_in: w.cmd.data_in_len,
                data_in: BytesMut::new(),
                next_datasn: 0,
                deadline: w.deadline,
                reply: Some(w.reply),
            },
        );
        self.send_bytes(out.freeze())
    }

    /// Data-Out PDUs for `data[start..end]` (one sequence: DataSN from 0, F on the last,
    /// RFC 7143 §11.7), each at most the target's MaxRecvDataSegmentLength.
    #[allow(clippy::too_many_arguments)] // one call per sequence kind; a struct would only rename them
    fn encode_data_out(
        &self,
        out: &mut BytesMut,
        lun: u64,
        itt: u32,
        ttt: u32,
        data: &Bytes,
        start: usize,
        end: usize,
    ) {
        let max_pdu = (self.negotiated.params.target_max_recv_data_segment_length as usize).max(512);
        let mut offset = start;
        let mut datasn = 0u32;
        while offset < end {
            let len = (end - offset).min(max_pdu);
            let bhs = DataOut {
                final_: offset + len == end,
                lun,
                itt,
                ttt,
                exp_statsn: self.exp_statsn,
                datasn,
                buffer_offset: offset as u32,
            }
            .to_bhs();
            pdu::encode_parts(bhs, &[], &data[offset..offset + len], self.digests, out);
            offset += len;
            datasn = datasn.wrapping_add(1);
        }
    }

    fn on_timer(&mut self, now: Instant) -> Flow {
        // Keepalive (RFC 7143 §11.18: a NOP-Out with a valid ITT asks for a NOP-In).
        if !self.cfg.nop_interval.is_zero() {
            match self.ping {
                Some((_, at)) if at <= now => {
                    return Err(SessionError::Timeout(format!(
                        "no NOP-In within {:?} of our NOP-Out",
                        self.cfg.nop_timeout
                    )));
                }
                None if self.next_ping_at <= now => {
                    let itt = self.alloc_itt();
                    let bhs = NopOut {
                        immediate: true,
                        lun: 0,
                        itt,
                        ttt: RESERVED_TAG,
                        cmdsn: self.cmdsn,
                        exp_statsn: self.exp_statsn,
                    }
                    .to_bhs();
                    self.ping = Some((itt, now + self.cfg.nop_timeout));
                    self.send(bhs, &[], &[])?;
                }
                _ => {}
            }
        }
        // Commands still waiting for the window: nothing to abort.
        while self.waiting.front().is_some_and(|w| w.deadline <= now) {
            if let Some(w) = self.waiting.pop_front() {
                let _ = w.reply.send(Err(SessionError::Timeout(format!(
                    "command not sent within {:?} (CmdSN window closed or queue full)",
                    self.cfg.command_timeout
                ))));
            }
        }
        // Commands in flight: ABORT TASK (§11.5.1), bounded by abort_timeout.
        let expired: Vec<u32> = self
            .scsi
            .iter()
            .filter(|(_, t)| t.reply.is_some() && t.deadline <= now)
            .map(|(itt, _)| *itt)
            .collect();
        for itt in expired {
            let Some(task) = self.scsi.get_mut(&itt) else {
                continue;
            };
            let Some(reply) = task.reply.take() else {
                continue;
            };
            let (lun, cmdsn) = (task.lun, task.cmdsn);
            warn!(
                itt,
                lun, "command timed out after {:?}; aborting it", self.cfg.command_timeout
            );
            self.send_tmf(
                tmf::ABORT_TASK,
                lun,
                itt,
                cmdsn,
                self.cfg.abort_timeout,
                TmfReply::Timeout { task_itt: itt, reply },
            )?;
        }
        if let Some((itt, _)) = self.tmfs.iter().find(|(_, t)| t.deadline <= now) {
            return Err(SessionError::Timeout(format!(
                "task management request {itt:#x} not answered within {:?}",
                self.cfg.abort_timeout
            )));
        }
        if let Some((_, at, _)) = &self.logout
            && *at <= now
        {
            return Err(SessionError::Timeout(format!(
                "logout not answered within {:?}",
                self.cfg.logout_timeout
            )));
        }
        self.maybe_target_logout(now)
    }

    /// The logout the target asked for (Async event 1): once no command is in flight, or when
    /// the target's deadline has come.
    fn maybe_target_logout(&mut self, now: Instant) -> Flow {
        if let Some(at) = self.logout_requested_by_target
            && (at <= now || self.scsi.is_empty())
            && self.logout.is_none()
        {
            // The logout's own timeout bounds what follows.
            self.logout_requested_by_target = Some(now + Duration::from_secs(3600));
            self.send_logout(None)?;
        }
        Ok(())
    }

    /// RFC 7143 §4.2.2.1: ExpCmdSN/MaxCmdSN only move forward; a MaxCmdSN below ExpCmdSN-1 is
    /// ignored.
    fn update_window(&mut self, exp: u32, max: u32) {
        if serial::lt(max, exp.wrapping_sub(1)) {
            return;
        }
        if serial::gt(exp, self.exp_cmdsn) {
            self.exp_cmdsn = exp;
        }
        if serial::gt(max, self.max_cmdsn) {
            self.max_cmdsn = max;
        }
    }

    fn update_statsn(&mut self, statsn: u32) {
        let next = statsn.wrapping_add(1);
        if serial::gt(next, self.exp_statsn) {
            self.exp_statsn = next;
        }
    }

    fn on_pdu(&mut self, p: Pdu) -> Flow {
        let b = p.bhs;
        // Every target PDU carries ExpCmdSN/MaxCmdSN at the same offsets (§11.2.1).
        let seq = ScsiResponse::parse(&b).seq;
        self.update_window(seq.exp_cmdsn, seq.max_cmdsn);
        if !p.ahs.is_empty() && b.opcode() != Opcode::ScsiResponse {
            return Err(proto_err("unexpected AHS"));
        }
        match b.opcode() {
            Opcode::DataIn => self.on_data_in(&b, p.data),
            Opcode::ScsiResponse => self.on_scsi_response(&b, p.data),
            Opcode::ReadyToTransfer => self.on_r2t(&b),
            Opcode::NopIn => self.on_nop_in(&b, p.data),
            Opcode::TaskMgmtResponse => self.on_tmf_response(&b),
            Opcode::LogoutResponse => self.on_logout_response(&b),
            Opcode::Reject => self.on_reject(&b, &p.data),
            Opcode::AsyncMessage => self.on_async(&b),
            other => Err(SessionError::Protocol(format!(
                "unexpected opcode {:#04x} in full-feature phase",
                other.to_u8()
            ))),
        }
    }

    fn on_data_in(&mut self, b: &Bhs, data: Bytes) -> Flow {
        let d = DataIn::parse(b);
        let Some(task) = self.scsi.get_mut(&d.itt) else {
            return Err(SessionError::Protocol(format!("Data-In for unknown ITT {:#x}", d.itt)));
        };
        if task.write || task.expected_in == 0 && !data.is_empty() {
            return Err(SessionError::Protocol(format!(
                "Data-In for ITT {:#x}, which is not a read",
                d.itt
            )));
        }
        if d.datasn != task.next_datasn {
            return Err(SessionError::Protocol(format!(
                "Data-In DataSN {} for ITT {:#x}, expected {}",
                d.datasn, d.itt, task.next_datasn
            )));
        }
        let have = task.data_in.len() as u64;
        if u64::from(d.buffer_offset) != have {
            return Err(SessionError::Protocol(format!(
                "Data-In buffer offset {} for ITT {:#x}, expected {have} (DataPDUInOrder=Yes)",
                d.buffer_offset, d.itt
            )));
        }
        if have + data.len() as u64 > u64::from(task.expected_in) {
            return Err(SessionError::Protocol(format!(
                "Data-In for ITT {:#x} beyond the expected {} bytes",
                d.itt, task.expected_in
            )));
        }
        if d.status.is_some() && !d.final_ {
            return Err(proto_err("Data-In with status but without the F bit"));
        }
        task.next_datasn = task.next_datasn.wrapping_add(1);
        if task.data_in.capacity() == 0 {
            task.data_in.reserve(task.expected_in as usize);
        }
        task.data_in.extend_from_slice(&data);
        if let Some(status) = d.status {
            self.update_statsn(d.seq.statsn);
            if let Some(task) = self.scsi.remove(&d.itt)
                && let Some(reply) = task.reply
            {
                let _ = reply.send(Ok(CommandResult {
                    status,
                    sense: None,
                    data: task.data_in.freeze(),
                    residual: d.residual,
                }));
            }
        }
        Ok(())
    }

    fn on_scsi_response(&mut self, b: &Bhs, data: Bytes) -> Flow {
        let r = ScsiResponse::parse(b);
        self.update_statsn(r.seq.statsn);
        let Some(task) = self.scsi.remove(&r.itt) else {
            return Err(SessionError::Protocol(format!(
                "SCSI Response for unknown ITT {:#x}",
                r.itt
            )));
        };
        let sense = if data.len() >= 2 {
            let len = usize::from(u16::from_be_bytes([data[0], data[1]]));
            if 2 + len > data.len() {
                return Err(SessionError::Protocol(format!(
                    "sense length {len} exceeds the {}-byte data segment",
                    data.len()
                )));
            }
            (len > 0).then(|| data.slice(2..2 + len))
        } else if data.is_empty() {
            None
        } else {
            return Err(proto_err("SCSI Response data segment of 1 byte"));
        };
        let Some(reply) = task.reply else {
            return Ok(());
        };
        let result = if r.response != 0 {
            Err(SessionError::TargetFailure(r.response))
        } else {
            Ok(CommandResult {
                status: r.status,
                sense,
                data: task.data_in.freeze(),
                residual: r.residual,
            })
        };
        let _ = reply.send(result);
        Ok(())
    }

    fn on_r2t(&mut self, b: &Bhs) -> Flow {
        let r = ReadyToTransfer::parse(b);
        let max_burst = self.negotiated.params.max_burst_length;
        let Some(task) = self.scsi.get_mut(&r.itt) else {
            return Err(SessionError::Protocol(format!("R2T for unknown ITT {:#x}", r.itt)));
        };
        if !task.write {
            return Err(SessionError::Protocol(format!(
                "R2T for ITT {:#x}, which is not a write",
                r.itt
            )));
        }
        if r.r2tsn != task.next_r2tsn {
            return Err(SessionError::Protocol(format!(
                "R2TSN {} for ITT {:#x}, expected {}",
                r.r2tsn, r.itt, task.next_r2tsn
            )));
        }
        let end = u64::from(r.buffer_offset) + u64::from(r.desired_len);
        if r.desired_len == 0 || r.desired_len > max_burst || end > task.data_out.len() as u64 {
            return Err(SessionError::Protocol(format!(
                "R2T for ITT {:#x} asks for {} bytes at offset {} (write of {} bytes, MaxBurstLength {max_burst})",
                r.itt,
                r.desired_len,
                r.buffer_offset,
                task.data_out.len()
            )));
        }
        if r.ttt == RESERVED_TAG {
            return Err(proto_err("R2T with the reserved target transfer tag"));
        }
        task.next_r2tsn = task.next_r2tsn.wrapping_add(1);
        if task.reply.is_none() {
            // Being aborted: send nothing more for it.
            return Ok(());
        }
        let (lun, data) = (task.lun, task.data_out.clone());
        let mut out = BytesMut::new();
        self.encode_data_out(
            &mut out,
            lun,
            r.itt,
            r.ttt,
            &data,
            r.buffer_offset as usize,
            end as usize,
        );
        self.send_bytes(out.freeze())
    }

    fn on_nop_in(&mut self, b: &Bhs, data: Bytes) -> Flow {
        let n = NopIn::parse(b);
        if n.itt != RESERVED_TAG {
            // The answer to our ping.
            match self.ping {
                Some((itt, _)) if itt == n.itt => {
                    self.update_statsn(n.seq.statsn);
                    self.ping = None;
                    self.next_ping_at = Instant::now() + self.cfg.nop_interval;
                    Ok(())
                }
                _ => Err(SessionError::Protocol(format!("NOP-In for unknown ITT {:#x}", n.itt))),
            }
        } else if n.ttt != RESERVED_TAG {
            // A target ping (§11.19.1.2): answer with its TTT and data.
            let bhs = NopOut {
                immediate: true,
                lun: n.lun,
                itt: RESERVED_TAG,
                ttt: n.ttt,
                cmdsn: self.cmdsn,
                exp_statsn: self.exp_statsn,
            }
            .to_bhs();
            self.send(bhs, &[], &data)
        } else {
            // An unsolicited NOP-In that wants no answer (e.g. a window update).
            Ok(())
        }
    }

    fn on_tmf_response(&mut self, b: &Bhs) -> Flow {
        let r = TaskMgmtResponse::parse(b);
        self.update_statsn(r.seq.statsn);
        let Some(t) = self.tmfs.remove(&r.itt) else {
            return Err(SessionError::Protocol(format!(
                "Task Management Response for unknown ITT {:#x}",
                r.itt
            )));
        };
        let response = TmfResponse::from_code(r.response);
        match t.reply {
            TmfReply::User {
                function,
                lun,
                referenced_itt,
                reply,
            } => {
                if response == TmfResponse::FunctionComplete
                    && matches!(
                        function,
                        tmf::ABORT_TASK | tmf::ABORT_TASK_SET | tmf::LOGICAL_UNIT_RESET
                    )
                {
                    // The target terminated the task, or every task of ours on the LU, and sends
                    // no response for them (§11.5.1).
                    let gone: Vec<u32> = self
                        .scsi
                        .iter()
                        .filter(|(itt, t)| match function {
                            tmf::ABORT_TASK => **itt == referenced_itt,
                            _ => t.lun == lun,
                        })
                        .map(|(itt, _)| *itt)
                        .collect();
                    for itt in gone {
                        if let Some(task) = self.scsi.remove(&itt)
                            && let Some(r) = task.reply
                        {
                            let _ = r.send(Err(SessionError::Aborted(format!(
                                "task management function {function} on LUN {lun}"
                            ))));
                        }
                    }
                }
                let _ = reply.send(Ok(response));
                Ok(())
            }
            TmfReply::Timeout { task_itt, reply } => {
                self.scsi.remove(&task_itt);
                let _ = reply.send(Err(SessionError::Timeout(format!(
                    "command timed out after {:?} and was aborted ({response:?})",
                    self.cfg.command_timeout
                ))));
                match response {
                    TmfResponse::FunctionComplete | TmfResponse::TaskDoesNotExist => Ok(()),
                    other => Err(SessionError::Timeout(format!(
                        "the target refused to abort a timed-out command ({other:?})"
                    ))),
                }
            }
        }
    }

    fn on_logout_response(&mut self, b: &Bhs) -> Flow {
        let r = pdu::LogoutResponse::parse(b);
        match self.logout.take() {
            Some((itt, _, reply)) if itt == r.itt => {
                let reason = if self.logout_requested_by_target.is_some() {
                    SessionError::TargetLogout
                } else {
                    SessionError::Closed
                };
                // Dead before the caller hears back, so `is_alive` is false once logout returns.
                self.dead.send_replace(Some(reason.clone()));
                if let Some(reply) = reply {
                    let _ = reply.send(if r.response == 0 {
                        Ok(())
                    } else {
                        Err(proto_err(&format!("logout refused (response {})", r.response)))
                    });
                }
                Err(reason)
            }
            _ => Err(SessionError::Protocol(format!(
                "Logout Response for unknown ITT {:#x}",
                r.itt
            ))),
        }
    }

    fn on_reject(&mut self, b: &Bhs, data: &[u8]) -> Flow {
        let r = pdu::Reject::parse(b);
        self.update_statsn(r.seq.statsn);
        let Some(header) = data.get(..pdu::BHS_LEN) else {
            return Err(proto_err("Reject without the rejected header"));
        };
        let mut raw = [0u8; pdu::BHS_LEN];
        raw.copy_from_slice(header);
        let rejected = Bhs(raw);
        let itt = rejected.itt();
        warn!(reason = r.reason, opcode = ?rejected.opcode(), itt, "target rejected a PDU");
        let what = format!("{:?} PDU", rejected.opcode());
        let err = SessionError::Rejected { reason: r.reason, what };
        match rejected.opcode() {
            Opcode::ScsiCommand | Opcode::DataOut => {
                if let Some(task) = self.scsi.remove(&itt)
                    && let Some(reply) = task.reply
                {
                    let _ = reply.send(Err(err));
                }
                Ok(())
            }
            Opcode::NopOut => {
                if self.ping.map(|(p, _)| p) == Some(itt) {
                    self.ping = None;
                    self.next_ping_at = Instant::now() + self.cfg.nop_interval;
                }
                Ok(())
            }
            Opcode::TaskMgmtRequest => match self.tmfs.remove(&itt).map(|t| t.reply) {
                Some(TmfReply::User { reply, .. }) => {
                    let _ = reply.send(Err(err));
                    Ok(())
                }
                Some(TmfReply::Timeout { .. }) => Err(SessionError::Timeout(
                    "the target rejected the abort of a timed-out command".into(),
                )),
                None => Ok(()),
            },
            Opcode::LogoutRequest => Err(err),
            _ => Ok(()),
        }
    }

    fn on_async(&mut self, b: &Bhs) -> Flow {
        // §11.9: AsyncEvent at byte 36, Parameter1..3 at 38, 40, 42.
        let statsn = u32::from_be_bytes([b.0[24], b.0[25], b.0[26], b.0[27]]);
        self.update_statsn(statsn);
        let event = b.0[36];
        let param3 = u16::from_be_bytes([b.0[42], b.0[43]]);
        match event {
            0 => {
                info!("SCSI asynchronous event from the target");
                Ok(())
            }
            1 => {
                // Log out within Parameter3 seconds, after the commands in flight finish.
                let wait = Duration::from_secs(u64::from(param3)).min(self.cfg.command_timeout);
                warn!("target requests logout within {param3} s");
                self.logout_requested_by_target = Some(Instant::now() + wait);
                for w in self.waiting.drain(..) {
                    let _ = w.reply.send(Err(SessionError::TargetLogout));
                }
                Ok(())
            }
            2 | 3 => Err(SessionError::ConnectionLost(
                "the target announced it drops the connection (Async Message)".into(),
            )),
            4 => {
                debug!("target asks for parameter negotiation; not supported, ignored");
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

fn proto_err(m: &str) -> SessionError {
    SessionError::Protocol(m.to_owned())
}

/// The extended-CDB AHS (RFC 7143 §11.3.5, §11.2.1.3) for CDB bytes beyond 16.
fn extended_cdb_ahs(cdb: &[u8]) -> Vec<u8> {
    if cdb.len() <= 16 {
        return Vec::new();
    }
    let ext = &cdb[16..];
    // AHSLength counts the reserved byte plus the CDB bytes.
    let len = (ext.len() + 1) as u16;
    let mut ahs = Vec::with_capacity(4 + ext.len() + 3);
    ahs.extend_from_slice(&len.to_be_bytes());
    ahs.push(pdu::ahs_type::EXTENDED_CDB);
    ahs.push(0);
    ahs.extend_from_slice(ext);
    while !ahs.len().is_multiple_of(4) {
        ahs.push(0);
    }
    ahs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_printed() {
        let c = ChapCredentials::new("user", "topsecret");
        assert!(!format!("{c:?}").contains("topsecret"));
        assert_eq!(format!("{}", c.secret), "***");
        let cfg = SessionConfig {
            chap: Some(c),
            ..SessionConfig::default()
        };
        assert!(!format!("{cfg:?}").contains("topsecret"));
    }

    #[test]
    fn config_validation() {
        assert!(SessionConfig::default().validate().is_ok());
        let bad = SessionConfig {
            queue_depth: 0,
            ..SessionConfig::default()
        };
        assert!(matches!(bad.validate(), Err(SessionError::Config(_))));
        let bad = SessionConfig {
            first_burst_length: 100,
            ..SessionConfig::default()
        };
        assert!(bad.validate().is_err());
        let bad = SessionConfig {
            mutual_chap: Some(ChapCredentials::new("t", "s")),
            ..SessionConfig::default()
        };
        assert!(bad.validate().is_err());
        let ok = SessionConfig {
            chap: Some(ChapCredentials::new("u", "s")),
            mutual_chap: Some(ChapCredentials::new("t", "s")),
            ..SessionConfig::default()
        };
        assert!(ok.validate().is_ok());
    }

    /// RFC 7143 §11.3.5: AHSLength = CDB length - 15 (the reserved byte plus the extra CDB
    /// bytes), AHSType 1, padded to 4 bytes.
    #[test]
    fn extended_cdb_layout() {
        assert!(extended_cdb_ahs(&[0u8; 16]).is_empty());
        let cdb: Vec<u8> = (0..18).collect();
        let ahs = extended_cdb_ahs(&cdb);
        assert_eq!(ahs, vec![0, 3, 1, 0, 16, 17, 0, 0]);
    }

    #[test]
    fn path_failures() {
        assert!(SessionError::ConnectionLost("x".into()).is_path_failure());
        assert!(SessionError::Timeout("x".into()).is_path_failure());
        assert!(SessionError::Protocol("x".into()).is_path_failure());
        assert!(!SessionError::AuthFailed("x".into()).is_path_failure());
        assert!(!SessionError::Config("x".into()).is_path_failure());
    }
}
