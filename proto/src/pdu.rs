//! iSCSI PDUs (RFC 7143 §11): framing, digests and one type per opcode.
//!
//! A PDU on the wire is a 48-byte Basic Header Segment (BHS), optional Additional Header Segments
//! (AHS, `TotalAHSLength` 4-byte words), an optional header digest, the data segment padded to a
//! multiple of 4 bytes, and an optional data digest (§11.2).
//!
//! Framing is two-phase (as in `mini-redis`'s `Frame::check`/`Frame::parse`):
//! 1. [`check`] looks at the buffered bytes and says whether a whole PDU is there
//!    ([`Framing::Incomplete`] is an ordinary value) or whether the header is malformed
//!    ([`FrameError`]), without allocating;
//! 2. [`decode`] splits the bytes of one complete PDU into a [`Pdu`] and verifies its digests.
//!
//! Typed views: each opcode has a struct with its header fields ([`ScsiCommand`], [`DataIn`], ...)
//! that parses from and writes to a [`Bhs`]. [`Request`] parses any initiator-to-target PDU.

use bytes::{BufMut, Bytes, BytesMut};

use crate::digest::{crc32c, crc32c_parts};

/// Length of the Basic Header Segment (§11.2.1).
pub const BHS_LEN: usize = 48;
/// Length of a CRC32C digest on the wire.
pub const DIGEST_LEN: usize = 4;
/// Largest data segment any negotiation can allow (MaxRecvDataSegmentLength ≤ 2^24-1, §13.12).
pub const MAX_DATA_SEGMENT_LEN: u32 = (1 << 24) - 1;
/// The reserved "no task tag" value (§11.1, ITT/TTT 0xffffffff).
pub const RESERVED_TAG: u32 = 0xffff_ffff;

// BHS offsets shared by every opcode (§11.2.1).
const OFF_OPCODE: usize = 0;
const OFF_FLAGS: usize = 1;
const OFF_TOTAL_AHS_LEN: usize = 4;
const OFF_DATA_SEG_LEN: usize = 5;
const OFF_LUN: usize = 8;
const OFF_ITT: usize = 16;
const OFF_20: usize = 20;
const OFF_24: usize = 24;
const OFF_28: usize = 28;
const OFF_32: usize = 32;
const OFF_36: usize = 36;
const OFF_40: usize = 40;
const OFF_44: usize = 44;
const _: () = assert!(OFF_44 + 4 == BHS_LEN);

const IMMEDIATE_BIT: u8 = 0x40;
const OPCODE_MASK: u8 = 0x3f;
const FINAL_BIT: u8 = 0x80;

/// iSCSI opcodes (§11.1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Opcode {
    NopOut,
    ScsiCommand,
    TaskMgmtRequest,
    LoginRequest,
    TextRequest,
    DataOut,
    LogoutRequest,
    SnackRequest,
    NopIn,
    ScsiResponse,
    TaskMgmtResponse,
    LoginResponse,
    TextResponse,
    DataIn,
    LogoutResponse,
    ReadyToTransfer,
    AsyncMessage,
    Reject,
    Unknown(u8),
}

impl Opcode {
    pub fn from_u8(v: u8) -> Opcode {
        match v & OPCODE_MASK {
            0x00 => Opcode::NopOut,
            0x01 => Opcode::ScsiCommand,
            0x02 => Opcode::TaskMgmtRequest,
            0x03 => Opcode::LoginRequest,
            0x04 => Opcode::TextRequest,
            0x05 => Opcode::DataOut,
            0x06 => Opcode::LogoutRequest,
            0x10 => Opcode::SnackRequest,
            0x20 => Opcode::NopIn,
            0x21 => Opcode::ScsiResponse,
            0x22 => Opcode::TaskMgmtResponse,
            0x23 => Opcode::LoginResponse,
            0x24 => Opcode::TextResponse,
            0x25 => Opcode::DataIn,
            0x26 => Opcode::LogoutResponse,
            0x31 => Opcode::ReadyToTransfer,
            0x32 => Opcode::AsyncMessage,
            0x3f => Opcode::Reject,
            other => Opcode::Unknown(other),
        }
    }

    pub fn to_u8(self) -> u8 {
        match self {
            Opcode::NopOut => 0x00,
            Opcode::ScsiCommand => 0x01,
            Opcode::TaskMgmtRequest => 0x02,
            Opcode::LoginRequest => 0x03,
            Opcode::TextRequest => 0x04,
            Opcode::DataOut => 0x05,
            Opcode::LogoutRequest => 0x06,
            Opcode::SnackRequest => 0x10,
            Opcode::NopIn => 0x20,
            Opcode::ScsiResponse => 0x21,
            Opcode::TaskMgmtResponse => 0x22,
            Opcode::LoginResponse => 0x23,
            Opcode::TextResponse => 0x24,
            Opcode::DataIn => 0x25,
            Opcode::LogoutResponse => 0x26,
            Opcode::ReadyToTransfer => 0x31,
            Opcode::AsyncMessage => 0x32,
            Opcode::Reject => 0x3f,
            Opcode::Unknown(v) => v & OPCODE_MASK,
        }
    }
}

/// The 48-byte Basic Header Segment, with accessors for the fields every opcode shares.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Bhs(pub [u8; BHS_LEN]);

impl std::fmt::Debug for Bhs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bhs({:?} {})", self.opcode(), hex::encode(self.0))
    }
}

impl Default for Bhs {
    fn default() -> Self {
        Bhs([0; BHS_LEN])
    }
}

impl Bhs {
    fn new(opcode: Opcode) -> Bhs {
        let mut b = Bhs::default();
        b.0[OFF_OPCODE] = opcode.to_u8();
        b
    }
    pub fn opcode(&self) -> Opcode {
        Opcode::from_u8(self.0[OFF_OPCODE])
    }
    pub fn immediate(&self) -> bool {
        self.0[OFF_OPCODE] & IMMEDIATE_BIT != 0
    }
    fn set_immediate(&mut self, on: bool) {
        self.set_bit(OFF_OPCODE, IMMEDIATE_BIT, on);
    }
    pub fn flags(&self) -> u8 {
        self.0[OFF_FLAGS]
    }
    pub fn final_bit(&self) -> bool {
        self.0[OFF_FLAGS] & FINAL_BIT != 0
    }
    /// Total AHS length in bytes.
    pub fn total_ahs_len(&self) -> usize {
        usize::from(self.0[OFF_TOTAL_AHS_LEN]) * 4
    }
    pub fn data_segment_len(&self) -> u32 {
        u32::from_be_bytes([
            0,
            self.0[OFF_DATA_SEG_LEN],
            self.0[OFF_DATA_SEG_LEN + 1],
            self.0[OFF_DATA_SEG_LEN + 2],
        ])
    }
    fn set_lengths(&mut self, ahs_len: usize, data_len: u32) {
        debug_assert!(ahs_len.is_multiple_of(4) && ahs_len / 4 <= 255);
        debug_assert!(data_len <= MAX_DATA_SEGMENT_LEN);
        self.0[OFF_TOTAL_AHS_LEN] = (ahs_len / 4) as u8;
        let d = data_len.to_be_bytes();
        self.0[OFF_DATA_SEG_LEN..OFF_DATA_SEG_LEN + 3].copy_from_slice(&d[1..4]);
    }
    pub fn itt(&self) -> u32 {
        self.u32_at(OFF_ITT)
    }
    pub fn lun_raw(&self) -> [u8; 8] {
        let mut l = [0; 8];
        l.copy_from_slice(&self.0[OFF_LUN..OFF_LUN + 8]);
        l
    }
    fn u16_at(&self, off: usize) -> u16 {
        u16::from_be_bytes([self.0[off], self.0[off + 1]])
    }
    fn u32_at(&self, off: usize) -> u32 {
        u32::from_be_bytes([self.0[off], self.0[off + 1], self.0[off + 2], self.0[off + 3]])
    }
    fn set_u16(&mut self, off: usize, v: u16) {
        self.0[off..off + 2].copy_from_slice(&v.to_be_bytes());
    }
    fn set_u32(&mut self, off: usize, v: u32) {
        self.0[off..off + 4].copy_from_slice(&v.to_be_bytes());
    }
    fn bit(&self, off: usize, mask: u8) -> bool {
        self.0[off] & mask != 0
    }
    fn set_bit(&mut self, off: usize, mask: u8, on: bool) {
        if on {
            self.0[off] |= mask;
        } else {
            self.0[off] &= !mask;
        }
    }
    fn lun(&self) -> u64 {
        lun_from_wire(self.lun_raw())
    }
    /// Fills the sequence numbers of a target-to-initiator status PDU at their common offsets
    /// (§11.4, §11.7, §11.8, ...): StatSN when given (reserved otherwise), ExpCmdSN, MaxCmdSN.
    pub fn set_sequence(&mut self, statsn: Option<u32>, exp_cmdsn: u32, max_cmdsn: u32) {
        if let Some(sn) = statsn {
            self.set_u32(OFF_24, sn);
        }
        self.set_u32(OFF_28, exp_cmdsn);
        self.set_u32(OFF_32, max_cmdsn);
    }
    fn set_lun(&mut self, lun: u64) {
        self.0[OFF_LUN..OFF_LUN + 8].copy_from_slice(&lun_to_wire(lun));
    }
}

/// Decodes an 8-byte SAM LUN (SAM-5 §4.7) into a LUN number: peripheral (method 00b) and flat
/// (method 01b) single-level addressing; anything else keeps its raw 64-bit value so it matches
/// no configured LUN.
pub fn lun_from_wire(raw: [u8; 8]) -> u64 {
    let rest_zero = raw[2..].iter().all(|&b| b == 0);
    match raw[0] >> 6 {
        0b00 if rest_zero && raw[0] == 0 => u64::from(raw[1]),
        0b01 if rest_zero => (u64::from(raw[0] & 0x3f) << 8) | u64::from(raw[1]),
        _ => u64::from_be_bytes(raw) | (1 << 63),
    }
}

/// Encodes a LUN number as tgt and Linux do: peripheral addressing below 256, flat above
/// (up to 16383).
pub fn lun_to_wire(lun: u64) -> [u8; 8] {
    let mut raw = [0u8; 8];
    if lun < 256 {
        raw[1] = lun as u8;
    } else if lun < 16384 {
        raw[0] = 0x40 | ((lun >> 8) as u8);
        raw[1] = lun as u8;
    } else {
        raw = (lun & !(1 << 63)).to_be_bytes();
    }
    raw
}

/// Which digests a connection negotiated (§13.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digests {
    pub header: bool,
    pub data: bool,
}

/// A whole PDU: header, additional header segments and data segment (without padding/digests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pdu {
    pub bhs: Bhs,
    pub ahs: Bytes,
    pub data: Bytes,
}

/// What [`check`] found in a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// Not a whole PDU yet; at least this many bytes in all are needed.
    Incomplete { needed: usize },
    /// A whole PDU of this many bytes (padding and digests included) starts the buffer.
    Complete { len: usize },
}

/// Malformed framing: the byte stream cannot be trusted past this point (§7.8: at ERL 0 the
/// connection is closed).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The peer sent a data segment longer than the limit it negotiated.
    #[error("data segment of {len} bytes exceeds the negotiated limit of {max} bytes")]
    DataSegmentTooLong { len: u32, max: u32 },
    /// The header digest did not match: the length fields cannot be trusted.
    #[error("header digest mismatch (received {received:#010x}, computed {computed:#010x})")]
    HeaderDigest { received: u32, computed: u32 },
    /// The data digest did not match.
    #[error("data digest mismatch (received {received:#010x}, computed {computed:#010x})")]
    DataDigest { received: u32, computed: u32 },
    /// `decode` was given a buffer whose length does not match its header.
    #[error("buffer of {got} bytes does not hold exactly one PDU of {want} bytes")]
    Length { got: usize, want: usize },
}

fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

/// Total on-wire length of a PDU with this header.
pub fn wire_len(bhs: &Bhs, digests: Digests) -> usize {
    let data = bhs.data_segment_len() as usize;
    BHS_LEN
        + bhs.total_ahs_len()
        + if digests.header { DIGEST_LEN } else { 0 }
        + data
        + pad4(data)
        + if digests.data && data > 0 { DIGEST_LEN } else { 0 }
}

/// Phase one of framing: does `buf` start with a whole PDU? `max_data_segment` is the
/// MaxRecvDataSegmentLength this side declared (the data segment of a Login/Text PDU is bounded
/// by the caller before negotiation).
pub fn check(buf: &[u8], digests: Digests, max_data_segment: u32) -> Result<Framing, FrameError> {
    if buf.len() < BHS_LEN {
        return Ok(Framing::Incomplete { needed: BHS_LEN });
    }
    let mut bhs = Bhs::default();
    bhs.0.copy_from_slice(&buf[..BHS_LEN]);
    let ahs_len = bhs.total_ahs_len();
    if digests.header {
        // Verify the header digest before trusting the lengths it covers.
        let hdr_len = BHS_LEN + ahs_len;
        if buf.len() < hdr_len + DIGEST_LEN {
            return Ok(Framing::Incomplete {
                needed: hdr_len + DIGEST_LEN,
            });
        }
        let received = u32::from_le_bytes([buf[hdr_len], buf[hdr_len + 1], buf[hdr_len + 2], buf[hdr_len + 3]]);
        let computed = crc32c(&buf[..hdr_len]);
        if received != computed {
            return Err(FrameError::HeaderDigest { received, computed });
        }
    }
    let data_len = bhs.data_segment_len();
    if data_len > max_data_segment {
        return Err(FrameError::DataSegmentTooLong {
            len: data_len,
            max: max_data_segment,
        });
    }
    let len = wire_len(&bhs, digests);
    if buf.len() < len {
        Ok(Framing::Incomplete { needed: len })
    } else {
        Ok(Framing::Complete { len })
    }
}

/// Phase two of framing: splits exactly one complete PDU (as measured by [`check`]) and verifies
/// the data digest. The AHS and data are zero-copy slices of `buf`.
pub fn decode(buf: Bytes, digests: Digests) -> Result<Pdu, FrameError> {
    if buf.len() < BHS_LEN {
        return Err(FrameError::Length {
            got: buf.len(),
            want: BHS_LEN,
        });
    }
    let mut bhs = Bhs::default();
    bhs.0.copy_from_slice(&buf[..BHS_LEN]);
    let want = wire_len(&bhs, digests);
    if buf.len() != want {
        return Err(FrameError::Length { got: buf.len(), want });
    }
    let ahs_end = BHS_LEN + bhs.total_ahs_len();
    let data_start = ahs_end + if digests.header { DIGEST_LEN } else { 0 };
    let data_len = bhs.data_segment_len() as usize;
    let padded = data_len + pad4(data_len);
    if digests.data && data_len > 0 {
        let d = data_start + padded;
        let received = u32::from_le_bytes([buf[d], buf[d + 1], buf[d + 2], buf[d + 3]]);
        let computed = crc32c(&buf[data_start..data_start + padded]);
        if received != computed {
            return Err(FrameError::DataDigest { received, computed });
        }
    }
    Ok(Pdu {
        bhs,
        ahs: buf.slice(BHS_LEN..ahs_end),
        data: buf.slice(data_start..data_start + data_len),
    })
}

/// Writes `pdu` to `out` with padding and the negotiated digests. The header's length fields are
/// set from `pdu.ahs` and `pdu.data`.
pub fn encode(pdu: &Pdu, digests: Digests, out: &mut BytesMut) {
    encode_parts(pdu.bhs, &pdu.ahs, &pdu.data, digests, out);
}

/// Like [`encode`], from borrowed parts (so Data-In can be sent from a slice of a larger buffer).
pub fn encode_parts(mut bhs: Bhs, ahs: &[u8], data: &[u8], digests: Digests, out: &mut BytesMut) {
    bhs.set_lengths(ahs.len(), data.len() as u32);
    let start = out.len();
    out.reserve(BHS_LEN + ahs.len() + 2 * DIGEST_LEN + data.len() + 3);
    out.put_slice(&bhs.0);
    out.put_slice(ahs);
    if digests.header {
        let d = crc32c(&out[start..]);
        out.put_u32_le(d);
    }
    if !data.is_empty() {
        let pad = [0u8; 3];
        let pad = &pad[..pad4(data.len())];
        out.put_slice(data);
        out.put_slice(pad);
        if digests.data {
            out.put_u32_le(crc32c_parts(&[data, pad]));
        }
    }
}

/// AHS types (§11.2.1.2).
pub mod ahs_type {
    /// Extended CDB: the CDB bytes beyond the first 16.
    pub const EXTENDED_CDB: u8 = 1;
    /// Expected bidirectional read data length.
    pub const BIDI_READ_LENGTH: u8 = 2;
}

/// Iterates the AHS entries of a PDU as `(type, specific bytes)`; malformed AHS stops iteration
/// with an error.
pub fn ahs_entries(ahs: &[u8]) -> impl Iterator<Item = Result<(u8, &[u8]), PduError>> {
    let mut rest = ahs;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        if rest.len() < 4 {
            rest = &[];
            return Some(Err(PduError::BadAhs));
        }
        // AHSLength counts the specific bytes including the reserved byte after the type.
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let ty = rest[2];
        let total = 3 + len;
        let padded = total + pad4(total);
        if len == 0 || rest.len() < padded {
            rest = &[];
            return Some(Err(PduError::BadAhs));
        }
        let specific = &rest[4..total];
        rest = &rest[padded..];
        Some(Ok((ty, specific)))
    })
}

/// A PDU whose header fields are not valid for its opcode (§11: becomes a Reject).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PduError {
    #[error("opcode {0:#04x} is not valid from an initiator")]
    UnexpectedOpcode(u8),
    #[error("malformed additional header segment")]
    BadAhs,
    #[error("CDB longer than 260 bytes")]
    CdbTooLong,
}

/// The largest CDB the target accepts (16 in the BHS + 244 in an extended-CDB AHS, RFC 7143
/// §11.3.7 allows up to 16 + 1020 - 1; SPC variable-length CDBs stay well below this).
pub const MAX_CDB_LEN: usize = 260;

// --- initiator to target ------------------------------------------------------------------

/// NOP-Out (§11.18).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NopOut {
    pub immediate: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmdsn: u32,
    pub exp_statsn: u32,
}

impl NopOut {
    pub fn parse(b: &Bhs) -> Self {
        NopOut {
            immediate: b.immediate(),
            lun: b.lun(),
            itt: b.itt(),
            ttt: b.u32_at(OFF_20),
            cmdsn: b.u32_at(OFF_24),
            exp_statsn: b.u32_at(OFF_28),
        }
    }
    pub fn to_bhs(&self) -> Bhs {
        let mut b = Bhs::new(Opcode::NopOut);
        b.set_immediate(self.immediate);
        b.0[OFF_FLAGS] = FINAL_BIT;
        b.set_lun(self.lun);
        b.set_u32(OFF_ITT, self.itt);
        b.set_u32(OFF_20, self.ttt);
        b.set_u32(OFF_24, self.cmdsn);
        b.set_u32(OFF_28, self.exp_statsn);
        b
    }
}

/// SCSI Command (§11.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScsiCommand {
    pub immediate: bool,
    pub final_: bool,
    pub read: bool,
    pub write: bool,
    /// Task attribute (§11.3.1.3): 0 untagged, 1 simple, 2 ordered, 3 head of queue, 4 ACA.
    pub attr: u8,
    pub lun: u64,
    pub itt: u32,
    pub expected_data_len: u32,
    pub cmdsn: u32,
    pub exp_statsn: u32,
    /// The first 16 CDB bytes; longer CDBs continue in an extended-CDB AHS.
    pub cdb: [u8; 16],
}

const SCMD_READ: u8 = 0x40;
const SCMD_WRITE: u8 = 0x20;
const SCMD_ATTR: u8 = 0x07;

impl ScsiCommand {
    pub fn parse(b: &Bhs) -> Self {
        let mut cdb = [0; 16];
        cdb.copy_from_slice(&b.0[OFF_32..OFF_32 + 16]);
        ScsiCommand {
            immediate: b.immediate(),
            final_: b.final_bit(),
            read: b.bit(OFF_FLAGS, SCMD_READ),
            write: b.bit(OFF_FLAGS, SCMD_WRITE),
            attr: b.flags() & SCMD_ATTR,
            lun: b.lun(),
            itt: b.itt(),
            expected_data_len: b.u32_at(OFF_20),
            cmdsn: b.u32_at(OFF_24),
            exp_statsn: b.u32_at(OFF_28),
            cdb,
        }
    }
    pub fn to_bhs(&self) -> Bhs {
        let mut b = Bhs::new(Opcode::ScsiCommand);
        b.set_immediate(self.immediate);
        b.set_bit(OFF_FLAGS, FINAL_BIT, self.final_);
        b.set_bit(OFF_FLAGS, SCMD_READ, self.read);
        b.set_bit(OFF_FLAGS, SCMD_WRITE, self.write);
        b.0[OFF_FLAGS] |= self.attr & SCMD_ATTR;
        b.set_lun(self.lun);
        b.set_u32(OFF_ITT, self.itt);
        b.set_u32(OFF_20, self.expected_data_len);
        b.set_u32(OFF_24, self.cmdsn);
        b.set_u32(OFF_28, self.exp_statsn);
        b.0[OFF_32..OFF_32 + 16].copy_from_slice(&self.cdb);
        b
    }

    /// The whole CDB: the 16 BHS bytes plus an extended-CDB AHS when present (§11.3.5,
    /// §11.2.1.3). Without an AHS the CDB is 16 bytes (trailing bytes beyond the opcode's CDB
    /// length are ignored by the CDB decoder).
    pub fn full_cdb(&self, ahs: &[u8]) -> Result<Vec<u8>, PduError> {
        let mut cdb = self.cdb.to_vec();
        for entry in ahs_entries(ahs) {
            let (ty, specific) = entry?;
            if ty == ahs_type::EXTENDED_CDB {
                // `ahs_entries` already stepped over the reserved byte after the type.
                let ext = specific;
                if cdb.len() + ext.len() > MAX_CDB_LEN {
                    return Err(PduError::CdbTooLong);
                }
                cdb.extend_from_slice(ext);
            }
        }
        Ok(cdb)
    }
}

/// Task Management Function Request (§11.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskMgmtRequest {
    pub immediate: bool,
    pub function: u8,
    pub lun: u64,
    pub itt: u32,
    pub referenced_task_tag: u32,
    pub cmdsn: u32,
    pub exp_statsn: u32,
    pub ref_cmdsn: u32,
    pub exp_datasn: u32,
}

/// Task management function codes (§11.5.1).
pub mod tmf {
    pub const ABORT_TASK: u8 = 1;
    pub const ABORT_TASK_SET: u8 = 2;
    pub const CLEAR_ACA: u8 = 3;
    pub const CLEAR_TASK_SET: u8 = 4;
    pub const LOGICAL_UNIT_RESET: u8 = 5;
    pub const TARGET_WARM_RESET: u8 = 6;
    pub const TARGET_COLD_RESET: u8 = 7;
    pub const TASK_REASSIGN: u8 = 8;

    /// Responses (§11.6.1).
    pub const FUNCTION_COMPLETE: u8 = 0;
    pub const TASK_DOES_NOT_EXIST: u8 = 1;
    pub const LUN_DOES_NOT_EXIST: u8 = 2;
    pub const TASK_STILL_ALLEGIANT: u8 = 3;
    pub const TASK_REASSIGNMENT_NOT_SUPPORTED: u8 = 4;
    pub const FUNCTION_NOT_SUPPORTED: u8 = 5;
    pub const AUTHORIZATION_FAILED: u8 = 6;
    pub const FUNCTION_REJECTED: u8 = 255;
}

impl TaskMgmtRequest {
    pub fn parse(b: &Bhs) -> Self {
        TaskMgmtRequest {
            immediate: b.immediate(),
            function: b.flags() & 0x7f,
            lun: b.lun(),
            itt: b.itt(),
            referenced_task_tag: b.u32_at(OFF_20),
            cmdsn: b.u32_at(OFF_24),
            exp_statsn: b.u32_at(OFF_28),
            ref_cmdsn: b.u32_at(OFF_32),
            exp_datasn: b.u32_at(OFF_36),
        }
    }
    pub fn to_bhs(&self) -> Bhs {
        let mut b = Bhs::new(Opcode::TaskMgmtRequest);
        b.set_immediate(self.immediate);
        b.0[OFF_FLAGS] = FINAL_BIT | (self.function & 0x7f);
        b.set_lun(self.lun);
        b.set_u32(OFF_ITT, self.itt);
        b.set_u32(OFF_20, self.referenced_task_tag);
        b.set_u32(OFF_24, self.cmdsn);
        b.set_u32(OFF_28, self.exp_statsn);
        b.set_u32(OFF_32, self.ref_cmdsn);
        b.set_u32(OFF_36, self.exp_datasn);
        b
    }
}

/// Login Request (§11.12).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoginRequest {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmdsn: u32,
    pub exp_statsn: u32,
}

const LOGIN_TRANSIT: u8 = 0x80;
const LOGIN_CONTINUE: u8 = 0x40;

impl LoginRequest {
    pub fn parse(b: &Bhs) -> Self {
        let mut isid = [0; 6];
        isid.copy_from_slice(&b.0[OFF_LUN..OFF_LUN + 6]);
        LoginRequest {
            transit: b.bit(OFF_FLAGS, LOGIN_TRANSIT),
            cont: b.bit(OFF_FLAGS, LOGIN_CONTINUE),
            csg: (b.flags() >> 2) & 3,
            nsg: b.flags() & 3,
            version_max: b.0[2],
            version_min: b.0[3],
            isid,
            tsih: b.u16_at(OFF_LUN + 6),
            itt: b.itt(),
            cid: b.u16_at(OFF_20),
            cmdsn: b.u32_at(OFF_24),
            exp_statsn: b.u32_at(OFF_28),
        }
    }
    pub fn to_bhs(&self) -> Bhs {
        let mut b = Bhs::new(Opcode::LoginRequest);
        b.set_immediate(true);
        b.set_bit(OFF_FLAGS, LOGIN_TRANSIT, self.transit);
        b.set_bit(OFF_FLAGS, LOGIN_CONTINUE, self.cont);
        b.0[OFF_FLAGS] |= ((self.csg & 3) << 2) | (self.nsg & 3);
        b.0[2] = self.version_max;
        b.0[3] = self.version_min;
        b.0[OFF_LUN..OFF_LUN + 6].copy_from_slice(&self.isid);
        b.set_u16(OFF_LUN + 6, self.tsih);
        b.set_u32(OFF_ITT, self.itt);
        b.set_u16(OFF_20, self.cid);
        b.set_u32(OFF_24, self.cmdsn);
        b.set_u32(OFF_28, self.exp_statsn);
        b
    }
}

/// Text Request (§11.10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TextRequest {
    pub immediate: bool,
    pub final_: bool,
    pub cont: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmdsn: u32,
    pub exp_statsn: u32,
}

const TEXT_CONTINUE: u8 = 0x40;

impl TextRequest {
    pub fn parse(b: &Bhs) -> Self {
        TextRequest {
            immediate: b.immediate(),
            final_: b.final_bit(),
            cont: b.bit(OFF_FLAGS, TEXT_CONTINUE),
            lun: b.lun(),
            itt: b.itt(),
            ttt: b.u32_at(OFF_20),
            cmdsn: b.u32_at(OFF_24),
            exp_statsn: b.u32_at(OFF_28),
        }
    }
    pub fn to_bhs(&self) -> Bhs {
        let mut b = Bhs::new(Opcode::TextRequest);
        b.set_immediate(self.immediate);
        b.set_bit(OFF_FLAGS, FINAL_BIT, self.final_);
        b.set_bit(OFF_FLAGS, TEXT_CONTINUE, self.cont);
        b.set_lun(self.lun);
        b.set_u32(OFF_ITT, self.itt);
        b.set_u32(OFF_20, self.ttt);
        b.set_u32(OFF_24, self.cmdsn);
        b.set_u32(OFF_28, self.exp_statsn);
        b
    }
}

/// SCSI Data-Out (§11.7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataOut {
    pub final_: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub exp_statsn: u32,
    pub datasn: u32,
    pub buffer_offset: u32,
}

impl DataOut {
    pub fn parse(b: &Bhs) -> Self {
        DataOut {
            final_: b.final_bit(),
            lun: b.lun(),
            itt: b.itt(),
            ttt: b.u32_at(OFF_20),
            exp_statsn: b.u32_at(OFF_28),
            datasn: b.u32_at(OFF_36),
            buffer_offset: b.u32_at(OFF_40),
        }
    }
    pub fn to_bhs(&self) -> Bhs {
        let mut b = Bhs::new(Opcode::DataOut);
        b.set_bit(OFF_FLAGS, FINAL_BIT, self.final_);
        b.set_lun(self.lun);
        b.set_u32(OFF_ITT, self.itt);
        b.set_u32(OFF_20, self.ttt);
        b.set_u32(OFF_28, self.exp_statsn);
        b.set_u32(OFF_36, self.datasn);
        b.set_u32(OFF_40, self.buffer_offset);
        b
    }
}

/// Logout Request (§11.14).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogoutRequest {
    pub immediate: bool,
    /// 0 close the session, 1 close the connection, 2 remove the connection for recovery.
    pub reason: u8,
    pub itt: u32,
    pub cid: u16,
    pub cmdsn: u32,
    pub exp_statsn: u32,
}

impl LogoutRequest {
    pub fn parse(b: &Bhs) -> Self {
        LogoutRequest {
            immediate: b.immediate(),
            reason: b.flags() & 0x7f,
            itt: b.itt(),
            cid: b.u16_at(OFF_20),
            cmdsn: b.u32_at(OFF_24),
            exp_statsn: b.u32_at(OFF_28),
        }
    }
    pub fn to_bhs(&self) -> Bhs {
        let mut b = Bhs::new(Opcode::LogoutRequest);
        b.set_immediate(self.immediate);
        b.0[OFF_FLAGS] = FINAL_BIT | (self.reason & 0x7f);
        b.set_u32(OFF_ITT, self.itt);
        b.set_u16(OFF_20, self.cid);
        b.set_u32(OFF_24, self.cmdsn);
        b.set_u32(OFF_28, self.exp_statsn);
        b
    }
}

/// SNACK Request (§11.16). At ErrorRecoveryLevel 0 the target rejects it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnackRequest {
    pub snack_type: u8,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub exp_statsn: u32,
    pub beg_run: u32,
    pub run_length: u32,
}

impl SnackRequest {
    pub fn parse(b: &Bhs) -> Self {
        SnackRequest {
            snack_type: b.flags() & 0x0f,
            lun: b.lun(),
            itt: b.itt(),
            ttt: b.u32_at(OFF_20),
            exp_statsn: b.u32_at(OFF_28),
            beg_run: b.u32_at(OFF_40),
            run_length: b.u32_at(OFF_44),
        }
    }
}

/// Any PDU an initiator may send, parsed from its header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    NopOut(NopOut),
    ScsiCommand(ScsiCommand),
    TaskMgmt(TaskMgmtRequest),
    Login(LoginRequest),
    Text(TextRequest),
    DataOut(DataOut),
    Logout(LogoutRequest),
    Snack(SnackRequest),
}

impl Request {
    /// Parses an initiator PDU's header. Target-to-initiator and unknown opcodes are errors
    /// (the target answers them with Reject, reason "protocol error" / "command not supported").
    pub fn parse(bhs: &Bhs) -> Result<Request, PduError> {
        Ok(match bhs.opcode() {
            Opcode::NopOut => Request::NopOut(NopOut::parse(bhs)),
            Opcode::ScsiCommand => Request::ScsiCommand(ScsiCommand::parse(bhs)),
            Opcode::TaskMgmtRequest => Request::TaskMgmt(TaskMgmtRequest::parse(bhs)),
            Opcode::LoginRequest => Request::Login(LoginRequest::parse(bhs)),
            Opcode::TextRequest => Request::Text(TextRequest::parse(bhs)),
            Opcode::DataOut => Request::DataOut(DataOut::parse(bhs)),
            Opcode::LogoutRequest => Request::Logout(LogoutRequest::parse(bhs)),
            Opcode::SnackRequest => Request::Snack(SnackRequest::parse(bhs)),
            other => return Err(PduError::UnexpectedOpcode(other.to_u8())),
        })
    }

    /// The CmdSN of a command-carrying request (`None` for Data-Out and SNACK, which carry none).
    pub fn cmdsn(&self) -> Option<u32> {
        match self {
            Request::NopOut(p) => Some(p.cmdsn),
            Request::ScsiCommand(p) => Some(p.cmdsn),
            Request::TaskMgmt(p) => Some(p.cmdsn),
            Request::Login(p) => Some(p.cmdsn),
            Request::Text(p) => Some(p.cmdsn),
            Request::Logout(p) => Some(p.cmdsn),
            Request::DataOut(_) | Request::Snack(_) => None,
        }
    }
}

// --- target to initiator ------------------------------------------------------------------

/// The sequence numbers every target-to-initiator status PDU carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sequence {
    pub statsn: u32,
    pub exp_cmdsn: u32,
    pub max_cmdsn: u32,
}

impl Sequence {
    fn write(&self, b: &mut Bhs) {
        b.set_u32(OFF_24, self.statsn);
        b.set_u32(OFF_28, self.exp_cmdsn);
        b.set_u32(OFF_32, self.max_cmdsn);
    }
    fn read(b: &Bhs) -> Self {
        Sequence {
            statsn: b.u32_at(OFF_24),
            exp_cmdsn: b.u32_at(OFF_28),
            max_cmdsn: b.u32_at(OFF_32),
        }
    }
}

/// NOP-In (§11.19).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NopIn {
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub seq: Sequence,
}

impl NopIn {
    pub fn to_bhs(&self) -> Bhs {
        let mut b = Bhs::new(Opcode::NopIn);
        b.0[OFF_FLAGS] = FINAL_BIT;
        b.set_lun(self.lun);
        b.set_u32(OFF_ITT, self.itt);
        b.set_u32(OFF_20, self.ttt);
        self.seq.write(&mut b);
        b
    }
    pub fn parse(b: &Bhs) -> Self {
        NopIn {
            lun: b.lun(),
            itt: b.itt(),
            ttt: b.u32_at(OFF_20),
            seq: Sequence::read(b),
        }
    }
}

/// Residual flags and count of a SCSI Response or final Data-In (§11.4.5).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Residual {
    #[default]
    None,
    /// The command moved fewer bytes than the initiator expected.
    Underflow(u32),
    /// The command wanted more bytes than the initiator expected.
    Overflow(u32),
}

impl Residual {
    const O: u8 = 0x04;
    const U: u8 = 0x02;
    fn flags(self) -> u8 {
        match self {
            Residual::None => 0,
            Residual::Underflow(_) => Self::U,
            Residual::Overflow(_) => Self::O,
        }
    }
    fn count(self) -> u32 {
        match self {
            Residual::None => 0,
            Residual::Underflow(n) | Residual::Overflow(n) => n,
        }
    }
    fn read(flags: u8, count: u32) -> Self {
        if flags & Self::U != 0 {
            Residual::Underflow(count)
        } else if flags & Self::O != 0 {
            Residual::Overflow(count)
        } else {
            Residual::None
        }
    }
    /// The residual between what the initiator expected and what the command transferred.
    pub fn between(expected: u32, actual: u32) -> Self {
        use std::cmp::Ordering::*;
        match actual.cmp(&expected) {
            Equal => Residual::None,
            Less => Residual::Underflow(expected - actual),
            Greater => Residual::Overflow(actual - expected),
        }
    }
}

/// SCSI Response (§11.4). The data segment carries sense data prefixed by its 2-byte length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScsiResponse {
    /// iSCSI service response (§11.4.3): 0 command completed at target, 1 target failure.
    pub response: u8,
    pub status: u8,
    pub itt: u32,
    pub seq: Sequence,
    pub exp_datasn: u32,
    pub residual: Residual,
}

impl ScsiResponse {
    pub fn to_bhs(&self) -> Bhs {
        let mut b = Bhs::new(Opcode::ScsiResponse);
        b.0[OFF_FLAGS] = FINAL_BIT | self.residual.flags();
        b.0[2] = self.response;
        b.0[3] = self.status;
        b.set_u32(OFF_ITT, self.itt);
        self.seq.write(&mut b);
        b.set_u32(OFF_36, self.exp_datasn);
        b.set_u32(OFF_44, self.residual.count());
        b
    }
    pub fn parse(b: &Bhs) -> Self {
        ScsiResponse {
            response: b.0[2],
            status: b.0[3],
            itt: b.itt(),
            seq: Sequence::read(b),
            exp_datasn: b.u32_at(OFF_36),
            residual: Residual::read(b.flags(), b.u32_at(OFF_44)),
        }
    }
}

/// Builds the data segment of a SCSI Response carrying sense data (§11.4.7.2).
pub fn sense_segment(sense: &[u8]) -> Bytes {
    let mut d = BytesMut::with_capacity(2 + sense.len());
    d.put_u16(sense.len() as u16);
    d.put_slice(sense);
    d.freeze()
}

/// Task Management Function Response (§11.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskMgmtResponse {
    pub response: u8,
    pub itt: u32,
    pub seq: Sequence,
}

impl TaskMgmtResponse {
    pub fn to_bhs(&self) -> Bhs {
        let mut b = Bhs::new(Opcode::TaskMgmtResponse);
        b.0[OFF_FLAGS] = FINAL_BIT;
        b.0[2] = self.response;
        b.set_u32(OFF_ITT, self.itt);
        self.seq.write(&mut b);
        b
    }
    pub fn parse(b: &Bhs) -> Self {
        TaskMgmtResponse {
            response: b.0[2],
            itt: b.itt(),
            seq: Sequence::read(b),
        }
    }
}

/// Login Response (§11.13).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoginResponse {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_active: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub seq: Sequence,
    pub status_class: u8,
    pub status_detail: u8,
}

impl LoginResponse {
    pub fn to_bhs(&self) -> Bhs {
        let mut b = Bhs::new(Opcode::LoginResponse);
        b.set_bit(OFF_FLAGS, LOGIN_TRANSIT, self.transit);
        b.set_bit(OFF_FLAGS, LOGIN_CONTINUE, self.cont);
        b.0[OFF_FLAGS] |= ((self.csg & 3) << 2) | (self.nsg & 3);
        b.0[2] = self.version_max;
        b.0[3] = self.version_active;
        b.0[OFF_LUN..OFF_LUN + 6].copy_from_slice(&self.isid);
        b.set_u16(OFF_LUN + 6, self.tsih);
        b.set_u32(OFF_ITT, self.itt);
        self.seq.write(&mut b);
        b.0[OFF_36] = self.status_class;
        b.0[OFF_36 + 1] = self.status_detail;
        b
    }
    pub fn parse(b: &Bhs) -> Self {
        let mut isid = [0; 6];
        isid.copy_from_slice(&b.0[OFF_LUN..OFF_LUN + 6]);
        LoginResponse {
            transit: b.bit(OFF_FLAGS, LOGIN_TRANSIT),
            cont: b.bit(OFF_FLAGS, LOGIN_CONTINUE),
            csg: (b.flags() >> 2) & 3,
            nsg: b.flags() & 3,
            version_max: b.0[2],
            version_active: b.0[3],
            isid,
            tsih: b.u16_at(OFF_LUN + 6),
            itt: b.itt(),
            seq: Sequence::read(b),
            status_class: b.0[OFF_36],
            status_detail: b.0[OFF_36 + 1],
        }
    }
}

/// Text Response (§11.11).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TextResponse {
    pub final_: bool,
    pub cont: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub seq: Sequence,
}

impl TextResponse {
    pub fn to_bhs(&self) -> Bhs {
        let mut b = Bhs::new(Opcode::TextResponse);
        b.set_bit(OFF_FLAGS, FINAL_BIT, self.final_);
        b.set_bit(OFF_FLAGS, TEXT_CONTINUE, self.cont);
        b.set_lun(self.lun);
        b.set_u32(OFF_ITT, self.itt);
        b.set_u32(OFF_20, self.ttt);
        self.seq.write(&mut b);
        b
    }
    pub fn parse(b: &Bhs) -> Self {
        TextResponse {
            final_: b.final_bit(),
            cont: b.bit(OFF_FLAGS, TEXT_CONTINUE),
            lun: b.lun(),
            itt: b.itt(),
            ttt: b.u32_at(OFF_20),
            seq: Sequence::read(b),
        }
    }
}

/// SCSI Data-In (§11.7). With `status` set, this is the final PDU and carries the command's
/// status (status collapse, §11.7.4); its StatSN is then valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataIn {
    pub final_: bool,
    pub status: Option<u8>,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub seq: Sequence,
    pub datasn: u32,
    pub buffer_offset: u32,
    pub residual: Residual,
}

const DATAIN_STATUS: u8 = 0x01;

impl DataIn {
    pub fn to_bhs(&self) -> Bhs {
        let mut b = Bhs::new(Opcode::DataIn);
        b.set_bit(OFF_FLAGS, FINAL_BIT, self.final_);
        if let Some(status) = self.status {
            b.0[OFF_FLAGS] |= DATAIN_STATUS | self.residual.flags();
            b.0[3] = status;
            b.set_u32(OFF_44, self.residual.count());
        }
        b.set_lun(self.lun);
        b.set_u32(OFF_ITT, self.itt);
        b.set_u32(OFF_20, self.ttt);
        if self.status.is_some() {
            self.seq.write(&mut b);
        } else {
            // StatSN is reserved without status; ExpCmdSN/MaxCmdSN are always valid.
            b.set_u32(OFF_28, self.seq.exp_cmdsn);
            b.set_u32(OFF_32, self.seq.max_cmdsn);
        }
        b.set_u32(OFF_36, self.datasn);
        b.set_u32(OFF_40, self.buffer_offset);
        b
    }
    pub fn parse(b: &Bhs) -> Self {
        let has_status = b.bit(OFF_FLAGS, DATAIN_STATUS);
        DataIn {
            final_: b.final_bit(),
            status: has_status.then_some(b.0[3]),
            lun: b.lun(),
            itt: b.itt(),
            ttt: b.u32_at(OFF_20),
            seq: Sequence::read(b),
            datasn: b.u32_at(OFF_36),
            buffer_offset: b.u32_at(OFF_40),
            residual: if has_status {
                Residual::read(b.flags(), b.u32_at(OFF_44))
            } else {
                Residual::None
            },
        }
    }
}

/// Logout Response (§11.15).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogoutResponse {
    pub response: u8,
    pub itt: u32,
    pub seq: Sequence,
    pub time2wait: u16,
    pub time2retain: u16,
}

impl LogoutResponse {
    pub fn to_bhs(&self) -> Bhs {
        let mut b = Bhs::new(Opcode::LogoutResponse);
        b.0[OFF_FLAGS] = FINAL_BIT;
        b.0[2] = self.response;
        b.set_u32(OFF_ITT, self.itt);
        self.seq.write(&mut b);
        b.set_u16(OFF_40, self.time2wait);
        b.set_u16(OFF_40 + 2, self.time2retain);
        b
    }
    pub fn parse(b: &Bhs) -> Self {
        LogoutResponse {
            response: b.0[2],
            itt: b.itt(),
            seq: Sequence::read(b),
            time2wait: b.u16_at(OFF_40),
            time2retain: b.u16_at(OFF_40 + 2),
        }
    }
}

/// Ready To Transfer (§11.8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadyToTransfer {
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub seq: Sequence,
    pub r2tsn: u32,
    pub buffer_offset: u32,
    pub desired_len: u32,
}

impl ReadyToTransfer {
    pub fn to_bhs(&self) -> Bhs {
        let mut b = Bhs::new(Opcode::ReadyToTransfer);
        b.0[OFF_FLAGS] = FINAL_BIT;
        b.set_lun(self.lun);
        b.set_u32(OFF_ITT, self.itt);
        b.set_u32(OFF_20, self.ttt);
        self.seq.write(&mut b);
        b.set_u32(OFF_36, self.r2tsn);
        b.set_u32(OFF_40, self.buffer_offset);
        b.set_u32(OFF_44, self.desired_len);
        b
    }
    pub fn parse(b: &Bhs) -> Self {
        ReadyToTransfer {
            lun: b.lun(),
            itt: b.itt(),
            ttt: b.u32_at(OFF_20),
            seq: Sequence::read(b),
            r2tsn: b.u32_at(OFF_36),
            buffer_offset: b.u32_at(OFF_40),
            desired_len: b.u32_at(OFF_44),
        }
    }
}

/// Asynchronous Message (§11.9).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AsyncMessage {
    pub lun: u64,
    pub seq: Sequence,
    /// 0 SCSI async event (sense in data), 1 logout request, 2 drop connection, 3 drop all
    /// connections, 4 request parameter negotiation.
    pub event: u8,
    pub vcode: u8,
    pub param1: u16,
    pub param2: u16,
    pub param3: u16,
}

impl AsyncMessage {
    pub fn to_bhs(&self) -> Bhs {
        let mut b = Bhs::new(Opcode::AsyncMessage);
        b.0[OFF_FLAGS] = FINAL_BIT;
        b.set_lun(self.lun);
        b.set_u32(OFF_ITT, RESERVED_TAG);
        self.seq.write(&mut b);
        b.0[OFF_36] = self.event;
        b.0[OFF_36 + 1] = self.vcode;
        b.set_u16(OFF_36 + 2, self.param1);
        b.set_u16(OFF_40, self.param2);
        b.set_u16(OFF_40 + 2, self.param3);
        b
    }
}

/// Reject (§11.17). Its data segment is the header of the rejected PDU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reject {
    pub reason: u8,
    pub seq: Sequence,
    pub datasn_r2tsn: u32,
}

/// Reject reasons (§11.17.1).
pub mod reject_reason {
    pub const DATA_DIGEST_ERROR: u8 = 0x02;
    pub const SNACK_REJECT: u8 = 0x03;
    pub const PROTOCOL_ERROR: u8 = 0x04;
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x05;
    pub const IMMEDIATE_COMMAND_REJECT: u8 = 0x06;
    pub const TASK_IN_PROGRESS: u8 = 0x07;
    pub const INVALID_DATA_ACK: u8 = 0x08;
    pub const INVALID_PDU_FIELD: u8 = 0x09;
    pub const OUT_OF_RESOURCES: u8 = 0x0a;
    pub const WAITING_FOR_LOGOUT: u8 = 0x0c;
}

impl Reject {
    pub fn to_bhs(&self) -> Bhs {
        let mut b = Bhs::new(Opcode::Reject);
        b.0[OFF_FLAGS] = FINAL_BIT;
        b.0[2] = self.reason;
        b.set_u32(OFF_ITT, RESERVED_TAG);
        self.seq.write(&mut b);
        b.set_u32(OFF_36, self.datasn_r2tsn);
        b
    }
    pub fn parse(b: &Bhs) -> Self {
        Reject {
            reason: b.0[2],
            seq: Sequence::read(b),
            datasn_r2tsn: b.u32_at(OFF_36),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(pdu: &Pdu, d: Digests) -> Bytes {
        let mut out = BytesMut::new();
        encode(pdu, d, &mut out);
        out.freeze()
    }

    /// RFC 7143 §11.2.1: padding to 4 bytes, lengths in the BHS, digests after header and data.
    #[test]
    fn encode_layout_with_digests() {
        let bhs = NopIn {
            lun: 0,
            itt: 7,
            ttt: RESERVED_TAG,
            seq: Sequence {
                statsn: 1,
                exp_cmdsn: 2,
                max_cmdsn: 3,
            },
        }
        .to_bhs();
        let pdu = Pdu {
            bhs,
            ahs: Bytes::new(),
            data: Bytes::from_static(b"ping!"),
        };
        let d = Digests {
            header: true,
            data: true,
        };
        let wire = frame(&pdu, d);
        assert_eq!(wire.len(), 48 + 4 + 8 + 4);
        assert_eq!(wire[0], 0x20);
        assert_eq!(wire[1], 0x80);
        assert_eq!(&wire[5..8], &[0, 0, 5]);
        assert_eq!(&wire[16..20], &7u32.to_be_bytes());
        assert_eq!(&wire[48..52], &crc32c(&wire[..48]).to_le_bytes());
        assert_eq!(&wire[52..60], b"ping!\0\0\0");
        assert_eq!(&wire[60..64], &crc32c(b"ping!\0\0\0").to_le_bytes());
        assert_eq!(check(&wire, d, 8192), Ok(Framing::Complete { len: 64 }));
        assert_eq!(decode(wire, d).unwrap(), pdu_with_lengths(pdu));
    }

    fn pdu_with_lengths(mut pdu: Pdu) -> Pdu {
        pdu.bhs.set_lengths(pdu.ahs.len(), pdu.data.len() as u32);
        pdu
    }

    #[test]
    fn incomplete_and_too_long() {
        let bhs = ScsiCommand {
            immediate: false,
            final_: true,
            read: false,
            write: true,
            attr: 1,
            lun: 1,
            itt: 1,
            expected_data_len: 512,
            cmdsn: 1,
            exp_statsn: 1,
            cdb: [0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],
        }
        .to_bhs();
        let pdu = Pdu {
            bhs,
            ahs: Bytes::new(),
            data: Bytes::from(vec![0xab; 512]),
        };
        let wire = frame(&pdu, Digests::default());
        assert_eq!(
            check(&wire[..10], Digests::default(), 8192),
            Ok(Framing::Incomplete { needed: 48 })
        );
        assert_eq!(
            check(&wire[..100], Digests::default(), 8192),
            Ok(Framing::Incomplete { needed: 560 })
        );
        assert_eq!(
            check(&wire, Digests::default(), 256),
            Err(FrameError::DataSegmentTooLong { len: 512, max: 256 })
        );
    }

    #[test]
    fn digest_errors_are_detected() {
        let pdu = Pdu {
            bhs: NopOut {
                immediate: true,
                lun: 0,
                itt: 1,
                ttt: RESERVED_TAG,
                cmdsn: 1,
                exp_statsn: 1,
            }
            .to_bhs(),
            ahs: Bytes::new(),
            data: Bytes::from_static(b"abcd"),
        };
        let d = Digests {
            header: true,
            data: true,
        };
        let mut wire = frame(&pdu, d).to_vec();
        wire[20] ^= 1;
        assert!(matches!(check(&wire, d, 8192), Err(FrameError::HeaderDigest { .. })));
        let mut wire = frame(&pdu, d).to_vec();
        wire[53] ^= 1;
        assert!(matches!(check(&wire, d, 8192), Ok(Framing::Complete { .. })));
        assert!(matches!(
            decode(Bytes::from(wire), d),
            Err(FrameError::DataDigest { .. })
        ));
    }

    /// §11.3: field positions of the SCSI Command PDU.
    #[test]
    fn scsi_command_fields() {
        let mut raw = [0u8; 48];
        raw[0] = 0x41; // immediate + SCSI command
        raw[1] = 0x80 | 0x40 | 0x01; // F, R, simple
        raw[9] = 3; // LUN 3
        raw[16..20].copy_from_slice(&0x1122_3344u32.to_be_bytes());
        raw[20..24].copy_from_slice(&4096u32.to_be_bytes());
        raw[24..28].copy_from_slice(&9u32.to_be_bytes());
        raw[28..32].copy_from_slice(&5u32.to_be_bytes());
        raw[32] = 0x28;
        let c = ScsiCommand::parse(&Bhs(raw));
        assert!(c.immediate && c.final_ && c.read && !c.write);
        assert_eq!(
            (c.attr, c.lun, c.itt, c.expected_data_len, c.cmdsn, c.exp_statsn),
            (1, 3, 0x1122_3344, 4096, 9, 5)
        );
        assert_eq!(c.cdb[0], 0x28);
        assert_eq!(c.to_bhs(), Bhs(raw));
    }

    #[test]
    fn extended_cdb_ahs() {
        let c = ScsiCommand::parse(&Bhs::default());
        // AHSLength 5 = reserved byte + 4 CDB bytes; type 1; padded to 8 bytes.
        let ahs = [0, 5, 1, 0, 0xa1, 0xa2, 0xa3, 0xa4];
        let cdb = c.full_cdb(&ahs).unwrap();
        assert_eq!(cdb.len(), 20);
        assert_eq!(&cdb[16..], &[0xa1, 0xa2, 0xa3, 0xa4]);
        assert_eq!(c.full_cdb(&[0, 9, 1]), Err(PduError::BadAhs));
    }

    /// §11.13: Login Response layout including status class/detail.
    #[test]
    fn login_response_layout() {
        let r = LoginResponse {
            transit: true,
            cont: false,
            csg: 1,
            nsg: 3,
            version_max: 0,
            version_active: 0,
            isid: [0x80, 1, 2, 3, 4, 5],
            tsih: 0x1234,
            itt: 9,
            seq: Sequence {
                statsn: 1,
                exp_cmdsn: 2,
                max_cmdsn: 33,
            },
            status_class: 2,
            status_detail: 1,
        };
        let b = r.to_bhs();
        assert_eq!(b.0[0], 0x23);
        assert_eq!(b.0[1], 0x80 | (1 << 2) | 3);
        assert_eq!(&b.0[8..16], &[0x80, 1, 2, 3, 4, 5, 0x12, 0x34]);
        assert_eq!(&b.0[36..38], &[2, 1]);
        assert_eq!(LoginResponse::parse(&b), r);
    }

    /// §11.7.4: a Data-In with status carries StatSN and residuals; without it StatSN is reserved.
    #[test]
    fn data_in_status_collapse() {
        let seq = Sequence {
            statsn: 10,
            exp_cmdsn: 11,
            max_cmdsn: 20,
        };
        let d = DataIn {
            final_: true,
            status: Some(0),
            lun: 1,
            itt: 5,
            ttt: RESERVED_TAG,
            seq,
            datasn: 2,
            buffer_offset: 8192,
            residual: Residual::Underflow(512),
        };
        let b = d.to_bhs();
        assert_eq!(b.0[1], 0x80 | 0x02 | 0x01);
        assert_eq!(&b.0[24..28], &10u32.to_be_bytes());
        assert_eq!(&b.0[44..48], &512u32.to_be_bytes());
        assert_eq!(DataIn::parse(&b), d);
        let mid = DataIn {
            final_: false,
            status: None,
            residual: Residual::None,
            ..d
        };
        let b = mid.to_bhs();
        assert_eq!(b.0[1], 0);
        assert_eq!(&b.0[24..28], &[0; 4]);
    }

    #[test]
    fn residual_between() {
        assert_eq!(Residual::between(512, 512), Residual::None);
        assert_eq!(Residual::between(512, 100), Residual::Underflow(412));
        assert_eq!(Residual::between(100, 512), Residual::Overflow(412));
    }

    #[test]
    fn lun_addressing() {
        assert_eq!(lun_to_wire(1), [0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(lun_to_wire(300), [0x41, 0x2c, 0, 0, 0, 0, 0, 0]);
        for l in [0, 1, 255, 256, 16383] {
            assert_eq!(lun_from_wire(lun_to_wire(l)), l);
        }
        // A two-level LUN matches no configured single-level LUN.
        assert!(lun_from_wire([0, 1, 0, 1, 0, 0, 0, 0]) > 16383);
    }

    #[test]
    fn request_rejects_target_opcodes() {
        let b = Bhs::new(Opcode::DataIn);
        assert_eq!(Request::parse(&b), Err(PduError::UnexpectedOpcode(0x25)));
    }

    proptest! {
        /// Invariant 5: no bytes crash the framer or header parsers.
        #[test]
        fn framing_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..600), hd: bool, dd: bool, max in 0u32..70000) {
            let d = Digests { header: hd, data: dd };
            if let Ok(Framing::Complete { len }) = check(&buf, d, max) {
                let pdu = decode(Bytes::copy_from_slice(&buf[..len]), d);
                if let Ok(pdu) = pdu {
                    let _ = Request::parse(&pdu.bhs);
                    let _ = ScsiCommand::parse(&pdu.bhs).full_cdb(&pdu.ahs);
                }
            }
        }

        #[test]
        fn encode_decode_round_trip(raw in proptest::array::uniform32(any::<u8>()), data in proptest::collection::vec(any::<u8>(), 0..300), hd: bool, dd: bool) {
            let mut b = [0u8; 48];
            b[..32].copy_from_slice(&raw);
            b[4] = 0; // no AHS
            let pdu = Pdu { bhs: Bhs(b), ahs: Bytes::new(), data: Bytes::from(data) };
            let d = Digests { header: hd, data: dd };
            let wire = frame(&pdu, d);
            let len = match check(&wire, d, MAX_DATA_SEGMENT_LEN) { Ok(Framing::Complete { len }) => len, other => panic!("{other:?}") };
            prop_assert_eq!(len, wire.len());
            prop_assert_eq!(decode(wire, d).unwrap(), pdu_with_lengths(pdu));
        }
    }
}
