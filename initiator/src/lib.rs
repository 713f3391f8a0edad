//! raftsan-initiator: a multipath iSCSI initiator. Skeleton until its issue; it will drive
//! `raftsan_proto`'s initiator-side machines.
pub mod control;
pub mod multipath;
pub mod scsi;
pub mod settings;
pub mod volume;
