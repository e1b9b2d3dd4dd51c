//! Everything that reads from PostgreSQL: where the server is and how to reach it
//! ([`conninfo`], libpq's conninfo), start-up checks ([`catalog`]), the replication
//! connection ([`replication`]) and ordinary connections ([`connect`]), the I/O-free pgoutput
//! decoder ([`pgoutput`]), the initial [`snapshot`], and the turning of decoded messages into
//! events ([`changes`]), with what it learns from the catalog on the way ([`schema`]), and
//! the topic each table's events go to ([`topic`]). Both
//! connections use one canonical text form for values ([`session`]).

pub mod catalog;
pub mod changes;
pub mod connect;
pub mod conninfo;
pub mod copy_binary;
pub mod copy_text;
pub mod exclude;
pub mod outbox;
pub mod pg_tls;
pub mod pgoutput;
pub mod replication;
pub mod schema;
pub mod session;
pub mod slot_lock;
pub mod snapshot;
pub mod topic;
