//! The `pgcdc-indexer` binary: flags, logging and signals around [`pgcdc::indexer`].
//!
//! Exit codes: 0 stopped by a signal, 1 the search engine refused a write or Kafka failed,
//! 2 usage.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};
use pgcdc::cli::{properties_from_env, Property, PropertyParser};
use pgcdc::indexer::http::{HttpClient, HttpError};
use pgcdc::indexer::meili::MeiliTarget;
use pgcdc::indexer::target::{StdoutTarget, Target};
use pgcdc::indexer::wait::IndexWaiter;
use pgcdc::indexer::{source, Indexer, IndexerError, DEFAULT_MAX_BATCH};
use pgcdc::kafka::KafkaConfig;
use pgcdc::metrics::http::{serve, Routes};
use pgcdc::metrics::wait::WaitClient;

/// Keeps a search index equal to the tables pgcdc captures: reads pgcdc's topics from the
/// beginning and applies every event idempotently, versioned by its LSN, so replays and
/// reordering never make a document older. One index per topic, named after the table.
#[derive(Debug, Parser)]
#[command(name = "pgcdc-indexer", version, about, long_about = None, after_help = AFTER_HELP)]
struct Args {
    /// Kafka bootstrap servers, host:port[,host:port…].
    #[arg(long, env = "PGCDC_INDEXER_KAFKA", value_name = "BOOTSTRAP")]
    kafka: String,

    /// A topic written by pgcdc (repeatable; comma-separated in the variable).
    #[arg(
        long = "topic",
        env = "PGCDC_INDEXER_TOPICS",
        value_name = "TOPIC",
        value_delimiter = ',',
        required = true
    )]
    topics: Vec<String>,

    /// Where documents go.
    #[arg(
        long,
        env = "PGCDC_INDEXER_TARGET",
        value_enum,
        default_value = "stdout"
    )]
    target: TargetKind,

    /// Meilisearch's address, `http://` or `https://` (connections are kept alive).
    #[arg(
        long,
        env = "PGCDC_INDEXER_MEILI_URL",
        value_name = "URL",
        default_value = "http://127.0.0.1:7700"
    )]
    meili_url: String,

    /// Meilisearch API key (or master key), sent as a bearer token.
    #[arg(
        long,
        env = "PGCDC_INDEXER_MEILI_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    meili_key: Option<String>,

    /// A PEM file of CA certificates trusted for an `https://` Meilisearch, besides the
    /// system's (for a private CA).
    #[arg(long, env = "PGCDC_INDEXER_MEILI_CA_FILE", value_name = "PATH")]
    meili_ca_file: Option<PathBuf>,

    /// A librdkafka property for the reader (repeatable; the value is taken whole). In the
    /// variable: semicolon-separated, `\;` for a semicolon inside a value.
    #[arg(
        short = 'X',
        env = "PGCDC_INDEXER_KAFKA_PROPERTIES",
        value_name = "KEY=VALUE",
        value_parser = PropertyParser,
        hide_env_values = true
    )]
    kafka_properties: Vec<Property>,

    /// Records applied together at most.
    #[arg(long, env = "PGCDC_INDEXER_MAX_BATCH", value_name = "N", default_value_t = DEFAULT_MAX_BATCH)]
    max_batch: usize,

    /// Serve read-your-writes on http://<ADDR>/wait?lsn=<LSN> (answers once everything
    /// committed at or below the LSN is in the index; needs --pgcdc-url) and the highest LSN
    /// applied per index on /status (e.g. 127.0.0.1:9188; port 0 picks a free port, logged).
    #[arg(long, env = "PGCDC_INDEXER_HTTP_ADDR", value_name = "HOST:PORT")]
    http_addr: Option<String>,

    /// pgcdc's --metrics-addr (http://host:port), asked first by /wait: once pgcdc has
    /// published the LSN, its events are below the topics' current offsets.
    #[arg(long, env = "PGCDC_INDEXER_PGCDC_URL", value_name = "URL")]
    pgcdc_url: Option<String>,
}

const AFTER_HELP: &str = "\
Examples:
  pgcdc-indexer --kafka localhost:9092 --topic pgcdc.public.orders
  pgcdc-indexer --kafka kafka:9092 --topic pgcdc.public.orders --target meilisearch \\
      --meili-url http://meilisearch:7700 --meili-key \"$MEILI_MASTER_KEY\"

Read-your-writes: with --http-addr and --pgcdc-url, an application that took
`SELECT pg_current_wal_insert_lsn()` after its commit asks GET /wait?lsn=<LSN>&timeout=5s and
searches once it answers 200 ({\"reached\":true,…}); 504 when the timeout ended first.

stdout prints one JSON line per write ({\"index\",\"action\":\"upsert\"|\"delete\",…}) and, on
SIGINT/SIGTERM, every document ({\"action\":\"document\"}). Logs go to stderr (PGCDC_LOG).
Exit codes: 0 stopped by a signal, 1 indexing failed, 2 usage.";

/// Where documents go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TargetKind {
    /// Print the derived documents as JSON lines.
    Stdout,
    /// Meilisearch over HTTP.
    Meilisearch,
}

fn main() -> ExitCode {
    let matches = Args::command().get_matches();
    let mut args = match Args::from_arg_matches(&matches) {
        Ok(args) => args,
        Err(e) => e.exit(),
    };
    // Only the variable is a list; a flag's value is one property.
    match properties_from_env(&matches, "kafka_properties") {
        Some(Ok(p)) => args.kafka_properties = p,
        Some(Err(e)) => {
            eprintln!("error: PGCDC_INDEXER_KAFKA_PROPERTIES: {e}");
            return ExitCode::from(2);
        }
        None => {}
    }
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(match e {
                IndexerError::Usage(_) => 2,
                _ => 1,
            })
        }
    }
}

async fn run(args: Args) -> Result<(), IndexerError> {
    if args.max_batch == 0 {
        return Err(IndexerError::Usage("--max-batch must be at least 1".into()));
    }
    match args.target {
        TargetKind::Stdout => {
            let target = StdoutTarget::new(std::io::BufWriter::new(std::io::stdout()));
            index(args, target).await
        }
        TargetKind::Meilisearch => {
            let http = HttpClient::with_ca_file(
                &args.meili_url,
                args.meili_key.clone(),
                Duration::from_secs(30),
                args.meili_ca_file.as_deref(),
            )
            .map_err(|e| {
                let flag = match e {
                    HttpError::BadCa { .. } => "--meili-ca-file",
                    HttpError::BadKey => "--meili-key",
                    _ => "--meili-url",
                };
                IndexerError::Usage(format!("{flag}: {e}"))
            })?;
            index(args, MeiliTarget::new(http)).await
        }
    }
}

async fn index<T: Target>(args: Args, target: T) -> Result<(), IndexerError> {
    let mut indexer = Indexer::new(target, &args.topics)?;
    let stop = pgcdc::signals::stop_on_signals();
    let mut cfg = KafkaConfig::new(args.kafka.clone());
    for p in &args.kafka_properties {
        cfg = cfg.property(p.key.clone(), p.value.clone());
    }
    let pgcdc = match &args.pgcdc_url {
        Some(url) => Some(
            WaitClient::new(url).map_err(|e| IndexerError::Usage(format!("--pgcdc-url {e}")))?,
        ),
        None => None,
    };
    if let Some(addr) = &args.http_addr {
        if pgcdc.is_none() {
            tracing::warn!(
                "--http-addr without --pgcdc-url: /wait answers 503 (it needs to ask pgcdc)"
            );
        }
        let waiter = IndexWaiter::new(
            indexer.applied(),
            stop.clone(),
            pgcdc,
            args.topics.clone(),
            cfg.clone(),
        );
        let routes = Routes {
            metrics: None,
            wait: Some(Arc::new(waiter)),
        };
        let bound = serve(addr, routes).await.map_err(|e| {
            let why = std::error::Error::source(&e).map_or(e.to_string(), |s| s.to_string());
            IndexerError::Usage(format!(
                "cannot serve on {addr}: {why} (choose another --http-addr)"
            ))
        })?;
        tracing::info!(addr = %bound, "serving read-your-writes on http://{bound}/wait?lsn= and the applied positions on http://{bound}/status");
    }
    let (tx, rx) = tokio::sync::mpsc::channel(4 * args.max_batch);
    let reader = source::spawn(cfg, args.topics.clone(), tx);
    let result = indexer.run(rx, stop, args.max_batch).await;
    // `run` dropped the receiver: the reader ends at its next poll. Its own error explains
    // a vanished channel better than `ReaderGone`.
    if matches!(result, Err(IndexerError::ReaderGone)) {
        if let Ok(Err(e)) = reader.join() {
            return Err(e.into());
        }
    }
    result
}

/// Logs go to stderr (stdout carries documents). `PGCDC_LOG` takes a tracing filter.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGCDC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent_and_every_flag_has_a_variable() {
        let cmd = Args::command();
        cmd.clone().debug_assert();
        for arg in cmd.get_arguments() {
            if matches!(arg.get_id().as_str(), "help" | "version") {
                continue;
            }
            assert!(arg.get_help().is_some(), "--{} has no help", arg.get_id());
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            assert!(
                env.is_some_and(|e| e.starts_with("PGCDC_INDEXER_")),
                "--{} has no PGCDC_INDEXER_ variable",
                arg.get_id()
            );
        }
    }
}
