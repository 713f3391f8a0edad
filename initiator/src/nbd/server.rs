//! The tokio shell of the NBD server: listeners, the handshake loop, and the transmission phase.
//!
//! Per connection:
//!
//! ```text
//!  reader (one) ── parse header, check range/flags, read write payload ──▶ request task (≤ 128)
//!                                                                            │ device I/O
//!  writer (one) ◀── mpsc of replies (any order) ◀───────────────────────────┘
//! ```
//!
//! The reader takes a request slot (at most [`MAX_IN_FLIGHT`]) and the request's bytes (at most
//! [`in_flight_bytes`] per connection) before reading a payload, so a client that sends faster than
//! the device completes is stopped by TCP backpressure. Slots and bytes are given back when the
//! writer has sent the reply.
//!
//! Closing: NBD_CMD_DISC, a malformed request, end of stream, a writer error or the server's
//! shutdown stop the reader; the requests already in flight finish and their replies are sent,
//! then the connection closes. A malformed handshake or request only closes its own connection.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, RwLock, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

use super::wire::{self, Command, NbdOption, Request};
use super::{BlockDevice, DeviceError, NbdConfig, NbdListen};
use crate::metrics::{NbdMetrics, NbdOp};

/// Requests in flight per connection.
pub const MAX_IN_FLIGHT: usize = 128;
/// Open connections per server; further ones are closed right after accept.
pub const MAX_CONNECTIONS: usize = 64;
/// Options accepted in one handshake before the connection is closed.
pub const MAX_HANDSHAKE_OPTIONS: usize = 256;
/// Time a client has from connect to the transmission phase.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// After shutdown, time the open connections get to finish their in-flight requests.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Writer buffer; replies are flushed whenever no further reply is ready.
const WRITE_BUFFER_BYTES: usize = 256 * 1024;
/// Chunk used to discard the payload of a refused write.
const DISCARD_CHUNK: usize = 64 * 1024;

/// Payload bytes (write data read, read data not yet sent) in flight per connection.
pub fn in_flight_bytes(max_request_bytes: u32) -> u32 {
    max_request_bytes.saturating_mul(2).max(128 << 20)
}

/// A bound NBD listener. `bind` then `run`.
pub struct NbdServer {
    listener: Listener,
    local: NbdListen,
    socket_file: Option<SocketFile>,
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// Removes the Unix socket file this server created when the listener goes away.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0)
            && e.kind() != io::ErrorKind::NotFound
        {
            warn!(path = %self.0.display(), "could not remove the NBD socket file: {e}");
        }
    }
}

impl NbdServer {
    /// Binds the listener. A Unix socket path that already exists is replaced only if it is a
    /// socket nothing listens on (a stale one); otherwise this fails and says why.
    pub async fn bind(listen: &NbdListen) -> anyhow::Result<NbdServer> {
        match listen {
            NbdListen::Tcp(addr) => {
                let l = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding the NBD export to TCP {addr}"))?;
                let local = NbdListen::Tcp(l.local_addr().context("reading the NBD listener's address")?);
                Ok(NbdServer {
                    listener: Listener::Tcp(l),
                    local,
                    socket_file: None,
                })
            }
            NbdListen::Unix(path) => {
                remove_stale_socket(path).await?;
                let l = UnixListener::bind(path)
                    .with_context(|| format!("binding the NBD export to Unix socket {}", path.display()))?;
                Ok(NbdServer {
                    listener: Listener::Unix(l),
                    local: listen.clone(),
                    socket_file: Some(SocketFile(path.clone())),
                })
            }
        }
    }

    /// Where the server listens (for TCP with the port the system chose for port 0).
    pub fn local_addr(&self) -> &NbdListen {
        &self.local
    }

    /// Serves `device` until `shutdown` completes; then stops accepting (and removes the Unix
    /// socket file) and gives open connections [`DRAIN_TIMEOUT`] to finish in-flight requests.
    pub async fn run<D: BlockDevice>(
        self,
        device: Arc<D>,
        cfg: NbdConfig,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let size = device.size();
        let block_size = device.block_size();
        cfg.validate(size, block_size)?;
        let shared = Arc::new(Shared::new(device, cfg));
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut conns = JoinSet::new();
        let mut shutdown = pin!(shutdown);
        let next_conn = AtomicU64::new(1);
        info!(listen = %self.local, size, block_size, "NBD export listening");
        let listener = self.listener;
        loop {
            while conns.try_join_next().is_some() {}
            let accepted = tokio::select! {
                _ = &mut shutdown => break,
                a = accept(&listener) => a,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: keep serving the open connections, retry shortly.
                    warn!(listen = %self.local, "NBD accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let conn = next_conn.fetch_add(1, Ordering::Relaxed);
            if conns.len() >= MAX_CONNECTIONS {
                warn!(conn, %peer, "NBD connection refused: {MAX_CONNECTIONS} connections already open");
                continue;
            }
            let (shared, stop) = (shared.clone(), stop_rx.clone());
            match stream {
                Stream::Tcp(s) => {
                    let _ = s.set_nodelay(true);
                    conns.spawn(connection(s, shared, conn, peer, stop));
                }
                Stream::Unix(s) => {
                    conns.spawn(connection(s, shared, conn, peer, stop));
                }
            }
        }
        drop(listener);
        drop(self.socket_file);
        info!(listen = %self.local, open = conns.len(), "NBD export stopped accepting; draining connections");
        let _ = stop_tx.send(true);
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while let Some(r) = conns.join_next().await {
                if let Err(e) = r {
                    error!("NBD connection task failed: {e}");
                }
            }
        })
        .await;
        if drained.is_err() {
            warn!(
                open = conns.len(),
                "NBD connections did not drain within {DRAIN_TIMEOUT:?}; closing them with requests in flight"
            );
            conns.abort_all();
        }
        Ok(())
    }
}

async fn remove_stale_socket(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("checking NBD socket path {}", path.display())),
    };
    if !meta.file_type().is_socket() {
        bail!(
            "NBD socket path {} exists and is not a socket; refusing to replace it (remove it or choose another path)",
            path.display()
        );
    }
    match UnixStream::connect(path).await {
        Ok(_) => bail!(
            "another process listens on NBD socket {}; stop it or choose another path",
            path.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            info!(path = %path.display(), "removing stale NBD socket file (nothing listens on it)");
            std::fs::remove_file(path).with_context(|| format!("removing stale NBD socket {}", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("probing existing NBD socket {}", path.display())),
    }
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

async fn accept(listener: &Listener) -> io::Result<(Stream, String)> {
    match listener {
        Listener::Tcp(l) => l.accept().await.map(|(s, a)| (Stream::Tcp(s), a.to_string())),
        Listener::Unix(l) => l.accept().await.map(|(s, _)| (Stream::Unix(s), "unix".to_owned())),
    }
}

/// State shared by every connection of one export.
struct Shared<D> {
    device: Arc<D>,
    cfg: NbdConfig,
    size: u64,
    block_size: u32,
    transmission_flags: u16,
    /// Aligned requests hold it shared; read-modify-write holds it exclusive, so an unaligned
    /// write never interleaves with another write to the same blocks.
    rmw: RwLock<()>,
    /// Per-op handles, registered once per export.
    metrics: NbdMetrics,
}

impl<D: BlockDevice> Shared<D> {
    fn new(device: Arc<D>, cfg: NbdConfig) -> Self {
        let mut flags = wire::NBD_FLAG_HAS_FLAGS
            | wire::NBD_FLAG_SEND_FLUSH
            | wire::NBD_FLAG_SEND_FUA
            | wire::NBD_FLAG_SEND_TRIM
            | wire::NBD_FLAG_SEND_WRITE_ZEROES;
        if cfg.read_only {
            flags |= wire::NBD_FLAG_READ_ONLY;
        }
        if cfg.multi_conn {
            flags |= wire::NBD_FLAG_CAN_MULTI_CONN;
        }
        Shared {
            size: device.size(),
            block_size: device.block_size(),
            device,
            cfg,
            transmission_flags: flags,
            rmw: RwLock::new(()),
            metrics: NbdMetrics::new(),
        }
    }

    fn name_matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.cfg.export_name.as_bytes()
    }

    fn preferred_block_size(&self) -> u32 {
        self.block_size.max(4096).min(self.cfg.max_request_bytes)
    }
}

async fn connection<S, D>(mut stream: S, shared: Arc<Shared<D>>, conn: u64, peer: String, stop: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    D: BlockDevice,
{
    let mut stop_hs = stop.clone();
    let outcome = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut stream, &shared)) => r,
        _ = stop_hs.wait_for(|s| *s) => {
            debug!(conn, %peer, "NBD handshake interrupted by shutdown");
            return;
        }
    };
    match outcome {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => {
            debug!(conn, %peer, "NBD client ended the handshake without choosing an export");
            return;
        }
        Ok(Err(e)) => {
            warn!(conn, %peer, "NBD handshake failed, closing the connection: {e}");
            return;
        }
        Err(_) => {
            warn!(conn, %peer, "NBD handshake not finished within {HANDSHAKE_TIMEOUT:?}, closing the connection");
            return;
        }
    }
    info!(conn, %peer, export = %shared.cfg.export_name, "NBD client connected");
    let (reader, writer) = tokio::io::split(stream);
    let reason = transmission(reader, writer, shared, conn, stop).await;
    info!(conn, %peer, "NBD client disconnected: {reason}");
}

/// Why a handshake ended without a transmission phase.
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("malformed handshake: {0}")]
    Wire(#[from] wire::WireError),
    #[error("client asked for unknown export {0:?} with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    #[error("more than {MAX_HANDSHAKE_OPTIONS} options")]
    TooManyOptions,
}

/// Runs the fixed newstyle handshake. `Ok(true)`: the client chose the export (transmission
/// follows); `Ok(false)`: it aborted or hung up cleanly between options.
async fn handshake<S, D>(s: &mut S, shared: &Shared<D>) -> Result<bool, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    D: BlockDevice,
{
    s.write_all(&wire::encode_greeting(
        wire::NBD_FLAG_FIXED_NEWSTYLE | wire::NBD_FLAG_NO_ZEROES,
    ))
    .await?;
    let mut flags = [0u8; wire::CLIENT_FLAGS_LEN];
    s.read_exact(&mut flags).await?;
    let client = wire::parse_client_flags(&flags)?;
    for _ in 0..MAX_HANDSHAKE_OPTIONS {
        let mut hdr = [0u8; wire::OPTION_HEADER_LEN];
        match s.read_exact(&mut hdr).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
            Err(e) => return Err(e.into()),
        }
        let hdr = wire::parse_option_header(&hdr)?;
        let mut data = vec![0u8; hdr.len as usize];
        s.read_exact(&mut data).await?;
        let opt = hdr.option;
        let parsed = match wire::parse_option(opt, &data) {
            Ok(p) => p,
            Err(e) => {
                debug!("NBD option refused: {e}");
                let msg = e.to_string();
                s.write_all(&wire::encode_option_reply(
                    opt,
                    wire::NBD_REP_ERR_INVALID,
                    msg.as_bytes(),
                ))
                .await?;
                continue;
            }
        };
        match parsed {
            NbdOption::ExportName(name) => {
                if !shared.name_matches(&name) {
                    // No way to report an error to NBD_OPT_EXPORT_NAME: close (proto.md).
                    return Err(HandshakeError::UnknownExport(
                        String::from_utf8_lossy(&name).into_owned(),
                    ));
                }
                s.write_all(&wire::encode_export_name_reply(
                    shared.size,
                    shared.transmission_flags,
                    client.no_zeroes,
                ))
                .await?;
                return Ok(true);
            }
            NbdOption::Abort => {
                // The client may already have closed; a failed ACK is not an error.
                let _ = s
                    .write_all(&wire::encode_option_reply(opt, wire::NBD_REP_ACK, b""))
                    .await;
                return Ok(false);
            }
            NbdOption::List => {
                let data = wire::rep_server_data(shared.cfg.export_name.as_bytes(), shared.cfg.description.as_bytes());
                s.write_all(&wire::encode_option_reply(opt, wire::NBD_REP_SERVER, &data))
                    .await?;
                s.write_all(&wire::encode_option_reply(opt, wire::NBD_REP_ACK, b""))
                    .await?;
            }
            NbdOption::Info { go, name, requests } => {
                if !shared.name_matches(&name) {
                    let msg = format!("unknown export {:?}", String::from_utf8_lossy(&name));
                    s.write_all(&wire::encode_option_reply(
                        opt,
                        wire::NBD_REP_ERR_UNKNOWN,
                        msg.as_bytes(),
                    ))
                    .await?;
                    continue;
                }
                let info = wire::info_export_data(shared.size, shared.transmission_flags);
                s.write_all(&wire::encode_option_reply(opt, wire::NBD_REP_INFO, &info))
                    .await?;
                if requests.contains(&wire::NBD_INFO_NAME) {
                    let d = wire::info_string_data(wire::NBD_INFO_NAME, shared.cfg.export_name.as_bytes());
                    s.write_all(&wire::encode_option_reply(opt, wire::NBD_REP_INFO, &d))
                        .await?;
                }
                if requests.contains(&wire::NBD_INFO_DESCRIPTION) && !shared.cfg.description.is_empty() {
                    let d = wire::info_string_data(wire::NBD_INFO_DESCRIPTION, shared.cfg.description.as_bytes());
                    s.write_all(&wire::encode_option_reply(opt, wire::NBD_REP_INFO, &d))
                        .await?;
                }
                // Always sent: unaligned requests are still served (read-modify-write) for clients
                // that did not ask.
                let bs = wire::info_block_size_data(
                    shared.block_size,
                    shared.preferred_block_size(),
                    shared.cfg.max_request_bytes,
                );
                s.write_all(&wire::encode_option_reply(opt, wire::NBD_REP_INFO, &bs))
                    .await?;
                s.write_all(&wire::encode_option_reply(opt, wire::NBD_REP_ACK, b""))
                    .await?;
                if go {
                    return Ok(true);
                }
            }
            NbdOption::Unknown(other) => {
                debug!(option = other, "NBD option not supported");
                s.write_all(&wire::encode_option_reply(other, wire::NBD_REP_ERR_UNSUP, b""))
                    .await?;
            }
        }
    }
    Err(HandshakeError::TooManyOptions)
}

/// One reply on its way to the writer; dropping it gives back the request slot and bytes.
struct Reply {
    cookie: u64,
    error: u32,
    data: Option<Bytes>,
    _slot: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// What stopped the reader.
enum Stop<T> {
    Go(T),
    Shutdown,
    WriterGone,
}

async fn until_stop<F: Future>(f: F, stop: &mut watch::Receiver<bool>, tx: &mpsc::Sender<Reply>) -> Stop<F::Output> {
    tokio::select! {
        biased;
        _ = stop.wait_for(|s| *s) => Stop::Shutdown,
        _ = tx.closed() => Stop::WriterGone,
        v = f => Stop::Go(v),
    }
}

/// Runs the transmission phase; returns why it ended.
async fn transmission<R, W, D>(
    mut reader: R,
    writer: W,
    shared: Arc<Shared<D>>,
    conn: u64,
    mut stop: watch::Receiver<bool>,
) -> String
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    D: BlockDevice,
{
    let (tx, rx) = mpsc::channel::<Reply>(MAX_IN_FLIGHT);
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let byte_budget = in_flight_bytes(shared.cfg.max_request_bytes);
    let bytes = Arc::new(Semaphore::new(byte_budget as usize));
    let writer_fut = write_replies(writer, rx);
    let reader_fut = async {
        let mut tasks = JoinSet::new();
        let reason = loop {
            // A request task that panicked never replies; the client would wait forever.
            if let Some(Err(e)) = std::iter::from_fn(|| tasks.try_join_next()).find(|r| r.is_err()) {
                error!(conn, "NBD request task failed, closing the connection: {e}");
                break format!("request task failed: {e}");
            }
            let mut hdr = [0u8; wire::REQUEST_LEN];
            match until_stop(reader.read_exact(&mut hdr), &mut stop, &tx).await {
                Stop::Go(Ok(_)) => {}
                Stop::Go(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    break "client closed the connection without NBD_CMD_DISC".to_owned();
                }
                Stop::Go(Err(e)) => break format!("read error: {e}"),
                Stop::Shutdown => break "server shutting down".to_owned(),
                Stop::WriterGone => break "reply writer failed".to_owned(),
            }
            let req = match wire::parse_request(&hdr) {
                Ok(r) => r,
                Err(e) => {
                    warn!(conn, "NBD protocol error, closing the connection: {e}");
                    break format!("protocol error: {e}");
                }
            };
            if req.command == Command::Disc {
                break "NBD_CMD_DISC".to_owned();
            }
            let slot = match until_stop(slots.clone().acquire_owned(), &mut stop, &tx).await {
                Stop::Go(Ok(p)) => p,
                Stop::Go(Err(_)) => break "request slots closed".to_owned(),
                Stop::Shutdown => break "server shutting down".to_owned(),
                Stop::WriterGone => break "reply writer failed".to_owned(),
            };
            let checked = check_request(&req, &shared);
            // The write payload is on the wire whatever we decide; refused ones are discarded.
            let payload_len = req.payload_len();
            let (payload, byte_permit) = if payload_len == 0 {
                (Bytes::new(), None)
            } else if checked.is_err() || payload_len > shared.cfg.max_request_bytes {
                match until_stop(discard(&mut reader, u64::from(payload_len)), &mut stop, &tx).await {
                    Stop::Go(Ok(())) => {}
                    Stop::Go(Err(e)) => break format!("read error in a write payload: {e}"),
                    Stop::Shutdown => break "server shutting down".to_owned(),
                    Stop::WriterGone => break "reply writer failed".to_owned(),
                }
                (Bytes::new(), None)
            } else {
                let permit = match until_stop(bytes.clone().acquire_many_owned(payload_len), &mut stop, &tx).await {
                    Stop::Go(Ok(p)) => p,
                    Stop::Go(Err(_)) => break "byte budget closed".to_owned(),
                    Stop::Shutdown => break "server shutting down".to_owned(),
                    Stop::WriterGone => break "reply writer failed".to_owned(),
                };
                let mut buf = BytesMut::zeroed(payload_len as usize);
                match until_stop(reader.read_exact(&mut buf), &mut stop, &tx).await {
                    Stop::Go(Ok(_)) => {}
                    Stop::Go(Err(e)) => break format!("read error in a write payload: {e}"),
                    Stop::Shutdown => break "server shutting down".to_owned(),
                    Stop::WriterGone => break "reply writer failed".to_owned(),
                }
                (buf.freeze(), Some(permit))
            };
            let op = match checked {
                Ok(op) => op,
                Err(errno) => {
                    debug!(conn, ?req, errno, "NBD request refused");
                    let reply = Reply {
                        cookie: req.cookie,
                        error: errno,
                        data: None,
                        _slot: slot,
                        _bytes: None,
                    };
                    if tx.send(reply).await.is_err() {
                        break "reply writer failed".to_owned();
                    }
                    continue;
                }
            };
            let byte_permit = if op == Op::Read {
                match until_stop(bytes.clone().acquire_many_owned(req.len), &mut stop, &tx).await {
                    Stop::Go(Ok(p)) => Some(p),
                    Stop::Go(Err(_)) => break "byte budget closed".to_owned(),
                    Stop::Shutdown => break "server shutting down".to_owned(),
                    Stop::WriterGone => break "reply writer failed".to_owned(),
                }
            } else {
                byte_permit
            };
            let (shared, tx) = (shared.clone(), tx.clone());
            tasks.spawn(async move {
                let began = Instant::now();
                let (error, data) = match execute(&shared, op, &req, payload).await {
                    Ok(data) => (0, data),
                    Err(e) => {
                        warn!(conn, ?req, "NBD request failed on the device: {e}");
                        (e.nbd_error(), None)
                    }
                };
                shared.metrics.record(op.metric(), began.elapsed(), error != 0);
                let reply = Reply {
                    cookie: req.cookie,
                    error,
                    data,
                    _slot: slot,
                    _bytes: byte_permit,
                };
                // A closed channel means the writer failed; the connection is closing anyway.
                let _ = tx.send(reply).await;
            });
        };
        drop(tx);
        while let Some(r) = tasks.join_next().await {
            if let Err(e) = r {
                error!(conn, "NBD request task failed: {e}");
            }
        }
        reason
    };
    let (reason, written) = tokio::join!(reader_fut, writer_fut);
    match written {
        Ok(()) => reason,
        Err(e) => format!("{reason}; writing replies failed: {e}"),
    }
}

async fn write_replies<W: AsyncWrite + Unpin>(writer: W, mut rx: mpsc::Receiver<Reply>) -> io::Result<()> {
    let mut w = BufWriter::with_capacity(WRITE_BUFFER_BYTES, writer);
    while let Some(reply) = rx.recv().await {
        w.write_all(&wire::encode_simple_reply(reply.error, reply.cookie))
            .await?;
        if let Some(data) = &reply.data {
            w.write_all(data).await?;
        }
        drop(reply);
        if rx.is_empty() {
            w.flush().await?;
        }
    }
    w.flush().await?;
    w.shutdown().await
}

async fn discard<R: AsyncRead + Unpin>(reader: &mut R, mut len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; DISCARD_CHUNK.min(len as usize)];
    while len > 0 {
        let n = (len as usize).min(buf.len());
        reader.read_exact(&mut buf[..n]).await?;
        len -= n as u64;
    }
    Ok(())
}

/// A request that passed the checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
}

impl Op {
    fn metric(self) -> NbdOp {
        match self {
            Op::Read => NbdOp::Read,
            Op::Write => NbdOp::Write,
            Op::Flush => NbdOp::Flush,
            Op::Trim => NbdOp::Trim,
            Op::WriteZeroes => NbdOp::WriteZeroes,
        }
    }
}

/// Checks flags, permissions, length and range; `Err` is the NBD error of the reply.
fn check_request<D: BlockDevice>(req: &Request, shared: &Shared<D>) -> Result<Op, u32> {
    let op = match req.command {
        Command::Read => Op::Read,
        Command::Write => Op::Write,
        Command::Flush => Op::Flush,
        Command::Trim => Op::Trim,
        Command::WriteZeroes => Op::WriteZeroes,
        Command::Disc | Command::Unknown(_) => return Err(wire::NBD_EINVAL),
    };
    if req.flags & !(wire::NBD_CMD_FLAG_FUA | wire::NBD_CMD_FLAG_NO_HOLE) != 0 {
        return Err(wire::NBD_EINVAL);
    }
    if req.flags & wire::NBD_CMD_FLAG_NO_HOLE != 0 && op != Op::WriteZeroes {
        return Err(wire::NBD_EINVAL);
    }
    if op == Op::Flush {
        return Ok(op);
    }
    if shared.cfg.read_only && op != Op::Read {
        return Err(wire::NBD_EPERM);
    }
    if matches!(op, Op::Read | Op::Write) && req.len > shared.cfg.max_request_bytes {
        return Err(wire::NBD_EINVAL);
    }
    let in_range = req
        .offset
        .checked_add(u64::from(req.len))
        .is_some_and(|end| end <= shared.size);
    if !in_range {
        // proto.md: ENOSPC for writes past the end, EINVAL for other out-of-range requests.
        return Err(if matches!(op, Op::Write | Op::WriteZeroes) {
            wire::NBD_ENOSPC
        } else {
            wire::NBD_EINVAL
        });
    }
    Ok(op)
}

async fn execute<D: BlockDevice>(
    shared: &Shared<D>,
    op: Op,
    req: &Request,
    payload: Bytes,
) -> Result<Option<Bytes>, DeviceError> {
    let dev = &*shared.device;
    let bs = u64::from(shared.block_size);
    let (offset, len) = (req.offset, u64::from(req.len));
    let aligned = offset.is_multiple_of(bs) && len.is_multiple_of(bs);
    match op {
        Op::Flush => dev.flush().await.map(|()| None),
        Op::Read if len == 0 => Ok(Some(Bytes::new())),
        Op::Read => {
            let _shared = shared.rmw.read().await;
            let start = align_down(offset, bs);
            let end = align_up(offset + len, bs);
            let span = u32_len(end - start)?;
            let data = dev.read(start, span).await?;
            if data.len() != span as usize {
                error!(
                    offset = start,
                    len = span,
                    got = data.len(),
                    "device returned a short read"
                );
                return Err(DeviceError::Io(format!(
                    "device returned {} bytes for a {span}-byte read",
                    data.len()
                )));
            }
            let from = (offset - start) as usize;
            Ok(Some(data.slice(from..from + len as usize)))
        }
        Op::Write | Op::WriteZeroes | Op::Trim if len == 0 => Ok(None),
        Op::Write if aligned => {
            let _shared = shared.rmw.read().await;
            dev.write(offset, payload, req.fua()).await.map(|()| None)
        }
        Op::Write => {
            let _exclusive = shared.rmw.write().await;
            rmw_write(dev, bs, offset, &payload, req.fua()).await.map(|()| None)
        }
        Op::WriteZeroes if aligned => {
            let _shared = shared.rmw.read().await;
            dev.write_zeroes(offset, u32_len(len)?, req.fua()).await.map(|()| None)
        }
        Op::WriteZeroes => {
            let _exclusive = shared.rmw.write().await;
            let end = offset + len;
            let (inner_start, inner_end) = (align_up(offset, bs), align_down(end, bs));
            if inner_start >= inner_end {
                // Less than two blocks: one read-modify-write covers it.
                let zeros = vec![0u8; len as usize];
                rmw_write(dev, bs, offset, &zeros, req.fua()).await?;
            } else {
                if offset < inner_start {
                    let zeros = vec![0u8; (inner_start - offset) as usize];
                    rmw_write(dev, bs, offset, &zeros, req.fua()).await?;
                }
                dev.write_zeroes(inner_start, u32_len(inner_end - inner_start)?, req.fua())
                    .await?;
                if end > inner_end {
                    let zeros = vec![0u8; (end - inner_end) as usize];
                    rmw_write(dev, bs, inner_end, &zeros, req.fua()).await?;
                }
            }
            Ok(None)
        }
        Op::Trim => {
            // A trim is advisory: only whole blocks inside the range are passed on.
            let _shared = shared.rmw.read().await;
            let (start, end) = (align_up(offset, bs), align_down(offset + len, bs));
            if start < end {
                dev.trim(start, u32_len(end - start)?).await?;
                // The trim interface has no FUA; a flush makes a discard that changed data durable.
                if req.fua() {
                    dev.flush().await?;
                }
            }
            Ok(None)
        }
    }
}

/// Writes `data` at an unaligned `offset`: reads the partial head and tail blocks, merges, and
/// writes the whole aligned span. The caller holds `rmw` exclusively.
async fn rmw_write<D: BlockDevice>(dev: &D, bs: u64, offset: u64, data: &[u8], fua: bool) -> Result<(), DeviceError> {
    let end = offset + data.len() as u64;
    let start = align_down(offset, bs);
    let span_end = align_up(end, bs);
    let mut buf = BytesMut::zeroed((span_end - start) as usize);
    let bs_len = u32_len(bs)?;
    let head_read = offset != start;
    if head_read {
        let head = read_exact_block(dev, start, bs_len).await?;
        buf[..bs as usize].copy_from_slice(&head);
    }
    let tail_start = span_end - bs;
    if end != span_end && !(head_read && tail_start == start) {
        let tail = read_exact_block(dev, tail_start, bs_len).await?;
        let at = (tail_start - start) as usize;
        buf[at..at + bs as usize].copy_from_slice(&tail);
    }
    let at = (offset - start) as usize;
    buf[at..at + data.len()].copy_from_slice(data);
    dev.write(start, buf.freeze(), fua).await
}

async fn read_exact_block<D: BlockDevice>(dev: &D, offset: u64, len: u32) -> Result<Bytes, DeviceError> {
    let data = dev.read(offset, len).await?;
    if data.len() != len as usize {
        error!(offset, len, got = data.len(), "device returned a short read");
        return Err(DeviceError::Io(format!(
            "device returned {} bytes for a {len}-byte read",
            data.len()
        )));
    }
    Ok(data)
}

fn align_down(v: u64, bs: u64) -> u64 {
    v - v % bs
}

fn align_up(v: u64, bs: u64) -> u64 {
    v.div_ceil(bs) * bs
}

/// Lengths here derive from a u32 request plus at most two blocks with `max_request_bytes` capped
/// at 1 GiB, so they fit; a failure would be a server bug, reported rather than truncated.
fn u32_len(v: u64) -> Result<u32, DeviceError> {
    u32::try_from(v).map_err(|_| DeviceError::Invalid(format!("span of {v} bytes exceeds a device request")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_helpers() {
        assert_eq!(align_down(1000, 512), 512);
        assert_eq!(align_up(1000, 512), 1024);
        assert_eq!(align_up(1024, 512), 1024);
        assert_eq!(align_down(0, 4096), 0);
        assert_eq!(in_flight_bytes(32 << 20), 128 << 20);
        assert_eq!(in_flight_bytes(1 << 30), 2 << 30);
    }
}
