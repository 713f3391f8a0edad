//! The initiator's configuration file (TOML): what open-iscsi keeps in initiatorname.iscsi and
//! iscsid.conf. Every key is optional; unknown keys are errors, reported with their line.
//!
//! ```toml
//! initiator_name = "iqn.2026-11.org.raftsan:client1"   # initiatorname.iscsi
//! run_dir = "/run/raftsan-initiator"                   # control sockets of running `attach`es
//!
//! [auth]                          # CHAP (node.session.auth.*)
//! username = "client1"
//! password = "secret-12chars"
//! username_in = "target"          # mutual CHAP: the target proves itself with this account
//! password_in = "other-secret"
//!
//! [session]
//! queue_depth = 64
//! header_digest = false           # CRC32C header digests
//! data_digest = false
//!
//! [timeouts]                      # "250ms", "5s", "2m"
//! connect = "5s"
//! login = "15s"
//! noop_interval = "1s"            # NOP-Out keepalive (node.conn[0].timeo.noop_out_interval)
//! noop_timeout = "1s"
//! command = "15s"                 # then ABORT TASK and fail the path
//! no_path_retry = "30s"           # queue I/O this long while no path is usable
//!
//! [metrics]
//! listen = "127.0.0.1:9700"       # Prometheus /metrics (off when absent)
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use raftsan_proto::chap::ChapAlgorithm;
use serde::Deserialize;

use crate::session::{ChapCredentials, Secret, SessionConfig};

/// Where the CLI looks when no `--config` is given.
pub const DEFAULT_CONFIG: &str = "/etc/raftsan/initiator.toml";
pub const DEFAULT_RUN_DIR: &str = "/run/raftsan-initiator";

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

/// A CHAP algorithm by name.
fn chap_algorithm(name: &str) -> Result<ChapAlgorithm, String> {
    match name.to_ascii_lowercase().as_str() {
        "md5" => Ok(ChapAlgorithm::Md5),
        "sha1" | "sha-1" => Ok(ChapAlgorithm::Sha1),
        "sha256" | "sha-256" => Ok(ChapAlgorithm::Sha256),
        "sha3-256" => Ok(ChapAlgorithm::Sha3_256),
        _ => Err(format!("unknown CHAP algorithm {name:?} (md5, sha1, sha256, sha3-256)")),
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub username_in: Option<String>,
    pub password_in: Option<Secret>,
    /// CHAP_A offer, most preferred first. tgt reads code 7 as SHA-1 rather than SHA-256
    /// (RFC 9266), so against tgt use `["md5"]` or `["sha1"]`.
    pub chap_algorithms: Option<Vec<String>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionSettings {
    pub queue_depth: u32,
    pub header_digest: bool,
    pub data_digest: bool,
}

impl Default for SessionSettings {
    fn default() -> Self {
        SessionSettings {
            queue_depth: 64,
            header_digest: false,
            data_digest: false,
        }
    }
}

/// A duration written as "250ms", "5s" or "2m".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span(pub Duration);

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s).map(Span).map_err(serde::de::Error::custom)
    }
}

/// Parses "250ms", "5s", "1.5s", "2m".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len()));
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (like \"500ms\", \"5s\", \"2m\")"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" => v,
        "m" => v * 60.0,
        _ => return Err(format!("{s:?}: the unit must be ms, s or m")),
    };
    if !(0.0..=86_400.0).contains(&secs) {
        return Err(format!("{s:?} is out of range (0 to 24 h)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    pub connect: Span,
    pub login: Span,
    pub noop_interval: Span,
    pub noop_timeout: Span,
    pub command: Span,
    pub no_path_retry: Span,
}

impl Default for Timeouts {
    fn default() -> Self {
        let s = |ms| Span(Duration::from_millis(ms));
        Timeouts {
            connect: s(5_000),
            login: s(15_000),
            noop_interval: s(1_000),
            noop_timeout: s(1_000),
            command: s(15_000),
            no_path_retry: s(30_000),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    pub listen: Option<SocketAddr>,
}

/// The whole file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InitiatorConfig {
    pub initiator_name: String,
    pub run_dir: PathBuf,
    pub auth: Auth,
    pub session: SessionSettings,
    pub timeouts: Timeouts,
    pub metrics: Metrics,
}

impl Default for InitiatorConfig {
    fn default() -> Self {
        InitiatorConfig {
            initiator_name: default_initiator_name(),
            run_dir: PathBuf::from(DEFAULT_RUN_DIR),
            auth: Auth::default(),
            session: SessionSettings::default(),
            timeouts: Timeouts::default(),
            metrics: Metrics::default(),
        }
    }
}

/// `iqn.2026-11.org.raftsan:<hostname>` when no name is configured.
fn default_initiator_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .collect::<String>();
    let host = if host.is_empty() {
        "initiator".to_string()
    } else {
        host.to_ascii_lowercase()
    };
    format!("iqn.2026-11.org.raftsan:{host}")
}

impl InitiatorConfig {
    /// Parses and validates a config text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<InitiatorConfig> {
        let cfg: InitiatorConfig = toml::from_str(text).map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
        cfg.validate().with_context(|| origin.to_string())?;
        Ok(cfg)
    }

    /// Reads `path`; when `path` is the default and does not exist, the defaults apply.
    pub fn load(path: Option<&Path>) -> Result<InitiatorConfig> {
        let (path, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => InitiatorConfig::parse(&text, &path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Ok(InitiatorConfig::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn validate(&self) -> Result<()> {
        let n = self.initiator_name.to_ascii_lowercase();
        if !(n.starts_with("iqn.") || n.starts_with("eui.") || n.starts_with("naa.")) || n.len() > 223 {
            bail!(
                "initiator_name {:?} is not an iSCSI name (iqn., eui. or naa., at most 223 bytes)",
                self.initiator_name
            );
        }
        let a = &self.auth;
        match (&a.username, &a.password) {
            (Some(_), None) | (None, Some(_)) => bail!("[auth] needs both username and password"),
            (Some(_), Some(p)) if !(12..=255).contains(&p.expose().len()) => {
                bail!("[auth] password must be 12 to 255 bytes (RFC 7143 §12.1.3 recommends at least 12)")
            }
            _ => {}
        }
        match (&a.username_in, &a.password_in) {
            (Some(_), None) | (None, Some(_)) => bail!("[auth] needs both username_in and password_in"),
            (Some(_), Some(_)) if a.username.is_none() => {
                bail!("[auth] mutual CHAP (username_in) needs one-way CHAP (username) too")
            }
            (Some(_), Some(p)) if !(12..=255).contains(&p.expose().len()) => {
                bail!("[auth] password_in must be 12 to 255 bytes")
            }
            _ => {}
        }
        for name in a.chap_algorithms.iter().flatten() {
            chap_algorithm(name).map_err(|e| anyhow::anyhow!("[auth] chap_algorithms: {e}"))?;
        }
        if a.chap_algorithms.as_ref().is_some_and(Vec::is_empty) {
            bail!("[auth] chap_algorithms must name at least one algorithm");
        }
        if !(1..=1024).contains(&self.session.queue_depth) {
            bail!("[session] queue_depth must be 1 to 1024");
        }
        let t = &self.timeouts;
        for (name, v) in [
            ("connect", t.connect),
            ("login", t.login),
            ("noop_timeout", t.noop_timeout),
            ("command", t.command),
        ] {
            if v.0 < Duration::from_millis(50) {
                bail!("[timeouts] {name} must be at least 50ms");
            }
        }
        if t.noop_interval.0 < Duration::from_millis(100) {
            bail!("[timeouts] noop_interval must be at least 100ms");
        }
        Ok(())
    }

    /// Session settings for `target` (None: a discovery session, which never asks the target
    /// to authenticate itself).
    pub fn session_config(&self, target: Option<&str>) -> SessionConfig {
        let a = &self.auth;
        let account = |u: &Option<String>, p: &Option<Secret>| match (u, p) {
            (Some(user), Some(secret)) => Some(ChapCredentials {
                user: user.clone(),
                secret: secret.clone(),
            }),
            _ => None,
        };
        let t = &self.timeouts;
        let mut cfg = SessionConfig {
            initiator_name: self.initiator_name.clone(),
            target_name: target.map(str::to_string),
            chap: account(&a.username, &a.password),
            mutual_chap: target.and_then(|_| account(&a.username_in, &a.password_in)),
            header_digest: self.session.header_digest,
            data_digest: self.session.data_digest,
            queue_depth: self.session.queue_depth,
            connect_timeout: t.connect.0,
            login_timeout: t.login.0,
            nop_interval: t.noop_interval.0,
            nop_timeout: t.noop_timeout.0,
            command_timeout: t.command.0,
            abort_timeout: t.noop_timeout.0.max(Duration::from_secs(1)),
            logout_timeout: Duration::from_secs(3),
            ..SessionConfig::default()
        };
        if let Some(names) = &a.chap_algorithms {
            cfg.chap_algorithms = names.iter().filter_map(|n| chap_algorithm(n).ok()).collect();
        }
        cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_file_parses_and_secrets_stay_hidden() {
        let cfg = InitiatorConfig::parse(
            r#"
initiator_name = "iqn.2026-11.org.example:c1"
[auth]
username = "u"
password = "twelve-chars!"
username_in = "t"
password_in = "other-secret-1"
[timeouts]
noop_interval = "500ms"
no_path_retry = "1.5s"
command = "2m"
"#,
            "test.toml",
        )
        .unwrap();
        assert_eq!(cfg.timeouts.noop_interval.0, Duration::from_millis(500));
        assert_eq!(cfg.timeouts.no_path_retry.0, Duration::from_millis(1500));
        assert_eq!(cfg.timeouts.command.0, Duration::from_secs(120));
        let shown = format!("{cfg:?}");
        assert!(
            !shown.contains("twelve-chars") && !shown.contains("other-secret"),
            "{shown}"
        );
        assert_eq!(cfg.session.queue_depth, 64);
        let s = cfg.session_config(Some("iqn.t:x"));
        assert_eq!(s.chap.as_ref().map(|c| c.user.as_str()), Some("u"));
        assert_eq!(
            s.mutual_chap.as_ref().map(|c| c.secret.expose()),
            Some("other-secret-1")
        );
        assert_eq!(
            (s.nop_interval, s.command_timeout),
            (Duration::from_millis(500), Duration::from_secs(120))
        );
        // Discovery sessions do not ask the target to authenticate itself.
        assert!(cfg.session_config(None).mutual_chap.is_none());
    }

    #[test]
    fn bad_files_name_the_problem() {
        let err = |t: &str| format!("{:#}", InitiatorConfig::parse(t, "f.toml").unwrap_err());
        assert!(err("initiator_name = \"bob\"").contains("not an iSCSI name"));
        assert!(err("[auth]\nusername = \"u\"").contains("both username and password"));
        assert!(err("[auth]\nusername = \"u\"\npassword = \"short\"").contains("12 to 255"));
        assert!(err("[timeouts]\nlogin = \"5 parsecs\"").contains("unit"));
        let unknown = err("bogus = 1");
        assert!(
            unknown.contains("f.toml") && unknown.contains("bogus") && unknown.contains("line 1"),
            "{unknown}"
        );
        assert!(err("[session]\nqueue_depth = 0").contains("queue_depth"));
        assert!(err("[auth]\nchap_algorithms = [\"md4\"]").contains("unknown CHAP algorithm"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("5").is_err());
    }
}
