//! The Meilisearch target.
//!
//! Meilisearch has no conditional write: no "only if `_version` is lower", no external
//! versioning, and every write is an asynchronous *task*. So the version check happens here,
//! and is safe because of three facts:
//!
//! 1. **One writer.** The indexer is the only writer of its indexes (run one indexer per set
//!    of indexes). Then nothing changes a document between reading its version and writing it.
//! 2. **Read after write.** [`apply`](Target::apply) returns only once its tasks have
//!    *succeeded* (`GET /tasks/{uid}`), so the next batch's version reads (`POST
//!    /indexes/{uid}/documents/fetch`) see every earlier write. Versions the indexer wrote are
//!    also kept in a bounded cache, which saves most reads; it holds only what a successful
//!    write stored, and is dropped for the ids of a failed one.
//! 3. **Deletes leave a marker, first.** Deleting a document would forget its version; a
//!    replayed older insert would then bring the row back. So a delete first stores
//!    `{_id, _version}` in the companion index `<index>-pgcdc-deleted`, waits for that task,
//!    and only then deletes the document. A crash in between leaves the marker and the old
//!    document; the stored version is then the marker's, older events are refused, and the
//!    delete itself — equal version — is applied again when replayed.
//!
//! Inserts and snapshot rows replace the document (`POST /indexes/{uid}/documents`); updates
//! merge (`PUT`), so a column pgcdc left out as unchanged TOAST keeps its value. Every index is
//! created with primary key `_id`, which is also made filterable so versions can be fetched by
//! id in one request per batch.
//!
//! Healing after a completed snapshot (see [`super`]) needs the version of every document of
//! an index: [`Target::documents`] lists them all, `_id` and `_version` only, in pages of
//! `LIST_PAGE` (`POST /indexes/{uid}/documents/fetch` without a filter). That is one full
//! scan of the index per completed table snapshot — fine at the demo's scale (and snapshots
//! are rare), not for indexes of many millions of documents, where a range filter on a
//! numeric copy of the version would be the way. Fact 1 makes the listing safe: nothing
//! writes between it and the deletes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::event::{DocId, Version, ID_FIELD, VERSION_FIELD};
use super::http::HttpClient;
use super::plan::{Planned, Write};
use super::target::{Target, TargetError};

/// Ids per version-fetch request.
const FETCH_CHUNK: usize = 200;
/// Documents per page when listing a whole index.
const LIST_PAGE: usize = 1000;
/// Versions kept in memory; the cache is emptied when it grows past this.
const CACHE_LIMIT: usize = 200_000;
/// How long to wait for one task before reporting it (the batch is then retried).
const TASK_TIMEOUT: Duration = Duration::from_secs(120);

/// The companion index holding deletion markers of `index`.
pub fn marker_index(index: &str) -> String {
    format!("{index}-pgcdc-deleted")
}

/// Writes documents to Meilisearch over its HTTP API.
pub struct MeiliTarget {
    http: HttpClient,
    cache: HashMap<(String, DocId), Version>,
}

impl MeiliTarget {
    pub fn new(http: HttpClient) -> Self {
        MeiliTarget {
            http,
            cache: HashMap::new(),
        }
    }

    /// One request; a non-2xx answer becomes [`TargetError::Status`] with Meilisearch's message.
    async fn call(
        &self,
        method: &'static str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), TargetError> {
        let bytes = body.map(|b| b.to_string().into_bytes());
        let resp = self.http.request(method, path, bytes.as_deref()).await?;
        let parsed: Value = if resp.body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&resp.body).map_err(|e| TargetError::BadResponse {
                what: format!("{method} {path}"),
                detail: format!("not JSON: {e}"),
            })?
        };
        if !(200..300).contains(&resp.status) {
            let message = match (parsed["code"].as_str(), parsed["message"].as_str()) {
                (Some(code), Some(msg)) => format!("{msg} ({code})"),
                _ => String::from_utf8_lossy(&resp.body).into_owned(),
            };
            return Err(TargetError::Status {
                method,
                path: path.to_string(),
                status: resp.status,
                message,
            });
        }
        Ok((resp.status, parsed))
    }

    /// Sends a request that enqueues a task; returns the task's uid.
    async fn enqueue(
        &self,
        method: &'static str,
        path: &str,
        body: &Value,
    ) -> Result<u64, TargetError> {
        let (_, v) = self.call(method, path, Some(body)).await?;
        v["taskUid"]
            .as_u64()
            .ok_or_else(|| TargetError::BadResponse {
                what: format!("{method} {path}"),
                detail: format!("no taskUid in {v}"),
            })
    }

    /// Waits until task `uid` succeeded. `Ok(Err(code))` when it failed with that error code.
    async fn wait_task(&self, uid: u64) -> Result<Result<(), (String, String)>, TargetError> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(5);
        loop {
            let (_, task) = self.call("GET", &format!("/tasks/{uid}"), None).await?;
            match task["status"].as_str() {
                Some("succeeded") => return Ok(Ok(())),
                Some("failed") | Some("canceled") => {
                    let code = task["error"]["code"].as_str().unwrap_or("canceled");
                    let msg = task["error"]["message"].as_str().unwrap_or("task canceled");
                    return Ok(Err((code.to_string(), format!("{msg} ({code})"))));
                }
                Some(_) => {}
                None => {
                    return Err(TargetError::BadResponse {
                        what: format!("GET /tasks/{uid}"),
                        detail: format!("no status in {task}"),
                    })
                }
            }
            if start.elapsed() > TASK_TIMEOUT {
                return Err(TargetError::TaskTimeout {
                    task: uid,
                    secs: TASK_TIMEOUT.as_secs(),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    async fn wait_ok(&self, uid: u64) -> Result<(), TargetError> {
        self.wait_task(uid)
            .await?
            .map_err(|(_, message)| TargetError::TaskFailed { task: uid, message })
    }

    /// Creates `uid` with primary key `_id` if needed, and makes `_id` filterable.
    async fn ensure_index(&self, uid: &str) -> Result<(), TargetError> {
        let path = format!("/indexes/{uid}");
        match self.call("GET", &path, None).await {
            Ok((_, index)) => match index["primaryKey"].as_str() {
                Some(ID_FIELD) => {}
                None => {
                    let task = self
                        .enqueue("PATCH", &path, &json!({"primaryKey": ID_FIELD}))
                        .await?;
                    self.wait_ok(task).await?;
                }
                Some(other) => {
                    return Err(TargetError::BadResponse {
                        what: format!("index `{uid}`"),
                        detail: format!(
                            "it exists with primary key `{other}`, the indexer needs `{ID_FIELD}`: \
                             delete the index or index into another one"
                        ),
                    })
                }
            },
            Err(TargetError::Status { status: 404, .. }) => {
                let task = self
                    .enqueue(
                        "POST",
                        "/indexes",
                        &json!({"uid": uid, "primaryKey": ID_FIELD}),
                    )
                    .await?;
                match self.wait_task(task).await? {
                    Ok(()) => {}
                    // Created meanwhile by someone else: fine, checked below.
                    Err((code, _)) if code == "index_already_exists" => {}
                    Err((_, message)) => return Err(TargetError::TaskFailed { task, message }),
                }
            }
            Err(e) => return Err(e),
        }

        let setting = format!("/indexes/{uid}/settings/filterable-attributes");
        let (_, current) = self.call("GET", &setting, None).await?;
        let mut list = current.as_array().cloned().unwrap_or_default();
        if !list.iter().any(|a| a.as_str() == Some(ID_FIELD)) {
            list.push(Value::String(ID_FIELD.into()));
            let task = self.enqueue("PUT", &setting, &Value::Array(list)).await?;
            self.wait_ok(task).await?;
        }
        Ok(())
    }

    /// Stored `_version`s of `ids` in index `uid` (ids without a document are absent).
    async fn fetch_versions(
        &self,
        uid: &str,
        ids: &[DocId],
        out: &mut HashMap<DocId, Version>,
    ) -> Result<(), TargetError> {
        let path = format!("/indexes/{uid}/documents/fetch");
        for chunk in ids.chunks(FETCH_CHUNK) {
            // Ids are [A-Za-z0-9_-] only: nothing to escape inside the quotes.
            let list: Vec<String> = chunk.iter().map(|id| format!("\"{id}\"")).collect();
            let body = json!({
                "filter": format!("{ID_FIELD} IN [{}]", list.join(", ")),
                "fields": [ID_FIELD, VERSION_FIELD],
                "limit": chunk.len(),
            });
            let (_, v) = self.call("POST", &path, Some(&body)).await?;
            for doc in results(&v, &path)? {
                match stored_version(doc) {
                    Some((id, version)) => {
                        let e = out.entry(id).or_insert(version);
                        *e = (*e).max(version);
                    }
                    // Not written by the indexer: no version to respect.
                    None => tracing::warn!(
                        index = uid,
                        "document without a valid `_id`/`_version`: {doc}"
                    ),
                }
            }
        }
        Ok(())
    }
}

/// The documents of a `documents/fetch` answer.
fn results<'v>(v: &'v Value, path: &str) -> Result<&'v Vec<Value>, TargetError> {
    v["results"]
        .as_array()
        .ok_or_else(|| TargetError::BadResponse {
            what: format!("POST {path}"),
            detail: "no `results` array".into(),
        })
}

/// A stored document's id and `_version`, if the indexer wrote it.
fn stored_version(doc: &Value) -> Option<(DocId, Version)> {
    let id = doc[ID_FIELD].as_str().and_then(DocId::from_stored)?;
    let version = doc[VERSION_FIELD].as_str().and_then(Version::decode)?;
    Some((id, version))
}

impl Target for MeiliTarget {
    async fn documents(&mut self, index: &str) -> Result<HashMap<DocId, Version>, TargetError> {
        let path = format!("/indexes/{index}/documents/fetch");
        let mut out = HashMap::new();
        let mut offset = 0usize;
        loop {
            let body = json!({
                "fields": [ID_FIELD, VERSION_FIELD],
                "offset": offset,
                "limit": LIST_PAGE,
            });
            let (_, v) = self.call("POST", &path, Some(&body)).await?;
            let results = results(&v, &path)?;
            for (id, version) in results.iter().filter_map(stored_version) {
                out.insert(id, version);
            }
            offset += results.len();
            let total = v["total"].as_u64().map_or(usize::MAX, |t| t as usize);
            if results.is_empty() || offset >= total {
                return Ok(out);
            }
        }
    }

    async fn prepare(&mut self, index: &str) -> Result<(), TargetError> {
        self.ensure_index(index).await?;
        self.ensure_index(&marker_index(index)).await
    }

    async fn versions(
        &mut self,
        index: &str,
        ids: &[DocId],
    ) -> Result<HashMap<DocId, Version>, TargetError> {
        let mut out = HashMap::new();
        let mut missing = Vec::new();
        for id in ids {
            match self.cache.get(&(index.to_string(), id.clone())) {
                Some(v) => {
                    out.insert(id.clone(), *v);
                }
                None => missing.push(id.clone()),
            }
        }
        if !missing.is_empty() {
            self.fetch_versions(index, &missing, &mut out).await?;
            self.fetch_versions(&marker_index(index), &missing, &mut out)
                .await?;
        }
        Ok(out)
    }

    async fn apply(&mut self, index: &str, writes: &[Planned]) -> Result<(), TargetError> {
        let result = self.write(index, writes).await;
        if self.cache.len() + writes.len() > CACHE_LIMIT {
            self.cache.clear();
        }
        for w in writes {
            let key = (index.to_string(), w.id.clone());
            match result {
                Ok(()) => {
                    self.cache.insert(key, w.version);
                }
                // Unknown how far the write got: read it back next time.
                Err(_) => {
                    self.cache.remove(&key);
                }
            }
        }
        result
    }
}

impl MeiliTarget {
    async fn write(&self, index: &str, writes: &[Planned]) -> Result<(), TargetError> {
        let mut replace = Vec::new();
        let mut merge = Vec::new();
        let mut markers = Vec::new();
        let mut deletes = Vec::new();
        for w in writes {
            match &w.write {
                Write::Put { doc, merge: false } => replace.push(Value::Object(doc.clone())),
                Write::Put { doc, merge: true } => merge.push(Value::Object(doc.clone())),
                Write::Delete => {
                    markers
                        .push(json!({ID_FIELD: w.id.as_str(), VERSION_FIELD: w.version.encode()}));
                    deletes.push(Value::String(w.id.as_str().to_string()));
                }
            }
        }
        // Markers first, and stored, before any document is deleted.
        if !markers.is_empty() {
            let path = format!("/indexes/{}/documents", marker_index(index));
            let task = self.enqueue("POST", &path, &Value::Array(markers)).await?;
            self.wait_ok(task).await?;
        }
        // One write per id, so these three tasks commute; enqueue all, then wait for all.
        let docs = format!("/indexes/{index}/documents");
        let mut tasks = Vec::new();
        if !replace.is_empty() {
            tasks.push(self.enqueue("POST", &docs, &Value::Array(replace)).await?);
        }
        if !merge.is_empty() {
            tasks.push(self.enqueue("PUT", &docs, &Value::Array(merge)).await?);
        }
        if !deletes.is_empty() {
            let path = format!("{docs}/delete-batch");
            tasks.push(self.enqueue("POST", &path, &Value::Array(deletes)).await?);
        }
        for task in tasks {
            self.wait_ok(task).await?;
        }
        Ok(())
    }
}
