//! The `pgcdc` binary: parse flags (and `--config`), set up logging and signals, run the
//! command, map failures to exit codes (listed in `pgcdc --help`).

use std::process::ExitCode;

use pgcdc::cli::{Command, LogFormat};
use pgcdc::config::file::{parse_cli, ConfigError};

/// pgcdc allocates a key and a value per row and frees them on another path moments later;
/// mimalloc's per-thread free lists make that cheaper than glibc's malloc (measured in
/// bench/PROFILE.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // One thread for the whole pipeline: PostgreSQL's backend needs the other cores, and a
    // hand-off between runtime threads cost a futex wake-up and a context switch per event
    // (measured: 30-55% of pgcdc's CPU, bench/PROFILE.md). librdkafka keeps its own threads.
    // Built first: the signal handlers need it, and they come before anything else.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            // Not 1: that code means "verify found differences".
            eprintln!(
                "error: cannot start the async runtime: {e} (check the process's thread and \
                 memory limits)"
            );
            return ExitCode::from(2);
        }
    };
    // Before a flag is parsed, a line logged or a connection opened: from here on SIGTERM is
    // a graceful stop (see `pgcdc::signals`).
    let stop = {
        let _context = runtime.enter();
        pgcdc::signals::stop_on_signals()
    };
    let cli = match parse_cli(std::env::args_os()) {
        Ok(cli) => cli,
        // Help, version and flag errors: clap prints them and picks 0 or 2.
        Err(ConfigError::Clap(e)) => e.exit(),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    pgcdc::logging::init(cli.global.log_format);
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => pgcdc::run::run(*args, stop).await.map(|()| 0),
            Command::Status(args) => pgcdc::ops::status::run(*args).await,
            Command::Verify(args) => pgcdc::ops::verify::run(*args).await,
            Command::Drop(args) => pgcdc::ops::drop::run(*args).await,
        }
    });
    // Blocking tasks still running (a Kafka client being torn down, a metadata request)
    // must not hold the exit up for long.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            // Once, in the chosen format: machines get a JSON line, people a sentence.
            match cli.global.log_format {
                LogFormat::Json => tracing::error!(
                    kind = failure.kind.describe(),
                    exit_code = failure.kind.exit_code(),
                    "{:#}",
                    failure.error
                ),
                LogFormat::Human => eprintln!("error: {:#}", failure.error),
            }
            ExitCode::from(failure.kind.exit_code())
        }
    }
}
