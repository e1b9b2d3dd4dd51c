//! The outbox pattern (`--outbox schema.table`): rows an application inserts into an outbox
//! table are published as the application's own events, not as row changes.
//!
//! An application that must change its database and tell others about it cannot do both
//! atomically with a database and a broker; it can with one transaction that changes its
//! tables and inserts the event into an outbox table (and usually deletes it again at once:
//! the insert is in the WAL whatever happens to the row later). pgcdc turns each such insert
//! into one Kafka record, in WAL order with the transaction's other events:
//!
//! - topic: the `--outbox-topic` template (default `<prefix>.outbox.{route}`) with `{route}`
//!   the value of the route column (`aggregatetype`);
//! - key: the key column's text (`aggregateid`), as is: same aggregate, same partition, so
//!   one aggregate's events stay in order across transactions; NULL gives a keyless record;
//! - value: the payload column (`payload`): `bytea` as its bytes, anything else (json,
//!   jsonb, text) as its text; NULL gives a record without value (a tombstone for the key);
//! - headers: the id column as `id` (where Debezium's outbox event router puts it) and as
//!   the event id `pgcdc-event-id`, the type column as `eventType` (where Debezium's
//!   documented configuration puts it), the transaction's annotations, then every other
//!   column under its own name, in text form (NULLs left out).
//!
//! The column names are Debezium's (`id`, `aggregatetype`, `aggregateid`, `type`,
//! `payload`), so its outbox tables work unchanged; `--outbox-column role=name` renames one.
//!
//! Deletes of outbox rows publish nothing (the usual pattern deletes them in the inserting
//! transaction); updates publish nothing either, with a warning at most once a minute
//! (an outbox is append-only: an update is an application mistake, not an event). Outbox
//! tables are not snapshotted: their rows at the first start were written before pgcdc's
//! position, and publishing them then would emit events of unknown age out of order; pgcdc
//! counts them and warns ([`count_rows`]).
//!
//! Route values are the application's data, so a topic name made of them may be one Kafka
//! refuses. A value made only of `A-Z a-z 0-9 . _ -` whose topic fits in 249 characters is
//! kept as is; any other gets the rule of table topics (`crate::source::topic`): other
//! characters become `_`, and `_` plus 8 hex digits of the value's SHA-256 are appended, cut
//! to fit. So no value stops the pipeline, and none loops. A NULL or empty route value has no
//! topic at all: pgcdc stops ([`OutboxError::NoRoute`]) naming the row's id and the fix,
//! rather than invent a destination. Topics are created the first time a route value is seen
//! (a cache keeps that to once per value and run), before the record is handed to the sink.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::event::headers;
use crate::event::Position;
use crate::model::{Header, Record, SinkItem};
use crate::source::catalog::{quote_ident, TableInfo, TableName};
use crate::source::pgoutput::{ColumnValue, LogicalMessage, Relation, TupleData};

/// `--outbox-topic`'s default.
pub const DEFAULT_TOPIC: &str = "{prefix}.outbox.{route}";

/// Kafka's limit on a topic name's length.
const MAX_TOPIC_LEN: usize = crate::source::topic::MAX_TOPIC_LEN;

/// At most one warning about updates of outbox rows per this many seconds.
const UPDATE_WARN_SECS: u64 = 60;

/// Route values remembered with their topics; past this many the cache starts over (a
/// route per aggregate id would otherwise grow it without bound).
const MAX_CACHED_ROUTES: usize = 10_000;

const BYTEA: u32 = 17;

/// The roles of an outbox table's columns (`--outbox-column role=name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The event id: headers `id` and `pgcdc-event-id`.
    Id,
    /// The topic's `{route}`.
    Route,
    /// The record's key.
    Key,
    /// Header `eventType`.
    Type,
    /// The record's value.
    Payload,
}

impl Role {
    pub const ALL: [Role; 5] = [Role::Id, Role::Route, Role::Key, Role::Type, Role::Payload];

    /// Its name in `--outbox-column`, which is also the default column name (Debezium's).
    pub fn name(self) -> &'static str {
        match self {
            Role::Id => "id",
            Role::Route => "aggregatetype",
            Role::Key => "aggregateid",
            Role::Type => "type",
            Role::Payload => "payload",
        }
    }
}

/// One `--outbox-column role=column`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnChoice {
    pub role: Role,
    pub column: String,
}

impl std::str::FromStr for ColumnChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let roles = || {
            Role::ALL
                .iter()
                .map(|r| r.name())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let Some((role, column)) = s.split_once('=') else {
            return Err(format!(
                "`{s}` is not role=column (roles: {}), e.g. aggregateid=order_id",
                roles()
            ));
        };
        let role = Role::ALL
            .into_iter()
            .find(|r| r.name() == role.trim())
            .ok_or_else(|| {
                format!(
                    "`{role}` is not an outbox column role: use one of {}",
                    roles()
                )
            })?;
        if column.is_empty() {
            return Err(format!("`{s}` names no column"));
        }
        Ok(ColumnChoice {
            role,
            column: column.to_string(),
        })
    }
}

/// What `--outbox`, `--outbox-column` and `--outbox-topic` say, checked.
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    pub tables: Vec<TableName>,
    /// The column of each role, in [`Role::ALL`] order.
    columns: [String; 5],
    /// The topic template with `{prefix}` filled in.
    template: String,
}

/// A configuration or a start-up check that does not work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutboxSetupError {
    #[error("--outbox-topic `{0}` does not make Kafka topic names: use `{{prefix}}`, `{{route}}` and characters from A-Z, a-z, 0-9, '.', '_' and '-' (at most 200 besides the route)")]
    Template(String),
    #[error("--outbox {0} is not published by publication `{1}`. Fix: {2}")]
    NotPublished(TableName, String, String),
    #[error("outbox table {table} has no published column `{column}` (its {role} column). Fix: name the column with --outbox-column {role}=<column>{more}")]
    MissingColumn {
        table: TableName,
        column: String,
        role: &'static str,
        more: &'static str,
    },
    #[error("--outbox-column names the column `{0}` for two roles: give each role its own column")]
    SharedColumn(String),
    #[error("--outbox cannot be used with --sink stdout: outbox events are Kafka records (the key and payload as raw bytes, the id and type in headers) that a JSON line cannot carry. Fix: use the Kafka sink, or capture the outbox table as an ordinary table (leave out --outbox)")]
    Stdout,
}

impl OutboxConfig {
    /// Checks the template and the column choices. `None` when no `--outbox` is given.
    pub fn new(
        tables: &[TableName],
        choices: &[ColumnChoice],
        template: &str,
        prefix: &str,
    ) -> Result<Option<Self>, OutboxSetupError> {
        if tables.is_empty() {
            return Ok(None);
        }
        let mut columns = Role::ALL.map(|r| r.name().to_string());
        for c in choices {
            columns[c.role as usize] = c.column.clone();
        }
        for (i, c) in columns.iter().enumerate() {
            if columns[..i].contains(c) {
                return Err(OutboxSetupError::SharedColumn(c.clone()));
            }
        }
        let template = template.replace("{prefix}", prefix);
        let fixed = template.replace("{route}", "");
        let legal = !template.is_empty()
            && fixed.len() <= crate::source::topic::MAX_PREFIX_LEN
            && fixed
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c));
        if !legal {
            return Err(OutboxSetupError::Template(template));
        }
        let mut tables = tables.to_vec();
        tables.sort();
        tables.dedup();
        Ok(Some(OutboxConfig {
            tables,
            columns,
            template,
        }))
    }

    fn column(&self, role: Role) -> &str {
        &self.columns[role as usize]
    }

    /// With `--table`: every outbox table must be one of them (checked before pgcdc creates
    /// the publication for them).
    pub fn check_listed(
        &self,
        listed: &[TableName],
        publication: &str,
    ) -> Result<(), OutboxSetupError> {
        match self.tables.iter().find(|t| !listed.contains(t)) {
            Some(t) => Err(OutboxSetupError::NotPublished(
                t.clone(),
                publication.to_string(),
                format!("add --table {t} (pgcdc adds it to the publication it creates)"),
            )),
            None => Ok(()),
        }
    }

    /// Takes the outbox tables out of `tables` (the captured ones: snapshotted, with topics
    /// of their own), after checking that each is published and has the columns it needs.
    /// `named`: `--table` was given (the fix is then to add it there).
    pub fn split(
        &self,
        tables: Vec<TableInfo>,
        named: bool,
        publication: &str,
    ) -> Result<(Vec<TableInfo>, Vec<TableInfo>), OutboxSetupError> {
        for t in &self.tables {
            let Some(info) = tables.iter().find(|i| &i.name == t) else {
                let fix = if named {
                    format!("add --table {t} (pgcdc adds it to the publication it creates)")
                } else {
                    format!(
                        "ALTER PUBLICATION {} ADD TABLE {t};",
                        quote_ident(publication)
                    )
                };
                return Err(OutboxSetupError::NotPublished(
                    t.clone(),
                    publication.to_string(),
                    fix,
                ));
            };
            // The type column is optional (no `eventType` header without it).
            for role in [Role::Id, Role::Route, Role::Key, Role::Payload] {
                let column = self.column(role);
                if !info.columns.iter().any(|(c, _)| c == column) {
                    return Err(OutboxSetupError::MissingColumn {
                        table: t.clone(),
                        column: column.to_string(),
                        role: role.name(),
                        more: if info.unpublished.iter().any(|c| c == column) {
                            ", or add it to the publication's column list"
                        } else {
                            ""
                        },
                    });
                }
            }
        }
        Ok(tables
            .into_iter()
            .partition(|t| !self.tables.contains(&t.name)))
    }
}

/// Warns about rows the outbox tables hold at start: they are not published (see the module
/// documentation). Counts at most a million per table.
pub async fn count_rows(
    client: &tokio_postgres::Client,
    tables: &[TableInfo],
) -> Result<(), tokio_postgres::Error> {
    for t in tables {
        let sql = format!(
            "SELECT count(*) FROM (SELECT 1 FROM {}.{} LIMIT 1000000) AS rows",
            quote_ident(&t.name.schema),
            quote_ident(&t.name.name)
        );
        let n: i64 = client.query_one(&sql, &[]).await?.get(0);
        if n > 0 {
            tracing::warn!(table = %t.name, rows = n, "the outbox table holds rows: they are not published (pgcdc publishes outbox rows as they are inserted, from its slot's position on; rows already there when its slot was created are never published). Delete them once handled, or insert them again to publish them");
        }
    }
    Ok(())
}

/// Remembers that `route`'s topic is `topic`; past [`MAX_CACHED_ROUTES`] the cache starts
/// over.
fn remember(topics: &mut HashMap<Box<[u8]>, Arc<str>>, route: Box<[u8]>, topic: Arc<str>) {
    if topics.len() >= MAX_CACHED_ROUTES {
        topics.clear();
    }
    topics.insert(route, topic);
}

/// An outbox row pgcdc cannot publish.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("an outbox row of {table} (id {id}) has no {what} `{column}`, so it has no topic; pgcdc stops rather than guess one (nothing after the transaction before it is confirmed). Fix: make the column NOT NULL with CHECK ({column_sql} <> '') so the application cannot write such a row; to go on without this transaction (committed at {commit_lsn}), stop pgcdc and move its slot past it: SELECT pg_replication_slot_advance('<--slot>', '{after}') — the transaction's other changes are then not published either")]
    NoRoute {
        table: TableName,
        id: String,
        what: &'static str,
        column: String,
        column_sql: String,
        commit_lsn: crate::model::Lsn,
        after: crate::model::Lsn,
    },
    #[error("outbox table {table} lost its column `{column}` (its {role} column) while streaming. Fix: add the column again, or name another with --outbox-column {role}=<column>")]
    ColumnGone {
        table: TableName,
        column: String,
        role: &'static str,
    },
}

/// An outbox table as its last Relation message describes it.
struct Rel {
    table: TableName,
    /// Tuple positions of the roles, in [`Role::ALL`] order.
    at: [Option<usize>; 5],
    payload_bytea: bool,
    /// The other columns: tuple position and header name.
    extra: Vec<(usize, Arc<CStr>)>,
}

/// The outbox state of one replication stream: which relations are outbox tables, and the
/// topics already made.
#[derive(Default)]
pub struct Outbox {
    config: Option<Arc<OutboxConfig>>,
    rels: HashMap<u32, Rel>,
    /// Route value → its topic, created (when pgcdc creates topics) before first use.
    topics: HashMap<Box<[u8]>, Arc<str>>,
    update_warned: Option<Instant>,
    /// Header names: `id`, the event id, `eventType`, the annotations (`None` until
    /// [`Outbox::new`]).
    names: Option<[Arc<CStr>; 4]>,
}

impl Outbox {
    pub fn new(config: Option<Arc<OutboxConfig>>) -> Self {
        Outbox {
            config,
            names: Some([
                headers::name(c"id"),
                headers::name(headers::EVENT_ID),
                headers::name(c"eventType"),
                headers::name(headers::ANNOTATIONS),
            ]),
            ..Outbox::default()
        }
    }

    /// Whether `name` is an outbox table.
    pub fn is_outbox(&self, namespace: &str, name: &str) -> bool {
        self.config.as_ref().is_some_and(|c| {
            c.tables
                .iter()
                .any(|t| t.schema == namespace && t.name == name)
        })
    }

    /// Whether changes of relation `oid` are outbox changes.
    pub fn owns(&self, oid: u32) -> bool {
        !self.rels.is_empty() && self.rels.contains_key(&oid)
    }

    /// Learns a Relation message; true if it describes an outbox table (whose changes
    /// [`Outbox::change`] then handles).
    pub fn relation(&mut self, r: &Relation) -> bool {
        let Some(config) = self
            .config
            .clone()
            .filter(|_| self.is_outbox(&r.namespace, &r.name))
        else {
            self.rels.remove(&r.oid);
            return false;
        };
        let mut at = [None; 5];
        let mut extra = Vec::new();
        for (i, c) in r.columns.iter().enumerate() {
            match Role::ALL
                .iter()
                .position(|role| config.column(*role) == c.name)
            {
                Some(role) => at[role] = Some(i),
                None => {
                    if let Ok(name) = CString::new(c.name.as_str()) {
                        extra.push((i, Arc::from(name.as_c_str())));
                    }
                }
            }
        }
        let payload_bytea = at[Role::Payload as usize]
            .and_then(|i| r.columns.get(i))
            .is_some_and(|c| c.type_oid == BYTEA);
        self.rels.insert(
            r.oid,
            Rel {
                table: TableName::new(r.namespace.clone(), r.name.clone()),
                at,
                payload_bytea,
                extra,
            },
        );
        true
    }

    /// The topic of an outbox insert, if it was not seen before and may have to be created
    /// (the caller creates it, then calls [`Outbox::created`]).
    pub fn new_topic(&self, msg: &LogicalMessage) -> Option<(Box<[u8]>, String)> {
        let LogicalMessage::Insert(i) = msg else {
            return None;
        };
        let rel = self.rels.get(&i.relation_oid)?;
        let route = route_of(rel, &i.new)?;
        if self.topics.contains_key(route) {
            return None;
        }
        let topic = topic_for(&self.config.as_ref()?.template, route);
        Some((route.into(), topic))
    }

    /// Remembers that `topic`, the topic of `route`, exists.
    pub fn created(&mut self, route: Box<[u8]>, topic: String) {
        remember(&mut self.topics, route, topic.into());
    }

    /// Handles an insert, update or delete of an outbox table (see [`Outbox::owns`]).
    pub fn change(
        &mut self,
        msg: &LogicalMessage,
        position: &Position,
        annotations: Option<&Bytes>,
        out: &mut Vec<SinkItem>,
    ) -> Result<(), Box<OutboxError>> {
        let i = match msg {
            LogicalMessage::Insert(i) => i,
            LogicalMessage::Update(u) => {
                self.warn_update(u.relation_oid);
                return Ok(());
            }
            // The usual end of an outbox row: nothing to publish.
            _ => return Ok(()),
        };
        let Some(rel) = self.rels.get(&i.relation_oid) else {
            return Ok(());
        };
        let Some(config) = self.config.as_ref() else {
            return Ok(());
        };
        let text = |role: Role| -> Result<Option<&Bytes>, Box<OutboxError>> {
            let at = rel.at[role as usize].ok_or_else(|| OutboxError::ColumnGone {
                table: rel.table.clone(),
                column: config.column(role).to_string(),
                role: role.name(),
            })?;
            Ok(match i.new.0.get(at) {
                Some(ColumnValue::Text(b)) => Some(b),
                _ => None,
            })
        };
        let id = text(Role::Id)?.cloned();
        let key = text(Role::Key)?.cloned();
        let payload = text(Role::Payload)?;
        let Some(route) = route_of(rel, &i.new) else {
            let column = config.column(Role::Route);
            return Err(Box::new(OutboxError::NoRoute {
                table: rel.table.clone(),
                id: id.as_ref().map_or_else(
                    || "NULL".to_string(),
                    |b| String::from_utf8_lossy(b).into_owned(),
                ),
                what: if text(Role::Route)?.is_some() {
                    "value (it is empty) in"
                } else {
                    "value (it is NULL) in"
                },
                column: column.to_string(),
                column_sql: quote_ident(column),
                commit_lsn: position.commit_lsn,
                after: crate::model::Lsn(position.commit_lsn.0 + 1),
            }));
        };
        let topic = match self.topics.get(route) {
            Some(t) => t.clone(),
            None => {
                let t: Arc<str> = topic_for(&config.template, route).into();
                remember(&mut self.topics, route.into(), t.clone());
                t
            }
        };
        let value = match payload {
            None => None,
            Some(p) if rel.payload_bytea => Some(decode_bytea(p)),
            Some(p) => Some(p.clone()),
        };
        let mut hs = Vec::with_capacity(rel.extra.len() + 4);
        let names = self.names.as_ref();
        if let (Some(id), Some([id_name, event_id, ..])) = (&id, names) {
            hs.push(Header {
                name: id_name.clone(),
                value: id.clone(),
            });
            hs.push(Header {
                name: event_id.clone(),
                value: id.clone(),
            });
        }
        if let (Some(Some(kind)), Some([_, _, type_name, _])) = (
            rel.at[Role::Type as usize].map(|at| match i.new.0.get(at) {
                Some(ColumnValue::Text(b)) => Some(b),
                _ => None,
            }),
            names,
        ) {
            hs.push(Header {
                name: type_name.clone(),
                value: kind.clone(),
            });
        }
        if let (Some(a), Some([.., annotations_name])) = (annotations, names) {
            hs.push(Header {
                name: annotations_name.clone(),
                value: a.clone(),
            });
        }
        for (at, name) in &rel.extra {
            if let Some(ColumnValue::Text(b)) = i.new.0.get(*at) {
                hs.push(Header {
                    name: name.clone(),
                    value: b.clone(),
                });
            }
        }
        out.push(SinkItem::Record(Record {
            topic,
            key,
            value,
            partition: None,
            headers: hs,
        }));
        Ok(())
    }

    fn warn_update(&mut self, oid: u32) {
        let now = Instant::now();
        if self
            .update_warned
            .is_some_and(|at| now.duration_since(at).as_secs() < UPDATE_WARN_SECS)
        {
            return;
        }
        self.update_warned = Some(now);
        if let Some(rel) = self.rels.get(&oid) {
            tracing::warn!(table = %rel.table, "an outbox row was updated: updates of outbox rows publish nothing (only inserts are events; at most one such warning a minute)");
        }
    }
}

/// The route value of an outbox row: `None` when NULL or empty.
fn route_of<'a>(rel: &Rel, row: &'a TupleData) -> Option<&'a [u8]> {
    match row.0.get(rel.at[Role::Route as usize]?) {
        Some(ColumnValue::Text(b)) if !b.is_empty() => Some(b),
        _ => None,
    }
}

/// The topic of a route value (see the module documentation).
fn topic_for(template: &str, route: &[u8]) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.';
    let route_text = String::from_utf8_lossy(route);
    let kept = template.replace("{route}", &route_text);
    if route_text.chars().all(plain) && kept.len() <= MAX_TOPIC_LEN {
        return kept;
    }
    let digest = openssl::sha::sha256(route);
    let hash: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    let mut clean: String = route_text
        .chars()
        .map(|c| if plain(c) { c } else { '_' })
        .collect();
    let uses = template.matches("{route}").count().max(1);
    let fixed = template.replace("{route}", "").len();
    let room = MAX_TOPIC_LEN.saturating_sub(fixed) / uses;
    // Every character is ASCII now: any length is a boundary.
    clean.truncate(room.saturating_sub(hash.len() + 1));
    template.replace("{route}", &format!("{clean}_{hash}"))
}

/// A `bytea` value's bytes from its hex text form (`\x…`, which pgcdc's sessions pin); a
/// text of another form is passed on as it is.
fn decode_bytea(text: &Bytes) -> Bytes {
    let Some(digits) = text.strip_prefix(b"\\x") else {
        return text.clone();
    };
    let nibble = |d: u8| (d as char).to_digit(16).map(|v| v as u8);
    let bytes: Option<Vec<u8>> = digits
        .chunks(2)
        .map(|p| match p {
            [h, l] => Some(nibble(*h)? << 4 | nibble(*l)?),
            _ => None,
        })
        .collect();
    bytes.map_or_else(|| text.clone(), Bytes::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_values_make_topics_kafka_accepts() {
        let t = "p.outbox.{route}";
        assert_eq!(topic_for(t, b"Order"), "p.outbox.Order");
        assert_eq!(topic_for(t, b"order.v2-x_y"), "p.outbox.order.v2-x_y");
        let odd = topic_for(t, "Order Line é".as_bytes());
        assert!(odd.starts_with("p.outbox.Order_Line___"), "{odd}");
        assert_ne!(odd, topic_for(t, "Order Line è".as_bytes()));
        let long = topic_for(t, "x".repeat(400).as_bytes());
        assert!(long.len() <= MAX_TOPIC_LEN, "{}", long.len());
        assert!(long
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)));
    }

    #[test]
    fn bytea_payloads_are_their_bytes() {
        assert_eq!(
            &decode_bytea(&Bytes::from_static(b"\\x00ff41"))[..],
            b"\x00\xffA"
        );
        assert_eq!(&decode_bytea(&Bytes::from_static(b"\\x"))[..], b"");
        assert_eq!(&decode_bytea(&Bytes::from_static(b"\\x0"))[..], b"\\x0");
    }

    #[test]
    fn column_choices_and_templates_are_checked() {
        let t = [TableName::new("public", "outbox")];
        assert!(OutboxConfig::new(&[], &[], DEFAULT_TOPIC, "p")
            .expect("ok")
            .is_none());
        let c = OutboxConfig::new(&t, &[], DEFAULT_TOPIC, "p")
            .expect("ok")
            .expect("some");
        assert_eq!(c.template, "p.outbox.{route}");
        assert_eq!(c.column(Role::Key), "aggregateid");
        let choice: ColumnChoice = "aggregateid=order_id".parse().expect("parses");
        let c = OutboxConfig::new(&t, &[choice], DEFAULT_TOPIC, "p")
            .expect("ok")
            .expect("some");
        assert_eq!(c.column(Role::Key), "order_id");
        assert!("nope=x".parse::<ColumnChoice>().is_err());
        assert!("aggregateid".parse::<ColumnChoice>().is_err());
        let shared: ColumnChoice = "aggregateid=id".parse().expect("parses");
        assert!(OutboxConfig::new(&t, &[shared], DEFAULT_TOPIC, "p").is_err());
        assert!(OutboxConfig::new(&t, &[], "a b.{route}", "p").is_err());
    }
}
