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

/// mimalloc's `mi_option_purge_delay` (libmimalloc-sys exports its option enum only with a
/// feature that needs another crate; the test below checks the number).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
    #[cfg(test)]
    fn mi_option_get(option: std::ffi::c_int) -> std::ffi::c_long;
}

/// Keeps the memory of large rows from lingering (README, Guarantees: bounded memory).
///
/// A row of hundreds of KB is a "huge" allocation for mimalloc, freed moments after it was
/// filled, and a few of them are made per row (read, encoded, handed on). By default mimalloc
/// 3 returns freed memory to the system only after a second (version 2 did after 10 ms), and
/// backs its arenas with transparent huge pages, which stay resident as a whole while any of
/// their 2 MB is used: a snapshot of 1 MB rows peaked at 85–110 MB of RSS for 13 MB of live
/// data. Without huge pages and with a 10 ms delay it peaked at ~60 MB; on rows of 200 B
/// (bench/) neither changed CPU time measurably. An operator's own `MIMALLOC_ALLOW_THP` or
/// `MIMALLOC_PURGE_DELAY` is left alone.
fn tune_allocator() {
    let set = |name: &str| std::env::var_os(name).is_some();
    #[cfg(target_os = "linux")]
    if !set("MIMALLOC_ALLOW_THP") {
        // SAFETY: prctl with PR_SET_THP_DISABLE only sets a flag of this process (it fails
        // harmlessly on kernels without it); what mimalloc itself does for allow_thp=0.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
    if !set("MIMALLOC_PURGE_DELAY") {
        // SAFETY: sets one of mimalloc's options, which it reads at each purge; called before
        // any other thread of ours exists.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, 10) };
    }
}

fn main() -> ExitCode {
    tune_allocator();
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
            Command::Wait(args) => pgcdc::ops::wait::run(*args, stop).await,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_option_number_is_mimallocs_purge_delay() {
        // 1000 ms is mimalloc 3's default purge delay; had its list of options moved, another
        // option, with another default, would have this number.
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) }, 1000);
        }
    }
}
