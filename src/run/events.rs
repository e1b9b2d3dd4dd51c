//! What shapes the events of a run: value format and type handling, column exclusions, the
//! type registry, and the catalog access the stream uses to follow schema changes.

use std::sync::Arc;

use tokio_postgres::Client;

use super::failure::{Classify, Failure, FailureKind};
use super::progress::ProgressStore;
use crate::cli::RunArgs;
use crate::config::conninfo::ConnInfo;
use crate::event::{Encoder, EventOptions, TypeRegistry};
use crate::sink::kafka::TopicSpec;
use crate::source::catalog::TableInfo;
use crate::source::changes::ChangeOptions;
use crate::source::exclude::Exclusions;
use crate::source::schema::{self, Lookup, Topics};

/// The encoder, the stream's options, and the tables as the snapshot reads them.
pub(super) struct Events {
    pub encoder: Encoder,
    pub changes: ChangeOptions,
    /// The captured tables without their excluded columns.
    pub tables: Vec<TableInfo>,
}

/// Topics pgcdc writes besides the tables' (created at start).
pub(super) fn extra_topics(args: &RunArgs) -> Vec<TopicSpec> {
    let mut out = Vec::new();
    if args.transaction_metadata {
        out.push(TopicSpec {
            name: format!("{}.transaction", args.topic_prefix),
            partitions: 1,
            replication: args.topic_replication_factor,
            compacted: false,
        });
    }
    out
}

/// Checks the exclusions, reads the column types of `tables`, and builds the encoder.
/// Runs before anything is created, so a bad `--exclude-column` leaves no trace.
pub(super) async fn setup(
    args: &RunArgs,
    client: &Client,
    database: &str,
    tables: &[TableInfo],
) -> Result<Events, Failure> {
    let exclude = Exclusions::new(&args.exclude_columns);
    exclude.check(tables).or_fail(FailureKind::Usage)?;
    let tables: Vec<TableInfo> = tables.iter().map(|t| exclude.apply(t)).collect();

    let mut types = TypeRegistry::new(args.decimal, args.binary);
    schema::load_types(
        client,
        &mut types,
        tables
            .iter()
            .flat_map(|t| t.columns.iter().map(|(_, oid)| *oid)),
    )
    .await
    .or_fail(FailureKind::Source)?;
    let options = EventOptions {
        format: args.format,
        transaction_metadata: args.transaction_metadata,
    };
    let encoder = Encoder::with_options(&args.topic_prefix, database, options, types);

    let changes = ChangeOptions {
        truncate: args.truncate,
        messages: args.messages,
        binary: args.binary,
        follow_publication: args.tables.is_empty(),
        exclude: Arc::new(exclude),
        lookup: None,
    };
    Ok(Events {
        encoder,
        changes,
        tables,
    })
}

impl Events {
    /// Gives the stream its catalog access, creating topics where progress is kept (Kafka).
    pub(super) fn attach_lookup(
        &mut self,
        args: &RunArgs,
        conninfo: &ConnInfo,
        store: &ProgressStore,
    ) {
        let topics = match store {
            ProgressStore::Kafka { cfg, .. } => Topics::Kafka {
                cfg: cfg.clone(),
                partitions: args.topic_partitions,
                replication: args.topic_replication_factor,
            },
            ProgressStore::File(_) => Topics::None,
        };
        self.changes.lookup = Some(Arc::new(Lookup::new(conninfo.clone(), topics)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(extra: &[&str]) -> RunArgs {
        use clap::Parser;
        let argv = [
            "pgcdc",
            "run",
            "--source",
            "host=x",
            "--topic-prefix",
            "shop",
        ];
        let cli = crate::cli::Cli::try_parse_from(argv.iter().chain(extra)).expect("parses");
        match cli.command {
            crate::cli::Command::Run(args) => *args,
            _ => panic!("not run"),
        }
    }

    #[test]
    fn the_transaction_topic_is_created_only_with_transaction_metadata() {
        assert!(extra_topics(&run_args(&[])).is_empty());
        let topics = extra_topics(&run_args(&["--transaction-metadata"]));
        assert_eq!(topics.len(), 1);
        let t = &topics[0];
        assert_eq!(t.name, "shop.transaction");
        // One partition: BEGIN and END of every transaction in one order.
        assert_eq!(t.partitions, 1);
        assert!(!t.compacted, "transaction events have no key to compact by");
    }
}
