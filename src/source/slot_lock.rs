//! One pgcdc per slot: a session-level advisory lock, held for the whole life of the process.
//!
//! A replication slot keeps a second reader away only while it is active, and during a
//! snapshot pgcdc holds only a temporary slot: the permanent one exists but nobody reads it.
//! A second `pgcdc run` with the same `--slot` was let in then, took a snapshot of its own, and
//! the two processes' events interleaved; `pgcdc drop` could remove the slot under the first.
//!
//! So before it touches anything, `run` takes `pg_try_advisory_lock(key)` on a connection of
//! its own and keeps that connection open until it exits; `drop` takes the same lock for its
//! own duration. The key is derived from the slot name alone (64-bit FNV-1a of a fixed prefix
//! and the name, computed here so that it never depends on the server's hash functions), and
//! an advisory lock is scoped to the database — the scope of a logical slot. Whoever finds the
//! lock taken stops, naming the holder's backend and client address from `pg_locks` and
//! `pg_stat_activity`.
//!
//! A session lock ends with its session. If the connection is lost (a server restart, a cut
//! network), [`SlotLock::ensure`] notices before streaming starts again, opens a new
//! connection and takes the lock again, or stops if another process took it meanwhile. A
//! connection that went silent (a partition) may still hold the lock on the server, which has
//! not noticed: that session — recognised by its backend pid and start time, both recorded
//! when the lock was taken — is ended first.

use std::time::Duration;

use tokio_postgres::Client;

use crate::model::failure::{Recoverable, Recovery};
use crate::source::connect::{self, describe, ConnectError};
use crate::source::conninfo::ConnInfo;

/// How long a check that the lock's connection still works may take.
const ALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// A lock found taken is tried again for this long: its holder may be a process that has
/// just exited, whose session the server is still ending.
const HELD_RETRY_FOR: Duration = Duration::from_secs(2);
const HELD_RETRY_EVERY: Duration = Duration::from_millis(250);

/// Why the lock is not held.
#[derive(Debug, thiserror::Error)]
pub enum SlotLockError {
    #[error(
        "another pgcdc is running for slot `{slot}` ({holder}): one process reads a slot; stop \
         that one first, or give this one another --slot"
    )]
    Held { slot: String, holder: String },
    #[error("cannot connect to PostgreSQL to take the lock of slot `{slot}`: {source}")]
    Connect {
        slot: String,
        #[source]
        source: ConnectError,
    },
    #[error("cannot take the lock of slot `{slot}`: {}", describe(.source))]
    Query {
        slot: String,
        source: tokio_postgres::Error,
    },
}

impl Recoverable for SlotLockError {
    /// Another process holding the lock is definite; a server that could not be reached is
    /// reconnected to (while streaming; at start-up it stops like any other failure).
    fn recovery(&self) -> Recovery {
        let lost = match self {
            SlotLockError::Held { .. } => false,
            SlotLockError::Connect { source, .. } => source.is_transient(),
            SlotLockError::Query { source, .. } => connect::is_transient(source),
        };
        if lost {
            Recovery::Reconnect
        } else {
            Recovery::Stop
        }
    }
}

/// The advisory lock key of `slot`: FNV-1a (64 bits) of a fixed prefix and the name.
pub fn key(slot: &str) -> i64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    for b in b"pgcdc slot lock\0".iter().chain(slot.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(PRIME);
    }
    h as i64
}

/// Takes the lock of `slot` on `client` if it is free, or becomes free within a moment; true
/// when taken (or held already by this session).
pub async fn try_lock(client: &Client, slot: &str) -> Result<bool, SlotLockError> {
    let deadline = tokio::time::Instant::now() + HELD_RETRY_FOR;
    loop {
        let row = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&key(slot)])
            .await
            .map_err(|source| SlotLockError::Query {
                slot: slot.to_string(),
                source,
            })?;
        if row.get(0) {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(HELD_RETRY_EVERY).await;
    }
}

/// The lock's four parts as `pg_locks` shows them: `classid` and `objid` (high and low half).
fn halves(slot: &str) -> (i64, i64) {
    let k = key(slot) as u64;
    ((k >> 32) as i64, (k & 0xffff_ffff) as i64)
}

/// Whether some session holds the lock of `slot` (a `pgcdc run` for it is alive), without
/// taking it.
pub async fn held(client: &Client, slot: &str) -> Result<bool, tokio_postgres::Error> {
    let (hi, lo) = halves(slot);
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_locks l \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND l.classid = $1::int8::oid AND l.objid = $2::int8::oid)",
            &[&hi, &lo],
        )
        .await?;
    Ok(row.get(0))
}

/// Who holds the lock of `slot`, for a message: backend pid, client address, application name
/// and since when; "a session that has just ended" when nobody does any more.
pub async fn holder(client: &Client, slot: &str) -> String {
    let (hi, lo) = halves(slot);
    let row = client
        .query_opt(
            "SELECT a.pid, \
                    coalesce(host(a.client_addr) || ':' || a.client_port, \
                             CASE WHEN a.client_port = -1 THEN 'a Unix socket' END, 'unknown'), \
                    coalesce(a.application_name, ''), \
                    coalesce(to_char(a.backend_start AT TIME ZONE 'UTC', \
                                     'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), 'unknown') \
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND l.classid = $1::int8::oid AND l.objid = $2::int8::oid \
             LIMIT 1",
            &[&hi, &lo],
        )
        .await;
    match row {
        Ok(Some(r)) => {
            let pid: i32 = r.get(0);
            let addr: String = r.get(1);
            let app: String = r.get(2);
            let since: String = r.get(3);
            format!(
                "PostgreSQL backend pid {pid}, client {addr}, application_name `{app}`, \
                 connected since {since}"
            )
        }
        Ok(None) => "a session that has just ended; try again".to_string(),
        Err(_) => "a session pgcdc cannot see".to_string(),
    }
}

/// The lock of one slot, held for the process's lifetime on a connection of its own.
pub struct SlotLock {
    slot: String,
    /// Off for `--snapshot-only`, which reads no slot of its own.
    enabled: bool,
    client: Option<Client>,
    /// The backend pid and start time of the session that took the lock.
    session: Option<(i32, String)>,
}

impl SlotLock {
    pub fn new(slot: &str, enabled: bool) -> Self {
        SlotLock {
            slot: slot.to_string(),
            enabled,
            client: None,
            session: None,
        }
    }

    /// Makes sure this process holds the lock: takes it on a new connection (made with
    /// `conninfo`) the first time, and again when the connection that held it was lost.
    /// Fails with [`SlotLockError::Held`] when another process holds it.
    pub async fn ensure(&mut self, conninfo: &ConnInfo) -> Result<(), SlotLockError> {
        if !self.enabled {
            return Ok(());
        }
        if let Some(client) = &self.client {
            let alive = !client.is_closed()
                && tokio::time::timeout(ALIVE_TIMEOUT, client.batch_execute("SELECT 1"))
                    .await
                    .is_ok_and(|r| r.is_ok());
            if alive {
                return Ok(());
            }
            tracing::warn!(
                slot = %self.slot,
                "lost the connection that holds the slot's lock; taking the lock again"
            );
            self.client = None;
        }
        let client = connect::connect(conninfo)
            .await
            .map_err(|source| SlotLockError::Connect {
                slot: self.slot.clone(),
                source,
            })?;
        if let Some((pid, started)) = self.session.clone() {
            self.end_old_session(&client, pid, &started).await?;
        }
        if !try_lock(&client, &self.slot).await? {
            return Err(SlotLockError::Held {
                slot: self.slot.clone(),
                holder: holder(&client, &self.slot).await,
            });
        }
        let me = client
            .query_one(
                "SELECT pid, backend_start::text FROM pg_stat_activity WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .map_err(|source| SlotLockError::Query {
                slot: self.slot.clone(),
                source,
            })?;
        self.session = Some((me.get(0), me.get(1)));
        tracing::debug!(slot = %self.slot, "holding the slot's lock");
        self.client = Some(client);
        Ok(())
    }

    /// Ends this process's previous session if the server still has it holding the lock.
    async fn end_old_session(
        &self,
        client: &Client,
        pid: i32,
        started: &str,
    ) -> Result<(), SlotLockError> {
        let (hi, lo) = halves(&self.slot);
        let ended = client
            .query(
                "SELECT pg_terminate_backend(a.pid) \
                 FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid \
                 WHERE a.pid = $1 AND a.backend_start::text = $2 \
                   AND l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
                   AND l.classid = $3::int8::oid AND l.objid = $4::int8::oid",
                &[&pid, &started, &hi, &lo],
            )
            .await
            .map_err(|source| SlotLockError::Query {
                slot: self.slot.clone(),
                source,
            })?;
        if !ended.is_empty() {
            tracing::warn!(
                slot = %self.slot,
                backend_pid = pid,
                "ended this pgcdc's previous session, which the server still had holding the slot's lock"
            );
        }
        Ok(())
    }

    /// Gives the lock back, so that a process started right after this one exits finds it
    /// free (a closed connection releases it too, but the server ends the session a moment
    /// later).
    pub async fn release(&mut self) {
        if let Some(client) = self.client.take() {
            let k = key(&self.slot);
            let unlock = async {
                client
                    .query_one("SELECT pg_advisory_unlock($1)", &[&k])
                    .await
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), unlock).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_and_differ_per_slot() {
        // Fixed forever: two pgcdc versions must agree on a slot's key.
        assert_eq!(key("pgcdc"), key("pgcdc"));
        assert_eq!(key("pgcdc"), -1_111_863_987_255_079_548);
        assert_ne!(key("pgcdc"), key("pgcdc2"));
        assert_ne!(key(""), key("a"));
    }
}
