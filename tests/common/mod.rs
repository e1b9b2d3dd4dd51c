//! Shared helpers for integration tests against the private test cluster started by
//! `scripts/test-env.sh`, which prints the `PGCDC_TEST_*` settings read here.
//!
//! Every test works in its own freshly created database, with its own slot and
//! publication names, so tests run in parallel without seeing each other.
#![allow(dead_code)]

pub mod lines;
pub mod pipeline;
pub mod rng;
pub mod topics;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pgcdc::source::conninfo::ConnInfo;

/// A user and password from the environment.
#[derive(Debug, Clone)]
pub struct Login {
    pub user: String,
    pub password: String,
}

/// The test cluster's settings.
#[derive(Debug, Clone)]
pub struct TestEnv {
    pub host: String,
    pub port: u16,
    /// Unix-socket directory of the cluster, when known.
    pub socket_dir: Option<String>,
    /// A superuser that logs in over trust.
    pub superuser: String,
    pub scram: Option<Login>,
    pub md5: Option<Login>,
    pub cleartext: Option<Login>,
    /// A SCRAM user that may only log in over TLS.
    pub tls: Option<Login>,
    /// The CA that signed the server certificate (issued for 127.0.0.1).
    pub sslrootcert: Option<PathBuf>,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn login(prefix: &str) -> Option<Login> {
    Some(Login {
        user: var(&format!("PGCDC_TEST_{prefix}_USER"))?,
        password: var(&format!("PGCDC_TEST_{prefix}_PASSWORD"))?,
    })
}

/// Reads the `PGCDC_TEST_*` variables, with the defaults of `scripts/test-env.sh`.
pub fn env() -> TestEnv {
    TestEnv {
        host: var("PGCDC_TEST_PGHOST").unwrap_or_else(|| "127.0.0.1".into()),
        port: var("PGCDC_TEST_PGPORT")
            .map(|p| p.parse().expect("PGCDC_TEST_PGPORT must be a port number"))
            .unwrap_or(54329),
        socket_dir: var("PGCDC_TEST_PGSOCKET"),
        superuser: var("PGCDC_TEST_PGUSER").unwrap_or_else(|| "postgres".into()),
        scram: login("SCRAM"),
        md5: login("MD5"),
        cleartext: login("CLEARTEXT"),
        tls: login("TLS"),
        sslrootcert: var("PGCDC_TEST_SSLROOTCERT").map(PathBuf::from),
    }
}

/// Prints why a test does nothing (the test still passes).
pub fn skip(test: &str, why: &str) {
    eprintln!("note: {test}: skipped: {why}");
}

/// Quotes a value for a key=value connection string.
pub fn kv_quote(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Parses a connection string with an environment that holds only `USER`, so the
/// developer's own `PG*` variables and `~/.pgpass` never leak into a test.
pub fn parse(conninfo: &str) -> ConnInfo {
    ConnInfo::parse_with_env(conninfo, |k| {
        (k == "USER").then(|| "pgcdc-test".to_string())
    })
    .unwrap_or_else(|e| panic!("test conninfo does not parse: {e}"))
}

/// The cluster of another PostgreSQL major version that `scripts/pg-versions.sh` started
/// (`PGCDC_TEST_PG<major>_PORT`), with the superuser and host of [`env`]; `None` when that
/// variable is unset, and the test should [`skip`].
pub fn env_for_major(major: u32) -> Option<TestEnv> {
    let port = var(&format!("PGCDC_TEST_PG{major}_PORT"))?
        .parse()
        .unwrap_or_else(|_| panic!("PGCDC_TEST_PG{major}_PORT must be a port number"));
    Some(TestEnv {
        port,
        socket_dir: None,
        scram: None,
        md5: None,
        cleartext: None,
        tls: None,
        sslrootcert: None,
        ..env()
    })
}

impl TestEnv {
    /// A TCP conninfo for `user` on `dbname`; `extra` is appended verbatim
    /// (e.g. `sslmode=require`).
    pub fn conninfo(
        &self,
        user: &str,
        password: Option<&str>,
        dbname: &str,
        extra: &str,
    ) -> ConnInfo {
        let mut s = format!(
            "host={} port={} user={} dbname={} connect_timeout=10 sslmode=disable",
            kv_quote(&self.host),
            self.port,
            kv_quote(user),
            kv_quote(dbname)
        );
        if let Some(p) = password {
            s.push_str(&format!(" password={}", kv_quote(p)));
        }
        s.push(' ');
        s.push_str(extra);
        parse(&s)
    }

    /// The superuser on `dbname` over TCP.
    pub fn admin(&self, dbname: &str) -> ConnInfo {
        self.conninfo(&self.superuser, None, dbname, "")
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique across parallel tests and test processes: lower-case letters,
/// digits and `_` (valid for databases, slots and publications), under 63 bytes.
pub fn unique_name(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() % 1_000_000_000_000)
        .unwrap_or(0);
    format!("{prefix}_{}_{n}_{nanos}", std::process::id())
}

/// Connects an ordinary tokio-postgres client.
pub async fn client(info: &ConnInfo) -> tokio_postgres::Client {
    pgcdc::source::connect::connect(info)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test cluster ({info}): {e}"))
}

/// A database created for one test, dropped (with its replication slots) when the
/// value is dropped, even if the test panics.
pub struct TestDb {
    pub name: String,
    pub env: TestEnv,
}

impl TestDb {
    /// Creates a fresh uniquely named database.
    pub async fn create() -> TestDb {
        TestDb::create_in(env()).await
    }

    /// Creates a fresh uniquely named database in the cluster of `env`.
    pub async fn create_in(env: TestEnv) -> TestDb {
        let name = unique_name("pgcdc_t");
        let admin = client(&env.admin("postgres")).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        TestDb { name, env }
    }

    /// The superuser on this database.
    pub fn admin(&self) -> ConnInfo {
        self.env.admin(&self.name)
    }

    /// A tokio-postgres client on this database, as the superuser.
    pub async fn client(&self) -> tokio_postgres::Client {
        client(&self.admin()).await
    }
}

async fn drop_database(env: &TestEnv, name: &str) -> Result<(), tokio_postgres::Error> {
    let admin = pgcdc::source::connect::connect(&env.admin("postgres"))
        .await
        .map_err(|e| match e {
            pgcdc::source::connect::ConnectError::Postgres { error, .. } => error,
            other => panic!("{other}"),
        })?;
    // Logical slots block DROP DATABASE even WITH (FORCE): end their walsenders,
    // then drop the slots, retrying while they are still marked active.
    for _ in 0..50 {
        admin
            .execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                 WHERE database = $1 AND active_pid IS NOT NULL",
                &[&name],
            )
            .await?;
        let dropped = admin
            .query(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE database = $1 AND NOT active",
                &[&name],
            )
            .await;
        let left: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE database = $1",
                &[&name],
            )
            .await?
            .get(0);
        if dropped.is_ok() && left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let env = self.env.clone();
        let name = self.name.clone();
        // Drop runs inside the test's runtime: use a separate thread and runtime.
        let result = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for cleanup");
            rt.block_on(drop_database(&env, &name))
        })
        .join();
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("note: could not drop test database {}: {e}", self.name),
            Err(_) => eprintln!("note: cleanup of test database {} panicked", self.name),
        }
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

/// Polls `f` until it returns `Some`, for at most `timeout`.
pub async fn poll_until<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A fresh self-signed CA certificate (PEM) that signed nothing in the test cluster.
pub fn other_ca_pem() -> Vec<u8> {
    use openssl::asn1::{Asn1Integer, Asn1Time};
    use openssl::bn::BigNum;
    use openssl::ec::{EcGroup, EcKey};
    use openssl::hash::MessageDigest;
    use openssl::nid::Nid;
    use openssl::pkey::PKey;
    use openssl::x509::extension::BasicConstraints;
    use openssl::x509::{X509NameBuilder, X509};

    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    let key = PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap();
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", "other test CA").unwrap();
    let name = name.build();
    let serial = Asn1Integer::from_bn(&BigNum::from_u32(1).unwrap()).unwrap();
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    b.set_serial_number(&serial).unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_issuer_name(&name).unwrap();
    b.set_pubkey(&key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::days_from_now(1).unwrap())
        .unwrap();
    b.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
        .unwrap();
    b.sign(&key, MessageDigest::sha256()).unwrap();
    b.build().to_pem().unwrap()
}

/// Records per topic named `<prefix>.…` on `kafka` (every topic a run with that
/// `--topic-prefix` writes, its progress topic included), read until 2 s pass with nothing new.
pub async fn published(kafka: &str, prefix: &str) -> std::collections::BTreeMap<String, usize> {
    use pgcdc::kafka::{KafkaConfig, ReadStop, TopicReader};
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let kafka = kafka.to_string();
    let prefix = format!("{prefix}.");
    tokio::task::spawn_blocking(move || {
        let lister: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &kafka)
            .create()
            .expect("a metadata client");
        let metadata = lister
            .fetch_metadata(None, Duration::from_secs(20))
            .expect("the broker lists its topics");
        let topics: Vec<String> = metadata
            .topics()
            .iter()
            .map(|t| t.name().to_string())
            .filter(|n| n.starts_with(&prefix))
            .collect();
        let cfg = KafkaConfig::new(kafka.clone());
        topics
            .into_iter()
            .map(|topic| {
                let stop = ReadStop::Quiet {
                    expected: None,
                    quiet: Duration::from_secs(2),
                    max_wait: Duration::from_secs(30),
                };
                let n = TopicReader::open_if_exists(&cfg, &topic, stop)
                    .expect("the topic is readable")
                    .map_or(0, |r| r.count());
                (topic, n)
            })
            .collect()
    })
    .await
    .expect("reader thread")
}

/// A run that failed published nothing: no topic of its prefix holds a record (topics it
/// created may exist, empty).
pub async fn assert_nothing_published(kafka: &str, prefix: &str) {
    let records = published(kafka, prefix).await;
    assert!(
        records.values().all(|n| *n == 0),
        "a failed run published records: {records:?}"
    );
}

/// A run that failed at start left no replication slot `slot` behind.
pub async fn assert_no_slot(info: &ConnInfo, slot: &str) {
    let n: i64 = client(info)
        .await
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("query slots")
        .get(0);
    assert_eq!(n, 0, "a failed run left slot {slot} behind");
}
