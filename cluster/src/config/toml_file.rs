//! The project's TOML node configuration (documented in `docs/configuration.md`).
//!
//! Every table denies unknown keys, so a typo is an error at its line rather than a silently
//! ignored setting. Values that need checking beyond their type are kept with their byte span
//! (`toml::Spanned`) so the message can name the line.

use std::collections::{BTreeSet, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use raftsan_target::catalog::{Backing, ChapAccount, LunDef, TargetDef, derive_naa};
use serde::Deserialize;
use toml::Spanned;

use super::tgt::{DEFAULT_BLOCK_SIZE, DEFAULT_PRODUCT, DEFAULT_REVISION, DEFAULT_VENDOR};
use super::validate::{self, LocatedTarget};
use super::{
    ClusterSettings, ConfigError, ConfigFormat, ConfigWarning, Digest, FsyncMode, ISCSI_PORT, Location, NodeConfig,
    RaftSettings, TlsPaths,
};

/// Upper bound of `[node] worker_threads`.
const MAX_WORKER_THREADS: u64 = 1024;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    node: NodeSection,
    #[serde(default)]
    limits: LimitsSection,
    #[serde(default)]
    iscsi: IscsiSection,
    #[serde(default)]
    discovery: DiscoverySection,
    #[serde(default)]
    target: Vec<Spanned<TargetSection>>,
    tls: Option<Spanned<TlsSection>>,
    raft: Option<Spanned<RaftSection>>,
    testing: Option<Spanned<TestingSection>>,
}

/// `[testing]`: switches for test and chaos runs only, never for production.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TestingSection {
    fault_injection: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsSection {
    ca: String,
    cert: String,
    key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RaftSection {
    fsync: Option<Spanned<String>>,
    heartbeat_ms: Option<Spanned<u64>>,
    election_timeout_ms: Option<Spanned<Vec<u64>>>,
    snapshot_every_entries: Option<Spanned<u64>>,
    keep_entries: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NodeSection {
    portals: Option<Spanned<Vec<Spanned<String>>>>,
    data_dir: Option<String>,
    metrics: Option<Spanned<String>>,
    admin_socket: Option<String>,
    worker_threads: Option<Spanned<u64>>,
    /// Cluster mode: this node's id (never reused) and RPC listener.
    id: Option<Spanned<u64>>,
    rpc_listen: Option<Spanned<String>>,
    rpc_advertise: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LimitsSection {
    max_connections_per_portal: Option<Spanned<u32>>,
    login_timeout_ms: Option<Spanned<u64>>,
    max_sessions: Option<Spanned<u32>>,
    max_cmds_per_session: Option<Spanned<u32>>,
    nop_in_interval_ms: Option<Spanned<u64>>,
    nop_in_timeout_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct IscsiSection {
    max_recv_data_segment_length: Option<Spanned<u32>>,
    max_burst_length: Option<Spanned<u32>>,
    first_burst_length: Option<Spanned<u32>>,
    max_outstanding_r2t: Option<Spanned<u32>>,
    immediate_data: Option<bool>,
    initial_r2t: Option<bool>,
    header_digest: Option<Spanned<Vec<String>>>,
    data_digest: Option<Spanned<Vec<String>>>,
    default_time2wait: Option<Spanned<u32>>,
    default_time2retain: Option<Spanned<u32>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DiscoverySection {
    #[serde(default)]
    incoming_users: Vec<Spanned<Account>>,
    outgoing_user: Option<Spanned<Account>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Account {
    user: String,
    secret: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetSection {
    name: Spanned<String>,
    tid: Option<Spanned<u32>>,
    alias: Option<Spanned<String>>,
    #[serde(default)]
    initiator_names: Vec<Spanned<String>>,
    #[serde(default)]
    initiator_addresses: Vec<Spanned<String>>,
    #[serde(default)]
    incoming_users: Vec<Spanned<Account>>,
    outgoing_user: Option<Spanned<Account>>,
    #[serde(default)]
    lun: Vec<Spanned<LunSection>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Size {
    Bytes(u64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LunSection {
    lun: Option<Spanned<u64>>,
    path: Option<Spanned<String>>,
    memory_size: Option<Spanned<Size>>,
    serial: Option<Spanned<String>>,
    naa: Option<Spanned<String>>,
    vendor: Option<Spanned<String>>,
    product: Option<Spanned<String>>,
    revision: Option<Spanned<String>>,
    block_size: Option<Spanned<u64>>,
    read_only: Option<bool>,
    thin: Option<bool>,
    write_cache: Option<bool>,
}

/// Maps byte offsets of `text` to 1-based line numbers.
struct Lines<'a> {
    text: &'a str,
    origin: &'a Path,
}

impl Lines<'_> {
    fn at(&self, offset: usize) -> Location {
        let end = offset.min(self.text.len());
        let line = self.text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1;
        Location::new(self.origin, u32::try_from(line).unwrap_or(u32::MAX))
    }

    fn of<T>(&self, s: &Spanned<T>) -> Location {
        self.at(s.span().start)
    }
}

pub fn parse(text: &str, origin: &Path) -> Result<NodeConfig, ConfigError> {
    let lines = Lines { text, origin };
    let file: File = toml::from_str(text).map_err(|e| ConfigError::Syntax {
        at: e
            .span()
            .map(|s| lines.at(s.start))
            .unwrap_or_else(|| Location::new(origin, 0)),
        message: format!("{}; see docs/configuration.md", e.message().trim_end()),
    })?;
    let base = super::base_dir(origin);
    let mut config = NodeConfig::empty(ConfigFormat::Toml);
    let mut warnings = Vec::new();

    // [node]
    let node = file.node;
    if let Some(portals) = node.portals {
        if portals.get_ref().is_empty() {
            return Err(ConfigError::invalid(
                &lines.of(&portals),
                "portals is empty; list at least one address or leave the key out for 0.0.0.0:3260",
            ));
        }
        let mut seen = HashSet::new();
        config.portals.clear();
        for p in portals.into_inner() {
            let at = lines.of(&p);
            let addr = socket_addr(p.get_ref(), ISCSI_PORT).ok_or_else(|| {
                ConfigError::invalid(
                    &at,
                    format!(
                        "portal `{}` is not an address; write `192.168.1.10:3260` or `[fd00::10]:3260`",
                        p.get_ref()
                    ),
                )
            })?;
            if !seen.insert(addr) {
                return Err(ConfigError::invalid(&at, format!("portal {addr} is listed twice")));
            }
            config.portals.push(addr);
        }
    }
    config.data_dir = node.data_dir.map(|d| base.join(d));
    config.admin_socket = node.admin_socket.map(|d| base.join(d));
    if let Some(w) = node.worker_threads {
        let at = lines.of(&w);
        let n = *w.get_ref();
        if !(1..=MAX_WORKER_THREADS).contains(&n) {
            return Err(ConfigError::invalid(
                &at,
                format!("worker_threads = {n} is out of range 1..={MAX_WORKER_THREADS}; leave it out for one per CPU"),
            ));
        }
        config.worker_threads = Some(n as usize);
    }
    if let Some(m) = node.metrics {
        let at = lines.of(&m);
        let addr = socket_addr(m.get_ref(), 0).filter(|a| a.port() != 0).ok_or_else(|| {
            ConfigError::invalid(
                &at,
                format!(
                    "metrics `{}` must be an address with a port, such as `127.0.0.1:9860`",
                    m.get_ref()
                ),
            )
        })?;
        config.metrics_listen = Some(addr);
    }

    // Cluster mode: [node] id + rpc_listen, [tls], [raft].
    let node_id = node.id;
    let rpc_listen = node.rpc_listen;
    let rpc_advertise = node.rpc_advertise;
    config.cluster = cluster_settings(node_id, rpc_listen, rpc_advertise, file.tls, file.raft, &lines, &base)?;
    if let Some(t) = file.testing {
        let at = lines.of(&t);
        let Some(cluster) = config.cluster.as_mut() else {
            return Err(ConfigError::invalid(
                &at,
                "[testing] is only meaningful for a cluster node: set [node] id too",
            ));
        };
        if t.into_inner().fault_injection == Some(true) {
            cluster.fault_injection = true;
            warnings.push(ConfigWarning {
                at,
                message: "[testing] fault_injection = true: admin clients may make this node's storage fail \
                          (`raftsan fault inject`); for testing only, never in production"
                    .to_string(),
            });
        }
    }
    if let (Some(_), Some(t)) = (&config.cluster, file.target.first()) {
        return Err(ConfigError::invalid(
            &lines.of(t),
            "a cluster node ([node] id is set) takes its targets from the cluster: create volumes with \
             `raftsan volume create` instead of [[target]] sections",
        ));
    }

    // [limits]
    let l = file.limits;
    let lim = &mut config.limits;
    let mut limits_at = Location::new(origin, 0);
    // Each key is checked on its own so the message names its line; then the whole set.
    let positive = |key: &str, v: u64, at: &Location| {
        if v == 0 {
            Err(ConfigError::invalid(at, format!("{key} must be at least 1")))
        } else {
            Ok(())
        }
    };
    for (key, src, dst) in [
        (
            "max_connections_per_portal",
            l.max_connections_per_portal,
            &mut lim.max_connections_per_portal,
        ),
        ("max_sessions", l.max_sessions, &mut lim.max_sessions),
        (
            "max_cmds_per_session",
            l.max_cmds_per_session,
            &mut lim.max_cmds_per_session,
        ),
    ] {
        if let Some(v) = src {
            limits_at = lines.of(&v);
            positive(key, (*v.get_ref()).into(), &limits_at)?;
            *dst = v.into_inner();
        }
    }
    for (key, src, dst) in [
        ("login_timeout_ms", l.login_timeout_ms, &mut lim.login_timeout_ms),
        ("nop_in_interval_ms", l.nop_in_interval_ms, &mut lim.nop_in_interval_ms),
        ("nop_in_timeout_ms", l.nop_in_timeout_ms, &mut lim.nop_in_timeout_ms),
    ] {
        if let Some(v) = src {
            limits_at = lines.of(&v);
            if key == "login_timeout_ms" {
                positive(key, *v.get_ref(), &limits_at)?;
            }
            *dst = v.into_inner();
        }
    }
    validate::limits(&config.limits, &limits_at)?;

    // [iscsi]
    let i = file.iscsi;
    let s = &mut config.iscsi;
    let mut iscsi_at = Location::new(origin, 0);
    for (key, src, dst) in [
        (
            "MaxRecvDataSegmentLength",
            i.max_recv_data_segment_length,
            &mut s.max_recv_data_segment_length,
        ),
        ("MaxBurstLength", i.max_burst_length, &mut s.max_burst_length),
        ("FirstBurstLength", i.first_burst_length, &mut s.first_burst_length),
        ("MaxOutstandingR2T", i.max_outstanding_r2t, &mut s.max_outstanding_r2t),
    ] {
        if let Some(v) = src {
            iscsi_at = lines.of(&v);
            validate::iscsi_value(key, *v.get_ref(), &iscsi_at)?;
            *dst = v.into_inner();
        }
    }
    for (key, src, dst) in [
        ("DefaultTime2Wait", i.default_time2wait, &mut s.default_time2wait),
        ("DefaultTime2Retain", i.default_time2retain, &mut s.default_time2retain),
    ] {
        if let Some(v) = src {
            let at = lines.of(&v);
            validate::iscsi_value(key, *v.get_ref(), &at)?;
            *dst = u16::try_from(v.into_inner()).unwrap_or(u16::MAX);
        }
    }
    if let Some(b) = i.immediate_data {
        s.immediate_data = b;
    }
    if let Some(b) = i.initial_r2t {
        s.initial_r2t = b;
    }
    for (src, dst) in [
        (i.header_digest, &mut s.header_digests),
        (i.data_digest, &mut s.data_digests),
    ] {
        if let Some(v) = src {
            let at = lines.of(&v);
            *dst = digests(v.get_ref(), &at)?;
        }
    }
    validate::iscsi(&config.iscsi, &iscsi_at)?;

    // [discovery]
    for a in file.discovery.incoming_users {
        let acc = account("discovery incoming user", &a, &lines, &mut warnings)?;
        config.catalog.discovery_users.push(acc);
    }
    if let Some(a) = file.discovery.outgoing_user {
        config.catalog.discovery_outgoing_user = Some(account("discovery outgoing user", &a, &lines, &mut warnings)?);
    }

    // [[target]]
    let explicit_tids: HashSet<u32> = file
        .target
        .iter()
        .filter_map(|t| t.get_ref().tid.as_ref().map(|t| *t.get_ref()))
        .collect();
    let mut next_tid = 0u32;
    let mut located = Vec::new();
    for t in file.target {
        let tid = match &t.get_ref().tid {
            Some(tid) if *tid.get_ref() == 0 => {
                return Err(ConfigError::invalid(&lines.of(tid), "tid must be at least 1"));
            }
            Some(tid) => *tid.get_ref(),
            None => {
                next_tid = (next_tid + 1..)
                    .find(|n| !explicit_tids.contains(n))
                    .unwrap_or(u32::MAX);
                next_tid
            }
        };
        located.push(target(t, tid, &lines, &base, &mut warnings)?);
    }
    validate::targets(&located, &mut warnings)?;
    config.catalog.targets = located.into_iter().map(|t| t.def).collect();
    config.warnings = warnings;
    Ok(config)
}

/// `ADDR:PORT`, `[V6]:PORT`, or a bare address (then `default_port`).
fn cluster_settings(
    id: Option<Spanned<u64>>,
    rpc_listen: Option<Spanned<String>>,
    rpc_advertise: Option<Spanned<String>>,
    tls: Option<Spanned<TlsSection>>,
    raft: Option<Spanned<RaftSection>>,
    lines: &Lines<'_>,
    base: &Path,
) -> Result<Option<ClusterSettings>, ConfigError> {
    let Some(id) = id else {
        for (at, what) in [
            (rpc_listen.as_ref().map(|x| lines.of(x)), "[node] rpc_listen"),
            (tls.as_ref().map(|x| lines.of(x)), "[tls]"),
            (raft.as_ref().map(|x| lines.of(x)), "[raft]"),
        ] {
            if let Some(at) = at {
                return Err(ConfigError::invalid(
                    &at,
                    format!("{what} is only meaningful for a cluster node: set [node] id too"),
                ));
            }
        }
        return Ok(None);
    };
    let id_at = lines.of(&id);
    if *id.get_ref() == 0 {
        return Err(ConfigError::invalid(&id_at, "node id must be at least 1"));
    }
    let rpc = rpc_listen.ok_or_else(|| {
        ConfigError::invalid(
            &id_at,
            "a cluster node needs `rpc_listen = \"ADDR:PORT\"` in [node] (the cluster RPC listener)",
        )
    })?;
    let rpc_at = lines.of(&rpc);
    let rpc_addr = socket_addr(rpc.get_ref(), 0).filter(|a| a.port() != 0).ok_or_else(|| {
        ConfigError::invalid(
            &rpc_at,
            format!(
                "rpc_listen `{}` must be an address with a port, such as `10.0.0.11:7000`",
                rpc.get_ref()
            ),
        )
    })?;
    let advertise = match rpc_advertise {
        Some(a) => {
            if !a.get_ref().contains(':') {
                return Err(ConfigError::invalid(
                    &lines.of(&a),
                    format!("rpc_advertise `{}` must be HOST:PORT", a.get_ref()),
                ));
            }
            a.into_inner()
        }
        None if rpc_addr.ip().is_unspecified() => {
            return Err(ConfigError::invalid(
                &rpc_at,
                "rpc_listen is a wildcard address; set rpc_advertise to the address peers should use",
            ));
        }
        None => rpc_addr.to_string(),
    };
    let tls = tls.ok_or_else(|| {
        ConfigError::invalid(
            &id_at,
            "a cluster node needs a [tls] section (ca, cert, key); `raftsan cluster init` and \
             `raftsan cluster issue-cert` create the files",
        )
    })?;
    let tls = tls.into_inner();
    let tls = TlsPaths {
        ca: base.join(tls.ca),
        cert: base.join(tls.cert),
        key: base.join(tls.key),
    };
    let mut r = RaftSettings::default();
    if let Some(raft) = raft {
        let raft = raft.into_inner();
        if let Some(f) = raft.fsync {
            r.fsync = match f.get_ref().as_str() {
                "always" => FsyncMode::Always,
                "on-flush" => FsyncMode::OnFlush,
                other => {
                    return Err(ConfigError::invalid(
                        &lines.of(&f),
                        format!("fsync = \"{other}\" is not known; use \"always\" or \"on-flush\""),
                    ));
                }
            };
        }
        if let Some(h) = raft.heartbeat_ms {
            if !(10..=5_000).contains(h.get_ref()) {
                return Err(ConfigError::invalid(&lines.of(&h), "heartbeat_ms must be 10..=5000"));
            }
            r.heartbeat_ms = h.into_inner();
        }
        if let Some(e) = raft.election_timeout_ms {
            let at = lines.of(&e);
            match e.get_ref().as_slice() {
                [lo, hi] if lo < hi && *lo >= 2 * r.heartbeat_ms && *hi <= 60_000 => {
                    r.election_timeout_min_ms = *lo;
                    r.election_timeout_max_ms = *hi;
                }
                _ => {
                    return Err(ConfigError::invalid(
                        &at,
                        format!(
                            "election_timeout_ms must be [min, max] with min < max, min at least twice \
                             heartbeat_ms ({}) and max at most 60000",
                            r.heartbeat_ms
                        ),
                    ));
                }
            }
        }
        if let Some(n) = raft.snapshot_every_entries {
            if *n.get_ref() < 100 {
                return Err(ConfigError::invalid(
                    &lines.of(&n),
                    "snapshot_every_entries must be at least 100",
                ));
            }
            r.snapshot_every_entries = n.into_inner();
        }
        if let Some(n) = raft.keep_entries {
            r.keep_entries = n.into_inner();
        }
    }
    Ok(Some(ClusterSettings {
        node_id: id.into_inner(),
        rpc_listen: rpc_addr,
        rpc_advertise: advertise,
        tls,
        raft: r,
        fault_injection: false,
    }))
}

fn socket_addr(s: &str, default_port: u16) -> Option<SocketAddr> {
    s.parse::<SocketAddr>().ok().or_else(|| {
        s.trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, default_port))
    })
}

fn digests(list: &[String], at: &Location) -> Result<Vec<Digest>, ConfigError> {
    let mut out = Vec::new();
    for d in list {
        let d = match d.to_ascii_lowercase().as_str() {
            "none" => Digest::None,
            "crc32c" => Digest::Crc32c,
            _ => {
                return Err(ConfigError::invalid(
                    at,
                    format!("digest `{d}`: write \"None\" or \"CRC32C\""),
                ));
            }
        };
        if !out.contains(&d) {
            out.push(d);
        }
    }
    if out.is_empty() {
        return Err(ConfigError::invalid(at, "a digest list must name None, CRC32C or both"));
    }
    Ok(out)
}

fn account(
    role: &str,
    a: &Spanned<Account>,
    lines: &Lines<'_>,
    warnings: &mut Vec<ConfigWarning>,
) -> Result<ChapAccount, ConfigError> {
    let at = lines.of(a);
    validate::chap(role, &a.get_ref().user, &a.get_ref().secret, &at, warnings)
}

fn text_field(what: &str, v: &Spanned<String>, max: usize, lines: &Lines<'_>) -> Result<String, ConfigError> {
    validate::inquiry_field(what, v.get_ref(), max).map_err(|m| ConfigError::invalid(&lines.of(v), m))?;
    Ok(v.get_ref().clone())
}

fn target(
    t: Spanned<TargetSection>,
    tid: u32,
    lines: &Lines<'_>,
    base: &Path,
    warnings: &mut Vec<ConfigWarning>,
) -> Result<LocatedTarget, ConfigError> {
    let t_at = lines.of(&t);
    let t = t.into_inner();
    let name_at = lines.of(&t.name);
    let name = validate::iscsi_name(t.name.get_ref())
        .map_err(|m| ConfigError::invalid(&name_at, format!("target name: {m}")))?;
    let alias = match t.alias {
        Some(a) => {
            let at = lines.of(&a);
            let a = a.into_inner();
            if a.is_empty() || a.len() > 255 || !a.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
                return Err(ConfigError::invalid(
                    &at,
                    "alias must be 1 to 255 printable ASCII characters",
                ));
            }
            Some(a)
        }
        None => None,
    };
    let mut initiator_names = Vec::new();
    for n in &t.initiator_names {
        let v = validate::iscsi_name(n.get_ref())
            .map_err(|m| ConfigError::invalid(&lines.of(n), format!("initiator_names: {m}")))?;
        if !initiator_names.contains(&v) {
            initiator_names.push(v);
        }
    }
    let mut addrs = Vec::new();
    for a in &t.initiator_addresses {
        let at = lines.of(a);
        addrs.push((
            validate::initiator_address(a.get_ref()).map_err(|m| ConfigError::invalid(&at, m))?,
            at,
        ));
    }
    let initiator_addresses = validate::fold_addresses(addrs, &name, warnings);
    let mut incoming_users: Vec<ChapAccount> = Vec::new();
    for a in &t.incoming_users {
        let acc = account("incoming user", a, lines, warnings)?;
        if incoming_users.iter().any(|u| u.user == acc.user) {
            return Err(ConfigError::invalid(
                &lines.of(a),
                format!("incoming user `{}` is listed twice; keep one", acc.user),
            ));
        }
        incoming_users.push(acc);
    }
    let outgoing_user = match &t.outgoing_user {
        Some(a) => Some(account("outgoing user", a, lines, warnings)?),
        None => None,
    };

    let explicit: BTreeSet<u64> = t
        .lun
        .iter()
        .filter_map(|l| l.get_ref().lun.as_ref().map(|n| *n.get_ref()))
        .collect();
    let mut assigned = BTreeSet::new();
    let mut luns = Vec::new();
    let mut lun_at = Vec::new();
    for l in t.lun {
        let at = lines.of(&l);
        let l = l.into_inner();
        let lun = match &l.lun {
            Some(n) => {
                lun_at.push(lines.of(n));
                validate::lun(*n.get_ref()).map_err(|m| ConfigError::invalid(&lines.of(n), m))?
            }
            None => {
                lun_at.push(at.clone());
                let free = (1..=validate::MAX_LUN)
                    .find(|n| !explicit.contains(n) && !assigned.contains(n))
                    .unwrap_or(validate::MAX_LUN);
                assigned.insert(free);
                free
            }
        };
        let block_size = match &l.block_size {
            Some(b) => validate::block_size(*b.get_ref()).map_err(|m| ConfigError::invalid(&lines.of(b), m))?,
            None => DEFAULT_BLOCK_SIZE,
        };
        let backing = match (&l.path, &l.memory_size) {
            (Some(p), None) => Backing::Path(validate::backing_path(p.get_ref(), base, &lines.of(p))?),
            (None, Some(m)) => {
                let m_at = lines.of(m);
                let bytes = match m.get_ref() {
                    Size::Bytes(0) => {
                        return Err(ConfigError::invalid(&m_at, "memory_size must be more than zero"));
                    }
                    Size::Bytes(n) => *n,
                    Size::Text(s) => validate::memory_size(s).map_err(|e| ConfigError::invalid(&m_at, e))?,
                };
                if bytes % u64::from(block_size) != 0 {
                    return Err(ConfigError::invalid(
                        &m_at,
                        format!("memory_size ({bytes} bytes) is not a multiple of the block size {block_size}"),
                    ));
                }
                Backing::Memory { size_bytes: bytes }
            }
            (Some(p), Some(_)) => {
                return Err(ConfigError::invalid(
                    &lines.of(p),
                    format!("LUN {lun} has both `path` and `memory_size`; keep one"),
                ));
            }
            (None, None) => {
                return Err(ConfigError::invalid(
                    &at,
                    format!("LUN {lun} of target `{name}` needs `path = \"/dev/sdb1\"` or `memory_size = \"64M\"`"),
                ));
            }
        };
        let serial = match &l.serial {
            Some(s) => {
                validate::serial(s.get_ref()).map_err(|m| ConfigError::invalid(&lines.of(s), m))?;
                s.get_ref().clone()
            }
            None => format!("beaf{tid}{lun}"),
        };
        let naa = match &l.naa {
            Some(n) => parse_naa(n.get_ref()).map_err(|m| ConfigError::invalid(&lines.of(n), m))?,
            None => derive_naa(&name, lun),
        };
        luns.push(LunDef {
            lun,
            backing,
            serial,
            naa,
            vendor: l
                .vendor
                .as_ref()
                .map(|v| text_field("vendor", v, validate::VENDOR_CHARS, lines))
                .transpose()?
                .unwrap_or_else(|| DEFAULT_VENDOR.into()),
            product: l
                .product
                .as_ref()
                .map(|v| text_field("product", v, validate::PRODUCT_CHARS, lines))
                .transpose()?
                .unwrap_or_else(|| DEFAULT_PRODUCT.into()),
            revision: l
                .revision
                .as_ref()
                .map(|v| text_field("revision", v, validate::REVISION_CHARS, lines))
                .transpose()?
                .unwrap_or_else(|| DEFAULT_REVISION.into()),
            block_size,
            read_only: l.read_only.unwrap_or(false),
            thin: l.thin.unwrap_or(true),
            write_cache: l.write_cache.unwrap_or(true),
        });
    }
    let def = TargetDef {
        name,
        tid,
        alias,
        luns,
        incoming_users,
        outgoing_user,
        initiator_names,
        initiator_addresses,
    };
    validate::mutual_chap(&def, &t_at, warnings);
    Ok(LocatedTarget {
        def,
        at: name_at,
        tid_at: t.tid.as_ref().map(|t| lines.of(t)),
        lun_at,
    })
}

/// 32 hexadecimal digits of an NAA IEEE Registered Extended designator (NAA 6, SPC-4 §7.8.6.6.5).
fn parse_naa(s: &str) -> Result<[u8; 16], String> {
    let hex: String = s.chars().filter(|c| *c != ':' && *c != '-').collect();
    let bad = || format!("naa `{s}` must be 32 hexadecimal digits starting with 6 (NAA IEEE Registered Extended)");
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) || !hex.starts_with('6') {
        return Err(bad());
    }
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}
