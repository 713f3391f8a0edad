//! NBD wire format, sans-io: the fixed newstyle handshake and the transmission phase's request
//! header and simple reply (NetworkBlockDevice/nbd doc/proto.md).
//!
//! Nothing here touches a socket. The server shell reads fixed-size headers and bounded payloads
//! and hands them to these functions:
//!
//! ```text
//!  server                                  client
//!  greeting (NBDMAGIC IHAVEOPT flags) ──▶
//!                                      ◀── client flags (4 bytes)           parse_client_flags
//!                                      ◀── option header (16) + data        parse_option_header, parse_option
//!  option replies ──────────────────────▶  (repeat until EXPORT_NAME, GO or ABORT)
//!  ── transmission ──
//!                                      ◀── request header (28) [+ write payload]   parse_request
//!  simple reply header (16) [+ read data] ─▶
//! ```
//!
//! Only simple replies are spoken: structured replies and extended headers are refused with
//! `NBD_REP_ERR_UNSUP`, so a request header is always 28 bytes and only `NBD_CMD_WRITE` carries a
//! payload.

use bytes::{BufMut, Bytes, BytesMut};

/// "NBDMAGIC": first 8 bytes of the greeting.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": second 8 bytes of the newstyle greeting, and the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flags (server, u16).
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags (u32).
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags (u16).
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Option types.
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
pub const NBD_OPT_ABORT: u32 = 2;
pub const NBD_OPT_LIST: u32 = 3;
pub const NBD_OPT_STARTTLS: u32 = 5;
pub const NBD_OPT_INFO: u32 = 6;
pub const NBD_OPT_GO: u32 = 7;
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;

/// Option reply types.
pub const NBD_REP_ACK: u32 = 1;
pub const NBD_REP_SERVER: u32 = 2;
pub const NBD_REP_INFO: u32 = 3;
const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR | 2;
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR | 3;
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR | 7;
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR | 9;

/// Info types (NBD_OPT_INFO / NBD_OPT_GO).
pub const NBD_INFO_EXPORT: u16 = 0;
pub const NBD_INFO_NAME: u16 = 1;
pub const NBD_INFO_DESCRIPTION: u16 = 2;
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

/// Command flags (u16).
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Error values of a simple reply (proto.md "Error values"; Linux errno numbers).
pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

/// Sizes of the fixed headers.
pub const GREETING_LEN: usize = 18;
pub const CLIENT_FLAGS_LEN: usize = 4;
pub const OPTION_HEADER_LEN: usize = 16;
pub const REQUEST_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Zero padding after the NBD_OPT_EXPORT_NAME reply unless NO_ZEROES was negotiated.
pub const EXPORT_NAME_PAD: usize = 124;
/// Strings (export names, descriptions) are at most 4096 bytes (proto.md "Option haggling").
pub const MAX_STRING_LEN: usize = 4096;
/// Largest option payload accepted; a name plus info requests fits easily. Larger options are
/// refused by closing the connection (their data is not read).
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// A malformed handshake or request, caused by the client. The server closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The client sent client flags with bits this server does not know (proto.md: close).
    #[error("client flags {0:#x} carry unknown bits")]
    UnknownClientFlags(u32),
    /// An option request did not start with IHAVEOPT.
    #[error("option request magic {0:#018x}, expected IHAVEOPT")]
    BadOptionMagic(u64),
    /// An option's length is over `MAX_OPTION_LEN`.
    #[error("option {option} has {len} bytes of data, over the {MAX_OPTION_LEN}-byte limit")]
    OptionTooLong { option: u32, len: u32 },
    /// A transmission request did not start with NBD_REQUEST_MAGIC.
    #[error("request magic {0:#010x}, expected {REQUEST_MAGIC:#010x}")]
    BadRequestMagic(u32),
}

/// The client's handshake flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

/// The 18-byte server greeting of the newstyle handshake.
pub fn encode_greeting(handshake_flags: u16) -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&handshake_flags.to_be_bytes());
    out
}

/// The client flags that follow the greeting.
pub fn parse_client_flags(buf: &[u8; CLIENT_FLAGS_LEN]) -> Result<ClientFlags, WireError> {
    let flags = u32::from_be_bytes(*buf);
    if flags & !(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES) != 0 {
        return Err(WireError::UnknownClientFlags(flags));
    }
    Ok(ClientFlags {
        fixed_newstyle: flags & NBD_FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: flags & NBD_FLAG_C_NO_ZEROES != 0,
    })
}

/// The fixed part of an option request: `IHAVEOPT, option u32, length u32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

/// Parses an option request header; the caller then reads `len` bytes of data.
pub fn parse_option_header(buf: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, WireError> {
    let magic = u64::from_be_bytes(array(&buf[0..8]));
    if magic != IHAVEOPT {
        return Err(WireError::BadOptionMagic(magic));
    }
    let option = u32::from_be_bytes(array(&buf[8..12]));
    let len = u32::from_be_bytes(array(&buf[12..16]));
    if len > MAX_OPTION_LEN {
        return Err(WireError::OptionTooLong { option, len });
    }
    Ok(OptionHeader { option, len })
}

/// A parsed option request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdOption {
    /// NBD_OPT_EXPORT_NAME: the whole data is the name.
    ExportName(Vec<u8>),
    /// NBD_OPT_ABORT.
    Abort,
    /// NBD_OPT_LIST.
    List,
    /// NBD_OPT_INFO (`go == false`) or NBD_OPT_GO.
    Info {
        go: bool,
        name: Vec<u8>,
        requests: Vec<u16>,
    },
    /// Any other option (including STARTTLS and STRUCTURED_REPLY, which this server refuses).
    Unknown(u32),
}

/// An option whose data does not match its layout; answered with NBD_REP_ERR_INVALID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    /// The client sent data where the option takes none, or a layout that does not add up.
    #[error("option {option}: {reason}")]
    Invalid { option: u32, reason: &'static str },
}

/// Decodes an option's data (already read, `data.len() == header.len`).
pub fn parse_option(option: u32, data: &[u8]) -> Result<NbdOption, OptionError> {
    let invalid = |reason| OptionError::Invalid { option, reason };
    match option {
        NBD_OPT_EXPORT_NAME => {
            if data.len() > MAX_STRING_LEN {
                return Err(invalid("export name over 4096 bytes"));
            }
            Ok(NbdOption::ExportName(data.to_vec()))
        }
        NBD_OPT_ABORT => Ok(NbdOption::Abort),
        NBD_OPT_LIST if !data.is_empty() => Err(invalid("NBD_OPT_LIST carries no data")),
        NBD_OPT_LIST => Ok(NbdOption::List),
        NBD_OPT_INFO | NBD_OPT_GO => {
            // u32 name length, name, u16 number of requests, u16 each.
            let Some((len, rest)) = split_u32(data) else {
                return Err(invalid("shorter than its name length"));
            };
            let len = len as usize;
            if len > MAX_STRING_LEN {
                return Err(invalid("export name over 4096 bytes"));
            }
            if rest.len() < len {
                return Err(invalid("name runs past the option data"));
            }
            let (name, rest) = rest.split_at(len);
            let Some((count, rest)) = split_u16(rest) else {
                return Err(invalid("no information request count"));
            };
            if rest.len() != usize::from(count) * 2 {
                return Err(invalid("information request count does not match the data"));
            }
            let requests = rest.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
            Ok(NbdOption::Info {
                go: option == NBD_OPT_GO,
                name: name.to_vec(),
                requests,
            })
        }
        other => Ok(NbdOption::Unknown(other)),
    }
}

/// An option reply: `REPLY_MAGIC, option, reply type, length, data`.
pub fn encode_option_reply(option: u32, reply: u32, data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(20 + data.len());
    out.put_u64(REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
    out.freeze()
}

/// Data of an NBD_REP_SERVER reply to NBD_OPT_LIST: name length, name, description.
pub fn rep_server_data(name: &[u8], description: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len() + description.len());
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name);
    out.extend_from_slice(description);
    out
}

/// Data of NBD_REP_INFO / NBD_INFO_EXPORT.
pub fn info_export_data(size: u64, transmission_flags: u16) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[0..2].copy_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
    out[2..10].copy_from_slice(&size.to_be_bytes());
    out[10..12].copy_from_slice(&transmission_flags.to_be_bytes());
    out
}

/// Data of NBD_REP_INFO / NBD_INFO_NAME or NBD_INFO_DESCRIPTION.
pub fn info_string_data(info: u16, s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + s.len());
    out.extend_from_slice(&info.to_be_bytes());
    out.extend_from_slice(s);
    out
}

/// Data of NBD_REP_INFO / NBD_INFO_BLOCK_SIZE.
pub fn info_block_size_data(minimum: u32, preferred: u32, maximum: u32) -> [u8; 14] {
    let mut out = [0u8; 14];
    out[0..2].copy_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
    out[2..6].copy_from_slice(&minimum.to_be_bytes());
    out[6..10].copy_from_slice(&preferred.to_be_bytes());
    out[10..14].copy_from_slice(&maximum.to_be_bytes());
    out
}

/// The reply to NBD_OPT_EXPORT_NAME: size, transmission flags, and 124 zero bytes unless the
/// client set NBD_FLAG_C_NO_ZEROES.
pub fn encode_export_name_reply(size: u64, transmission_flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + EXPORT_NAME_PAD);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&transmission_flags.to_be_bytes());
    if !no_zeroes {
        out.resize(10 + EXPORT_NAME_PAD, 0);
    }
    out
}

/// Transmission commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    WriteZeroes,
    /// Any other type (CACHE, BLOCK_STATUS, RESIZE, ...): answered with EINVAL. None of them carries
    /// a payload without extended headers, which this server never negotiates.
    Unknown(u16),
}

impl Command {
    pub fn from_u16(v: u16) -> Self {
        match v {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            6 => Command::WriteZeroes,
            other => Command::Unknown(other),
        }
    }

    pub fn to_u16(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disc => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::WriteZeroes => 6,
            Command::Unknown(v) => v,
        }
    }
}

/// A transmission request header (28 bytes). For `Command::Write`, `len` bytes of payload follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    pub fn fua(&self) -> bool {
        self.flags & NBD_CMD_FLAG_FUA != 0
    }

    /// Bytes of payload that follow the header on the wire.
    pub fn payload_len(&self) -> u32 {
        if self.command == Command::Write { self.len } else { 0 }
    }

    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_u16().to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.len.to_be_bytes());
        out
    }
}

/// Parses a request header. Only the magic is checked here; flags, range and length are the
/// server's business (they become error replies, not a closed connection).
pub fn parse_request(buf: &[u8; REQUEST_LEN]) -> Result<Request, WireError> {
    let magic = u32::from_be_bytes(array(&buf[0..4]));
    if magic != REQUEST_MAGIC {
        return Err(WireError::BadRequestMagic(magic));
    }
    Ok(Request {
        flags: u16::from_be_bytes(array(&buf[4..6])),
        command: Command::from_u16(u16::from_be_bytes(array(&buf[6..8]))),
        cookie: u64::from_be_bytes(array(&buf[8..16])),
        offset: u64::from_be_bytes(array(&buf[16..24])),
        len: u32::from_be_bytes(array(&buf[24..28])),
    })
}

/// A simple reply header; read data (only when `error == 0`) follows it.
pub fn encode_simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_LEN];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// A simple reply header as a client sees it (used by tests and clients).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

/// Parses a simple reply header; `None` if the magic is wrong.
pub fn parse_simple_reply(buf: &[u8; SIMPLE_REPLY_LEN]) -> Option<SimpleReply> {
    (u32::from_be_bytes(array(&buf[0..4])) == SIMPLE_REPLY_MAGIC).then(|| SimpleReply {
        error: u32::from_be_bytes(array(&buf[4..8])),
        cookie: u64::from_be_bytes(array(&buf[8..16])),
    })
}

fn array<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(s);
    out
}

fn split_u32(data: &[u8]) -> Option<(u32, &[u8])> {
    let (head, rest) = data.split_at_checked(4)?;
    Some((u32::from_be_bytes(array(head)), rest))
}

fn split_u16(data: &[u8]) -> Option<(u16, &[u8])> {
    let (head, rest) = data.split_at_checked(2)?;
    Some((u16::from_be_bytes(array(head)), rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_is_nbdmagic_ihaveopt_flags() {
        // proto.md "Fixed newstyle negotiation": S: 64 bits NBDMAGIC, 64 bits IHAVEOPT, 16 bits flags.
        let g = encode_greeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..18], &[0, 3]);
    }

    #[test]
    fn client_flags() {
        assert_eq!(
            parse_client_flags(&[0, 0, 0, 3]),
            Ok(ClientFlags {
                fixed_newstyle: true,
                no_zeroes: true
            })
        );
        assert_eq!(
            parse_client_flags(&[0, 0, 0, 1]),
            Ok(ClientFlags {
                fixed_newstyle: true,
                no_zeroes: false
            })
        );
        assert_eq!(parse_client_flags(&[0, 0, 0, 4]), Err(WireError::UnknownClientFlags(4)));
    }

    fn option_header(magic: u64, option: u32, len: u32) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&magic.to_be_bytes());
        b[8..12].copy_from_slice(&option.to_be_bytes());
        b[12..16].copy_from_slice(&len.to_be_bytes());
        b
    }

    #[test]
    fn option_header_parse() {
        assert_eq!(
            parse_option_header(&option_header(IHAVEOPT, NBD_OPT_GO, 10)),
            Ok(OptionHeader {
                option: NBD_OPT_GO,
                len: 10
            })
        );
        assert_eq!(
            parse_option_header(&option_header(NBDMAGIC, NBD_OPT_GO, 10)),
            Err(WireError::BadOptionMagic(NBDMAGIC))
        );
        assert_eq!(
            parse_option_header(&option_header(IHAVEOPT, 99, MAX_OPTION_LEN + 1)),
            Err(WireError::OptionTooLong {
                option: 99,
                len: MAX_OPTION_LEN + 1
            })
        );
    }

    #[test]
    fn go_option_parse() {
        // u32 name length, name, u16 count, u16 requests (proto.md NBD_OPT_INFO / NBD_OPT_GO).
        let data = [0, 0, 0, 3, b'a', b'b', b'c', 0, 2, 0, 3, 0, 1];
        assert_eq!(
            parse_option(NBD_OPT_GO, &data),
            Ok(NbdOption::Info {
                go: true,
                name: b"abc".to_vec(),
                requests: vec![3, 1]
            })
        );
        assert_eq!(
            parse_option(NBD_OPT_INFO, &[0, 0, 0, 0, 0, 0]),
            Ok(NbdOption::Info {
                go: false,
                name: vec![],
                requests: vec![]
            })
        );
        // Name runs past the data, count mismatch, too short.
        assert!(parse_option(NBD_OPT_GO, &[0, 0, 0, 9, b'a']).is_err());
        assert!(parse_option(NBD_OPT_GO, &[0, 0, 0, 0, 0, 2, 0, 3]).is_err());
        assert!(parse_option(NBD_OPT_GO, &[0, 0]).is_err());
        assert!(parse_option(NBD_OPT_GO, &[0, 0, 0, 0]).is_err());
    }

    #[test]
    fn other_options_parse() {
        assert_eq!(
            parse_option(NBD_OPT_EXPORT_NAME, b"vol"),
            Ok(NbdOption::ExportName(b"vol".to_vec()))
        );
        assert_eq!(parse_option(NBD_OPT_LIST, b""), Ok(NbdOption::List));
        assert!(parse_option(NBD_OPT_LIST, b"x").is_err());
        assert_eq!(parse_option(NBD_OPT_ABORT, b""), Ok(NbdOption::Abort));
        assert_eq!(
            parse_option(NBD_OPT_STRUCTURED_REPLY, b""),
            Ok(NbdOption::Unknown(NBD_OPT_STRUCTURED_REPLY))
        );
        assert!(parse_option(NBD_OPT_EXPORT_NAME, &[b'x'; MAX_STRING_LEN + 1]).is_err());
    }

    #[test]
    fn option_reply_encode() {
        let r = encode_option_reply(NBD_OPT_GO, NBD_REP_ACK, b"");
        assert_eq!(
            &r[..],
            &[
                0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 0
            ]
        );
        let r = encode_option_reply(NBD_OPT_INFO, NBD_REP_ERR_UNKNOWN, b"x");
        assert_eq!(&r[12..16], &[0x80, 0, 0, 6]);
        assert_eq!(&r[16..], &[0, 0, 0, 1, b'x']);
    }

    #[test]
    fn info_data_encode() {
        assert_eq!(
            info_export_data(0x1_0000_0000, 0x0165),
            [0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0x01, 0x65]
        );
        assert_eq!(
            info_block_size_data(512, 4096, 32 << 20),
            [0, 3, 0, 0, 2, 0, 0, 0, 0x10, 0, 0x02, 0, 0, 0]
        );
        assert_eq!(info_string_data(NBD_INFO_NAME, b"v"), vec![0, 1, b'v']);
        assert_eq!(rep_server_data(b"v", b"d"), vec![0, 0, 0, 1, b'v', b'd']);
    }

    #[test]
    fn export_name_reply_padding() {
        assert_eq!(encode_export_name_reply(1, 1, true).len(), 10);
        let r = encode_export_name_reply(1, 1, false);
        assert_eq!(r.len(), 134);
        assert!(r[10..].iter().all(|&b| b == 0));
    }

    #[test]
    fn request_round_trip() {
        let req = Request {
            flags: NBD_CMD_FLAG_FUA,
            command: Command::Write,
            cookie: 0x0102_0304_0506_0708,
            offset: 4096,
            len: 512,
        };
        let b = req.encode();
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(parse_request(&b), Ok(req));
        assert!(req.fua());
        assert_eq!(req.payload_len(), 512);
        let mut bad = b;
        bad[0] = 0;
        assert_eq!(parse_request(&bad), Err(WireError::BadRequestMagic(0x0060_9513)));
        let mut unknown = b;
        unknown[7] = 7; // NBD_CMD_BLOCK_STATUS
        let r = parse_request(&unknown);
        assert_eq!(r.map(|r| (r.command, r.payload_len())), Ok((Command::Unknown(7), 0)));
    }

    #[test]
    fn simple_reply_round_trip() {
        let r = encode_simple_reply(NBD_EINVAL, 42);
        assert_eq!(&r[0..4], &[0x67, 0x44, 0x66, 0x98]);
        assert_eq!(parse_simple_reply(&r), Some(SimpleReply { error: 22, cookie: 42 }));
        let mut bad = r;
        bad[0] = 1;
        assert_eq!(parse_simple_reply(&bad), None);
    }
}
