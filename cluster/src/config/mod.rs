//! Node configuration: what `raftsan serve --config FILE` reads.
//!
//! FILE is either the project's TOML (see `docs/configuration.md`, `examples/node.toml`) or a tgt
//! `targets.conf` written exactly as tgt users write it (`<target NAME>` blocks with
//! `backing-store`, `initiator-name`, `incominguser`, `initiator-address`, …). The format is
//! detected by content: a line starting with `<target` (or a first directive that only tgt knows,
//! such as `include` or `default-driver`) means `targets.conf`; anything else is TOML.
//!
//! Contract:
//! * Everything is validated here, once, before any socket is bound or any backing store is
//!   opened (the only disk access is reading the configuration files themselves and `stat` of
//!   each backing path). A refused configuration names the file, the line and what to change.
//! * Problems that do not change what an initiator sees (a secret shorter than 12 characters, a
//!   tgt directive that raftsan has no use for) are warnings: logged through `tracing::warn!` and
//!   kept in [`NodeConfig::warnings`] so the CLI can print them.
//! * The result is a [`Catalog`] of the `raftsan-target` crate plus the node's own settings.
//!
//! Deliberately not done: no hot reload, no environment-variable interpolation, no Apache-style
//! here-documents or C comments in `targets.conf` (tgt-admin's Config::General allows them; no
//! tgt example uses them).

mod tgt;
mod toml_file;
mod validate;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use raftsan_target::catalog::Catalog;

/// The iSCSI port registered with IANA (RFC 7143 §13.2).
pub const ISCSI_PORT: u16 = 3260;
/// Where the admin socket lives when neither `admin_socket` nor `data_dir` is configured.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/raftsan/admin.sock";

/// Which syntax a configuration file was written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigFormat {
    /// The project's own TOML.
    Toml,
    /// tgt's `targets.conf` (the input of `tgt-admin`).
    TargetsConf,
}

/// Everything a node needs to start serving.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// iSCSI listeners; `0.0.0.0:3260` when the file gives none. The CLI's `--listen` replaces
    /// this list.
    pub portals: Vec<SocketAddr>,
    /// Where persistent-reservation (APTPL) state lives.
    pub data_dir: Option<PathBuf>,
    /// Prometheus exporter listener (none: no exporter).
    pub metrics_listen: Option<SocketAddr>,
    /// Unix socket for `raftsan show`, as configured; see [`NodeConfig::admin_socket_path`].
    pub admin_socket: Option<PathBuf>,
    /// Threads of the daemon's async runtime (none: one per CPU). Fewer when several daemons
    /// share a host's cores, as `raftsan demo`'s three nodes do.
    pub worker_threads: Option<usize>,
    pub limits: Limits,
    pub iscsi: IscsiSettings,
    pub catalog: Catalog,
    /// Things that were accepted but deserve the operator's attention, in file order.
    pub warnings: Vec<ConfigWarning>,
    /// The syntax the file was read as.
    pub format: ConfigFormat,
    /// Cluster mode (`[node] id` set): the node's id, RPC listener, certificates and Raft
    /// tunables. Targets and volumes are then cluster state, not file content.
    pub cluster: Option<ClusterSettings>,
}

/// A cluster node's own settings (DESIGN.md "Configuration").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSettings {
    /// Never reused (DESIGN.md invariant 8).
    pub node_id: u64,
    /// The cluster RPC listener (Raft, forwarding, admin), mutual TLS.
    pub rpc_listen: SocketAddr,
    /// The address other nodes and admin clients use (default: `rpc_listen`).
    pub rpc_advertise: String,
    pub tls: TlsPaths,
    pub raft: RaftSettings,
    /// `[testing] fault_injection = true`: the admin RPC `InjectFault` may arm storage faults on
    /// this node (tests and chaos runs only; off by default, refused when off).
    pub fault_injection: bool,
}

/// The certificate files of a node: the cluster CA, and this node's certificate and key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// When the Raft log is made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncMode {
    /// Every append batch is fsynced before it counts towards a quorum.
    Always,
    /// The default (DESIGN.md, Durability): appends count once written; SYNCHRONIZE CACHE and FUA
    /// (a flush entry) make everything before them durable on a quorum before GOOD, as a disk
    /// with a volatile write cache does, which is what the volumes report (WCE=1). Written log
    /// segments are also synced in the background within about a second.
    OnFlush,
}

/// Raft tunables of every group on the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaftSettings {
    pub fsync: FsyncMode,
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many applied entries (then the log before it is purged).
    pub snapshot_every_entries: u64,
    /// Entries kept in the log behind the last snapshot, for followers that are a little behind.
    pub keep_entries: u64,
}

impl Default for RaftSettings {
    fn default() -> Self {
        RaftSettings {
            fsync: FsyncMode::OnFlush,
            heartbeat_ms: 50,
            election_timeout_min_ms: 150,
            election_timeout_max_ms: 300,
            snapshot_every_entries: 20_000,
            keep_entries: 2_000,
        }
    }
}

impl NodeConfig {
    /// A configuration with every default and no targets.
    pub fn empty(format: ConfigFormat) -> Self {
        NodeConfig {
            portals: vec![SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), ISCSI_PORT)],
            data_dir: None,
            metrics_listen: None,
            admin_socket: None,
            worker_threads: None,
            limits: Limits::default(),
            iscsi: IscsiSettings::default(),
            catalog: Catalog::default(),
            warnings: Vec::new(),
            format,
            cluster: None,
        }
    }

    /// The admin socket to bind: `admin_socket`, else `<data_dir>/admin.sock`, else
    /// [`DEFAULT_ADMIN_SOCKET`].
    pub fn admin_socket_path(&self) -> PathBuf {
        match (&self.admin_socket, &self.data_dir) {
            (Some(p), _) => p.clone(),
            (None, Some(d)) => d.join("admin.sock"),
            (None, None) => PathBuf::from(DEFAULT_ADMIN_SOCKET),
        }
    }
}

/// Bounds on what initiators may make this node hold (DESIGN.md invariant 6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// TCP connections accepted per portal at once; more are closed at accept.
    pub max_connections_per_portal: u32,
    /// A connection that has not reached full-feature phase after this long is closed.
    pub login_timeout_ms: u64,
    /// Sessions on the whole node (normal and discovery); more get login status 0x0302 (out of resources)
    /// (out of resources).
    pub max_sessions: u32,
    /// The CmdSN window offered to each session (MaxCmdSN − ExpCmdSN + 1).
    pub max_cmds_per_session: u32,
    /// Idle time after which the target sends a NOP-In ping; 0 disables pings.
    pub nop_in_interval_ms: u64,
    /// A ping unanswered for this long drops the connection.
    pub nop_in_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections_per_portal: 1024,
            login_timeout_ms: 15_000,
            max_sessions: 1024,
            max_cmds_per_session: 128,
            nop_in_interval_ms: 5_000,
            nop_in_timeout_ms: 15_000,
        }
    }
}

/// A digest the target accepts during login (RFC 7143 §13.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Digest {
    None,
    Crc32c,
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Digest::None => "None",
            Digest::Crc32c => "CRC32C",
        })
    }
}

/// Operational values the target offers or accepts during login negotiation (RFC 7143 §13).
/// They apply to every target of the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IscsiSettings {
    /// What this target can receive per PDU (RFC 7143 §13.12), 512..=16777215.
    pub max_recv_data_segment_length: u32,
    /// RFC 7143 §13.13, 512..=16777215.
    pub max_burst_length: u32,
    /// RFC 7143 §13.14, 512..=max_burst_length.
    pub first_burst_length: u32,
    /// RFC 7143 §13.17, 1..=65535.
    pub max_outstanding_r2t: u32,
    /// RFC 7143 §13.11.
    pub immediate_data: bool,
    /// RFC 7143 §13.10.
    pub initial_r2t: bool,
    /// Header digests accepted, in order of preference (RFC 7143 §13.1); never empty.
    pub header_digests: Vec<Digest>,
    /// Data digests accepted, in order of preference; never empty.
    pub data_digests: Vec<Digest>,
    /// RFC 7143 §13.15, 0..=3600 seconds.
    pub default_time2wait: u16,
    /// RFC 7143 §13.16, 0..=3600 seconds.
    pub default_time2retain: u16,
}

impl Default for IscsiSettings {
    fn default() -> Self {
        IscsiSettings {
            max_recv_data_segment_length: 262_144,
            max_burst_length: 1_048_576,
            first_burst_length: 65_536,
            max_outstanding_r2t: 1,
            immediate_data: true,
            initial_r2t: false,
            header_digests: vec![Digest::None, Digest::Crc32c],
            data_digests: vec![Digest::None, Digest::Crc32c],
            default_time2wait: 2,
            default_time2retain: 20,
        }
    }
}

/// A place in a configuration file. Line 0 means the file as a whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: u32,
}

impl Location {
    pub fn new(file: &Path, line: u32) -> Self {
        Location {
            file: file.to_path_buf(),
            line,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.file.display())
        } else {
            write!(f, "{}:{}", self.file.display(), self.line)
        }
    }
}

/// Something accepted that the operator should know about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigWarning {
    pub at: Location,
    pub message: String,
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.message)
    }
}

/// Why a configuration was refused. Every variant is caused by the file's author and its
/// message reads `<file>:<line>: <what is wrong and how to fix it>`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A configuration file (the main one or an `include`d one) could not be read.
    #[error("{at}: cannot read `{}`: {source}", path.display())]
    Read {
        at: Location,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The text does not follow the syntax (TOML syntax, an unclosed `<target>` block, …).
    #[error("{at}: {message}")]
    Syntax { at: Location, message: String },
    /// A `targets.conf` directive raftsan does not know, or one it cannot honour.
    #[error("{at}: {message}")]
    Directive {
        at: Location,
        directive: String,
        message: String,
    },
    /// A value that is out of range or malformed.
    #[error("{at}: {message}")]
    Invalid { at: Location, message: String },
    /// A backing store path that does not exist or is neither a regular file nor a block device.
    #[error("{at}: backing store `{}` {problem}", path.display())]
    Backing {
        at: Location,
        path: PathBuf,
        problem: String,
    },
    /// Something that must be unique appears twice.
    #[error("{at}: {what} is already defined at {first}; {fix}")]
    Duplicate {
        at: Location,
        what: String,
        first: Location,
        fix: String,
    },
}

impl ConfigError {
    /// Where the problem is.
    pub fn location(&self) -> &Location {
        match self {
            ConfigError::Read { at, .. }
            | ConfigError::Syntax { at, .. }
            | ConfigError::Directive { at, .. }
            | ConfigError::Invalid { at, .. }
            | ConfigError::Backing { at, .. }
            | ConfigError::Duplicate { at, .. } => at,
        }
    }

    pub(crate) fn invalid(at: &Location, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            at: at.clone(),
            message: message.into(),
        }
    }
}

/// Largest configuration file read (also for each `include`d file): a guard against pointing
/// `--config` or `include` at a device.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// Reads and validates the configuration at `path`.
pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
    let text = read_config_file(path, &Location::new(path, 0))?;
    parse_str(&text, path)
}

/// Parses and validates configuration `text`; `origin` names it in messages, and relative paths
/// (backing stores, includes, data_dir) are resolved against its directory.
pub fn parse_str(text: &str, origin: &Path) -> Result<NodeConfig, ConfigError> {
    let config = match detect_format(text) {
        ConfigFormat::TargetsConf => tgt::parse(text, origin)?,
        ConfigFormat::Toml => toml_file::parse(text, origin)?,
    };
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    Ok(config)
}

/// Which syntax `text` is in (see the module documentation).
pub fn detect_format(text: &str) -> ConfigFormat {
    let mut significant = text
        .lines()
        .map(str::trim_start)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    let Some(first) = significant.next() else {
        return ConfigFormat::Toml;
    };
    // The first line of a TOML document is a table header or a `key = value`; a bare
    // `directive value` is tgt's.
    let looks_toml = first.starts_with('[') || first.contains('=');
    if !looks_toml
        || std::iter::once(first)
            .chain(significant)
            .any(|l| l.starts_with("<target") || l.starts_with("</target"))
    {
        return ConfigFormat::TargetsConf;
    }
    ConfigFormat::Toml
}

/// Reads a configuration file with a size cap; `at` is where it was named (0 for `--config`).
pub(crate) fn read_config_file(path: &Path, at: &Location) -> Result<String, ConfigError> {
    let read_err = |source| ConfigError::Read {
        at: at.clone(),
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if !meta.is_file() {
        return Err(read_err(std::io::Error::other("not a regular file")));
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(read_err(std::io::Error::other(format!(
            "larger than {MAX_CONFIG_BYTES} bytes; is this really a configuration file?"
        ))));
    }
    let bytes = std::fs::read(path).map_err(read_err)?;
    String::from_utf8(bytes).map_err(|_| read_err(std::io::Error::other("not UTF-8 text")))
}

/// The directory relative paths in `origin` are resolved against.
pub(crate) fn base_dir(origin: &Path) -> PathBuf {
    match origin.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests;
