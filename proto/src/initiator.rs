//! Initiator-side login state machine and SendTargets helpers, sans-io (RFC 7143 §6.3, §11.12,
//! §11.13, §12.1.3, §12.3, §13).
//!
//! The caller connects, calls [`InitiatorLogin::start`] and sends the returned [`LoginPdu`],
//! then feeds every Login Response PDU to [`InitiatorLogin::on_response`] until it returns
//! [`LoginEvent::Done`] (full-feature phase, with the [`LoginOutcome`]) or an error (the caller
//! closes the connection). Randomness (ISID, mutual CHAP challenge and identifier) comes from
//! the caller in [`InitiatorSettings`].
//!
//! ```text
//!  start ──▶ Security ──AuthMethod=None, T=1──────────────────────────┐
//!              │ AuthMethod=CHAP                                       │
//!              ▼                                                        ▼
//!           ChapAlgorithm ─CHAP_A/I/C▶ ChapResponse ─(mutual CHAP_R ok)▶ Operational
//!                                                                       │ T=1, NSG=3
//!                                                                       ▼
//!                                                                  FullFeature
//! ```
//!
//! * Every response is checked: opcode, ITT, ISID, version, CSG, NSG, a T bit we did not ask
//!   for, and the status class ([`LoginError`] says which; redirects carry their address).
//! * Requests longer than [`LOGIN_SEGMENT_LEN`] go out in C-bit pieces (§11.12.2); a response
//!   with the C bit set is answered with an empty request until its text is complete (at most
//!   [`MAX_LOGIN_TEXT_BYTES`]).
//! * The operational stage offers every key of [`InitiatorSettings`] in one request and checks
//!   each answer against its result function (§6.2, §13): an answer a target may not give is a
//!   [`LoginError::Negotiation`].
//!
//! Deliberately not done: multiple connections per session, ErrorRecoveryLevel > 0, markers,
//! SRP/Kerberos authentication.

use std::collections::BTreeSet;

use crate::chap::{self, ChapAlgorithm};
use crate::pdu::{self, Bhs, Opcode, RESERVED_TAG};
use crate::text::{self, MAX_SEGMENT_LENGTH, MIN_SEGMENT_LENGTH};

/// Login stages of CSG/NSG (RFC 7143 §11.12.3).
pub use crate::login::{ISCSI_VERSION, STAGE_FULL_FEATURE, STAGE_OPERATIONAL, STAGE_SECURITY};

/// Largest data segment of one Login Request we send: the target's MaxRecvDataSegmentLength
/// is not known during login, so its default applies (RFC 7143 §13.12).
pub const LOGIN_SEGMENT_LEN: usize = text::DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH as usize;
/// Most text bytes one (possibly continued) login or text response may carry (a limit of ours).
pub const MAX_LOGIN_TEXT_BYTES: usize = 64 * 1024;
/// Most request/response rounds in the operational stage before we give up (a limit of ours;
/// a well-behaved target needs one or two).
pub const MAX_OPERATIONAL_ROUNDS: u32 = 8;
/// Most SendTargets response bytes we accept across continued Text Responses.
pub const MAX_SEND_TARGETS_BYTES: usize = 1024 * 1024;
/// The well-known iSCSI port (RFC 7143 §13.2), used when a TargetAddress has none.
pub const DEFAULT_PORT: u16 = 3260;

/// A CHAP account: the name sent as / expected in CHAP_N and its secret. Debug hides the
/// secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ChapAccount {
    pub user: String,
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for ChapAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChapAccount")
            .field("user", &self.user)
            .field("secret", &"***")
            .finish()
    }
}

/// Operational proposals (RFC 7143 §13). Defaults are open-iscsi's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proposals {
    /// Offer `CRC32C,None` instead of `None` for HeaderDigest (§13.1).
    pub header_digest: bool,
    /// Offer `CRC32C,None` instead of `None` for DataDigest (§13.1).
    pub data_digest: bool,
    /// Declared: the largest data segment we receive (§13.12), 512..=2^24-1.
    pub max_recv_data_segment_length: u32,
    /// §13.13, 512..=2^24-1.
    pub max_burst_length: u32,
    /// §13.14, 512..=2^24-1, at most `max_burst_length`.
    pub first_burst_length: u32,
    /// §13.10.
    pub initial_r2t: bool,
    /// §13.11.
    pub immediate_data: bool,
    /// §13.8 DefaultTime2Wait, 0..=3600.
    pub default_time2wait: u16,
    /// §13.9 DefaultTime2Retain, 0..=3600.
    pub default_time2retain: u16,
}

impl Default for Proposals {
    fn default() -> Self {
        Self {
            header_digest: false,
            data_digest: false,
            max_recv_data_segment_length: 262_144,
            max_burst_length: 16_776_192,
            first_burst_length: 262_144,
            initial_r2t: false,
            immediate_data: true,
            default_time2wait: 2,
            default_time2retain: 0,
        }
    }
}

/// Everything the initiator brings to a login.
#[derive(Clone, Debug)]
pub struct InitiatorSettings {
    pub initiator_name: String,
    pub initiator_alias: Option<String>,
    /// `None` opens a discovery session (SessionType=Discovery, §13.21).
    pub target_name: Option<String>,
    /// Initiator Session ID (§11.12.5), chosen by the caller.
    pub isid: [u8; 6],
    /// 0 for a new session (§11.12.6).
    pub tsih: u16,
    pub cid: u16,
    /// The initial CmdSN (§11.12.8).
    pub cmdsn: u32,
    /// The ITT of the Login Requests.
    pub itt: u32,
    /// Our CHAP account; `None` offers AuthMethod=None only.
    pub chap: Option<ChapAccount>,
    /// The account the target must prove it knows (mutual CHAP); needs `chap`.
    pub mutual_chap: Option<ChapAccount>,
    /// CHAP_I we send for mutual CHAP (random, from the caller).
    pub mutual_chap_id: u8,
    /// CHAP_C we send for mutual CHAP (random, 16..=1024 bytes, from the caller).
    pub mutual_chap_challenge: Vec<u8>,
    /// CHAP_A offer, most preferred first.
    pub chap_algorithms: Vec<ChapAlgorithm>,
    pub proposals: Proposals,
}

impl InitiatorSettings {
    /// Settings with open-iscsi's defaults and no authentication.
    pub fn new(initiator_name: &str, target_name: Option<&str>, isid: [u8; 6]) -> Self {
        Self {
            initiator_name: initiator_name.to_owned(),
            initiator_alias: None,
            target_name: target_name.map(str::to_owned),
            isid,
            tsih: 0,
            cid: 0,
            cmdsn: 1,
            itt: 0,
            chap: None,
            mutual_chap: None,
            mutual_chap_id: 0,
            mutual_chap_challenge: Vec::new(),
            chap_algorithms: vec![ChapAlgorithm::Sha256, ChapAlgorithm::Sha1, ChapAlgorithm::Md5],
            proposals: Proposals::default(),
        }
    }

    /// Checks the settings before anything is sent; the message names the field and the rule.
    pub fn validate(&self) -> Result<(), String> {
        let name_ok = |n: &str| !n.is_empty() && n.len() <= crate::login::MAX_ISCSI_NAME_LEN && !n.contains('\0');
        if !name_ok(&self.initiator_name) {
            return Err("initiator name must be 1..=223 bytes without NUL (RFC 7143 §4.2.7.1)".into());
        }
        if let Some(t) = &self.target_name
            && !name_ok(t)
        {
            return Err("target name must be 1..=223 bytes without NUL (RFC 7143 §4.2.7.1)".into());
        }
        let p = &self.proposals;
        for (name, v) in [
            ("max_recv_data_segment_length", p.max_recv_data_segment_length),
            ("max_burst_length", p.max_burst_length),
            ("first_burst_length", p.first_burst_length),
        ] {
            if !(MIN_SEGMENT_LENGTH..=MAX_SEGMENT_LENGTH).contains(&v) {
                return Err(format!(
                    "{name} = {v} is outside {MIN_SEGMENT_LENGTH}..={MAX_SEGMENT_LENGTH} (RFC 7143 §13)"
                ));
            }
        }
        if p.first_burst_length > p.max_burst_length {
            return Err("first_burst_length must not exceed max_burst_length (RFC 7143 §13.14)".into());
        }
        if p.default_time2wait > 3600 || p.default_time2retain > 3600 {
            return Err("default_time2wait/default_time2retain must be 0..=3600 (RFC 7143 §13.15-16)".into());
        }
        if self.mutual_chap.is_some() {
            if self.chap.is_none() {
                return Err("mutual CHAP needs the initiator's own CHAP account too".into());
            }
            if !(16..=chap::MAX_BINARY_LEN).contains(&self.mutual_chap_challenge.len()) {
                return Err("the mutual CHAP challenge must be 16..=1024 bytes".into());
            }
        }
        if let Some(a) = &self.chap
            && (a.user.is_empty() || a.secret.is_empty())
        {
            return Err("CHAP user and secret must not be empty".into());
        }
        if self.chap.is_some() && self.chap_algorithms.is_empty() {
            return Err("at least one CHAP algorithm must be offered".into());
        }
        Ok(())
    }

    fn discovery(&self) -> bool {
        self.target_name.is_none()
    }
}

/// The operational parameters the session runs with (RFC 7143 §13), as both sides agreed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NegotiatedParams {
    pub header_digest: bool,
    pub data_digest: bool,
    /// What we declared: the largest data segment the target may send us.
    pub initiator_max_recv_data_segment_length: u32,
    /// What the target declared: the largest data segment we may send.
    pub target_max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub max_outstanding_r2t: u32,
    pub max_connections: u16,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub default_time2wait: u16,
    pub default_time2retain: u16,
    pub error_recovery_level: u8,
}

impl Default for NegotiatedParams {
    /// The RFC 7143 §13 defaults, which apply to every key not negotiated.
    fn default() -> Self {
        Self {
            header_digest: false,
            data_digest: false,
            initiator_max_recv_data_segment_length: text::DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH,
            target_max_recv_data_segment_length: text::DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            initial_r2t: true,
            immediate_data: true,
            max_outstanding_r2t: 1,
            max_connections: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            default_time2wait: 2,
            default_time2retain: 20,
            error_recovery_level: 0,
        }
    }
}

/// A Login Request to send: its header and text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginPdu {
    pub header: pdu::LoginRequest,
    pub data: Vec<u8>,
}

impl LoginPdu {
    pub fn bhs(&self) -> Bhs {
        self.header.to_bhs()
    }
}

/// What the login ended with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginOutcome {
    pub params: NegotiatedParams,
    pub tsih: u16,
    pub isid: [u8; 6],
    /// TargetPortalGroupTag (§13.9); `None` if the target did not send one (discovery).
    pub tpgt: Option<u16>,
    pub target_alias: Option<String>,
    /// The first CmdSN of full-feature phase (the login's, §11.12.8).
    pub cmdsn: u32,
    /// The next StatSN we expect.
    pub exp_statsn: u32,
    pub exp_cmdsn: u32,
    pub max_cmdsn: u32,
    /// Whether the target proved itself with mutual CHAP.
    pub target_authenticated: bool,
    /// The CHAP algorithm used, if CHAP ran.
    pub chap_algorithm: Option<ChapAlgorithm>,
}

/// What to do after a Login Response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoginEvent {
    /// Send this request and feed the next response.
    Send(LoginPdu),
    /// Full-feature phase: the connection carries the session from now on.
    Done(LoginOutcome),
}

/// Why a login failed. The caller closes the connection.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum LoginError {
    /// The settings are unusable (caused by the caller; see [`InitiatorSettings::validate`]).
    #[error("invalid login settings: {0}")]
    Settings(String),
    /// Status class 1 (§11.13.5): the target is elsewhere, at `host:port` (IPv6 in brackets).
    /// `temporary` for 0101.
    #[error("redirected to {address} ({})", if *temporary { "temporarily" } else { "permanently" })]
    Redirect { address: String, temporary: bool },
    /// 0201: our CHAP response was wrong or CHAP was required and not offered.
    #[error("authentication failure (login status 0201)")]
    AuthenticationFailed,
    /// 0202: the target's ACL refuses this initiator.
    #[error("authorization failure: the target refuses this initiator (login status 0202)")]
    AuthorizationFailed,
    /// 0203: no such target.
    #[error("target not found (login status 0203)")]
    NotFound,
    /// 0204: the target was removed.
    #[error("target removed (login status 0204)")]
    TargetRemoved,
    /// Any other status class 2 detail.
    #[error("initiator error reported by the target: {description} (login status 02{detail:02x})")]
    InitiatorError { detail: u8, description: &'static str },
    /// Status class 3 (§11.13.5): the target failed; a retry may work.
    #[error("target error: {description} (login status 03{detail:02x})")]
    TargetError { detail: u8, description: &'static str },
    /// A status class RFC 7143 does not define.
    #[error("unknown login status class {class:#04x} detail {detail:#04x}")]
    UnknownStatus { class: u8, detail: u8 },
    /// The target failed to prove itself (mutual CHAP) or ran CHAP wrongly.
    #[error("target authentication failed: {0}")]
    TargetAuthentication(String),
    /// The target answered a key with a value its result function forbids (§6.2, §13).
    #[error("negotiation of {key} failed: target answered {value:?} ({why})")]
    Negotiation {
        key: String,
        value: String,
        why: &'static str,
    },
    /// A malformed or unexpected Login Response (wrong opcode, ITT, ISID, stage, text, ...).
    #[error("protocol error during login: {0}")]
    Protocol(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Nothing sent yet.
    Idle,
    /// Sent the identity and AuthMethod.
    AuthMethod,
    /// Sent CHAP_A.
    ChapAlgorithm,
    /// Sent CHAP_N/CHAP_R (and CHAP_I/CHAP_C for mutual).
    ChapResponse(ChapAlgorithm),
    /// Authentication done; asked to transit to the operational stage.
    SecurityDone,
    /// Sent the operational offers (or answers) with T=1, NSG=3.
    Operational,
    /// Done or failed.
    Finished,
}

/// The initiator's side of one connection's login.
pub struct InitiatorLogin {
    settings: InitiatorSettings,
    phase: Phase,
    /// Request text not yet sent (C-bit pieces) and the header it goes with.
    outgoing: Vec<u8>,
    outgoing_header: Option<pdu::LoginRequest>,
    /// Response text of C-bit responses so far.
    incoming: Vec<u8>,
    exp_statsn: u32,
    params: NegotiatedParams,
    /// Keys we offered in the operational stage and have not seen answered yet.
    offered: BTreeSet<&'static str>,
    /// Answers to keys the target offered, for the next request.
    answers: Vec<(String, String)>,
    rounds: u32,
    tpgt: Option<u16>,
    target_alias: Option<String>,
    target_authenticated: bool,
    chap_algorithm: Option<ChapAlgorithm>,
    /// Whether the security stage needed CHAP from our side (for error mapping).
    chap_done: bool,
}

impl InitiatorLogin {
    /// Validates the settings.
    pub fn new(settings: InitiatorSettings) -> Result<Self, LoginError> {
        settings.validate().map_err(LoginError::Settings)?;
        let params = NegotiatedParams {
            initiator_max_recv_data_segment_length: settings.proposals.max_recv_data_segment_length,
            ..NegotiatedParams::default()
        };
        Ok(Self {
            settings,
            phase: Phase::Idle,
            outgoing: Vec::new(),
            outgoing_header: None,
            incoming: Vec::new(),
            exp_statsn: 0,
            params,
            offered: BTreeSet::new(),
            answers: Vec::new(),
            rounds: 0,
            tpgt: None,
            target_alias: None,
            target_authenticated: false,
            chap_algorithm: None,
            chap_done: false,
        })
    }

    /// The first Login Request: identity and AuthMethod in the security stage (§6.3).
    pub fn start(&mut self) -> LoginPdu {
        let s = &self.settings;
        let mut pairs: Vec<(&str, &str)> = vec![("InitiatorName", &s.initiator_name)];
        if let Some(alias) = &s.initiator_alias {
            pairs.push(("InitiatorAlias", alias));
        }
        match &s.target_name {
            Some(t) => {
                pairs.push(("SessionType", "Normal"));
                pairs.push(("TargetName", t));
            }
            None => pairs.push(("SessionType", "Discovery")),
        }
        pairs.push(("AuthMethod", if s.chap.is_some() { "CHAP,None" } else { "None" }));
        let mut data = Vec::new();
        text::encode(&pairs, &mut data);
        self.phase = Phase::AuthMethod;
        self.request(STAGE_SECURITY, true, STAGE_OPERATIONAL, data)
    }

    /// Handles one Login Response PDU (its header and data segment).
    pub fn on_response(&mut self, bhs: &Bhs, data: &[u8]) -> Result<LoginEvent, LoginError> {
        match self.step(bhs, data) {
            Ok(event) => {
                if matches!(event, LoginEvent::Done(_)) {
                    self.phase = Phase::Finished;
                }
                Ok(event)
            }
            Err(e) => {
                self.phase = Phase::Finished;
                Err(e)
            }
        }
    }

    /// The parameters as negotiated so far.
    pub fn params(&self) -> &NegotiatedParams {
        &self.params
    }

    /// Builds a request; text longer than [`LOGIN_SEGMENT_LEN`] is sent in C-bit pieces.
    fn request(&mut self, csg: u8, transit: bool, nsg: u8, data: Vec<u8>) -> LoginPdu {
        let header = pdu::LoginRequest {
            transit,
            cont: false,
            csg,
            nsg: if transit { nsg } else { 0 },
            version_max: ISCSI_VERSION,
            version_min: ISCSI_VERSION,
            isid: self.settings.isid,
            tsih: self.settings.tsih,
            itt: self.settings.itt,
            cid: self.settings.cid,
            cmdsn: self.settings.cmdsn,
            exp_statsn: self.exp_statsn,
        };
        self.outgoing = data;
        self.outgoing_header = Some(header);
        self.next_piece()
    }

    /// The next piece of the pending request.
    fn next_piece(&mut self) -> LoginPdu {
        let mut header = self.outgoing_header.unwrap_or(pdu::LoginRequest {
            transit: false,
            cont: false,
            csg: 0,
            nsg: 0,
            version_max: 0,
            version_min: 0,
            isid: self.settings.isid,
            tsih: 0,
            itt: self.settings.itt,
            cid: 0,
            cmdsn: self.settings.cmdsn,
            exp_statsn: 0,
        });
        header.exp_statsn = self.exp_statsn;
        if self.outgoing.len() > LOGIN_SEGMENT_LEN {
            let rest = self.outgoing.split_off(LOGIN_SEGMENT_LEN);
            let data = std::mem::replace(&mut self.outgoing, rest);
            // §11.12.2: T must be 0 while C is 1.
            header.cont = true;
            header.transit = false;
            header.nsg = 0;
            LoginPdu { header, data }
        } else {
            self.outgoing_header = None;
            LoginPdu {
                header,
                data: std::mem::take(&mut self.outgoing),
            }
        }
    }

    fn step(&mut self, bhs: &Bhs, data: &[u8]) -> Result<LoginEvent, LoginError> {
        if matches!(self.phase, Phase::Idle | Phase::Finished) {
            return Err(protocol("login response when no login request is outstanding"));
        }
        if bhs.opcode() != Opcode::LoginResponse {
            return Err(protocol(&format!(
                "expected a Login Response, got opcode {:#04x}",
                bhs.opcode().to_u8()
            )));
        }
        let r = pdu::LoginResponse::parse(bhs);
        if r.itt != self.settings.itt {
            return Err(protocol(&format!(
                "Login Response ITT {:#x} is not ours ({:#x})",
                r.itt, self.settings.itt
            )));
        }
        self.exp_statsn = r.seq.statsn.wrapping_add(1);
        if r.status_class != 0 {
            return Err(status_error(r.status_class, r.status_detail, data));
        }
        if r.isid != self.settings.isid {
            return Err(protocol("Login Response ISID differs from ours"));
        }
        if r.version_active != ISCSI_VERSION {
            return Err(protocol(&format!("unsupported iSCSI version {}", r.version_active)));
        }
        let sent_csg = self.current_stage();
        if r.csg != sent_csg {
            return Err(protocol(&format!(
                "Login Response in stage {} to a request in stage {sent_csg}",
                r.csg
            )));
        }
        if r.transit && r.cont {
            return Err(protocol("Login Response with both T and C set"));
        }
        // More pieces of our own request to send: the target answers each with an empty
        // response (§11.12.2).
        if self.outgoing_header.is_some() {
            if !data.is_empty() || r.transit {
                return Err(protocol("target answered a continued request before it was complete"));
            }
            return Ok(LoginEvent::Send(self.next_piece()));
        }
        if self.incoming.len() + data.len() > MAX_LOGIN_TEXT_BYTES {
            return Err(protocol("login response text too long"));
        }
        self.incoming.extend_from_slice(data);
        if r.cont {
            // §11.12.2: ask for the rest with an empty request in the same stage.
            return Ok(LoginEvent::Send(self.request(sent_csg, false, 0, Vec::new())));
        }
        let text = std::mem::take(&mut self.incoming);
        let pairs = text::parse(&text).map_err(|e| protocol(&format!("malformed login response text: {e}")))?;
        let mut seen = BTreeSet::new();
        for (k, _) in &pairs {
            if !seen.insert(k.as_str()) {
                return Err(protocol(&format!("key {k} twice in one login response")));
            }
        }
        if r.transit {
            let asked = self.outgoing_transit_target();
            if asked.is_none() {
                return Err(protocol("target set T without the initiator asking to transit"));
            }
            if r.nsg <= r.csg || Some(r.nsg) > asked || (r.nsg != STAGE_OPERATIONAL && r.nsg != STAGE_FULL_FEATURE) {
                return Err(protocol(&format!("transit from stage {} to stage {}", r.csg, r.nsg)));
            }
        }
        self.take_declarations(&pairs)?;
        match self.phase {
            Phase::AuthMethod | Phase::ChapAlgorithm | Phase::ChapResponse(_) | Phase::SecurityDone => {
                self.security(&r, &pairs)
            }
            Phase::Operational => self.operational(&r, &pairs),
            Phase::Idle | Phase::Finished => Err(protocol("login response after the login ended")),
        }
    }

    /// The stage of the request the target answers.
    fn current_stage(&self) -> u8 {
        match self.phase {
            Phase::Operational => STAGE_OPERATIONAL,
            _ => STAGE_SECURITY,
        }
    }

    /// The NSG we asked for in the request being answered, if T was set.
    fn outgoing_transit_target(&self) -> Option<u8> {
        match self.phase {
            Phase::AuthMethod | Phase::ChapResponse(_) | Phase::SecurityDone => Some(STAGE_OPERATIONAL),
            Phase::Operational => Some(STAGE_FULL_FEATURE),
            _ => None,
        }
    }

    /// TargetAlias, TargetPortalGroupTag, MaxRecvDataSegmentLength may come in any response.
    fn take_declarations(&mut self, pairs: &[(String, String)]) -> Result<(), LoginError> {
        for (k, v) in pairs {
            match k.as_str() {
                "TargetPortalGroupTag" => {
                    let tag = text::parse_number(v)
                        .and_then(|n| u16::try_from(n).ok())
                        .ok_or_else(|| protocol(&format!("invalid TargetPortalGroupTag {v:?}")))?;
                    self.tpgt = Some(tag);
                }
                "TargetAlias" => self.target_alias = Some(v.clone()),
                "MaxRecvDataSegmentLength" => {
                    let n = text::parse_number(v)
                        .and_then(|n| u32::try_from(n).ok())
                        .filter(|n| (MIN_SEGMENT_LENGTH..=MAX_SEGMENT_LENGTH).contains(n))
                        .ok_or_else(|| negotiation(k, v, "not a number in 512..=2^24-1"))?;
                    self.params.target_max_recv_data_segment_length = n;
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn security(&mut self, r: &pdu::LoginResponse, pairs: &[(String, String)]) -> Result<LoginEvent, LoginError> {
        let declaration = |k: &str| matches!(k, "TargetPortalGroupTag" | "TargetAlias" | "MaxRecvDataSegmentLength");
        match self.phase {
            Phase::AuthMethod => {
                let method = value_of(pairs, "AuthMethod");
                match method {
                    Some("CHAP") if self.settings.chap.is_some() => {
                        if r.transit {
                            return Err(protocol("target transited before CHAP ran"));
                        }
                        let offer: Vec<String> = self
                            .settings
                            .chap_algorithms
                            .iter()
                            .map(|a| a.code().to_string())
                            .collect();
                        let mut data = Vec::new();
                        text::encode(&[("CHAP_A", &offer.join(","))], &mut data);
                        self.phase = Phase::ChapAlgorithm;
                        Ok(LoginEvent::Send(self.request(STAGE_SECURITY, false, 0, data)))
                    }
                    Some("None") | None => {
                        if method.is_none() && !r.transit {
                            return Err(protocol("target did not answer AuthMethod"));
                        }
                        if self.settings.mutual_chap.is_some() {
                            return Err(LoginError::TargetAuthentication(
                                "mutual CHAP is configured but the target chose AuthMethod=None".into(),
                            ));
                        }
                        self.phase = Phase::SecurityDone;
                        self.after_security(r)
                    }
                    Some(other) => Err(negotiation("AuthMethod", other, "not one we offered")),
                }
            }
            Phase::ChapAlgorithm => {
                let account = self
                    .settings
                    .chap
                    .clone()
                    .ok_or_else(|| protocol("CHAP without an account"))?;
                if r.transit {
                    return Err(protocol("target transited before CHAP ran"));
                }
                let alg_value = value_of(pairs, "CHAP_A").ok_or_else(|| protocol("CHAP_A missing"))?;
                let alg = text::parse_number(alg_value)
                    .and_then(|n| u32::try_from(n).ok())
                    .and_then(ChapAlgorithm::from_code)
                    .filter(|a| self.settings.chap_algorithms.contains(a))
                    .ok_or_else(|| negotiation("CHAP_A", alg_value, "not an algorithm we offered"))?;
                let id = value_of(pairs, "CHAP_I")
                    .and_then(text::parse_number)
                    .and_then(|n| u8::try_from(n).ok())
                    .ok_or_else(|| protocol("CHAP_I missing or not 0..=255"))?;
                let challenge = value_of(pairs, "CHAP_C")
                    .ok_or_else(|| protocol("CHAP_C missing"))
                    .and_then(|v| chap::decode_binary(v).map_err(|e| protocol(&format!("CHAP_C: {e}"))))?;
                if challenge.is_empty() {
                    return Err(protocol("empty CHAP_C"));
                }
                if let Some((k, _)) = pairs
                    .iter()
                    .find(|(k, _)| !matches!(k.as_str(), "CHAP_A" | "CHAP_I" | "CHAP_C") && !declaration(k))
                {
                    return Err(protocol(&format!("unexpected key {k} with the CHAP challenge")));
                }
                // RFC 7143 §12.1.3: a target echoing our own challenge is a reflection attack.
                if self.settings.mutual_chap.is_some() && challenge == self.settings.mutual_chap_challenge {
                    return Err(LoginError::TargetAuthentication(
                        "target sent our own mutual challenge".into(),
                    ));
                }
                let response = chap::encode_hex(&chap::chap_response(alg, id, &account.secret, &challenge));
                let mut pairs_out: Vec<(&str, String)> = vec![("CHAP_N", account.user.clone()), ("CHAP_R", response)];
                if self.settings.mutual_chap.is_some() {
                    pairs_out.push(("CHAP_I", self.settings.mutual_chap_id.to_string()));
                    pairs_out.push(("CHAP_C", chap::encode_hex(&self.settings.mutual_chap_challenge)));
                }
                let refs: Vec<(&str, &str)> = pairs_out.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let mut data = Vec::new();
                text::encode(&refs, &mut data);
                self.chap_algorithm = Some(alg);
                self.phase = Phase::ChapResponse(alg);
                Ok(LoginEvent::Send(self.request(
                    STAGE_SECURITY,
                    true,
                    STAGE_OPERATIONAL,
                    data,
                )))
            }
            Phase::ChapResponse(alg) => {
                self.chap_done = true;
                if let Some(mutual) = self.settings.mutual_chap.clone() {
                    let name = value_of(pairs, "CHAP_N").ok_or_else(|| {
                        LoginError::TargetAuthentication("target sent no CHAP_N for mutual CHAP".into())
                    })?;
                    let response = value_of(pairs, "CHAP_R")
                        .and_then(|v| chap::decode_binary(v).ok())
                        .ok_or_else(|| LoginError::TargetAuthentication("target sent no valid CHAP_R".into()))?;
                    let expected = chap::chap_response(
                        alg,
                        self.settings.mutual_chap_id,
                        &mutual.secret,
                        &self.settings.mutual_chap_challenge,
                    );
                    let response_ok = chap::constant_time_eq(&expected, &response);
                    if !(response_ok && name == mutual.user) {
                        return Err(LoginError::TargetAuthentication(
                            "the target's CHAP_N/CHAP_R do not match the configured target account".into(),
                        ));
                    }
                    self.target_authenticated = true;
                } else if pairs.iter().any(|(k, _)| k.starts_with("CHAP_")) {
                    return Err(protocol("CHAP keys in the answer to a one-way CHAP response"));
                }
                self.phase = Phase::SecurityDone;
                self.after_security(r)
            }
            Phase::SecurityDone => self.after_security(r),
            _ => Err(protocol("unexpected security-stage response")),
        }
    }

    /// Authentication is done: transit if the target did, else ask again (bounded).
    fn after_security(&mut self, r: &pdu::LoginResponse) -> Result<LoginEvent, LoginError> {
        if r.transit {
            return Ok(LoginEvent::Send(self.operational_offer()));
        }
        self.rounds += 1;
        if self.rounds > MAX_OPERATIONAL_ROUNDS {
            return Err(protocol("target never left the security stage"));
        }
        Ok(LoginEvent::Send(self.request(
            STAGE_SECURITY,
            true,
            STAGE_OPERATIONAL,
            Vec::new(),
        )))
    }

    /// Our operational-stage offers (§13), T=1 towards full-feature phase.
    fn operational_offer(&mut self) -> LoginPdu {
        let p = self.settings.proposals.clone();
        let digest = |on: bool| if on { "CRC32C,None" } else { "None" };
        let yes_no = |on: bool| if on { "Yes" } else { "No" };
        let mut pairs: Vec<(&'static str, String)> = vec![
            ("HeaderDigest", digest(p.header_digest).to_owned()),
            ("DataDigest", digest(p.data_digest).to_owned()),
            ("MaxRecvDataSegmentLength", p.max_recv_data_segment_length.to_string()),
            ("DefaultTime2Wait", p.default_time2wait.to_string()),
            ("DefaultTime2Retain", p.default_time2retain.to_string()),
            ("ErrorRecoveryLevel", "0".to_owned()),
        ];
        if !self.settings.discovery() {
            pairs.extend([
                ("InitialR2T", yes_no(p.initial_r2t).to_owned()),
                ("ImmediateData", yes_no(p.immediate_data).to_owned()),
                ("MaxBurstLength", p.max_burst_length.to_string()),
                ("FirstBurstLength", p.first_burst_length.to_string()),
                ("MaxOutstandingR2T", "1".to_owned()),
                ("MaxConnections", "1".to_owned()),
                ("DataPDUInOrder", "Yes".to_owned()),
                ("DataSequenceInOrder", "Yes".to_owned()),
            ]);
        }
        self.offered = pairs
            .iter()
            .map(|(k, _)| *k)
            .filter(|k| *k != "MaxRecvDataSegmentLength")
            .collect();
        let refs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut data = Vec::new();
        text::encode(&refs, &mut data);
        self.phase = Phase::Operational;
        self.request(STAGE_OPERATIONAL, true, STAGE_FULL_FEATURE, data)
    }

    fn operational(&mut self, r: &pdu::LoginResponse, pairs: &[(String, String)]) -> Result<LoginEvent, LoginError> {
        for (k, v) in pairs {
            if let Some(key) = self.offered.iter().find(|o| **o == k.as_str()).copied() {
                self.offered.remove(key);
                self.apply_answer(key, v)?;
            } else {
                match k.as_str() {
                    "TargetPortalGroupTag" | "TargetAlias" | "MaxRecvDataSegmentLength" => {}
                    "AuthMethod" => return Err(protocol("AuthMethod in the operational stage")),
                    _ if k.starts_with("CHAP_") => return Err(protocol("CHAP key in the operational stage")),
                    // A target-initiated offer: we only understand what we offered ourselves
                    // (§6.2: NotUnderstood is always a legal answer).
                    _ => self.answers.push((k.clone(), "NotUnderstood".to_owned())),
                }
            }
        }
        if r.transit {
            if !self.answers.is_empty() {
                return Err(protocol("target transited while offering keys of its own"));
            }
            // Keys the target did not answer keep their RFC 7143 §13 default (already in
            // `params`), except the ones we declared.
            self.params.first_burst_length = self.params.first_burst_length.min(self.params.max_burst_length);
            return Ok(LoginEvent::Done(LoginOutcome {
                params: self.params.clone(),
                tsih: r.tsih,
                isid: self.settings.isid,
                tpgt: self.tpgt,
                target_alias: self.target_alias.clone(),
                cmdsn: self.settings.cmdsn,
                exp_statsn: self.exp_statsn,
                exp_cmdsn: r.seq.exp_cmdsn,
                max_cmdsn: r.seq.max_cmdsn,
                target_authenticated: self.target_authenticated,
                chap_algorithm: self.chap_algorithm,
            }));
        }
        self.rounds += 1;
        if self.rounds > MAX_OPERATIONAL_ROUNDS {
            return Err(protocol("operational negotiation did not converge"));
        }
        let answers = std::mem::take(&mut self.answers);
        let refs: Vec<(&str, &str)> = answers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut data = Vec::new();
        text::encode(&refs, &mut data);
        Ok(LoginEvent::Send(self.request(
            STAGE_OPERATIONAL,
            true,
            STAGE_FULL_FEATURE,
            data,
        )))
    }

    /// Checks the target's answer to one of our offers against its result function (§13).
    fn apply_answer(&mut self, key: &'static str, v: &str) -> Result<(), LoginError> {
        let p = self.settings.proposals.clone();
        // §6.2: NotUnderstood/Irrelevant/Reject leave the key at its default.
        if matches!(v, "NotUnderstood" | "Irrelevant" | "Reject") {
            return match key {
                // A target that cannot say None to a digest list containing None is broken.
                "HeaderDigest" | "DataDigest" | "ErrorRecoveryLevel" => {
                    Err(negotiation(key, v, "a value we offered must be accepted"))
                }
                _ => Ok(()),
            };
        }
        let number = |lo: u64, hi: u64| {
            text::parse_number(v)
                .filter(|n| (lo..=hi).contains(n))
                .ok_or_else(|| negotiation(key, v, "not a number in range"))
        };
        let boolean = || match v {
            "Yes" => Ok(true),
            "No" => Ok(false),
            _ => Err(negotiation(key, v, "neither Yes nor No")),
        };
        let seg = (u64::from(MIN_SEGMENT_LENGTH), u64::from(MAX_SEGMENT_LENGTH));
        let q = &mut self.params;
        match key {
            "HeaderDigest" | "DataDigest" => {
                let offered = if key == "HeaderDigest" {
                    p.header_digest
                } else {
                    p.data_digest
                };
                let crc = match v {
                    "None" => false,
                    "CRC32C" if offered => true,
                    _ => return Err(negotiation(key, v, "not a value we offered")),
                };
                if key == "HeaderDigest" {
                    q.header_digest = crc;
                } else {
                    q.data_digest = crc;
                }
            }
            "MaxBurstLength" => {
                let n = number(seg.0, seg.1)?;
                if n > u64::from(p.max_burst_length) {
                    return Err(negotiation(key, v, "result function is minimum"));
                }
                q.max_burst_length = n as u32;
            }
            "FirstBurstLength" => {
                let n = number(seg.0, seg.1)?;
                if n > u64::from(p.first_burst_length) {
                    return Err(negotiation(key, v, "result function is minimum"));
                }
                q.first_burst_length = n as u32;
            }
            "InitialR2T" => {
                let b = boolean()?;
                if p.initial_r2t && !b {
                    return Err(negotiation(key, v, "result function is OR"));
                }
                q.initial_r2t = b;
            }
            "ImmediateData" => {
                let b = boolean()?;
                if !p.immediate_data && b {
                    return Err(negotiation(key, v, "result function is AND"));
                }
                q.immediate_data = b;
            }
            "DataPDUInOrder" | "DataSequenceInOrder" if !boolean()? => {
                return Err(negotiation(key, v, "result function is OR and we offered Yes"));
            }
            "MaxOutstandingR2T" => {
                q.max_outstanding_r2t = number(1, 1)? as u32;
            }
            "MaxConnections" => {
                q.max_connections = number(1, 1)? as u16;
            }
            "ErrorRecoveryLevel" => {
                q.error_recovery_level = number(0, 0)? as u8;
            }
            "DefaultTime2Wait" => {
                // Result function maximum.
                let n = number(u64::from(p.default_time2wait), 3600)?;
                q.default_time2wait = n as u16;
            }
            "DefaultTime2Retain" => {
                let n = number(0, u64::from(p.default_time2retain))?;
                q.default_time2retain = n as u16;
            }
            _ => {}
        }
        Ok(())
    }
}

fn protocol(detail: &str) -> LoginError {
    LoginError::Protocol(detail.to_owned())
}

fn negotiation(key: &str, value: &str, why: &'static str) -> LoginError {
    LoginError::Negotiation {
        key: key.to_owned(),
        value: value.chars().take(64).collect(),
        why,
    }
}

fn value_of<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// Maps a non-zero login status (§11.13.5) to its error; a redirect's TargetAddress comes from
/// the response text.
fn status_error(class: u8, detail: u8, data: &[u8]) -> LoginError {
    match class {
        1 => {
            let address = text::parse(data)
                .ok()
                .and_then(|pairs| value_of(&pairs, "TargetAddress").map(str::to_owned));
            match address {
                // `host:port` without the portal group tag (§13.8), as the caller connects to it.
                Some(value) => LoginError::Redirect {
                    address: parse_target_address(&value).map_or(value, |p| p.address),
                    temporary: detail == 1,
                },
                None => protocol("redirect without TargetAddress"),
            }
        }
        2 => match detail {
            1 => LoginError::AuthenticationFailed,
            2 => LoginError::AuthorizationFailed,
            3 => LoginError::NotFound,
            4 => LoginError::TargetRemoved,
            _ => LoginError::InitiatorError {
                detail,
                description: match detail {
                    0 => "miscellaneous initiator error",
                    5 => "unsupported version",
                    6 => "too many connections",
                    7 => "missing parameter",
                    8 => "cannot include connection in session",
                    9 => "session type not supported",
                    10 => "session does not exist",
                    11 => "invalid request during login",
                    _ => "unknown detail",
                },
            },
        },
        3 => LoginError::TargetError {
            detail,
            description: match detail {
                0 => "target error",
                1 => "service unavailable",
                2 => "out of resources",
                _ => "unknown detail",
            },
        },
        _ => LoginError::UnknownStatus { class, detail },
    }
}

// --- SendTargets discovery (RFC 7143 §12.3, Appendix C) ------------------------------------

/// One portal of a discovered target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetPortal {
    /// `host:port` as the target sent it (IPv6 in brackets); the default port is added when
    /// the target sent none.
    pub address: String,
    pub tpgt: u16,
}

impl TargetPortal {
    /// The host part (without IPv6 brackets) and port.
    pub fn host_port(&self) -> Option<(String, u16)> {
        split_host_port(&self.address)
    }
}

/// One target of a SendTargets answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveredTarget {
    pub name: String,
    pub portals: Vec<TargetPortal>,
}

/// Why a SendTargets answer could not be used. Always caused by the target.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum SendTargetsError {
    #[error("malformed SendTargets text: {0}")]
    Text(String),
    #[error("TargetAddress {0:?} before any TargetName")]
    AddressWithoutTarget(String),
    #[error("malformed TargetAddress {0:?}")]
    BadAddress(String),
    #[error("SendTargets answer longer than {MAX_SEND_TARGETS_BYTES} bytes")]
    TooLong,
}

/// The Text Request `SendTargets=All` (§12.3) of a discovery session.
pub fn send_targets_request(itt: u32, cmdsn: u32, exp_statsn: u32) -> (Bhs, Vec<u8>) {
    let bhs = pdu::TextRequest {
        immediate: true,
        final_: true,
        cont: false,
        lun: 0,
        itt,
        ttt: RESERVED_TAG,
        cmdsn,
        exp_statsn,
    }
    .to_bhs();
    let mut data = Vec::new();
    text::encode(&[("SendTargets", "All")], &mut data);
    (bhs, data)
}

/// The empty Text Request that asks for the next part of a continued Text Response (§11.10.4):
/// the target's TTT echoed.
pub fn text_continue_request(itt: u32, ttt: u32, cmdsn: u32, exp_statsn: u32) -> Bhs {
    pdu::TextRequest {
        immediate: true,
        final_: true,
        cont: false,
        lun: 0,
        itt,
        ttt,
        cmdsn,
        exp_statsn,
    }
    .to_bhs()
}

/// Parses the whole (reassembled) SendTargets answer: `TargetName=` starts a target, each
/// following `TargetAddress=host[:port][,tpgt]` adds a portal (§12.3, Appendix C). Other keys
/// are ignored. A target without addresses is reachable at the discovery portal itself (the
/// caller adds it).
pub fn parse_send_targets(data: &[u8]) -> Result<Vec<DiscoveredTarget>, SendTargetsError> {
    if data.len() > MAX_SEND_TARGETS_BYTES {
        return Err(SendTargetsError::TooLong);
    }
    let pairs = text::parse(data).map_err(|e| SendTargetsError::Text(e.to_string()))?;
    let mut targets: Vec<DiscoveredTarget> = Vec::new();
    for (k, v) in pairs {
        match k.as_str() {
            "TargetName" => targets.push(DiscoveredTarget {
                name: v,
                portals: Vec::new(),
            }),
            "TargetAddress" => {
                let portal = parse_target_address(&v)?;
                targets
                    .last_mut()
                    .ok_or(SendTargetsError::AddressWithoutTarget(v))?
                    .portals
                    .push(portal);
            }
            _ => {}
        }
    }
    Ok(targets)
}

/// Parses a TargetAddress value: `host`, `host:port`, `[v6]`, `[v6]:port`, each optionally
/// followed by `,tpgt` (§13.8). The address keeps the sender's form, with `:3260` added when
/// the port is missing.
pub fn parse_target_address(value: &str) -> Result<TargetPortal, SendTargetsError> {
    let bad = || SendTargetsError::BadAddress(value.chars().take(300).collect());
    let (addr, tpgt) = match value.rsplit_once(',') {
        Some((a, t)) => (
            a,
            text::parse_number(t)
                .and_then(|n| u16::try_from(n).ok())
                .ok_or_else(bad)?,
        ),
        None => (value, 1),
    };
    if addr.is_empty() || addr.contains(char::is_whitespace) {
        return Err(bad());
    }
    let address = if let Some(rest) = addr.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(bad)?;
        if host.is_empty() || !host.contains(':') {
            return Err(bad());
        }
        match after {
            "" => format!("[{host}]:{DEFAULT_PORT}"),
            p => {
                let port = p.strip_prefix(':').ok_or_else(bad)?;
                port.parse::<u16>().map_err(|_| bad())?;
                addr.to_owned()
            }
        }
    } else {
        match addr.split_once(':') {
            None => format!("{addr}:{DEFAULT_PORT}"),
            Some((host, port)) => {
                if host.is_empty() || port.contains(':') {
                    return Err(bad());
                }
                port.parse::<u16>().map_err(|_| bad())?;
                addr.to_owned()
            }
        }
    };
    Ok(TargetPortal { address, tpgt })
}

fn split_host_port(address: &str) -> Option<(String, u16)> {
    if let Some(rest) = address.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = after.strip_prefix(':')?.parse().ok()?;
        Some((host.to_owned(), port))
    } else {
        let (host, port) = address.rsplit_once(':')?;
        Some((host.to_owned(), port.parse().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::login::{self, LoginAuthority, LoginStep, Lookup, TargetAuth, TargetLogin};
    use crate::text::{SessionType, TargetLimits};

    const INITIATOR: &str = "iqn.2026-11.test:initiator";
    const TARGET: &str = "iqn.2026-11.test:disk";
    const ISID: [u8; 6] = [0x80, 1, 2, 3, 0, 1];
    const CHALLENGE: [u8; 16] = [7; 16];

    struct Catalog {
        auth: TargetAuth,
    }

    impl LoginAuthority for Catalog {
        fn lookup(&self, session_type: SessionType, target: Option<&str>, _initiator: &str) -> Lookup {
            match (session_type, target) {
                (SessionType::Discovery, None) | (SessionType::Normal, Some(TARGET)) => {
                    Lookup::Allowed(self.auth.clone())
                }
                _ => Lookup::NotFound,
            }
        }
    }

    fn catalog(accounts: &[(&str, &str)], mutual: Option<(&str, &str)>) -> Catalog {
        Catalog {
            auth: TargetAuth {
                accounts: accounts
                    .iter()
                    .map(|(u, s)| ((*u).to_owned(), s.as_bytes().to_vec()))
                    .collect(),
                mutual: mutual.map(|(u, s)| (u.to_owned(), s.as_bytes().to_vec())),
                target_alias: Some("disk".into()),
                tpgt: 7,
            },
        }
    }

    fn account(user: &str, secret: &str) -> ChapAccount {
        ChapAccount {
            user: user.into(),
            secret: secret.as_bytes().to_vec(),
        }
    }

    /// Runs our machine against proto's target machine in memory, filling in what the target's
    /// portal would (ITT, ISID, TSIH, sequence numbers). Returns the outcome or error and the
    /// target's parameters.
    fn run(
        settings: InitiatorSettings,
        cat: &Catalog,
        limits: TargetLimits,
    ) -> (Result<LoginOutcome, LoginError>, Option<text::SessionParams>) {
        let mut ini = InitiatorLogin::new(settings).unwrap();
        let mut tgt = TargetLogin::new(limits, 9, CHALLENGE.to_vec());
        let mut req = ini.start();
        for statsn in 100u32..132 {
            let header = pdu::LoginRequest::parse(&req.bhs());
            let step = tgt.on_request(
                &login::LoginRequest {
                    header,
                    data: &req.data,
                },
                cat,
            );
            let (resp, params) = match step {
                LoginStep::Continue(r) => (r, None),
                LoginStep::FullFeature(r, p) => (r, Some(p)),
                LoginStep::Failed(r, _) => (r, None),
            };
            let bhs = pdu::LoginResponse {
                transit: resp.transit,
                cont: resp.cont,
                csg: resp.csg,
                nsg: resp.nsg,
                version_max: 0,
                version_active: 0,
                isid: header.isid,
                tsih: if params.is_some() { 0x1234 } else { 0 },
                itt: header.itt,
                seq: pdu::Sequence {
                    statsn,
                    exp_cmdsn: header.cmdsn,
                    max_cmdsn: header.cmdsn.wrapping_add(31),
                },
                status_class: resp.status_class,
                status_detail: resp.status_detail,
            }
            .to_bhs();
            match ini.on_response(&bhs, &resp.data) {
                Ok(LoginEvent::Send(next)) => req = next,
                Ok(LoginEvent::Done(outcome)) => return (Ok(outcome), params),
                Err(e) => return (Err(e), params),
            }
        }
        panic!("login did not finish");
    }

    fn settings() -> InitiatorSettings {
        InitiatorSettings::new(INITIATOR, Some(TARGET), ISID)
    }

    fn chap_settings(alg: ChapAlgorithm, secret: &str) -> InitiatorSettings {
        let mut s = settings();
        s.chap = Some(account("user", secret));
        s.chap_algorithms = vec![alg];
        s
    }

    /// RFC 7143 §6.3: no authentication, operational negotiation, full-feature phase.
    #[test]
    fn initiator_none_auth_login() {
        let (outcome, params) = run(settings(), &catalog(&[], None), TargetLimits::default());
        let o = outcome.unwrap();
        let p = params.unwrap();
        assert_eq!(o.tsih, 0x1234);
        assert_eq!(o.tpgt, Some(7));
        assert_eq!(o.target_alias.as_deref(), Some("disk"));
        assert_eq!(o.exp_statsn, 102);
        assert_eq!(o.cmdsn, 1);
        assert_eq!(o.max_cmdsn, 32);
        assert!(!o.target_authenticated);
        // Both sides agree on every parameter (§13).
        let q = &o.params;
        assert_eq!(
            q.target_max_recv_data_segment_length,
            p.target_max_recv_data_segment_length
        );
        assert_eq!(
            q.initiator_max_recv_data_segment_length,
            p.initiator_max_recv_data_segment_length
        );
        assert_eq!(q.max_burst_length, p.max_burst_length);
        assert_eq!(q.first_burst_length, p.first_burst_length);
        assert_eq!(q.initial_r2t, p.initial_r2t);
        assert_eq!(q.immediate_data, p.immediate_data);
        assert_eq!((q.header_digest, q.data_digest), (false, false));
        assert_eq!(q.max_burst_length, 1_048_576);
        assert_eq!(q.first_burst_length, 262_144);
        assert_eq!(q.default_time2wait, 2);
        assert_eq!(q.default_time2retain, 0);
    }

    /// RFC 7143 §12.1.3 with each algorithm chap.rs implements.
    #[test]
    fn initiator_chap_each_algorithm() {
        for alg in [
            ChapAlgorithm::Md5,
            ChapAlgorithm::Sha1,
            ChapAlgorithm::Sha256,
            ChapAlgorithm::Sha3_256,
        ] {
            let (outcome, _) = run(
                chap_settings(alg, "secretsecret"),
                &catalog(&[("user", "secretsecret")], None),
                TargetLimits::default(),
            );
            let o = outcome.unwrap_or_else(|e| panic!("{alg:?}: {e}"));
            assert_eq!(o.chap_algorithm, Some(alg));
        }
    }

    #[test]
    fn initiator_chap_default_offer_prefers_sha256() {
        let mut s = settings();
        s.chap = Some(account("user", "secretsecret"));
        let (outcome, _) = run(s, &catalog(&[("user", "secretsecret")], None), TargetLimits::default());
        assert_eq!(outcome.unwrap().chap_algorithm, Some(ChapAlgorithm::Sha256));
    }

    /// §11.13.5 0201 with a wrong secret, and when CHAP is required but we have none.
    #[test]
    fn initiator_chap_wrong_secret_fails() {
        let (outcome, _) = run(
            chap_settings(ChapAlgorithm::Md5, "wrongwrongwrong"),
            &catalog(&[("user", "secretsecret")], None),
            TargetLimits::default(),
        );
        assert_eq!(outcome.unwrap_err(), LoginError::AuthenticationFailed);
        let (outcome, _) = run(
            settings(),
            &catalog(&[("user", "secretsecret")], None),
            TargetLimits::default(),
        );
        assert_eq!(outcome.unwrap_err(), LoginError::AuthenticationFailed);
    }

    fn mutual_settings(target_secret: &str) -> InitiatorSettings {
        let mut s = chap_settings(ChapAlgorithm::Sha256, "secretsecret");
        s.mutual_chap = Some(account("target", target_secret));
        s.mutual_chap_id = 42;
        s.mutual_chap_challenge = vec![0x5a; 24];
        s
    }

    /// §12.1.3 mutual CHAP: the target's CHAP_R verified with the target account's secret.
    #[test]
    fn initiator_mutual_chap_good_and_bad() {
        let cat = catalog(&[("user", "secretsecret")], Some(("target", "mutualsecret")));
        let (outcome, _) = run(mutual_settings("mutualsecret"), &cat, TargetLimits::default());
        assert!(outcome.unwrap().target_authenticated);
        let (outcome, _) = run(mutual_settings("notthesecret"), &cat, TargetLimits::default());
        assert!(
            matches!(outcome, Err(LoginError::TargetAuthentication(_))),
            "{outcome:?}"
        );
        // A target with no account for mutual CHAP fails the login itself.
        let cat = catalog(&[("user", "secretsecret")], None);
        let (outcome, _) = run(mutual_settings("mutualsecret"), &cat, TargetLimits::default());
        assert_eq!(outcome.unwrap_err(), LoginError::AuthenticationFailed);
        // A target that needs no authentication cannot satisfy mutual CHAP.
        let (outcome, _) = run(
            mutual_settings("mutualsecret"),
            &catalog(&[], None),
            TargetLimits::default(),
        );
        assert!(
            matches!(outcome, Err(LoginError::TargetAuthentication(_))),
            "{outcome:?}"
        );
    }

    /// §13.1: digests offered as CRC32C,None are chosen when the target allows them.
    #[test]
    fn initiator_digests_negotiated() {
        let mut s = settings();
        s.proposals.header_digest = true;
        s.proposals.data_digest = true;
        let (outcome, params) = run(s.clone(), &catalog(&[], None), TargetLimits::default());
        let o = outcome.unwrap();
        assert!(o.params.header_digest && o.params.data_digest);
        let p = params.unwrap();
        assert!(p.header_digest && p.data_digest);
        let limits = TargetLimits {
            allow_data_digest: false,
            ..TargetLimits::default()
        };
        let (outcome, _) = run(s, &catalog(&[], None), limits);
        let o = outcome.unwrap();
        assert!(o.params.header_digest && !o.params.data_digest);
    }

    /// §13.10-13.14: result functions with a conservative target.
    #[test]
    fn initiator_operational_result_functions() {
        let limits = TargetLimits {
            max_recv_data_segment_length: 8192,
            max_burst_length: 65_536,
            first_burst_length: 16_384,
            initial_r2t: true,
            immediate_data: false,
            ..TargetLimits::default()
        };
        let (outcome, _) = run(settings(), &catalog(&[], None), limits);
        let q = outcome.unwrap().params;
        assert_eq!(q.target_max_recv_data_segment_length, 8192);
        assert_eq!(q.initiator_max_recv_data_segment_length, 262_144);
        assert_eq!(q.max_burst_length, 65_536);
        assert!(q.initial_r2t && !q.immediate_data);
    }

    #[test]
    fn initiator_discovery_session() {
        let s = InitiatorSettings::new(INITIATOR, None, ISID);
        let (outcome, params) = run(s, &catalog(&[], None), TargetLimits::default());
        let o = outcome.unwrap();
        assert_eq!(o.tpgt, None);
        assert_eq!(params.unwrap().session_type, SessionType::Discovery);
    }

    #[test]
    fn initiator_not_found() {
        let s = InitiatorSettings::new(INITIATOR, Some("iqn.2026-11.test:other"), ISID);
        let (outcome, _) = run(s, &catalog(&[], None), TargetLimits::default());
        assert_eq!(outcome.unwrap_err(), LoginError::NotFound);
    }

    /// §11.12.2: a request longer than one login segment goes out in C-bit pieces.
    #[test]
    fn initiator_long_request_continues() {
        let mut s = settings();
        s.initiator_alias = Some("a".repeat(8000));
        s.initiator_name = format!("iqn.2026-11.test:{}", "n".repeat(200));
        let mut ini = InitiatorLogin::new(s).unwrap();
        let first = ini.start();
        assert!(first.header.cont && !first.header.transit);
        assert_eq!(first.data.len(), LOGIN_SEGMENT_LEN);
        // The target's empty answer to a continued piece asks for the rest.
        let ack = pdu::LoginResponse {
            transit: false,
            cont: false,
            csg: 0,
            nsg: 0,
            version_max: 0,
            version_active: 0,
            isid: ISID,
            tsih: 0,
            itt: 0,
            seq: pdu::Sequence::default(),
            status_class: 0,
            status_detail: 0,
        };
        let LoginEvent::Send(second) = ini.on_response(&ack.to_bhs(), b"").unwrap() else {
            panic!("expected the second piece");
        };
        assert!(!second.header.cont && second.header.transit);
        assert!(!second.data.is_empty());
    }

    /// §11.12.2: a response with C=1 is answered with an empty request; its text is used once
    /// complete (here split inside a value).
    #[test]
    fn initiator_continued_response_is_reassembled() {
        let mut ini = InitiatorLogin::new(settings()).unwrap();
        ini.start();
        let mut part = pdu::LoginResponse::parse(&response(0, 0));
        part.cont = true;
        let LoginEvent::Send(empty) = ini.on_response(&part.to_bhs(), b"AuthMethod=No").unwrap() else {
            panic!("expected an empty request");
        };
        assert!(empty.data.is_empty() && !empty.header.transit && !empty.header.cont);
        assert_eq!(empty.header.csg, STAGE_SECURITY);
        let mut last = pdu::LoginResponse::parse(&response(0, 0));
        last.transit = true;
        last.nsg = STAGE_OPERATIONAL;
        let LoginEvent::Send(op) = ini.on_response(&last.to_bhs(), b"ne\0").unwrap() else {
            panic!("expected the operational offer");
        };
        assert_eq!((op.header.csg, op.header.nsg, op.header.transit), (1, 3, true));
        assert!(op.data.starts_with(b"HeaderDigest=None\0"));
    }

    fn response(class: u8, detail: u8) -> Bhs {
        pdu::LoginResponse {
            transit: false,
            cont: false,
            csg: 0,
            nsg: 0,
            version_max: 0,
            version_active: 0,
            isid: ISID,
            tsih: 0,
            itt: 0,
            seq: pdu::Sequence::default(),
            status_class: class,
            status_detail: detail,
        }
        .to_bhs()
    }

    /// §11.13.5 status classes are typed; a redirect carries its TargetAddress.
    #[test]
    fn initiator_status_classes() {
        let mut ini = InitiatorLogin::new(settings()).unwrap();
        ini.start();
        let e = ini
            .on_response(&response(1, 1), b"TargetAddress=10.0.0.2:3260,1\0")
            .unwrap_err();
        assert_eq!(
            e,
            LoginError::Redirect {
                address: "10.0.0.2:3260".into(),
                temporary: true
            }
        );
        for (detail, want) in [
            (1, LoginError::AuthenticationFailed),
            (2, LoginError::AuthorizationFailed),
            (3, LoginError::NotFound),
        ] {
            let mut ini = InitiatorLogin::new(settings()).unwrap();
            ini.start();
            assert_eq!(ini.on_response(&response(2, detail), b"").unwrap_err(), want);
        }
        let mut ini = InitiatorLogin::new(settings()).unwrap();
        ini.start();
        assert!(matches!(
            ini.on_response(&response(3, 1), b"").unwrap_err(),
            LoginError::TargetError { detail: 1, .. }
        ));
    }

    /// Malformed or unexpected responses are typed errors, never panics.
    #[test]
    fn initiator_malformed_responses() {
        let cases: Vec<(Bhs, &[u8])> = vec![
            (
                pdu::NopIn {
                    lun: 0,
                    itt: 0,
                    ttt: 0,
                    seq: pdu::Sequence::default(),
                }
                .to_bhs(),
                b"",
            ),
            (response(0, 0), b"AuthMethod\0"),
            (response(0, 0), b"AuthMethod=Kerberos\0"),
            (response(0, 0), b"AuthMethod=None\0AuthMethod=None\0"),
        ];
        for (bhs, data) in cases {
            let mut ini = InitiatorLogin::new(settings()).unwrap();
            ini.start();
            assert!(ini.on_response(&bhs, data).is_err());
            // Finished: nothing more is accepted.
            assert!(ini.on_response(&response(0, 0), b"").is_err());
        }
        let mut wrong_isid = pdu::LoginResponse::parse(&response(0, 0));
        wrong_isid.isid = [0; 6];
        let mut ini = InitiatorLogin::new(settings()).unwrap();
        ini.start();
        assert!(matches!(
            ini.on_response(&wrong_isid.to_bhs(), b"AuthMethod=None\0"),
            Err(LoginError::Protocol(_))
        ));
    }

    #[test]
    fn initiator_settings_validated() {
        let mut s = settings();
        s.mutual_chap = Some(account("t", "x"));
        assert!(matches!(InitiatorLogin::new(s), Err(LoginError::Settings(_))));
        let mut s = settings();
        s.proposals.first_burst_length = s.proposals.max_burst_length + 1;
        assert!(InitiatorLogin::new(s).is_err());
        let s = format!("{:?}", account("u", "topsecret"));
        assert!(!s.contains("topsecret"));
    }

    /// §12.3 / Appendix C: targets with IPv4, IPv6 and port-less addresses.
    #[test]
    fn initiator_send_targets_parse() {
        let text = b"TargetName=iqn.a\0TargetAddress=10.0.0.1:3260,1\0TargetAddress=[fe80::1]:3261,2\0\
TargetName=iqn.b\0TargetAddress=host.example\0TargetAddress=[::1],3\0TargetName=iqn.c\0";
        let t = parse_send_targets(text).unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(t[0].name, "iqn.a");
        assert_eq!(
            t[0].portals,
            vec![
                TargetPortal {
                    address: "10.0.0.1:3260".into(),
                    tpgt: 1
                },
                TargetPortal {
                    address: "[fe80::1]:3261".into(),
                    tpgt: 2
                }
            ]
        );
        assert_eq!(t[0].portals[1].host_port(), Some(("fe80::1".into(), 3261)));
        assert_eq!(t[1].portals[0].address, "host.example:3260");
        assert_eq!(t[1].portals[1].address, "[::1]:3260");
        assert_eq!(t[1].portals[1].tpgt, 3);
        assert!(t[2].portals.is_empty());
        for bad in [
            &b"TargetAddress=1.2.3.4:3260,1\0"[..],
            b"TargetName=x\0TargetAddress=1.2.3.4:99999,1\0",
            b"TargetName=x\0TargetAddress=[::1:3260,1\0",
            b"TargetName=x\0TargetAddress=1.2.3.4:3260,x\0",
            b"TargetName=x\0TargetAddress=\0",
            b"TargetName\0",
        ] {
            assert!(parse_send_targets(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        // What the target side generates parses back.
        let generated = text::send_targets_response(&[text::SendTarget {
            name: "iqn.x".into(),
            addresses: vec![("[::1]:3260".into(), 4), ("127.0.0.1:3260".into(), 1)],
        }]);
        let t = parse_send_targets(&generated).unwrap();
        assert_eq!(t[0].portals[0].address, "[::1]:3260");
        assert_eq!(t[0].portals[1].tpgt, 1);
    }

    #[test]
    fn initiator_send_targets_request_layout() {
        let (bhs, data) = send_targets_request(5, 9, 3);
        let r = pdu::TextRequest::parse(&bhs);
        assert!(r.final_ && r.immediate && !r.cont);
        assert_eq!((r.itt, r.ttt, r.cmdsn, r.exp_statsn), (5, RESERVED_TAG, 9, 3));
        assert_eq!(data, b"SendTargets=All\0");
    }

    proptest::proptest! {
        /// Invariant 5: no Login Response bytes or SendTargets text panic the initiator side.
        #[test]
        fn initiator_never_panics(
            raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 48),
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            chap: bool,
        ) {
            let mut s = settings();
            if chap {
                s.chap = Some(account("user", "secretsecret"));
                s.mutual_chap = Some(account("target", "mutualsecret"));
                s.mutual_chap_challenge = vec![1; 16];
            }
            let mut ini = InitiatorLogin::new(s).unwrap();
            ini.start();
            let mut b = [0u8; 48];
            b.copy_from_slice(&raw);
            // Mostly a plausible Login Response header, so the checks past the first run too.
            if raw[0] & 1 == 0 {
                b[0] = 0x23;
                b[8..14].copy_from_slice(&ISID);
                b[16..20].fill(0);
                b[36] = raw[1] & 1;
            }
            let _ = ini.on_response(&Bhs(b), &data);
            let _ = parse_send_targets(&data);
            let _ = parse_target_address(&String::from_utf8_lossy(&data));
        }
    }
}
