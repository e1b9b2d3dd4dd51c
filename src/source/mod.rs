//! Everything that reads from PostgreSQL: the replication connection, the pgoutput
//! decoder and (later) the snapshot.

pub mod catalog;
pub mod changes;
pub mod copy_text;
pub mod lsn;
pub mod pgoutput;
pub mod replication;
pub mod snapshot;

pub use lsn::Lsn;
