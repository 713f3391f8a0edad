//! Helpers for the real-process tests: spawn `raftsan` on loopback with a generated config and a
//! log file per process, and run real iSCSI clients against it.
