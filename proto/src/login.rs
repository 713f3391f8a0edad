//! Target-side login state machine, sans-io (RFC 7143 §6.3, §11.12, §11.13, §12.1.3).
//!
//! The portal wraps each Login Request PDU (its parsed header and text) in a [`LoginRequest`], calls
//! [`TargetLogin::on_request`] and sends the [`LoginResponse`] inside the returned
//! [`LoginStep`], filling in what this machine does not own (ITT, ISID, TSIH, StatSN,
//! ExpCmdSN, MaxCmdSN).
//!
//! ```text
//!            csg=0 ──────────────▶ AwaitAuthMethod ──(AuthMethod=None)──────┐
//!  Start ──┤                          │ AuthMethod=CHAP                    ▼
//!          │                   ChapAlgorithm ─CHAP_A▶ ChapResponse ─N/R▶ SecurityDone
//!          │                                                                │ T=1,nsg=1
//!          └── csg=1 (only if no CHAP is required) ──────────────────▶ Operational
//!                                          T=1,nsg=3 from SecurityDone or Operational
//!                                                    ▼
//!                                        FullFeature / Failed (terminal)
//! ```
//!
//! * The first request names the initiator (InitiatorName, required: 0207), the session type
//!   and, for a normal session, the target (TargetName, required: 0207); the
//!   [`LoginAuthority`] then says NotFound (0203), Denied (0202) or which CHAP accounts apply.
//! * The first response of a normal session carries TargetAlias (if set) and
//!   TargetPortalGroupTag (RFC 7143 §13.9); the first operational-stage response declares our
//!   MaxRecvDataSegmentLength (§13.12).
//! * A request with the C bit set is buffered (at most [`MAX_LOGIN_TEXT_BYTES`]) and answered
//!   with an empty response in the same stage (§11.12.2); keys are processed once the final
//!   PDU of the request has arrived.
//! * We only set T=1 when the initiator did and we are done with the stage (§6.3).
//! * Every failure is terminal: the response carries the status and the caller closes the
//!   connection. Failure details never contain secrets or CHAP values.
//!
//! Not done here (the portal owns them): TSIH allocation, session reinstatement, sequence
//! numbers, the login timeout, non-login PDUs during login (0x020b).

use std::collections::BTreeSet;

use crate::chap::{self, ChapAlgorithm};
use crate::text::{self, Negotiator, SessionParams, SessionType, TargetLimits};

/// Login stages of CSG/NSG (RFC 7143 §11.12.3).
pub const STAGE_SECURITY: u8 = 0;
/// See [`STAGE_SECURITY`].
pub const STAGE_OPERATIONAL: u8 = 1;
/// See [`STAGE_SECURITY`].
pub const STAGE_FULL_FEATURE: u8 = 3;
/// The only iSCSI version (RFC 7143 §11.12.4).
pub const ISCSI_VERSION: u8 = 0;
/// Most text bytes one login request may span across C-bit PDUs (a limit of ours).
pub const MAX_LOGIN_TEXT_BYTES: usize = 64 * 1024;
/// Longest iSCSI name (RFC 7143 §4.2.7.1: 223 bytes).
pub const MAX_ISCSI_NAME_LEN: usize = 223;
/// Bounds on the challenge an initiator sends for mutual CHAP, in bytes.
pub const MIN_MUTUAL_CHALLENGE_LEN: usize = 1;
/// See [`MIN_MUTUAL_CHALLENGE_LEN`].
pub const MAX_MUTUAL_CHALLENGE_LEN: usize = chap::MAX_BINARY_LEN;

/// Status-Class / Status-Detail of a Login Response (RFC 7143 §11.13.5).
pub mod status {
    pub const SUCCESS: (u8, u8) = (0x00, 0x00);
    pub const INITIATOR_ERROR: (u8, u8) = (0x02, 0x00);
    pub const AUTHENTICATION_FAILURE: (u8, u8) = (0x02, 0x01);
    pub const AUTHORIZATION_FAILURE: (u8, u8) = (0x02, 0x02);
    pub const NOT_FOUND: (u8, u8) = (0x02, 0x03);
    pub const UNSUPPORTED_VERSION: (u8, u8) = (0x02, 0x05);
    pub const MISSING_PARAMETER: (u8, u8) = (0x02, 0x07);
    pub const INVALID_DURING_LOGIN: (u8, u8) = (0x02, 0x0b);
    pub const TARGET_ERROR: (u8, u8) = (0x03, 0x00);
}

/// Who may log in where: the catalogue and ACLs, as seen by the login machine.
pub trait LoginAuthority {
    /// Called once the initiator has named itself (and the target for a normal session).
    /// `target_name` is None for discovery.
    fn lookup(&self, session_type: SessionType, target_name: Option<&str>, initiator_name: &str) -> Lookup;
}

/// Answer of [`LoginAuthority::lookup`].
pub enum Lookup {
    /// No such target: 0203.
    NotFound,
    /// The ACL refuses this initiator: 0202.
    Denied,
    /// Go on, with these credentials.
    Allowed(TargetAuth),
}

/// Authentication settings of the target being logged into.
#[derive(Clone)]
pub struct TargetAuth {
    /// Incoming users (name, secret); empty means no CHAP needed.
    pub accounts: Vec<(String, Vec<u8>)>,
    /// Outgoing user for mutual CHAP (name, secret).
    pub mutual: Option<(String, Vec<u8>)>,
    pub target_alias: Option<String>,
    pub tpgt: u16,
}

/// Shows account names, never secrets.
impl std::fmt::Debug for TargetAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let accounts: Vec<&str> = self.accounts.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("TargetAuth")
            .field("accounts", &accounts)
            .field("mutual", &self.mutual.as_ref().map(|(n, _)| n.as_str()))
            .field("target_alias", &self.target_alias)
            .field("tpgt", &self.tpgt)
            .finish()
    }
}

/// Fields of a Login Request PDU that matter (RFC 7143 §11.12).
pub struct LoginRequest<'a> {
    /// The Login Request header as the PDU layer parsed it.
    pub header: crate::pdu::LoginRequest,
    /// The request's text (data segment).
    pub data: &'a [u8],
}

/// Fields of the Login Response to send (RFC 7143 §11.13); the caller fills in StatSN,
/// ExpCmdSN, MaxCmdSN, ITT, ISID and TSIH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginResponse {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_active: u8,
    pub status_class: u8,
    pub status_detail: u8,
    pub data: Vec<u8>,
}

/// Why a login failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginFailure {
    /// CHAP failed or was required but not done: 0201.
    AuthenticationFailed,
    /// The ACL refuses this initiator: 0202.
    AuthorizationFailed,
    /// No such target: 0203.
    NotFound,
    /// InitiatorName, or TargetName of a normal session, missing: 0207.
    MissingParameter,
    /// No common iSCSI version: 0205.
    UnsupportedVersion,
    /// Protocol violation or malformed request: 0200. The detail is for logs, never secrets.
    InitiatorError(String),
}

impl LoginFailure {
    /// Status-Class and Status-Detail (RFC 7143 §11.13.5).
    pub fn status(&self) -> (u8, u8) {
        match self {
            Self::AuthenticationFailed => status::AUTHENTICATION_FAILURE,
            Self::AuthorizationFailed => status::AUTHORIZATION_FAILURE,
            Self::NotFound => status::NOT_FOUND,
            Self::MissingParameter => status::MISSING_PARAMETER,
            Self::UnsupportedVersion => status::UNSUPPORTED_VERSION,
            Self::InitiatorError(_) => status::INITIATOR_ERROR,
        }
    }
}

/// What to do after a request.
#[derive(Debug)]
pub enum LoginStep {
    /// Send this, keep going.
    Continue(LoginResponse),
    /// Send this, then the connection is in full-feature phase with these params.
    FullFeature(LoginResponse, SessionParams),
    /// Send this (a failure status), then close the connection.
    Failed(LoginResponse, LoginFailure),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Nothing processed yet (C-bit fragments of the first request may be buffered).
    Start,
    /// Identified in the security stage; this request should carry AuthMethod.
    AwaitAuthMethod,
    /// AuthMethod=CHAP answered; the next request must carry CHAP_A.
    ChapAlgorithm,
    /// CHAP_A/CHAP_I/CHAP_C sent; the next request must carry CHAP_N and CHAP_R.
    ChapResponse(ChapAlgorithm),
    /// Authenticated (or no authentication); waiting for the initiator to leave stage 0.
    SecurityDone,
    /// In the operational negotiation stage.
    Operational,
    /// FullFeature or Failed was returned.
    Finished,
}

/// Who the initiator said it is, from its first request.
struct Identity {
    session_type: SessionType,
    initiator_name: String,
    initiator_alias: Option<String>,
    target_name: Option<String>,
}

/// Keys of the first request that name the initiator, the target and the session
/// (RFC 7143 §13.4-13.6, §13.21).
const IDENTITY_KEYS: [&str; 4] = ["InitiatorName", "InitiatorAlias", "TargetName", "SessionType"];

/// The login of one connection, target side.
pub struct TargetLogin {
    limits: TargetLimits,
    chap_id: u8,
    chap_challenge: Vec<u8>,
    phase: Phase,
    /// Text of a request whose earlier PDUs had the C bit set, and their stage.
    pending: Vec<u8>,
    pending_csg: Option<u8>,
    identity: Option<Identity>,
    auth: Option<TargetAuth>,
    negotiator: Option<Negotiator>,
    user: Option<String>,
    first_response_sent: bool,
}

impl TargetLogin {
    /// `chap_id` and `chap_challenge` (e.g. 16..=32 random bytes) come from the caller: proto
    /// has no RNG.
    pub fn new(limits: TargetLimits, chap_id: u8, chap_challenge: Vec<u8>) -> Self {
        debug_assert!(!chap_challenge.is_empty(), "the CHAP challenge must not be empty");
        Self {
            limits,
            chap_id,
            chap_challenge,
            phase: Phase::Start,
            pending: Vec::new(),
            pending_csg: None,
            identity: None,
            auth: None,
            negotiator: None,
            user: None,
            first_response_sent: false,
        }
    }

    /// Handles one Login Request PDU.
    pub fn on_request(&mut self, req: &LoginRequest<'_>, authority: &dyn LoginAuthority) -> LoginStep {
        match self.step(req, authority) {
            Ok(step) => {
                if matches!(step, LoginStep::FullFeature(..)) {
                    self.phase = Phase::Finished;
                }
                step
            }
            Err(failure) => {
                self.phase = Phase::Finished;
                let (class, detail) = failure.status();
                let mut response = Self::response(req.header.csg & 0b11, false, 0, Vec::new());
                response.status_class = class;
                response.status_detail = detail;
                LoginStep::Failed(response, failure)
            }
        }
    }

    /// The account name the initiator authenticated as (for logs/sessions), if CHAP ran.
    pub fn authenticated_user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    fn response(csg: u8, transit: bool, nsg: u8, data: Vec<u8>) -> LoginResponse {
        LoginResponse {
            transit,
            cont: false,
            csg,
            nsg,
            version_max: ISCSI_VERSION,
            version_active: ISCSI_VERSION,
            status_class: status::SUCCESS.0,
            status_detail: status::SUCCESS.1,
            data,
        }
    }

    fn step(&mut self, req: &LoginRequest<'_>, authority: &dyn LoginAuthority) -> Result<LoginStep, LoginFailure> {
        if self.phase == Phase::Finished {
            return Err(initiator_error("login request after the login ended"));
        }
        // RFC 7143 §11.12.4: we only speak version 0, so Version-min must be 0 (Version-max
        // is at least 0 by its type).
        if req.header.version_min > ISCSI_VERSION {
            return Err(LoginFailure::UnsupportedVersion);
        }
        self.check_stages(req)?;

        // RFC 7143 §11.12.2: C=1 means more text of this request follows.
        if let Some(csg) = self.pending_csg
            && csg != req.header.csg
        {
            return Err(initiator_error("stage changed inside a continued request"));
        }
        if self.pending.len() + req.data.len() > MAX_LOGIN_TEXT_BYTES {
            return Err(initiator_error("login request text too long"));
        }
        self.pending.extend_from_slice(req.data);
        if req.header.cont {
            self.pending_csg = Some(req.header.csg);
            return Ok(LoginStep::Continue(Self::response(
                req.header.csg,
                false,
                0,
                Vec::new(),
            )));
        }
        self.pending_csg = None;
        let text = std::mem::take(&mut self.pending);

        let pairs = text::parse(&text).map_err(|e| initiator_error(&format!("malformed login text: {e}")))?;
        let mut keys = BTreeSet::new();
        for (key, _) in &pairs {
            if !keys.insert(key.as_str()) {
                return Err(initiator_error(&format!("key {key} sent twice")));
            }
        }
        let (identity, rest): (Vec<_>, Vec<_>) = pairs
            .into_iter()
            .partition(|(k, _)| IDENTITY_KEYS.contains(&k.as_str()));
        let (security, operational): (Vec<_>, Vec<_>) = rest.into_iter().partition(|(k, _)| is_security_key(k));

        if self.phase == Phase::Start {
            self.identify(req.header.csg, &identity, authority)?;
        } else {
            self.check_identity_repeat(&identity)?;
        }

        let mut answers = Vec::new();
        if req.header.csg == STAGE_SECURITY {
            answers = self.security(&security)?;
        } else if let Some((key, _)) = security.first() {
            return Err(initiator_error(&format!("{key} outside the security stage")));
        }

        let negotiator = self.negotiator.as_mut().ok_or_else(|| initiator_error("no identity"))?;
        // Operational keys are answered in the security stage too: RFC 3720 initiators may
        // send them there.
        answers.extend(
            negotiator
                .respond(&operational)
                .map_err(|e| initiator_error(&e.to_string()))?,
        );
        if req.header.csg == STAGE_OPERATIONAL {
            answers.extend(negotiator.declarations());
        }
        if !self.first_response_sent {
            self.first_response_sent = true;
            answers.extend(self.first_response_declarations());
        }
        let mut data = Vec::new();
        let refs: Vec<(&str, &str)> = answers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        text::encode(&refs, &mut data);

        let stage_done = match req.header.csg {
            STAGE_SECURITY => self.phase == Phase::SecurityDone,
            _ => true,
        };
        if !(req.header.transit && stage_done) {
            return Ok(LoginStep::Continue(Self::response(req.header.csg, false, 0, data)));
        }
        let response = Self::response(req.header.csg, true, req.header.nsg, data);
        if req.header.nsg == STAGE_FULL_FEATURE {
            let mut params = self
                .negotiator
                .take()
                .ok_or_else(|| initiator_error("no identity"))?
                .into_params();
            if let Some(identity) = &self.identity {
                params.initiator_alias = identity.initiator_alias.clone();
            }
            return Ok(LoginStep::FullFeature(response, params));
        }
        self.phase = Phase::Operational;
        Ok(LoginStep::Continue(response))
    }

    /// RFC 7143 §6.3, §11.12.3: legal CSG/NSG/T/C combinations and stage order.
    fn check_stages(&self, req: &LoginRequest<'_>) -> Result<(), LoginFailure> {
        if req.header.csg != STAGE_SECURITY && req.header.csg != STAGE_OPERATIONAL {
            return Err(initiator_error(&format!("login request in stage {}", req.header.csg)));
        }
        if req.header.transit && req.header.cont {
            return Err(initiator_error("T and C both set"));
        }
        if req.header.transit
            && (req.header.nsg <= req.header.csg
                || (req.header.nsg != STAGE_OPERATIONAL && req.header.nsg != STAGE_FULL_FEATURE))
        {
            return Err(initiator_error(&format!(
                "transit from stage {} to stage {}",
                req.header.csg, req.header.nsg
            )));
        }
        let expected = match self.phase {
            Phase::Start => return Ok(()),
            Phase::AwaitAuthMethod | Phase::ChapAlgorithm | Phase::ChapResponse(_) | Phase::SecurityDone => {
                STAGE_SECURITY
            }
            Phase::Operational => STAGE_OPERATIONAL,
            Phase::Finished => return Ok(()),
        };
        if req.header.csg != expected {
            return Err(initiator_error(&format!(
                "request in stage {} while in stage {expected}",
                req.header.csg
            )));
        }
        Ok(())
    }

    /// First request: who is logging in where, and may they (RFC 7143 §13.4-13.6, §13.21).
    fn identify(
        &mut self,
        csg: u8,
        pairs: &[(String, String)],
        authority: &dyn LoginAuthority,
    ) -> Result<(), LoginFailure> {
        let initiator_name = value_of(pairs, "InitiatorName")
            .filter(|v| !v.is_empty())
            .ok_or(LoginFailure::MissingParameter)?;
        if initiator_name.len() > MAX_ISCSI_NAME_LEN {
            return Err(initiator_error("InitiatorName too long"));
        }
        let session_type = match value_of(pairs, "SessionType") {
            None => SessionType::Normal,
            Some(v) => SessionType::from_value(v).ok_or_else(|| initiator_error("unknown SessionType"))?,
        };
        let target_name = match session_type {
            SessionType::Discovery => None,
            SessionType::Normal => {
                let name = value_of(pairs, "TargetName")
                    .filter(|v| !v.is_empty())
                    .ok_or(LoginFailure::MissingParameter)?;
                if name.len() > MAX_ISCSI_NAME_LEN {
                    return Err(initiator_error("TargetName too long"));
                }
                Some(name.to_owned())
            }
        };
        let auth = match authority.lookup(session_type, target_name.as_deref(), initiator_name) {
            Lookup::NotFound => return Err(LoginFailure::NotFound),
            Lookup::Denied => return Err(LoginFailure::AuthorizationFailed),
            Lookup::Allowed(auth) => auth,
        };
        // RFC 7143 §6.3: skipping the security stage is only allowed when the target
        // requires no authentication.
        if csg == STAGE_OPERATIONAL && !auth.accounts.is_empty() {
            return Err(LoginFailure::AuthenticationFailed);
        }
        let initiator_alias = value_of(pairs, "InitiatorAlias").map(str::to_owned);
        self.negotiator = Some(Negotiator::new(
            self.limits.clone(),
            session_type,
            initiator_name.to_owned(),
            initiator_alias.clone(),
            target_name.clone(),
        ));
        self.identity = Some(Identity {
            session_type,
            initiator_name: initiator_name.to_owned(),
            initiator_alias,
            target_name,
        });
        self.auth = Some(auth);
        self.phase = if csg == STAGE_SECURITY {
            Phase::AwaitAuthMethod
        } else {
            Phase::Operational
        };
        Ok(())
    }

    /// Later requests may repeat the identity keys (libiscsi does when the security stage
    /// ended in one step) but not change them (RFC 7143 §6.2).
    fn check_identity_repeat(&mut self, pairs: &[(String, String)]) -> Result<(), LoginFailure> {
        let identity = self.identity.as_mut().ok_or_else(|| initiator_error("no identity"))?;
        for (key, value) in pairs {
            let same = match key.as_str() {
                "InitiatorName" => *value == identity.initiator_name,
                "SessionType" => SessionType::from_value(value) == Some(identity.session_type),
                "TargetName" => {
                    identity.session_type == SessionType::Discovery
                        || identity.target_name.as_deref() == Some(value.as_str())
                }
                "InitiatorAlias" => match &identity.initiator_alias {
                    Some(alias) => alias == value,
                    None => {
                        identity.initiator_alias = Some(value.clone());
                        true
                    }
                },
                _ => true,
            };
            if !same {
                return Err(initiator_error(&format!("{key} changed during login")));
            }
        }
        Ok(())
    }

    /// Security stage keys: AuthMethod and CHAP (RFC 7143 §12.1.3).
    fn security(&mut self, pairs: &[(String, String)]) -> Result<Vec<(String, String)>, LoginFailure> {
        let auth = self.auth.as_ref().ok_or_else(|| initiator_error("no identity"))?;
        let chap_required = !auth.accounts.is_empty();
        let mut answers = Vec::new();
        let mut used: BTreeSet<&str> = BTreeSet::new();
        let entry = self.phase;

        if entry == Phase::AwaitAuthMethod {
            used.insert("AuthMethod");
            let offered: Vec<&str> = value_of(pairs, "AuthMethod")
                .map(|v| v.split(',').collect())
                .unwrap_or_default();
            if chap_required {
                if !offered.contains(&"CHAP") {
                    return Err(LoginFailure::AuthenticationFailed);
                }
                answers.push(("AuthMethod".to_owned(), "CHAP".to_owned()));
                self.phase = Phase::ChapAlgorithm;
            } else {
                match value_of(pairs, "AuthMethod") {
                    // We have no account to run CHAP against.
                    Some(_) if !offered.contains(&"None") => {
                        return Err(LoginFailure::AuthenticationFailed);
                    }
                    Some(_) => answers.push(("AuthMethod".to_owned(), "None".to_owned())),
                    None => {}
                }
                self.phase = Phase::SecurityDone;
            }
        }

        // CHAP_A may come with AuthMethod or in the next request.
        if self.phase == Phase::ChapAlgorithm {
            match value_of(pairs, "CHAP_A") {
                Some(offer) => {
                    used.insert("CHAP_A");
                    let Some(alg) = ChapAlgorithm::select(offer) else {
                        return Err(LoginFailure::AuthenticationFailed);
                    };
                    answers.push(("CHAP_A".to_owned(), alg.code().to_string()));
                    answers.push(("CHAP_I".to_owned(), self.chap_id.to_string()));
                    answers.push(("CHAP_C".to_owned(), chap::encode_hex(&self.chap_challenge)));
                    self.phase = Phase::ChapResponse(alg);
                }
                None if entry == Phase::ChapAlgorithm => {
                    return Err(LoginFailure::AuthenticationFailed);
                }
                None => {}
            }
        } else if let Phase::ChapResponse(alg) = entry {
            used.extend(["CHAP_N", "CHAP_R", "CHAP_I", "CHAP_C"]);
            answers.extend(self.verify_chap(alg, pairs)?);
            self.phase = Phase::SecurityDone;
        }

        if let Some((key, _)) = pairs.iter().find(|(k, _)| !used.contains(k.as_str())) {
            return Err(if key.starts_with("CHAP_") && chap_required {
                LoginFailure::AuthenticationFailed
            } else {
                initiator_error(&format!("unexpected {key}"))
            });
        }
        Ok(answers)
    }

    /// CHAP_N/CHAP_R from the initiator, and mutual CHAP_I/CHAP_C (RFC 7143 §12.1.3).
    fn verify_chap(
        &mut self,
        alg: ChapAlgorithm,
        pairs: &[(String, String)],
    ) -> Result<Vec<(String, String)>, LoginFailure> {
        let auth = self.auth.as_ref().ok_or_else(|| initiator_error("no identity"))?;
        let name = value_of(pairs, "CHAP_N").ok_or(LoginFailure::AuthenticationFailed)?;
        let response = value_of(pairs, "CHAP_R")
            .and_then(|v| chap::decode_binary(v).ok())
            .filter(|r| r.len() == alg.digest_len())
            .ok_or(LoginFailure::AuthenticationFailed)?;
        // Check every account so the time taken does not reveal which names exist.
        let mut matched = false;
        for (account, secret) in &auth.accounts {
            let expected = chap::chap_response(alg, self.chap_id, secret, &self.chap_challenge);
            let ok = chap::constant_time_eq(&expected, &response);
            matched |= ok && account == name;
        }
        if !matched {
            return Err(LoginFailure::AuthenticationFailed);
        }

        let mut answers = Vec::new();
        match (value_of(pairs, "CHAP_I"), value_of(pairs, "CHAP_C")) {
            (None, None) => {}
            (Some(id), Some(challenge)) => {
                let id = text::parse_number(id)
                    .and_then(|n| u8::try_from(n).ok())
                    .ok_or(LoginFailure::AuthenticationFailed)?;
                let challenge = chap::decode_binary(challenge)
                    .ok()
                    .filter(|c| (MIN_MUTUAL_CHALLENGE_LEN..=MAX_MUTUAL_CHALLENGE_LEN).contains(&c.len()))
                    .ok_or(LoginFailure::AuthenticationFailed)?;
                // RFC 7143 §12.1.3: a challenge equal to ours is a reflection attack.
                if challenge == self.chap_challenge {
                    return Err(LoginFailure::AuthenticationFailed);
                }
                let (target_user, secret) = auth.mutual.as_ref().ok_or(LoginFailure::AuthenticationFailed)?;
                let r = chap::chap_response(alg, id, secret, &challenge);
                answers.push(("CHAP_N".to_owned(), target_user.clone()));
                answers.push(("CHAP_R".to_owned(), chap::encode_hex(&r)));
            }
            _ => return Err(LoginFailure::AuthenticationFailed),
        }
        self.user = Some(name.to_owned());
        Ok(answers)
    }

    /// TargetAlias and TargetPortalGroupTag in the first response of a normal session
    /// (RFC 7143 §13.9, §13.7).
    fn first_response_declarations(&self) -> Vec<(String, String)> {
        let (Some(identity), Some(auth)) = (&self.identity, &self.auth) else {
            return Vec::new();
        };
        if identity.session_type != SessionType::Normal {
            return Vec::new();
        }
        let mut out = Vec::new();
        if let Some(alias) = &auth.target_alias {
            out.push(("TargetAlias".to_owned(), alias.clone()));
        }
        out.push(("TargetPortalGroupTag".to_owned(), auth.tpgt.to_string()));
        out
    }
}

fn initiator_error(detail: &str) -> LoginFailure {
    LoginFailure::InitiatorError(detail.to_owned())
}

fn is_security_key(key: &str) -> bool {
    key == "AuthMethod" || key.starts_with("CHAP_")
}

fn value_of<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const INITIATOR: &str = "iqn.2026-01.test:init";
    const TARGET: &str = "iqn.2026-01.raftsan:disk1";
    const CHALLENGE: [u8; 16] = [
        0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff,
    ];
    /// H(1 || "secretsecret" || CHALLENGE), computed with Python's hashlib (see chap.rs).
    const MD5_RESPONSE: &str = "0x3d3d7f13199a65926f355637d73daf5c";
    const SHA256_RESPONSE: &str = "0x257057db4d4b74df190de053df3e0a4c7f0eff17c7d88ed0e20f53eb1c0d4a73";
    /// hashlib.md5(bytes([7]) + b"mutualsecret" + bytes.fromhex("ffeeddccbbaa99887766554433221100")).
    const MUTUAL_RESPONSE: &str = "0xce5f02c06dfb99f30f2ca165ce26269a";

    /// Operational keys as libiscsi sends them (lib/login.c, defaults).
    const LIBISCSI_OPNEG: &[u8] = b"HeaderDigest=None,CRC32C\0DataDigest=None\0InitialR2T=No\0\
ImmediateData=Yes\0MaxBurstLength=262144\0FirstBurstLength=262144\0DefaultTime2Wait=2\0\
DefaultTime2Retain=0\0MaxOutstandingR2T=1\0ErrorRecoveryLevel=0\0IFMarker=No\0OFMarker=No\0\
MaxConnections=1\0MaxRecvDataSegmentLength=262144\0DataPDUInOrder=Yes\0DataSequenceInOrder=Yes\0";
    /// Our answers to [`LIBISCSI_OPNEG`] plus our MaxRecvDataSegmentLength declaration.
    const LIBISCSI_OPNEG_ANSWER: &[u8] = b"HeaderDigest=None\0DataDigest=None\0InitialR2T=No\0\
ImmediateData=Yes\0MaxBurstLength=262144\0FirstBurstLength=262144\0DefaultTime2Wait=2\0\
DefaultTime2Retain=0\0MaxOutstandingR2T=1\0ErrorRecoveryLevel=0\0IFMarker=No\0OFMarker=No\0\
MaxConnections=1\0DataPDUInOrder=Yes\0DataSequenceInOrder=Yes\0MaxRecvDataSegmentLength=262144\0";

    struct Catalog {
        auth: TargetAuth,
    }

    impl LoginAuthority for Catalog {
        fn lookup(&self, session_type: SessionType, target_name: Option<&str>, initiator_name: &str) -> Lookup {
            match (session_type, target_name) {
                (SessionType::Normal, Some(TARGET)) | (SessionType::Discovery, None) => {
                    if initiator_name == INITIATOR {
                        Lookup::Allowed(self.auth.clone())
                    } else {
                        Lookup::Denied
                    }
                }
                _ => Lookup::NotFound,
            }
        }
    }

    fn no_chap() -> Catalog {
        Catalog {
            auth: TargetAuth {
                accounts: vec![],
                mutual: None,
                target_alias: Some("disk1".into()),
                tpgt: 1,
            },
        }
    }

    fn with_chap(mutual: bool) -> Catalog {
        Catalog {
            auth: TargetAuth {
                accounts: vec![
                    ("other".into(), b"othersecret!".to_vec()),
                    ("user".into(), b"secretsecret".to_vec()),
                ],
                mutual: mutual.then(|| ("target".into(), b"mutualsecret".to_vec())),
                target_alias: None,
                tpgt: 2,
            },
        }
    }

    fn req(csg: u8, nsg: u8, transit: bool, data: &[u8]) -> LoginRequest<'_> {
        LoginRequest {
            header: crate::pdu::LoginRequest {
                transit,
                cont: false,
                csg,
                nsg,
                version_max: 0,
                version_min: 0,
                isid: [0x80, 0, 0, 0, 0, 1],
                tsih: 0,
                itt: 1,
                cid: 0,
                cmdsn: 0,
                exp_statsn: 0,
            },
            data,
        }
    }

    fn login() -> TargetLogin {
        TargetLogin::new(TargetLimits::default(), 1, CHALLENGE.to_vec())
    }

    fn resp(csg: u8, transit: bool, nsg: u8, data: &[u8]) -> LoginResponse {
        LoginResponse {
            transit,
            cont: false,
            csg,
            nsg,
            version_max: 0,
            version_active: 0,
            status_class: 0,
            status_detail: 0,
            data: data.to_vec(),
        }
    }

    fn failed(csg: u8, (class, detail): (u8, u8)) -> LoginResponse {
        LoginResponse {
            status_class: class,
            status_detail: detail,
            ..resp(csg, false, 0, b"")
        }
    }

    fn cont(step: LoginStep) -> LoginResponse {
        match step {
            LoginStep::Continue(r) => r,
            other => panic!("expected Continue, got {other:?}"),
        }
    }

    fn full(step: LoginStep) -> (LoginResponse, SessionParams) {
        match step {
            LoginStep::FullFeature(r, p) => (r, p),
            other => panic!("expected FullFeature, got {other:?}"),
        }
    }

    fn fail(step: LoginStep) -> (LoginResponse, LoginFailure) {
        match step {
            LoginStep::Failed(r, f) => (r, f),
            other => panic!("expected Failed, got {other:?}"),
        }
    }

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    fn identity_text() -> Vec<u8> {
        format!("InitiatorName={INITIATOR}\0TargetName={TARGET}\0SessionType=Normal\0").into_bytes()
    }

    fn libiscsi_params() -> SessionParams {
        SessionParams {
            session_type: SessionType::Normal,
            initiator_name: INITIATOR.into(),
            initiator_alias: None,
            target_name: Some(TARGET.into()),
            header_digest: false,
            data_digest: false,
            initiator_max_recv_data_segment_length: 262_144,
            target_max_recv_data_segment_length: 262_144,
            max_burst_length: 262_144,
            first_burst_length: 262_144,
            initial_r2t: false,
            immediate_data: true,
            max_outstanding_r2t: 1,
            max_connections: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            default_time2wait: 2,
            default_time2retain: 0,
            error_recovery_level: 0,
        }
    }

    /// Runs the CHAP security stage up to the CHAP_N/CHAP_R request, libiscsi style.
    fn chap_until_response(l: &mut TargetLogin, c: &Catalog, chap_a: &str) -> LoginResponse {
        let first = cat(&[&identity_text(), b"AuthMethod=CHAP,None\0"]);
        cont(l.on_request(&req(0, 1, true, &first), c));
        cont(l.on_request(&req(0, 1, false, format!("CHAP_A={chap_a}\0").as_bytes()), c))
    }

    #[test]
    fn no_auth_normal_login_in_one_pdu() {
        // RFC 7143 §6.3: csg=1 → nsg=3 in one request when no authentication is required;
        // the first response carries TargetAlias and TargetPortalGroupTag (§13.9).
        let mut l = login();
        let data = cat(&[&identity_text(), LIBISCSI_OPNEG]);
        let (r, params) = full(l.on_request(&req(1, 3, true, &data), &no_chap()));
        let expected = cat(&[LIBISCSI_OPNEG_ANSWER, b"TargetAlias=disk1\0TargetPortalGroupTag=1\0"]);
        assert_eq!(r, resp(1, true, 3, &expected));
        assert_eq!(params, libiscsi_params());
        assert_eq!(l.authenticated_user(), None);
        // Nothing is accepted after the login ended.
        let (r, f) = fail(l.on_request(&req(1, 3, true, b""), &no_chap()));
        assert_eq!(r, failed(1, status::INITIATOR_ERROR));
        assert!(matches!(f, LoginFailure::InitiatorError(_)));
    }

    #[test]
    fn chap_md5_login() {
        // RFC 7143 §12.1.3: AuthMethod=CHAP, then CHAP_A → CHAP_A/CHAP_I/CHAP_C, then
        // CHAP_N/CHAP_R → transit to the operational stage.
        let mut l = login();
        let c = with_chap(false);
        let first = cat(&[&identity_text(), b"AuthMethod=CHAP,None\0"]);
        let r = cont(l.on_request(&req(0, 1, true, &first), &c));
        // Not authenticated yet: no transit despite T=1 (§6.3).
        assert_eq!(r, resp(0, false, 0, b"AuthMethod=CHAP\0TargetPortalGroupTag=2\0"));
        let r = cont(l.on_request(&req(0, 1, false, b"CHAP_A=5\0"), &c));
        assert_eq!(
            r,
            resp(
                0,
                false,
                0,
                b"CHAP_A=5\0CHAP_I=1\0CHAP_C=0x00112233445566778899aabbccddeeff\0"
            )
        );
        let answer = format!("CHAP_N=user\0CHAP_R={MD5_RESPONSE}\0");
        let r = cont(l.on_request(&req(0, 1, true, answer.as_bytes()), &c));
        assert_eq!(r, resp(0, true, 1, b""));
        assert_eq!(l.authenticated_user(), Some("user"));
        let (r, params) = full(l.on_request(&req(1, 3, true, LIBISCSI_OPNEG), &c));
        assert_eq!(r, resp(1, true, 3, LIBISCSI_OPNEG_ANSWER));
        assert_eq!(params, libiscsi_params());
    }

    #[test]
    fn sha256_chosen_when_offered_first() {
        // RFC 7143 §12.1.3: the first algorithm of the initiator's list that we support.
        let mut l = login();
        let c = with_chap(false);
        let r = chap_until_response(&mut l, &c, "7,5");
        assert_eq!(
            r,
            resp(
                0,
                false,
                0,
                b"CHAP_A=7\0CHAP_I=1\0CHAP_C=0x00112233445566778899aabbccddeeff\0"
            )
        );
        let answer = format!("CHAP_N=user\0CHAP_R={SHA256_RESPONSE}\0");
        let r = cont(l.on_request(&req(0, 1, true, answer.as_bytes()), &c));
        assert_eq!(r, resp(0, true, 1, b""));
    }

    #[test]
    fn chap_r_in_base64() {
        // RFC 7143 §6.1 base64 binary values; libiscsi test_iscsi_chap_base64.
        let mut l = login();
        let c = with_chap(false);
        chap_until_response(&mut l, &c, "5");
        let answer = b"CHAP_N=user\0CHAP_R=0bPT1/ExmaZZJvNVY31z2vXA==\0";
        assert_eq!(cont(l.on_request(&req(0, 1, true, answer), &c)), resp(0, true, 1, b""));

        // libiscsi test_iscsi_chap_base64_oversize: extra valid base64 in front → failure.
        let mut l = login();
        chap_until_response(&mut l, &c, "5");
        let answer = b"CHAP_N=user\0CHAP_R=0bb3ZlcnNpemUKPT1/ExmaZZJvNVY31z2vXA==\0";
        let (r, f) = fail(l.on_request(&req(0, 1, true, answer), &c));
        assert_eq!(
            (r, f),
            (
                failed(0, status::AUTHENTICATION_FAILURE),
                LoginFailure::AuthenticationFailed
            )
        );
    }

    #[test]
    fn auth_method_and_chap_a_in_one_request() {
        // RFC 7143 §12.1.3: CHAP_A may accompany AuthMethod; the target answers both.
        let mut l = login();
        let c = with_chap(false);
        let first = cat(&[&identity_text(), b"AuthMethod=CHAP\0CHAP_A=8,7,6,5\0"]);
        let r = cont(l.on_request(&req(0, 1, true, &first), &c));
        assert_eq!(
            r,
            resp(
                0,
                false,
                0,
                b"AuthMethod=CHAP\0CHAP_A=8\0CHAP_I=1\0CHAP_C=0x00112233445566778899aabbccddeeff\0\
TargetPortalGroupTag=2\0"
            )
        );
        // hashlib.sha3_256(bytes([1]) + b"secretsecret" + CHALLENGE)
        let answer = b"CHAP_N=user\0\
CHAP_R=0xb09c7123d338e0a7e868c76214f0e6546b1f1f56fe6c1c084d2e507b59c7b8fc\0";
        assert_eq!(cont(l.on_request(&req(0, 1, true, answer), &c)), resp(0, true, 1, b""));
    }

    #[test]
    fn target_auth_debug_hides_secrets() {
        let text = format!("{:?}", with_chap(true).auth);
        assert!(text.contains("user") && text.contains("target"));
        assert!(!text.contains("secret"), "{text}");
    }

    #[test]
    fn mutual_chap() {
        // RFC 7143 §12.1.3: the initiator's CHAP_I/CHAP_C come with its CHAP_N/CHAP_R and the
        // target answers with its own CHAP_N/CHAP_R.
        let mut l = login();
        let c = with_chap(true);
        chap_until_response(&mut l, &c, "5");
        let answer =
            format!("CHAP_N=user\0CHAP_R={MD5_RESPONSE}\0CHAP_I=7\0CHAP_C=0xffeeddccbbaa99887766554433221100\0");
        let r = cont(l.on_request(&req(0, 1, true, answer.as_bytes()), &c));
        let expected = format!("CHAP_N=target\0CHAP_R={MUTUAL_RESPONSE}\0");
        assert_eq!(r, resp(0, true, 1, expected.as_bytes()));
    }

    #[test]
    fn mutual_chap_refusals() {
        let c = with_chap(true);
        // RFC 7143 §12.1.3: a mutual challenge equal to ours is a reflection → 0201.
        let mut l = login();
        chap_until_response(&mut l, &c, "5");
        let answer =
            format!("CHAP_N=user\0CHAP_R={MD5_RESPONSE}\0CHAP_I=1\0CHAP_C=0x00112233445566778899aabbccddeeff\0");
        let (r, f) = fail(l.on_request(&req(0, 1, true, answer.as_bytes()), &c));
        assert_eq!(
            (r, f),
            (
                failed(0, status::AUTHENTICATION_FAILURE),
                LoginFailure::AuthenticationFailed
            )
        );

        // Mutual CHAP asked but no outgoing user configured → 0201.
        let c = with_chap(false);
        let mut l = login();
        chap_until_response(&mut l, &c, "5");
        let answer =
            format!("CHAP_N=user\0CHAP_R={MD5_RESPONSE}\0CHAP_I=7\0CHAP_C=0xffeeddccbbaa99887766554433221100\0");
        let (_, f) = fail(l.on_request(&req(0, 1, true, answer.as_bytes()), &c));
        assert_eq!(f, LoginFailure::AuthenticationFailed);

        // CHAP_C without CHAP_I → 0201.
        let mut l = login();
        chap_until_response(&mut l, &c, "5");
        let answer = format!("CHAP_N=user\0CHAP_R={MD5_RESPONSE}\0CHAP_C=0xffee\0");
        let (_, f) = fail(l.on_request(&req(0, 1, true, answer.as_bytes()), &c));
        assert_eq!(f, LoginFailure::AuthenticationFailed);
    }

    #[test]
    fn wrong_password_fails_0201() {
        // RFC 7143 §11.13.5: authentication failure is class 2 detail 1.
        let mut l = login();
        let c = with_chap(false);
        chap_until_response(&mut l, &c, "5");
        // hashlib.md5(bytes([1]) + b"wrongsecret!" + CHALLENGE)
        let answer = b"CHAP_N=user\0CHAP_R=0xe6d83aea45abb149f30b292e23690b45\0";
        let (r, f) = fail(l.on_request(&req(0, 1, true, answer), &c));
        assert_eq!(r, failed(0, (2, 1)));
        assert_eq!(f, LoginFailure::AuthenticationFailed);
        assert_eq!(l.authenticated_user(), None);

        // The right response under another account's name does not count.
        let mut l = login();
        chap_until_response(&mut l, &c, "5");
        let answer = format!("CHAP_N=other\0CHAP_R={MD5_RESPONSE}\0");
        let (_, f) = fail(l.on_request(&req(0, 1, true, answer.as_bytes()), &c));
        assert_eq!(f, LoginFailure::AuthenticationFailed);

        // Missing CHAP_R.
        let mut l = login();
        chap_until_response(&mut l, &c, "5");
        let (_, f) = fail(l.on_request(&req(0, 1, true, b"CHAP_N=user\0"), &c));
        assert_eq!(f, LoginFailure::AuthenticationFailed);
    }

    #[test]
    fn chap_algorithm_refusals() {
        // libiscsi test_iscsi_chap_invalid: CHAP_A=56 and an empty CHAP_A fail the login.
        let c = with_chap(false);
        for offer in ["56", "", "4"] {
            let mut l = login();
            let first = cat(&[&identity_text(), b"AuthMethod=CHAP,None\0"]);
            cont(l.on_request(&req(0, 1, true, &first), &c));
            let text = format!("CHAP_A={offer}\0");
            let (r, f) = fail(l.on_request(&req(0, 1, false, text.as_bytes()), &c));
            assert_eq!(r, failed(0, status::AUTHENTICATION_FAILURE), "{offer}");
            assert_eq!(f, LoginFailure::AuthenticationFailed);
        }
        // libiscsi test_iscsi_chap_simple: "5,6,7,8" picks MD5.
        let mut l = login();
        let r = chap_until_response(&mut l, &c, "5,6,7,8");
        assert!(r.data.starts_with(b"CHAP_A=5\0"));
    }

    #[test]
    fn chap_required_but_not_offered() {
        let c = with_chap(false);
        // Initiator starts in the operational stage although the target requires CHAP (§6.3).
        let mut l = login();
        let data = cat(&[&identity_text(), LIBISCSI_OPNEG]);
        let (r, f) = fail(l.on_request(&req(1, 3, true, &data), &c));
        assert_eq!(
            (r, f),
            (
                failed(1, status::AUTHENTICATION_FAILURE),
                LoginFailure::AuthenticationFailed
            )
        );
        // Initiator offers only AuthMethod=None.
        let mut l = login();
        let data = cat(&[&identity_text(), b"AuthMethod=None\0"]);
        let (r, f) = fail(l.on_request(&req(0, 1, true, &data), &c));
        assert_eq!(
            (r, f),
            (
                failed(0, status::AUTHENTICATION_FAILURE),
                LoginFailure::AuthenticationFailed
            )
        );
    }

    #[test]
    fn lookup_failures() {
        // RFC 7143 §11.13.5: 0203 not found, 0202 authorization failure, 0207 missing parameter.
        let c = no_chap();
        let mut l = login();
        let data = format!("InitiatorName={INITIATOR}\0TargetName=iqn.2026-01.raftsan:nope\0");
        let (r, f) = fail(l.on_request(&req(1, 3, true, data.as_bytes()), &c));
        assert_eq!((r, f), (failed(1, status::NOT_FOUND), LoginFailure::NotFound));

        let mut l = login();
        let data = format!("InitiatorName=iqn.2026-01.test:intruder\0TargetName={TARGET}\0");
        let (r, f) = fail(l.on_request(&req(0, 1, true, data.as_bytes()), &c));
        assert_eq!(
            (r, f),
            (
                failed(0, status::AUTHORIZATION_FAILURE),
                LoginFailure::AuthorizationFailed
            )
        );

        let mut l = login();
        let data = format!("TargetName={TARGET}\0SessionType=Normal\0AuthMethod=None\0");
        let (r, f) = fail(l.on_request(&req(0, 1, true, data.as_bytes()), &c));
        assert_eq!(
            (r, f),
            (failed(0, status::MISSING_PARAMETER), LoginFailure::MissingParameter)
        );

        let mut l = login();
        let data = format!("InitiatorName={INITIATOR}\0SessionType=Normal\0");
        let (_, f) = fail(l.on_request(&req(1, 3, true, data.as_bytes()), &c));
        assert_eq!(f, LoginFailure::MissingParameter);

        let mut l = login();
        let data = format!("InitiatorName={INITIATOR}\0SessionType=Weird\0");
        let (_, f) = fail(l.on_request(&req(1, 3, true, data.as_bytes()), &c));
        assert!(matches!(f, LoginFailure::InitiatorError(_)));
    }

    #[test]
    fn discovery_session() {
        // RFC 7143 §13.21: a discovery session needs no TargetName; the lookup gets None, no
        // TargetPortalGroupTag is sent and normal-only keys are Irrelevant.
        let c = no_chap();
        let mut l = login();
        let first = format!("InitiatorName={INITIATOR}\0SessionType=Discovery\0AuthMethod=None\0");
        let r = cont(l.on_request(&req(0, 1, true, first.as_bytes()), &c));
        assert_eq!(r, resp(0, true, 1, b"AuthMethod=None\0"));
        let opneg = b"HeaderDigest=None\0DataDigest=None\0MaxRecvDataSegmentLength=32768\0\
MaxBurstLength=262144\0DefaultTime2Wait=2\0DefaultTime2Retain=0\0";
        let (r, params) = full(l.on_request(&req(1, 3, true, opneg), &c));
        assert_eq!(
            r,
            resp(
                1,
                true,
                3,
                b"HeaderDigest=None\0DataDigest=None\0MaxBurstLength=Irrelevant\0\
DefaultTime2Wait=2\0DefaultTime2Retain=0\0MaxRecvDataSegmentLength=262144\0"
            )
        );
        assert_eq!(params.session_type, SessionType::Discovery);
        assert_eq!(params.target_name, None);
        assert_eq!(params.initiator_max_recv_data_segment_length, 32768);
        assert_eq!(params.target_max_recv_data_segment_length, 262_144);
    }

    #[test]
    fn security_straight_to_full_feature() {
        // RFC 7143 §6.3: csg=0 → nsg=3 skips the operational stage; every parameter keeps its
        // default and we declared no MaxRecvDataSegmentLength, so 8192 applies both ways.
        let mut l = login();
        let data = cat(&[&identity_text(), b"AuthMethod=None\0"]);
        let (r, params) = full(l.on_request(&req(0, 3, true, &data), &no_chap()));
        assert_eq!(
            r,
            resp(
                0,
                true,
                3,
                b"AuthMethod=None\0TargetAlias=disk1\0TargetPortalGroupTag=1\0"
            )
        );
        assert_eq!(params.target_max_recv_data_segment_length, 8192);
        assert_eq!(params.initiator_max_recv_data_segment_length, 8192);
        assert!(params.initial_r2t);
    }

    #[test]
    fn libiscsi_resends_identity_after_one_step_security() {
        // libiscsi (lib/login.c) repeats InitiatorName/TargetName/SessionType in its
        // operational request when the security stage ended at once; equal values are fine,
        // changed ones are an initiator error (RFC 7143 §6.2).
        let c = no_chap();
        let mut l = login();
        let data = cat(&[&identity_text(), b"AuthMethod=CHAP,None\0"]);
        let r = cont(l.on_request(&req(0, 1, true, &data), &c));
        assert_eq!(
            r,
            resp(
                0,
                true,
                1,
                b"AuthMethod=None\0TargetAlias=disk1\0TargetPortalGroupTag=1\0"
            )
        );
        let data = cat(&[&identity_text(), LIBISCSI_OPNEG]);
        let (r, _) = full(l.on_request(&req(1, 3, true, &data), &c));
        assert_eq!(r, resp(1, true, 3, LIBISCSI_OPNEG_ANSWER));

        let mut l = login();
        let data = cat(&[&identity_text(), b"AuthMethod=None\0"]);
        cont(l.on_request(&req(0, 1, true, &data), &c));
        let data = b"TargetName=iqn.2026-01.raftsan:other\0";
        let (r, f) = fail(l.on_request(&req(1, 3, true, data), &c));
        assert_eq!(r, failed(1, status::INITIATOR_ERROR));
        assert!(matches!(f, LoginFailure::InitiatorError(_)));
    }

    #[test]
    fn duplicate_keys_fail() {
        // RFC 7143 §6.2: a key sent twice → initiator error 0x0200.
        let c = no_chap();
        let mut l = login();
        let data = cat(&[&identity_text(), b"MaxBurstLength=512\0MaxBurstLength=512\0"]);
        let (r, f) = fail(l.on_request(&req(1, 3, true, &data), &c));
        assert_eq!(r, failed(1, status::INITIATOR_ERROR));
        assert_eq!(f, LoginFailure::InitiatorError("key MaxBurstLength sent twice".into()));

        // Across requests of the same login.
        let mut l = login();
        let data = cat(&[&identity_text(), b"MaxBurstLength=512\0"]);
        cont(l.on_request(&req(1, 3, false, &data), &c));
        let (_, f) = fail(l.on_request(&req(1, 3, true, b"MaxBurstLength=512\0"), &c));
        assert_eq!(f, LoginFailure::InitiatorError("key MaxBurstLength sent twice".into()));
    }

    #[test]
    fn operational_request_without_transit_then_transit() {
        // RFC 7143 §6.3: T=0 requests are answered with T=0 in the same stage.
        let c = no_chap();
        let mut l = login();
        let data = cat(&[&identity_text(), b"MaxBurstLength=4096\0"]);
        let r = cont(l.on_request(&req(1, 3, false, &data), &c));
        assert_eq!(
            r,
            resp(
                1,
                false,
                0,
                b"MaxBurstLength=4096\0MaxRecvDataSegmentLength=262144\0TargetAlias=disk1\0\
TargetPortalGroupTag=1\0"
            )
        );
        let (r, p) = full(l.on_request(&req(1, 3, true, b""), &c));
        assert_eq!(r, resp(1, true, 3, b""));
        assert_eq!((p.max_burst_length, p.first_burst_length), (4096, 4096));
    }

    #[test]
    fn continuation_bit() {
        // RFC 7143 §11.12.2: C=1 splits one request over PDUs (here in the middle of a key);
        // each partial PDU gets an empty response in the same stage.
        let c = no_chap();
        let mut l = login();
        let data = cat(&[&identity_text(), LIBISCSI_OPNEG]);
        let (a, b) = data.split_at(40);
        let mut first = req(1, 3, false, a);
        first.header.cont = true;
        assert_eq!(cont(l.on_request(&first, &c)), resp(1, false, 0, b""));
        let (r, params) = full(l.on_request(&req(1, 3, true, b), &c));
        let expected = cat(&[LIBISCSI_OPNEG_ANSWER, b"TargetAlias=disk1\0TargetPortalGroupTag=1\0"]);
        assert_eq!(r, resp(1, true, 3, &expected));
        assert_eq!(params, libiscsi_params());

        // Bounded: more than MAX_LOGIN_TEXT_BYTES across continued PDUs → 0x0200.
        let mut l = login();
        let chunk = vec![b'a'; 8192];
        let mut step = None;
        for _ in 0..=MAX_LOGIN_TEXT_BYTES / chunk.len() {
            let mut r = req(1, 3, false, &chunk);
            r.header.cont = true;
            step = Some(l.on_request(&r, &c));
        }
        let (r, f) = fail(step.unwrap());
        assert_eq!(r, failed(1, status::INITIATOR_ERROR));
        assert_eq!(f, LoginFailure::InitiatorError("login request text too long".into()));
    }

    #[test]
    fn version_and_stage_errors() {
        let c = no_chap();
        let data = cat(&[&identity_text(), LIBISCSI_OPNEG]);
        // RFC 7143 §11.12.4: Version-min above 0 → 0205.
        let mut l = login();
        let mut r = req(1, 3, true, &data);
        r.header.version_min = 1;
        r.header.version_max = 2;
        let (resp_, f) = fail(l.on_request(&r, &c));
        assert_eq!(
            (resp_, f),
            (failed(1, status::UNSUPPORTED_VERSION), LoginFailure::UnsupportedVersion)
        );

        // T and C both set, transit backwards, stage 2, full-feature stage: 0x0200.
        let cases: [(u8, u8, bool, bool); 4] = [
            (1, 3, true, true),
            (1, 1, true, false),
            (2, 3, true, false),
            (3, 3, false, false),
        ];
        for (csg, nsg, transit, c_bit) in cases {
            let mut l = login();
            let mut r = req(csg, nsg, transit, &data);
            r.header.cont = c_bit;
            let (resp_, f) = fail(l.on_request(&r, &c));
            assert_eq!(resp_, failed(csg, status::INITIATOR_ERROR), "{csg} {nsg}");
            assert!(matches!(f, LoginFailure::InitiatorError(_)));
        }

        // Back to the security stage after entering the operational stage.
        let mut l = login();
        cont(l.on_request(&req(1, 3, false, &identity_text()), &c));
        let (_, f) = fail(l.on_request(&req(0, 1, true, b"AuthMethod=None\0"), &c));
        assert!(matches!(f, LoginFailure::InitiatorError(_)));

        // Security keys in the operational stage.
        let mut l = login();
        let data = cat(&[&identity_text(), b"AuthMethod=None\0"]);
        let (_, f) = fail(l.on_request(&req(1, 3, true, &data), &c));
        assert_eq!(
            f,
            LoginFailure::InitiatorError("AuthMethod outside the security stage".into())
        );

        // Malformed text.
        let mut l = login();
        let (_, f) = fail(l.on_request(&req(1, 3, true, b"InitiatorName\0"), &c));
        assert!(matches!(f, LoginFailure::InitiatorError(_)));
    }

    proptest! {
        #[test]
        fn on_request_never_panics(
            steps in proptest::collection::vec(
                (any::<bool>(), any::<bool>(), 0u8..4, 0u8..4, any::<u8>(), any::<u8>(),
                 proptest::collection::vec(any::<u8>(), 0..256)),
                1..6),
            chap in any::<bool>(),
        ) {
            let c = if chap { with_chap(true) } else { no_chap() };
            let mut l = login();
            for (transit, cont_bit, csg, nsg, vmax, vmin, data) in &steps {
                let mut r = req(*csg, *nsg, *transit, data);
                r.header.cont = *cont_bit;
                r.header.version_max = *vmax;
                r.header.version_min = *vmin;
                let _ = l.on_request(&r, &c);
            }
        }

        #[test]
        fn keyed_requests_never_panic(
            keys in proptest::collection::vec(
                (prop_oneof![
                    Just("InitiatorName".to_owned()), Just("TargetName".to_owned()),
                    Just("SessionType".to_owned()), Just("AuthMethod".to_owned()),
                    Just("CHAP_A".to_owned()), Just("CHAP_N".to_owned()),
                    Just("CHAP_R".to_owned()), Just("CHAP_I".to_owned()),
                    Just("CHAP_C".to_owned()), Just("MaxBurstLength".to_owned()),
                    Just("FirstBurstLength".to_owned()), "[A-Za-z]{1,12}",
                ], "[ -~]{0,40}"),
                0..12),
            csg in 0u8..2,
            chap in any::<bool>(),
        ) {
            let c = if chap { with_chap(true) } else { no_chap() };
            let mut l = login();
            let mut data = identity_text();
            for (k, v) in &keys {
                text::encode(&[(k, v)], &mut data);
            }
            let _ = l.on_request(&req(csg, 3, true, &data), &c);
            let _ = l.on_request(&req(0, 1, true, &data), &c);
        }
    }
}
