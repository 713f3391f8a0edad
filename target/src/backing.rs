//! Backing stores behind one trait: a file or block device, memory, and a fault-injecting wrapper.
//!
//! Contract (all offsets and lengths in bytes, callers keep them inside `size_bytes()`):
//! * `read_at` fills the whole buffer or fails; holes read as zeroes.
//! * `write_at` writes the whole buffer or fails; data may sit in a volatile cache until `flush`.
//! * `flush` makes every completed write durable (fsync/fdatasync).
//! * `punch_hole` deallocates a range where the store can (reads then return zeroes); a store that
//!   cannot deallocate writes zeroes instead.
//! * `is_mapped` tells, for GET LBA STATUS, whether `offset` is in allocated space and how long
//!   the run of the same kind is.
//!
//! Errors are `std::io::Error`: the logical unit turns them into MEDIUM ERROR / HARDWARE ERROR
//! sense and never hides them.
//!
//! (in progress: implementations)
