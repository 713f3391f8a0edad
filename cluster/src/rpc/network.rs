//! The client side of the openraft network: one [`NetworkFactory`] per Raft group, one
//! [`PeerNetwork`] per (group, peer), all sharing the node's [`Channels`].
//!
//! Failures map to openraft's errors so it backs off properly: a peer that cannot be reached
//! (connection refused or timed out, the group not present there) is `Unreachable`, a call that
//! outlived its budget is `Timeout`, anything else is `Network`.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use openraft::BasicNode;
use openraft::OptionalSend;
use openraft::alias::SnapshotOf;
use openraft::base::{BoxFuture, BoxStream};
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable};
use openraft::network::{RPCOption, RPCTypes, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult, TransferLeaderError,
    TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use tokio::sync::Semaphore;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

use super::snapshot::{self, SnapshotProgress};
use super::wire::{
    Entry, LogId, Vote, encode_entry, log_id_to_pb, opt_log_id_from_pb, opt_log_id_to_pb, stream_reply_from_pb,
    vote_from_pb, vote_to_pb,
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

/// AppendEntries requests one StreamAppend may have unanswered toward a follower (each at most
/// the append byte cap; openraft's follower side pipelines up to 64).
pub const STREAM_MAX_IN_FLIGHT: usize = 32;

/// How often a StreamAppend waiting for a reply checks the age of its oldest unanswered request.
const STREAM_CHECK: Duration = Duration::from_millis(50);

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

/// Names a peer in error messages.
#[derive(Clone)]
struct PeerLabel {
    group: GroupId,
    target: u64,
    addr: String,
}

impl PeerLabel {
    fn status_err(&self, what: &str, s: Status) -> Err {
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

    fn bad_reply(&self, what: &str, msg: impl std::fmt::Display) -> Err {
        RPCError::Network(NetworkError::from_string(format!(
            "{what} to node {} at {} (group {}): malformed reply: {msg}",
            self.target, self.addr, self.group
        )))
    }
}

impl PeerNetwork {
    fn label(&self) -> PeerLabel {
        PeerLabel {
            group: self.group,
            target: self.target,
            addr: self.addr.clone(),
        }
    }

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
        self.label().status_err(what, s)
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
        self.label().bad_reply(what, msg)
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

/// A request of a StreamAppend waiting for its reply.
struct Sent {
    /// The leader that sent it.
    from: u64,
    /// Log id of its last entry (its prev_log_id when it has none).
    last: Option<LogId>,
    /// Only a prefix of openraft's request went (byte cap): the stream ends after its reply.
    cut: bool,
    /// Encoded entry bytes sent.
    bytes: usize,
    at: Instant,
    /// How long its reply may take (counting the unanswered bytes sent before it).
    budget: Duration,
}

type SentQueue = Arc<Mutex<VecDeque<Sent>>>;

fn lock_sent(q: &SentQueue) -> MutexGuard<'_, VecDeque<Sent>> {
    q.lock().unwrap_or_else(|p| p.into_inner())
}

/// The time a follower may take to answer an AppendEntries of `bytes` encoded entries.
fn append_budget(option: &RPCOption, bytes: usize) -> Duration {
    (option.soft_ttl() + Duration::from_nanos(bytes as u64 * APPEND_NANOS_PER_BYTE)).max(APPEND_FLOOR)
}

/// The sending half of a StreamAppend: openraft's requests, encoded (cut at the byte cap like a
/// unary AppendEntries), at most [`STREAM_MAX_IN_FLIGHT`] unanswered.
struct Outbound<S> {
    input: S,
    group: GroupId,
    target: u64,
    cap: usize,
    option: RPCOption,
    sent: SentQueue,
    permits: Arc<Semaphore>,
    stats: Arc<Stats>,
    stopped: bool,
}

impl<S> Outbound<S>
where
    S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Unpin,
{
    async fn next(mut self) -> Option<(pb::AppendRequest, Self)> {
        if self.stopped {
            return None;
        }
        let permit = self.permits.clone().acquire_owned().await.ok()?;
        let rpc = self.input.next().await?;
        // Given back when the reply arrives.
        permit.forget();
        let (entries, bytes) = encode_capped(&rpc.entries, self.cap);
        let cut = entries.len() < rpc.entries.len();
        let last = match entries.len().checked_sub(1) {
            Some(i) => Some(rpc.entries[i].log_id),
            None => rpc.prev_log_id,
        };
        if cut {
            self.stats.append_splits.fetch_add(1, Ordering::Relaxed);
            self.stopped = true;
        }
        {
            let mut sent = lock_sent(&self.sent);
            // The follower answers in order: this request's reply also waits for the bytes of the
            // unanswered requests before it.
            let ahead: usize = sent.iter().map(|s| s.bytes).sum();
            sent.push_back(Sent {
                from: rpc.vote.leader_id.node_id,
                last,
                cut,
                bytes,
                at: Instant::now(),
                budget: append_budget(&self.option, bytes + ahead),
            });
        }
        let req = pb::AppendRequest {
            group: self.group,
            target: self.target,
            vote: Some(vote_to_pb(&rpc.vote)),
            prev_log_id: opt_log_id_to_pb(&rpc.prev_log_id),
            entries,
            leader_commit: opt_log_id_to_pb(&rpc.leader_commit),
        };
        Some((req, self))
    }
}

/// The receiving half of a StreamAppend: the follower's replies, matched in order with the
/// requests sent; a reply overdue by its request's budget ends the stream with a timeout.
struct Inbound {
    replies: Streaming<pb::StreamAppendReply>,
    peer: PeerLabel,
    sent: SentQueue,
    permits: Arc<Semaphore>,
    done: bool,
}

type StreamItem = Result<StreamAppendResult<TypeConfig>, Err>;

impl Inbound {
    async fn next(mut self) -> Option<(StreamItem, Self)> {
        if self.done {
            return None;
        }
        let item = loop {
            match tokio::time::timeout(STREAM_CHECK, self.replies.next()).await {
                Ok(x) => break x,
                Err(_) => {
                    let overdue = lock_sent(&self.sent)
                        .front()
                        .filter(|s| s.at.elapsed() > s.budget)
                        .map(|s| (s.from, s.budget));
                    if let Some((from, budget)) = overdue {
                        self.done = true;
                        let e = RPCError::Timeout(Timeout {
                            action: RPCTypes::AppendEntries,
                            id: from,
                            target: self.peer.target,
                            timeout: budget,
                        });
                        return Some((Err(e), self));
                    }
                }
            }
        };
        let item = match item {
            None => {
                let unanswered = lock_sent(&self.sent).len();
                if unanswered == 0 {
                    return None;
                }
                self.done = true;
                Err(self.peer.bad_reply(
                    "stream append",
                    format!("stream ended with {unanswered} requests unanswered"),
                ))
            }
            Some(Err(s)) => {
                self.done = true;
                Err(self.peer.status_err("stream append", s))
            }
            Some(Ok(reply)) => {
                let sent = lock_sent(&self.sent).pop_front();
                match sent {
                    None => {
                        self.done = true;
                        Err(self.peer.bad_reply("stream append", "a reply to no request"))
                    }
                    Some(sent) => {
                        self.permits.add_permits(1);
                        match stream_reply_from_pb(&reply, sent.last.as_ref()) {
                            Ok(r) => {
                                // Not SUCCESS: the follower ends the stream; a cut request: the
                                // rest of openraft's request was not sent, so nothing after it
                                // may go before openraft restarts from the acknowledged point.
                                self.done = r.is_err() || sent.cut;
                                Ok(r)
                            }
                            Err(m) => {
                                self.done = true;
                                Err(self.peer.bad_reply("stream append", m))
                            }
                        }
                    }
                }
            }
        };
        Some((item, self))
    }
}

impl RaftNetworkV2<TypeConfig> for PeerNetwork {
    type SnapshotData = SnapshotData;

    /// Pipelined replication over one bidirectional gRPC stream: requests go as openraft
    /// produces them, without waiting for replies (at most [`STREAM_MAX_IN_FLIGHT`] unanswered),
    /// and replies come back in order. A reply overdue by its request's budget (as a unary
    /// AppendEntries) ends the stream with a timeout; openraft then starts a new one.
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<'s, Result<BoxStream<'s, StreamItem>, Err>>
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + OptionalSend + Unpin + 'static,
    {
        let peer = self.label();
        let client = self.client();
        let sent: SentQueue = Arc::default();
        let permits = Arc::new(Semaphore::new(STREAM_MAX_IN_FLIGHT));
        let outbound = Outbound {
            input,
            group: self.group,
            target: self.target,
            cap: self.append_cap,
            option: option.clone(),
            sent: sent.clone(),
            permits: permits.clone(),
            stats: self.stats.clone(),
            stopped: false,
        };
        Box::pin(async move {
            let mut c = client.map_err(Self::unreachable)?;
            // The first request is taken before connecting: openraft applies its backoff (after
            // errors) while it produces a request, so a peer that refuses connections is retried
            // at the backoff's pace, not in a loop.
            let Some((first, outbound)) = outbound.next().await else {
                return Ok(Box::pin(futures_util::stream::empty()) as BoxStream<'s, StreamItem>);
            };
            let requests = futures_util::stream::once(std::future::ready(first))
                .chain(futures_util::stream::unfold(outbound, Outbound::next));
            let setup = append_budget(&option, 0);
            let replies = match tokio::time::timeout(setup, c.stream_append(requests)).await {
                Err(_) => {
                    return Err(RPCError::Timeout(Timeout {
                        action: RPCTypes::AppendEntries,
                        id: 0,
                        target: peer.target,
                        timeout: setup,
                    }));
                }
                Ok(Err(s)) => return Err(peer.status_err("stream append", s)),
                Ok(Ok(r)) => r.into_inner(),
            };
            let inbound = Inbound {
                replies,
                peer,
                sent,
                permits,
                done: false,
            };
            let out: BoxStream<'s, StreamItem> = Box::pin(futures_util::stream::unfold(inbound, Inbound::next));
            Ok(out)
        })
    }

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
