//! The `pgcdc run` process under test: started, killed, stopped and restarted like a
//! supervisor would, each run logging to its own file.

use std::borrow::BorrowMut;
use std::path::Path;
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::cmd::PgcdcCmd;

/// Repeated runs of one pgcdc configuration.
pub struct Pgcdc {
    cmd: PgcdcCmd,
    pub dir: PathBuf,
    child: Option<Child>,
    /// Number of runs started so far; run `n` logs to `run<n>.log`.
    pub runs: usize,
    /// Run `n` writes its stdout to `run<n>.out` (the stdout sink), else to nowhere.
    stdout: bool,
}

impl Pgcdc {
    /// Runs of `cmd` (a `pgcdc run`); logs go to files in `dir`.
    pub fn new(cmd: PgcdcCmd, dir: PathBuf) -> Pgcdc {
        std::fs::create_dir_all(&dir).expect("log directory");
        Pgcdc {
            cmd: cmd.block_sigterm(),
            dir,
            child: None,
            runs: 0,
            stdout: false,
        }
    }

    /// Keeps each following run's stdout in `run<n>.out` (see [`Pgcdc::stdout_of`]).
    pub fn capture_stdout(&mut self) {
        self.stdout = true;
    }

    /// Sets an environment variable for the following runs.
    pub fn env(&mut self, key: &str, value: &str) {
        self.cmd = self.cmd.clone().env(key, value);
    }

    /// `pgcdc run` with SIGTERM blocked until pgcdc handles it (see
    /// [`super::cmd::block_sigterm_until_handled`]): a SIGTERM at any moment after the
    /// spawn is a graceful stop.
    pub fn command(&self, extra: &[&str]) -> Command {
        self.cmd.clone().args(extra).command()
    }

    fn log_path(&self, run: usize) -> PathBuf {
        self.dir.join(format!("run{run}.log"))
    }

    /// Starts a new run in the background.
    pub fn spawn(&mut self) {
        self.spawn_with(&[]);
    }

    pub fn spawn_with(&mut self, extra: &[&str]) {
        assert!(self.child.is_none(), "a run is still going");
        self.runs += 1;
        let log = std::fs::File::create(self.log_path(self.runs)).expect("log file");
        let out = if self.stdout {
            Stdio::from(std::fs::File::create(self.out_path(self.runs)).expect("stdout file"))
        } else {
            Stdio::null()
        };
        let child = self
            .command(extra)
            .stdout(out)
            .stderr(log)
            .spawn()
            .expect("pgcdc starts");
        self.child = Some(child);
    }

    fn out_path(&self, run: usize) -> PathBuf {
        self.dir.join(format!("run{run}.out"))
    }

    /// What run `run` wrote to stdout (with [`Pgcdc::capture_stdout`]).
    pub fn stdout_of(&self, run: usize) -> String {
        std::fs::read_to_string(self.out_path(run)).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `kill -9`, and waits for the process.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM; waits at most `timeout` for the exit.
    pub fn sigterm(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        super::cmd::signal(c.id(), "-TERM");
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    /// The exit status if the current run has ended (it is then forgotten).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        Some(status)
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// The log of the current (latest) run.
    pub fn log(&self) -> String {
        self.log_of(self.runs)
    }

    pub fn log_of(&self, run: usize) -> String {
        std::fs::read_to_string(self.log_path(run)).unwrap_or_default()
    }

    /// Every run's log, concatenated.
    pub fn all_logs(&self) -> String {
        (1..=self.runs)
            .map(|r| format!("--- run {r}\n{}", self.log_of(r)))
            .collect()
    }

    /// Waits until the current run's log contains `needle` (true), or `timeout` passes or
    /// the run ends (false).
    pub async fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline || self.exited().is_some() {
                return self.log().contains(needle);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs once to completion with `extra` arguments (e.g. `--stop-lsn now`), logging to
    /// the next run's file; returns its status and log.
    pub fn run_to_end(&mut self, extra: &[&str]) -> (ExitStatus, String) {
        assert!(self.child.is_none(), "a run is still going");
        self.runs += 1;
        let log = std::fs::File::create(self.log_path(self.runs)).expect("log file");
        let status = self
            .command(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .status()
            .expect("pgcdc runs");
        (status, self.log())
    }
}

impl Drop for Pgcdc {
    fn drop(&mut self) {
        self.kill9();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("pgcdc logs kept in {}", self.dir.display());
        }
    }
}

/// SIGTERM to a child process (a graceful stop for pgcdc).
pub fn sigterm(child: &Child) {
    super::cmd::signal(child.id(), "-TERM");
}

/// Waits at most `timeout` for `child` to exit; kills it otherwise (None).
pub async fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGTERM, then waits at most `timeout` for the exit: the status (None: killed after the
/// timeout) and how long the exit took.
pub async fn sigterm_timed(child: &mut Child, timeout: Duration) -> (Option<ExitStatus>, Duration) {
    let sent = Instant::now();
    sigterm(child);
    let status = wait_exit(child, timeout).await;
    (status, sent.elapsed())
}

/// SIGTERM, then waits up to 10 s for the exit before SIGKILL (for a test's cleanup, when the
/// exit status does not matter).
pub fn stop(mut child: Child) {
    sigterm(&child);
    for _ in 0..200 {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Starts `cmd` with stderr to the file `log` and stdout to a pipe the test reads (or leaves
/// unread, to hold a stdout sink).
pub fn spawn_piped(mut cmd: impl BorrowMut<Command>, log: &Path) -> (Child, ChildStdout) {
    let mut child = cmd
        .borrow_mut()
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).expect("log file"))
        .spawn()
        .expect("pgcdc starts");
    let stdout = child.stdout.take().expect("stdout is piped");
    (child, stdout)
}
