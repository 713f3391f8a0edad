//! The control socket of a running `attach`: how `session`, `login` and `logout` reach it.
//!
//! One Unix socket per attachment, `<run_dir>/attach-<pid>.sock`, mode 0600. A client writes one
//! JSON request line and reads one JSON reply line.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tracing::warn;

use crate::multipath::MultipathView;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    Status,
    /// Log out of one portal (the path stays down until enabled).
    Disable {
        portal: String,
    },
    /// Log in again through a disabled portal.
    Enable {
        portal: String,
    },
    /// Flush, log out of every path and end the attachment.
    Stop,
}

/// What one running attachment reports.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttachStatus {
    pub pid: u32,
    pub target: String,
    pub lun: u64,
    pub nbd: String,
    pub size_bytes: u64,
    pub block_size: u32,
    pub uptime_secs: f64,
    pub device: MultipathView,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ControlReply {
    Status(Box<AttachStatus>),
    Done { message: String },
    Error { message: String },
}

/// The socket path of this process's attachment.
pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join(format!("attach-{}.sock", std::process::id()))
}

/// Serves control requests until the task is dropped; `handle` answers each.
pub async fn serve(path: PathBuf, handle: Arc<dyn Fn(ControlRequest) -> ControlReply + Send + Sync>) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    loop {
        let (stream, _) = listener.accept().await?;
        let handle = handle.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            // A request is one short line; cap it at 64 KiB.
            let mut r = tokio::io::BufReader::new(r.take(64 * 1024));
            let reply = match tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line)).await {
                // A liveness probe (`running`) connects and closes without a request.
                Ok(Ok(0)) => return,
                Ok(Ok(_)) => match serde_json::from_str::<ControlRequest>(line.trim()) {
                    Ok(req) => handle(req),
                    Err(e) => ControlReply::Error {
                        message: format!("bad control request: {e}"),
                    },
                },
                _ => return,
            };
            let mut out = serde_json::to_vec(&reply).unwrap_or_default();
            out.push(b'\n');
            if let Err(e) = w.write_all(&out).await {
                warn!(error = %e, "control reply not sent");
            }
        });
    }
}

/// Sends one request to a socket and returns the reply.
pub fn request(path: &Path, req: &ControlRequest) -> Result<ControlReply> {
    let mut s = UnixStream::connect(path).with_context(|| format!("connecting to {}", path.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line)?;
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply)?;
    if reply.is_empty() {
        bail!("{} closed without a reply", path.display());
    }
    Ok(serde_json::from_str(reply.trim())?)
}

/// Control sockets of running attachments in `run_dir` (stale ones, whose process is gone, are
/// removed).
pub fn running(run_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with("attach-") && name.ends_with(".sock")
        })
        .filter(|p| {
            if UnixStream::connect(p).is_ok() {
                return true;
            }
            let _ = std::fs::remove_file(p);
            false
        })
        .collect();
    out.sort();
    out
}
