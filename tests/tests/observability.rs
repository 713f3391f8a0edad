//! The observability kit (grafana/) against the real daemons (issue 5).
//!
//! * `promtool check config` on grafana/prometheus/prometheus.yml, `promtool check rules` on
//!   alerts.yml and `promtool test rules` on alerts_test.yml.
//! * The dashboards are well formed: unique uids and panel ids, every panel has PromQL targets on
//!   the `${datasource}` variable, every `$variable` is defined and used only inside a regex
//!   matcher (`label=~"...$variable..."`), every alert has `for:`, a severity and a runbook.
//! * Live: a three-node cluster with a volume, `raftsan-initiator` attached with I/O through its
//!   NBD export. Every metric name any dashboard or alert uses must be in some daemon's
//!   `/metrics` (which must pass `promtool check metrics`); a real Prometheus, configured from
//!   the shipped prometheus.yml and alerts.yml, scrapes them and must return series for every
//!   dashboard expression and every alert's signal; then the volume's leader is killed and the
//!   node-down (`up == 0`, RaftsanNodeDown firing, its `for:` cut to 3 s) and failover signals
//!   must appear.
//!
//! How PromQL is extracted, without a YAML parser:
//! * dashboards: every panel target's `expr` (rows recursed) and every query variable
//!   (`label_values(SELECTOR, label)` gives SELECTOR, `query_result(EXPR)` gives EXPR);
//! * alerts.yml: the house rule is that every rule's `expr:` is one line of plain YAML of the form
//!   `<signal> <comparison> <number>`; the test reads those lines. For querying, Grafana's
//!   variables become concrete: `$__rate_interval` 15s, `$__interval` 5s, `$__range` 10m, a
//!   dashboard variable `.+`.
//!
//! * Ignored (opt-in): the dashboards match Grafana's own dashboard schema
//!   (tests/grafana-schema.sh).
//!
//! Missing `prometheus`/`promtool` fails the test naming the package, never skips it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use raftsan_tests::cluster::{Cluster, group_leader};
use raftsan_tests::initiator::{self, Attach};
use raftsan_tests::prometheus::{self, Prometheus, exported_names, http_get_ok, promtool, referenced_names};
use raftsan_tests::{Loopback, Scratch, run};
use serde_json::Value;

const INITIATOR: &str = "iqn.2026-11.org.raftsan.test:observability";
const DASHBOARDS: &[&str] = &["raftsan-cluster.json", "raftsan-volume.json", "raftsan-client.json"];
/// The alerts issue 5 asks for, plus the path-down warning.
const REQUIRED_ALERTS: &[&str] = &[
    "RaftsanNodeDown",
    "RaftsanVolumeWithoutLeader",
    "RaftsanReplicaLagging",
    "RaftsanLatencyP99High",
    "RaftsanLoginFailuresSpike",
    "RaftsanStorageError",
    "RaftsanClientNoUsablePath",
    "RaftsanClientPathDown",
];
/// Grafana's built-in interval variables and what the test queries them with.
const BUILTINS: &[(&str, &str)] = &[("__rate_interval", "15s"), ("__interval", "5s"), ("__range", "10m")];
/// RaftsanNodeDown's expression and `for:` as alerts.yml has them (the live test shortens `for:`).
const NODE_DOWN_RULE: &str = "expr: up{job=\"raftsan\"} == 0\n        for: 1m\n";
/// The client's metrics port on its reserved loopback address.
const CLIENT_METRICS_PORT: u16 = 9700;

fn grafana_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("grafana")
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// Extraction

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Panel,
    Variable,
    Alert,
}

/// One PromQL expression as written, with where it comes from.
#[derive(Debug, Clone)]
struct Query {
    origin: Origin,
    /// `dashboard.json: panel "title" target A`, `alerts.yml: RaftsanNodeDown`.
    place: String,
    expr: String,
    /// Variables the dashboard defines (empty for alerts).
    variables: BTreeSet<String>,
}

impl Query {
    /// The expression with Grafana variables made concrete (see the module doc).
    fn concrete(&self) -> String {
        let mut out = String::new();
        let mut rest = self.expr.as_str();
        while let Some(pos) = rest.find('$') {
            out.push_str(&rest[..pos]);
            let (name, len) = variable_at(&rest[pos..]);
            match BUILTINS.iter().find(|(builtin, _)| *builtin == name) {
                Some((_, value)) => out.push_str(value),
                None if name.is_empty() => out.push('$'),
                None => out.push_str(".+"),
            }
            rest = &rest[pos + len.max(1)..];
        }
        out.push_str(rest);
        out
    }

    /// For an alert, `<signal>` of `<signal> <op> <number>`; for the others the concrete expression.
    fn signal(&self) -> Result<String> {
        if self.origin != Origin::Alert {
            return Ok(self.concrete());
        }
        split_comparison(&self.expr)
            .map(|(signal, _)| signal.to_string())
            .ok_or_else(|| {
                anyhow!(
                    "{}: expr is not `<signal> <comparison> <number>`: {}",
                    self.place,
                    self.expr
                )
            })
    }
}

/// The variable name at the start of `text` (`$name` or `${name}` or `${name:format}`) and the
/// length of its reference; an empty name when `$` starts no reference.
fn variable_at(text: &str) -> (&str, usize) {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    if let Some(inner) = text.strip_prefix("${") {
        if let Some(close) = inner.find('}') {
            let name = inner[..close].split(':').next().unwrap_or_default();
            return (name, close + 3);
        }
        return ("", 1);
    }
    let tail = &text[1..];
    let len = tail.find(|c: char| !is_name(c)).unwrap_or(tail.len());
    (&tail[..len], len + 1)
}

/// Splits `<signal> <op> <number>` at its last top-level comparison.
fn split_comparison(expr: &str) -> Option<(&str, f64)> {
    let (pos, op) = [" >= ", " <= ", " == ", " != ", " > ", " < "]
        .iter()
        .filter_map(|op| expr.rfind(op).map(|pos| (pos, *op)))
        .max_by_key(|(pos, _)| *pos)?;
    let threshold = expr[pos + op.len()..].trim().parse::<f64>().ok()?;
    Some((expr[..pos].trim(), threshold))
}

/// Every PromQL expression of a dashboard (panel targets, query variables).
fn dashboard_queries(file: &str, dashboard: &Value) -> Result<Vec<Query>> {
    let mut variables = BTreeSet::new();
    let mut queries = Vec::new();
    let mut variable_queries = Vec::new();
    for var in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        let name = var["name"]
            .as_str()
            .ok_or_else(|| anyhow!("{file}: a variable has no name"))?;
        variables.insert(name.to_string());
        if var["type"] != "query" {
            continue;
        }
        let text = var["query"]["query"]
            .as_str()
            .or_else(|| var["query"].as_str())
            .ok_or_else(|| anyhow!("{file}: variable {name} has no query"))?;
        variable_queries.push((
            name.to_string(),
            variable_promql(text).with_context(|| format!("{file}: variable {name}"))?,
        ));
    }
    for (name, expr) in variable_queries {
        queries.push(Query {
            origin: Origin::Variable,
            place: format!("{file}: variable {name}"),
            expr,
            variables: variables.clone(),
        });
    }
    let mut panels = Vec::new();
    collect_panels(&dashboard["panels"], &mut panels);
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .ok_or_else(|| anyhow!("{file}: panel {title:?} has a target without expr"))?;
            queries.push(Query {
                origin: Origin::Panel,
                place: format!(
                    "{file}: panel {title:?} target {}",
                    target["refId"].as_str().unwrap_or("?")
                ),
                expr: expr.to_string(),
                variables: variables.clone(),
            });
        }
    }
    Ok(queries)
}

/// Non-row panels, rows' nested panels included.
fn collect_panels<'a>(panels: &'a Value, out: &mut Vec<&'a Value>) {
    for panel in panels.as_array().into_iter().flatten() {
        if panel["type"] == "row" {
            collect_panels(&panel["panels"], out);
        } else {
            out.push(panel);
        }
    }
}

/// The PromQL inside a Grafana Prometheus variable query.
fn variable_promql(text: &str) -> Result<String> {
    let text = text.trim();
    if let Some(inner) = text.strip_prefix("label_values(").and_then(|t| t.strip_suffix(')')) {
        let comma = inner
            .rfind(',')
            .ok_or_else(|| anyhow!("label_values() without a series selector: {text}"))?;
        let selector = inner[..comma].trim();
        ensure!(!selector.is_empty(), "label_values() without a series selector: {text}");
        return Ok(selector.to_string());
    }
    if let Some(inner) = text.strip_prefix("query_result(").and_then(|t| t.strip_suffix(')')) {
        return Ok(inner.trim().to_string());
    }
    bail!("unsupported variable query (use label_values(SELECTOR, label) or query_result(EXPR)): {text}")
}

/// One rule of alerts.yml as the line-based reader sees it.
#[derive(Debug, Default)]
struct Rule {
    name: String,
    expr: Option<String>,
    /// The rule's lines (for `for:`, labels and annotations).
    text: String,
}

/// The alerts of alerts.yml, by the house rule: `- alert: NAME` starts a rule, its `expr:` is one
/// line of plain YAML. A recording rule (`- record:`) would be checked the same way.
fn alert_rules(text: &str) -> Result<Vec<Rule>> {
    let mut rules: Vec<Rule> = Vec::new();
    let mut in_rule = false;
    for (number, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if let Some(name) = trimmed
            .strip_prefix("- alert:")
            .or_else(|| trimmed.strip_prefix("- record:"))
        {
            rules.push(Rule {
                name: name.trim().to_string(),
                ..Rule::default()
            });
            in_rule = true;
        } else if trimmed.starts_with("- name:") || trimmed.starts_with("groups:") {
            in_rule = false;
        }
        let Some(rule) = rules.last_mut().filter(|_| in_rule) else {
            continue;
        };
        rule.text.push_str(line);
        rule.text.push('\n');
        if let Some(expr) = trimmed.strip_prefix("expr:") {
            let expr = expr.trim();
            let line_no = number + 1;
            ensure!(
                rule.expr.is_none(),
                "alerts.yml:{line_no}: second expr in {}",
                rule.name
            );
            ensure!(
                !expr.is_empty() && !expr.starts_with(['|', '>', '\'', '"']) && !expr.contains(" #"),
                "alerts.yml:{line_no}: {}'s expr must be one line of plain YAML (no block scalar, quotes or ` #`)",
                rule.name
            );
            rule.expr = Some(expr.to_string());
        }
    }
    for rule in &rules {
        ensure!(rule.expr.is_some(), "alerts.yml: {} has no one-line expr", rule.name);
    }
    Ok(rules)
}

fn alert_queries(rules: &[Rule]) -> Vec<Query> {
    rules
        .iter()
        .filter_map(|rule| {
            Some(Query {
                origin: Origin::Alert,
                place: format!("alerts.yml: {}", rule.name),
                expr: rule.expr.clone()?,
                variables: BTreeSet::new(),
            })
        })
        .collect()
}

/// Every PromQL expression of the kit: dashboards then alerts.
fn all_queries() -> Result<Vec<Query>> {
    let mut queries = Vec::new();
    for file in DASHBOARDS {
        let text = read(&grafana_dir().join("dashboards").join(file))?;
        let dashboard: Value = serde_json::from_str(&text).with_context(|| format!("{file} is not JSON"))?;
        queries.extend(dashboard_queries(file, &dashboard)?);
    }
    let alerts = read(&grafana_dir().join("prometheus").join("alerts.yml"))?;
    queries.extend(alert_queries(&alert_rules(&alerts)?));
    Ok(queries)
}

/// Every `raftsan_` metric family the kit refers to, with the places that use it.
fn referenced(queries: &[Query]) -> BTreeMap<String, Vec<String>> {
    let mut names: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for q in queries {
        for name in referenced_names(&q.expr) {
            names.entry(name).or_default().push(q.place.clone());
        }
    }
    names
}

// ---------------------------------------------------------------------------------------------
// Static checks

fn promtool_ok(args: &[&str]) -> Result<String> {
    let out = promtool(args, None)?;
    ensure!(out.success(), "promtool {} failed:\n{}", args.join(" "), out.combined());
    Ok(out.stdout)
}

#[test]
fn promtool_accepts_the_config_and_every_alert_has_a_passing_unit_test() -> Result<()> {
    let dir = grafana_dir().join("prometheus");
    let path = |name: &str| dir.join(name).display().to_string();
    // The shipped config names its rule file relatively (to its own directory): check it in
    // place, which also loads and checks alerts.yml.
    let config = promtool_ok(&["check", "config", &path("prometheus.yml")])?;
    ensure!(
        config.contains("1 rule files found"),
        "prometheus.yml should load alerts.yml:\n{config}"
    );
    promtool_ok(&["check", "rules", &path("alerts.yml")])?;
    promtool_ok(&["test", "rules", &path("alerts_test.yml")])?;
    // promtool does not require a test per alert: every alert must appear in alerts_test.yml,
    // both firing (exp_alerts with labels) and silent (exp_alerts: []).
    let tests = read(&dir.join("alerts_test.yml"))?;
    let rules = alert_rules(&read(&dir.join("alerts.yml"))?)?;
    let mut untested = Vec::new();
    for rule in &rules {
        let cases: Vec<&str> = tests
            .split("- eval_time:")
            .filter(|case| case.contains(&format!("alertname: {}\n", rule.name)))
            .collect();
        let fires = cases.iter().any(|c| c.contains("exp_labels:"));
        let silent = cases.iter().any(|c| c.contains("exp_alerts: []"));
        if !fires || !silent {
            untested.push(format!("{} (fires: {fires}, silent: {silent})", rule.name));
        }
    }
    ensure!(
        untested.is_empty(),
        "alerts without a firing and a silent case in alerts_test.yml: {untested:?}"
    );
    Ok(())
}

#[test]
fn dashboards_and_alerts_are_well_formed() -> Result<()> {
    let mut problems = Vec::new();
    let mut uids = BTreeSet::new();
    for file in DASHBOARDS {
        let text = read(&grafana_dir().join("dashboards").join(file))?;
        let d: Value = serde_json::from_str(&text).with_context(|| format!("{file} is not JSON"))?;
        let uid = d["uid"].as_str().unwrap_or_default();
        if uid.is_empty() || !uids.insert(uid.to_string()) {
            problems.push(format!("{file}: missing or duplicate uid {uid:?}"));
        }
        if d["schemaVersion"].as_u64().unwrap_or(0) < 36 {
            problems.push(format!("{file}: schemaVersion {} < 36", d["schemaVersion"]));
        }
        if !d["tags"].as_array().is_some_and(|t| t.iter().any(|t| t == "raftsan")) {
            problems.push(format!(
                "{file}: no \"raftsan\" tag (the dashboards link each other by it)"
            ));
        }
        let has_ds_var = d["templating"]["list"]
            .as_array()
            .is_some_and(|l| l.iter().any(|v| v["name"] == "datasource" && v["type"] == "datasource"));
        if !has_ds_var {
            problems.push(format!("{file}: no `datasource` variable of type datasource"));
        }
        let mut ids = BTreeSet::new();
        let mut all = Vec::new();
        for panel in d["panels"].as_array().into_iter().flatten() {
            all.push(panel);
            all.extend(panel["panels"].as_array().into_iter().flatten());
        }
        for panel in all {
            let title = panel["title"].as_str().unwrap_or("(untitled)");
            if !panel["id"].as_u64().is_some_and(|id| ids.insert(id)) {
                problems.push(format!("{file}: panel {title:?} has a missing or duplicate id"));
            }
            if !panel["gridPos"]["w"].is_u64() || !panel["gridPos"]["h"].is_u64() {
                problems.push(format!("{file}: panel {title:?} has no gridPos"));
            }
            if panel["type"] == "row" {
                continue;
            }
            let targets = panel["targets"].as_array().cloned().unwrap_or_default();
            if targets.is_empty() {
                problems.push(format!("{file}: panel {title:?} has no target"));
            }
            for ds in std::iter::once(&panel["datasource"]).chain(targets.iter().map(|t| &t["datasource"])) {
                if ds["uid"] != "${datasource}" || ds["type"] != "prometheus" {
                    problems.push(format!(
                        "{file}: panel {title:?} datasource must be {{type: prometheus, uid: ${{datasource}}}}: {ds}"
                    ));
                }
            }
        }
    }
    let queries = all_queries()?;
    for q in &queries {
        if q.expr.trim().is_empty() {
            problems.push(format!("{}: empty expression", q.place));
        }
        problems.extend(variable_problems(q));
        if let Err(e) = q.signal() {
            problems.push(format!("{e:#}"));
        }
        if referenced_names(&q.expr).is_empty() && !q.expr.contains("up{job=") {
            problems.push(format!(
                "{}: names no raftsan metric and no job's up: {}",
                q.place, q.expr
            ));
        }
    }
    let text = read(&grafana_dir().join("prometheus").join("alerts.yml"))?;
    let rules = alert_rules(&text)?;
    let names: BTreeSet<&str> = rules.iter().map(|r| r.name.as_str()).collect();
    for required in REQUIRED_ALERTS {
        if !names.contains(required) {
            problems.push(format!("alerts.yml: no alert {required}"));
        }
    }
    for rule in &rules {
        for needle in [
            "for:",
            "severity:",
            "summary:",
            "description:",
            "runbook:",
            "raftsan status",
            "raftsan-initiator session -P 3",
        ] {
            if !rule.text.contains(needle) {
                problems.push(format!("alerts.yml: {} lacks {needle:?}", rule.name));
            }
        }
        if !rule.text.contains("severity: critical") && !rule.text.contains("severity: warning") {
            problems.push(format!(
                "alerts.yml: {} severity is neither critical nor warning",
                rule.name
            ));
        }
    }
    ensure!(
        problems.is_empty(),
        "{} problems:\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
    println!(
        "{} expressions ({} metric families) in {} dashboards and {} alerts",
        queries.len(),
        referenced(&queries).len(),
        DASHBOARDS.len(),
        rules.len()
    );
    Ok(())
}

/// Every dashboard matches Grafana's own dashboard schema (the `Dashboard` type of the npm package
/// @grafana/schema, as a JSON schema, relaxed to what Grafana accepts: see
/// tests/grafana-schema.sh). No Grafana server can be installed from the registries the project
/// reaches, so this is the nearest check to loading them. Ignored by default: the first run
/// fetches the schema from npm (cached in the build dir after). Run with
/// `cargo nextest run -p raftsan-tests --test observability --run-ignored all dashboards_match`.
#[test]
#[ignore = "needs npm (once) and python3 jsonschema"]
fn dashboards_match_the_grafana_schema() -> Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("grafana-schema.sh");
    let out = run(Command::new("bash").arg(&script), Duration::from_secs(600))?;
    let text = out.combined();
    ensure!(out.success(), "{} failed:\n{text}", script.display());
    for name in DASHBOARDS {
        ensure!(
            text.contains(&format!("{name}: 0 problem(s)")),
            "{name} not checked:\n{text}"
        );
    }
    Ok(())
}

/// A dashboard variable must be defined and used only inside a regex matcher's string
/// (`label=~"...$var..."`), so that "All" (`.+`) and multi-value (`a|b`) selections work.
fn variable_problems(q: &Query) -> Vec<String> {
    let mut problems = Vec::new();
    let mut offset = 0;
    while let Some(found) = q.expr[offset..].find('$') {
        let pos = offset + found;
        let (name, len) = variable_at(&q.expr[pos..]);
        offset = pos + len.max(1);
        if name.is_empty() || BUILTINS.iter().any(|(b, _)| *b == name) {
            continue;
        }
        if q.origin == Origin::Alert {
            problems.push(format!("{}: alert uses a variable ${name}", q.place));
            continue;
        }
        if !q.variables.contains(name) {
            problems.push(format!("{}: undefined variable ${name}", q.place));
        }
        let before = &q.expr[..pos];
        let in_regex = before.matches('"').count() % 2 == 1
            && before.rfind('"').is_some_and(|quote| before[..quote].ends_with("=~"));
        if !in_regex {
            problems.push(format!("{}: ${name} outside a `=~\"...\"` matcher", q.place));
        }
    }
    problems
}

#[test]
fn extraction_follows_the_house_rules() -> Result<()> {
    let rules = alert_rules(
        "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: up{job=\"raftsan\"} == 0\n        for: 1m\n",
    )?;
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].expr.as_deref(), Some("up{job=\"raftsan\"} == 0"));
    assert!(alert_rules("      - alert: B\n        expr: |\n          up == 0\n").is_err());
    let q = Query {
        origin: Origin::Alert,
        place: "t".into(),
        expr: "histogram_quantile(0.99, sum by (le) (rate(x_bucket[5m]))) > 0.1".into(),
        variables: BTreeSet::new(),
    };
    assert_eq!(
        q.signal()?,
        "histogram_quantile(0.99, sum by (le) (rate(x_bucket[5m])))"
    );
    let q = Query {
        origin: Origin::Panel,
        place: "t".into(),
        expr: "rate(x{a=~\"$v\", b=~\"p${w}\"}[$__rate_interval]) and y{c=\"$v\"}".into(),
        variables: ["v".to_string(), "w".to_string()].into(),
    };
    assert_eq!(q.concrete(), "rate(x{a=~\".+\", b=~\"p.+\"}[15s]) and y{c=\".+\"}");
    assert_eq!(variable_problems(&q).len(), 1, "{:?}", variable_problems(&q));
    assert_eq!(
        variable_promql("label_values(up{job=\"x\", a=~\"$b\"}, instance)")?,
        "up{job=\"x\", a=~\"$b\"}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Live

/// The shipped prometheus.yml with the test's addresses and a 1 s scrape/evaluation interval.
fn live_config(nodes: &[String], client: &str) -> Result<String> {
    let mut text = read(&grafana_dir().join("prometheus").join("prometheus.yml"))?;
    let mut replace = |from: &str, to: &str| -> Result<()> {
        ensure!(
            text.contains(from),
            "prometheus.yml no longer contains {from:?}; update the test"
        );
        text = text.replace(from, to);
        Ok(())
    };
    replace("scrape_interval: 5s", "scrape_interval: 1s")?;
    replace("scrape_timeout: 4s", "scrape_timeout: 1s")?;
    replace("evaluation_interval: 5s", "evaluation_interval: 1s")?;
    for (i, node) in nodes.iter().enumerate() {
        replace(&format!("sv{}:9520", i + 1), node)?;
    }
    replace("client1:9700", client)?;
    Ok(text)
}

/// Writes 8 MiB of random data through the NBD export and reads the whole export back (commands
/// read, write and flush).
fn drive_io(uri: &str, dir: &Path) -> Result<()> {
    let src = dir.join("io.img");
    let data: Vec<u8> = (0..8 * 1024 * 1024).map(|_| rand::random::<u8>()).collect();
    fs::write(&src, data)?;
    let src = src.display().to_string();
    for args in [vec!["--flush", src.as_str(), uri], vec![uri, "null:"]] {
        let out = run(Command::new("nbdcopy").args(&args), Duration::from_secs(120))?;
        ensure!(out.success(), "nbdcopy {args:?} failed:\n{}", out.combined());
    }
    Ok(())
}

/// Polls `ok` every 500 ms until it returns `Some`, or fails after `within` with `what`.
fn poll<T>(what: &str, within: Duration, mut ok: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + within;
    let mut last_err = String::new();
    loop {
        match ok() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!("timed out after {within:?} waiting for {what} {last_err}");
        }
        thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn prometheus_scrapes_a_live_cluster_and_answers_every_dashboard_and_alert_query() -> Result<()> {
    // Fail first, and clearly, when the package is missing.
    prometheus::tool("prometheus")?;
    prometheus::tool("promtool")?;
    let queries = all_queries()?;
    let wanted = referenced(&queries);
    let mut problems: Vec<String> = Vec::new();

    let mut c = Cluster::start(3)?;
    let (group, target, lun) = c.create_volume("obs", "64M")?;
    let portals: Vec<String> = (1..=3)
        .map(|id| Ok(c.node(id)?.portal().to_string()))
        .collect::<Result<_>>()?;
    let scratch = Scratch::new()?;
    let dir = scratch.path();
    let client_lo = Loopback::reserve()?;
    let client_metrics = format!("{}:{CLIENT_METRICS_PORT}", client_lo.ip());
    let cfg = initiator::write_config(
        dir,
        INITIATOR,
        &format!(
            "[timeouts]\nnoop_interval = \"500ms\"\nnoop_timeout = \"1s\"\ncommand = \"5s\"\nno_path_retry = \"30s\"\n\
             [metrics]\nlisten = \"{client_metrics}\""
        ),
    )?;
    let lun = lun.to_string();
    let attach = Attach::start(dir, &cfg, &target, &portals, &["--lun", &lun], Duration::from_secs(30))?;
    drive_io(&attach.uri(), dir)?;

    // 1. Every name the kit uses is exported by some daemon, whose exposition passes promtool.
    // The nodes sample Raft and ALUA state every second, so a gauge of the new volume may take
    // that long to appear after its group starts: scrape until every name is there (or 15 s).
    let mut endpoints: Vec<(String, String)> = Vec::new();
    for node in &c.nodes {
        endpoints.push((format!("node {}", node.id), node.metrics_url()));
    }
    endpoints.push(("raftsan-initiator".into(), format!("http://{client_metrics}/metrics")));
    let scraped = Instant::now();
    let (texts, missing, exported) = loop {
        let mut texts: Vec<(String, String, String)> = Vec::new();
        let mut exported = BTreeSet::new();
        for (who, url) in &endpoints {
            match http_get_ok(url) {
                Ok(text) => {
                    exported.extend(exported_names(&text));
                    texts.push((who.clone(), url.clone(), text));
                }
                Err(e) => problems.push(format!("{who}: cannot fetch {url}: {e:#}")),
            }
        }
        let missing: Vec<String> = wanted
            .iter()
            .filter(|(name, _)| !exported.contains(name.as_str()))
            .map(|(name, places)| format!("{name}  (used by {})", places.join("; ")))
            .collect();
        if missing.is_empty() || !problems.is_empty() || scraped.elapsed() > Duration::from_secs(15) {
            break (texts, missing, exported);
        }
        thread::sleep(Duration::from_millis(250));
    };
    println!("scraped the daemons for {:?} after the I/O", scraped.elapsed());
    for (who, url, text) in &texts {
        let check = promtool(&["check", "metrics"], Some(text))?;
        if !check.success() {
            let lint: Vec<&str> = check.stdout.lines().chain(check.stderr.lines()).collect();
            problems.push(format!(
                "promtool check metrics on {who} ({url}) exited {}: {}",
                check.status,
                lint.join("; ")
            ));
        }
    }
    if !missing.is_empty() {
        problems.push(format!(
            "{} metric names used by the dashboards/alerts are exported by no daemon:\n    {}",
            missing.len(),
            missing.join("\n    ")
        ));
    }

    // 2. A real Prometheus on the shipped config and rules answers every expression.
    let node_addrs: Vec<String> = c.nodes.iter().map(|n| format!("{}:9520", n.ip)).collect();
    let config = live_config(&node_addrs, &client_metrics)?;
    // RaftsanNodeDown waits 1 m before firing: the test shortens that to 3 s to see it fire.
    let alerts = read(&grafana_dir().join("prometheus").join("alerts.yml"))?;
    ensure!(
        alerts.contains(NODE_DOWN_RULE),
        "alerts.yml no longer contains {NODE_DOWN_RULE:?}; update the test"
    );
    let alerts = alerts.replace(NODE_DOWN_RULE, &NODE_DOWN_RULE.replace("for: 1m", "for: 3s"));
    let prom = Prometheus::start(&config, &[("alerts.yml", &alerts)])?;
    let live_config = prom.dir().join("prometheus.yml").display().to_string();
    if let Err(e) = promtool_ok(&["check", "config", &live_config]) {
        problems.push(format!("the test's Prometheus config: {e:#}"));
    }
    let targets_up = poll("every scrape target up", Duration::from_secs(30), || {
        let targets = prom.targets()?;
        Ok((targets.len() == 4 && targets.iter().all(|t| t.2 == "up")).then_some(()))
    });
    if let Err(e) = targets_up {
        problems.push(format!("{e:#}; targets: {:?}", prom.targets().unwrap_or_default()));
    }
    // More I/O now that Prometheus watches, so that rates and quantiles have two samples.
    drive_io(&attach.uri(), dir)?;
    thread::sleep(Duration::from_secs(3));
    let mut pending: Vec<(&Query, String)> = Vec::new();
    for q in &queries {
        match q.signal() {
            Ok(signal) => pending.push((q, signal)),
            Err(e) => problems.push(format!("{e:#}")),
        }
        if q.origin == Origin::Alert
            && let Err(e) = prom.query(&q.expr)
        {
            problems.push(format!(
                "{}: Prometheus rejects the rule's expression: {e:#}\n    {}",
                q.place, q.expr
            ));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut still = Vec::new();
        for (q, signal) in pending {
            match prom.query(&signal) {
                Ok(series) if !series.is_empty() => {}
                Ok(_) => still.push((q, signal)),
                Err(e) => problems.push(format!("{}: query error {e:#}\n    {signal}", q.place)),
            }
        }
        pending = still;
        if pending.is_empty() || Instant::now() > deadline {
            break;
        }
        thread::sleep(Duration::from_secs(1));
    }
    if !pending.is_empty() {
        let mut list = String::new();
        for (q, signal) in &pending {
            let _ = write!(list, "\n    {}: {signal}", q.place);
        }
        problems.push(format!(
            "{} of {} expressions returned no series after 30 s:{list}",
            pending.len(),
            queries.len()
        ));
    }

    // 3. Kill -9 the volume's leader: up == 0 for it, RaftsanNodeDown pending or firing, and a
    //    failover signal (a surviving node's leader-change counter grows, or the client's
    //    failover counter).
    let status = c.status()?;
    let leader = group_leader(&status, group).ok_or_else(|| anyhow!("volume {group} has no leader: {status}"))?;
    let leader_instance = format!("{}:9520", c.node(leader)?.ip);
    let changes_before = prom.query_sum(&format!(
        "sum(raftsan_raft_leader_changes_total{{job=\"raftsan\", instance!=\"{leader_instance}\"}})"
    ))?;
    c.signal(leader, libc::SIGKILL)?;
    let killed = Instant::now();
    let down = poll("up == 0 for the killed leader", Duration::from_secs(30), || {
        let series = prom.query(&format!("up{{job=\"raftsan\", instance=\"{leader_instance}\"}} == 0"))?;
        Ok((!series.is_empty()).then_some(()))
    });
    if let Err(e) = down {
        problems.push(format!("node down: {e:#}"));
    }
    let alert = poll(
        "RaftsanNodeDown firing for the killed leader",
        Duration::from_secs(30),
        || {
            let alerts = prom.alerts()?;
            let state = alerts
                .iter()
                .find(|a| a["labels"]["alertname"] == "RaftsanNodeDown" && a["labels"]["instance"] == leader_instance)
                .and_then(|a| a["state"].as_str())
                .unwrap_or("inactive")
                .to_string();
            if state == "firing" {
                return Ok(Some(state));
            }
            bail!("(last state {state})")
        },
    );
    match alert {
        Ok(state) => println!(
            "RaftsanNodeDown {state} {:.1} s after the kill",
            killed.elapsed().as_secs_f64()
        ),
        Err(e) => problems.push(format!("alert: {e:#}")),
    }
    let failover = poll("a failover signal", Duration::from_secs(30), || {
        let changes = prom.query_sum(&format!(
            "sum(raftsan_raft_leader_changes_total{{job=\"raftsan\", instance!=\"{leader_instance}\"}})"
        ))?;
        let client = prom.query_sum("sum(raftsan_initiator_failovers_total)")?;
        Ok((changes > changes_before || client > 0.0).then_some((changes, client)))
    });
    match failover {
        Ok((changes, client)) => println!(
            "failover seen {:.1} s after the kill: leader changes on survivors {changes_before} -> {changes}, \
             client failovers {client}",
            killed.elapsed().as_secs_f64()
        ),
        Err(e) => problems.push(format!(
            "failover: {e:#} (raftsan_raft_leader_changes_total on survivors was {changes_before})"
        )),
    }

    println!(
        "{} expressions, {} metric families referenced, {} exported",
        queries.len(),
        wanted.len(),
        exported.len()
    );
    drop(attach);
    ensure!(
        problems.is_empty(),
        "{} problems:\n  {}\nPrometheus log:\n{}",
        problems.len(),
        problems.join("\n  "),
        prom.log_text()
    );
    Ok(())
}
