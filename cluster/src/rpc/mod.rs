//! Cluster RPC on tonic: the openraft network of every Raft group (client side [`NetworkFactory`],
//! server side [`raft_service`]), mutual TLS with a cluster CA ([`tls`]), and differential
//! snapshot streaming ([`snapshot`]).
//!
//! Wiring on a node:
//!
//! ```ignore
//! let channels = Channels::new(Some(tls_files.clone()))?;
//! let progress = SnapshotProgress::default();
//! // one factory per group, handed to Raft::new
//! let net = NetworkFactory::new(group, channels.clone(), progress.clone());
//! // one server per node, every group served by the same service
//! let mut builder = server_builder(Some(&tls_files))?;
//! builder
//!     .add_service(raft_service(registry, progress.clone()))
//!     .add_service(cluster_service)
//!     .serve_with_incoming_shutdown(incoming(listener), ..)
//! ```

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use openraft::storage::RaftStateMachine;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint, Server};

use crate::raft::{GroupId, SnapshotBase, SnapshotData, TypeConfig};

pub mod network;
pub mod server;
pub mod snapshot;
pub mod tls;
mod wire;

#[cfg(test)]
mod tests;

/// Fuzzing entry points (fuzz/fuzz_targets/rpc.rs), not an API.
#[doc(hidden)]
pub use wire::{
    fuzz_decode_append, fuzz_decode_snapshot, fuzz_decode_stream_reply, fuzz_decode_transfer, fuzz_decode_vote,
    fuzz_encode_append, fuzz_encode_stream_reply, fuzz_membership_to_bytes,
};

pub use network::{NetworkFactory, PeerNetwork};
pub use server::{RaftService, raft_service};
pub use snapshot::{SnapshotDirection, SnapshotProgress, SnapshotTransfer};
pub use tls::{TlsFiles, client_tls, create_ca, issue_admin_cert, issue_node_cert, server_tls};

/// Largest gRPC message either side accepts or sends (a 32 MiB write travels in one message).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// Encoded entry bytes per AppendEntries request (the first entry always goes, whatever its size).
pub const MAX_APPEND_BYTES: usize = 8 << 20;
/// Largest HTTP/2 frame a node accepts (SETTINGS_MAX_FRAME_SIZE; the protocol default is 16 KiB).
/// With the default, an AppendEntries of a few writes went out as several DATA frames, each its
/// own write to the socket and read on the other side; with this, one message is one frame.
pub const HTTP2_MAX_FRAME_BYTES: u32 = 1 << 20;
/// HTTP/2 flow-control windows a node grants per stream and per connection: a full
/// AppendEntries ([`MAX_APPEND_BYTES`]) fits a stream's window, and window updates are rare.
pub const HTTP2_STREAM_WINDOW_BYTES: u32 = MAX_APPEND_BYTES as u32;
pub const HTTP2_CONNECTION_WINDOW_BYTES: u32 = 2 * MAX_APPEND_BYTES as u32;
/// Timeout of establishing a connection to a peer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);
/// HTTP/2 keepalive ping interval and timeout (a dead peer is noticed on idle connections too).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The Raft groups this node serves, as the RPC server sees them.
///
/// Generic over the state machine type so tests can use a small one; the daemon uses its own.
pub trait GroupRegistry<SM>: Send + Sync + 'static
where
    SM: RaftStateMachine<TypeConfig, SnapshotData = SnapshotData>,
{
    /// The Raft handle of `group`, None when this node has no such group (yet).
    fn raft(&self, group: GroupId) -> Option<openraft::Raft<TypeConfig, SM>>;
    /// Where a snapshot of `group` is compared and staged on this node.
    fn snapshot_base(&self, group: GroupId) -> Option<SnapshotBase>;
}

/// A pool of lazily connected tonic channels keyed by "host:port", shared by every group (one
/// HTTP/2 connection per peer carries all groups' RPCs).
#[derive(Clone)]
pub struct Channels {
    tls: Option<ClientTlsConfig>,
    pool: Arc<Mutex<HashMap<String, Channel>>>,
    /// Source address of outgoing connections (None: the kernel picks).
    local: Option<std::net::IpAddr>,
}

impl Channels {
    /// `tls`: the node's certificate files (None: plain HTTP/2, for tests only).
    pub fn new(tls: Option<TlsFiles>) -> io::Result<Self> {
        let tls = tls.as_ref().map(client_tls).transpose()?;
        Ok(Self {
            tls,
            pool: Arc::default(),
            local: None,
        })
    }

    /// Connects from `ip` (a node connects from the address it listens on, so its peers and
    /// firewall rules see one address per node).
    pub fn with_local_address(mut self, ip: Option<std::net::IpAddr>) -> Self {
        self.local = ip;
        self
    }

    fn pool(&self) -> MutexGuard<'_, HashMap<String, Channel>> {
        // A poisoned pool only means another thread panicked while inserting; the map is fine.
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The channel to `addr` ("host:port"); created on first use, connected lazily (and
    /// reconnected by tonic after failures).
    pub fn get(&self, addr: &str) -> io::Result<Channel> {
        if let Some(ch) = self.pool().get(addr) {
            return Ok(ch.clone());
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let bad = |e: &dyn std::fmt::Display| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("peer address {addr:?}: {e}"))
        };
        let mut ep = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| bad(&e))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .max_frame_size(HTTP2_MAX_FRAME_BYTES)
            .initial_stream_window_size(HTTP2_STREAM_WINDOW_BYTES)
            .initial_connection_window_size(HTTP2_CONNECTION_WINDOW_BYTES)
            .local_address(self.local);
        if let Some(tls) = &self.tls {
            ep = ep.tls_config(tls.clone()).map_err(|e| bad(&e))?;
        }
        let ch = ep.connect_lazy();
        Ok(self.pool().entry(addr.to_string()).or_insert(ch).clone())
    }

    /// Drops the channel to `addr` (the next [`Self::get`] makes a new one).
    pub fn forget(&self, addr: &str) {
        self.pool().remove(addr);
    }
}

/// The connections `listener` accepts, for [`Server::serve_with_incoming_shutdown`], with
/// TCP_NODELAY set. The server builder's `tcp_nodelay` applies only to listeners tonic binds
/// itself: without this, a follower's second small reply on a connection waits in its send
/// buffer for the leader's delayed ACK (Nagle), about 40 ms on Linux.
pub fn incoming(listener: tokio::net::TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// A tonic server with the node's TLS (client certificates required) and connection settings.
/// Add [`raft_service`] and the cluster service to it.
pub fn server_builder(tls: Option<&TlsFiles>) -> io::Result<Server> {
    let mut b = Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_frame_size(HTTP2_MAX_FRAME_BYTES)
        .initial_stream_window_size(HTTP2_STREAM_WINDOW_BYTES)
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW_BYTES);
    if let Some(files) = tls {
        b = b
            .tls_config(server_tls(files)?)
            .map_err(|e| io::Error::other(format!("server TLS: {e}")))?;
    }
    Ok(b)
}
