//! Integration tests of the replication connection (and the ordinary connection
//! helper) against the private test cluster of `scripts/test-env.sh`.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::api::replication::{
    ReplicationClient, ReplicationError, ReplicationMessage, ReplicationStream, SnapshotAction,
    TlsError,
};
use common::api::ConnInfo;
use common::api::Lsn;
use common::api::{Recoverable, Recovery};

use common::{Login, TestDb, TestEnv};

/// Every test is bounded: a hang is a failure, not a stuck CI run.
const TEST_TIMEOUT: Duration = Duration::from_secs(90);

async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test timed out");
}

async fn connect(info: &ConnInfo) -> ReplicationClient {
    ReplicationClient::connect(info)
        .await
        .unwrap_or_else(|e| panic!("replication connect ({info}): {e}"))
}

/// Connects as `user`, checks the session is who and where it should be.
async fn check_login(
    db: &TestDb,
    user: &str,
    password: Option<&str>,
    extra: &str,
) -> ReplicationClient {
    let info = db.env.conninfo(user, password, &db.name, extra);
    let mut repl = connect(&info).await;
    assert!(
        repl.server_version_num() >= 100000,
        "{}",
        repl.server_version_num()
    );
    assert!(repl.parameter("server_version").is_some());
    let rows = repl
        .simple_query("SELECT current_user, current_database()")
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].named("current_user"), Some(user));
    assert_eq!(rows[0].text(1), Some(db.name.as_str()));
    assert_eq!(rows[0].columns(), ["current_user", "current_database"]);
    repl
}

// ---------------------------------------------------------------------------------
// (a) authentication methods

#[tokio::test(flavor = "multi_thread")]
async fn connects_with_trust() {
    bounded(async {
        let db = TestDb::create().await;
        let env = db.env.clone();
        let repl = check_login(&db, &env.superuser, None, "").await;
        assert!(!repl.is_tls());
        assert!(repl.backend_pid().is_some());
        repl.close().await.unwrap();
    })
    .await
}

/// A replication connection as a password role: the session is who and where it should be.
/// `login` picks the role of one method from the environment; without it the test is
/// skipped (`var` names its variables).
async fn connects_with(test: &str, login: fn(TestEnv) -> Option<Login>, var: &str) {
    bounded(async {
        let Some(login) = login(common::env()) else {
            return common::skip(test, &format!("{var}_USER/_PASSWORD not set"));
        };
        let db = TestDb::create().await;
        let repl = check_login(&db, &login.user, Some(&login.password), "").await;
        repl.close().await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn connects_with_scram() {
    connects_with("connects_with_scram", |e| e.scram, "PGCDC_TEST_SCRAM").await
}

#[tokio::test(flavor = "multi_thread")]
async fn connects_with_md5() {
    connects_with("connects_with_md5", |e| e.md5, "PGCDC_TEST_MD5").await
}

#[tokio::test(flavor = "multi_thread")]
async fn connects_with_cleartext() {
    connects_with(
        "connects_with_cleartext",
        |e| e.cleartext,
        "PGCDC_TEST_CLEARTEXT",
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn connects_over_unix_socket() {
    bounded(async {
        let env = common::env();
        let Some(dir) = env.socket_dir.clone() else {
            return common::skip("connects_over_unix_socket", "PGCDC_TEST_PGSOCKET not set");
        };
        let db = TestDb::create().await;
        let info = common::parse(&format!(
            "host={} port={} user={} dbname={} sslmode=require",
            common::kv_quote(&dir),
            env.port,
            env.superuser,
            db.name
        ));
        assert!(info.is_unix_socket());
        // sslmode=require is not applied to Unix sockets, as in libpq.
        let mut repl = connect(&info).await;
        assert!(!repl.is_tls());
        let id = repl.identify_system().await.unwrap();
        assert!(id.xlogpos.is_valid());
        repl.close().await.unwrap();

        let client = common::client(&info).await;
        let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(one, 1);
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn ordinary_connection_with_password_methods() {
    bounded(async {
        let env = common::env();
        let db = TestDb::create().await;
        let mut tried = 0;
        for login in env.password_logins() {
            let info = env.conninfo(&login.user, Some(&login.password), &db.name, "");
            let client = common::client(&info).await;
            let user: String = client
                .query_one("SELECT current_user::text", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(user, login.user);
            tried += 1;
        }
        if tried == 0 {
            common::skip(
                "ordinary_connection_with_password_methods",
                "no password roles set",
            );
        }
    })
    .await
}

// ---------------------------------------------------------------------------------
// (b) wrong and missing passwords

#[tokio::test(flavor = "multi_thread")]
async fn wrong_password_fails_clearly_without_leaking_it() {
    bounded(async {
        let env = common::env();
        let logins = env.password_logins();
        if logins.is_empty() {
            return common::skip("wrong_password_fails...", "no password roles set");
        }
        let db = TestDb::create().await;
        let wrong = "Wr0ng-Passw0rd-xyzzy";
        for login in logins {
            let info = env.conninfo(&login.user, Some(wrong), &db.name, "");
            let err = ReplicationClient::connect(&info).await.unwrap_err();
            let shown = format!("{err}");
            assert!(shown.contains("authentication failed"), "{shown}");
            assert!(shown.contains(&login.user), "{shown}");
            assert!(
                !shown.contains(wrong) && !format!("{err:?}").contains(wrong),
                "{shown}"
            );
            assert!(!shown.contains(&login.password), "{shown}");
            assert_eq!(err.sqlstate(), Some("28P01"), "{shown}");
            assert_eq!(err.recovery(), Recovery::Stop);

            // The ordinary connection's error does not show it either.
            let err = common::api::connect(&info).await.unwrap_err();
            let shown = format!("{err} {err:?}");
            assert!(!shown.contains(wrong), "{shown}");
            assert_eq!(err.sqlstate(), Some("28P01"), "{shown}");
            assert!(!err.is_transient());
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_password_says_where_to_set_it() {
    bounded(async {
        let env = common::env();
        let Some(login) = env.scram.clone() else {
            return common::skip("missing_password_says_where_to_set_it", "no SCRAM role set");
        };
        let db = TestDb::create().await;
        let info = env.conninfo(&login.user, None, &db.name, "");
        let err = ReplicationClient::connect(&info).await.unwrap_err();
        assert!(
            matches!(err, ReplicationError::PasswordRequired { .. }),
            "{err}"
        );
        let shown = err.to_string();
        assert!(
            shown.contains("PGPASSWORD") && shown.contains(".pgpass"),
            "{shown}"
        );
        assert!(shown.contains(&login.user), "{shown}");
    })
    .await
}

// ---------------------------------------------------------------------------------
// (c) TLS

#[tokio::test(flavor = "multi_thread")]
async fn tls_require_and_verify() {
    bounded(async {
        let env = common::env();
        let Some(login) = env.tls.clone().or(env.scram.clone()) else {
            return common::skip("tls_require_and_verify", "no TLS or SCRAM role set");
        };
        let db = TestDb::create().await;
        let pw = Some(login.password.as_str());

        // require: encrypted, certificate not checked.
        let repl = check_login(&db, &login.user, pw, "sslmode=require").await;
        assert!(repl.is_tls());
        repl.close().await.unwrap();
        // prefer: the server offers TLS, so it is used.
        let repl = check_login(&db, &login.user, pw, "sslmode=prefer").await;
        assert!(repl.is_tls());
        repl.close().await.unwrap();
        // The ordinary connection with require.
        let info = env.conninfo(&login.user, pw, &db.name, "sslmode=require");
        let client = common::client(&info).await;
        let ssl: bool = client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(ssl);

        // A role restricted to hostssl is refused without TLS.
        if env.tls.is_some() {
            let info = env.conninfo(&login.user, pw, &db.name, "sslmode=disable");
            let err = ReplicationClient::connect(&info).await.unwrap_err();
            assert_eq!(err.sqlstate(), Some("28000"), "{err}");
        }

        let Some(ca) = env.sslrootcert.clone() else {
            return common::skip(
                "tls_require_and_verify (verify-*)",
                "PGCDC_TEST_SSLROOTCERT not set",
            );
        };
        let ca = common::kv_quote(&ca.display().to_string());
        // verify-full against the certificate issued for 127.0.0.1.
        let full = format!("sslmode=verify-full sslrootcert={ca}");
        let repl = check_login(&db, &login.user, pw, &full).await;
        assert!(repl.is_tls());
        repl.close().await.unwrap();
        let info = env.conninfo(&login.user, pw, &db.name, &full);
        common::client(&info).await;

        // The same server under a name the certificate does not carry.
        let wrong_host = common::parse(&format!(
            "host=localhost hostaddr={} port={} user={} password={} dbname={} {full}",
            env.host,
            env.port,
            login.user,
            common::kv_quote(&login.password),
            db.name
        ));
        let err = ReplicationClient::connect(&wrong_host).await.unwrap_err();
        assert!(
            matches!(err, ReplicationError::Tls(TlsError::Handshake { .. })),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("certificate verification failed"),
            "{err}"
        );
        assert_eq!(err.recovery(), Recovery::Stop);
        let err = common::api::connect(&wrong_host).await.unwrap_err();
        assert!(!err.is_transient(), "{err}");

        // verify-ca does not check the name.
        let wrong_host_ca = common::parse(&format!(
            "host=localhost hostaddr={} port={} user={} password={} dbname={} \
             sslmode=verify-ca sslrootcert={ca}",
            env.host,
            env.port,
            login.user,
            common::kv_quote(&login.password),
            db.name
        ));
        let repl = connect(&wrong_host_ca).await;
        assert!(repl.is_tls());
        repl.close().await.unwrap();
        common::client(&wrong_host_ca).await;

        // verify-full with a CA that did not sign the server certificate.
        let other_ca = std::env::temp_dir().join(format!("{}.crt", common::unique_name("otherca")));
        std::fs::write(&other_ca, common::other_ca_pem()).unwrap();
        let info = env.conninfo(
            &login.user,
            pw,
            &db.name,
            &format!("sslmode=verify-full sslrootcert={}", other_ca.display()),
        );
        let err = ReplicationClient::connect(&info).await.unwrap_err();
        let _ = std::fs::remove_file(&other_ca);
        assert!(
            matches!(err, ReplicationError::Tls(TlsError::Handshake { .. })),
            "{err:?}"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_full_without_root_cert_fails_before_connecting() {
    let env = common::env();
    let info = common::parse(&format!(
        "host={} port={} user=x sslmode=verify-full sslrootcert=/nonexistent/ca.crt",
        env.host, env.port
    ));
    let err = ReplicationClient::connect(&info).await.unwrap_err();
    assert!(
        matches!(err, ReplicationError::Tls(TlsError::Load { .. })),
        "{err:?}"
    );
    assert!(err.to_string().contains("/nonexistent/ca.crt"), "{err}");
}

// ---------------------------------------------------------------------------------
// (d) IDENTIFY_SYSTEM

#[tokio::test(flavor = "multi_thread")]
async fn identify_system_reports_a_valid_position() {
    bounded(async {
        let db = TestDb::create().await;
        let mut repl = connect(&db.admin()).await;
        let id = repl.identify_system().await.unwrap();
        assert!(id.xlogpos.is_valid(), "{id:?}");
        assert!(id.timeline >= 1);
        assert!(id.systemid.parse::<u64>().is_ok(), "{id:?}");
        assert_eq!(id.dbname.as_deref(), Some(db.name.as_str()));
        let client = db.client().await;
        let current: Lsn = client
            .query_one("SELECT pg_current_wal_lsn()", &[])
            .await
            .unwrap()
            .get(0);
        assert!(id.xlogpos <= current, "{} > {current}", id.xlogpos);
        repl.close().await.unwrap();
    })
    .await
}

// ---------------------------------------------------------------------------------
// A minimal pgoutput reader, just enough for these tests (the real decoder lives in
// src/source/pgoutput.rs).

#[derive(Debug, Clone, PartialEq, Eq)]
enum Change {
    Begin { final_lsn: Lsn },
    Insert { id: i64, v: Option<String> },
    Update { id: i64, v: Option<String> },
    Delete { id: i64 },
    Commit { commit_lsn: Lsn, end_lsn: Lsn },
    Other(u8),
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u8(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().expect("truncated pgoutput message");
        self.0 = rest;
        *b
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.take(8).try_into().unwrap())
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.take(4).try_into().unwrap())
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.take(2).try_into().unwrap())
    }
    /// TupleData: the text values of the columns.
    fn tuple(&mut self) -> Vec<Option<String>> {
        let n = self.u16();
        (0..n)
            .map(|_| match self.u8() {
                b'n' | b'u' => None,
                b't' => {
                    let len = self.u32() as usize;
                    Some(String::from_utf8(self.take(len).to_vec()).unwrap())
                }
                kind => panic!("unexpected tuple column kind {kind}"),
            })
            .collect()
    }
}

fn id_and_v(tuple: &[Option<String>]) -> (i64, Option<String>) {
    let id = tuple[0]
        .as_deref()
        .expect("id is never NULL")
        .parse()
        .unwrap();
    (id, tuple.get(1).cloned().flatten())
}

fn decode_pgoutput(data: &[u8]) -> Change {
    let mut r = Reader(data);
    let tag = r.u8();
    match tag {
        b'B' => {
            let final_lsn = Lsn(r.u64());
            Change::Begin { final_lsn }
        }
        b'C' => {
            let _flags = r.u8();
            let commit_lsn = Lsn(r.u64());
            let end_lsn = Lsn(r.u64());
            Change::Commit {
                commit_lsn,
                end_lsn,
            }
        }
        b'I' => {
            let _relid = r.u32();
            assert_eq!(r.u8(), b'N');
            let (id, v) = id_and_v(&r.tuple());
            Change::Insert { id, v }
        }
        b'U' => {
            let _relid = r.u32();
            let mut kind = r.u8();
            if kind == b'K' || kind == b'O' {
                r.tuple();
                kind = r.u8();
            }
            assert_eq!(kind, b'N');
            let (id, v) = id_and_v(&r.tuple());
            Change::Update { id, v }
        }
        b'D' => {
            let _relid = r.u32();
            let _kind = r.u8();
            let (id, _) = id_and_v(&r.tuple());
            Change::Delete { id }
        }
        other => Change::Other(other),
    }
}

/// One committed transaction as streamed.
#[derive(Debug)]
struct Txn {
    changes: Vec<Change>,
    commit_lsn: Lsn,
    end_lsn: Lsn,
}

/// Reads transactions until `done` says stop. Every `next_message` call races a
/// 1 ms timer, so many calls are cancelled mid-wait: this checks cancel-safety too
/// (a lost or duplicated message would break the callers' checks).
async fn read_transactions(
    stream: &mut ReplicationStream,
    mut done: impl FnMut(&Txn) -> bool,
) -> Vec<Txn> {
    let mut txns = Vec::new();
    let mut current: Option<Vec<Change>> = None;
    loop {
        let msg = tokio::select! {
            m = stream.next_message() => m.expect("replication stream error"),
            _ = tokio::time::sleep(Duration::from_millis(1)) => continue,
        };
        match msg {
            None => panic!("the server ended the stream"),
            Some(ReplicationMessage::PrimaryKeepalive {
                reply_requested,
                wal_end,
                ..
            }) => {
                if reply_requested {
                    // Report no progress: the test decides what to confirm.
                    stream
                        .send_standby_status(Lsn(0), Lsn(0), Lsn(0), false)
                        .await
                        .unwrap();
                }
                assert!(wal_end.is_valid());
            }
            Some(ReplicationMessage::XLogData { data, .. }) => match decode_pgoutput(&data) {
                Change::Begin { .. } => {
                    assert!(current.is_none(), "Begin inside a transaction");
                    current = Some(Vec::new());
                }
                Change::Commit {
                    commit_lsn,
                    end_lsn,
                } => {
                    let changes = current.take().expect("Commit without Begin");
                    let txn = Txn {
                        changes,
                        commit_lsn,
                        end_lsn,
                    };
                    let stop = done(&txn);
                    txns.push(txn);
                    if stop {
                        return txns;
                    }
                }
                Change::Other(_) => {}
                change => current
                    .as_mut()
                    .expect("change outside a transaction")
                    .push(change),
            },
        }
    }
}

async fn table_state(client: &tokio_postgres::Client, sql: &str) -> BTreeMap<i64, Option<String>> {
    client
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (i64::from(r.get::<_, i32>(0)), r.get(1)))
        .collect()
}

/// The writer's operation number encoded in a value `op-<n>`; initial rows are -1.
fn op_number(v: &Option<String>) -> i64 {
    match v.as_deref() {
        Some(s) if s.starts_with("op-") => s[3..].parse().unwrap(),
        _ => -1,
    }
}

// ---------------------------------------------------------------------------------
// (e) the key test: exported snapshot + stream = exactly the final table

#[tokio::test(flavor = "multi_thread")]
async fn exported_snapshot_and_stream_are_consistent() {
    bounded(async {
        let db = TestDb::create().await;
        let admin = db.client().await;
        let publication = common::unique_name("pub");
        let slot = common::unique_name("slot");
        admin
            .batch_execute(&format!(
                "CREATE TABLE t (id int PRIMARY KEY, v text);
                 INSERT INTO t SELECT g, 'init-' || g FROM generate_series(1, 50) g;
                 CREATE PUBLICATION {publication} FOR TABLE t;"
            ))
            .await
            .unwrap();

        // A concurrent writer: one autocommit transaction per operation, numbered, so
        // commit order is operation order. Operation n writes the value "op-n".
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let stop = stop.clone();
            let client = db.client().await;
            tokio::spawn(async move {
                let mut n: i64 = 0;
                while !stop.load(Ordering::Relaxed) || n < 60 {
                    let v = format!("op-{n}");
                    if n % 3 == 0 {
                        let id = (n % 50 + 1) as i32;
                        client
                            .execute("UPDATE t SET v = $1 WHERE id = $2", &[&v, &id])
                            .await
                            .unwrap();
                    } else {
                        let id = (1000 + n) as i32;
                        client
                            .execute("INSERT INTO t VALUES ($1, $2)", &[&id, &v])
                            .await
                            .unwrap();
                    }
                    n += 1;
                    if n % 10 == 0 {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
                // A last marker transaction ends the stream for the reader.
                client
                    .execute("INSERT INTO t VALUES (-1, 'marker')", &[])
                    .await
                    .unwrap();
                n
            })
        };
        // Let the writer get going so the slot is created amid commits.
        tokio::time::sleep(Duration::from_millis(100)).await;

        let mut repl = connect(&db.admin()).await;
        let created = repl
            .create_logical_slot(&slot, "pgoutput", SnapshotAction::Export, false)
            .await
            .unwrap();
        assert_eq!(created.slot_name, slot);
        assert_eq!(created.output_plugin, "pgoutput");
        assert!(created.consistent_point.is_valid());
        let snapshot = created.snapshot_name.clone().expect("an exported snapshot");

        // While the slot connection stays idle, read the table under the snapshot.
        let reader = db.client().await;
        reader
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT '{snapshot}'"
            ))
            .await
            .unwrap();
        let snap = table_state(&reader, "SELECT id, v FROM t ORDER BY id").await;
        reader.batch_execute("COMMIT").await.unwrap();

        // Let the writer run on after the snapshot, then stop it.
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.store(true, Ordering::Relaxed);
        let total_ops = writer.await.unwrap();
        let final_state = table_state(&admin, "SELECT id, v FROM t ORDER BY id").await;

        // The snapshot holds exactly operations 0..=k for some k.
        let k = snap.values().map(op_number).max().unwrap();
        eprintln!("snapshot saw operations 0..={k} of {total_ops}");
        assert!(
            k >= 0,
            "the snapshot saw no writer operation: the test proves little"
        );
        assert!(
            k < total_ops - 1,
            "the snapshot saw every operation: the test proves little"
        );
        for n in 0..=k {
            if n % 3 != 0 {
                assert!(
                    snap.contains_key(&(1000 + n)),
                    "op {n} <= {k} missing in the snapshot"
                );
            }
        }

        // Stream from the consistent point until the marker commits.
        let pub_list = format!("\"{publication}\"");
        let mut stream = repl
            .start_logical_replication(
                &slot,
                created.consistent_point,
                &[
                    ("proto_version", "2"),
                    ("publication_names", &pub_list),
                    ("messages", "true"),
                ],
            )
            .await
            .unwrap();
        let txns = read_transactions(&mut stream, |txn| {
            txn.changes
                .iter()
                .any(|c| matches!(c, Change::Insert { id: -1, .. }))
        })
        .await;
        stream.stop().await.unwrap();

        // Every streamed transaction committed after the snapshot, in commit order,
        // one writer operation each: exactly k+1, k+2, ..., then the marker.
        let mut expected_op = k + 1;
        let mut last_end = created.consistent_point;
        let mut state = snap.clone();
        for txn in &txns {
            assert!(
                txn.end_lsn > created.consistent_point,
                "{txn:?} before the consistent point"
            );
            assert!(txn.end_lsn > last_end, "commits out of order: {txn:?}");
            assert!(txn.commit_lsn < txn.end_lsn, "{txn:?}");
            last_end = txn.end_lsn;
            assert_eq!(txn.changes.len(), 1, "{txn:?}");
            match &txn.changes[0] {
                Change::Insert { id: -1, v } => {
                    assert_eq!(
                        expected_op, total_ops,
                        "marker before operation {expected_op}"
                    );
                    state.insert(-1, v.clone());
                }
                Change::Insert { id, v } => {
                    assert_eq!(op_number(v), expected_op, "{txn:?}");
                    assert!(
                        !snap.contains_key(id),
                        "insert of {id} streamed but already in the snapshot"
                    );
                    state.insert(*id, v.clone());
                    expected_op += 1;
                }
                Change::Update { id, v } => {
                    assert_eq!(op_number(v), expected_op, "{txn:?}");
                    assert!(state.contains_key(id), "update of unknown row {id}");
                    state.insert(*id, v.clone());
                    expected_op += 1;
                }
                other => panic!("unexpected change {other:?}"),
            }
        }
        assert_eq!(expected_op, total_ops);
        assert_eq!(state, final_state, "snapshot + stream != final table");
    })
    .await
}

// ---------------------------------------------------------------------------------
// (f) standby status updates move confirmed_flush_lsn

async fn confirmed_flush(client: &tokio_postgres::Client, slot: &str) -> Option<Lsn> {
    let row = client
        .query_one(
            "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();
    row.get(0)
}

async fn slot_active(client: &tokio_postgres::Client, slot: &str) -> bool {
    client
        .query_one(
            "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0)
}

/// A database with table `t`, a publication and a slot; returns (publication, slot,
/// consistent point).
async fn setup_slot(db: &TestDb) -> (String, String, Lsn) {
    let admin = db.client().await;
    let publication = common::unique_name("pub");
    let slot = common::unique_name("slot");
    admin
        .batch_execute(&format!(
            "CREATE TABLE t (id int PRIMARY KEY, v text); CREATE PUBLICATION {publication} FOR TABLE t;"
        ))
        .await
        .unwrap();
    let mut repl = connect(&db.admin()).await;
    let created = repl
        .create_logical_slot(&slot, "pgoutput", SnapshotAction::NoExport, false)
        .await
        .unwrap();
    assert_eq!(created.snapshot_name, None);
    repl.close().await.unwrap();
    (publication, slot, created.consistent_point)
}

/// Starts streaming `slot` from `start` with pgoutput `proto_version` over `publication`.
async fn start_stream(
    db: &TestDb,
    slot: &str,
    start: Lsn,
    publication: &str,
    proto_version: &str,
) -> ReplicationStream {
    let pubs = format!("\"{publication}\"");
    connect(&db.admin())
        .await
        .start_logical_replication(
            slot,
            start,
            &[
                ("proto_version", proto_version),
                ("publication_names", &pubs),
            ],
        )
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn standby_status_confirms_the_flushed_lsn() {
    bounded(async {
        let db = TestDb::create().await;
        let (publication, slot, start) = setup_slot(&db).await;
        let admin = db.client().await;
        // Two separate transactions (one multi-statement query would be one).
        admin
            .execute("INSERT INTO t VALUES (1, 'a')", &[])
            .await
            .unwrap();
        admin
            .execute("INSERT INTO t VALUES (2, 'b')", &[])
            .await
            .unwrap();

        let mut stream = start_stream(&db, &slot, start, &publication, "1").await;
        let mut seen = 0;
        let txns = read_transactions(&mut stream, |_| {
            seen += 1;
            seen == 2
        })
        .await;
        let first_end = txns[0].end_lsn;
        let second_end = txns[1].end_lsn;
        assert!(first_end < second_end);
        // Nothing was confirmed yet: the stream never confirms by itself.
        assert!(confirmed_flush(&admin, &slot).await.unwrap() < first_end);

        // Confirm only the first transaction.
        stream
            .send_standby_status(first_end, first_end, first_end, false)
            .await
            .unwrap();
        let confirmed = common::poll_until(Duration::from_secs(5), || async {
            confirmed_flush(&admin, &slot)
                .await
                .filter(|l| *l >= first_end)
        })
        .await;
        assert_eq!(confirmed, Some(first_end));
        stream.stop().await.unwrap();

        // A new stream from the slot resumes after the confirmed transaction.
        let mut stream = start_stream(&db, &slot, Lsn(0), &publication, "1").await;
        let txns = read_transactions(&mut stream, |_| true).await;
        assert_eq!(
            txns[0].changes,
            vec![Change::Insert {
                id: 2,
                v: Some("b".into())
            }]
        );
        assert_eq!(txns[0].end_lsn, second_end);
        stream.stop().await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn batched_reads_still_deliver_a_small_transaction_at_once() {
    bounded(async {
        let db = TestDb::create().await;
        let (publication, slot, start) = setup_slot(&db).await;
        let mut stream = start_stream(&db, &slot, start, &publication, "1").await;
        // A batch waits for 16 KB or 1 ms; a few hundred bytes must not wait for more
        // (the next keepalive is half of wal_sender_timeout away). read_transactions also
        // cancels its reads every millisecond, which must not stretch the wait.
        stream.batch_reads(true);
        db.client()
            .await
            .execute("INSERT INTO t VALUES (1, 'a')", &[])
            .await
            .unwrap();
        let t0 = std::time::Instant::now();
        let txns = read_transactions(&mut stream, |_| true).await;
        assert_eq!(
            txns[0].changes,
            vec![Change::Insert {
                id: 1,
                v: Some("a".into())
            }]
        );
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        stream.stop().await.unwrap();
    })
    .await
}

// ---------------------------------------------------------------------------------
// (g) stop() ends cleanly and frees the slot

#[tokio::test(flavor = "multi_thread")]
async fn stop_ends_cleanly_and_releases_the_slot() {
    bounded(async {
        let db = TestDb::create().await;
        let (publication, slot, start) = setup_slot(&db).await;
        let admin = db.client().await;
        admin
            .batch_execute("INSERT INTO t VALUES (1, 'a')")
            .await
            .unwrap();

        let mut stream = start_stream(&db, &slot, start, &publication, "2").await;
        let txns = read_transactions(&mut stream, |_| true).await;
        assert_eq!(
            txns[0].changes,
            vec![Change::Insert {
                id: 1,
                v: Some("a".into())
            }]
        );
        assert!(slot_active(&admin, &slot).await);
        stream.stop().await.unwrap();
        let inactive = common::poll_until(Duration::from_secs(5), || async {
            (!slot_active(&admin, &slot).await).then_some(())
        })
        .await;
        assert!(inactive.is_some(), "slot still active after stop()");

        // The slot can now be dropped from a new connection.
        let mut repl = connect(&db.admin()).await;
        repl.drop_slot(&slot, true).await.unwrap();
        let left: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(left, 0);
        repl.close().await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn temporary_slot_disappears_with_its_connection() {
    bounded(async {
        let db = TestDb::create().await;
        let admin = db.client().await;
        let slot = common::unique_name("tmp");
        let mut repl = connect(&db.admin()).await;
        let created = repl
            .create_logical_slot(&slot, "pgoutput", SnapshotAction::NoExport, true)
            .await
            .unwrap();
        assert!(created.consistent_point.is_valid());
        let temporary: bool = admin
            .query_one(
                "SELECT temporary FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .get(0);
        assert!(temporary);
        repl.close().await.unwrap();
        let gone = common::poll_until(Duration::from_secs(5), || async {
            let n: i64 = admin
                .query_one(
                    "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await
                .unwrap()
                .get(0);
            (n == 0).then_some(())
        })
        .await;
        assert!(gone.is_some());
    })
    .await
}

// ---------------------------------------------------------------------------------
// (h) server errors surface their SQLSTATE and message

#[tokio::test(flavor = "multi_thread")]
async fn server_errors_carry_sqlstate_and_message() {
    bounded(async {
        let db = TestDb::create().await;

        // START_REPLICATION on a slot that does not exist.
        let repl = connect(&db.admin()).await;
        let err = repl
            .start_logical_replication(
                "no_such_slot",
                Lsn(0),
                &[("proto_version", "1"), ("publication_names", "p")],
            )
            .await
            .unwrap_err();
        let server = err.server_error().expect("a server error");
        assert_eq!(server.code, "42704", "{err}");
        assert!(server.message.contains("no_such_slot"), "{err}");
        assert!(err.to_string().contains("42704"), "{err}");
        assert!(err.to_string().contains("no_such_slot"), "{err}");
        assert_eq!(err.recovery(), Recovery::Stop);

        // Errors in command mode leave the connection usable.
        let mut repl = connect(&db.admin()).await;
        let err = repl.simple_query("SELEC 1").await.unwrap_err();
        assert_eq!(err.sqlstate(), Some("42601"), "{err}");
        let err = repl.drop_slot("no_such_slot", false).await.unwrap_err();
        assert_eq!(err.sqlstate(), Some("42704"), "{err}");
        let slot = common::unique_name("dup");
        repl.create_logical_slot(&slot, "pgoutput", SnapshotAction::NoExport, true)
            .await
            .unwrap();
        let err = repl
            .create_logical_slot(&slot, "pgoutput", SnapshotAction::NoExport, true)
            .await
            .unwrap_err();
        assert_eq!(err.sqlstate(), Some("42710"), "{err}");
        let err = repl
            .create_logical_slot("bad-name!", "pgoutput", SnapshotAction::NoExport, true)
            .await
            .unwrap_err();
        assert!(err.server_error().is_some(), "{err}");
        let rows = repl
            .simple_query("SELECT 1 AS one, NULL AS nothing")
            .await
            .unwrap();
        assert_eq!(rows[0].named("one"), Some("1"));
        assert_eq!(rows[0].values(), [Some("1".to_string()), None]);
        assert_eq!(repl.simple_query("").await.unwrap(), vec![]);
        repl.close().await.unwrap();

        // An unknown database is definite, not transient.
        let info = db
            .env
            .conninfo(&db.env.superuser, None, "no_such_database_pgcdc", "");
        let err = ReplicationClient::connect(&info).await.unwrap_err();
        assert_eq!(err.sqlstate(), Some("3D000"), "{err}");
        assert_eq!(err.recovery(), Recovery::Stop);
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn slot_in_use_is_object_in_use_not_transient() {
    bounded(async {
        let db = TestDb::create().await;
        let (publication, slot, start) = setup_slot(&db).await;
        let pubs = format!("\"{publication}\"");
        let opts = [("proto_version", "1"), ("publication_names", pubs.as_str())];
        let first = connect(&db.admin())
            .await
            .start_logical_replication(&slot, start, &opts)
            .await
            .unwrap();
        let err = connect(&db.admin())
            .await
            .start_logical_replication(&slot, start, &opts)
            .await
            .unwrap_err();
        assert_eq!(err.sqlstate(), Some("55006"), "{err}");
        assert!(err.server_error().unwrap().is_object_in_use());
        assert!(!err.server_error().unwrap().is_transient());
        // While streaming, the walsender of a connection lost a moment ago may still hold the
        // slot: reconnecting rides that out (the slot's lock keeps a second pgcdc out).
        assert_eq!(err.recovery(), Recovery::Reconnect);
        first.stop().await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_refused_is_transient() {
    let info = common::parse("host=127.0.0.1 port=1 user=x sslmode=disable");
    let err = ReplicationClient::connect(&info).await.unwrap_err();
    assert_eq!(err.recovery(), Recovery::Reconnect, "{err:?}");
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
    let err = common::api::connect(&info).await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
}
