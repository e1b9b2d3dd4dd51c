//! pgcdc: change data capture from PostgreSQL to Kafka.
//!
//! # Module map
//!
//! The modules are in layers, top to bottom. **A module may import only from its own layer
//! and the layers below it; the modules of layer 0 do not import each other.**
//! `tests/layers.rs` checks every `crate::` path in `src/` against this list, so a dependency
//! that points up fails the build's tests and names the file and line.
//!
//! 0. [`run`], [`ops`], [`indexer`]
//!    — orchestration and consumers: `pgcdc run` (snapshot, then the stream, until stopped),
//!    the `status`/`verify`/`drop`/`wait` commands, and the `pgcdc-indexer` consumer of the topics.
//! 1. [`cli`], [`config`]
//!    — the flags, and the `--config` file merged under them.
//! 2. [`source`]
//!    — PostgreSQL: conninfo, connections, TLS, catalog, snapshot (COPY), the replication
//!    connection, the pgoutput decoder and the change builder. It knows nothing of Kafka: it
//!    fills the sink channel with records, and creates topics through a capability it is
//!    handed ([`model::TopicProvisioner`]).
//! 3. [`event`]
//!    — the change model's encoders (JSON, kinds, time, nested values) and the one ordering
//!    rule of a row's events.
//! 4. [`sink`]
//!    — the Kafka producer sink, the stdout sink, and the sink task that reports a checkpoint
//!    once everything before it is acknowledged.
//! 5. [`checkpoint`]
//!    — the progress record and its one store (Kafka topic or file), for `run` and `ops`.
//! 6. [`kafka`]
//!    — the one Kafka client module: client configuration, admin, the topic reader.
//! 7. [`metrics`], [`logging`], [`signals`]
//!    — process-wide utilities.
//! 8. [`model`]
//!    — what everyone shares: [`model::Lsn`], [`model::Record`] and [`model::SinkItem`] with
//!    the channel they flow through, [`model::Op`], [`model::now_ms`], the failure taxonomy
//!    and exit codes, the topic provisioning capability.
//!
//! How one row travels through these files, from `main.rs` to the confirmed LSN, is told in
//! the README ("How it is built").

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

// Operating pgcdc: logs, metrics, and the status/verify/drop/wait commands.
pub mod logging;
pub mod metrics;
pub mod ops;
