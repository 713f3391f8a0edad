//! Checks shared by both syntaxes. Value checks return a reason string that the caller turns
//! into a [`ConfigError`] at the value's location; whole-catalog checks take located targets.

use std::collections::HashMap;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use raftsan_target::catalog::{Backing, ChapAccount, Cidr, TargetDef};

use super::{ConfigError, ConfigWarning, IscsiSettings, Limits, Location};

/// Longest iSCSI name in bytes (RFC 7143 §4.2.7.1).
pub const MAX_ISCSI_NAME_BYTES: usize = 223;
/// Longest unit serial number tgt and raftsan report in VPD page 0x80 (tgt's SCSI_SN_LEN).
pub const MAX_SERIAL_CHARS: usize = 36;
/// INQUIRY T10 VENDOR IDENTIFICATION width (SPC-4 §6.6.2).
pub const VENDOR_CHARS: usize = 8;
/// INQUIRY PRODUCT IDENTIFICATION width.
pub const PRODUCT_CHARS: usize = 16;
/// INQUIRY PRODUCT REVISION LEVEL width.
pub const REVISION_CHARS: usize = 4;
/// A CHAP secret shorter than this draws a warning (RFC 7143 §12.1.3: at least 96 bits).
pub const MIN_SECRET_CHARS: usize = 12;
/// Longest CHAP user name or secret accepted (open-iscsi and tgt store 255 characters).
pub const MAX_CHAP_CHARS: usize = 255;
/// Highest LUN: SAM flat space addressing (SAM-5 §4.7.7) carries 14 bits.
pub const MAX_LUN: u64 = 16_383;
/// Logical block sizes a LUN may have (what Linux initiators handle).
pub const BLOCK_SIZES: [u32; 4] = [512, 1024, 2048, 4096];

pub const NAME_EXAMPLE: &str = "iqn.2023-02.com.example:storage.disk1";

/// Checks an iSCSI name (RFC 7143 §4.2.7: `iqn.yyyy-mm.reversed.domain[:anything]`,
/// `eui.` + 16 hex digits, `naa.` + 16 or 32 hex digits) and returns it in lower case.
pub fn iscsi_name(raw: &str) -> Result<String, String> {
    let bad = |why: &str| {
        Err(format!(
            "`{raw}` is not a valid iSCSI name (RFC 7143 §4.2.7): {why}; for example `{NAME_EXAMPLE}`"
        ))
    };
    let name = raw.to_ascii_lowercase();
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > MAX_ISCSI_NAME_BYTES {
        return bad("it is longer than 223 bytes");
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':')))
    {
        return bad(&format!(
            "`{}` is not allowed (only letters, digits, `-`, `.` and `:`)",
            c.escape_debug()
        ));
    }
    if let Some(rest) = name.strip_prefix("iqn.") {
        let b = rest.as_bytes();
        let date_ok = b.len() > 8
            && b[..4].iter().all(u8::is_ascii_digit)
            && b[4] == b'-'
            && b[5..7].iter().all(u8::is_ascii_digit)
            && matches!(
                &rest[5..7],
                "01" | "02" | "03" | "04" | "05" | "06" | "07" | "08" | "09" | "10" | "11" | "12"
            )
            && b[7] == b'.';
        if !date_ok {
            return bad(
                "an iqn. name continues with the year and month the naming authority was registered, `yyyy-mm.`",
            );
        }
        let authority = rest[8..].split(':').next().unwrap_or("");
        if authority.is_empty() || authority.starts_with('.') || authority.ends_with('.') || authority.contains("..") {
            return bad("the naming authority after the date must be a reversed domain name such as `com.example`");
        }
        Ok(name)
    } else if let Some(hex) = name.strip_prefix("eui.") {
        if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return bad("an eui. name has exactly 16 hexadecimal digits after `eui.`");
        }
        Ok(name)
    } else if let Some(hex) = name.strip_prefix("naa.") {
        if !(hex.len() == 16 || hex.len() == 32) || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return bad("a naa. name has 16 or 32 hexadecimal digits after `naa.`");
        }
        Ok(name)
    } else {
        bad("it must start with `iqn.`, `eui.` or `naa.`")
    }
}

fn printable(s: &str) -> bool {
    s.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

/// A VPD 0x80 unit serial number: 1..=36 printable ASCII characters.
pub fn serial(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_SERIAL_CHARS || !printable(s) {
        return Err(format!(
            "serial number `{}` must be 1 to {MAX_SERIAL_CHARS} printable ASCII characters",
            s.escape_debug()
        ));
    }
    Ok(())
}

/// An INQUIRY text field (vendor, product, revision): printable ASCII, at most `max` characters.
pub fn inquiry_field(what: &str, s: &str, max: usize) -> Result<(), String> {
    if s.is_empty() || s.len() > max || !printable(s) {
        return Err(format!(
            "{what} `{}` must be 1 to {max} printable ASCII characters",
            s.escape_debug()
        ));
    }
    Ok(())
}

/// Checks a CHAP account; a short secret is a warning, everything else wrong is an error.
pub fn chap(
    role: &str,
    user: &str,
    secret: &str,
    at: &Location,
    warnings: &mut Vec<ConfigWarning>,
) -> Result<ChapAccount, ConfigError> {
    if user.is_empty() || user.len() > MAX_CHAP_CHARS || !user.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::invalid(
            at,
            format!(
                "{role} user name `{}` must be 1 to {MAX_CHAP_CHARS} printable ASCII characters without spaces",
                user.escape_debug()
            ),
        ));
    }
    if secret.is_empty() || !printable(secret) {
        return Err(ConfigError::invalid(
            at,
            format!("{role} `{user}`: the secret must be printable ASCII and not empty"),
        ));
    }
    if secret.len() > MAX_CHAP_CHARS {
        return Err(ConfigError::invalid(
            at,
            format!(
                "{role} `{user}`: the secret is {} characters long; initiators accept at most {MAX_CHAP_CHARS}",
                secret.len()
            ),
        ));
    }
    if secret.len() < MIN_SECRET_CHARS {
        warnings.push(ConfigWarning {
            at: at.clone(),
            message: format!(
                "{role} `{user}`: the secret has {} characters; RFC 7143 §12.1.3 asks for at least {MIN_SECRET_CHARS} \
                 (open-iscsi and Windows initiators refuse shorter ones)",
                secret.len()
            ),
        });
    }
    Ok(ChapAccount {
        user: user.to_string(),
        secret: secret.to_string(),
    })
}

/// A logical block size.
pub fn block_size(n: u64) -> Result<u32, String> {
    match BLOCK_SIZES.iter().find(|&&b| u64::from(b) == n) {
        Some(&b) => Ok(b),
        None => Err(format!("block size {n} is not supported; use 512, 1024, 2048 or 4096")),
    }
}

/// A LUN for a backing store: 1..=16383 (LUN 0 is the controller, as in tgt).
pub fn lun(n: u64) -> Result<u64, String> {
    if n == 0 {
        return Err("LUN 0 is reserved for the storage-array controller (as in tgt); \
                    number backing stores from 1"
            .to_string());
    }
    if n > MAX_LUN {
        return Err(format!("LUN {n} is out of range; use 1 to {MAX_LUN}"));
    }
    Ok(n)
}

/// Resolves `raw` against `base` and checks it names a regular file or a block device.
pub fn backing_path(raw: &str, base: &Path, at: &Location) -> Result<PathBuf, ConfigError> {
    let path = base.join(raw);
    let problem = |p: &str| ConfigError::Backing {
        at: at.clone(),
        path: path.clone(),
        problem: p.to_string(),
    };
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() || m.file_type().is_block_device() => Ok(path),
        Ok(m) if m.is_dir() => Err(problem("is a directory; give a regular file or a block device")),
        Ok(_) => Err(problem("is neither a regular file nor a block device")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(problem(
            "does not exist; create it (for example `truncate -s 10G FILE`) or fix the path",
        )),
        Err(e) => Err(problem(&format!("cannot be inspected: {e}"))),
    }
}

/// A size such as `67108864`, `64M`, `10G`, `1T` or `512KiB` (binary multiples).
pub fn memory_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => {
            return Err(format!(
                "size `{s}` has an unknown unit; use K, M, G or T (powers of 1024)"
            ));
        }
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("size `{s}` must be a number with an optional K/M/G/T unit"))?;
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size `{s}` is too large"))?;
    if bytes == 0 {
        return Err(format!("size `{s}` must be more than zero"));
    }
    Ok(bytes)
}

/// An `initiator-address`: an IP address, a CIDR network, or `ALL` (returned as `None`).
pub fn initiator_address(s: &str) -> Result<Option<Cidr>, String> {
    if s.eq_ignore_ascii_case("ALL") {
        return Ok(None);
    }
    s.parse::<Cidr>().map(Some).map_err(|e| {
        format!("initiator address {e}; write an address (192.168.1.73), a network (192.168.1.0/24) or ALL")
    })
}

/// RFC 7143 ranges of the numeric negotiation keys: (key, low, high, clause).
const ISCSI_RANGES: [(&str, u32, u32, &str); 6] = [
    ("MaxRecvDataSegmentLength", 512, (1 << 24) - 1, "§13.12"),
    ("MaxBurstLength", 512, (1 << 24) - 1, "§13.13"),
    ("FirstBurstLength", 512, (1 << 24) - 1, "§13.14"),
    ("MaxOutstandingR2T", 1, 65_535, "§13.17"),
    ("DefaultTime2Wait", 0, 3600, "§13.15"),
    ("DefaultTime2Retain", 0, 3600, "§13.16"),
];

/// Range check of one numeric negotiation key (its RFC 7143 name).
pub fn iscsi_value(key: &str, v: u32, at: &Location) -> Result<(), ConfigError> {
    match ISCSI_RANGES.iter().find(|(k, ..)| *k == key) {
        Some((_, lo, hi, clause)) if v < *lo || v > *hi => Err(ConfigError::invalid(
            at,
            format!("{key} {v} is out of range; RFC 7143 {clause} allows {lo} to {hi}"),
        )),
        _ => Ok(()),
    }
}

/// Range and consistency checks of the negotiation values (RFC 7143 §13).
pub fn iscsi(s: &IscsiSettings, at: &Location) -> Result<(), ConfigError> {
    iscsi_value("MaxRecvDataSegmentLength", s.max_recv_data_segment_length, at)?;
    iscsi_value("MaxBurstLength", s.max_burst_length, at)?;
    iscsi_value("FirstBurstLength", s.first_burst_length, at)?;
    iscsi_value("MaxOutstandingR2T", s.max_outstanding_r2t, at)?;
    iscsi_value("DefaultTime2Wait", u32::from(s.default_time2wait), at)?;
    iscsi_value("DefaultTime2Retain", u32::from(s.default_time2retain), at)?;
    if s.first_burst_length > s.max_burst_length {
        return Err(ConfigError::invalid(
            at,
            format!(
                "FirstBurstLength ({}) exceeds MaxBurstLength ({}); RFC 7143 §13.14 forbids it",
                s.first_burst_length, s.max_burst_length
            ),
        ));
    }
    if s.header_digests.is_empty() || s.data_digests.is_empty() {
        return Err(ConfigError::invalid(
            at,
            "the digest lists must name None, CRC32C or both",
        ));
    }
    Ok(())
}

/// Sanity of the limits.
pub fn limits(l: &Limits, at: &Location) -> Result<(), ConfigError> {
    let positive = |name: &str, v: u64| {
        if v == 0 {
            Err(ConfigError::invalid(at, format!("{name} must be at least 1")))
        } else {
            Ok(())
        }
    };
    positive("max_connections_per_portal", l.max_connections_per_portal.into())?;
    positive("login_timeout_ms", l.login_timeout_ms)?;
    positive("max_sessions", l.max_sessions.into())?;
    positive("max_cmds_per_session", l.max_cmds_per_session.into())?;
    // Half the CmdSN space, so serial-number arithmetic (RFC 1982) stays meaningful.
    if l.max_cmds_per_session > 1 << 30 {
        return Err(ConfigError::invalid(
            at,
            "max_cmds_per_session must be at most 1073741824",
        ));
    }
    if l.nop_in_interval_ms != 0 && l.nop_in_timeout_ms == 0 {
        return Err(ConfigError::invalid(
            at,
            "nop_in_timeout_ms must be at least 1 when NOP-In pings are on (nop_in_interval_ms > 0)",
        ));
    }
    Ok(())
}

/// A target with the places its parts were written, for whole-catalog checks.
pub struct LocatedTarget {
    pub def: TargetDef,
    pub at: Location,
    /// Where the tid was set explicitly, if it was.
    pub tid_at: Option<Location>,
    /// Parallel to `def.luns`.
    pub lun_at: Vec<Location>,
}

/// Uniqueness across the catalog: target names, tids, LUNs within a target; warnings for a
/// backing store shared by two LUNs and for two LUNs of a target with one serial number.
pub fn targets(targets: &[LocatedTarget], warnings: &mut Vec<ConfigWarning>) -> Result<(), ConfigError> {
    let mut names: HashMap<&str, &Location> = HashMap::new();
    let mut tids: HashMap<u32, &Location> = HashMap::new();
    let mut paths: HashMap<&Path, &Location> = HashMap::new();
    for t in targets {
        if let Some(first) = names.insert(&t.def.name, &t.at) {
            return Err(ConfigError::Duplicate {
                at: t.at.clone(),
                what: format!("target `{}`", t.def.name),
                first: first.clone(),
                fix: "give each target its own name or merge the two blocks".into(),
            });
        }
        let tid_at = t.tid_at.as_ref().unwrap_or(&t.at);
        if let Some(first) = tids.insert(t.def.tid, tid_at) {
            return Err(ConfigError::Duplicate {
                at: tid_at.clone(),
                what: format!("tid {}", t.def.tid),
                first: first.clone(),
                fix: "give each target its own tid".into(),
            });
        }
        let mut luns: HashMap<u64, &Location> = HashMap::new();
        let mut serials: HashMap<&str, u64> = HashMap::new();
        for (lun, at) in t.def.luns.iter().zip(&t.lun_at) {
            if let Some(first) = luns.insert(lun.lun, at) {
                return Err(ConfigError::Duplicate {
                    at: at.clone(),
                    what: format!("LUN {} of target `{}`", lun.lun, t.def.name),
                    first: first.clone(),
                    fix: "give each backing store its own `lun`".into(),
                });
            }
            if let Some(other) = serials.insert(&lun.serial, lun.lun) {
                warnings.push(ConfigWarning {
                    at: at.clone(),
                    message: format!(
                        "LUNs {other} and {} of target `{}` report the same serial number `{}`; \
                         multipath tools may treat them as one disk",
                        lun.lun, t.def.name, lun.serial
                    ),
                });
            }
            if let Backing::Path(p) = &lun.backing
                && let Some(first) = paths.insert(p, at)
            {
                warnings.push(ConfigWarning {
                    at: at.clone(),
                    message: format!(
                        "backing store `{}` is also used at {first}; two LUNs writing one store corrupt each other",
                        p.display()
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Folds `initiator-address` values: `ALL` anywhere means no address restriction.
pub fn fold_addresses(
    addrs: Vec<(Option<Cidr>, Location)>,
    target: &str,
    warnings: &mut Vec<ConfigWarning>,
) -> Vec<Cidr> {
    if let Some((_, at)) = addrs.iter().find(|(c, _)| c.is_none()) {
        if addrs.len() > 1 {
            warnings.push(ConfigWarning {
                at: at.clone(),
                message: format!(
                    "target `{target}`: initiator address ALL admits every address, so the other addresses listed have no effect"
                ),
            });
        }
        return Vec::new();
    }
    addrs.into_iter().filter_map(|(c, _)| c).collect()
}

/// Warns when a target answers mutual CHAP with a secret an initiator also uses
/// (RFC 7143 §12.1.3 forbids one secret in both directions).
pub fn mutual_chap(t: &TargetDef, at: &Location, warnings: &mut Vec<ConfigWarning>) {
    if let Some(out) = &t.outgoing_user
        && t.incoming_users.iter().any(|u| u.secret == out.secret)
    {
        warnings.push(ConfigWarning {
            at: at.clone(),
            message: format!(
                "target `{}`: the outgoing user's secret equals an incoming user's; RFC 7143 §12.1.3 requires \
                     different secrets per direction and open-iscsi refuses such a login",
                t.name
            ),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iscsi_names_rfc7143_4_2_7() {
        assert_eq!(
            iscsi_name("iqn.2023-02.dom.home.sv:sv1.disk").unwrap(),
            "iqn.2023-02.dom.home.sv:sv1.disk"
        );
        assert_eq!(
            iscsi_name("IQN.1994-05.com.RedHat:ABC").unwrap(),
            "iqn.1994-05.com.redhat:abc"
        );
        assert_eq!(
            iscsi_name("iqn.2001-04.com.example").unwrap(),
            "iqn.2001-04.com.example"
        );
        assert_eq!(iscsi_name("eui.02004567A425678D").unwrap(), "eui.02004567a425678d");
        assert_eq!(iscsi_name("naa.52004567BA64678D").unwrap(), "naa.52004567ba64678d");
        assert!(iscsi_name("naa.62004567BA64678D0123456789ABCDEF").is_ok());
        for bad in [
            "",
            "disk1",
            "iqn.23-02.com.x:a",
            "iqn.2023-13.com.x:a",
            "iqn.2023-02.:a",
            "iqn.2023-02.com.x:a b",
            "iqn.2023-02.com.x:a_b",
            "eui.1234",
            "naa.123456789012345g",
        ] {
            assert!(iscsi_name(bad).is_err(), "{bad}");
        }
        assert!(iscsi_name(&format!("iqn.2023-02.com.x:{}", "a".repeat(210))).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(memory_size("64M"), Ok(64 << 20));
        assert_eq!(memory_size("10G"), Ok(10 << 30));
        assert_eq!(memory_size("512KiB"), Ok(512 << 10));
        assert_eq!(memory_size("4096"), Ok(4096));
        assert!(memory_size("0").is_err());
        assert!(memory_size("12X").is_err());
        assert!(memory_size("99999999999T").is_err());
        assert!(memory_size("").is_err());
    }

    #[test]
    fn luns_and_blocks() {
        assert!(lun(0).is_err());
        assert_eq!(lun(1), Ok(1));
        assert!(lun(16_384).is_err());
        assert_eq!(block_size(4096), Ok(4096));
        assert!(block_size(520).is_err());
    }

    #[test]
    fn chap_rules() {
        let at = Location::new(Path::new("f"), 3);
        let mut w = Vec::new();
        assert!(chap("incominguser", "diskuser", "Eupen2marron", &at, &mut w).is_ok());
        assert!(w.is_empty());
        chap("incominguser", "u", "short", &at, &mut w).unwrap();
        assert_eq!(w.len(), 1);
        assert!(
            w[0].to_string()
                .starts_with("f:3: incominguser `u`: the secret has 5 characters")
        );
        let e = chap("incominguser", "u", &"x".repeat(256), &at, &mut w).unwrap_err();
        assert_eq!(
            e.to_string(),
            "f:3: incominguser `u`: the secret is 256 characters long; initiators accept at most 255"
        );
        assert!(chap("incominguser", "a b", "Eupen2marron", &at, &mut w).is_err());
    }
}
