//! Everything that reads from PostgreSQL: start-up checks ([`catalog`]), the replication
//! connection ([`replication`]) and ordinary connections ([`connect`]), the I/O-free pgoutput
//! decoder ([`pgoutput`]), the initial [`snapshot`], and the turning of decoded messages into
//! events ([`changes`]).

pub mod catalog;
pub mod changes;
pub mod connect;
pub mod copy_text;
pub mod lsn;
pub mod pgoutput;
pub mod replication;
pub mod snapshot;

pub use lsn::Lsn;
