//! Private servers for scenarios that stop, restart or pause a server: a PostgreSQL cluster
//! and a tansu broker of their own, so that tests running in parallel on the shared servers
//! of `scripts/test-env.sh` are never disturbed.
//!
//! Both are stopped when the value is dropped, also when the test panics (a paused broker is
//! killed as well), and their directories removed.
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use super::cmd::signal;

/// A loopback port nobody listens on right now (another process may take it before we do;
/// callers that bind it retry with a new one).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Waits until something accepts TCP connections on `port`.
pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A fresh directory under the system's temporary directory.
pub fn temp_dir(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(super::unique_name(prefix));
    std::fs::create_dir_all(&dir).expect("create a temporary directory");
    dir
}

/// How PostgreSQL is shut down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// Disconnect clients, checkpoint, stop.
    Fast,
    /// Stop at once, as in a crash: recovery runs at the next start.
    Immediate,
}

/// A PostgreSQL cluster of one test: `initdb` into a temporary directory (as `postgres` when
/// running as root, since PostgreSQL refuses to run as root), on a free loopback port, with
/// `wal_level` as asked, a short `wal_sender_timeout` and `fsync` off.
pub struct PrivatePg {
    pub port: u16,
    root: PathBuf,
    data: PathBuf,
    pgbin: PathBuf,
    as_postgres: bool,
}

impl PrivatePg {
    /// Creates and starts a cluster; `conf` lines are appended to postgresql.conf.
    pub fn start(conf: &[&str]) -> PrivatePg {
        let pgbin = PathBuf::from(
            std::env::var("PGCDC_TEST_PGBIN")
                .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into()),
        );
        let root = temp_dir("pgcdc_pg");
        let as_postgres = is_root();
        if as_postgres {
            let ok = Command::new("chown")
                .args(["postgres:", root.to_str().expect("UTF-8 path")])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "chown {} to postgres", root.display());
        }
        let data = root.join("data");
        let mut pg = PrivatePg {
            port: 0,
            root,
            data,
            pgbin,
            as_postgres,
        };
        let out = pg
            .pg_command("initdb")
            .args(["-D", pg.data_str(), "-U", "postgres", "--auth=trust"])
            .args(["-E", "UTF8", "--locale=C.UTF-8", "--no-sync"])
            .output()
            .expect("initdb runs");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let hba = "local all all trust\nlocal replication all trust\n\
                   host all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n";
        std::fs::write(pg.data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        for attempt in 0.. {
            pg.port = free_port();
            let mut lines = vec![
                "listen_addresses = '127.0.0.1'".to_string(),
                format!("port = {}", pg.port),
                format!("unix_socket_directories = '{}'", pg.root.display()),
                "wal_level = logical".into(),
                "max_replication_slots = 20".into(),
                "max_wal_senders = 20".into(),
                "max_connections = 50".into(),
                "wal_sender_timeout = '5s'".into(),
                "fsync = off".into(),
                "shared_buffers = '32MB'".into(),
                "log_min_messages = warning".into(),
            ];
            lines.extend(conf.iter().map(|s| s.to_string()));
            std::fs::write(
                pg.data.join("postgresql.auto.conf"),
                lines.join("\n") + "\n",
            )
            .expect("write postgresql.auto.conf");
            if pg.try_start() {
                break;
            }
            assert!(attempt < 5, "PostgreSQL did not start:\n{}", pg.log());
        }
        pg
    }

    fn data_str(&self) -> &str {
        self.data.to_str().expect("UTF-8 path")
    }

    fn pg_command(&self, program: &str) -> Command {
        let bin = self.pgbin.join(program);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin);
            c
        } else {
            Command::new(bin)
        }
    }

    fn try_start(&self) -> bool {
        let log = self.root.join("log");
        self.pg_command("pg_ctl")
            .args(["-D", self.data_str(), "-w", "-t", "60", "-l"])
            .arg(&log)
            .arg("start")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("log")).unwrap_or_default()
    }

    /// A conninfo for the superuser on `dbname` over TCP.
    pub fn conninfo(&self, dbname: &str) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname={dbname} sslmode=disable connect_timeout=5", self.port)
    }

    /// Stops the server.
    pub fn stop(&self, mode: Shutdown) {
        let m = match mode {
            Shutdown::Fast => "fast",
            Shutdown::Immediate => "immediate",
        };
        let ok = self
            .pg_command("pg_ctl")
            .args(["-D", self.data_str(), "-w", "-t", "60", "-m", m, "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "pg_ctl stop -m {m} failed:\n{}", self.log());
    }

    /// Starts the stopped server again on the same port.
    pub fn start_again(&self) {
        assert!(
            self.try_start(),
            "PostgreSQL did not start again:\n{}",
            self.log()
        );
    }

    /// Creates a database.
    pub async fn create_database(&self, name: &str) {
        let admin = super::client(&super::parse(&self.conninfo("postgres"))).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("CREATE DATABASE");
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let _ = self
            .pg_command("pg_ctl")
            .args(["-D", self.data_str(), "-w", "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A tansu broker of one test, with durable `sqlite://` storage in a temporary directory, so
/// it keeps its topics across restarts (or, from [`PrivateBroker::start_in_memory`], memory
/// storage: faster, gone at a restart, and with an unreliable high watermark). It can
/// advertise another port than it listens on, so that clients reach it through a
/// [`super::proxy::Proxy`].
pub struct PrivateBroker {
    pub port: u16,
    advertised: u16,
    dir: PathBuf,
    tansu: PathBuf,
    storage: &'static str,
    child: Option<Child>,
    restarts: u32,
}

impl PrivateBroker {
    /// Starts a broker on a free port, advertising itself.
    pub fn start() -> PrivateBroker {
        Self::start_advertising(None)
    }

    /// Starts a broker with memory storage on a free port, advertising itself.
    pub fn start_in_memory() -> PrivateBroker {
        Self::start_with(None, "memory://tansu/")
    }

    /// Starts a broker on a free port that advertises `advertised` (a proxy) if given.
    pub fn start_advertising(advertised: Option<u16>) -> PrivateBroker {
        Self::start_with(advertised, "sqlite://tansu.db")
    }

    fn start_with(advertised: Option<u16>, storage: &'static str) -> PrivateBroker {
        let tansu =
            PathBuf::from(std::env::var("PGCDC_TEST_TANSU").unwrap_or_else(|_| "tansu".into()));
        let mut b = PrivateBroker {
            port: 0,
            advertised: 0,
            dir: temp_dir("pgcdc_broker"),
            tansu,
            storage,
            child: None,
            restarts: 0,
        };
        for attempt in 0.. {
            b.port = free_port();
            b.advertised = advertised.unwrap_or(b.port);
            if b.spawn() {
                break;
            }
            assert!(attempt < 5, "tansu did not start:\n{}", b.log());
        }
        b
    }

    /// The address clients bootstrap from (the advertised one).
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.advertised)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn spawn(&mut self) -> bool {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("tansu.log"))
            .expect("broker log");
        // tansu resolves sqlite:// paths relative to its working directory.
        let child = Command::new(&self.tansu)
            .current_dir(&self.dir)
            .arg("broker")
            .args(["--listener-url", &format!("tcp://127.0.0.1:{}", self.port)])
            .args([
                "--advertised-listener-url",
                &format!("tcp://127.0.0.1:{}", self.advertised),
            ])
            .args(["--storage-engine", self.storage])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("tansu starts");
        self.child = Some(child);
        if wait_for_port(self.port, Duration::from_secs(20)) {
            return true;
        }
        self.kill();
        false
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("tansu.log")).unwrap_or_default()
    }

    /// SIGSTOP: the broker keeps its sockets but answers nothing.
    pub fn pause(&self) {
        if let Some(pid) = self.pid() {
            signal(pid, "-STOP");
        }
    }

    /// SIGCONT.
    pub fn resume(&self) {
        if let Some(pid) = self.pid() {
            signal(pid, "-CONT");
        }
    }

    /// Stops the broker with SIGTERM (SIGKILL if it lingers) and waits for it.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        signal(child.id(), "-CONT");
        signal(child.id(), "-TERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the stopped broker again, on the same port and storage.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the broker is running");
        for _ in 0..50 {
            if self.spawn() {
                self.restarts += 1;
                return;
            }
            // The port may linger for a moment after the old process.
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("tansu did not start again:\n{}", self.log());
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("broker log kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
