//! pgcdc: change data capture from PostgreSQL to Kafka.
//!
//! The modules follow the dataflow:
//! [`cli`]/[`config`] → [`source`] (snapshot, replication connection, pgoutput decoding)
//! → `event` (the change model and its encoders) → `sink` (Kafka, stdout), with a
//! `checkpoint` module that owns LSN progress. [`indexer`] is a consumer of pgcdc's topics
//! (the `pgcdc-indexer` binary): it keeps a search index in step with the tables.

pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod event;
pub mod indexer;
pub mod kafka;
pub mod model;
pub mod run;
pub mod signals;
pub mod sink;
pub mod source;

// Operating pgcdc: logs, metrics, and the status/verify/drop commands.
pub mod logging;
pub mod metrics;
pub mod ops;
