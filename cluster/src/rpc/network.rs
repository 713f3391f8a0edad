//! The client side of the openraft network: one [`NetworkFactory`] per Raft group, one
//! [`PeerNetwork`] per (group, peer), all sharing the node's [`Channels`].
//!
//! Failures map to openraft's errors so it backs off properly: a peer that cannot be reached
//! (connection refused or timed out, the group not present there) is `Unreachable`, a call that
//! outlived its budget is `Timeout`, anything else is `Network`.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use openraft::BasicNode;
use openraft::alias::SnapshotOf;
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable};
use openraft::network::{RPCOption, RPCTypes, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderError, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use tonic::Status;
use tonic::transport::Channel;

use super::snapshot::{self, SnapshotProgress};
use super::wire::{
    Entry, LogId, Vote, encode_entry, log_id_to_pb, opt_log_id_from_pb, opt_log_id_to_pb, vote_from_pb, vote_to_pb,
};
use super::{Channels, MAX_APPEND_BYTES, MAX_MESSAGE_BYTES};
use crate::pb::raft as pb;
use crate::pb::raft::raft_client::RaftClient;
use crate::raft::{GroupId, SnapshotData, TypeConfig};

type Err = RPCError<TypeConfig>;

/// Time allowed per byte of an AppendEntries on top of openraft's budget (10 ns/byte = 100 MB/s),
/// so a large write is not timed out by a heartbeat-sized budget.
const APPEND_NANOS_PER_BYTE: u64 = 10;

/// Least time given to a replication AppendEntries: the follower answers only once its log is
/// durable up to the request (an empty request waits for the appends before it), and on a loaded
/// node that takes longer than a heartbeat-sized budget; timing it out restarts replication with a
/// backoff. Heartbeats are bounded by openraft itself (its heartbeat worker times them out at
/// the heartbeat interval), and a dead follower is found by them, not by this.
const APPEND_FLOOR: Duration = Duration::from_millis(500);

/// Counters of a factory's networks (shared by its clones).
#[derive(Debug, Default)]
struct Stats {
    append_splits: AtomicU64,
}

/// Creates the network clients of one Raft group.
#[derive(Clone)]
pub struct NetworkFactory {
    group: GroupId,
    channels: Channels,
    progress: SnapshotProgress,
    append_cap: usize,
    stats: Arc<Stats>,
}

impl NetworkFactory {
    pub fn new(group: GroupId, channels: Channels, progress: SnapshotProgress) -> Self {
        Self {
            group,
            channels,
            progress,
            append_cap: MAX_APPEND_BYTES,
            stats: Arc::default(),
        }
    }

    /// Overrides the byte cap of one AppendEntries request (default [`MAX_APPEND_BYTES`]).
    pub fn with_append_cap(mut self, bytes: usize) -> Self {
        self.append_cap = bytes.max(1);
        self
    }

    /// How many AppendEntries requests were cut at the byte cap (answered with PartialSuccess).
    pub fn append_splits(&self) -> u64 {
        self.stats.append_splits.load(Ordering::Relaxed)
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> PeerNetwork {
        PeerNetwork {
            group: self.group,
            target,
            addr: node.addr.clone(),
            channels: self.channels.clone(),
            progress: self.progress.clone(),
            append_cap: self.append_cap,
            stats: self.stats.clone(),
        }
    }
}

/// The network to one peer for one group.
pub struct PeerNetwork {
    pub(crate) group: GroupId,
    pub(crate) target: u64,
    pub(crate) addr: String,
    channels: Channels,
    pub(crate) progress: SnapshotProgress,
    append_cap: usize,
    stats: Arc<Stats>,
}

/// Encodes the longest prefix of `entries` within `cap` bytes (at least one entry). Returns the
/// encoded entries and their total size.
pub(crate) fn encode_capped(entries: &[Entry], cap: usize) -> (Vec<Bytes>, usize) {
    let mut out = Vec::new();
    let mut total = 0usize;
    for e in entries {
        let b = encode_entry(e);
        if !out.is_empty() && total + b.len() > cap {
            break;
        }
        total += b.len();
        out.push(b);
    }
    (out, total)
}

impl PeerNetwork {
    pub(crate) fn client(&self) -> Result<RaftClient<Channel>, String> {
        let ch = self
            .channels
            .get(&self.addr)
            .map_err(|e| format!("group {}: node {}: {e}", self.group, self.target))?;
        Ok(RaftClient::new(ch)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    /// Maps a failed call's status: the peer down, the group missing there or a wrong node at the
    /// address is `Unreachable` (openraft backs off longer), the rest is `Network`.
    pub(crate) fn status_err(&self, what: &str, s: Status) -> Err {
        let mut msg = format!(
            "{what} to node {} at {} (group {}): {}: {}",
            self.target,
            self.addr,
            self.group,
            s.code(),
            s.message()
        );
        let mut src = std::error::Error::source(&s);
        while let Some(e) = src {
            msg.push_str(&format!(": {e}"));
            src = e.source();
        }
        match s.code() {
            tonic::Code::Unavailable | tonic::Code::NotFound | tonic::Code::FailedPrecondition => {
                RPCError::Unreachable(Unreachable::from_string(msg))
            }
            _ => RPCError::Network(NetworkError::from_string(msg)),
        }
    }

    async fn call<T>(
        &self,
        action: RPCTypes,
        from: u64,
        budget: Duration,
        fut: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, Err> {
        match tokio::time::timeout(budget, fut).await {
            Err(_) => Err(RPCError::Timeout(Timeout {
                action,
                id: from,
                target: self.target,
                timeout: budget,
            })),
            Ok(Err(s)) => Err(self.status_err(&action.to_string(), s)),
            Ok(Ok(r)) => Ok(r.into_inner()),
        }
    }

    fn bad_reply(&self, what: &str, msg: impl std::fmt::Display) -> Err {
        RPCError::Network(NetworkError::from_string(format!(
            "{what} to node {} at {} (group {}): malformed reply: {msg}",
            self.target, self.addr, self.group
        )))
    }

    fn unreachable(msg: String) -> Err {
        RPCError::Unreachable(Unreachable::from_string(msg))
    }

    async fn do_vote(
        &self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
        pre_vote: bool,
    ) -> Result<VoteResponse<TypeConfig>, Err> {
        let from = rpc.vote.leader_id.node_id;
        let req = pb::VoteRequest {
            group: self.group,
            target: self.target,
            vote: Some(vote_to_pb(&rpc.vote)),
            last_log_id: opt_log_id_to_pb(&rpc.last_log_id),
            leadership_transfer: rpc.leadership_transfer,
            pre_vote,
        };
        let mut c = self.client().map_err(Self::unreachable)?;
        let r = self.call(RPCTypes::Vote, from, option.soft_ttl(), c.vote(req)).await?;
        let vote = r
            .vote
            .as_ref()
            .map(vote_from_pb)
            .ok_or_else(|| self.bad_reply("vote", "no vote"))?;
        Ok(VoteResponse {
            vote,
            vote_granted: r.vote_granted,
            last_log_id: opt_log_id_from_pb(&r.last_log_id),
        })
    }
}

impl RaftNetworkV2<TypeConfig> for PeerNetwork {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, Err> {
        let from = rpc.vote.leader_id.node_id;
        let (entries, bytes) = encode_capped(&rpc.entries, self.append_cap);
        // When only a prefix goes, a full success means "up to the last entry sent".
        let cut: Option<LogId> = if entries.len() < rpc.entries.len() {
            self.stats.append_splits.fetch_add(1, Ordering::Relaxed);
            entries.len().checked_sub(1).map(|i| rpc.entries[i].log_id)
        } else {
            None
        };
        let req = pb::AppendRequest {
            group: self.group,
            target: self.target,
            vote: Some(vote_to_pb(&rpc.vote)),
            prev_log_id: opt_log_id_to_pb(&rpc.prev_log_id),
            entries,
            leader_commit: opt_log_id_to_pb(&rpc.leader_commit),
        };
        let mut budget = option.soft_ttl() + Duration::from_nanos(bytes as u64 * APPEND_NANOS_PER_BYTE);
        budget = budget.max(APPEND_FLOOR);
        let mut c = self.client().map_err(Self::unreachable)?;
        let r = self.call(RPCTypes::AppendEntries, from, budget, c.append(req)).await?;
        use pb::append_response::Kind;
        let resp = match Kind::try_from(r.kind) {
            Ok(Kind::Success) => match cut {
                Some(last) => AppendEntriesResponse::PartialSuccess(Some(last)),
                None => AppendEntriesResponse::Success,
            },
            Ok(Kind::PartialSuccess) => AppendEntriesResponse::PartialSuccess(opt_log_id_from_pb(&r.partial)),
            Ok(Kind::Conflict) => AppendEntriesResponse::Conflict,
            Ok(Kind::HigherVote) => AppendEntriesResponse::HigherVote(
                r.vote
                    .as_ref()
                    .map(vote_from_pb)
                    .ok_or_else(|| self.bad_reply("append", "higher vote without vote"))?,
            ),
            Ok(Kind::Unspecified) | Err(_) => return Err(self.bad_reply("append", format!("kind {}", r.kind))),
        };
        Ok(resp)
    }

    async fn vote(&mut self, rpc: VoteRequest<TypeConfig>, option: RPCOption) -> Result<VoteResponse<TypeConfig>, Err> {
        self.do_vote(rpc, option, false).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, Err> {
        self.do_vote(rpc, option, true).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: SnapshotOf<TypeConfig, SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        snapshot::send(self, vote, snapshot, cancel).await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, Err> {
        let from = req.from_leader().leader_id.node_id;
        let msg = pb::TransferLeaderRequest {
            group: self.group,
            target: self.target,
            from_leader: Some(vote_to_pb(req.from_leader())),
            to_node_id: *req.to_node_id(),
            last_log_id: req.last_log_id().map(log_id_to_pb),
        };
        let mut c = self.client().map_err(Self::unreachable)?;
        let r = self
            .call(
                RPCTypes::TransferLeader,
                from,
                option.soft_ttl(),
                c.transfer_leader(msg),
            )
            .await?;
        use pb::transfer_leader_response::Kind;
        let vote = |v: &Option<pb::Vote>| {
            v.as_ref()
                .map(vote_from_pb)
                .ok_or_else(|| self.bad_reply("transfer leader", "missing vote"))
        };
        match Kind::try_from(r.kind) {
            Ok(Kind::Ok) => Ok(Ok(())),
            Ok(Kind::VoteChanged) => Ok(Err(TransferLeaderError::VoteChanged {
                expected: vote(&r.expected_vote)?,
                actual: vote(&r.actual_vote)?,
            })),
            Ok(Kind::LogNotFlushed) => Ok(Err(TransferLeaderError::LogNotFlushed {
                expected: opt_log_id_from_pb(&r.expected_log_id),
                actual: opt_log_id_from_pb(&r.actual_log_id),
            })),
            Ok(Kind::Unspecified) | Err(_) => Err(self.bad_reply("transfer leader", format!("kind {}", r.kind))),
        }
    }
}
