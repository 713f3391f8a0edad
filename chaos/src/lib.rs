//! raftsan-chaos: kill, pause and partition cluster nodes under I/O and prove that nothing
//! acknowledged is lost and nothing stale is read.
//!
//! [`workload`] writes and reads self-describing blocks through the initiator's NBD export
//! ([`nbd`] client), [`oracle`] judges every read, [`faults`] injects and heals faults against
//! real `raftsan serve` processes ([`netem`]: delay and loss on one path; [`stale`]: the delayed
//! stale write), [`run`] drives a seeded schedule and prints the figures.
//! [`iscsi`] is a second workload that speaks iSCSI to the portals directly (no initiator
//! daemon); [`durability`] checks that flushed writes survive the loss of every node at once;
//! [`replace`] swaps a member for a brand-new node under I/O.
pub mod disk;
pub mod durability;
pub mod faults;
pub mod iscsi;
pub mod nbd;
pub mod netem;
pub mod oracle;
pub mod replace;
pub mod run;
pub mod stale;
pub mod workload;
