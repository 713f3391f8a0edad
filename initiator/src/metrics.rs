//! Prometheus metrics of `raftsan-initiator attach`, through the `metrics` facade and
//! `metrics-exporter-prometheus` (as the `raftsan` node does). Handles are registered once per
//! target ([`TargetMetrics`]) and per NBD op ([`NbdMetrics`]), so recording on the I/O path is
//! an atomic update: no lookup, lock or allocation per request. Without an installed recorder
//! (no `[metrics] listen`, no `--metrics`) every handle is a no-op.
//!
//! Names (all `raftsan_initiator_`):
//! * `up` gauge 1, `build_info{version}` gauge 1;
//! * `path_up{target,portal}` gauge 0/1, `path_alua_state{target,portal}` gauge (SPC-4 code: 0
//!   active/optimized, 1 active/non-optimized, 2 standby, 3 unavailable, 14 offline, 15
//!   transitioning; -1 unknown), `usable_paths{target}` gauge — sampled once a second from
//!   [`Multipath::view`](crate::multipath::Multipath::view) by [`sample_paths`];
//! * `failovers_total{target}`, `retried_commands_total{target}` counters,
//!   `queued_commands{target}` gauge (commands waiting for a usable path now);
//! * `failover_stall_seconds{target}` histogram (1 ms .. 60 s): for every command that completed
//!   after at least one path failure, its time from first send to completion;
//! * `nbd_requests_total{op}`, `nbd_errors_total{op}` counters and
//!   `nbd_request_duration_seconds{op}` histogram (50 us .. 10 s), `op` one of read, write,
//!   flush, trim, write_zeroes.

use std::net::SocketAddr;
use std::time::Duration;

use metrics::{
    Counter, Gauge, Histogram, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};

use crate::multipath::{MultipathView, PathStatus};

/// Latency buckets of the NBD requests, 50 µs to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Failover stall buckets, 1 ms to 60 s.
pub const STALL_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
];

/// How often [`sample_paths`] runs.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Installs the Prometheus exporter with its HTTP listener on `addr` (`/metrics`) and sets the
/// process gauges. Call before any handle is registered (before `Multipath::start`).
pub fn install(addr: SocketAddr) -> anyhow::Result<()> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            Matcher::Full("raftsan_initiator_nbd_request_duration_seconds".into()),
            LATENCY_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full("raftsan_initiator_failover_stall_seconds".into()),
            STALL_BUCKETS,
        )?
        .install()?;
    describe();
    gauge!("raftsan_initiator_up").set(1.0);
    gauge!("raftsan_initiator_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(())
}

/// Registers the help text of every metric (the `# HELP` lines).
fn describe() {
    describe_gauge!("raftsan_initiator_up", "1 while the initiator runs.");
    describe_gauge!("raftsan_initiator_build_info", "1, with the version as a label.");
    describe_gauge!("raftsan_initiator_path_up", "1 when the path's session is up.");
    describe_gauge!(
        "raftsan_initiator_path_alua_state",
        "SPC-4 ALUA state code of the path (0 AO, 1 ANO, 2 standby, 3 unavailable, 14 offline, 15 transitioning, -1 unknown)."
    );
    describe_gauge!("raftsan_initiator_usable_paths", "Paths commands can be sent down now.");
    describe_counter!(
        "raftsan_initiator_failovers_total",
        "Path failures that moved commands to another path."
    );
    describe_counter!(
        "raftsan_initiator_retried_commands_total",
        "Commands sent again, on any path."
    );
    describe_gauge!(
        "raftsan_initiator_queued_commands",
        "Commands waiting for a usable path now."
    );
    describe_histogram!(
        "raftsan_initiator_failover_stall_seconds",
        "Time from first send to completion of commands that met at least one path failure."
    );
    describe_counter!("raftsan_initiator_nbd_requests_total", "NBD requests executed, by op.");
    describe_counter!(
        "raftsan_initiator_nbd_errors_total",
        "NBD requests answered with an error, by op."
    );
    describe_histogram!(
        "raftsan_initiator_nbd_request_duration_seconds",
        "NBD request latency on the device, by op."
    );
}

/// The handles of one multipath target.
pub struct TargetMetrics {
    pub failovers: Counter,
    pub retried: Counter,
    pub queued: Gauge,
    pub failover_stall: Histogram,
}

impl TargetMetrics {
    pub fn new(target: &str) -> Self {
        let t = target.to_string();
        let m = TargetMetrics {
            failovers: counter!("raftsan_initiator_failovers_total", "target" => t.clone()),
            retried: counter!("raftsan_initiator_retried_commands_total", "target" => t.clone()),
            queued: gauge!("raftsan_initiator_queued_commands", "target" => t.clone()),
            failover_stall: histogram!("raftsan_initiator_failover_stall_seconds", "target" => t),
        };
        m.failovers.absolute(0);
        m.retried.absolute(0);
        m.queued.set(0.0);
        m
    }
}

/// The NBD request classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NbdOp {
    Read = 0,
    Write = 1,
    Flush = 2,
    Trim = 3,
    WriteZeroes = 4,
}

const NBD_OPS: [&str; 5] = ["read", "write", "flush", "trim", "write_zeroes"];

/// The handles of the NBD export, per op.
pub struct NbdMetrics {
    requests: [Counter; 5],
    errors: [Counter; 5],
    duration: [Histogram; 5],
}

impl NbdMetrics {
    pub fn new() -> Self {
        let m = NbdMetrics {
            requests: NBD_OPS.map(|op| counter!("raftsan_initiator_nbd_requests_total", "op" => op)),
            errors: NBD_OPS.map(|op| counter!("raftsan_initiator_nbd_errors_total", "op" => op)),
            duration: NBD_OPS.map(|op| histogram!("raftsan_initiator_nbd_request_duration_seconds", "op" => op)),
        };
        for c in m.requests.iter().chain(&m.errors) {
            c.absolute(0);
        }
        m
    }

    /// Records one request that took `elapsed`; `failed` when its reply carries an error.
    pub fn record(&self, op: NbdOp, elapsed: Duration, failed: bool) {
        let i = op as usize;
        self.requests[i].increment(1);
        self.duration[i].record(elapsed.as_secs_f64());
        if failed {
            self.errors[i].increment(1);
        }
    }
}

impl Default for NbdMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The SPC-4 code of an access state as [`crate::scsi::AluaState::name`] spells it; -1 unknown.
pub fn alua_code(name: &str) -> f64 {
    match name {
        "active/optimized" => 0.0,
        "active/non-optimized" => 1.0,
        "standby" => 2.0,
        "unavailable" => 3.0,
        "offline" => 14.0,
        "transitioning" => 15.0,
        _ => -1.0,
    }
}

/// Sets the path gauges from a view of the device (once a second, off the I/O path).
pub fn sample_paths(view: &MultipathView) {
    let t = view.target.clone();
    gauge!("raftsan_initiator_usable_paths", "target" => t.clone()).set(view.usable_paths as f64);
    for p in &view.paths {
        let up = if p.status == PathStatus::Up { 1.0 } else { 0.0 };
        gauge!("raftsan_initiator_path_up", "target" => t.clone(), "portal" => p.portal.clone()).set(up);
        gauge!("raftsan_initiator_path_alua_state", "target" => t.clone(), "portal" => p.portal.clone())
            .set(alua_code(&p.alua));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::AluaState;

    #[test]
    fn alua_codes_follow_spc4() {
        for code in [0u8, 1, 2, 3, 0xe, 0xf] {
            assert_eq!(alua_code(AluaState::from_code(code).name()), f64::from(code));
        }
        assert_eq!(alua_code(AluaState::Unknown.name()), -1.0);
    }
}
