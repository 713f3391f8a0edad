//! `raftsan-chaos run --seed N --duration 3m` (every fault kind at least once, then random ones
//! until the duration is up) and `raftsan-chaos soak --duration 4h`. Exit status 1 when an
//! invariant was violated.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use raftsan_chaos::faults::FaultKind;
use raftsan_chaos::run::{self, RunConfig};
use raftsan_chaos::workload::WorkloadConfig;

#[derive(Parser)]
#[command(
    name = "raftsan-chaos",
    version,
    about = "Kill, pause and partition raftsan nodes under I/O; check nothing is lost"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Every fault kind once (seeded order), then random faults until the duration is up.
    Run {
        /// Seed of the schedule (printed; the same seed replays the same schedule).
        #[arg(long)]
        seed: Option<u64>,
        /// "90s", "3m", "2h".
        #[arg(long, default_value = "3m", value_parser = parse_duration)]
        duration: Duration,
        /// JSON report.
        #[arg(long, default_value = "chaos-report.json")]
        out: PathBuf,
        /// Only these fault kinds (comma-separated or repeated, e.g. `--only replace-node`);
        /// every kind by default.
        #[arg(long, value_delimiter = ',', value_parser = parse_kind)]
        only: Vec<FaultKind>,
        /// Fail the run when a client stall exceeds its fault kind's budget (1 s for a node
        /// killed, 3 s for one hung or cut off); by default stalls are reported only.
        #[arg(long)]
        enforce_stall_budgets: bool,
    },
    /// Random faults for hours (no every-kind-first pass).
    Soak {
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        duration: Duration,
        #[arg(long, default_value = "chaos-soak.json")]
        out: PathBuf,
        /// Only these fault kinds (comma-separated or repeated); every kind by default.
        #[arg(long, value_delimiter = ',', value_parser = parse_kind)]
        only: Vec<FaultKind>,
        /// Fail the run when a client stall exceeds its fault kind's budget (1 s for a node
        /// killed, 3 s for one hung or cut off); by default stalls are reported only.
        #[arg(long)]
        enforce_stall_budgets: bool,
    },
}

fn parse_kind(s: &str) -> Result<FaultKind, String> {
    FaultKind::from_name(s).ok_or_else(|| {
        let names: Vec<&str> = FaultKind::ALL.iter().map(|k| k.name()).collect();
        format!("{s:?} is not a fault kind; the kinds are {}", names.join(", "))
    })
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a duration like 90s, 3m, 2h"))?;
    match unit {
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?}: the unit must be s, m or h")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let random_seed = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    };
    let cfg = match cli.cmd {
        Cmd::Run {
            seed,
            duration,
            out,
            only,
            enforce_stall_budgets,
        } => RunConfig {
            seed: seed.unwrap_or_else(random_seed),
            duration,
            every_fault: true,
            kinds: only,
            workload: WorkloadConfig::default(),
            out: Some(out),
            enforce_stall_budgets,
        },
        Cmd::Soak {
            seed,
            duration,
            out,
            only,
            enforce_stall_budgets,
        } => RunConfig {
            seed: seed.unwrap_or_else(random_seed),
            duration,
            every_fault: false,
            kinds: only,
            workload: WorkloadConfig::default(),
            out: Some(out),
            enforce_stall_budgets,
        },
    };
    match run::run(cfg) {
        Ok(report) => {
            report.print();
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("raftsan-chaos: {e:#}");
            ExitCode::from(2)
        }
    }
}
