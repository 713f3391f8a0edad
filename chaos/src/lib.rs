//! raftsan-chaos: kill, pause and partition cluster nodes under I/O and prove that nothing
//! acknowledged is lost and nothing stale is read.
//!
//! [`workload`] writes and reads self-describing blocks through the initiator's NBD export
//! ([`nbd`] client), [`oracle`] judges every read, [`faults`] injects and heals faults against
//! real `raftsan serve` processes, [`run`] drives a seeded schedule and prints the figures.
pub mod disk;
pub mod faults;
pub mod nbd;
pub mod oracle;
pub mod run;
pub mod workload;
