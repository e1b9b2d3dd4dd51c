//! What shapes the events of a run: value format and type handling, column exclusions, the
//! type registry, and the catalog access the stream uses to follow schema changes.

use std::sync::Arc;

use tokio_postgres::Client;

use crate::checkpoint::ProgressStore;
use crate::cli::RunArgs;
use crate::event::Encoder;
use crate::kafka::{self, KafkaConfig, TopicSpec};
use crate::model::failure::{Classify, Failure, FailureKind, Recoverable};
use crate::model::{BoxFuture, ProvisionError, TopicProvisioner};
use crate::source::catalog::TableInfo;
use crate::source::changes::ChangeOptions;
use crate::source::conninfo::ConnInfo;
use crate::source::exclude::Exclusions;
use crate::source::outbox::OutboxConfig;
use crate::source::schema::{self, Lookup};

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
            name: format!("{}.transaction", args.kafka.topic_prefix),
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
    let exclude = Exclusions::new(&args.events.exclude_columns);
    exclude.check(tables).or_fail(FailureKind::Usage)?;
    let tables: Vec<TableInfo> = tables.iter().map(|t| exclude.apply(t)).collect();

    let options = args.event_options();
    let mut types = options.types();
    schema::load_types(
        client,
        &mut types,
        tables
            .iter()
            .flat_map(|t| t.columns.iter().map(|(_, oid)| *oid)),
    )
    .await
    .or_fail(FailureKind::Source)?;
    let encoder = Encoder::with_options(&args.kafka.topic_prefix, database, options, types);

    let changes = ChangeOptions {
        truncate: args.truncate,
        messages: args.messages,
        binary: options.binary,
        follow_publication: args.tables.is_empty(),
        exclude: Arc::new(exclude),
        lookup: None,
        annotation_prefix: (!args.annotation_prefix.is_empty())
            .then(|| Arc::from(args.annotation_prefix.as_str())),
        outbox: outbox_config(args)?.map(Arc::new),
    };
    Ok(Events {
        encoder,
        changes,
        tables,
    })
}

/// `--outbox`, `--outbox-column` and `--outbox-topic`, checked.
pub(super) fn outbox_config(args: &RunArgs) -> Result<Option<OutboxConfig>, Failure> {
    OutboxConfig::new(
        &args.outbox.tables,
        &args.outbox_columns,
        &args.outbox_topic,
        &args.kafka.topic_prefix,
    )
    .or_fail(FailureKind::Usage)
}

impl Events {
    /// Gives the stream its catalog access, creating topics where progress is kept (Kafka).
    pub(super) fn attach_lookup(
        &mut self,
        args: &RunArgs,
        conninfo: &ConnInfo,
        store: &ProgressStore,
    ) {
        let topics: Option<Arc<dyn TopicProvisioner>> = match store {
            ProgressStore::Kafka { cfg, .. } => Some(Arc::new(KafkaTopics {
                cfg: cfg.clone(),
                partitions: args.topic_partitions,
                replication: args.topic_replication_factor,
            })),
            ProgressStore::File(_) => None,
        };
        self.changes.lookup = Some(Arc::new(Lookup::new(conninfo.clone(), topics)));
    }
}

/// Creates the topics of tables that join the publication while streaming, as the topics of
/// the captured tables are created at start.
struct KafkaTopics {
    cfg: KafkaConfig,
    partitions: i32,
    replication: i32,
}

impl TopicProvisioner for KafkaTopics {
    fn ensure<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<(), ProvisionError>> {
        Box::pin(async move {
            let spec = TopicSpec {
                name: topic.to_string(),
                partitions: self.partitions,
                replication: self.replication,
                compacted: false,
            };
            match kafka::ensure_topics(&self.cfg, &[spec]).await {
                Ok(_) => Ok(()),
                Err(e) => Err(ProvisionError::new(e.recovery(), e)),
            }
        })
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
