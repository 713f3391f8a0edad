//! raftsan-initiator: a multipath iSCSI initiator that exports a volume over NBD.
//!
//! Layers, bottom up: [`session`] (one iSCSI session over one TCP connection, driving
//! `raftsan_proto::initiator`'s login machine), [`multipath`] (one session per portal, ALUA-aware
//! path selection, failover and retries), [`volume`] (a block device over the multipath LU) and
//! the NBD export; [`settings`] is the config file, [`control`] the socket of a running attach.
pub mod connector;
pub mod control;
pub mod metrics;
pub mod multipath;
pub mod nbd;
pub mod scsi;
pub mod session;
pub mod settings;
pub mod volume;
