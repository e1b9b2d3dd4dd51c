//! The Meilisearch target against a fake Meilisearch: a tiny HTTP server in this test that
//! implements the endpoints the indexer uses, processes writes as asynchronous tasks (a write
//! is invisible until its task has been polled), checks the API key, and records every request.
//! It keeps connections alive and can serve HTTPS with the test environment's certificate.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::api::indexer::HttpClient;
use common::api::indexer::Indexer;
use common::api::indexer::MeiliTarget;
use common::api::indexer::SourceRecord;
use common::api::indexer::TargetError;
use common::api::{Recoverable, Recovery};
use openssl::ssl::{Ssl, SslAcceptor, SslFiletype, SslMethod};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_openssl::SslStream;

const KEY: &str = "test-master-key";

#[derive(Debug, Default)]
struct Index {
    primary_key: Option<String>,
    filterable: Vec<Value>,
    docs: BTreeMap<String, Map<String, Value>>,
}

/// A write waiting in the task queue.
#[derive(Debug)]
enum Op {
    CreateIndex { uid: String, primary_key: Value },
    SetPrimaryKey { uid: String, primary_key: Value },
    SetFilterable { uid: String, list: Vec<Value> },
    Replace { uid: String, docs: Vec<Value> },
    Merge { uid: String, docs: Vec<Value> },
    Delete { uid: String, ids: Vec<Value> },
}

#[derive(Debug)]
struct Task {
    op: Option<Op>,
    polls: u32,
    result: Option<Result<(), String>>,
}

#[derive(Debug, Default)]
struct Fake {
    indexes: BTreeMap<String, Index>,
    tasks: Vec<Task>,
    /// (method, path, body) of every request.
    log: Vec<(String, String, Value)>,
    /// Answer the next request whose path ends with this with HTTP 503.
    fail_next: Option<String>,
    /// Tasks writing a document with this field fail.
    poison_field: Option<String>,
    /// Connections accepted.
    connections: usize,
}

impl Fake {
    fn doc(&self, index: &str, id: &str) -> Option<&Map<String, Value>> {
        self.indexes.get(index)?.docs.get(id)
    }

    fn requests(&self, method: &str, suffix: &str) -> usize {
        self.log
            .iter()
            .filter(|(m, p, _)| m == method && p.ends_with(suffix))
            .count()
    }

    /// Runs the queue, in order, up to and including task `uid`.
    fn process_up_to(&mut self, uid: usize) {
        for i in 0..=uid.min(self.tasks.len().saturating_sub(1)) {
            if let Some(op) = self.tasks[i].op.take() {
                let r = self.run(op);
                self.tasks[i].result = Some(r);
            }
        }
    }

    fn run(&mut self, op: Op) -> Result<(), String> {
        let poison = self.poison_field.clone();
        let pk_of = |idx: &Index| idx.primary_key.clone().unwrap_or_else(|| "id".into());
        match op {
            Op::CreateIndex { uid, primary_key } => {
                if self.indexes.contains_key(&uid) {
                    return Err("index_already_exists".into());
                }
                let idx = Index {
                    primary_key: primary_key.as_str().map(String::from),
                    ..Index::default()
                };
                self.indexes.insert(uid, idx);
            }
            Op::SetPrimaryKey { uid, primary_key } => {
                let idx = self.indexes.entry(uid).or_default();
                idx.primary_key = primary_key.as_str().map(String::from);
            }
            Op::SetFilterable { uid, list } => {
                self.indexes.entry(uid).or_default().filterable = list;
            }
            Op::Replace { uid, docs } => {
                let idx = self.indexes.entry(uid).or_default();
                let pk = pk_of(idx);
                for d in docs {
                    let Value::Object(d) = d else {
                        return Err("not an object".into());
                    };
                    if poison.as_ref().is_some_and(|p| d.contains_key(p)) {
                        return Err("invalid_document_fields".into());
                    }
                    let id = d[&pk].as_str().ok_or("missing_document_id")?.to_string();
                    idx.docs.insert(id, d);
                }
            }
            Op::Merge { uid, docs } => {
                let idx = self.indexes.entry(uid).or_default();
                let pk = pk_of(idx);
                for d in docs {
                    let Value::Object(d) = d else {
                        return Err("not an object".into());
                    };
                    let id = d[&pk].as_str().ok_or("missing_document_id")?.to_string();
                    idx.docs.entry(id).or_default().extend(d);
                }
            }
            Op::Delete { uid, ids } => {
                let idx = self.indexes.entry(uid).or_default();
                for id in ids {
                    if let Some(id) = id.as_str() {
                        idx.docs.remove(id);
                    }
                }
            }
        }
        Ok(())
    }

    fn enqueue(&mut self, op: Op) -> (u16, Value) {
        self.tasks.push(Task {
            op: Some(op),
            polls: 0,
            result: None,
        });
        (
            202,
            json!({"taskUid": self.tasks.len() - 1, "status": "enqueued"}),
        )
    }

    fn handle(
        &mut self,
        method: &str,
        path: &str,
        auth: Option<&str>,
        body: Value,
    ) -> (u16, Value) {
        self.log.push((method.into(), path.into(), body.clone()));
        if auth != Some(&format!("Bearer {KEY}")) {
            return (
                401,
                json!({"code": "invalid_api_key", "message": "bad key"}),
            );
        }
        if self
            .fail_next
            .as_ref()
            .is_some_and(|s| path.ends_with(s.as_str()))
        {
            self.fail_next = None;
            return (503, json!({"code": "unavailable", "message": "try later"}));
        }
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let not_found = (
            404,
            json!({"code": "index_not_found", "message": "no such index"}),
        );
        match (method, parts.as_slice()) {
            ("GET", ["health"]) => (200, json!({"status": "available"})),
            ("GET", ["tasks", uid]) => {
                let Ok(uid) = uid.parse::<usize>() else {
                    return (400, json!({}));
                };
                let Some(task) = self.tasks.get_mut(uid) else {
                    return (404, json!({}));
                };
                // Every task is seen "enqueued" once before it runs.
                if task.result.is_none() && task.polls == 0 {
                    task.polls += 1;
                    return (200, json!({"uid": uid, "status": "enqueued"}));
                }
                self.process_up_to(uid);
                match &self.tasks[uid].result {
                    Some(Ok(())) => (
                        200,
                        json!({"uid": uid, "status": "succeeded", "error": null}),
                    ),
                    Some(Err(code)) => (
                        200,
                        json!({"uid": uid, "status": "failed",
                        "error": {"code": code, "message": format!("task failed: {code}")}}),
                    ),
                    None => (200, json!({"uid": uid, "status": "processing"})),
                }
            }
            ("GET", ["indexes", uid]) => match self.indexes.get(*uid) {
                Some(i) => (200, json!({"uid": uid, "primaryKey": i.primary_key})),
                None => not_found,
            },
            ("POST", ["indexes"]) => {
                let uid = body["uid"].as_str().unwrap_or_default().to_string();
                self.enqueue(Op::CreateIndex {
                    uid,
                    primary_key: body["primaryKey"].clone(),
                })
            }
            ("PATCH", ["indexes", uid]) => self.enqueue(Op::SetPrimaryKey {
                uid: uid.to_string(),
                primary_key: body["primaryKey"].clone(),
            }),
            ("GET", ["indexes", uid, "settings", "filterable-attributes"]) => {
                match self.indexes.get(*uid) {
                    Some(i) => (200, Value::Array(i.filterable.clone())),
                    None => not_found,
                }
            }
            ("PUT", ["indexes", uid, "settings", "filterable-attributes"]) => {
                let list = body.as_array().cloned().unwrap_or_default();
                self.enqueue(Op::SetFilterable {
                    uid: uid.to_string(),
                    list,
                })
            }
            ("POST", ["indexes", uid, "documents"]) => {
                let docs = body.as_array().cloned().unwrap_or_default();
                self.enqueue(Op::Replace {
                    uid: uid.to_string(),
                    docs,
                })
            }
            ("PUT", ["indexes", uid, "documents"]) => {
                let docs = body.as_array().cloned().unwrap_or_default();
                self.enqueue(Op::Merge {
                    uid: uid.to_string(),
                    docs,
                })
            }
            ("POST", ["indexes", uid, "documents", "delete-batch"]) => {
                let ids = body.as_array().cloned().unwrap_or_default();
                self.enqueue(Op::Delete {
                    uid: uid.to_string(),
                    ids,
                })
            }
            ("POST", ["indexes", uid, "documents", "fetch"]) => {
                let Some(idx) = self.indexes.get(*uid) else {
                    return not_found;
                };
                let fields: Vec<String> = body["fields"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|f| f.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                let pick = |d: &Map<String, Value>| -> Value {
                    Value::Object(
                        d.iter()
                            .filter(|(k, _)| fields.is_empty() || fields.contains(k))
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect(),
                    )
                };
                if body.get("filter").is_none() {
                    // Without a filter: a page of all documents.
                    let offset = body["offset"].as_u64().unwrap_or(0) as usize;
                    let limit = body["limit"].as_u64().unwrap_or(20) as usize;
                    let results: Vec<Value> = idx
                        .docs
                        .values()
                        .skip(offset)
                        .take(limit)
                        .map(pick)
                        .collect();
                    return (
                        200,
                        json!({"results": results, "offset": offset, "limit": limit,
                               "total": idx.docs.len()}),
                    );
                }
                // Only the filter the indexer sends: `_id IN ["a", "b"]`.
                let filter = body["filter"].as_str().unwrap_or_default();
                let Some(list) = filter
                    .strip_prefix("_id IN [")
                    .and_then(|f| f.strip_suffix(']'))
                else {
                    return (
                        400,
                        json!({"code": "invalid_document_filter", "message": filter}),
                    );
                };
                if !idx.filterable.contains(&json!("_id")) {
                    return (
                        400,
                        json!({"code": "invalid_document_filter",
                        "message": "attribute `_id` is not filterable"}),
                    );
                }
                let mut results = Vec::new();
                for id in list.split(',').map(|s| s.trim().trim_matches('"')) {
                    if let Some(d) = idx.docs.get(id) {
                        results.push(pick(d));
                    }
                }
                (
                    200,
                    json!({"results": results, "offset": 0, "limit": 20, "total": results.len()}),
                )
            }
            _ => (
                404,
                json!({"code": "not_found", "message": format!("{method} {path}")}),
            ),
        }
    }
}

/// Serves the fake on a loopback port; returns its URL.
async fn serve(fake: Arc<Mutex<Fake>>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            fake.lock().expect("fake lock").connections += 1;
            let fake = fake.clone();
            tokio::spawn(async move {
                let _ = answer(sock, fake).await;
            });
        }
    });
    format!("http://{addr}")
}

/// The server certificate (for 127.0.0.1) and key of the test environment, signed by the CA
/// in `PGCDC_TEST_SSLROOTCERT`; `None` (the HTTPS test is skipped) when they are not there.
fn test_tls() -> Option<(PathBuf, SslAcceptor)> {
    let ca = PathBuf::from(std::env::var("PGCDC_TEST_SSLROOTCERT").ok()?);
    let dir = ca.parent()?;
    let mut acceptor = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).ok()?;
    acceptor
        .set_certificate_chain_file(dir.join("server.crt"))
        .ok()?;
    acceptor
        .set_private_key_file(dir.join("server.key"), SslFiletype::PEM)
        .ok()?;
    Some((ca, acceptor.build()))
}

/// As [`serve`], over TLS; returns its `https://` URL.
async fn serve_tls(fake: Arc<Mutex<Fake>>, acceptor: SslAcceptor) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            fake.lock().expect("fake lock").connections += 1;
            let fake = fake.clone();
            let Ok(ssl) = Ssl::new(acceptor.context()) else {
                continue;
            };
            tokio::spawn(async move {
                let Ok(mut tls) = SslStream::new(ssl, sock) else {
                    return;
                };
                if Pin::new(&mut tls).accept().await.is_ok() {
                    let _ = answer(tls, fake).await;
                }
            });
        }
    });
    format!("https://{addr}")
}

/// Answers requests on one connection until the client closes it (HTTP/1.1 keep-alive).
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    mut sock: S,
    fake: Arc<Mutex<Fake>>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let (head_end, length) = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..i]).to_string();
                let len = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap_or(0))
                    })
                    .unwrap_or(0usize);
                break (i + 4, len);
            }
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        while buf.len() < head_end + length {
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let mut words = head.split_whitespace();
        let method = words.next().unwrap_or_default().to_string();
        let path = words.next().unwrap_or_default().to_string();
        let auth = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("authorization")
                .then(|| v.trim().to_string())
        });
        let body: Value =
            serde_json::from_slice(&buf[head_end..head_end + length]).unwrap_or(Value::Null);
        buf.drain(..head_end + length);
        let (status, reply) =
            fake.lock()
                .expect("fake lock")
                .handle(&method, &path, auth.as_deref(), body);
        let reply = reply.to_string();
        // Chunked, in two pieces, as Meilisearch may answer.
        let (a, b) = reply.split_at(reply.len() / 2);
        let resp = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
            a.len(),
            b.len()
        );
        sock.write_all(resp.as_bytes()).await?;
    }
}

const ORDERS: &str = "t.public.orders";
const CUSTOMERS: &str = "t.public.customers";

fn record(topic: &str, key: Value, value: Option<Value>) -> SourceRecord {
    SourceRecord {
        topic: topic.into(),
        partition: 0,
        offset: 0,
        key: Some(key.to_string().into_bytes()),
        value: value.map(|v| v.to_string().into_bytes()),
    }
}

/// A pgcdc event for `id`, at `(commit, lsn)`.
fn event(topic: &str, id: i64, op: &str, after: Value, commit: u64, lsn: u64) -> SourceRecord {
    let value = json!({
        "before": null, "after": after, "op": op, "ts_ms": 1,
        "source": {"connector": "pgcdc", "lsn": lsn, "commit_lsn": commit, "snapshot": "false"}
    });
    record(topic, json!({"id": id}), Some(value))
}

/// pgcdc's snapshot marker of the snapshot at `point`, in partition 0 of 1.
fn marker(topic: &str, point: u64) -> SourceRecord {
    SourceRecord {
        key: None,
        ..record(
            topic,
            Value::Null,
            Some(json!({
                "before": null, "after": null, "op": "s", "ts_ms": 1,
                "source": {"connector": "pgcdc", "lsn": point, "commit_lsn": point, "snapshot": "true"},
                "snapshot": {"partition": 0, "partitions": 1, "rows": 0}
            })),
        )
    }
}

fn tombstone(topic: &str, id: i64) -> SourceRecord {
    record(topic, json!({"id": id}), None)
}

async fn indexer(url: &str) -> Indexer<MeiliTarget> {
    let http = HttpClient::new(url, Some(KEY.into()), Duration::from_secs(5)).expect("url");
    let mut ix =
        Indexer::new(MeiliTarget::new(http), &[ORDERS.into(), CUSTOMERS.into()]).expect("indexer");
    ix.prepare().await.expect("prepare");
    ix
}

fn history() -> Vec<SourceRecord> {
    vec![
        // Snapshot at 100.
        event(
            ORDERS,
            1,
            "r",
            json!({"id": 1, "status": "new", "note": "long text"}),
            100,
            100,
        ),
        event(
            ORDERS,
            2,
            "r",
            json!({"id": 2, "status": "new", "note": "x"}),
            100,
            100,
        ),
        event(CUSTOMERS, 7, "r", json!({"id": 7, "name": "Ada"}), 100, 100),
        // One transaction: update (note left out: unchanged TOAST) and insert.
        event(ORDERS, 1, "u", json!({"id": 1, "status": "paid"}), 200, 150),
        event(
            ORDERS,
            3,
            "c",
            json!({"id": 3, "status": "new", "note": "y"}),
            200,
            160,
        ),
        // Delete with its tombstone.
        event(ORDERS, 2, "d", Value::Null, 300, 250),
        tombstone(ORDERS, 2),
        // Primary key change 7 → 8.
        event(CUSTOMERS, 7, "d", Value::Null, 400, 350),
        tombstone(CUSTOMERS, 7),
        event(CUSTOMERS, 8, "c", json!({"id": 8, "name": "Ada"}), 400, 350),
    ]
}

fn check_final(f: &Fake) {
    let o1 = f.doc("orders", "1").expect("order 1");
    assert_eq!(o1["status"], "paid");
    assert_eq!(
        o1["note"], "long text",
        "merge kept the unchanged TOAST column"
    );
    assert_eq!(o1["_version"], "00000000000000C8.0000000000000096");
    assert!(f.doc("orders", "2").is_none(), "order 2 deleted");
    assert_eq!(f.doc("orders", "3").expect("order 3")["status"], "new");
    assert!(f.doc("customers", "7").is_none(), "old key gone");
    assert_eq!(f.doc("customers", "8").expect("new key")["name"], "Ada");
    let marker = f.doc("orders-pgcdc-deleted", "2").expect("deletion marker");
    assert_eq!(marker["_version"], "000000000000012C.00000000000000FA");
    assert!(f.doc("customers-pgcdc-deleted", "7").is_some());
}

#[tokio::test]
async fn meilisearch_target_applies_snapshot_and_changes() {
    let fake = Arc::new(Mutex::new(Fake::default()));
    let url = serve(fake.clone()).await;
    let mut ix = indexer(&url).await;
    {
        let f = fake.lock().unwrap();
        for uid in [
            "orders",
            "customers",
            "orders-pgcdc-deleted",
            "customers-pgcdc-deleted",
        ] {
            let idx = f
                .indexes
                .get(uid)
                .unwrap_or_else(|| panic!("index {uid} created"));
            assert_eq!(idx.primary_key.as_deref(), Some("_id"));
            assert_eq!(idx.filterable, vec![json!("_id")]);
        }
    }
    // In batches of three, as they might arrive.
    for batch in history().chunks(3) {
        ix.apply_batch(batch).await.expect("batch applied");
    }
    let f = fake.lock().unwrap();
    check_final(&f);
    assert_eq!(ix.stats().tombstones, 2);
    assert_eq!(ix.stats().stale, 0);

    // The marker of a delete is stored (its task succeeded) before the delete is sent.
    let pos = |method: &str, path: &str| {
        f.log
            .iter()
            .position(|(m, p, _)| m == method && p == path)
            .unwrap_or_else(|| panic!("{method} {path} sent"))
    };
    let marker = pos("POST", "/indexes/orders-pgcdc-deleted/documents");
    let delete = pos("POST", "/indexes/orders/documents/delete-batch");
    let marker_task = f.log[..delete]
        .iter()
        .filter(|(m, p, _)| m == "GET" && p.starts_with("/tasks/"))
        .count();
    assert!(marker < delete && marker_task > 0);
    // Updates merge (PUT), inserts replace (POST).
    assert_eq!(f.requests("PUT", "/indexes/orders/documents"), 1);
    assert!(f.requests("POST", "/indexes/orders/documents") >= 2);
    // Connections are kept alive: far fewer connections than requests.
    assert!(
        f.connections * 4 < f.log.len(),
        "{} connections for {} requests",
        f.connections,
        f.log.len()
    );
}

/// `https://` with a private CA given as a file: the same writes arrive; without the CA the
/// server's certificate is refused and nothing is sent.
#[tokio::test]
async fn meilisearch_over_https_trusts_the_given_ca() {
    let Some((ca, acceptor)) = test_tls() else {
        eprintln!("skipped: PGCDC_TEST_SSLROOTCERT and its server.crt/server.key are needed");
        return;
    };
    let fake = Arc::new(Mutex::new(Fake::default()));
    let url = serve_tls(fake.clone(), acceptor).await;
    assert!(url.starts_with("https://127.0.0.1:"));

    let untrusted = HttpClient::new(&url, Some(KEY.into()), Duration::from_secs(5)).expect("url");
    let mut ix = Indexer::new(MeiliTarget::new(untrusted), &[ORDERS.into()]).expect("indexer");
    let err = ix.prepare().await.expect_err("unknown CA");
    assert!(err.to_string().contains("certificate"), "{err}");
    // A refused certificate is configuration, not a server that might come back: no retries.
    assert!((err.recovery() == Recovery::Stop), "{err}");
    assert!(fake.lock().unwrap().log.is_empty());

    let http = HttpClient::with_ca_file(&url, Some(KEY.into()), Duration::from_secs(5), Some(&ca))
        .expect("url");
    let mut ix =
        Indexer::new(MeiliTarget::new(http), &[ORDERS.into(), CUSTOMERS.into()]).expect("indexer");
    ix.prepare().await.expect("prepare");
    ix.apply_batch(&history()).await.expect("history applied");
    let f = fake.lock().unwrap();
    check_final(&f);
    assert!(
        f.connections * 4 < f.log.len(),
        "{} connections",
        f.connections
    );
}

#[tokio::test]
async fn meilisearch_replays_and_reordering_never_regress() {
    let fake = Arc::new(Mutex::new(Fake::default()));
    let url = serve(fake.clone()).await;
    let mut ix = indexer(&url).await;
    ix.apply_batch(&history()).await.expect("history applied");
    let snapshot_of = |f: &Fake| {
        format!(
            "{:?}",
            f.indexes
                .iter()
                .map(|(k, v)| (k.clone(), v.docs.clone()))
                .collect::<Vec<_>>()
        )
    };
    let before = snapshot_of(&fake.lock().unwrap());

    // A fresh indexer (empty cache: versions come from the server) replays everything,
    // backwards, one record per batch, then all at once.
    let mut again = indexer(&url).await;
    let mut reversed = history();
    reversed.reverse();
    for r in &reversed {
        again
            .apply_batch(std::slice::from_ref(r))
            .await
            .expect("replay");
    }
    again.apply_batch(&history()).await.expect("replay");
    let f = fake.lock().unwrap();
    check_final(&f);
    assert_eq!(snapshot_of(&f), before, "a replay changes nothing");
    assert!(
        again.stats().stale >= 4,
        "older events were dropped: {:?}",
        again.stats()
    );
    assert!(
        f.requests("POST", "/documents/fetch") > 0,
        "versions were read back"
    );
}

#[tokio::test]
async fn meilisearch_interrupted_delete_is_finished_by_a_retry() {
    let fake = Arc::new(Mutex::new(Fake::default()));
    let url = serve(fake.clone()).await;
    let mut ix = indexer(&url).await;
    let h = history();
    ix.apply_batch(&h[..5]).await.expect("first part");
    fake.lock().unwrap().fail_next = Some("/orders/documents/delete-batch".into());
    let delete = &h[5..7];
    let err = ix.apply_batch(delete).await.expect_err("503 on the delete");
    assert!((err.recovery() == Recovery::Reconnect), "{err}");
    {
        let f = fake.lock().unwrap();
        assert!(
            f.doc("orders-pgcdc-deleted", "2").is_some(),
            "marker stored"
        );
        assert!(f.doc("orders", "2").is_some(), "document not deleted yet");
    }
    // An older event arriving now is refused: the marker's version counts.
    let stale = event(
        ORDERS,
        2,
        "u",
        json!({"id": 2, "status": "stale"}),
        250,
        240,
    );
    let s = ix.apply_batch(&[stale]).await.expect("stale event");
    assert_eq!((s.stale, s.writes), (1, 0));
    // Retrying the batch (what the indexer's run loop does) finishes the delete.
    ix.apply_batch(delete).await.expect("retry");
    assert!(fake.lock().unwrap().doc("orders", "2").is_none());
}

#[tokio::test]
async fn meilisearch_failures_are_reported() {
    let fake = Arc::new(Mutex::new(Fake::default()));
    let url = serve(fake.clone()).await;
    let mut ix = indexer(&url).await;
    fake.lock().unwrap().poison_field = Some("bad".into());
    let err = ix
        .apply_batch(&[event(ORDERS, 9, "c", json!({"id": 9, "bad": 1}), 10, 10)])
        .await
        .expect_err("task fails");
    assert!(matches!(err, TargetError::TaskFailed { .. }), "{err}");
    assert!((err.recovery() == Recovery::Stop));
    assert!(err.to_string().contains("invalid_document_fields"), "{err}");

    // A wrong key is a 401 with Meilisearch's message, and not retried.
    let http = HttpClient::new(&url, Some("wrong".into()), Duration::from_secs(5)).expect("url");
    let mut bad = Indexer::new(MeiliTarget::new(http), &[ORDERS.into()]).expect("indexer");
    let err = bad.prepare().await.expect_err("401");
    assert!(
        matches!(err, TargetError::Status { status: 401, .. }),
        "{err}"
    );
    assert!(
        (err.recovery() == Recovery::Stop) && err.to_string().contains("invalid_api_key"),
        "{err}"
    );

    // Nobody listening: transient.
    let http = HttpClient::new("http://127.0.0.1:1", None, Duration::from_secs(5)).expect("url");
    let mut down = Indexer::new(MeiliTarget::new(http), &[ORDERS.into()]).expect("indexer");
    let err = down.prepare().await.expect_err("refused");
    assert!((err.recovery() == Recovery::Reconnect), "{err}");
}

/// A new snapshot after a lost slot: the rows it no longer holds are deleted from the index
/// once its marker arrived, with deletion markers at the read's version; the listing pages
/// through an index larger than one page; a replay from the start changes nothing.
#[tokio::test]
async fn meilisearch_heals_after_a_completed_snapshot() {
    let fake = Arc::new(Mutex::new(Fake::default()));
    let url = serve(fake.clone()).await;
    let mut ix = indexer(&url).await;
    let read = |id: i64, point: u64| {
        event(
            ORDERS,
            id,
            "r",
            json!({"id": id, "status": "new"}),
            point,
            point,
        )
    };
    // The first snapshot at 100: 1,200 rows, more than a page of the listing.
    let mut first: Vec<SourceRecord> = (1..=1200).map(|id| read(id, 100)).collect();
    first.push(marker(ORDERS, 100));
    first.push(event(
        ORDERS,
        7,
        "u",
        json!({"id": 7, "status": "paid"}),
        150,
        140,
    ));
    ix.apply_batch(&first).await.expect("first snapshot");
    assert_eq!(ix.stats().healed, 0);
    // The slot was lost; every odd row was deleted unseen. The snapshot at 500 reads the even
    // ones; row 1201 is inserted by the transaction committing exactly at 500.
    let mut second: Vec<SourceRecord> = (2..=1200).step_by(2).map(|id| read(id, 500)).collect();
    second.push(event(
        ORDERS,
        1201,
        "c",
        json!({"id": 1201, "status": "new"}),
        500,
        480,
    ));
    second.push(marker(ORDERS, 500));
    for batch in second.chunks(400) {
        ix.apply_batch(batch).await.expect("second snapshot");
    }
    assert_eq!(ix.stats().healed, 600);
    {
        let f = fake.lock().unwrap();
        let orders = &f.indexes["orders"].docs;
        assert_eq!(orders.len(), 601);
        assert!(orders
            .keys()
            .all(|id| id.parse::<i64>().unwrap() % 2 == 0 || id == "1201"));
        let marker = f.doc("orders-pgcdc-deleted", "7").expect("deletion marker");
        assert_eq!(marker["_version"], "00000000000001F4.0000000000000000");
        let listed = f
            .log
            .iter()
            .filter(|(m, p, b)| {
                m == "POST" && p == "/indexes/orders/documents/fetch" && b.get("filter").is_none()
            })
            .count();
        assert_eq!(listed, 4, "two pages of 1,000 per completed snapshot");
    }

    // A restart replays everything: the old snapshot's marker deletes nothing.
    let before = format!(
        "{:?}",
        fake.lock().unwrap().indexes.get("orders").map(|i| &i.docs)
    );
    let mut again = indexer(&url).await;
    for batch in first.chunks(500).chain(second.chunks(500)) {
        again.apply_batch(batch).await.expect("replay");
    }
    assert_eq!(again.stats().healed, 0);
    let after = format!(
        "{:?}",
        fake.lock().unwrap().indexes.get("orders").map(|i| &i.docs)
    );
    assert!(before == after, "a replay changed the index");
}
