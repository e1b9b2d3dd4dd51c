//! The replication connection (being written).
