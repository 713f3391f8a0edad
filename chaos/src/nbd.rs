//! A small NBD client (fixed newstyle handshake, NBD_OPT_GO, simple replies) with many requests
//! in flight, for driving the initiator's NBD export. Each request gets a handle; one reader task
//! matches replies to waiting requests.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail, ensure};
use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{Mutex, oneshot};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_EXPORT: u16 = 0;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const FLAG_FUA: u16 = 1;

/// The outcome of one request: Ok(data) (empty for writes) or the server's errno.
pub type Reply = Result<Bytes, u32>;

type Pending = Arc<std::sync::Mutex<HashMap<u64, (oneshot::Sender<Reply>, u32)>>>;

/// A connected NBD client.
pub struct NbdClient {
    writer: Mutex<OwnedWriteHalf>,
    pending: Pending,
    next: AtomicU64,
    pub size: u64,
}

impl NbdClient {
    /// Connects to a Unix socket export and negotiates the default export.
    pub async fn connect(socket: &Path) -> Result<NbdClient> {
        let mut s = UnixStream::connect(socket)
            .await
            .with_context(|| format!("connecting to {}", socket.display()))?;
        ensure!(s.read_u64().await? == NBDMAGIC, "not an NBD server");
        ensure!(s.read_u64().await? == IHAVEOPT, "not a newstyle NBD server");
        let _server_flags = s.read_u16().await?;
        s.write_u32(3).await?; // FIXED_NEWSTYLE | NO_ZEROES
        let mut opt = BytesMut::new();
        opt.put_u64(IHAVEOPT);
        opt.put_u32(OPT_GO);
        opt.put_u32(6);
        opt.put_u32(0); // export name ""
        opt.put_u16(0); // no info requests
        s.write_all(&opt).await?;
        let mut size = None;
        loop {
            ensure!(s.read_u64().await? == REPLY_MAGIC, "bad option reply magic");
            let _opt = s.read_u32().await?;
            let kind = s.read_u32().await?;
            let len = s.read_u32().await? as usize;
            ensure!(len <= 65536, "option reply of {len} bytes");
            let mut data = vec![0u8; len];
            s.read_exact(&mut data).await?;
            match kind {
                REP_ACK => break,
                REP_INFO if data.len() >= 12 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT => {
                    size = Some(u64::from_be_bytes(data[2..10].try_into()?));
                }
                REP_INFO => {}
                k if k & 0x8000_0000 != 0 => bail!("NBD_OPT_GO refused ({k:#x}): {}", String::from_utf8_lossy(&data)),
                _ => {}
            }
        }
        let size = size.context("the server sent no export size")?;
        let (mut r, w) = s.into_split();
        let pending: Pending = Arc::default();
        let p = pending.clone();
        tokio::spawn(async move {
            while let Ok(magic) = r.read_u32().await {
                if magic != SIMPLE_REPLY_MAGIC {
                    break;
                }
                let (Ok(error), Ok(handle)) = (r.read_u32().await, r.read_u64().await) else {
                    break;
                };
                let Some((tx, len)) = p.lock().unwrap_or_else(|e| e.into_inner()).remove(&handle) else {
                    break;
                };
                let reply = if error != 0 {
                    Err(error)
                } else if len > 0 {
                    let mut buf = vec![0u8; len as usize];
                    if r.read_exact(&mut buf).await.is_err() {
                        break;
                    }
                    Ok(Bytes::from(buf))
                } else {
                    Ok(Bytes::new())
                };
                let _ = tx.send(reply);
            }
            // Connection gone: every waiter learns it (EIO).
            for (_, (tx, _)) in p.lock().unwrap_or_else(|e| e.into_inner()).drain() {
                let _ = tx.send(Err(5));
            }
        });
        Ok(NbdClient {
            writer: Mutex::new(w),
            pending,
            next: AtomicU64::new(1),
            size,
        })
    }

    async fn request(&self, kind: u16, flags: u16, offset: u64, len: u32, data: Option<&[u8]>) -> Result<Reply> {
        let handle = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let read_len = if kind == CMD_READ { len } else { 0 };
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(handle, (tx, read_len));
        let mut b = BytesMut::with_capacity(28 + data.map_or(0, <[u8]>::len));
        b.put_u32(REQUEST_MAGIC);
        b.put_u16(flags);
        b.put_u16(kind);
        b.put_u64(handle);
        b.put_u64(offset);
        b.put_u32(len);
        if let Some(d) = data {
            b.put_slice(d);
        }
        self.writer
            .lock()
            .await
            .write_all(&b)
            .await
            .context("sending an NBD request")?;
        rx.await.context("NBD connection closed")
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<Reply> {
        self.request(CMD_READ, 0, offset, len, None).await
    }

    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<Reply> {
        self.request(
            CMD_WRITE,
            if fua { FLAG_FUA } else { 0 },
            offset,
            data.len() as u32,
            Some(data),
        )
        .await
    }

    pub async fn flush(&self) -> Result<Reply> {
        self.request(CMD_FLUSH, 0, 0, 0, None).await
    }

    /// Sends NBD_CMD_DISC (no reply).
    pub async fn disconnect(&self) {
        let mut b = BytesMut::new();
        b.put_u32(REQUEST_MAGIC);
        b.put_u16(0);
        b.put_u16(CMD_DISC);
        b.put_u64(0);
        b.put_u64(0);
        b.put_u32(0);
        let _ = self.writer.lock().await.write_all(&b).await;
    }
}
