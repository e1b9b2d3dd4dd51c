//! The command line. Every flag has a help line and a `PGCDC_*` environment variable.

use clap::{Parser, Subcommand};

/// Change data capture from PostgreSQL to Kafka.
#[derive(Debug, Parser)]
#[command(name = "pgcdc", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Snapshot the selected tables, then stream every committed change.
    Run,
}
