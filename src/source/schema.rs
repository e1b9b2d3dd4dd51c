//! What the stream needs to learn from the catalog as it goes: type descriptions, the key
//! of a table that joined the publication, and that table's topic.
//!
//! pgoutput describes a table by column names and type OIDs only. To encode an array, a
//! composite, a domain or a range, pgcdc must know how that type is built, which only
//! `pg_type` says; so the [`TypeRegistry`] is filled at start for the captured tables, and
//! again whenever a Relation message names a type it does not know (a column added or
//! changed to a new type). Those lookups happen rarely — at most once per new shape — and the
//! streaming loop simply awaits them: nothing is published out of order while it waits.
//!
//! The catalog is read as it is *now*, which may be later than the WAL being decoded. Types
//! are immutable in the ways that matter here (an attribute added to a composite type later
//! makes older values fail to parse, and those are then written as text, not invented), and a
//! key looked up for a table that is gone falls back to the replica identity flags of the
//! Relation message.

use std::sync::Arc;

use tokio::sync::Mutex;
use tokio_postgres::Client;

use crate::event::{TypeDesc, TypeRegistry};
use crate::model::failure::{Recoverable, Recovery};
use crate::model::{ProvisionError, TopicProvisioner};
use crate::source::catalog::{self, PreflightError};
use crate::source::connect::{self, describe, ConnectError};
use crate::source::conninfo::ConnInfo;

/// A catalog lookup or topic creation failed while streaming.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("cannot open a catalog connection to look up a new table or type")]
    Connect(#[from] ConnectError),
    // These two show their error in full and do not chain it as a source too (which
    // printed it twice).
    #[error("catalog lookup for a new table or type failed: {}", describe(.0))]
    Query(tokio_postgres::Error),
    #[error("catalog lookup for a new table failed: {0}")]
    Preflight(PreflightError),
    #[error(transparent)]
    Topic(#[from] ProvisionError),
}

impl From<tokio_postgres::Error> for LookupError {
    fn from(e: tokio_postgres::Error) -> Self {
        LookupError::Query(e)
    }
}

impl From<PreflightError> for LookupError {
    fn from(e: PreflightError) -> Self {
        LookupError::Preflight(e)
    }
}

impl Recoverable for LookupError {
    /// A lost or refused connection, or a topic that could not be created yet, may work after
    /// a reconnect (the stream resumes after what the sink acknowledged); the rest stops.
    fn recovery(&self) -> Recovery {
        let reconnect = match self {
            LookupError::Connect(e) => e.is_transient(),
            LookupError::Query(e) => crate::source::connect::is_transient(e),
            LookupError::Preflight(e) => e.recovery() == Recovery::Reconnect,
            LookupError::Topic(e) => e.recovery() != Recovery::Stop,
        };
        if reconnect {
            Recovery::Reconnect
        } else {
            Recovery::Stop
        }
    }
}

/// Adds to `registry` the descriptions of `oids` and of every type they are built from.
/// A type the catalog no longer has is recorded as plain text, so it is not asked for again.
pub async fn load_types(
    client: &Client,
    registry: &mut TypeRegistry,
    oids: impl IntoIterator<Item = u32>,
) -> Result<(), tokio_postgres::Error> {
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await?
        .get(0);
    // Multiranges exist since PostgreSQL 14.
    let multirange = if version >= 140_000 {
        "(SELECT m.rngsubtype FROM pg_range m WHERE m.rngmultitypid = t.oid)"
    } else {
        "NULL::oid"
    };
    let types_sql = format!(
        "SELECT t.oid, t.typname::text, t.typtype::text, t.typdelim::text, \
                CASE WHEN e.typarray = t.oid THEN t.typelem END, \
                NULLIF(t.typbasetype, 0), NULLIF(t.typrelid, 0), \
                coalesce(r.rngsubtype, {multirange}) \
         FROM pg_type t \
         LEFT JOIN pg_type e ON e.oid = t.typelem AND t.typelem <> 0 \
         LEFT JOIN pg_range r ON r.rngtypid = t.oid \
         WHERE t.oid = ANY($1)"
    );
    let mut todo = registry.unknown(oids);
    // Each round goes one level deeper into nested types; PostgreSQL types are not deep.
    for _ in 0..32 {
        if todo.is_empty() {
            break;
        }
        let rows = client.query(&types_sql, &[&todo]).await?;
        let relids: Vec<u32> = rows
            .iter()
            .filter_map(|r| r.get::<_, Option<u32>>(6))
            .collect();
        let attrs = client
            .query(
                "SELECT attrelid, attname::text, atttypid FROM pg_attribute \
                 WHERE attrelid = ANY($1) AND attnum > 0 AND NOT attisdropped \
                 ORDER BY attrelid, attnum",
                &[&relids],
            )
            .await?;
        for row in &rows {
            let oid: u32 = row.get(0);
            let typtype: String = row.get(2);
            let delim: String = row.get(3);
            let relid: Option<u32> = row.get(6);
            let fields = relid
                .map(|rel| {
                    attrs
                        .iter()
                        .filter(|a| a.get::<_, u32>(0) == rel)
                        .map(|a| (a.get::<_, String>(1), a.get::<_, u32>(2)))
                        .collect()
                })
                .unwrap_or_default();
            registry.insert(
                oid,
                TypeDesc {
                    name: row.get(1),
                    typtype: typtype.bytes().next().unwrap_or(b'b'),
                    elem: row.get(4),
                    delim: delim.bytes().next().unwrap_or(b','),
                    base: row.get(5),
                    fields,
                    subtype: row.get(7),
                },
            );
        }
        for gone in todo
            .iter()
            .filter(|o| !rows.iter().any(|r| r.get::<_, u32>(0) == **o))
        {
            registry.insert(
                *gone,
                TypeDesc {
                    name: String::new(),
                    typtype: b'b',
                    elem: None,
                    delim: b',',
                    base: None,
                    fields: Vec::new(),
                    subtype: None,
                },
            );
        }
        todo = registry.unknown(todo);
    }
    Ok(())
}

/// Catalog access for the stream, on a connection of its own opened when first needed.
pub struct Lookup {
    conninfo: ConnInfo,
    client: Mutex<Option<Client>>,
    /// Creates the topics of tables that join the publication; none for stdout.
    topics: Option<Arc<dyn TopicProvisioner>>,
}

impl Lookup {
    pub fn new(conninfo: ConnInfo, topics: Option<Arc<dyn TopicProvisioner>>) -> Self {
        Lookup {
            conninfo,
            client: Mutex::new(None),
            topics,
        }
    }

    /// The open catalog connection in `slot`, (re)connecting when there is none.
    async fn connected<'g>(&self, slot: &'g mut Option<Client>) -> Result<&'g Client, LookupError> {
        let client = match slot.take() {
            Some(c) if !c.is_closed() => c,
            _ => connect::connect(&self.conninfo).await?,
        };
        Ok(slot.insert(client))
    }

    /// See [`load_types`].
    pub async fn load_types(
        &self,
        registry: &mut TypeRegistry,
        oids: Vec<u32>,
    ) -> Result<(), LookupError> {
        let mut slot = self.client.lock().await;
        let client = self.connected(&mut slot).await?;
        Ok(load_types(client, registry, oids).await?)
    }

    /// The key columns of table `oid` (see [`catalog::table_key`]); empty if it has none or
    /// is gone.
    pub async fn table_key(&self, oid: u32) -> Result<Vec<String>, LookupError> {
        let mut slot = self.client.lock().await;
        let client = self.connected(&mut slot).await?;
        Ok(catalog::table_key(client, oid).await?.columns)
    }

    /// Creates `topic` unless it exists (when given a provisioner: Kafka sink only).
    pub async fn ensure_topic(&self, topic: &str) -> Result<(), LookupError> {
        if let Some(topics) = &self.topics {
            topics.ensure(topic).await?;
        }
        Ok(())
    }
}
