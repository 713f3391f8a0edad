//! raftsan-initiator: a multipath iSCSI initiator. Skeleton until its issue; it will drive
//! `raftsan_proto`'s initiator-side machines.
pub mod nbd;
