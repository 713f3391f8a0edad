//! Metric handles for the I/O path, registered once per logical unit and per portal through the
//! `metrics` facade, so recording on the hot path is an atomic update: no lookup, no lock, no
//! allocation per command. Without an installed recorder every handle is a no-op.
//!
//! Names (Prometheus conventions, base units):
//! * `raftsan_scsi_command_duration_seconds{target,lun,op}` histogram
//! * `raftsan_scsi_commands_total{target,lun,op}` counter
//! * `raftsan_scsi_bytes_total{target,lun,direction="read"|"write"}` counter
//! * `raftsan_scsi_commands_in_flight{target,lun}` gauge
//! * `raftsan_scsi_check_conditions_total{target,lun}` counter
//! * `raftsan_iscsi_sessions` gauge, `raftsan_iscsi_logins_total{outcome}` counter,
//!   `raftsan_iscsi_connections_refused_total` counter, `raftsan_iscsi_protocol_errors_total`
//!   counter

use std::collections::HashMap;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

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
    pub check_conditions: Counter,
}

/// Handles for every LU of one target, built once when the target is opened.
pub struct LuMetrics {
    luns: HashMap<u64, LunHandles>,
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
                check_conditions: counter!("raftsan_scsi_check_conditions_total", "target" => t.clone(), "lun" => lun),
            }
        };
        // LUN 0 is the controller; it exists on every target.
        let luns = std::iter::once(0)
            .chain(luns)
            .map(|l| (l, make(l.to_string())))
            .collect();
        LuMetrics {
            luns,
            unknown: make("unknown".into()),
        }
    }

    pub fn lun(&self, lun: u64) -> &LunHandles {
        self.luns.get(&lun).unwrap_or(&self.unknown)
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
    pub login_not_found: Counter,
    pub login_protocol_error: Counter,
}

impl PortalMetrics {
    pub fn new() -> Self {
        let login = |outcome: &'static str| counter!("raftsan_iscsi_logins_total", "outcome" => outcome);
        PortalMetrics {
            sessions: gauge!("raftsan_iscsi_sessions"),
            connections_refused: counter!("raftsan_iscsi_connections_refused_total"),
            protocol_errors: counter!("raftsan_iscsi_protocol_errors_total"),
            login_ok: login("ok"),
            login_auth_failure: login("auth_failure"),
            login_acl_denied: login("acl_denied"),
            login_not_found: login("not_found"),
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
}
