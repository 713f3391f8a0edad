//! iSCSI text keys: `key=value` encoding (RFC 7143 §6.1) and operational parameter
//! negotiation on the target side (RFC 7143 §6.2, §13).
//!
//! * [`parse`] / [`encode`]: the data segment of Login and Text PDUs, `key=value\0 ...`.
//! * [`Negotiator`]: answers the operational keys an initiator offers during login and
//!   produces the [`SessionParams`] the session runs with. It handles one request at a time
//!   ([`Negotiator::respond`]); the login machine in [`crate::login`] feeds it everything
//!   except the login-only keys (InitiatorName, TargetName, SessionType, AuthMethod, CHAP_*).
//! * [`send_targets_response`]: the SendTargets answer of a discovery session (RFC 7143 §12.3).
//!
//! Deliberately not done: target-initiated offers. Keys the initiator does not offer keep their
//! RFC default (Linux open-iscsi and libiscsi offer every key that matters), so the target never
//! has to wait for an answer before it may transit.

use std::collections::BTreeSet;

/// Longest key name (RFC 7143 §6.1: "up to 63 bytes").
pub const MAX_KEY_LEN: usize = 63;
/// Longest value (RFC 7143 §6.1: "up to 8192 bytes" for the longest keys).
pub const MAX_VALUE_LEN: usize = 8192;
/// Most pairs accepted in one request (a limit of ours; real logins send about 25).
pub const MAX_PAIRS: usize = 256;

/// Smallest and largest legal MaxRecvDataSegmentLength, MaxBurstLength, FirstBurstLength
/// (RFC 7143 §13.12-13.14: 512 to 2^24-1).
pub const MIN_SEGMENT_LENGTH: u32 = 512;
/// See [`MIN_SEGMENT_LENGTH`].
pub const MAX_SEGMENT_LENGTH: u32 = (1 << 24) - 1;

/// RFC 7143 §13.12: MaxRecvDataSegmentLength a side assumes when the other did not declare one.
pub const DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH: u32 = 8192;

/// Why a text data segment could not be parsed. Always caused by the peer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TextError {
    /// A pair without `=` (RFC 7143 §6.1).
    #[error("text pair {index} has no '='")]
    MissingEquals { index: usize },
    /// A pair that is not valid UTF-8 (RFC 7143 §6.1: text is UTF-8).
    #[error("text pair {index} is not UTF-8")]
    NotUtf8 { index: usize },
    /// `=value` with an empty key.
    #[error("text pair {index} has an empty key")]
    EmptyKey { index: usize },
    /// A key longer than [`MAX_KEY_LEN`].
    #[error("text pair {index}: key longer than {MAX_KEY_LEN} bytes")]
    KeyTooLong { index: usize },
    /// A value longer than [`MAX_VALUE_LEN`].
    #[error("text pair {index}: value longer than {MAX_VALUE_LEN} bytes")]
    ValueTooLong { index: usize },
    /// More than [`MAX_PAIRS`] pairs.
    #[error("more than {MAX_PAIRS} text pairs")]
    TooManyPairs,
}

/// Parses `key=value\0key=value\0...` (RFC 7143 §6.1).
///
/// Lenient where real initiators are sloppy: empty segments (trailing padding zeros, a doubled
/// NUL) are skipped and the final NUL may be missing. The value is everything after the first
/// `=` (base64 values end in `=`).
pub fn parse(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    let mut pairs = Vec::new();
    for (index, segment) in data.split(|&b| b == 0).enumerate() {
        if segment.is_empty() {
            continue;
        }
        if pairs.len() == MAX_PAIRS {
            return Err(TextError::TooManyPairs);
        }
        let text = std::str::from_utf8(segment).map_err(|_| TextError::NotUtf8 { index })?;
        let (key, value) = text.split_once('=').ok_or(TextError::MissingEquals { index })?;
        if key.is_empty() {
            return Err(TextError::EmptyKey { index });
        }
        if key.len() > MAX_KEY_LEN {
            return Err(TextError::KeyTooLong { index });
        }
        if value.len() > MAX_VALUE_LEN {
            return Err(TextError::ValueTooLong { index });
        }
        pairs.push((key.to_owned(), value.to_owned()));
    }
    Ok(pairs)
}

/// Appends `key=value\0` for each pair (RFC 7143 §6.1).
pub fn encode(pairs: &[(&str, &str)], out: &mut Vec<u8>) {
    for (key, value) in pairs {
        out.extend_from_slice(key.as_bytes());
        out.push(b'=');
        out.extend_from_slice(value.as_bytes());
        out.push(0);
    }
}

/// RFC 7143 §13.21 SessionType.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionType {
    Discovery,
    Normal,
}

impl SessionType {
    /// Parses the SessionType value; `None` for anything else.
    pub fn from_value(value: &str) -> Option<Self> {
        match value {
            "Discovery" => Some(Self::Discovery),
            "Normal" => Some(Self::Normal),
            _ => None,
        }
    }
}

/// Negotiated operational parameters of a session (RFC 7143 §13), after login.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionParams {
    pub session_type: SessionType,
    pub initiator_name: String,
    pub initiator_alias: Option<String>,
    pub target_name: Option<String>,
    /// CRC32C chosen for headers.
    pub header_digest: bool,
    /// CRC32C chosen for data.
    pub data_digest: bool,
    /// What the initiator declared: max data segment WE may send.
    pub initiator_max_recv_data_segment_length: u32,
    /// What we declared: max data segment the initiator may send.
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

/// What the target is willing to do. The defaults suit a fast target: large segments and
/// bursts, InitialR2T=No and ImmediateData=Yes preferred, both digests accepted.
#[derive(Clone, Debug)]
pub struct TargetLimits {
    /// Declared to the initiator (RFC 7143 §13.12), 512..=2^24-1.
    pub max_recv_data_segment_length: u32,
    /// Upper bound offered for MaxBurstLength (§13.13), 512..=2^24-1.
    pub max_burst_length: u32,
    /// Upper bound offered for FirstBurstLength (§13.14), 512..=2^24-1.
    pub first_burst_length: u32,
    /// Upper bound for MaxOutstandingR2T (§13.17), 1..=65535.
    pub max_outstanding_r2t: u32,
    /// Accept HeaderDigest=CRC32C (None is always accepted).
    pub allow_header_digest: bool,
    /// Accept DataDigest=CRC32C (None is always accepted).
    pub allow_data_digest: bool,
    /// Our InitialR2T value (result is OR, §13.10).
    pub initial_r2t: bool,
    /// Our ImmediateData value (result is AND, §13.11).
    pub immediate_data: bool,
}

impl Default for TargetLimits {
    fn default() -> Self {
        Self {
            max_recv_data_segment_length: 262_144,
            max_burst_length: 1_048_576,
            first_burst_length: 262_144,
            max_outstanding_r2t: 8,
            allow_header_digest: true,
            allow_data_digest: true,
            initial_r2t: false,
            immediate_data: true,
        }
    }
}

impl TargetLimits {
    /// Checks every field against its RFC 7143 range; the message names the field and range.
    pub fn validate(&self) -> Result<(), String> {
        let lengths = [
            ("max_recv_data_segment_length", self.max_recv_data_segment_length),
            ("max_burst_length", self.max_burst_length),
            ("first_burst_length", self.first_burst_length),
        ];
        for (name, value) in lengths {
            if !(MIN_SEGMENT_LENGTH..=MAX_SEGMENT_LENGTH).contains(&value) {
                return Err(format!(
                    "{name} = {value} is outside {MIN_SEGMENT_LENGTH}..={MAX_SEGMENT_LENGTH} (RFC 7143 §13)"
                ));
            }
        }
        if !(1..=65535).contains(&self.max_outstanding_r2t) {
            return Err(format!(
                "max_outstanding_r2t = {} is outside 1..=65535 (RFC 7143 §13.17)",
                self.max_outstanding_r2t
            ));
        }
        Ok(())
    }
}

/// One target of a SendTargets answer (RFC 7143 §12.3, Appendix C).
pub struct SendTarget {
    pub name: String,
    /// `("127.0.0.1:3260" or "[::1]:3260", tpgt)`.
    pub addresses: Vec<(String, u16)>,
}

/// SendTargets response text: `TargetName=..\0TargetAddress=ip:port,tpgt\0...`.
pub fn send_targets_response(targets: &[SendTarget]) -> Vec<u8> {
    let mut out = Vec::new();
    for target in targets {
        encode(&[("TargetName", &target.name)], &mut out);
        for (address, tpgt) in &target.addresses {
            let value = format!("{address},{tpgt}");
            encode(&[("TargetAddress", &value)], &mut out);
        }
    }
    out
}

/// Why operational negotiation failed as a whole (the login fails with initiator error 0x0200,
/// RFC 7143 §6.2). Always caused by the initiator.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NegotiationError {
    /// A key offered or declared a second time during the login (RFC 7143 §6.2).
    #[error("key {0} sent twice")]
    Duplicate(String),
    /// MaxRecvDataSegmentLength that is not a number in 512..=2^24-1: a declaration cannot be
    /// answered with Reject (our own declaration of the same key shares the response).
    #[error("invalid MaxRecvDataSegmentLength {0:?}")]
    InvalidMaxRecvDataSegmentLength(String),
}

/// Constant answers of RFC 7143 §6.2.
const REJECT: &str = "Reject";
const IRRELEVANT: &str = "Irrelevant";
const NOT_UNDERSTOOD: &str = "NotUnderstood";
const YES: &str = "Yes";
const NO: &str = "No";

/// Our side of the numeric keys whose value is not part of [`TargetLimits`].
const TARGET_DEFAULT_TIME2WAIT: u16 = 2;
const TARGET_DEFAULT_TIME2RETAIN: u16 = 20;
const TARGET_ERROR_RECOVERY_LEVEL: u8 = 0;
const TARGET_MAX_CONNECTIONS: u16 = 1;
/// DataPDUInOrder and DataSequenceInOrder: we only handle in-order data.
const TARGET_IN_ORDER: bool = true;

/// Operational key negotiation for one login, target side.
#[derive(Clone, Debug)]
pub struct Negotiator {
    limits: TargetLimits,
    session_type: SessionType,
    params: SessionParams,
    /// Every operational key negotiated so far in this login (RFC 7143 §6.2: once each).
    seen: BTreeSet<String>,
    /// Whether we have sent our MaxRecvDataSegmentLength declaration.
    declared: bool,
}

impl Negotiator {
    /// Starts with every parameter at its RFC 7143 §13 default.
    pub fn new(
        limits: TargetLimits,
        session_type: SessionType,
        initiator_name: String,
        initiator_alias: Option<String>,
        target_name: Option<String>,
    ) -> Self {
        let params = SessionParams {
            session_type,
            initiator_name,
            initiator_alias,
            target_name,
            header_digest: false,
            data_digest: false,
            initiator_max_recv_data_segment_length: DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH,
            target_max_recv_data_segment_length: DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH,
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
        };
        Self {
            limits,
            session_type,
            params,
            seen: BTreeSet::new(),
            declared: false,
        }
    }

    /// Answers one request's operational keys, in request order; keys that need no answer
    /// (declarations) produce nothing. The caller has already removed login-only keys and
    /// checked duplicates within the request.
    pub fn respond(&mut self, pairs: &[(String, String)]) -> Result<Vec<(String, String)>, NegotiationError> {
        let mut answers: Vec<(String, String)> = Vec::new();
        // FirstBurstLength depends on InitialR2T, ImmediateData and MaxBurstLength, which may
        // come later in the same request: answer it after the others (RFC 7143 §13.14).
        let mut first_burst: Option<(usize, String)> = None;
        for (key, value) in pairs {
            if !self.seen.insert(key.clone()) {
                return Err(NegotiationError::Duplicate(key.clone()));
            }
            if key == "FirstBurstLength" {
                first_burst = Some((answers.len(), value.clone()));
                answers.push((key.clone(), String::new()));
                continue;
            }
            if let Some(answer) = self.answer(key, value)? {
                answers.push((key.clone(), answer));
            }
        }
        if let Some((slot, value)) = first_burst {
            answers[slot].1 = self.answer_first_burst(&value);
        }
        // FirstBurstLength never exceeds MaxBurstLength (RFC 7143 §13.14), also when only one
        // of them was offered.
        self.params.first_burst_length = self.params.first_burst_length.min(self.params.max_burst_length);
        Ok(answers)
    }

    /// Our declarations for the first operational-stage response: MaxRecvDataSegmentLength
    /// (RFC 7143 §13.12). Empty after the first call.
    pub fn declarations(&mut self) -> Vec<(String, String)> {
        if self.declared {
            return Vec::new();
        }
        self.declared = true;
        self.params.target_max_recv_data_segment_length = self.limits.max_recv_data_segment_length;
        vec![(
            "MaxRecvDataSegmentLength".to_owned(),
            self.limits.max_recv_data_segment_length.to_string(),
        )]
    }

    /// The parameters as negotiated so far.
    pub fn params(&self) -> &SessionParams {
        &self.params
    }

    /// The negotiated parameters.
    pub fn into_params(self) -> SessionParams {
        self.params
    }

    fn discovery(&self) -> bool {
        self.session_type == SessionType::Discovery
    }

    fn answer(&mut self, key: &str, value: &str) -> Result<Option<String>, NegotiationError> {
        // Keys RFC 7143 §13 says are irrelevant to a discovery session.
        const NORMAL_ONLY: [&str; 8] = [
            "MaxBurstLength",
            "FirstBurstLength",
            "InitialR2T",
            "ImmediateData",
            "MaxOutstandingR2T",
            "MaxConnections",
            "DataPDUInOrder",
            "DataSequenceInOrder",
        ];
        if self.discovery() && NORMAL_ONLY.contains(&key) {
            return Ok(Some(IRRELEVANT.to_owned()));
        }
        let p = &mut self.params;
        let answer = match key {
            "HeaderDigest" => {
                let choice = choose_digest(value, self.limits.allow_header_digest);
                p.header_digest = choice == Some("CRC32C");
                choice.unwrap_or(REJECT).to_owned()
            }
            "DataDigest" => {
                let choice = choose_digest(value, self.limits.allow_data_digest);
                p.data_digest = choice == Some("CRC32C");
                choice.unwrap_or(REJECT).to_owned()
            }
            "MaxRecvDataSegmentLength" => {
                let n = parse_number(value)
                    .and_then(|n| u32::try_from(n).ok())
                    .filter(|n| (MIN_SEGMENT_LENGTH..=MAX_SEGMENT_LENGTH).contains(n))
                    .ok_or_else(|| NegotiationError::InvalidMaxRecvDataSegmentLength(value.to_owned()))?;
                p.initiator_max_recv_data_segment_length = n;
                return Ok(None);
            }
            "MaxBurstLength" => numeric_min(
                value,
                MIN_SEGMENT_LENGTH.into(),
                MAX_SEGMENT_LENGTH.into(),
                self.limits.max_burst_length.into(),
                |n| p.max_burst_length = n as u32,
            ),
            "InitialR2T" => boolean(value, |offered| {
                p.initial_r2t = offered || self.limits.initial_r2t;
                p.initial_r2t
            }),
            "ImmediateData" => boolean(value, |offered| {
                p.immediate_data = offered && self.limits.immediate_data;
                p.immediate_data
            }),
            "MaxOutstandingR2T" => numeric_min(value, 1, 65535, self.limits.max_outstanding_r2t.into(), |n| {
                p.max_outstanding_r2t = n as u32
            }),
            "MaxConnections" => numeric_min(value, 1, 65535, TARGET_MAX_CONNECTIONS.into(), |n| {
                p.max_connections = n as u16
            }),
            // RFC 7143 §13.19, §13.20: result function OR; we want in-order delivery.
            "DataPDUInOrder" => boolean(value, |offered| {
                p.data_pdu_in_order = offered || TARGET_IN_ORDER;
                p.data_pdu_in_order
            }),
            "DataSequenceInOrder" => boolean(value, |offered| {
                p.data_sequence_in_order = offered || TARGET_IN_ORDER;
                p.data_sequence_in_order
            }),
            "DefaultTime2Wait" => match parse_number(value).filter(|n| *n <= 3600) {
                Some(n) => {
                    let result = (n as u16).max(TARGET_DEFAULT_TIME2WAIT);
                    p.default_time2wait = result;
                    result.to_string()
                }
                None => REJECT.to_owned(),
            },
            "DefaultTime2Retain" => numeric_min(value, 0, 3600, TARGET_DEFAULT_TIME2RETAIN.into(), |n| {
                p.default_time2retain = n as u16
            }),
            "ErrorRecoveryLevel" => numeric_min(value, 0, 2, TARGET_ERROR_RECOVERY_LEVEL.into(), |n| {
                p.error_recovery_level = n as u8
            }),
            // RFC 7143 §13.25: obsolete marker keys; "No" is the answer RFC 3720 initiators
            // understand, the interval keys get Reject.
            "IFMarker" | "OFMarker" | "RDMAExtensions" => NO.to_owned(),
            "IFMarkInt" | "OFMarkInt" => REJECT.to_owned(),
            // RFC 7143 §13.23: we only do what RFC 3720 described.
            "TaskReporting" => {
                if value.split(',').any(|v| v == "RFC3720") {
                    "RFC3720".to_owned()
                } else {
                    REJECT.to_owned()
                }
            }
            // Keys only a target may send, or only valid in full-feature phase.
            "TargetAlias" | "TargetPortalGroupTag" | "TargetAddress" | "SendTargets" => REJECT.to_owned(),
            _ => NOT_UNDERSTOOD.to_owned(),
        };
        Ok(Some(answer))
    }

    fn answer_first_burst(&mut self, value: &str) -> String {
        if self.discovery() {
            return IRRELEVANT.to_owned();
        }
        let p = &mut self.params;
        // RFC 7143 §13.14: irrelevant when InitialR2T=Yes and ImmediateData=No.
        if p.initial_r2t && !p.immediate_data {
            return IRRELEVANT.to_owned();
        }
        let ours = self.limits.first_burst_length.min(p.max_burst_length);
        numeric_min(
            value,
            MIN_SEGMENT_LENGTH.into(),
            MAX_SEGMENT_LENGTH.into(),
            ours.into(),
            |n| p.first_burst_length = n as u32,
        )
    }
}

/// RFC 7143 §6.2 list negotiation for HeaderDigest/DataDigest: the first value the initiator
/// lists that we support.
fn choose_digest(offer: &str, allow_crc: bool) -> Option<&'static str> {
    offer.split(',').find_map(|v| match v {
        "None" => Some("None"),
        "CRC32C" if allow_crc => Some("CRC32C"),
        _ => None,
    })
}

/// RFC 7143 §6.2: a boolean answer, or Reject for anything but Yes/No.
fn boolean(value: &str, apply: impl FnOnce(bool) -> bool) -> String {
    let offered = match value {
        "Yes" => true,
        "No" => false,
        _ => return REJECT.to_owned(),
    };
    if apply(offered) { YES } else { NO }.to_owned()
}

/// RFC 7143 §6.2 numeric negotiation with result function "minimum"; out-of-range or malformed
/// values are answered with Reject and leave the default in place.
fn numeric_min(value: &str, lo: u64, hi: u64, ours: u64, apply: impl FnOnce(u64)) -> String {
    match parse_number(value).filter(|n| (lo..=hi).contains(n)) {
        Some(n) => {
            let result = n.min(ours);
            apply(result);
            result.to_string()
        }
        None => REJECT.to_owned(),
    }
}

/// RFC 7143 §6.1 numerical value: a decimal constant or a `0x` hex constant, at most 64 bits.
pub fn parse_number(value: &str) -> Option<u64> {
    let (digits, radix) = match value.strip_prefix("0x").or_else(|| value.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (value, 10),
    };
    // from_str_radix accepts a leading '+', the RFC does not.
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn normal() -> Negotiator {
        Negotiator::new(
            TargetLimits::default(),
            SessionType::Normal,
            "iqn.i".into(),
            None,
            Some("iqn.t".into()),
        )
    }

    #[test]
    fn parse_pairs_padding_and_missing_final_nul() {
        // RFC 7143 §6.1: key=value pairs, each NUL-terminated; the data segment is padded.
        assert_eq!(parse(b"A=1\0B=x=y\0\0\0").unwrap(), pairs(&[("A", "1"), ("B", "x=y")]));
        assert_eq!(parse(b"A=1\0B=2").unwrap(), pairs(&[("A", "1"), ("B", "2")]));
        assert_eq!(parse(b"A=\0").unwrap(), pairs(&[("A", "")]));
        assert_eq!(parse(b"").unwrap(), Vec::new());
        assert_eq!(parse(b"\0\0\0\0").unwrap(), Vec::new());
    }

    #[test]
    fn parse_malformed() {
        assert_eq!(parse(b"A=1\0B\0"), Err(TextError::MissingEquals { index: 1 }));
        assert_eq!(parse(b"=1\0"), Err(TextError::EmptyKey { index: 0 }));
        assert_eq!(parse(b"A=\xff\0"), Err(TextError::NotUtf8 { index: 0 }));
        let long_key = format!("{}=1", "K".repeat(MAX_KEY_LEN + 1));
        assert_eq!(parse(long_key.as_bytes()), Err(TextError::KeyTooLong { index: 0 }));
        let ok_key = format!("{}=1", "K".repeat(MAX_KEY_LEN));
        assert!(parse(ok_key.as_bytes()).is_ok());
        let long_value = format!("K={}", "v".repeat(MAX_VALUE_LEN + 1));
        assert_eq!(parse(long_value.as_bytes()), Err(TextError::ValueTooLong { index: 0 }));
        let many = "A=1\0".repeat(MAX_PAIRS + 1);
        assert_eq!(parse(many.as_bytes()), Err(TextError::TooManyPairs));
        let max = "A=1\0".repeat(MAX_PAIRS);
        assert_eq!(parse(max.as_bytes()).unwrap().len(), MAX_PAIRS);
    }

    #[test]
    fn encode_exact_bytes() {
        let mut out = Vec::new();
        encode(&[("HeaderDigest", "None"), ("MaxBurstLength", "512")], &mut out);
        assert_eq!(out, b"HeaderDigest=None\0MaxBurstLength=512\0");
    }

    #[test]
    fn send_targets_exact_bytes() {
        // RFC 7143 Appendix C: TargetName then its TargetAddress lines, IPv6 in brackets.
        let text = send_targets_response(&[
            SendTarget {
                name: "iqn.2026-01.raftsan:disk1".into(),
                addresses: vec![("127.0.0.1:3260".into(), 1), ("[::1]:3260".into(), 2)],
            },
            SendTarget {
                name: "iqn.2026-01.raftsan:disk2".into(),
                addresses: vec![],
            },
        ]);
        assert_eq!(
            text,
            b"TargetName=iqn.2026-01.raftsan:disk1\0TargetAddress=127.0.0.1:3260,1\0\
TargetAddress=[::1]:3260,2\0TargetName=iqn.2026-01.raftsan:disk2\0"
        );
    }

    #[test]
    fn numbers_decimal_and_hex() {
        // RFC 7143 §6.1 numerical values.
        assert_eq!(parse_number("512"), Some(512));
        assert_eq!(parse_number("0x200"), Some(512));
        assert_eq!(parse_number("0X1f"), Some(31));
        assert_eq!(parse_number("+5"), None);
        assert_eq!(parse_number(""), None);
        assert_eq!(parse_number("0x"), None);
        assert_eq!(parse_number("99999999999999999999999"), None);
    }

    #[test]
    fn open_iscsi_operational_offer() {
        // The operational-stage offer of Linux open-iscsi (RFC 7143 §6.2, §13 result functions).
        let mut n = normal();
        let answers = n
            .respond(&pairs(&[
                ("HeaderDigest", "None,CRC32C"),
                ("DataDigest", "CRC32C,None"),
                ("MaxRecvDataSegmentLength", "262144"),
                ("MaxBurstLength", "16776192"),
                ("FirstBurstLength", "262144"),
                ("DefaultTime2Wait", "0"),
                ("DefaultTime2Retain", "0"),
                ("IFMarker", "No"),
                ("OFMarker", "No"),
                ("ErrorRecoveryLevel", "0"),
                ("InitialR2T", "No"),
                ("ImmediateData", "Yes"),
                ("MaxConnections", "1"),
                ("MaxOutstandingR2T", "1"),
                ("DataPDUInOrder", "Yes"),
                ("DataSequenceInOrder", "Yes"),
            ]))
            .unwrap();
        assert_eq!(
            answers,
            pairs(&[
                ("HeaderDigest", "None"),
                ("DataDigest", "CRC32C"),
                ("MaxBurstLength", "1048576"),
                ("FirstBurstLength", "262144"),
                ("DefaultTime2Wait", "2"),
                ("DefaultTime2Retain", "0"),
                ("IFMarker", "No"),
                ("OFMarker", "No"),
                ("ErrorRecoveryLevel", "0"),
                ("InitialR2T", "No"),
                ("ImmediateData", "Yes"),
                ("MaxConnections", "1"),
                ("MaxOutstandingR2T", "1"),
                ("DataPDUInOrder", "Yes"),
                ("DataSequenceInOrder", "Yes"),
            ])
        );
        assert_eq!(n.declarations(), pairs(&[("MaxRecvDataSegmentLength", "262144")]));
        assert!(n.declarations().is_empty());
        let p = n.into_params();
        assert!(!p.header_digest && p.data_digest);
        assert_eq!(p.initiator_max_recv_data_segment_length, 262_144);
        assert_eq!(p.target_max_recv_data_segment_length, 262_144);
        assert_eq!((p.max_burst_length, p.first_burst_length), (1_048_576, 262_144));
        assert_eq!((p.default_time2wait, p.default_time2retain), (2, 0));
        assert!(!p.initial_r2t && p.immediate_data);
        assert_eq!((p.max_outstanding_r2t, p.max_connections), (1, 1));
    }

    #[test]
    fn result_functions_min_max_and_or() {
        // RFC 7143 §13.10 InitialR2T OR, §13.11 ImmediateData AND, §13.17 min, §13.15 max.
        let limits = TargetLimits {
            initial_r2t: true,
            immediate_data: false,
            ..TargetLimits::default()
        };
        let mut n = Negotiator::new(limits, SessionType::Normal, "i".into(), None, None);
        let answers = n
            .respond(&pairs(&[
                ("InitialR2T", "No"),
                ("ImmediateData", "Yes"),
                ("MaxOutstandingR2T", "64"),
                ("DefaultTime2Wait", "10"),
                ("DefaultTime2Retain", "3600"),
                ("MaxConnections", "8"),
                ("ErrorRecoveryLevel", "2"),
                ("MaxBurstLength", "4096"),
            ]))
            .unwrap();
        assert_eq!(
            answers,
            pairs(&[
                ("InitialR2T", "Yes"),
                ("ImmediateData", "No"),
                ("MaxOutstandingR2T", "8"),
                ("DefaultTime2Wait", "10"),
                ("DefaultTime2Retain", "20"),
                ("MaxConnections", "1"),
                ("ErrorRecoveryLevel", "0"),
                ("MaxBurstLength", "4096"),
            ])
        );
        let p = n.params();
        // FirstBurstLength not offered: default 65536 clamped to MaxBurstLength (§13.14).
        assert_eq!(p.first_burst_length, 4096);
        assert_eq!(p.max_outstanding_r2t, 8);
    }

    #[test]
    fn first_burst_irrelevant_and_clamped() {
        // RFC 7143 §13.14: irrelevant when InitialR2T=Yes and ImmediateData=No, even when
        // those keys come after it in the request.
        let mut n = normal();
        let answers = n
            .respond(&pairs(&[
                ("FirstBurstLength", "65536"),
                ("InitialR2T", "Yes"),
                ("ImmediateData", "No"),
            ]))
            .unwrap();
        assert_eq!(answers[0], ("FirstBurstLength".into(), "Irrelevant".into()));

        // FirstBurstLength never above MaxBurstLength.
        let mut n = normal();
        let answers = n
            .respond(&pairs(&[("FirstBurstLength", "262144"), ("MaxBurstLength", "8192")]))
            .unwrap();
        assert_eq!(
            answers,
            pairs(&[("FirstBurstLength", "8192"), ("MaxBurstLength", "8192")])
        );
    }

    #[test]
    fn reject_not_understood_and_digests() {
        // RFC 7143 §6.2: out-of-range → Reject; unknown and X- keys → NotUnderstood.
        let mut n = normal();
        let answers = n
            .respond(&pairs(&[
                ("MaxBurstLength", "100"),
                ("FirstBurstLength", "abc"),
                ("MaxOutstandingR2T", "0"),
                ("InitialR2T", "Maybe"),
                ("ErrorRecoveryLevel", "3"),
                ("DefaultTime2Wait", "3601"),
                ("X-com.example.Foo", "1"),
                ("X#Bar", "1"),
                ("NoSuchKey", "1"),
                ("HeaderDigest", "MD5"),
                ("DataDigest", "MD5,CRC32C"),
                ("OFMarkInt", "2048~8192"),
            ]))
            .unwrap();
        assert_eq!(
            answers,
            pairs(&[
                ("MaxBurstLength", "Reject"),
                ("FirstBurstLength", "Reject"),
                ("MaxOutstandingR2T", "Reject"),
                ("InitialR2T", "Reject"),
                ("ErrorRecoveryLevel", "Reject"),
                ("DefaultTime2Wait", "Reject"),
                ("X-com.example.Foo", "NotUnderstood"),
                ("X#Bar", "NotUnderstood"),
                ("NoSuchKey", "NotUnderstood"),
                ("HeaderDigest", "Reject"),
                ("DataDigest", "CRC32C"),
                ("OFMarkInt", "Reject"),
            ])
        );
        // Rejected values keep the defaults.
        assert_eq!(n.params().max_burst_length, 262_144);
        assert!(n.params().initial_r2t);

        // Digests the target does not allow are skipped in the list.
        let limits = TargetLimits {
            allow_header_digest: false,
            ..TargetLimits::default()
        };
        let mut n = Negotiator::new(limits, SessionType::Normal, "i".into(), None, None);
        let answers = n.respond(&pairs(&[("HeaderDigest", "CRC32C,None")])).unwrap();
        assert_eq!(answers, pairs(&[("HeaderDigest", "None")]));
    }

    #[test]
    fn duplicates_and_bad_declarations_fail() {
        // RFC 7143 §6.2: a key negotiated twice in one login is an initiator error.
        let mut n = normal();
        n.respond(&pairs(&[("MaxBurstLength", "4096")])).unwrap();
        assert_eq!(
            n.respond(&pairs(&[("MaxBurstLength", "4096")])),
            Err(NegotiationError::Duplicate("MaxBurstLength".into()))
        );
        let mut n = normal();
        assert_eq!(
            n.respond(&pairs(&[("MaxRecvDataSegmentLength", "511")])),
            Err(NegotiationError::InvalidMaxRecvDataSegmentLength("511".into()))
        );
    }

    #[test]
    fn discovery_irrelevant_keys() {
        // RFC 7143 §13: burst, R2T and ordering keys are irrelevant to discovery sessions.
        let mut n = Negotiator::new(TargetLimits::default(), SessionType::Discovery, "i".into(), None, None);
        let answers = n
            .respond(&pairs(&[
                ("HeaderDigest", "None"),
                ("MaxRecvDataSegmentLength", "32768"),
                ("MaxBurstLength", "262144"),
                ("FirstBurstLength", "65536"),
                ("InitialR2T", "Yes"),
                ("DefaultTime2Retain", "0"),
            ]))
            .unwrap();
        assert_eq!(
            answers,
            pairs(&[
                ("HeaderDigest", "None"),
                ("MaxBurstLength", "Irrelevant"),
                ("FirstBurstLength", "Irrelevant"),
                ("InitialR2T", "Irrelevant"),
                ("DefaultTime2Retain", "0"),
            ])
        );
        assert_eq!(n.params().initiator_max_recv_data_segment_length, 32768);
    }

    #[test]
    fn limits_validate() {
        assert!(TargetLimits::default().validate().is_ok());
        let bad = TargetLimits {
            max_burst_length: 1 << 24,
            ..TargetLimits::default()
        };
        assert!(bad.validate().unwrap_err().contains("max_burst_length"));
    }

    proptest! {
        #[test]
        fn parse_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse(&data);
        }

        #[test]
        fn parse_roundtrips_encode(
            list in proptest::collection::vec(("[A-Za-z][A-Za-z0-9.#_-]{0,20}", "[ -~]{0,40}"), 0..20)
        ) {
            let refs: Vec<(&str, &str)> = list.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let mut out = Vec::new();
            encode(&refs, &mut out);
            prop_assert_eq!(parse(&out).unwrap(), list);
        }

        #[test]
        fn respond_never_panics(list in proptest::collection::vec(("[A-Za-z]{1,24}", "[ -~]{0,24}"), 0..30)) {
            let mut n = normal();
            let _ = n.respond(&list);
            let p = n.params();
            prop_assert!(p.first_burst_length <= p.max_burst_length);
        }
    }
}
