//! The test database: the cluster's settings from the `PGCDC_TEST_*` variables, and a fresh
//! database per test, dropped with its slots when the test ends.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::api::{connect, ConnInfo, ConnectError};

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

    /// The roles of the password methods that are set (SCRAM, MD5, cleartext).
    pub fn password_logins(&self) -> Vec<&Login> {
        [&self.scram, &self.md5, &self.cleartext]
            .into_iter()
            .flatten()
            .collect()
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
    connect(info)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test cluster ({info}): {e}"))
}

/// Polls (at most 30 s) until the count that `sql` selects is above 0; whether it was.
pub async fn wait_for_count(client: &tokio_postgres::Client, sql: &str) -> bool {
    super::poll_until(Duration::from_secs(30), || async {
        let n: i64 = client
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0);
        (n > 0).then_some(())
    })
    .await
    .is_some()
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

    /// The superuser's conninfo for `pgcdc --source`.
    pub fn source(&self) -> String {
        self.source_as(&self.env.superuser, "")
    }

    /// A conninfo for `pgcdc --source` as `user`; `extra` is appended verbatim (later
    /// settings win, e.g. `sslmode=require`).
    pub fn source_as(&self, user: &str, extra: &str) -> String {
        let s = format!(
            "host={} port={} user={user} dbname={} sslmode=disable",
            self.env.host, self.env.port, self.name
        );
        if extra.is_empty() {
            s
        } else {
            format!("{s} {extra}")
        }
    }

    /// Runs `sql` (any number of statements) as the superuser.
    pub async fn sql(&self, sql: &str) {
        self.client()
            .await
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Whether replication slot `slot` exists.
    pub async fn slot_exists(&self, slot: &str) -> bool {
        self.client()
            .await
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .expect("query slots")
            .is_some()
    }
}

async fn drop_database(env: &TestEnv, name: &str) -> Result<(), tokio_postgres::Error> {
    let admin = connect(&env.admin("postgres")).await.map_err(|e| match e {
        ConnectError::Postgres { error, .. } => error,
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
