//! NBD export of a block device (NetworkBlockDevice/nbd doc/proto.md), so `nbdcopy`, `nbdinfo`,
//! `qemu-img`/`qemu-io`, fio's nbd engine and the kernel's `nbd-client` can use a volume.
//!
//! * [`wire`]: the sans-io protocol (fixed newstyle handshake, request header, simple reply).
//! * [`server`]: the tokio shell: [`NbdServer::bind`] then [`NbdServer::run`], or [`serve`].
//!
//! Spoken: fixed newstyle handshake with NO_ZEROES; options EXPORT_NAME, ABORT, LIST, INFO and GO
//! (INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE); simple replies only (every other
//! option, STRUCTURED_REPLY and STARTTLS included, gets NBD_REP_ERR_UNSUP); commands READ, WRITE,
//! DISC, FLUSH, TRIM and WRITE_ZEROES with FUA (NO_HOLE accepted and ignored).
//!
//! The device sees only block-aligned, in-range requests: the server checks ranges and turns
//! unaligned requests into read-modify-write under an exclusive lock (aligned requests share it),
//! so concurrent writes are never torn.
//!
//! Not done: TLS, structured replies, block status, extended headers, resize.

pub mod server;
pub mod wire;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;

pub use server::NbdServer;

/// The volume behind the export. Offsets and lengths the server passes are always multiples of
/// [`BlockDevice::block_size`] and within [`BlockDevice::size`].
pub trait BlockDevice: Send + Sync + 'static {
    /// Size in bytes (a multiple of the block size).
    fn size(&self) -> u64;
    /// Logical block size in bytes: a power of two from 512 to 64 KiB.
    fn block_size(&self) -> u32;
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = Result<Bytes, DeviceError>> + Send;
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> impl Future<Output = Result<(), DeviceError>> + Send;
    fn flush(&self) -> impl Future<Output = Result<(), DeviceError>> + Send;
    fn trim(&self, offset: u64, len: u32) -> impl Future<Output = Result<(), DeviceError>> + Send;
    fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> impl Future<Output = Result<(), DeviceError>> + Send;
}

/// A failed device operation; each becomes the NBD error of the reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// The medium or transport failed (EIO).
    #[error("I/O error: {0}")]
    Io(String),
    /// The volume is out of space (ENOSPC).
    #[error("no space left on the volume")]
    NoSpace,
    /// The device refused the request's parameters (EINVAL).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The device does not implement this operation (ENOTSUP).
    #[error("operation not supported by the device")]
    NotSupported,
    /// The device cannot reach the volume at all, e.g. no usable path (EIO).
    #[error("volume unavailable: {0}")]
    Unavailable(String),
}

impl DeviceError {
    /// The NBD error value (proto.md "Error values").
    pub fn nbd_error(&self) -> u32 {
        match self {
            DeviceError::Io(_) | DeviceError::Unavailable(_) => wire::NBD_EIO,
            DeviceError::NoSpace => wire::NBD_ENOSPC,
            DeviceError::Invalid(_) => wire::NBD_EINVAL,
            DeviceError::NotSupported => wire::NBD_ENOTSUP,
        }
    }
}

/// What the export looks like to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdConfig {
    /// The name clients ask for; the empty (default) name also selects it.
    pub export_name: String,
    /// Free text shown by `nbdinfo` (NBD_INFO_DESCRIPTION, NBD_OPT_LIST).
    pub description: String,
    /// Advertise NBD_FLAG_READ_ONLY and refuse writes, trims and zeroing with EPERM.
    pub read_only: bool,
    /// Advertise NBD_FLAG_CAN_MULTI_CONN (every connection sees the same device, and a flush on
    /// one covers writes completed on all).
    pub multi_conn: bool,
    /// Largest request payload (NBD_INFO_BLOCK_SIZE maximum); a multiple of the block size.
    pub max_request_bytes: u32,
}

/// Default `max_request_bytes`: 32 MiB (the protocol's recommended upper bound).
pub const DEFAULT_MAX_REQUEST_BYTES: u32 = 32 << 20;
/// Upper bound of `max_request_bytes`.
pub const MAX_MAX_REQUEST_BYTES: u32 = 1 << 30;

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            export_name: String::new(),
            description: String::new(),
            read_only: false,
            multi_conn: true,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
        }
    }
}

/// A configuration that cannot be served; says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("NBD export name is {0} bytes; the protocol allows at most 4096")]
    NameTooLong(usize),
    #[error("NBD export description is {0} bytes; the protocol allows at most 4096")]
    DescriptionTooLong(usize),
    #[error("device block size {0} is not a power of two from 512 to 65536")]
    BlockSize(u32),
    #[error("device size {size} is not a multiple of its block size {block_size}")]
    DeviceSize { size: u64, block_size: u32 },
    #[error(
        "max_request_bytes {max} must be a multiple of the block size {block_size} between the block size and {MAX_MAX_REQUEST_BYTES}"
    )]
    MaxRequest { max: u32, block_size: u32 },
}

impl NbdConfig {
    /// Checks the configuration against the device before any socket is touched.
    pub fn validate(&self, size: u64, block_size: u32) -> Result<(), ConfigError> {
        if self.export_name.len() > wire::MAX_STRING_LEN {
            return Err(ConfigError::NameTooLong(self.export_name.len()));
        }
        if self.description.len() > wire::MAX_STRING_LEN {
            return Err(ConfigError::DescriptionTooLong(self.description.len()));
        }
        if !block_size.is_power_of_two() || !(512..=65536).contains(&block_size) {
            return Err(ConfigError::BlockSize(block_size));
        }
        if !size.is_multiple_of(u64::from(block_size)) {
            return Err(ConfigError::DeviceSize { size, block_size });
        }
        let max = self.max_request_bytes;
        if max < block_size || max > MAX_MAX_REQUEST_BYTES || !max.is_multiple_of(block_size) {
            return Err(ConfigError::MaxRequest { max, block_size });
        }
        Ok(())
    }
}

/// Where the export listens: `unix:/path/to/socket` or `HOST:PORT` (an IP address, or
/// `localhost`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdListen {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// An `--nbd` value that is neither `unix:PATH` nor `HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad NBD listen address {0:?}: expected unix:/path/to/socket or HOST:PORT (e.g. 127.0.0.1:10809)")]
pub struct ListenParseError(pub String);

impl FromStr for NbdListen {
    type Err = ListenParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(ListenParseError(s.to_owned()));
            }
            return Ok(NbdListen::Unix(PathBuf::from(path)));
        }
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(NbdListen::Tcp(addr));
        }
        if let Some(port) = s.strip_prefix("localhost:")
            && let Ok(port) = port.parse::<u16>()
        {
            return Ok(NbdListen::Tcp(SocketAddr::from(([127, 0, 0, 1], port))));
        }
        Err(ListenParseError(s.to_owned()))
    }
}

impl fmt::Display for NbdListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdListen::Unix(p) => write!(f, "unix:{}", p.display()),
            NbdListen::Tcp(a) => write!(f, "{a}"),
        }
    }
}

/// Binds `listen`, serves `device` until `shutdown` completes, then stops accepting and lets the
/// open connections finish their in-flight requests.
pub async fn serve<D: BlockDevice>(
    listen: NbdListen,
    device: Arc<D>,
    cfg: NbdConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    cfg.validate(device.size(), device.block_size())?;
    let server = NbdServer::bind(&listen).await?;
    server.run(device, cfg, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_parse() {
        assert_eq!("unix:/run/x.sock".parse(), Ok(NbdListen::Unix("/run/x.sock".into())));
        assert_eq!(
            "127.0.0.1:10809".parse(),
            Ok(NbdListen::Tcp("127.0.0.1:10809".parse().unwrap()))
        );
        assert_eq!("[::1]:1".parse(), Ok(NbdListen::Tcp("[::1]:1".parse().unwrap())));
        assert_eq!(
            "localhost:7".parse(),
            Ok(NbdListen::Tcp("127.0.0.1:7".parse().unwrap()))
        );
        for bad in ["unix:", "/tmp/x", "host", "127.0.0.1", "localhost:x"] {
            let err = bad.parse::<NbdListen>().unwrap_err();
            assert!(err.to_string().contains("unix:/path/to/socket or HOST:PORT"), "{err}");
        }
        assert_eq!(NbdListen::Unix("/a".into()).to_string(), "unix:/a");
    }

    #[test]
    fn config_validate() {
        let cfg = NbdConfig::default();
        assert_eq!(cfg.validate(1 << 20, 512), Ok(()));
        assert_eq!(
            cfg.validate(1000, 512),
            Err(ConfigError::DeviceSize {
                size: 1000,
                block_size: 512
            })
        );
        assert_eq!(cfg.validate(1 << 20, 520), Err(ConfigError::BlockSize(520)));
        let small = NbdConfig {
            max_request_bytes: 256,
            ..NbdConfig::default()
        };
        assert!(matches!(
            small.validate(1 << 20, 512),
            Err(ConfigError::MaxRequest { .. })
        ));
        let long = NbdConfig {
            export_name: "x".repeat(4097),
            ..NbdConfig::default()
        };
        assert_eq!(long.validate(1 << 20, 512), Err(ConfigError::NameTooLong(4097)));
    }

    #[test]
    fn device_error_values() {
        assert_eq!(DeviceError::Unavailable("no path".into()).nbd_error(), 5);
        assert_eq!(DeviceError::NoSpace.nbd_error(), 28);
        assert_eq!(DeviceError::Invalid("x".into()).nbd_error(), 22);
        assert_eq!(DeviceError::NotSupported.nbd_error(), 95);
    }
}
