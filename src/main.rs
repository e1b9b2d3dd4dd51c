//! The `pgcdc` binary: parse flags, set up logging and signals, run, map failures to exit codes.

use std::process::ExitCode;

use clap::Parser;
use pgcdc::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    let result = runtime.block_on(async {
        let stop = pgcdc::signals::stop_on_signals();
        match cli.command {
            Command::Run(args) => pgcdc::run::run(*args, stop).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {:#}", failure.error);
            ExitCode::from(failure.kind.exit_code())
        }
    }
}

/// Logs go to stderr (stdout may carry events). `PGCDC_LOG` takes a tracing filter.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGCDC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
