//! Metric handles for the I/O path, registered once per logical unit and per portal through the
//! `metrics` facade, so recording on the hot path is an atomic update: no lookup, no lock, no
//! allocation per command. Without an installed recorder every handle is a no-op.
//!
//! Names (Prometheus conventions, base units):
//! * `raftsan_scsi_command_duration_seconds{target,lun,op}` histogram
//! * `raftsan_scsi_commands_total{target,lun,op}` counter
//! * `raftsan_scsi_bytes_total{target,lun,direction="read"|"write"}` counter
//! * `raftsan_scsi_commands_in_flight{target,lun}` gauge
//! * `raftsan_scsi_check_conditions_total{target,lun,sense_key}` counter, `sense_key` the SPC-4
//!   name in snake_case (see [`SENSE_KEYS`])
//! * `raftsan_iscsi_sessions` gauge, `raftsan_iscsi_logins_total{outcome}` counter with `outcome`
//!   one of ok, auth_failure, acl_denied, protocol_error; `raftsan_iscsi_connections_refused_total`
//!   counter, `raftsan_iscsi_protocol_errors_total` counter
//! * `raftsan_storage_errors_total{op="read"|"write"|"flush"}` counter: failed backing-store I/O
//!   (never fencing, which is a leadership change), through [`storage_error`].
//!
//! Every series whose label set is known up front is registered when the portal or target is
//! opened, so it is exported at 0 before the first event.

use metrics::{
    Counter, Gauge, Histogram, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};

/// Registers the help text of the I/O-path metrics (the `# HELP` lines). Idempotent.
pub fn describe() {
    describe_gauge!("raftsan_up", "1 while the raftsan process runs.");
    describe_gauge!("raftsan_build_info", "1, with the version as a label.");
    describe_histogram!(
        "raftsan_scsi_command_duration_seconds",
        "SCSI command latency from receipt to completion, by target, LUN and op."
    );
    describe_counter!(
        "raftsan_scsi_commands_total",
        "SCSI commands completed, by target, LUN and op."
    );
    describe_counter!(
        "raftsan_scsi_bytes_total",
        "Data bytes moved by SCSI commands, by direction."
    );
    describe_gauge!("raftsan_scsi_commands_in_flight", "SCSI commands executing now.");
    describe_counter!(
        "raftsan_scsi_check_conditions_total",
        "Commands completed with CHECK CONDITION, by SPC-4 sense key."
    );
    describe_gauge!("raftsan_iscsi_sessions", "iSCSI sessions (normal and discovery) now.");
    describe_counter!(
        "raftsan_iscsi_logins_total",
        "iSCSI logins by outcome (ok, auth_failure, acl_denied, protocol_error)."
    );
    describe_counter!(
        "raftsan_iscsi_connections_refused_total",
        "TCP connections refused because of the connection limit."
    );
    describe_counter!(
        "raftsan_iscsi_protocol_errors_total",
        "iSCSI protocol violations by initiators (rejects, malformed PDUs)."
    );
    describe_counter!(
        "raftsan_storage_errors_total",
        "Failed backing-store or Raft-storage operations, by op (read, write, flush)."
    );
}

/// The operation classes latency is reported by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read = 0,
    Write = 1,
    Flush = 2,
    Unmap = 3,
    Other = 4,
}

const OPS: [(Op, &str); 5] = [
    (Op::Read, "read"),
    (Op::Write, "write"),
    (Op::Flush, "flush"),
    (Op::Unmap, "unmap"),
    (Op::Other, "other"),
];

impl Op {
    /// Classifies a CDB by its operation code (SBC-3 opcodes).
    pub fn of(cdb: &[u8]) -> Op {
        match cdb.first() {
            Some(0x08 | 0x28 | 0xa8 | 0x88) => Op::Read,
            Some(0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e | 0x89) => Op::Write,
            Some(0x35 | 0x91) => Op::Flush,
            Some(0x42) => Op::Unmap,
            // WRITE SAME with the UNMAP bit deallocates; without it, it writes.
            Some(0x41 | 0x93) => {
                if cdb.get(1).is_some_and(|b| b & 0x08 != 0) {
                    Op::Unmap
                } else {
                    Op::Write
                }
            }
            _ => Op::Other,
        }
    }
}

/// The handles of one logical unit.
pub struct LunHandles {
    pub duration: [Histogram; 5],
    pub commands: [Counter; 5],
    pub read_bytes: Counter,
    pub write_bytes: Counter,
    pub in_flight: Gauge,
    /// Indexed by [`sense_key_index`].
    pub check_conditions: [Counter; SENSE_KEYS.len()],
}

impl LunHandles {
    /// Counts one CHECK CONDITION by the sense key in `sense` (fixed or descriptor format).
    pub fn check_condition(&self, sense: Option<&[u8]>) {
        self.check_conditions[sense_key_index(sense)].increment(1);
    }
}

/// The sense-key label values (SPC-4 §4.5.6 table 28, snake_case); the keys a target does not
/// report as errors (NO SENSE, RECOVERED ERROR, BLANK CHECK, ...) and missing sense count as
/// `other`.
pub const SENSE_KEYS: [&str; 9] = [
    "not_ready",
    "medium_error",
    "hardware_error",
    "illegal_request",
    "unit_attention",
    "data_protect",
    "aborted_command",
    "miscompare",
    "other",
];

/// The sense key of encoded sense data: byte 2 of fixed format (0x70/0x71, SPC-4 §4.5.3), byte 1
/// of descriptor format (0x72/0x73, §4.5.2); low nibble.
pub fn sense_key(sense: &[u8]) -> Option<u8> {
    match sense.first().map(|b| b & 0x7f) {
        Some(0x70 | 0x71) => sense.get(2).map(|b| b & 0x0f),
        Some(0x72 | 0x73) => sense.get(1).map(|b| b & 0x0f),
        _ => None,
    }
}

/// The index into [`SENSE_KEYS`] for `sense`.
pub fn sense_key_index(sense: Option<&[u8]>) -> usize {
    use raftsan_proto::scsi::sense::key;
    match sense.and_then(sense_key) {
        Some(key::NOT_READY) => 0,
        Some(key::MEDIUM_ERROR) => 1,
        Some(key::HARDWARE_ERROR) => 2,
        Some(key::ILLEGAL_REQUEST) => 3,
        Some(key::UNIT_ATTENTION) => 4,
        Some(key::DATA_PROTECT) => 5,
        Some(key::ABORTED_COMMAND) => 6,
        Some(key::MISCOMPARE) => 7,
        _ => 8,
    }
}

/// Handles for every LU of one target, built once when the target is opened. A target has a
/// handful of LUNs: a sorted vector searched per command, no hashing.
pub struct LuMetrics {
    luns: Vec<(u64, LunHandles)>,
    unknown: LunHandles,
}

impl LuMetrics {
    pub fn new(target: &str, luns: impl Iterator<Item = u64>) -> Self {
        let make = |lun: String| {
            let t = target.to_string();
            LunHandles {
                duration: OPS.map(|(_, op)| {
                    histogram!("raftsan_scsi_command_duration_seconds", "target" => t.clone(), "lun" => lun.clone(), "op" => op)
                }),
                commands: OPS.map(|(_, op)| {
                    counter!("raftsan_scsi_commands_total", "target" => t.clone(), "lun" => lun.clone(), "op" => op)
                }),
                read_bytes: counter!("raftsan_scsi_bytes_total", "target" => t.clone(), "lun" => lun.clone(), "direction" => "read"),
                write_bytes: counter!("raftsan_scsi_bytes_total", "target" => t.clone(), "lun" => lun.clone(), "direction" => "write"),
                in_flight: gauge!("raftsan_scsi_commands_in_flight", "target" => t.clone(), "lun" => lun.clone()),
                check_conditions: SENSE_KEYS.map(|k| {
                    counter!("raftsan_scsi_check_conditions_total", "target" => t.clone(), "lun" => lun.clone(), "sense_key" => k)
                }),
            }
        };
        // LUN 0 is the controller; it exists on every target.
        let mut ids: Vec<u64> = std::iter::once(0).chain(luns).collect();
        ids.sort_unstable();
        ids.dedup();
        let luns = ids.into_iter().map(|l| (l, make(l.to_string()))).collect();
        LuMetrics {
            luns,
            unknown: make("unknown".into()),
        }
    }

    pub fn lun(&self, lun: u64) -> &LunHandles {
        match self.luns.binary_search_by_key(&lun, |(l, _)| *l) {
            Ok(i) => &self.luns[i].1,
            Err(_) => &self.unknown,
        }
    }
}

/// The backing-store operation a storage error happened in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageOp {
    Read,
    Write,
    Flush,
}

impl StorageOp {
    pub const ALL: [StorageOp; 3] = [StorageOp::Read, StorageOp::Write, StorageOp::Flush];

    pub fn label(self) -> &'static str {
        match self {
            StorageOp::Read => "read",
            StorageOp::Write => "write",
            StorageOp::Flush => "flush",
        }
    }
}

/// Counts one failed backing-store or Raft-storage operation in
/// `raftsan_storage_errors_total{op}`. Errors are rare: the handle is looked up per call (static
/// labels, no allocation), which also makes it work whenever the recorder was installed.
pub fn storage_error(op: StorageOp) {
    counter!("raftsan_storage_errors_total", "op" => op.label()).increment(1);
}

/// Registers `raftsan_storage_errors_total` for every op, so it is exported at 0.
pub fn register_storage_errors() {
    for op in StorageOp::ALL {
        counter!("raftsan_storage_errors_total", "op" => op.label()).absolute(0);
    }
}

/// Portal-wide handles.
pub struct PortalMetrics {
    pub sessions: Gauge,
    pub connections_refused: Counter,
    pub protocol_errors: Counter,
    pub login_ok: Counter,
    pub login_auth_failure: Counter,
    pub login_acl_denied: Counter,
    /// The target name is unknown here (status 0x0203). Counted as `protocol_error`: an
    /// initiator error that is neither authentication nor authorization, and the outcome label
    /// keeps its four documented values.
    pub login_not_found: Counter,
    pub login_protocol_error: Counter,
}

impl PortalMetrics {
    pub fn new() -> Self {
        let login = |outcome: &'static str| counter!("raftsan_iscsi_logins_total", "outcome" => outcome);
        describe();
        register_storage_errors();
        PortalMetrics {
            sessions: gauge!("raftsan_iscsi_sessions"),
            connections_refused: counter!("raftsan_iscsi_connections_refused_total"),
            protocol_errors: counter!("raftsan_iscsi_protocol_errors_total"),
            login_ok: login("ok"),
            login_auth_failure: login("auth_failure"),
            login_acl_denied: login("acl_denied"),
            login_not_found: login("protocol_error"),
            login_protocol_error: login("protocol_error"),
        }
    }
}

impl Default for PortalMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_classes() {
        assert_eq!(Op::of(&[0x28]), Op::Read);
        assert_eq!(Op::of(&[0x8a]), Op::Write);
        assert_eq!(Op::of(&[0x35]), Op::Flush);
        assert_eq!(Op::of(&[0x42]), Op::Unmap);
        assert_eq!(Op::of(&[0x93, 0x08]), Op::Unmap);
        assert_eq!(Op::of(&[0x93, 0x00]), Op::Write);
        assert_eq!(Op::of(&[0x12]), Op::Other);
        assert_eq!(Op::of(&[]), Op::Other);
    }

    #[test]
    fn sense_keys_of_both_formats() {
        use raftsan_proto::scsi::sense::{Sense, SenseCode, key};
        let code = SenseCode::new(key::UNIT_ATTENTION, 0x29, 0x00);
        let fixed = Sense::from(code).encode_fixed();
        let desc = Sense::from(code).encode_descriptor();
        assert_eq!(sense_key(&fixed), Some(key::UNIT_ATTENTION));
        assert_eq!(sense_key(&desc), Some(key::UNIT_ATTENTION));
        assert_eq!(SENSE_KEYS[sense_key_index(Some(&fixed))], "unit_attention");
        assert_eq!(
            SENSE_KEYS[sense_key_index(Some(&[0x72, 0x05, 0x24, 0]))],
            "illegal_request"
        );
        assert_eq!(SENSE_KEYS[sense_key_index(Some(&[0x70, 0, 0x0e]))], "miscompare");
        assert_eq!(SENSE_KEYS[sense_key_index(Some(&[0x70, 0, 0x00]))], "other");
        assert_eq!(SENSE_KEYS[sense_key_index(None)], "other");
        assert_eq!(SENSE_KEYS[sense_key_index(Some(&[]))], "other");
    }

    #[test]
    fn lun_lookup_falls_back_to_unknown() {
        let m = LuMetrics::new("iqn.x", [3, 1].into_iter());
        assert!(std::ptr::eq(m.lun(1), &m.luns[1].1));
        assert!(std::ptr::eq(m.lun(3), &m.luns[2].1));
        assert!(std::ptr::eq(m.lun(2), &m.unknown));
    }
}
