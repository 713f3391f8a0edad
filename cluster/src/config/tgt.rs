//! tgt's `targets.conf`, read the way `tgt-admin --execute` reads it.
//!
//! Syntax (Config::General as tgt-admin configures it): one directive per line, `key value` or
//! `key = value`; `#` starts a comment (`\#` is a literal `#`); a line ending in `\` continues on
//! the next; `<target NAME>` … `</target>` and, inside a target, `<backing-store PATH>` …
//! `</backing-store>` and `<direct-store PATH>` … `</direct-store>` blocks; `include FILE`
//! (relative to the including file, a `*`/`?` pattern in the last component, or a directory)
//! anywhere.
//!
//! Semantics follow tgt-admin 1.0.x:
//! * tids: targets are taken in name order and numbered 1, 2, …; `controller_tid N` sets a
//!   target's tid and the numbering continues from N + 1 (as tgt-admin's counter does).
//! * LUNs: all backing-store entries first, then all direct-store entries, each group in path
//!   order; a store takes its `lun N` when given, else the lowest free LUN from 1. A
//!   target-level `lun N` applies to a target's single store.
//! * LU parameters written at target level (`scsi_sn`, `vendor_id`, `write-cache`, …) apply to
//!   every LUN of the target; the same parameter inside a store block overrides it.
//!
//! Differences are listed in `docs/configuration.md` ("Coming from tgt").

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use raftsan_target::catalog::{Backing, ChapAccount, Cidr, LunDef, TargetDef, derive_naa};

use super::validate::{self, LocatedTarget};
use super::{ConfigError, ConfigFormat, ConfigWarning, Digest, IscsiSettings, Location, NodeConfig};

/// How deep `include` may nest (a guard against include loops).
const MAX_INCLUDE_DEPTH: usize = 8;

pub const DEFAULT_VENDOR: &str = "RAFTSAN";
pub const DEFAULT_PRODUCT: &str = "VIRTUAL-DISK";
pub const DEFAULT_REVISION: &str = "0001";
pub const DEFAULT_BLOCK_SIZE: u32 = 512;

/// One logical line of the file after comments, continuations and includes.
#[derive(Debug)]
enum Line {
    Open { at: Location, block: String, arg: String },
    Close { at: Location, block: String },
    Directive { at: Location, key: String, value: String },
}

fn strip_comment(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'#') => {
                out.push('#');
                chars.next();
            }
            '#' => break,
            c => out.push(c),
        }
    }
    out
}

fn unquote(s: &str) -> &str {
    let s = s.trim();
    if s.len() >= 2 && s.starts_with('"') && s.ends_with('"') {
        &s[1..s.len() - 1]
    } else {
        s
    }
}

/// Splits `text` into logical lines, following includes.
fn lex(
    text: &str,
    file: &Path,
    depth: usize,
    out: &mut Vec<Line>,
    warnings: &mut Vec<ConfigWarning>,
) -> Result<(), ConfigError> {
    let mut pending: Option<(u32, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let number = u32::try_from(i + 1).unwrap_or(u32::MAX);
        let stripped = strip_comment(raw);
        let (start, mut joined) = match pending.take() {
            Some((start, mut acc)) => {
                acc.push_str(&stripped);
                (start, acc)
            }
            None => (number, stripped),
        };
        let trimmed_end = joined.trim_end().len();
        joined.truncate(trimmed_end);
        if joined.ends_with('\\') {
            joined.pop();
            pending = Some((start, joined));
            continue;
        }
        let at = Location::new(file, start);
        let line = joined.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(inner) = line.strip_prefix('<') {
            let Some(inner) = inner.strip_suffix('>') else {
                return Err(ConfigError::Syntax {
                    at,
                    message: format!(
                        "`{line}`: a block tag must end with `>`, for example `<target iqn.2023-02.com.example:disk1>`"
                    ),
                });
            };
            let inner = inner.trim();
            if let Some(block) = inner.strip_prefix('/') {
                out.push(Line::Close {
                    at,
                    block: block.trim().to_string(),
                });
            } else {
                let (block, arg) = inner.split_once(char::is_whitespace).unwrap_or((inner, ""));
                out.push(Line::Open {
                    at,
                    block: block.to_string(),
                    arg: unquote(arg).to_string(),
                });
            }
            continue;
        }
        let key_end = line.find(|c: char| c.is_whitespace() || c == '=').unwrap_or(line.len());
        let key = &line[..key_end];
        let rest = line[key_end..].trim_start();
        let value = unquote(rest.strip_prefix('=').unwrap_or(rest)).to_string();
        if key == "include" {
            include(&value, file, &at, depth, out, warnings)?;
            continue;
        }
        out.push(Line::Directive {
            at,
            key: key.to_string(),
            value,
        });
    }
    if let Some((start, _)) = pending {
        return Err(ConfigError::Syntax {
            at: Location::new(file, start),
            message: "the last line ends with `\\` but nothing follows; remove the backslash".into(),
        });
    }
    Ok(())
}

fn wildcard_match(pattern: &[u8], name: &[u8]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len()).any(|i| wildcard_match(rest, &name[i..])),
        Some((b'?', rest)) => !name.is_empty() && wildcard_match(rest, &name[1..]),
        Some((c, rest)) => name.first() == Some(c) && wildcard_match(rest, &name[1..]),
    }
}

fn include(
    value: &str,
    file: &Path,
    at: &Location,
    depth: usize,
    out: &mut Vec<Line>,
    warnings: &mut Vec<ConfigWarning>,
) -> Result<(), ConfigError> {
    if value.is_empty() {
        return Err(ConfigError::invalid(
            at,
            "`include` needs a file name, a directory or a pattern",
        ));
    }
    if depth >= MAX_INCLUDE_DEPTH {
        return Err(ConfigError::invalid(
            at,
            format!("includes nest deeper than {MAX_INCLUDE_DEPTH} levels; does a file include itself?"),
        ));
    }
    let target = super::base_dir(file).join(value);
    let name = target.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let files: Vec<PathBuf> = if name.contains(['*', '?']) {
        let dir = target
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        if dir.is_dir() { list_dir(&dir, at)? } else { Vec::new() }
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| wildcard_match(name.as_bytes(), n.as_bytes()))
            })
            .collect()
    } else if target.is_dir() {
        list_dir(&target, at)?
    } else {
        vec![target.clone()]
    };
    if files.is_empty() {
        warnings.push(ConfigWarning {
            at: at.clone(),
            message: format!("include `{value}` matches no file"),
        });
    }
    for f in files {
        let text = super::read_config_file(&f, at)?;
        lex(&text, &f, depth + 1, out, warnings)?;
    }
    Ok(())
}

/// Regular files of `dir`, sorted by name.
fn list_dir(dir: &Path, at: &Location) -> Result<Vec<PathBuf>, ConfigError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ConfigError::Read {
        at: at.clone(),
        path: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// A value with where it was written.
type At<T> = Option<(T, Location)>;

/// LU parameters, written at target level (defaults for every LUN) or in a store block.
#[derive(Clone, Debug, Default)]
struct LuParams {
    lun: At<u64>,
    serial: At<String>,
    vendor: At<String>,
    product: At<String>,
    revision: At<String>,
    write_cache: At<bool>,
    read_only: At<bool>,
    thin: At<bool>,
    block_size: At<u32>,
}

impl LuParams {
    /// `self` (a store block) over `global` (the target level).
    fn over(&self, global: &LuParams) -> LuParams {
        fn pick<T: Clone>(a: &At<T>, b: &At<T>) -> At<T> {
            a.clone().or_else(|| b.clone())
        }
        LuParams {
            lun: self.lun.clone(),
            serial: pick(&self.serial, &global.serial),
            vendor: pick(&self.vendor, &global.vendor),
            product: pick(&self.product, &global.product),
            revision: pick(&self.revision, &global.revision),
            write_cache: pick(&self.write_cache, &global.write_cache),
            read_only: pick(&self.read_only, &global.read_only),
            thin: pick(&self.thin, &global.thin),
            block_size: pick(&self.block_size, &global.block_size),
        }
    }
}

#[derive(Debug)]
struct RawStore {
    at: Location,
    path: String,
    direct: bool,
    params: LuParams,
}

#[derive(Debug)]
struct RawTarget {
    at: Location,
    name: String,
    stores: Vec<RawStore>,
    /// Target-level LU parameters; `lun` here is tgt's target-level `lun N`.
    params: LuParams,
    tid: At<u32>,
    names: Vec<(String, Location)>,
    addresses: Vec<(Option<Cidr>, Location)>,
    incoming: Vec<ChapAccount>,
    outgoing: At<ChapAccount>,
}

/// Node-wide negotiation values gathered from every target's tuning lines.
#[derive(Default)]
struct Tuning {
    /// Key → (value as written, normalised for comparison, first location).
    seen: HashMap<&'static str, (String, Location)>,
}

struct Parser {
    warnings: Vec<ConfigWarning>,
    ignore_errors: bool,
    default_driver: At<()>,
    discovery_in: Vec<ChapAccount>,
    discovery_out: At<ChapAccount>,
    targets: Vec<RawTarget>,
    iscsi: IscsiSettings,
    tuning: Tuning,
}

fn bool_value(key: &str, v: &str, at: &Location) -> Result<bool, ConfigError> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "yes" | "on" | "true" => Ok(true),
        "0" | "no" | "off" | "false" => Ok(false),
        _ => Err(ConfigError::invalid(
            at,
            format!("{key} `{v}`: write yes or no (also on/off, 1/0)"),
        )),
    }
}

fn number(key: &str, v: &str, at: &Location) -> Result<u64, ConfigError> {
    v.parse::<u64>()
        .map_err(|_| ConfigError::invalid(at, format!("{key} `{v}`: expected a whole number")))
}

fn directive_err(at: &Location, key: &str, message: String) -> ConfigError {
    ConfigError::Directive {
        at: at.clone(),
        directive: key.to_string(),
        message,
    }
}

fn set_once<T>(slot: &mut At<T>, value: T, key: &str, at: &Location) -> Result<(), ConfigError> {
    if let Some((_, first)) = slot {
        return Err(ConfigError::Duplicate {
            at: at.clone(),
            what: format!("`{key}`"),
            first: first.clone(),
            fix: "keep one of the two lines".into(),
        });
    }
    *slot = Some((value, at.clone()));
    Ok(())
}

const LU_WARN_IGNORED: [&str; 5] = [
    "lbppbe",
    "la_lba",
    "optimal_xfer_gran",
    "optimal_xfer_len",
    "rotation_rate",
];

/// Every directive name raftsan knows, for "did you mean" hints.
const KNOWN: &[&str] = &[
    "include",
    "default-driver",
    "ignore-errors",
    "incomingdiscoveryuser",
    "outgoingdiscoveryuser",
    "control-port",
    "backing-store",
    "direct-store",
    "initiator-address",
    "initiator-name",
    "incominguser",
    "outgoinguser",
    "MaxRecvDataSegmentLength",
    "MaxXmitDataSegmentLength",
    "MaxBurstLength",
    "FirstBurstLength",
    "MaxOutstandingR2T",
    "ImmediateData",
    "InitialR2T",
    "HeaderDigest",
    "DataDigest",
    "DefaultTime2Wait",
    "DefaultTime2Retain",
    "DataPDUInOrder",
    "DataSequenceInOrder",
    "ErrorRecoveryLevel",
    "IFMarker",
    "OFMarker",
    "IFMarkInt",
    "OFMarkInt",
    "MaxConnections",
    "driver",
    "controller_tid",
    "tid",
    "allow-in-use",
    "state",
    "lun",
    "scsi_sn",
    "scsi_id",
    "vendor_id",
    "product_id",
    "product_rev",
    "removable",
    "sense_format",
    "online",
    "mode_page",
    "params",
    "write-cache",
    "readonly",
    "block-size",
    "bs-type",
    "device-type",
    "bsopts",
    "bsoflags",
    "path",
];

fn unknown(at: &Location, key: &str, place: &str) -> ConfigError {
    let hint = KNOWN
        .iter()
        .find(|k| **k != key && k.replace('-', "_").eq_ignore_ascii_case(&key.replace('-', "_")))
        .map(|k| format!(" (did you mean `{k}`?)"))
        .unwrap_or_default();
    directive_err(
        at,
        key,
        format!(
            "unknown directive `{key}` {place}{hint}; see docs/configuration.md for what a targets.conf may contain"
        ),
    )
}

impl Parser {
    fn warn(&mut self, at: &Location, message: impl Into<String>) {
        self.warnings.push(ConfigWarning {
            at: at.clone(),
            message: message.into(),
        });
    }

    fn chap(&mut self, key: &str, value: &str, at: &Location) -> Result<ChapAccount, ConfigError> {
        let words: Vec<&str> = value.split_whitespace().collect();
        match words.as_slice() {
            [user, secret] => validate::chap(key, user, secret, at, &mut self.warnings),
            _ => Err(ConfigError::invalid(
                at,
                format!(
                    "`{key}` takes a user name and a secret separated by a space, for example `{key} diskuser Eupen2marron`"
                ),
            )),
        }
    }

    fn top(&mut self, at: &Location, key: &str, value: &str) -> Result<(), ConfigError> {
        match key {
            "default-driver" => {
                if value != "iscsi" {
                    return Err(directive_err(
                        at,
                        key,
                        format!("default-driver `{value}`: raftsan only serves iscsi"),
                    ));
                }
                set_once(&mut self.default_driver, (), key, at)
            }
            "ignore-errors" => {
                self.ignore_errors = bool_value(key, value, at)?;
                Ok(())
            }
            "incomingdiscoveryuser" => {
                let a = self.chap(key, value, at)?;
                self.discovery_in.push(a);
                Ok(())
            }
            "outgoingdiscoveryuser" => {
                let a = self.chap(key, value, at)?;
                set_once(&mut self.discovery_out, a, key, at)
            }
            "control-port" => {
                self.warn(
                    at,
                    "control-port is tgtd's management port; raftsan ignores it (see `admin_socket` in TOML)",
                );
                Ok(())
            }
            "iSNS" | "iSNSServerIP" | "iSNSServerPort" | "iSNSAccessControl" => Err(directive_err(
                at,
                key,
                format!(
                    "`{key}`: raftsan does not register with an iSNS server; remove the iSNS lines and use SendTargets discovery"
                ),
            )),
            _ => Err(unknown(at, key, "at the top level")),
        }
    }

    /// An LU parameter at target level or in a store block. Returns false when `key` is not one.
    fn lu_param(&mut self, p: &mut LuParams, at: &Location, key: &str, value: &str) -> Result<bool, ConfigError> {
        match key {
            "scsi_sn" => {
                validate::serial(value).map_err(|m| ConfigError::invalid(at, format!("scsi_sn: {m}")))?;
                set_once(&mut p.serial, value.to_string(), key, at)?;
            }
            "vendor_id" | "product_id" | "product_rev" => {
                let (max, slot) = match key {
                    "vendor_id" => (validate::VENDOR_CHARS, &mut p.vendor),
                    "product_id" => (validate::PRODUCT_CHARS, &mut p.product),
                    _ => (validate::REVISION_CHARS, &mut p.revision),
                };
                let mut v = value.to_string();
                if v.len() > max && v.is_ascii() {
                    v.truncate(max);
                    let msg = format!("{key} `{value}` is longer than {max} characters; INQUIRY reports `{v}` (as tgt does)");
                    self.warnings.push(ConfigWarning { at: at.clone(), message: msg });
                }
                validate::inquiry_field(key, &v, max).map_err(|m| ConfigError::invalid(at, m))?;
                set_once(slot, v, key, at)?;
            }
            "write-cache" => {
                let on = match value {
                    "on" | "" => true,
                    "off" => false,
                    _ => return Err(ConfigError::invalid(at, format!("write-cache `{value}`: write on or off"))),
                };
                set_once(&mut p.write_cache, on, key, at)?;
            }
            "readonly" => set_once(&mut p.read_only, bool_value(key, value, at)?, key, at)?,
            "thin_provisioning" => set_once(&mut p.thin, bool_value(key, value, at)?, key, at)?,
            "block-size" => {
                let n = number(key, value, at)?;
                let b = validate::block_size(n).map_err(|m| ConfigError::invalid(at, m))?;
                set_once(&mut p.block_size, b, key, at)?;
            }
            "bs-type" => {
                if !matches!(value, "rdwr" | "aio" | "sync") {
                    return Err(directive_err(
                        at,
                        key,
                        format!("bs-type `{value}` is not available; raftsan's file and block-device store replaces rdwr, aio and sync, other types (rbd, glfs, sg, ssc, null, …) have no equivalent"),
                    ));
                }
            }
            "device-type" => {
                if value != "disk" {
                    return Err(directive_err(at, key, format!("device-type `{value}`: raftsan only emulates disks")));
                }
            }
            "removable" | "sense_format" => {
                if number(key, value, at)? != 0 {
                    self.warn(at, format!("{key} {value} is ignored; raftsan reports a fixed disk with fixed-format sense unless the initiator asks otherwise"));
                }
            }
            "online" => {
                if number(key, value, at)? == 0 {
                    return Err(directive_err(at, key, "online 0: raftsan has no offline LUNs; remove the store instead".into()));
                }
            }
            "scsi_id" => self.warn(
                at,
                "scsi_id is ignored; VPD page 0x83 carries an NAA designator derived from the target name and LUN (set `naa` in TOML to choose it)",
            ),
            "mode_page" => self.warn(
                at,
                "mode_page is ignored; raftsan generates its mode pages (use `write-cache off` to clear WCE)",
            ),
            k if LU_WARN_IGNORED.contains(&k) => {
                self.warn(at, format!("{key} is ignored; raftsan derives it from the block size and backing store"))
            }
            "allow-in-use" => {
                // raftsan never refuses a store that is in use, so this is what it does anyway.
                bool_value(key, value, at)?;
            }
            "bsoflags" => match value {
                "direct" => self.warn(at, "bsoflags direct is ignored; raftsan chooses how it opens the store"),
                _ => {
                    return Err(directive_err(
                        at,
                        key,
                        format!("bsoflags `{value}` is not supported; for writes that are durable before status write `write-cache off`"),
                    ));
                }
            },
            "bsopts" => {
                return Err(directive_err(at, key, "bsopts configures rbd and glfs stores, which raftsan does not have".into()));
            }
            "path" => {
                return Err(directive_err(at, key, "`path` (changing a LUN's store at run time) is not supported; use backing-store".into()));
            }
            "params" => {
                for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    let Some((k, v)) = item.split_once('=') else {
                        return Err(ConfigError::invalid(at, format!("params `{item}`: write key=value pairs separated by commas")));
                    };
                    let k = k.trim();
                    let known = matches!(
                        k,
                        "scsi_sn" | "vendor_id" | "product_id" | "product_rev" | "readonly" | "thin_provisioning"
                            | "removable" | "sense_format" | "online" | "mode_page" | "scsi_id" | "path" | "bsopts" | "bsoflags"
                    ) || LU_WARN_IGNORED.contains(&k);
                    if !known || !self.lu_param(p, at, k, v.trim())? {
                        return Err(directive_err(at, key, format!("params: unknown parameter `{k}`")));
                    }
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn tuning(&mut self, at: &Location, key: &str, value: &str) -> Result<bool, ConfigError> {
        let key: &'static str = match KNOWN.iter().find(|k| **k == key) {
            Some(k) => k,
            None => return Ok(false),
        };
        let digests = |v: &str| -> Result<Vec<Digest>, ConfigError> {
            v.split(',')
                .map(|d| match d.trim().to_ascii_lowercase().as_str() {
                    "none" => Ok(Digest::None),
                    "crc32c" => Ok(Digest::Crc32c),
                    _ => Err(ConfigError::invalid(
                        at,
                        format!("{key} `{v}`: write None, CRC32C or a list such as `CRC32C,None`"),
                    )),
                })
                .collect()
        };
        let u32v = |v: &str| -> Result<u32, ConfigError> {
            u32::try_from(number(key, v, at)?)
                .map_err(|_| ConfigError::invalid(at, format!("{key} `{v}` is too large")))
        };
        let s = &mut self.iscsi;
        match key {
            "MaxRecvDataSegmentLength" | "MaxBurstLength" | "FirstBurstLength" | "MaxOutstandingR2T" => {
                let v = u32v(value)?;
                validate::iscsi_value(key, v, at)?;
                *match key {
                    "MaxRecvDataSegmentLength" => &mut s.max_recv_data_segment_length,
                    "MaxBurstLength" => &mut s.max_burst_length,
                    "FirstBurstLength" => &mut s.first_burst_length,
                    _ => &mut s.max_outstanding_r2t,
                } = v;
            }
            "ImmediateData" => s.immediate_data = bool_value(key, value, at)?,
            "InitialR2T" => s.initial_r2t = bool_value(key, value, at)?,
            "HeaderDigest" => s.header_digests = digests(value)?,
            "DataDigest" => s.data_digests = digests(value)?,
            "DefaultTime2Wait" | "DefaultTime2Retain" => {
                let v = u32v(value)?;
                validate::iscsi_value(key, v, at)?;
                let v = u16::try_from(v).unwrap_or(u16::MAX);
                if key == "DefaultTime2Wait" {
                    s.default_time2wait = v;
                } else {
                    s.default_time2retain = v;
                }
            }
            "MaxXmitDataSegmentLength" => {
                u32v(value)?;
                self.warn(
                    at,
                    "MaxXmitDataSegmentLength is ignored; raftsan sends PDUs up to what each initiator declares",
                );
            }
            "DataPDUInOrder" | "DataSequenceInOrder" => {
                if !bool_value(key, value, at)? {
                    self.warn(at, format!("{key} No is ignored; raftsan always offers Yes"));
                }
            }
            "ErrorRecoveryLevel" => {
                if number(key, value, at)? != 0 {
                    self.warn(at, "ErrorRecoveryLevel is ignored; raftsan offers 0");
                }
            }
            "MaxConnections" => {
                if number(key, value, at)? != 1 {
                    self.warn(
                        at,
                        "MaxConnections is ignored; raftsan offers one connection per session",
                    );
                }
            }
            "IFMarker" | "OFMarker" => {
                if bool_value(key, value, at)? {
                    self.warn(
                        at,
                        format!("{key} Yes is ignored; markers are obsolete (RFC 7143 §13) and always No"),
                    );
                }
            }
            "IFMarkInt" | "OFMarkInt" => {}
            _ => return Ok(false),
        }
        // One node-wide value: two targets asking for different values cannot both be honoured.
        let normal = value.to_ascii_lowercase().replace(' ', "");
        match self.tuning.seen.get(key) {
            Some((first_value, first)) if *first_value != normal => Err(directive_err(
                at,
                key,
                format!(
                    "{key} {value} differs from {first}; raftsan applies iSCSI parameters to the whole node, so give every target the same value (or set it once in the TOML [iscsi] section)"
                ),
            )),
            Some(_) => Ok(true),
            None => {
                self.tuning.seen.insert(key, (normal, at.clone()));
                Ok(true)
            }
        }
    }

    fn target_line(&mut self, t: &mut RawTarget, at: &Location, key: &str, value: &str) -> Result<(), ConfigError> {
        if value.is_empty() && key != "write-cache" {
            return Err(ConfigError::invalid(at, format!("`{key}` has no value")));
        }
        match key {
            "backing-store" | "direct-store" => {
                t.stores.push(RawStore {
                    at: at.clone(),
                    path: value.to_string(),
                    direct: key == "direct-store",
                    params: LuParams::default(),
                });
            }
            "lun" => {
                let n = validate::lun(number(key, value, at)?).map_err(|m| ConfigError::invalid(at, m))?;
                set_once(&mut t.params.lun, n, key, at)?;
            }
            "initiator-address" => {
                let c = validate::initiator_address(value).map_err(|m| ConfigError::invalid(at, m))?;
                t.addresses.push((c, at.clone()));
            }
            "initiator-name" => {
                let n = validate::iscsi_name(value)
                    .map_err(|m| ConfigError::invalid(at, format!("initiator-name: {m}")))?;
                if !t.names.iter().any(|(x, _)| *x == n) {
                    t.names.push((n, at.clone()));
                }
            }
            "incominguser" => {
                let a = self.chap(key, value, at)?;
                if let Some(old) = t.incoming.iter().find(|u| u.user == a.user) {
                    if old.secret != a.secret {
                        return Err(ConfigError::invalid(
                            at,
                            format!(
                                "incominguser `{}` is listed twice with different secrets; keep one",
                                a.user
                            ),
                        ));
                    }
                } else {
                    t.incoming.push(a);
                }
            }
            "outgoinguser" => {
                let a = self.chap(key, value, at)?;
                if let Some((_, first)) = &t.outgoing {
                    return Err(ConfigError::Duplicate {
                        at: at.clone(),
                        what: "`outgoinguser`".into(),
                        first: first.clone(),
                        fix: "a target answers mutual CHAP with one account; keep one line".into(),
                    });
                }
                t.outgoing = Some((a, at.clone()));
            }
            "driver" => {
                if value != "iscsi" {
                    return Err(directive_err(
                        at,
                        key,
                        format!("driver `{value}`: raftsan only serves iscsi"),
                    ));
                }
            }
            "controller_tid" | "tid" => {
                let n = number(key, value, at)?;
                let n = u32::try_from(n).ok().filter(|n| *n > 0).ok_or_else(|| {
                    ConfigError::invalid(at, format!("{key} {value}: a tid is a number from 1 to 4294967295"))
                })?;
                set_once(&mut t.tid, n, key, at)?;
            }
            "state" => match value {
                "ready" => {}
                _ => {
                    return Err(directive_err(
                        at,
                        key,
                        format!("state `{value}`: raftsan targets are always ready; remove the line"),
                    ));
                }
            },
            _ => {
                let mut params = std::mem::take(&mut t.params);
                let r = self.lu_param(&mut params, at, key, value);
                t.params = params;
                if !r? && !self.tuning(at, key, value)? {
                    return Err(unknown(at, key, &format!("in target `{}`", t.name)));
                }
            }
        }
        Ok(())
    }
}

pub fn parse(text: &str, origin: &Path) -> Result<NodeConfig, ConfigError> {
    let mut lines = Vec::new();
    let mut warnings = Vec::new();
    lex(text, origin, 0, &mut lines, &mut warnings)?;
    let mut p = Parser {
        warnings,
        ignore_errors: false,
        default_driver: None,
        discovery_in: Vec::new(),
        discovery_out: None,
        targets: Vec::new(),
        iscsi: IscsiSettings::default(),
        tuning: Tuning::default(),
    };
    let mut lines = lines.into_iter();
    while let Some(line) = lines.next() {
        match line {
            Line::Directive { at, key, value } => p.top(&at, &key, &value)?,
            Line::Open { at, block, arg } if block == "target" => {
                let t = parse_target(&mut p, at, arg, &mut lines)?;
                p.targets.push(t);
            }
            Line::Open { at, block, .. } => {
                return Err(ConfigError::Syntax {
                    at,
                    message: format!(
                        "`<{block}>` is not a top-level block; only `<target NAME>` blocks may appear here"
                    ),
                });
            }
            Line::Close { at, block } => {
                return Err(ConfigError::Syntax {
                    at,
                    message: format!("`</{block}>` closes a block that was never opened"),
                });
            }
        }
    }
    build(p, origin)
}

fn parse_target(
    p: &mut Parser,
    at: Location,
    name: String,
    lines: &mut impl Iterator<Item = Line>,
) -> Result<RawTarget, ConfigError> {
    if name.is_empty() || name.contains(char::is_whitespace) {
        return Err(ConfigError::Syntax {
            at,
            message: "`<target>` needs one iSCSI name: `<target iqn.2023-02.com.example:disk1>`".into(),
        });
    }
    let mut t = RawTarget {
        at,
        name,
        stores: Vec::new(),
        params: LuParams::default(),
        tid: None,
        names: Vec::new(),
        addresses: Vec::new(),
        incoming: Vec::new(),
        outgoing: None,
    };
    loop {
        match lines.next() {
            None => {
                return Err(ConfigError::Syntax {
                    at: t.at.clone(),
                    message: format!("`<target {}>` is never closed; add `</target>`", t.name),
                });
            }
            Some(Line::Close { at, block }) => {
                if block == "target" {
                    return Ok(t);
                }
                return Err(ConfigError::Syntax {
                    at,
                    message: format!("`</{block}>` found where `</target>` was expected"),
                });
            }
            Some(Line::Open { at, block, arg }) if block == "backing-store" || block == "direct-store" => {
                if arg.is_empty() {
                    return Err(ConfigError::Syntax {
                        at,
                        message: format!("`<{block}>` needs a path: `<{block} /dev/sdb>`"),
                    });
                }
                let mut params = LuParams::default();
                loop {
                    match lines.next() {
                        None => {
                            return Err(ConfigError::Syntax {
                                at,
                                message: format!("`<{block} {arg}>` is never closed; add `</{block}>`"),
                            });
                        }
                        Some(Line::Close { at: close_at, block: b }) => {
                            if b != block {
                                return Err(ConfigError::Syntax {
                                    at: close_at,
                                    message: format!("`</{b}>` found where `</{block}>` was expected"),
                                });
                            }
                            break;
                        }
                        Some(Line::Open { at, block: b, .. }) => {
                            return Err(ConfigError::Syntax {
                                at,
                                message: format!("`<{b}>` cannot be nested in `<{block}>`"),
                            });
                        }
                        Some(Line::Directive { at: lat, key, value }) => {
                            if key == "lun" {
                                let n = validate::lun(number(&key, &value, &lat)?)
                                    .map_err(|m| ConfigError::invalid(&lat, m))?;
                                set_once(&mut params.lun, n, &key, &lat)?;
                            } else if !p.lu_param(&mut params, &lat, &key, &value)? {
                                return Err(unknown(&lat, &key, &format!("in `<{block} {arg}>`")));
                            }
                        }
                    }
                }
                t.stores.push(RawStore {
                    at,
                    path: arg,
                    direct: block == "direct-store",
                    params,
                });
            }
            Some(Line::Open { at, block, .. }) => {
                return Err(ConfigError::Syntax {
                    at,
                    message: format!(
                        "`<{block}>` cannot appear in a target; use `<backing-store PATH>` or `<direct-store PATH>`"
                    ),
                });
            }
            Some(Line::Directive { at, key, value }) => p.target_line(&mut t, &at, &key, &value)?,
        }
    }
}

fn build(mut p: Parser, origin: &Path) -> Result<NodeConfig, ConfigError> {
    let file_at = Location::new(origin, 0);
    let burst_at = ["FirstBurstLength", "MaxBurstLength"]
        .iter()
        .find_map(|k| p.tuning.seen.get(k).map(|(_, l)| l.clone()));
    validate::iscsi(&p.iscsi, burst_at.as_ref().unwrap_or(&file_at))?;

    // tids as tgt-admin numbers them: name order, `controller_tid` resets the counter.
    let mut order: Vec<usize> = (0..p.targets.len()).collect();
    order.sort_by(|&a, &b| p.targets[a].name.cmp(&p.targets[b].name));
    let mut tids = vec![0u32; p.targets.len()];
    let mut next = 0u32;
    for &i in &order {
        next = match &p.targets[i].tid {
            Some((n, _)) => *n,
            None => next.saturating_add(1),
        };
        tids[i] = next;
    }

    let raw_targets = std::mem::take(&mut p.targets);
    let mut located = Vec::with_capacity(raw_targets.len());
    for (t, tid) in raw_targets.into_iter().zip(tids) {
        located.push(build_target(&mut p, t, tid)?);
    }
    validate::targets(&located, &mut p.warnings)?;

    let mut config = NodeConfig::empty(ConfigFormat::TargetsConf);
    config.iscsi = p.iscsi;
    config.catalog.targets = located.into_iter().map(|t| t.def).collect();
    config.catalog.discovery_users = p.discovery_in;
    config.catalog.discovery_outgoing_user = p.discovery_out.map(|(a, _)| a);
    config.warnings = p.warnings;
    Ok(config)
}

fn build_target(p: &mut Parser, t: RawTarget, tid: u32) -> Result<LocatedTarget, ConfigError> {
    let name = validate::iscsi_name(&t.name).map_err(|m| ConfigError::invalid(&t.at, format!("target name: {m}")))?;

    if let Some((_, lun_at)) = &t.params.lun
        && t.stores.len() > 1
    {
        return Err(ConfigError::invalid(
            lun_at,
            format!(
                "a target-level `lun` applies to a single store, but target `{name}` has {}; put `lun N` inside `<backing-store PATH>` blocks",
                t.stores.len()
            ),
        ));
    }

    // LUN assignment as tgt-admin does it: backing stores, then direct stores, each by path.
    let mut stores: Vec<RawStore> = t.stores;
    stores.sort_by(|a, b| (a.direct, &a.path).cmp(&(b.direct, &b.path)));
    for w in stores.windows(2) {
        if w[0].path == w[1].path {
            let (first, second) = if w[0].at.line <= w[1].at.line && w[0].at.file == w[1].at.file {
                (&w[0], &w[1])
            } else {
                (&w[1], &w[0])
            };
            return Err(ConfigError::Duplicate {
                at: second.at.clone(),
                what: format!("store `{}` in target `{name}`", second.path),
                first: first.at.clone(),
                fix: "list each store once".into(),
            });
        }
    }
    let mut used: BTreeSet<u64> = stores
        .iter()
        .filter_map(|s| s.params.lun.as_ref().map(|(n, _)| *n))
        .collect();
    let mut luns = Vec::new();
    let mut lun_at = Vec::new();
    for s in stores {
        let params = s.params.over(&t.params);
        let lun = match (&s.params.lun, &t.params.lun) {
            (Some((n, _)), _) | (None, Some((n, _))) => *n,
            (None, None) => {
                let free = (1..=validate::MAX_LUN)
                    .find(|n| !used.contains(n))
                    .unwrap_or(validate::MAX_LUN);
                used.insert(free);
                free
            }
        };
        if s.direct {
            p.warn(&s.at, format!(
                "direct-store `{}` is served like backing-store: raftsan reports its own vendor, product and serial (tgt copies them from the device with sg_inq); set vendor_id/product_id/scsi_sn to keep the device's",
                s.path
            ));
        }
        // Relative to the file the line is in (which may be an included one).
        let base = super::base_dir(&s.at.file);
        let path = match validate::backing_path(&s.path, &base, &s.at) {
            Ok(path) => path,
            Err(ConfigError::Backing { path, problem, .. }) if p.ignore_errors => {
                p.warn(
                    &s.at,
                    format!(
                        "backing store `{}` {problem}; LUN {lun} skipped because of `ignore-errors yes`",
                        path.display()
                    ),
                );
                continue;
            }
            Err(e) => return Err(e),
        };
        let block_size = params.block_size.map(|(b, _)| b).unwrap_or(DEFAULT_BLOCK_SIZE);
        luns.push(LunDef {
            lun,
            backing: Backing::Path(path),
            serial: params
                .serial
                .map(|(s, _)| s)
                .unwrap_or_else(|| format!("beaf{tid}{lun}")),
            naa: derive_naa(&name, lun),
            vendor: params.vendor.map(|(s, _)| s).unwrap_or_else(|| DEFAULT_VENDOR.into()),
            product: params.product.map(|(s, _)| s).unwrap_or_else(|| DEFAULT_PRODUCT.into()),
            revision: params
                .revision
                .map(|(s, _)| s)
                .unwrap_or_else(|| DEFAULT_REVISION.into()),
            block_size,
            read_only: params.read_only.is_some_and(|(b, _)| b),
            thin: params.thin.is_none_or(|(b, _)| b),
            write_cache: params.write_cache.is_none_or(|(b, _)| b),
        });
        lun_at.push(s.at);
    }
    // Keep the LUN list in LUN order, as `tgtadm --op show` prints it.
    let mut pairs: Vec<(LunDef, Location)> = luns.into_iter().zip(lun_at).collect();
    pairs.sort_by_key(|(l, _)| l.lun);
    let (luns, lun_at): (Vec<LunDef>, Vec<Location>) = pairs.into_iter().unzip();

    if !t.names.is_empty() && t.addresses.is_empty() {
        p.warn(&t.names[0].1, format!(
            "target `{name}` lists initiator-name but no initiator-address: raftsan admits only the listed names (tgt-admin would add `initiator-address ALL`, which admits everyone)"
        ));
    }
    let initiator_addresses = validate::fold_addresses(t.addresses, &name, &mut p.warnings);
    let def = TargetDef {
        name,
        tid,
        alias: None,
        luns,
        incoming_users: t.incoming,
        outgoing_user: t.outgoing.map(|(a, _)| a),
        initiator_names: t.names.into_iter().map(|(n, _)| n).collect(),
        initiator_addresses,
    };
    validate::mutual_chap(&def, &t.at, &mut p.warnings);
    Ok(LocatedTarget {
        def,
        tid_at: t.tid.map(|(_, l)| l),
        at: t.at,
        lun_at,
    })
}
