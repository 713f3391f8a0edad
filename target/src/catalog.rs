//! What a node serves: targets with their LUNs, CHAP accounts and ACLs.
//!
//! Access control follows tgt's vocabulary (`incominguser`, `outgoinguser`, `initiator-name`,
//! `initiator-address`) with one deliberate difference: every restriction a target states applies.
//! A login must come from a listed name AND a listed address AND pass CHAP, where each of those is
//! configured. tgt instead lets a matching address stand in for a name that is not listed (and
//! tgt-admin adds an address ACL of ALL when none is given, which silently defeats an
//! `initiator-name` line); someone who wrote both lines meant both.

use std::net::IpAddr;
use std::path::PathBuf;

/// A CHAP account: the name and secret a peer must prove it knows.
#[derive(Clone, PartialEq, Eq)]
pub struct ChapAccount {
    pub user: String,
    pub secret: String,
}

impl std::fmt::Debug for ChapAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets never reach logs.
        f.debug_struct("ChapAccount")
            .field("user", &self.user)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// An IPv4 or IPv6 network in CIDR form (`192.168.1.0/24`, `fd00::/8`, or a bare address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl Cidr {
    /// Whether `ip` lies in this network. IPv4-mapped IPv6 peers match IPv4 networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let shift = 32 - u32::from(self.prefix_len.min(32));
                let mask = if shift == 32 { 0 } else { u32::MAX << shift };
                (u32::from(net) & mask) == (u32::from(ip) & mask)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let shift = 128 - u32::from(self.prefix_len.min(128));
                let mask = if shift == 128 { 0 } else { u128::MAX << shift };
                (u128::from(net) & mask) == (u128::from(ip) & mask)
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| format!("`{s}` is not an IP address or CIDR network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = match p {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("`{s}`: prefix length must be 0..={max}")),
            },
        };
        Ok(Cidr { addr, prefix_len })
    }
}

/// The kind of backing store behind a LUN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backing {
    /// A regular file or a block device, opened read-write (or read-only when the LUN is).
    Path(PathBuf),
    /// Memory of the given size (tests and benchmarks; contents are lost at exit).
    Memory { size_bytes: u64 },
}

/// One logical unit of a target. LUN 0 is always the storage-array controller (as in tgt);
/// backing stores start at LUN 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LunDef {
    pub lun: u64,
    pub backing: Backing,
    /// VPD 0x80 unit serial number (tgt `scsi_sn`), at most 36 printable ASCII characters.
    pub serial: String,
    /// The NAA IEEE Registered Extended designator (NAA 6, 16 bytes) for VPD 0x83; derived from
    /// the target name and LUN when not configured (tgt `scsi_id` only sets a vendor-specific one).
    pub naa: [u8; 16],
    pub vendor: String,
    pub product: String,
    pub revision: String,
    pub block_size: u32,
    pub read_only: bool,
    /// Thin provisioning: UNMAP and WRITE SAME with UNMAP punch holes (LBPME = 1).
    pub thin: bool,
    /// Write-back cache reported in the caching mode page (WCE); SYNCHRONIZE CACHE and FUA always
    /// make data durable.
    pub write_cache: bool,
}

/// One iSCSI target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetDef {
    /// The iSCSI name (iqn., eui. or naa. form), lower case.
    pub name: String,
    /// tgt's target id (tid), kept for `raftsan show` compatibility.
    pub tid: u32,
    pub alias: Option<String>,
    pub luns: Vec<LunDef>,
    /// `incominguser`: accounts an initiator may authenticate with (CHAP required when non-empty).
    pub incoming_users: Vec<ChapAccount>,
    /// `outgoinguser`: the account this target answers mutual CHAP with.
    pub outgoing_user: Option<ChapAccount>,
    /// `initiator-name`: allowed initiator names (any when empty).
    pub initiator_names: Vec<String>,
    /// `initiator-address`: allowed initiator networks (any when empty).
    pub initiator_addresses: Vec<Cidr>,
}

/// Why an initiator may not log into a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denied {
    /// The initiator name is not in the target's `initiator-name` list.
    Name,
    /// The initiator's address is in none of the target's `initiator-address` networks.
    Address,
}

impl TargetDef {
    /// Whether the initiator `name` connecting from `addr` passes this target's ACLs (CHAP is
    /// checked separately during login). Both lists apply when both are configured.
    pub fn admits(&self, name: &str, addr: IpAddr) -> Result<(), Denied> {
        if !self.initiator_names.is_empty() && !self.initiator_names.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            return Err(Denied::Name);
        }
        if !self.initiator_addresses.is_empty() && !self.initiator_addresses.iter().any(|c| c.contains(addr)) {
            return Err(Denied::Address);
        }
        Ok(())
    }
}

/// Everything a node serves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Catalog {
    pub targets: Vec<TargetDef>,
    /// Accounts a discovery session must authenticate with (none: discovery is open).
    pub discovery_users: Vec<ChapAccount>,
    /// The account this node answers mutual CHAP with during discovery.
    pub discovery_outgoing_user: Option<ChapAccount>,
}

impl Catalog {
    pub fn target(&self, name: &str) -> Option<&TargetDef> {
        self.targets.iter().find(|t| t.name.eq_ignore_ascii_case(name))
    }
}

/// Derives a stable NAA 6 (IEEE Registered Extended) designator from a target name and LUN, so a
/// LUN keeps its identity across restarts and on every node that serves it.
pub fn derive_naa(target: &str, lun: u64) -> [u8; 16] {
    // FNV-1a over the name and LUN: stable across versions and platforms (unlike `Hasher`).
    let mut h: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    for b in target.bytes().chain(lun.to_be_bytes()) {
        h ^= u128::from(b);
        h = h.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b);
    }
    let mut naa = h.to_be_bytes();
    // NAA 6 in the top nibble; the 24-bit IEEE company id follows. 0x000000 is not assigned, so
    // use a locally chosen OUI-like value and keep the vendor-specific bits from the hash.
    naa[0] = 0x60 | (naa[0] & 0x0f);
    naa
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> TargetDef {
        TargetDef {
            name: "iqn.2023-02.dom.home.sv:sv1.disk".into(),
            tid: 1,
            alias: None,
            luns: vec![],
            incoming_users: vec![],
            outgoing_user: None,
            initiator_names: vec![],
            initiator_addresses: vec![],
        }
    }

    #[test]
    fn cidr_matching() {
        let c: Cidr = "192.168.1.0/24".parse().unwrap();
        assert!(c.contains("192.168.1.73".parse().unwrap()));
        assert!(!c.contains("192.168.2.1".parse().unwrap()));
        assert!(c.contains("::ffff:192.168.1.9".parse().unwrap()));
        let one: Cidr = "127.0.0.1".parse().unwrap();
        assert_eq!(one.prefix_len, 32);
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("10.1.2.3".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!("1.2.3.4/33".parse::<Cidr>().is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
    }

    #[test]
    fn both_acls_apply() {
        let mut t = target();
        t.initiator_names = vec!["iqn.2023-02.dom.home.sv:sv.initiator01".into()];
        t.initiator_addresses = vec!["127.0.0.1".parse().unwrap()];
        let ok = "127.0.0.1".parse().unwrap();
        let other = "127.0.0.2".parse().unwrap();
        assert_eq!(t.admits("iqn.2023-02.dom.home.sv:sv.initiator01", ok), Ok(()));
        // Unlike tgt, a listed address does not stand in for an unlisted name.
        assert_eq!(t.admits("iqn.1994-05.com.redhat:other", ok), Err(Denied::Name));
        assert_eq!(
            t.admits("iqn.2023-02.dom.home.sv:sv.initiator01", other),
            Err(Denied::Address)
        );
        assert_eq!(target().admits("anyone", other), Ok(()));
    }

    #[test]
    fn naa_is_stable_and_type_6() {
        let a = derive_naa("iqn.x:t", 1);
        assert_eq!(a, derive_naa("iqn.x:t", 1));
        assert_ne!(a, derive_naa("iqn.x:t", 2));
        assert_eq!(a[0] >> 4, 6);
    }

    #[test]
    fn secrets_are_redacted() {
        let a = ChapAccount {
            user: "diskuser".into(),
            secret: "Eupen2marron".into(),
        };
        assert!(!format!("{a:?}").contains("Eupen2marron"));
    }
}
