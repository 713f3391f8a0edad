//! Pure wire formats for raftsan: no tokio, no sockets, no clock, no randomness.
//!
//! * [`pdu`]: RFC 7143 framing (BHS, AHS, digests) and one type per opcode.
//! * [`digest`]: CRC32C header and data digests (RFC 7143 §12.1).
//! * [`serial`]: serial-number arithmetic on 32-bit sequence numbers (RFC 1982, RFC 7143 §4.2.2.1).
//! * [`text`]: `key=value` text encoding and negotiation (RFC 7143 §6, §13).
//! * [`chap`]: CHAP with MD5, SHA-1, SHA-256 and SHA3-256 (RFC 1994, RFC 7143 §12.1.3).
//! * [`login`]: the sans-io target-side login state machine (RFC 7143 §6.3).
//! * [`initiator`]: the sans-io initiator-side login machine and SendTargets helpers.
//! * [`scsi`]: SCSI CDB decoding, sense data, VPD and mode pages (SPC-4, SBC-3).
#![forbid(unsafe_code)]

pub mod chap;
pub mod digest;
pub mod initiator;
pub mod login;
pub mod pdu;
pub mod scsi;
pub mod serial;
pub mod text;
