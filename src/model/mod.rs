//! The shared model: what the layers above pass to each other and all agree on.
//!
//! Nothing here knows PostgreSQL's wire, Kafka's client or the command line: a WAL position
//! ([`Lsn`]), what happened to a row ([`Op`]), the clock every event is stamped with
//! ([`now_ms`]), the records and checkpoints that flow to a sink
//! ([`SinkItem`]) and the channel, bounded in items and bytes, they flow through ([`channel`]), why a run failed ([`Failure`], the exit codes), and the capability to create topics
//! that the source receives ([`TopicProvisioner`]). Being the bottom layer (see the module map in `src/lib.rs`), it imports
//! nothing from the crate; every other module may use it.

pub mod channel;
pub mod failure;
mod item;
pub mod lsn;
mod op;
mod provision;
mod time;

pub use channel::{channel, Budget, Charge, SinkReceiver, SinkSender};
pub use failure::{Failure, FailureKind};
pub use item::{Header, Record, SinkItem};
pub use lsn::Lsn;
pub use op::Op;
pub use provision::{BoxFuture, ProvisionError, TopicProvisioner};
pub use time::now_ms;
