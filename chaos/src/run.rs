//! One chaos run: a three-node cluster, a volume, `raftsan-initiator attach` with its NBD export,
//! the workload through it, and a seeded schedule of faults and heals. At the end everything is
//! healed, the workload stops, every written block is read back and judged, the replicas are
//! compared, and the node logs are checked.
//!
//! The members start as nodes 1-3; `replace-node` ([`crate::replace`]) swaps one for a new node
//! (4, 5, ...), and everything after it (the faults' victims, status queries, the heal and
//! convergence waits, the direct workload's portals, the replica comparison) uses the members
//! of the moment.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use raftsan_tests::cluster::{Cluster, applied_index, group_leader};
use raftsan_tests::initiator::{Attach, write_config};
use raftsan_tests::{Kind, Scratch, check_log};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::watch;

use crate::durability::{self, FlushCheck};
use crate::faults::{self, FaultKind};
use crate::iscsi::{Direct, IscsiConfig, IscsiFigures, IscsiTarget};
use crate::nbd::NbdClient;
use crate::netem::{self, Backend};
use crate::stale::{self, StaleOutcome};
use crate::workload::{self, Shared, WorkloadConfig, max_latency_where};

#[derive(Clone, Debug)]
pub struct RunConfig {
    pub seed: u64,
    /// Faults keep coming until this much time has passed (at least one of each kind first when
    /// `every_fault`).
    pub duration: Duration,
    pub every_fault: bool,
    /// The kinds the schedule draws from (every kind unless `--only` narrows it).
    pub kinds: Vec<FaultKind>,
    pub workload: WorkloadConfig,
    /// JSON report.
    pub out: Option<PathBuf>,
    /// A stall over its kind's budget fails the run (otherwise it is reported only).
    pub enforce_stall_budgets: bool,
}

/// One injection and what it cost.
#[derive(Clone, Debug, Serialize)]
pub struct Injection {
    pub kind: FaultKind,
    pub victim: u64,
    pub at_s: f64,
    pub hold_s: f64,
    /// Longest client operation through the initiator overlapping the fault (and 2 s after its
    /// heal).
    pub stall_ms: f64,
    /// The same over the direct iSCSI workers' operations (no multipath: a command stuck on a
    /// dead portal waits for the session's command timeout).
    pub direct_stall_ms: f64,
    /// From injection to a new leader reported by a surviving node (leader faults).
    pub new_leader_ms: Option<f64>,
    /// From heal until every node applied everything the leader committed (`replace-node`:
    /// from the start of the add until the new node was a caught-up voter).
    pub resync_ms: Option<f64>,
    /// `replace-node`: the node that joined (the removed one is `victim`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub added: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct KindFigures {
    pub injections: usize,
    pub stall_p50_ms: f64,
    pub stall_p99_ms: f64,
    pub stall_max_ms: f64,
    pub direct_stall_max_ms: f64,
    pub new_leader_max_ms: Option<f64>,
    pub resync_max_ms: Option<f64>,
    /// [`FaultKind::stall_budget`] (None: no budget).
    pub stall_budget_ms: Option<f64>,
    /// Injections whose client stall exceeded the budget.
    pub over_budget: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub seed: u64,
    pub duration_s: f64,
    pub writes_acked: u64,
    pub writes_failed: u64,
    pub reads_checked: u64,
    pub client_errors: Vec<String>,
    pub violations: Vec<String>,
    pub replicas_identical: bool,
    pub log_problems: Vec<String>,
    pub injections: Vec<Injection>,
    pub by_kind: BTreeMap<String, KindFigures>,
    /// How `netem-delay`/`netem-loss` degraded the path on this machine.
    pub netem_backend: Backend,
    /// Each `delayed-stale-write` check: the late write's outcome and what the block held after.
    pub stale_writes: Vec<StaleOutcome>,
    /// The direct iSCSI workload ([`crate::iscsi`]).
    pub direct: Option<IscsiFigures>,
    /// One per `kill-all-after-flush`.
    pub flush_checks: Vec<FlushCheck>,
    /// The cluster's members at the end (nodes 1-3 unless `replace-node` ran).
    pub members: Vec<u64>,
    /// Whether a stall over budget fails the run ([`RunConfig::enforce_stall_budgets`]).
    pub stall_budgets_enforced: bool,
}

impl Report {
    /// Invariants 1-4 of DESIGN.md, as verdicts.
    pub fn passed(&self) -> bool {
        let flushes_ok = self
            .flush_checks
            .iter()
            .all(|c| c.lost == 0 && c.checked == c.promised && (c.nbd_flush_ok || c.sync_cache_ok == Some(true)));
        flushes_ok
            && self.violations.is_empty()
            && self.client_errors.is_empty()
            && self.replicas_identical
            && self.log_problems.is_empty()
            && (!self.stall_budgets_enforced || self.stalls_within_budget())
    }

    /// Every injection's client stall within its kind's budget.
    pub fn stalls_within_budget(&self) -> bool {
        self.by_kind.values().all(|f| f.over_budget == 0)
    }

    pub fn print(&self) {
        println!("chaos run: seed {} ({:.0} s)", self.seed, self.duration_s);
        if self.members != [1, 2, 3] {
            println!("  members at the end: nodes {:?}", self.members);
        }
        println!(
            "  workload (NBD and direct iSCSI): {} writes acknowledged, {} failed, {} reads checked",
            self.writes_acked, self.writes_failed, self.reads_checked
        );
        if let Some(d) = &self.direct {
            println!(
                "  direct iSCSI: {} writes acknowledged (per portal {:?}), {} failed, {} reads checked (per portal {:?}, {} after the run), \
                 {} unit attentions and {} not-ready retried, {} sessions broke, {} logins, {} SYNCHRONIZE CACHE",
                d.writes_acked,
                d.writes_per_portal,
                d.writes_failed,
                d.reads_checked,
                d.reads_per_portal,
                d.final_reads,
                d.retried_unit_attention,
                d.retried_not_ready,
                d.session_failures,
                d.logins,
                d.syncs
            );
        }
        println!(
            "  {:<24} {:>5} {:>10} {:>10} {:>10} {:>10} {:>12} {:>10} {:>8} {:>6}",
            "fault", "n", "stall p50", "p99", "max", "iscsi max", "new leader", "resync", "budget", "over"
        );
        for (k, f) in &self.by_kind {
            let opt = |v: Option<f64>| v.map(|v| format!("{v:.0} ms")).unwrap_or_else(|| "-".into());
            let budget = f
                .stall_budget_ms
                .map(|b| format!("{:.0} s", b / 1000.0))
                .unwrap_or_else(|| "-".into());
            println!(
                "  {:<24} {:>5} {:>7.0} ms {:>7.0} ms {:>7.0} ms {:>7.0} ms {:>12} {:>10} {:>8} {:>6}",
                k,
                f.injections,
                f.stall_p50_ms,
                f.stall_p99_ms,
                f.stall_max_ms,
                f.direct_stall_max_ms,
                opt(f.new_leader_max_ms),
                opt(f.resync_max_ms),
                budget,
                f.over_budget
            );
        }
        let verdict = |ok: bool| if ok { "ok" } else { "VIOLATED" };
        let over: Vec<String> = self
            .by_kind
            .iter()
            .filter(|(_, f)| f.over_budget > 0)
            .map(|(k, f)| format!("{k} {} of {}", f.over_budget, f.injections))
            .collect();
        println!(
            "  client stall within budget (1 s kill, 3 s hang or cut) {} ({}){}",
            if over.is_empty() { "ok" } else { "OVER" },
            if over.is_empty() {
                "every injection".to_string()
            } else {
                over.join(", ")
            },
            if self.stall_budgets_enforced {
                ""
            } else {
                "; reported, not enforced"
            }
        );
        if !self.flush_checks.is_empty() {
            let promised: usize = self.flush_checks.iter().map(|c| c.promised).sum();
            let checked: usize = self.flush_checks.iter().map(|c| c.checked).sum();
            let lost: usize = self.flush_checks.iter().map(|c| c.lost).sum();
            let flushed = self
                .flush_checks
                .iter()
                .all(|c| c.nbd_flush_ok || c.sync_cache_ok == Some(true));
            println!(
                "  invariant: flushed writes survive kill-all ...... {} ({lost} lost; {checked} of {promised} promised read back; {} kill-alls)",
                verdict(lost == 0 && checked == promised && flushed),
                self.flush_checks.len()
            );
        }
        let lost = self.violations.iter().filter(|v| !v.contains(": stale:")).count();
        let stale = self.violations.len() - lost;
        println!(
            "  invariant: no acknowledged write lost ........ {} ({lost})",
            verdict(lost == 0)
        );
        println!(
            "  invariant: no stale read ....................... {} ({stale})",
            verdict(stale == 0)
        );
        println!(
            "  invariant: replicas identical .................. {}",
            verdict(self.replicas_identical)
        );
        println!(
            "  invariant: no panic or unexpected ERROR ......... {}",
            verdict(self.log_problems.is_empty())
        );
        println!(
            "  client: I/O errors returned to the client ...... {} ({})",
            verdict(self.client_errors.is_empty()),
            self.client_errors.len()
        );
        let refused = self.stale_writes.iter().filter(|s| s.refused).count();
        println!(
            "  invariant: late stale write refused (2A/06) .... {} ({refused} of {})",
            verdict(refused == self.stale_writes.len()),
            self.stale_writes.len()
        );
        println!("  netem faults through: {}", self.netem_backend.name());
        for v in self.violations.iter().take(20) {
            println!("    violation: {v}");
        }
        for e in self.client_errors.iter().take(10) {
            println!("    client error: {e}");
        }
        for p in &self.log_problems {
            println!("    log: {p}");
        }
        println!(
            "  replay: raftsan-chaos run --seed {} --duration {}s",
            self.seed,
            self.duration_s.round()
        );
    }
}

/// Per fault kind: injections, stall percentiles, the longest direct stall, leader and resync
/// times, and how many stalls were over the kind's budget.
fn figures_by_kind(injections: &[Injection]) -> BTreeMap<String, KindFigures> {
    let mut by_kind = BTreeMap::new();
    for kind in FaultKind::ALL {
        let of: Vec<&Injection> = injections.iter().filter(|i| i.kind == kind).collect();
        if of.is_empty() {
            continue;
        }
        let direct_stall_max_ms = of.iter().map(|i| i.direct_stall_ms).fold(0.0, f64::max);
        let mut stalls: Vec<f64> = of.iter().map(|i| i.stall_ms).collect();
        stalls.sort_by(f64::total_cmp);
        let max_of = |f: &dyn Fn(&Injection) -> Option<f64>| of.iter().filter_map(|i| f(i)).reduce(f64::max);
        let budget = kind.stall_budget().map(|b| b.as_secs_f64() * 1000.0);
        by_kind.insert(
            kind.name().to_string(),
            KindFigures {
                injections: of.len(),
                stall_p50_ms: percentile(&stalls, 0.5),
                stall_p99_ms: percentile(&stalls, 0.99),
                stall_max_ms: stalls.last().copied().unwrap_or(0.0),
                direct_stall_max_ms,
                new_leader_max_ms: max_of(&|i| i.new_leader_ms),
                resync_max_ms: max_of(&|i| i.resync_ms),
                stall_budget_ms: budget,
                over_budget: budget.map_or(0, |b| stalls.iter().filter(|&&s| s > b).count()),
            },
        );
    }
    by_kind
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `raftsan status --json` through the first node in `order` that answers.
pub(crate) fn status(c: &Cluster, order: &[u64]) -> Option<Value> {
    for &id in order {
        if let Ok(out) = c.raftsan_on(id, &["status", "--json"])
            && out.success()
            && let Ok(v) = serde_json::from_str(&out.stdout)
        {
            return Some(v);
        }
    }
    None
}

/// The volume's leader as node `id` itself sees it (`raftsan status --local`: no fan-out, so a
/// hung node does not slow the answer).
pub(crate) fn local_leader(c: &Cluster, id: u64, group: u64) -> Option<u64> {
    let out = c.raftsan_on(id, &["status", "--json", "--local"]).ok()?;
    let v: Value = serde_json::from_str(&out.stdout).ok()?;
    group_leader(&v, group)
}

/// Waits until a leader exists, every member is reachable and has applied everything.
fn wait_healthy(c: &Cluster, members: &[u64], group: u64, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = status(c, members)
            && let Some(leader) = group_leader(&s, group)
        {
            let applied: Vec<Option<u64>> = members.iter().map(|&n| applied_index(&s, n, group)).collect();
            let reachable = s["nodes"]
                .as_array()
                .is_some_and(|a| a.iter().all(|n| n["reachable"] != false));
            let lead = applied_index(&s, leader, group);
            if reachable && applied.iter().all(|a| a.is_some() && *a == lead) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("the cluster did not become healthy within {within:?}");
        }
        thread::sleep(Duration::from_millis(200));
    }
}

pub fn run(cfg: RunConfig) -> Result<Report> {
    let t0 = Instant::now();
    println!(
        "chaos: seed {} (replay with --seed {}), starting a three-node cluster",
        cfg.seed, cfg.seed
    );
    let mut c = Cluster::start_configured(3, "", crate::disk::NODE_TOML)?;
    let (group, target, lun) = c.create_volume("chaos", "64M")?;
    // The members of the moment (replace-node changes them) and the next unused node id.
    let original: Vec<u64> = c.nodes.iter().map(|n| n.id).collect();
    let mut members = original.clone();
    let mut next_id = original.iter().max().copied().unwrap_or(0) + 1;
    wait_healthy(&c, &members, group, Duration::from_secs(60))?;
    let scratch = Scratch::new()?;
    let dir = scratch.path().to_path_buf();
    let icfg = write_config(
        &dir,
        "iqn.2026-11.org.raftsan.chaos:client",
        "[timeouts]\nnoop_interval = \"500ms\"\nnoop_timeout = \"1s\"\ncommand = \"5s\"\nno_path_retry = \"60s\"",
    )?;
    // Every original portal: SendTargets through any of them finds the others (and nodes added
    // later), so the client keeps a path when node 1 is replaced.
    let portals: Vec<String> = original
        .iter()
        .map(|&n| Ok(c.node(n)?.portal().to_string()))
        .collect::<Result<_>>()?;
    let lun_s = lun.to_string();
    let mut attach = Attach::start(
        &dir,
        &icfg,
        &target,
        &portals,
        &["--lun", &lun_s],
        Duration::from_secs(30),
    )?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = Arc::new(rt.block_on(NbdClient::connect(&attach.socket))?);
    let shared = Shared::new();
    // Oracle times are seconds since this instant (to match them with the node logs).
    let epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    println!("chaos: oracle time 0 is unix time {epoch:.3}");
    let (stop_tx, stop_rx) = watch::channel(false);
    let workload = rt.spawn(workload::run(
        client.clone(),
        shared.clone(),
        cfg.workload.clone(),
        cfg.seed,
        stop_rx.clone(),
    ));
    // The direct iSCSI workers: their own sessions to every portal, their own block range.
    let direct_target = IscsiTarget {
        iqn: target.clone(),
        lun,
        portals: original
            .iter()
            .map(|&n| Ok(std::net::SocketAddr::V4(c.node(n)?.portal())))
            .collect::<Result<_>>()?,
        initiator_name: "iqn.2026-11.org.raftsan.chaos:direct".into(),
    };
    let direct = rt.block_on(Direct::connect(direct_target, IscsiConfig::default()))?;
    let direct_workload = rt.spawn(direct.clone().run(shared.clone(), cfg.seed, stop_rx));
    let mut flush_checks = Vec::new();

    let mut rng = StdRng::seed_from_u64(cfg.seed);
    netem::set_seed(cfg.seed);
    let mut queue: Vec<FaultKind> = Vec::new();
    let kinds = if cfg.kinds.is_empty() {
        FaultKind::ALL.to_vec()
    } else {
        cfg.kinds.clone()
    };
    if cfg.every_fault {
        queue = kinds.clone();
        queue.shuffle(&mut rng);
    }
    let mut injections = Vec::new();
    thread::sleep(Duration::from_secs(2));
    while !queue.is_empty() || t0.elapsed() < cfg.duration {
        let kind = if queue.is_empty() {
            kinds[rng.random_range(0..kinds.len())]
        } else {
            queue.remove(0)
        };
        let hold = faults::hold(kind, rng.random::<f64>());
        let s = status(&c, &members).context("no node answers status")?;
        let leader = group_leader(&s, group).context("no leader before the fault")?;
        let others: Vec<u64> = members.iter().copied().filter(|&n| n != leader).collect();
        let follower = others[rng.random_range(0..others.len())];
        if kind == FaultKind::KillTwoInTurn {
            // First the follower, healed, then the leader below.
            let first = faults::inject(&mut c, FaultKind::KillFollower, leader, follower)?;
            thread::sleep(hold / 2);
            first.heal(&mut c)?;
            wait_healthy(&c, &members, group, Duration::from_secs(60))?;
        }
        let victim = match kind {
            FaultKind::ReplaceNode => {
                crate::replace::choose_victim(&members, &original, leader, |n| rng.random_range(0..n))
            }
            _ if kind.hits_follower() => follower,
            _ => leader,
        };
        let who = match kind {
            FaultKind::KillAllAfterFlush => "every node".to_string(),
            FaultKind::ReplaceNode => format!("node {victim} (by new node {next_id})"),
            _ => format!("node {victim}"),
        };
        println!(
            "[{:>6.1} s] {} on {who} for {:.1} s",
            t0.elapsed().as_secs_f64(),
            kind.name(),
            hold.as_secs_f64()
        );
        let flush = (kind == FaultKind::KillAllAfterFlush)
            .then(|| rt.block_on(durability::flush_point(&client, Some(&direct), &shared)));
        let at_ns = shared.now_ns();
        let mut added = None;
        let mut resync_ms = None;
        let injected = match kind {
            FaultKind::DelayedStaleWrite => {
                let s = stale::StaleWrite::begin(&c, &members, rt.handle(), &shared, &target, lun, group, leader)?;
                faults::Injected::Stale(Box::new(s))
            }
            FaultKind::ReplaceNode => {
                let r = crate::replace::Replacement::begin(&mut c, &members, next_id, victim, group)?;
                next_id += 1;
                added = Some(r.added);
                resync_ms = Some(r.caught_up_ms);
                members.push(r.added);
                rt.block_on(direct.add_portal(std::net::SocketAddr::V4(c.node(r.added)?.portal())));
                println!(
                    "          node {} is a caught-up voter after {:.0} ms",
                    r.added, r.caught_up_ms
                );
                faults::Injected::Replace(r)
            }
            _ => faults::inject(&mut c, kind, leader, follower)?,
        };
        // replace-node: the hold (four members serving I/O) starts once the new node caught up.
        let t_inj = Instant::now();
        let mut new_leader_ms = None;
        let survivors: Vec<u64> = members.iter().copied().filter(|&n| n != victim).collect();
        while t_inj.elapsed() < hold {
            if kind.hits_leader()
                && new_leader_ms.is_none()
                && survivors
                    .iter()
                    .any(|&n| local_leader(&c, n, group).is_some_and(|l| l != victim))
            {
                new_leader_ms = Some(t_inj.elapsed().as_secs_f64() * 1e3);
            }
            thread::sleep(Duration::from_millis(50));
        }
        match injected {
            faults::Injected::Replace(r) => {
                let survivors = r.survivors().to_vec();
                let removed = r.finish(&mut c)?;
                rt.block_on(direct.retire_portal(std::net::SocketAddr::V4(c.node(victim)?.portal())));
                members = survivors;
                new_leader_ms = removed.new_leader_ms;
                println!(
                    "          node {victim} removed in {:.0} ms and stopped; members now {members:?}",
                    removed.remove_ms
                );
            }
            other => other.heal(&mut c)?,
        }
        let healed_ns = shared.now_ns();
        let t_heal = Instant::now();
        if flush.is_some() {
            new_leader_ms = durability::leader_after(&c, &members, group, t_inj, Duration::from_secs(60));
        }
        let healthy = wait_healthy(&c, &members, group, Duration::from_secs(90))
            .ok()
            .map(|()| t_heal.elapsed().as_secs_f64() * 1e3);
        // replace-node's resync is the new node's catch-up (measured above); the run still
        // waits for the members to converge.
        let resync_ms = if kind == FaultKind::ReplaceNode {
            resync_ms.filter(|_| healthy.is_some())
        } else {
            healthy
        };
        // Let operations caught by the fault finish before measuring their stall: the client
        // must have completed an operation it started after the heal (an operation still stuck
        // is not in the record yet), then 2 s more.
        workload::wait_progress(&shared, healed_ns, Duration::from_secs(60));
        thread::sleep(Duration::from_secs(2));
        let (stall_ns, direct_stall_ns) = {
            let r = shared.record.lock().unwrap_or_else(|e| e.into_inner());
            (
                max_latency_where(&r.ops, at_ns, healed_ns + 2_000_000_000, |o| !o.direct),
                max_latency_where(&r.ops, at_ns, healed_ns + 2_000_000_000, |o| o.direct),
            )
        };
        if let Some(point) = &flush {
            let mut check = rt.block_on(durability::verify(point, &client, &shared));
            let since_restart = t_inj.elapsed().as_secs_f64() * 1e3 - t_heal.elapsed().as_secs_f64() * 1e3;
            check.leader_after_restart_ms = new_leader_ms.map(|l| l - since_restart);
            println!(
                "          flush {:.0} ms (NBD {}, SYNCHRONIZE CACHE {:?}): {} of {} promised writes read back, {} lost",
                check.flush_ms,
                if check.nbd_flush_ok { "ok" } else { "FAILED" },
                check.sync_cache_ok,
                check.checked,
                check.promised,
                check.lost
            );
            flush_checks.push(check);
        }
        injections.push(Injection {
            kind,
            victim,
            at_s: at_ns as f64 / 1e9,
            hold_s: hold.as_secs_f64(),
            stall_ms: stall_ns as f64 / 1e6,
            direct_stall_ms: direct_stall_ns as f64 / 1e6,
            new_leader_ms,
            resync_ms,
            added,
        });
        println!(
            "          stall {:.0} ms, new leader {}, resync {}",
            stall_ns as f64 / 1e6,
            new_leader_ms
                .map(|v| format!("{v:.0} ms"))
                .unwrap_or_else(|| "-".into()),
            resync_ms
                .map(|v| format!("{v:.0} ms"))
                .unwrap_or_else(|| "NOT REACHED".into())
        );
    }

    // Heal is done; stop the workload, read everything back, compare replicas, check logs.
    stop_tx.send_replace(true);
    rt.block_on(async {
        let _ = workload.await;
        let _ = direct_workload.await;
    });
    wait_healthy(&c, &members, group, Duration::from_secs(90))?;
    let verified = rt.block_on(workload::verify_all(&client, &shared));
    println!("chaos: read back {verified} written blocks");
    let on_portals = rt.block_on(direct.verify_all_portals(&shared));
    println!(
        "chaos: {on_portals} reads of the direct iSCSI range's written blocks, on each of the {} members' portals",
        members.len()
    );
    rt.block_on(direct.logout());
    rt.block_on(client.disconnect());
    attach.stop()?;
    thread::sleep(Duration::from_secs(1));
    wait_healthy(&c, &members, group, Duration::from_secs(60))?;
    let shas: Vec<String> = members.iter().map(|&n| c.image_sha(n, group)).collect::<Result<_>>()?;
    let replicas_identical = shas.windows(2).all(|w| w[0] == w[1]);
    let mut log_problems = Vec::new();
    for n in &mut c.nodes {
        if let Err(e) = check_log(Kind::Raftsan, &n.log_text(), &n.expected_errors) {
            log_problems.push(format!("node {}: {e:#}", n.id));
        }
        // Judged here; the harness must not judge again when it drops the cluster.
        n.expected_errors.push(String::new());
    }
    // The initiator's log is gone with the scratch directory: keep it next to the report.
    if let Some(out) = &cfg.out {
        let _ = std::fs::write(out.with_extension("initiator.log"), attach.log_text());
    }
    if let Err(e) = check_log(Kind::Raftsan, &attach.log_text(), &[]) {
        log_problems.push(format!("initiator: {e:#}"));
    }

    let o = shared.oracle();
    let record = shared.record.lock().unwrap_or_else(|e| e.into_inner());
    // A failed run keeps the node logs next to the report (the cluster's directory goes away).
    if let Some(out) = &cfg.out
        && (!o.violations.is_empty() || !record.errors.is_empty())
    {
        for n in &c.nodes {
            let _ = std::fs::write(out.with_extension(format!("node{}.log", n.id)), n.log_text());
        }
    }
    let by_kind = figures_by_kind(&injections);
    let report = Report {
        seed: cfg.seed,
        duration_s: t0.elapsed().as_secs_f64(),
        writes_acked: o.writes_acked,
        writes_failed: o.writes_failed,
        reads_checked: o.reads_checked,
        client_errors: record.errors.clone(),
        violations: o.violations.iter().map(|v| v.to_string()).collect(),
        replicas_identical,
        log_problems,
        injections,
        by_kind,
        netem_backend: netem::backend(),
        stale_writes: stale::outcomes(),
        direct: Some(direct.figures()),
        flush_checks,
        members: members.clone(),
        stall_budgets_enforced: cfg.enforce_stall_budgets,
    };
    if let Some(out) = &cfg.out {
        std::fs::write(out, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn injection(kind: FaultKind, stall_ms: f64) -> Injection {
        Injection {
            kind,
            victim: 1,
            at_s: 0.0,
            hold_s: 1.0,
            stall_ms,
            direct_stall_ms: 0.0,
            new_leader_ms: None,
            resync_ms: None,
            added: None,
        }
    }

    fn report(injections: Vec<Injection>, enforced: bool) -> Report {
        Report {
            seed: 1,
            duration_s: 1.0,
            writes_acked: 1,
            writes_failed: 0,
            reads_checked: 1,
            client_errors: Vec::new(),
            violations: Vec::new(),
            replicas_identical: true,
            log_problems: Vec::new(),
            by_kind: figures_by_kind(&injections),
            injections,
            netem_backend: Backend::Iptables,
            stale_writes: Vec::new(),
            direct: None,
            flush_checks: Vec::new(),
            members: vec![1, 2, 3],
            stall_budgets_enforced: enforced,
        }
    }

    #[test]
    fn stalls_over_their_kinds_budget_are_counted_and_fail_only_an_enforcing_run() {
        let within = vec![
            injection(FaultKind::KillLeader, 900.0),
            injection(FaultKind::PartitionLeader, 2900.0),
            // No budget: the whole cluster is down by design.
            injection(FaultKind::KillAllAfterFlush, 9000.0),
        ];
        for enforced in [false, true] {
            let r = report(within.clone(), enforced);
            assert!(r.stalls_within_budget());
            assert!(r.passed());
        }

        let over = vec![
            injection(FaultKind::KillLeader, 900.0),
            injection(FaultKind::KillLeader, 1100.0),
            injection(FaultKind::PartitionLeader, 1100.0),
        ];
        let r = report(over.clone(), false);
        let kill = &r.by_kind["kill-leader"];
        assert_eq!(
            (kill.injections, kill.over_budget, kill.stall_budget_ms),
            (2, 1, Some(1000.0))
        );
        assert_eq!(r.by_kind["partition-leader"].over_budget, 0);
        assert!(!r.stalls_within_budget());
        assert!(r.passed(), "reported, not enforced");
        assert!(!report(over, true).passed());
    }
}
