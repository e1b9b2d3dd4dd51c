//! The one way tests start the `pgcdc` binary: [`PgcdcCmd`], `pgcdc <command>` with named
//! options a test may override or remove, in an environment cleaned of the developer's own
//! settings. [`super::pipeline::Pipeline::pgcdc`] fills it with a test's database, slot,
//! publication and topic prefix.
//!
//! `run` gets `--event-headers false` unless the test sets it: tansu 0.6.0's durable storage
//! reads records with headers about 30 times slower (20,000 records: 28 s instead of 1 s),
//! which made every large topic time out. The tests of the headers turn them on.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

/// `pgcdc <command>`: named options (`--flag value`, one value each, in the order first set;
/// a free argument equal to the flag replaces it), then free arguments, then environment
/// overrides.
#[derive(Debug, Clone)]
pub struct PgcdcCmd {
    program: &'static str,
    command: String,
    options: Vec<(String, String)>,
    args: Vec<String>,
    env: Vec<(String, Option<String>)>,
    block_sigterm: bool,
}

impl PgcdcCmd {
    /// `pgcdc <command>` with no options.
    pub fn new(command: &str) -> PgcdcCmd {
        let cmd = PgcdcCmd {
            program: env!("CARGO_BIN_EXE_pgcdc"),
            command: command.to_string(),
            options: Vec::new(),
            args: Vec::new(),
            env: Vec::new(),
            block_sigterm: false,
        };
        if command == "run" {
            cmd.set("--event-headers", "false")
        } else {
            cmd
        }
    }

    /// Sets `flag` to `value`, in place of an earlier value.
    pub fn set(mut self, flag: &str, value: &str) -> Self {
        match self.options.iter_mut().find(|(f, _)| f == flag) {
            Some(o) => o.1 = value.to_string(),
            None => self.options.push((flag.to_string(), value.to_string())),
        }
        self
    }

    /// Removes `flag` (e.g. `--kafka` for a stdout run).
    pub fn unset(mut self, flag: &str) -> Self {
        self.options.retain(|(f, _)| f != flag);
        self
    }

    /// The value of `flag`, if set.
    pub fn get(&self, flag: &str) -> Option<&str> {
        self.options
            .iter()
            .find(|(f, _)| f == flag)
            .map(|(_, v)| v.as_str())
    }

    /// Appends free arguments (repeatable flags such as `--table`, switches, anything a test
    /// passes verbatim).
    pub fn args<S: AsRef<str>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_string()));
        self
    }

    /// Sets an environment variable of the process.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), Some(value.to_string())));
        self
    }

    /// Starts the process with SIGTERM blocked until pgcdc handles it (see
    /// [`block_sigterm_until_handled`]).
    pub fn block_sigterm(mut self) -> Self {
        self.block_sigterm = true;
        self
    }

    /// The arguments after the program's name.
    pub fn argv(&self) -> Vec<String> {
        let mut v = vec![self.command.clone()];
        for (f, val) in &self.options {
            if self.args.contains(f) {
                continue;
            }
            v.push(f.clone());
            v.push(val.clone());
        }
        v.extend(self.args.iter().cloned());
        v
    }

    /// The process to start: stdin from nowhere; no `PGCDC_*` setting of the developer's
    /// (`PGCDC_TEST_*` aside), no `PGPASSWORD`, no `~/.pgpass`.
    pub fn command(&self) -> Command {
        let mut c = Command::new(self.program);
        c.args(self.argv());
        for (k, _) in std::env::vars() {
            if k.starts_with("PGCDC_") && !k.starts_with("PGCDC_TEST_") {
                c.env_remove(k);
            }
        }
        c.env_remove("PGPASSWORD")
            .env("PGPASSFILE", "/nonexistent")
            .stdin(Stdio::null());
        for (k, v) in &self.env {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        if self.block_sigterm {
            block_sigterm_until_handled(&mut c);
        }
        c
    }

    /// Runs to completion.
    pub fn output(&self) -> Output {
        self.command().output().expect("pgcdc runs")
    }

    /// Starts in the background, stdout to nowhere, stderr to `log`.
    pub fn spawn_logging(&self, log: &Path) -> Child {
        let file = std::fs::File::create(log).expect("log file");
        self.command()
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("pgcdc starts")
    }
}

/// Starts `cmd` with SIGTERM blocked, as a supervisor that must not lose a signal sent before
/// the program's `main` runs does (nothing can handle a signal while the dynamic loader runs):
/// pgcdc unblocks it once its handlers are installed, so a SIGTERM sent the instant `spawn`
/// returns is a graceful stop.
pub fn block_sigterm_until_handled(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
}

/// Sends `signal` (e.g. "-TERM", "-STOP") to `pid`.
pub fn signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}
