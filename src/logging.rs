//! Logs: `tracing` to stderr, human-readable by default, one JSON object per line with
//! `--log-format json`. `PGCDC_LOG` takes a tracing filter (`debug`, `pgcdc=trace`, …).
//!
//! Log lines and the snapshot's progress bars share the terminal: while bars are shown,
//! each line is written through [`indicatif::MultiProgress::suspend`], which clears the bars,
//! writes the line and redraws them, so neither garbles the other.

use std::io::{IsTerminal, Write};
use std::sync::{Mutex, OnceLock};

use clap::ValueEnum;
use indicatif::MultiProgress;
use tracing_subscriber::fmt::MakeWriter;

/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line, for log collectors.
    Json,
}

fn bars() -> &'static Mutex<Option<MultiProgress>> {
    static BARS: OnceLock<Mutex<Option<MultiProgress>>> = OnceLock::new();
    BARS.get_or_init(|| Mutex::new(None))
}

/// Routes log lines around these bars until [`clear_bars`].
pub fn set_bars(m: MultiProgress) {
    if let Ok(mut b) = bars().lock() {
        *b = Some(m);
    }
}

pub fn clear_bars() {
    if let Ok(mut b) = bars().lock() {
        *b = None;
    }
}

/// The format chosen at [`init`] (human until then).
pub fn format() -> LogFormat {
    FORMAT.get().copied().unwrap_or(LogFormat::Human)
}

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// Installs the global subscriber. Safe to call once per process.
pub fn init(format: LogFormat) {
    let _ = FORMAT.set(format);
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGCDC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn"));
    // Colours only for a terminal: a log file or collector gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(Stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
}

/// Makes one [`Line`] per log event.
#[derive(Clone, Copy)]
struct Stderr;

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Line;

    fn make_writer(&'a self) -> Self::Writer {
        Line(Vec::with_capacity(256))
    }
}

/// One formatted event, written out in one piece when dropped.
struct Line(Vec<u8>);

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        let write = |b: &[u8]| {
            let _ = std::io::stderr().lock().write_all(b);
        };
        let active = bars().lock().ok().and_then(|b| b.clone());
        match active {
            Some(m) => m.suspend(|| write(&self.0)),
            None => write(&self.0),
        }
    }
}
