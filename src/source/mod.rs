//! Everything that reads from PostgreSQL: the replication connection, the pgoutput
//! decoder and (later) the snapshot.

pub mod connect;
pub mod lsn;
pub mod pgoutput;
pub mod replication;

pub use lsn::Lsn;
