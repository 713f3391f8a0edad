//! INQUIRY data (SPC-4 §6.6.2) and the vital product data pages we serve (SPC-4 §7.8, SBC-3 §6.6).
//!
//! Every builder returns the full page; the caller truncates to the allocation length.

/// Peripheral device types (SPC-4 table 140).
pub mod device_type {
    pub const DIRECT_ACCESS: u8 = 0x00;
    pub const STORAGE_ARRAY_CONTROLLER: u8 = 0x0c;
    /// With qualifier 011b: no logical unit at this LUN.
    pub const UNKNOWN: u8 = 0x1f;
}

/// Peripheral qualifier 011b: the target cannot support a device at this LUN (SPC-4 §6.6.2).
pub const QUALIFIER_NOT_SUPPORTED: u8 = 0x60;

/// VPD page codes.
pub mod page {
    pub const SUPPORTED_VPD_PAGES: u8 = 0x00;
    pub const UNIT_SERIAL_NUMBER: u8 = 0x80;
    pub const DEVICE_IDENTIFICATION: u8 = 0x83;
    pub const EXTENDED_INQUIRY: u8 = 0x86;
    pub const BLOCK_LIMITS: u8 = 0xb0;
    pub const BLOCK_DEVICE_CHARACTERISTICS: u8 = 0xb1;
    pub const LOGICAL_BLOCK_PROVISIONING: u8 = 0xb2;
}

/// Standard INQUIRY data layout (SPC-4 table 139).
mod std_inq {
    pub const LEN: usize = 74;
    pub const VERSION: usize = 2;
    pub const FORMAT: usize = 3;
    pub const ADDITIONAL_LENGTH: usize = 4;
    pub const TPGS: usize = 5;
    pub const CMDQUE: usize = 7;
    pub const VENDOR: usize = 8;
    pub const PRODUCT: usize = 16;
    pub const REVISION: usize = 32;
    pub const VERSION_DESCRIPTORS: usize = 58;
    /// VERSION = 06h: SPC-4.
    pub const SPC4: u8 = 0x06;
    /// HISUP (bit 4) and RESPONSE DATA FORMAT 2.
    pub const HISUP_FORMAT2: u8 = 0x12;
    /// TPGS = 01b: implicit asymmetric access only.
    pub const TPGS_IMPLICIT: u8 = 0x10;
    pub const CMDQUE_BIT: u8 = 0x02;
}

/// Version descriptors (SPC-4 table 144): SAM-5, iSCSI, SPC-4, SBC-3.
const VERSION_SAM5: u16 = 0x00a0;
const VERSION_ISCSI: u16 = 0x0960;
const VERSION_SPC4: u16 = 0x0460;
const VERSION_SBC3: u16 = 0x04c0;

fn put_ascii(dst: &mut [u8], s: &str) {
    // SPC-4 §4.3.1: printable ASCII, left-aligned, space-padded.
    dst.fill(b' ');
    for (d, c) in dst.iter_mut().zip(s.bytes()) {
        *d = if (0x20..=0x7e).contains(&c) { c } else { b' ' };
    }
}

/// Standard INQUIRY data. `peripheral` is qualifier and device type (byte 0).
pub fn standard(peripheral: u8, vendor: &str, product: &str, revision: &str) -> Vec<u8> {
    let mut b = vec![0u8; std_inq::LEN];
    b[0] = peripheral;
    b[std_inq::VERSION] = std_inq::SPC4;
    b[std_inq::FORMAT] = std_inq::HISUP_FORMAT2;
    b[std_inq::ADDITIONAL_LENGTH] = (std_inq::LEN - 5) as u8;
    b[std_inq::TPGS] = std_inq::TPGS_IMPLICIT;
    b[std_inq::CMDQUE] = std_inq::CMDQUE_BIT;
    put_ascii(&mut b[std_inq::VENDOR..std_inq::VENDOR + 8], vendor);
    put_ascii(&mut b[std_inq::PRODUCT..std_inq::PRODUCT + 16], product);
    put_ascii(&mut b[std_inq::REVISION..std_inq::REVISION + 4], revision);
    let mut versions = vec![VERSION_SAM5, VERSION_ISCSI, VERSION_SPC4];
    if peripheral & 0x1f == device_type::DIRECT_ACCESS {
        versions.push(VERSION_SBC3);
    }
    for (i, v) in versions.iter().enumerate() {
        let at = std_inq::VERSION_DESCRIPTORS + 2 * i;
        b[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }
    b
}

/// A VPD page: header (byte 0 peripheral, byte 1 page code, bytes 2..4 page length) and body.
fn vpd(peripheral: u8, code: u8, body: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + body.len());
    b.extend_from_slice(&[peripheral, code]);
    b.extend_from_slice(&(body.len() as u16).to_be_bytes());
    b.extend_from_slice(body);
    b
}

/// VPD 00h: the supported page codes, ascending (SPC-4 §7.8.14).
pub fn supported_pages(peripheral: u8, pages: &[u8]) -> Vec<u8> {
    vpd(peripheral, page::SUPPORTED_VPD_PAGES, pages)
}

/// VPD 80h unit serial number (SPC-4 §7.8.15).
pub fn unit_serial_number(peripheral: u8, serial: &str) -> Vec<u8> {
    let mut s = vec![0u8; serial.len().min(252)];
    put_ascii(&mut s, serial);
    vpd(peripheral, page::UNIT_SERIAL_NUMBER, &s)
}

/// The target port a command came through, for the device identification page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortIdentity<'a> {
    pub target_name: &'a str,
    pub tpgt: u16,
    pub relative_port_id: u16,
    pub port_group: u16,
}

/// Designator header bytes (SPC-4 §7.8.6.1 table 450).
mod designator {
    pub const CODE_SET_BINARY: u8 = 0x01;
    pub const CODE_SET_UTF8: u8 = 0x03;
    /// PROTOCOL IDENTIFIER 5h (iSCSI) in the top nibble of byte 0.
    pub const PROTOCOL_ISCSI: u8 = 0x50;
    /// PIV (bit 7) with ASSOCIATION 01b (target port) in byte 1.
    pub const PIV_TARGET_PORT: u8 = 0x80 | 0x10;
    pub const ASSOCIATION_LU: u8 = 0x00;
    pub const TYPE_NAA: u8 = 0x3;
    pub const TYPE_RELATIVE_TARGET_PORT: u8 = 0x4;
    pub const TYPE_TARGET_PORT_GROUP: u8 = 0x5;
    pub const TYPE_SCSI_NAME_STRING: u8 = 0x8;
}

fn push_designator(b: &mut Vec<u8>, byte0: u8, byte1: u8, value: &[u8]) {
    b.extend_from_slice(&[byte0, byte1, 0, value.len() as u8]);
    b.extend_from_slice(value);
}

/// VPD 83h device identification (SPC-4 §7.8.6): the NAA designator of the logical unit (when it
/// has one), then the iSCSI target port name (`<iqn>,t,0x<tpgt>`), the relative target port and
/// the target port group.
pub fn device_identification(peripheral: u8, naa: Option<&[u8; 16]>, port: &PortIdentity<'_>) -> Vec<u8> {
    use designator::*;
    let mut body = Vec::new();
    if let Some(naa) = naa {
        push_designator(&mut body, CODE_SET_BINARY, ASSOCIATION_LU | TYPE_NAA, naa);
    }
    // SPC-4 §7.8.6.11: null-terminated, padded to a multiple of 4 bytes.
    let mut name = format!("{},t,0x{:04x}", port.target_name, port.tpgt).into_bytes();
    name.truncate(251);
    name.push(0);
    while name.len() % 4 != 0 {
        name.push(0);
    }
    push_designator(
        &mut body,
        PROTOCOL_ISCSI | CODE_SET_UTF8,
        PIV_TARGET_PORT | TYPE_SCSI_NAME_STRING,
        &name,
    );
    let [hi, lo] = port.relative_port_id.to_be_bytes();
    push_designator(
        &mut body,
        PROTOCOL_ISCSI | CODE_SET_BINARY,
        PIV_TARGET_PORT | TYPE_RELATIVE_TARGET_PORT,
        &[0, 0, hi, lo],
    );
    let [hi, lo] = port.port_group.to_be_bytes();
    push_designator(
        &mut body,
        PROTOCOL_ISCSI | CODE_SET_BINARY,
        PIV_TARGET_PORT | TYPE_TARGET_PORT_GROUP,
        &[0, 0, hi, lo],
    );
    vpd(peripheral, page::DEVICE_IDENTIFICATION, &body)
}

/// VPD 86h extended INQUIRY data (SPC-4 §7.8.7): HEADSUP, ORDSUP, SIMPSUP; V_SUP (volatile cache).
pub fn extended_inquiry(peripheral: u8) -> Vec<u8> {
    let mut body = [0u8; 60];
    body[1] = 0x07;
    body[2] = 0x01;
    vpd(peripheral, page::EXTENDED_INQUIRY, &body)
}

/// Limits reported in the block limits page, in logical blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockLimits {
    /// WSNZ: WRITE SAME with NUMBER OF LOGICAL BLOCKS = 0 is refused (true) or means "to the
    /// end of the medium" (false).
    pub wsnz: bool,
    pub max_compare_and_write_len: u8,
    pub optimal_transfer_granularity: u16,
    pub max_transfer_len: u32,
    pub optimal_transfer_len: u32,
    /// Zero when UNMAP is not supported.
    pub max_unmap_lba_count: u32,
    pub max_unmap_descriptor_count: u32,
    pub optimal_unmap_granularity: u32,
    pub max_write_same_len: u64,
    /// Zero when WRITE ATOMIC(16) is not supported.
    pub max_atomic_transfer_len: u32,
    pub atomic_alignment: u32,
    pub atomic_transfer_len_granularity: u32,
}

/// Block limits page layout: offsets in the page (SBC-4, Block Limits VPD page table).
mod bl {
    pub const PAGE_LEN: usize = 0x3c;
    pub const WSNZ: usize = 4;
    pub const MAX_COMPARE_AND_WRITE_LEN: usize = 5;
    pub const OPTIMAL_TRANSFER_LEN_GRANULARITY: usize = 6;
    pub const MAX_TRANSFER_LEN: usize = 8;
    pub const OPTIMAL_TRANSFER_LEN: usize = 12;
    pub const MAX_UNMAP_LBA_COUNT: usize = 20;
    pub const MAX_UNMAP_BLOCK_DESCRIPTOR_COUNT: usize = 24;
    pub const OPTIMAL_UNMAP_GRANULARITY: usize = 28;
    pub const MAX_WRITE_SAME_LEN: usize = 36;
    pub const MAX_ATOMIC_TRANSFER_LEN: usize = 44;
    pub const ATOMIC_ALIGNMENT: usize = 48;
    pub const ATOMIC_TRANSFER_LEN_GRANULARITY: usize = 52;
}

/// VPD B0h block limits (SBC-3 §6.6.3, SBC-4 adds the atomic fields), page length 3Ch. The
/// atomic boundary fields (bytes 56..64) stay zero: WRITE ATOMIC(16) takes no ATOMIC BOUNDARY.
pub fn block_limits(peripheral: u8, l: &BlockLimits) -> Vec<u8> {
    fn put(page: &mut [u8], at: usize, v: &[u8]) {
        page[at..at + v.len()].copy_from_slice(v);
    }
    let mut b = vec![0u8; 4 + bl::PAGE_LEN];
    b[0] = peripheral;
    b[1] = page::BLOCK_LIMITS;
    put(&mut b, 2, &(bl::PAGE_LEN as u16).to_be_bytes());
    b[bl::WSNZ] = u8::from(l.wsnz);
    b[bl::MAX_COMPARE_AND_WRITE_LEN] = l.max_compare_and_write_len;
    put(
        &mut b,
        bl::OPTIMAL_TRANSFER_LEN_GRANULARITY,
        &l.optimal_transfer_granularity.to_be_bytes(),
    );
    put(&mut b, bl::MAX_TRANSFER_LEN, &l.max_transfer_len.to_be_bytes());
    put(&mut b, bl::OPTIMAL_TRANSFER_LEN, &l.optimal_transfer_len.to_be_bytes());
    put(&mut b, bl::MAX_UNMAP_LBA_COUNT, &l.max_unmap_lba_count.to_be_bytes());
    put(
        &mut b,
        bl::MAX_UNMAP_BLOCK_DESCRIPTOR_COUNT,
        &l.max_unmap_descriptor_count.to_be_bytes(),
    );
    put(
        &mut b,
        bl::OPTIMAL_UNMAP_GRANULARITY,
        &l.optimal_unmap_granularity.to_be_bytes(),
    );
    put(&mut b, bl::MAX_WRITE_SAME_LEN, &l.max_write_same_len.to_be_bytes());
    put(
        &mut b,
        bl::MAX_ATOMIC_TRANSFER_LEN,
        &l.max_atomic_transfer_len.to_be_bytes(),
    );
    put(&mut b, bl::ATOMIC_ALIGNMENT, &l.atomic_alignment.to_be_bytes());
    put(
        &mut b,
        bl::ATOMIC_TRANSFER_LEN_GRANULARITY,
        &l.atomic_transfer_len_granularity.to_be_bytes(),
    );
    b
}

/// VPD B1h block device characteristics (SBC-3 §6.6.2): MEDIUM ROTATION RATE 1 (non-rotating).
pub fn block_device_characteristics(peripheral: u8) -> Vec<u8> {
    let mut body = [0u8; 60];
    body[0..2].copy_from_slice(&1u16.to_be_bytes());
    vpd(peripheral, page::BLOCK_DEVICE_CHARACTERISTICS, &body)
}

/// VPD B2h logical block provisioning (SBC-3 §6.6.4). Thin: LBPU, LBPWS, LBPWS10, LBPRZ and
/// PROVISIONING TYPE 010b (thin); otherwise all clear (fully provisioned).
pub fn logical_block_provisioning(peripheral: u8, thin: bool) -> Vec<u8> {
    let mut body = [0u8; 4];
    if thin {
        body[1] = 0x80 | 0x40 | 0x20 | 0x04;
        body[2] = 0x02;
    }
    vpd(peripheral, page::LOGICAL_BLOCK_PROVISIONING, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SPC-4 §6.6.2: version 6, HiSup + format 2, TPGS 01b, CmdQue, padded ASCII, descriptors.
    #[test]
    fn standard_inquiry_bytes() {
        let b = standard(0, "RAFTSAN", "VIRTUAL-DISK", "0001");
        assert_eq!(b.len(), 74);
        assert_eq!(&b[0..8], &[0x00, 0x00, 0x06, 0x12, 69, 0x10, 0x00, 0x02]);
        assert_eq!(&b[8..16], b"RAFTSAN ");
        assert_eq!(&b[16..32], b"VIRTUAL-DISK    ");
        assert_eq!(&b[32..36], b"0001");
        assert_eq!(&b[58..68], &[0x00, 0xa0, 0x09, 0x60, 0x04, 0x60, 0x04, 0xc0, 0, 0]);
        // A controller does not claim SBC-3.
        let c = standard(device_type::STORAGE_ARRAY_CONTROLLER, "V", "P", "R");
        assert_eq!(c[0], 0x0c);
        assert_eq!(&c[64..66], &[0, 0]);
    }

    /// SPC-4 §7.8.6: NAA (LU), SCSI name string, relative port, port group (target port, PIV).
    #[test]
    fn device_identification_bytes() {
        let naa = [0x60; 16];
        let port = PortIdentity {
            target_name: "iqn.x:t",
            tpgt: 1,
            relative_port_id: 2,
            port_group: 3,
        };
        let b = device_identification(0, Some(&naa), &port);
        let mut want = vec![0x00, 0x83, 0, 60];
        want.extend_from_slice(&[0x01, 0x03, 0, 16]);
        want.extend_from_slice(&naa);
        want.extend_from_slice(&[0x53, 0x98, 0, 20]);
        want.extend_from_slice(b"iqn.x:t,t,0x0001\0\0\0\0");
        want.extend_from_slice(&[0x51, 0x94, 0, 4, 0, 0, 0, 2]);
        want.extend_from_slice(&[0x51, 0x95, 0, 4, 0, 0, 0, 3]);
        assert_eq!(b, want);
    }

    #[test]
    fn serial_and_supported_pages() {
        assert_eq!(unit_serial_number(0, "ab1"), [0, 0x80, 0, 3, b'a', b'b', b'1']);
        assert_eq!(supported_pages(0, &[0, 0x80]), [0, 0, 0, 2, 0, 0x80]);
    }

    /// SBC-3 §6.6.3: block limits page length 3Ch and field offsets; SBC-4 atomic fields at 44..56.
    #[test]
    fn block_limits_bytes() {
        let l = BlockLimits {
            wsnz: true,
            max_compare_and_write_len: 255,
            optimal_transfer_granularity: 8,
            max_transfer_len: 0x4000,
            optimal_transfer_len: 0x800,
            max_unmap_lba_count: 0xffff_ffff,
            max_unmap_descriptor_count: 256,
            optimal_unmap_granularity: 8,
            max_write_same_len: 0xffff,
            max_atomic_transfer_len: 256,
            atomic_alignment: 8,
            atomic_transfer_len_granularity: 8,
        };
        let b = block_limits(0, &l);
        assert_eq!(b.len(), 64);
        assert_eq!(
            &b[0..16],
            &[0, 0xb0, 0, 0x3c, 0x01, 0xff, 0, 8, 0, 0, 0x40, 0, 0, 0, 0x08, 0]
        );
        assert_eq!(&b[20..32], &[0xff, 0xff, 0xff, 0xff, 0, 0, 1, 0, 0, 0, 0, 8]);
        assert_eq!(&b[36..44], &[0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(&b[44..56], &[0, 0, 1, 0, 0, 0, 0, 8, 0, 0, 0, 8]);
        assert_eq!(&b[56..64], &[0; 8]);
        // WSNZ = 0: zero blocks means "to the end of the medium".
        let b = block_limits(0, &BlockLimits { wsnz: false, ..l });
        assert_eq!(b[4], 0);
    }

    /// SBC-3 §6.6.2 and §6.6.4.
    #[test]
    fn characteristics_and_provisioning() {
        let b = block_device_characteristics(0);
        assert_eq!(&b[0..6], &[0, 0xb1, 0, 0x3c, 0, 1]);
        assert_eq!(logical_block_provisioning(0, true), [0, 0xb2, 0, 4, 0, 0xe4, 0x02, 0]);
        assert_eq!(logical_block_provisioning(0, false), [0, 0xb2, 0, 4, 0, 0, 0, 0]);
        assert_eq!(&extended_inquiry(0)[0..7], &[0, 0x86, 0, 0x3c, 0, 0x07, 0x01]);
    }
}
