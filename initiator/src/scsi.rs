//! The SCSI an initiator needs to speak to a block device: CDB builders and parsers for the data
//! a target returns (READ CAPACITY, INQUIRY and its VPD pages, REPORT TARGET PORT GROUPS, sense).
//!
//! Every parser takes bytes from the network, so none of them may panic: short or inconsistent
//! data is a [`ParseError`], and a length field that points past the data is clipped to the data.

use std::fmt;

use raftsan_proto::scsi::cdb::op;
pub use raftsan_proto::scsi::sense::{SenseCode, key, status};

/// Malformed data from a target.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what} from the target: {detail}")]
pub struct ParseError {
    pub what: &'static str,
    pub detail: String,
}

fn malformed(what: &'static str, detail: impl Into<String>) -> ParseError {
    ParseError {
        what,
        detail: detail.into(),
    }
}

fn be(b: &[u8], at: usize, n: usize) -> Option<u64> {
    let s = b.get(at..at.checked_add(n)?)?;
    Some(s.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
}

const SERVICE_ACTION_IN_16: u8 = 0x9e;
const READ_CAPACITY_16_SA: u8 = 0x10;
const MAINTENANCE_IN: u8 = 0xa3;
const REPORT_TARGET_PORT_GROUPS_SA: u8 = 0x0a;

/// INQUIRY (standard data when `page` is None, else the VPD page).
pub fn inquiry(page: Option<u8>, alloc: u16) -> Vec<u8> {
    let [hi, lo] = alloc.to_be_bytes();
    match page {
        None => vec![op::INQUIRY, 0, 0, hi, lo, 0],
        Some(p) => vec![op::INQUIRY, 1, p, hi, lo, 0],
    }
}

/// READ CAPACITY (16).
pub fn read_capacity16() -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = SERVICE_ACTION_IN_16;
    c[1] = READ_CAPACITY_16_SA;
    c[10..14].copy_from_slice(&32u32.to_be_bytes());
    c
}

/// REPORT TARGET PORT GROUPS (length-only format).
pub fn report_target_port_groups(alloc: u32) -> Vec<u8> {
    let mut c = vec![0u8; 12];
    c[0] = MAINTENANCE_IN;
    c[1] = REPORT_TARGET_PORT_GROUPS_SA;
    c[6..10].copy_from_slice(&alloc.to_be_bytes());
    c
}

fn rw16(opcode: u8, lba: u64, blocks: u32, fua: bool) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = opcode;
    if fua {
        c[1] = 0x08;
    }
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// READ (16).
pub fn read16(lba: u64, blocks: u32) -> Vec<u8> {
    rw16(op::READ_16, lba, blocks, false)
}

/// WRITE (16), with FUA when the data must be durable before the command completes.
pub fn write16(lba: u64, blocks: u32, fua: bool) -> Vec<u8> {
    rw16(op::WRITE_16, lba, blocks, fua)
}

/// SYNCHRONIZE CACHE (16) of the whole medium.
pub fn synchronize_cache16() -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = op::SYNCHRONIZE_CACHE_16;
    c
}

/// WRITE SAME (16) of the one block sent as data (no UNMAP bit: the blocks are written).
pub fn write_same16(lba: u64, blocks: u32) -> Vec<u8> {
    rw16(op::WRITE_SAME_16, lba, blocks, false)
}

/// UNMAP with one block descriptor; returns the CDB and its parameter list.
pub fn unmap(lba: u64, blocks: u32) -> (Vec<u8>, Vec<u8>) {
    let mut list = vec![0u8; 24];
    list[0..2].copy_from_slice(&22u16.to_be_bytes());
    list[2..4].copy_from_slice(&16u16.to_be_bytes());
    list[8..16].copy_from_slice(&lba.to_be_bytes());
    list[16..20].copy_from_slice(&blocks.to_be_bytes());
    let mut c = vec![0u8; 10];
    c[0] = op::UNMAP;
    c[7..9].copy_from_slice(&24u16.to_be_bytes());
    (c, list)
}

/// READ CAPACITY (16) parameter data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub blocks: u64,
    pub block_size: u32,
    /// Logical block provisioning management enabled (UNMAP may be supported).
    pub lbpme: bool,
}

impl Capacity {
    pub fn bytes(&self) -> u64 {
        self.blocks.saturating_mul(u64::from(self.block_size))
    }

    pub fn parse(d: &[u8]) -> Result<Capacity, ParseError> {
        let (Some(last), Some(size)) = (be(d, 0, 8), be(d, 8, 4)) else {
            return Err(malformed(
                "READ CAPACITY (16) data",
                format!("{} bytes, need 12", d.len()),
            ));
        };
        let block_size = size as u32;
        if !(512..=1 << 20).contains(&block_size) || !block_size.is_power_of_two() {
            return Err(malformed("READ CAPACITY (16) data", format!("block size {block_size}")));
        }
        let blocks = last
            .checked_add(1)
            .ok_or_else(|| malformed("READ CAPACITY (16) data", "last LBA overflows"))?;
        let lbpme = d.get(14).is_some_and(|b| b & 0x80 != 0);
        Ok(Capacity {
            blocks,
            block_size,
            lbpme,
        })
    }
}

/// The parts of standard INQUIRY data a multipath initiator uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StandardInquiry {
    pub peripheral: u8,
    /// TPGS field: 0 = no ALUA, 1 = implicit, 2 = explicit, 3 = both.
    pub tpgs: u8,
    pub vendor: String,
    pub product: String,
    pub revision: String,
}

fn ascii(b: &[u8]) -> String {
    b.iter()
        .map(|&c| if (0x20..0x7f).contains(&c) { c as char } else { '.' })
        .collect::<String>()
        .trim_end()
        .to_string()
}

impl StandardInquiry {
    pub fn parse(d: &[u8]) -> Result<StandardInquiry, ParseError> {
        if d.len() < 36 {
            return Err(malformed(
                "standard INQUIRY data",
                format!("{} bytes, need 36", d.len()),
            ));
        }
        Ok(StandardInquiry {
            peripheral: d[0],
            tpgs: (d[5] >> 4) & 3,
            vendor: ascii(&d[8..16]),
            product: ascii(&d[16..32]),
            revision: ascii(&d[32..36]),
        })
    }
}

/// A designation descriptor's identifier type (SPC-4 table 597) and bytes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Designator {
    pub code_set: u8,
    pub kind: u8,
    pub id: Vec<u8>,
}

impl fmt::Display for Designator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.kind {
            1 => "t10",
            2 => "eui",
            3 => "naa",
            8 => "name",
            _ => "id",
        };
        if self.code_set == 3 || self.code_set == 2 {
            write!(f, "{name}:{}", ascii(&self.id))
        } else {
            write!(f, "{name}:")?;
            self.id.iter().try_for_each(|b| write!(f, "{b:02x}"))
        }
    }
}

/// Device Identification VPD page (0x83): the LU's identity and the port the command came
/// through.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceId {
    /// The LU's preferred designator: NAA, else EUI-64, else SCSI name, else T10 vendor id.
    pub lu: Option<Designator>,
    pub relative_port: Option<u16>,
    pub port_group: Option<u16>,
}

impl DeviceId {
    pub fn parse(d: &[u8]) -> Result<DeviceId, ParseError> {
        let what = "Device Identification VPD page";
        if d.len() < 4 || d[1] != 0x83 {
            return Err(malformed(what, "not page 83h"));
        }
        let end = d.len().min(4 + be(d, 2, 2).unwrap_or(0) as usize);
        let mut at = 4;
        let mut lu: Vec<Designator> = Vec::new();
        let mut out = DeviceId::default();
        while at + 4 <= end {
            let code_set = d[at] & 0x0f;
            let association = (d[at + 1] >> 4) & 3;
            let kind = d[at + 1] & 0x0f;
            let len = usize::from(d[at + 3]);
            let Some(id) = d.get(at + 4..at + 4 + len).filter(|_| at + 4 + len <= end) else {
                return Err(malformed(what, format!("designator at byte {at} runs past the page")));
            };
            match (association, kind) {
                (0, 1..=3 | 8) => lu.push(Designator {
                    code_set,
                    kind,
                    id: id.to_vec(),
                }),
                (1, 4) if len >= 4 => out.relative_port = be(id, 2, 2).map(|v| v as u16),
                (1, 5) if len >= 4 => out.port_group = be(id, 2, 2).map(|v| v as u16),
                _ => {}
            }
            at += 4 + len;
        }
        let rank = |k: u8| match k {
            3 => 0,
            2 => 1,
            8 => 2,
            _ => 3,
        };
        lu.sort_by_key(|d| rank(d.kind));
        out.lu = lu.into_iter().next();
        Ok(out)
    }
}

/// Block Limits VPD page (0xB0), the fields used to size requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockLimits {
    /// Maximum transfer length in blocks (0: not reported).
    pub max_transfer: u32,
    pub max_unmap_blocks: u32,
    pub max_unmap_descriptors: u32,
}

impl BlockLimits {
    pub fn parse(d: &[u8]) -> Result<BlockLimits, ParseError> {
        if d.len() < 4 || d[1] != 0xb0 {
            return Err(malformed("Block Limits VPD page", "not page B0h"));
        }
        let at = |i: usize| be(d, i, 4).unwrap_or(0) as u32;
        Ok(BlockLimits {
            max_transfer: at(8),
            max_unmap_blocks: at(20),
            max_unmap_descriptors: at(24),
        })
    }
}

/// Logical Block Provisioning VPD page (0xB2): which unmapping commands the LU takes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Provisioning {
    pub unmap: bool,
    pub write_same_unmap: bool,
}

impl Provisioning {
    pub fn parse(d: &[u8]) -> Result<Provisioning, ParseError> {
        if d.len() < 6 || d[1] != 0xb2 {
            return Err(malformed("Logical Block Provisioning VPD page", "not page B2h"));
        }
        Ok(Provisioning {
            unmap: d[5] & 0x80 != 0,
            write_same_unmap: d[5] & 0x40 != 0,
        })
    }
}

/// An asymmetric access state (SPC-4 §5.16.2.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AluaState {
    Optimized,
    NonOptimized,
    Standby,
    Unavailable,
    Offline,
    Transitioning,
    /// Not reported (the target has no ALUA, or we have not asked yet).
    Unknown,
}

impl AluaState {
    pub fn from_code(c: u8) -> AluaState {
        match c & 0x0f {
            0x0 => AluaState::Optimized,
            0x1 => AluaState::NonOptimized,
            0x2 => AluaState::Standby,
            0x3 => AluaState::Unavailable,
            0xe => AluaState::Offline,
            0xf => AluaState::Transitioning,
            _ => AluaState::Unknown,
        }
    }

    /// Short name as dm-multipath prints it.
    pub fn name(self) -> &'static str {
        match self {
            AluaState::Optimized => "active/optimized",
            AluaState::NonOptimized => "active/non-optimized",
            AluaState::Standby => "standby",
            AluaState::Unavailable => "unavailable",
            AluaState::Offline => "offline",
            AluaState::Transitioning => "transitioning",
            AluaState::Unknown => "unknown",
        }
    }

    /// Path selection rank: lower is better; None means the path must not carry I/O.
    pub fn rank(self) -> Option<u8> {
        match self {
            AluaState::Optimized => Some(0),
            AluaState::NonOptimized => Some(1),
            // No ALUA: every path is as good as any other.
            AluaState::Unknown => Some(1),
            // The target holds commands while it transitions (bounded); better than nothing.
            AluaState::Transitioning => Some(2),
            AluaState::Standby | AluaState::Unavailable | AluaState::Offline => None,
        }
    }
}

impl fmt::Display for AluaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One target port group from REPORT TARGET PORT GROUPS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortGroup {
    pub id: u16,
    pub state: AluaState,
    pub preferred: bool,
    pub ports: Vec<u16>,
}

/// Parses REPORT TARGET PORT GROUPS data (length-only or extended header).
pub fn parse_port_groups(d: &[u8]) -> Result<Vec<PortGroup>, ParseError> {
    let what = "REPORT TARGET PORT GROUPS data";
    let Some(len) = be(d, 0, 4) else {
        return Err(malformed(what, "shorter than its header"));
    };
    let extended = d.get(4).is_some_and(|b| b & 0x70 == 0x10);
    let mut at = if extended { 8 } else { 4 };
    let end = d.len().min(4usize.saturating_add(len as usize));
    let mut groups = Vec::new();
    while at + 8 <= end {
        let count = usize::from(d[at + 7]);
        let ports_end = at + 8 + 4 * count;
        if ports_end > end {
            return Err(malformed(
                what,
                format!("group at byte {at} lists {count} ports past the data"),
            ));
        }
        let ports = (0..count)
            .filter_map(|i| be(d, at + 8 + 4 * i + 2, 2).map(|v| v as u16))
            .collect();
        groups.push(PortGroup {
            id: be(d, at + 2, 2).unwrap_or(0) as u16,
            state: AluaState::from_code(d[at]),
            preferred: d[at] & 0x80 != 0,
            ports,
        });
        at = ports_end;
    }
    Ok(groups)
}

/// Sense data reduced to what decides a retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    pub code: SenseCode,
}

impl Sense {
    /// Parses fixed (70h/71h) or descriptor (72h/73h) sense data; None when it is neither.
    pub fn parse(d: &[u8]) -> Option<Sense> {
        let code = match d.first()? & 0x7f {
            0x70 | 0x71 => SenseCode::new(
                *d.get(2)? & 0x0f,
                d.get(12).copied().unwrap_or(0),
                d.get(13).copied().unwrap_or(0),
            ),
            0x72 | 0x73 => SenseCode::new(
                *d.get(1)? & 0x0f,
                d.get(2).copied().unwrap_or(0),
                d.get(3).copied().unwrap_or(0),
            ),
            _ => return None,
        };
        Some(Sense { code })
    }
}

impl fmt::Display for Sense {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.code;
        let name = match c.key {
            key::NO_SENSE => "NO SENSE",
            key::RECOVERED_ERROR => "RECOVERED ERROR",
            key::NOT_READY => "NOT READY",
            key::MEDIUM_ERROR => "MEDIUM ERROR",
            key::HARDWARE_ERROR => "HARDWARE ERROR",
            key::ILLEGAL_REQUEST => "ILLEGAL REQUEST",
            key::UNIT_ATTENTION => "UNIT ATTENTION",
            key::DATA_PROTECT => "DATA PROTECT",
            key::ABORTED_COMMAND => "ABORTED COMMAND",
            key::MISCOMPARE => "MISCOMPARE",
            _ => "sense key",
        };
        write!(f, "{name} (key {:x}h, ASC/ASCQ {:02x}h/{:02x}h)", c.key, c.asc, c.ascq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_parses_and_rejects_nonsense() {
        let mut d = vec![0u8; 32];
        d[0..8].copy_from_slice(&1023u64.to_be_bytes());
        d[8..12].copy_from_slice(&512u32.to_be_bytes());
        d[14] = 0x80;
        let c = Capacity::parse(&d).unwrap();
        assert_eq!(
            (c.blocks, c.block_size, c.lbpme, c.bytes()),
            (1024, 512, true, 512 * 1024)
        );
        d[8..12].copy_from_slice(&0u32.to_be_bytes());
        assert!(Capacity::parse(&d).is_err());
        d[8..12].copy_from_slice(&4096u32.to_be_bytes());
        d[0..8].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(Capacity::parse(&d).is_err());
        assert!(Capacity::parse(&d[..11]).is_err());
    }

    #[test]
    fn device_id_prefers_naa_and_finds_port_and_group() {
        let mut p = vec![0, 0x83, 0, 0];
        // T10 vendor id (ASCII), then NAA (binary), then relative port 2, port group 7.
        p.extend([2, 0x01, 0, 4, b'A', b'B', b'C', b'D']);
        p.extend([1, 0x03, 0, 8, 0x60, 1, 2, 3, 4, 5, 6, 7]);
        p.extend([1, 0x14, 0, 4, 0, 0, 0, 2]);
        p.extend([1, 0x15, 0, 4, 0, 0, 0, 7]);
        let n = (p.len() - 4) as u16;
        p[2..4].copy_from_slice(&n.to_be_bytes());
        let id = DeviceId::parse(&p).unwrap();
        assert_eq!(id.lu.as_ref().unwrap().kind, 3);
        assert_eq!(id.lu.unwrap().to_string(), "naa:6001020304050607");
        assert_eq!((id.relative_port, id.port_group), (Some(2), Some(7)));
        // A designator that claims more bytes than the page holds.
        let mut bad = vec![0, 0x83, 0, 8, 1, 3, 0, 40, 1, 2, 3, 4];
        assert!(DeviceId::parse(&bad).is_err());
        bad[1] = 0x80;
        assert!(DeviceId::parse(&bad).is_err());
    }

    #[test]
    fn port_groups_parse_both_formats() {
        let mut d = vec![0, 0, 0, 0];
        d.extend([0x80, 0x01, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1]);
        d.extend([0x01, 0x01, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3]);
        let n = (d.len() - 4) as u32;
        d[0..4].copy_from_slice(&n.to_be_bytes());
        let g = parse_port_groups(&d).unwrap();
        assert_eq!(g.len(), 2);
        assert_eq!(
            (g[0].id, g[0].state, g[0].preferred, g[0].ports.clone()),
            (1, AluaState::Optimized, true, vec![1])
        );
        assert_eq!(
            (g[1].id, g[1].state, g[1].ports.clone()),
            (2, AluaState::NonOptimized, vec![2, 3])
        );
        // Extended header: 8 bytes before the first descriptor.
        let mut e = d.clone();
        e.splice(4..4, [0x10, 0, 0, 0]);
        let n = (e.len() - 4) as u32;
        e[0..4].copy_from_slice(&n.to_be_bytes());
        assert_eq!(parse_port_groups(&e).unwrap(), g);
        // A group whose port count runs past the data.
        let mut bad = d.clone();
        bad[4 + 7] = 9;
        assert!(parse_port_groups(&bad).is_err());
    }

    #[test]
    fn sense_both_formats() {
        let fixed = [0x70, 0, 0x06, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x2a, 0x06];
        assert_eq!(Sense::parse(&fixed).unwrap().code, SenseCode::new(6, 0x2a, 6));
        let desc = [0x72, 0x02, 0x04, 0x0a, 0, 0, 0, 0];
        assert_eq!(Sense::parse(&desc).unwrap().code, SenseCode::new(2, 4, 0x0a));
        assert_eq!(Sense::parse(&[0x70]), None);
        assert_eq!(Sense::parse(&[0x12, 1, 2]), None);
        assert_eq!(
            Sense::parse(&desc).unwrap().to_string(),
            "NOT READY (key 2h, ASC/ASCQ 04h/0ah)"
        );
    }

    #[test]
    fn cdbs_carry_their_fields() {
        let w = write16(0x0102_0304_0506_0708, 16, true);
        assert_eq!(
            (w[0], w[1], &w[2..10], &w[10..14]),
            (0x8a, 0x08, &[1, 2, 3, 4, 5, 6, 7, 8][..], &[0, 0, 0, 16][..])
        );
        let (c, l) = unmap(5, 3);
        assert_eq!((c[0], c.len(), l.len(), l[15], l[19]), (0x42, 10, 24, 5, 3));
        assert_eq!(inquiry(Some(0x83), 255), vec![0x12, 1, 0x83, 0, 255, 0]);
    }
}
