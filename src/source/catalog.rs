//! Start-up checks and catalog lookups, over an ordinary (non-replication) connection.
//!
//! Everything a user can get wrong is checked here, before a slot is created or a byte is
//! published, and each failure says how to fix it: `wal_level`, the REPLICATION attribute,
//! a missing table or SELECT privilege, a table whose updates and deletes cannot be
//! identified, a publication that does not match, a slot that is busy or of another plugin.
//!
//! What a table publishes is what its publication publishes: since PostgreSQL 15 a
//! publication may name a table's columns and filter its rows (`FOR TABLE users (id, name)
//! WHERE (active)`), and the stream then carries only those columns, only for those rows. So
//! the snapshot reads the same columns and rows ([`describe_published`]): a column the owner
//! chose not to publish must not leak through the snapshot, and a row outside the filter
//! would be published once and never updated or deleted after.

use std::fmt;
use std::str::FromStr;

use tokio_postgres::Client;

use crate::model::failure::{Recoverable, Recovery};
use crate::model::Lsn;
use crate::source::connect::describe;

/// A definite problem found before streaming: retrying will not help, the message says what will.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("wal_level is `{0}`, but logical replication needs `logical`. Fix: ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL")]
    WalLevel(String),
    #[error("role `{0}` may not start replication. Fix: ALTER ROLE {role} REPLICATION; (or connect as a role that has it)", role = quote_ident(.0))]
    NoReplication(String),
    #[error("table {0} does not exist (names are schema.table, as in the catalog; quote mixed case: '\"MySchema\".\"Orders\"')")]
    NoSuchTable(TableName),
    #[error("{0} is not a table (pgcdc publishes ordinary and partitioned tables)")]
    NotATable(TableName),
    #[error("role `{role}` has no SELECT privilege on {table}, which the snapshot needs. Fix: GRANT SELECT ON {table} TO {};", quote_ident(.role))]
    NoSelect { role: String, table: TableName },
    #[error("table {0} has no primary key and REPLICA IDENTITY {1}: its updates and deletes cannot be identified. Fix: add a primary key, or ALTER TABLE {0} REPLICA IDENTITY FULL;")]
    NoIdentity(TableName, &'static str),
    #[error("publication `{0}` does not exist and no --table was given. Fix: name the tables with --table schema.table (pgcdc then creates the publication), or CREATE PUBLICATION {publication} FOR TABLE ...;", publication = quote_ident(.0))]
    NoPublication(String),
    #[error("publication `{0}` contains no tables. Fix: ALTER PUBLICATION {publication} ADD TABLE ...; or name tables with --table", publication = quote_ident(.0))]
    EmptyPublication(String),
    #[error("publication `{publication}` does not include {missing}. Fix: ALTER PUBLICATION {} ADD TABLE {missing}; or use another --publication", quote_ident(.publication))]
    PublicationMissingTables {
        publication: String,
        missing: String,
    },
    #[error("publication `{0}` does not publish {1}, so those changes would be silently lost. Fix: ALTER PUBLICATION {publication} SET (publish = 'insert, update, delete, truncate');", publication = quote_ident(.0))]
    PublicationOps(String, String),
    #[error("cannot create publication `{publication}`: {cause}. Fix: create it as the tables' owner or a superuser: CREATE PUBLICATION {} FOR TABLE {tables};", quote_ident(.publication))]
    CreatePublication {
        publication: String,
        tables: String,
        cause: String,
    },
    #[error("publication `{0}` publishes the partitions of {1} under their own names, so its changes would not reach its topic. Fix: ALTER PUBLICATION {publication} SET (publish_via_partition_root = true);", publication = quote_ident(.0))]
    PartitionRoot(String, TableName),
    #[error("publication `{publication}` publishes only some columns of {table} and leaves out its key column(s) {missing}, so its events could not be keyed (the key is the replica identity index under REPLICA IDENTITY USING INDEX, else the primary key). Fix: publish them too: {fix}")]
    KeyNotPublished {
        publication: String,
        table: TableName,
        missing: String,
        fix: String,
    },
    #[error("replication slot `{slot}` uses the output plugin `{plugin}`, not pgoutput. Fix: choose another --slot, or drop it: SELECT pg_drop_replication_slot({});", quote_literal(.slot))]
    SlotPlugin { slot: String, plugin: String },
    #[error("replication slot `{slot}` belongs to database `{database}`, not this one. Fix: choose another --slot")]
    SlotDatabase { slot: String, database: String },
    #[error("replication slot `{slot}` is in use by process {pid} (another pgcdc?). Fix: stop that process, or choose another --slot")]
    SlotActive { slot: String, pid: i32 },
    /// Complete in itself (see [`describe`]), so not chained as a source.
    #[error("{}", describe(.0))]
    Query(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for PreflightError {
    fn from(e: tokio_postgres::Error) -> Self {
        PreflightError::Query(e)
    }
}

impl Recoverable for PreflightError {
    /// Lost connections are worth a reconnect; everything else needs the user.
    fn recovery(&self) -> Recovery {
        match self {
            PreflightError::Query(e) if crate::source::connect::is_transient(e) => {
                Recovery::Reconnect
            }
            _ => Recovery::Stop,
        }
    }
}

/// A `schema.table` name as the user wrote it (unquoted parts are folded to lower case, as
/// PostgreSQL does).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        TableName {
            schema: schema.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}",
            quote_ident(&self.schema),
            quote_ident(&self.name)
        )
    }
}

/// Why a `--table` value is not a table name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a table name: write schema.table, e.g. public.orders (quote mixed case: '\"Sales\".\"Orders\"')")]
pub struct ParseTableNameError(pub String);

impl FromStr for TableName {
    type Err = ParseTableNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseTableNameError(s.to_string());
        let parts = split_name(s).ok_or_else(err)?;
        match <[String; 2]>::try_from(parts) {
            Ok([schema, name]) => Ok(TableName { schema, name }),
            Err(parts) if parts.len() == 1 => Ok(TableName {
                schema: "public".into(),
                name: parts.into_iter().next().unwrap_or_default(),
            }),
            Err(_) => Err(err()),
        }
    }
}

/// Splits a dotted SQL name into its parts: unquoted parts are folded to lower case, quoted
/// ones kept as written (`""` is a quote). `None` when it is not a name.
fn split_name(s: &str) -> Option<Vec<String>> {
    let mut parts = Vec::new();
    let mut chars = s.trim().chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    Some('"') => break,
                    Some(c) => part.push(c),
                    None => return None,
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                if c == '"' || c.is_whitespace() {
                    return None;
                }
                part.extend(c.to_lowercase());
                chars.next();
            }
        }
        if part.is_empty() {
            return None;
        }
        parts.push(part);
        match chars.next() {
            None => return Some(parts),
            Some('.') => continue,
            Some(_) => return None,
        }
    }
}

/// A `schema.table.column` name (`table.column` means schema `public`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ColumnRef {
    pub table: TableName,
    pub column: String,
}

impl fmt::Display for ColumnRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.table, quote_ident(&self.column))
    }
}

/// Why a `--exclude-column` value is not a column name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a column name: write schema.table.column, e.g. public.users.email (quote mixed case: '\"Sales\".\"Users\".\"Email\"')")]
pub struct ParseColumnRefError(pub String);

impl FromStr for ColumnRef {
    type Err = ParseColumnRefError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseColumnRefError(s.to_string());
        let mut parts = split_name(s).ok_or_else(err)?;
        let (schema, name, column) = match parts.len() {
            3 => {
                let column = parts.pop().unwrap_or_default();
                let name = parts.pop().unwrap_or_default();
                (parts.pop().unwrap_or_default(), name, column)
            }
            2 => {
                let column = parts.pop().unwrap_or_default();
                (
                    "public".to_string(),
                    parts.pop().unwrap_or_default(),
                    column,
                )
            }
            _ => return Err(err()),
        };
        Ok(ColumnRef {
            table: TableName::new(schema, name),
            column,
        })
    }
}

/// Quotes an identifier for SQL and for replication commands: `"name"`, doubling quotes.
/// Always, never "only when needed": which words are reserved differs between PostgreSQL
/// versions (and a column named `user` left bare is the SQL function `user`), so the one
/// safe rule is to quote everything. Every name in every SQL text pgcdc builds goes through
/// here.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes a string literal: `'value'`, doubling single quotes. Both the SQL parser (with the
/// default `standard_conforming_strings=on`) and the replication command parser read
/// backslashes literally in such a string.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A column of a table, as the catalog describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribute {
    pub name: String,
    pub type_oid: u32,
    /// A stored generated column (`GENERATED ALWAYS AS (…) STORED`): published only by
    /// PostgreSQL 18+, when the publication says so (see [`published`]).
    pub generated: bool,
}

/// What the pipeline needs to know about a published table.
#[derive(Debug, Clone)]
pub struct TableInfo {
    pub oid: u32,
    pub name: TableName,
    /// Column names and type OIDs in attribute order (what COPY and pgoutput both use): the
    /// published ones, without excluded ones.
    pub columns: Vec<(String, u32)>,
    /// Every column of the table when pgcdc read the catalog, in attribute order (virtual
    /// generated columns of PostgreSQL 18 aside: never published). The snapshot checks them
    /// against its consistent point (see [`crate::source::snapshot`]).
    pub attributes: Vec<Attribute>,
    /// Kafka key columns in key order (see [`table_key`]).
    pub key: Vec<String>,
    /// A partitioned table: its rows live in partitions, and its changes are published under
    /// its own name only with `publish_via_partition_root`.
    pub partitioned: bool,
    /// The publication's row filter (PostgreSQL 15+), as the server deparsed it: only rows
    /// for which it is true are read.
    pub row_filter: Option<String>,
    /// Columns the publication's column list leaves out: in no event (not in `columns`).
    pub unpublished: Vec<String>,
}

/// The data format of a snapshot `COPY`: text, or binary (see [`super::copy_binary`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyFormat {
    Text,
    Binary,
}

impl CopyFormat {
    fn options(self) -> &'static str {
        match self {
            CopyFormat::Text => "",
            CopyFormat::Binary => " (FORMAT binary)",
        }
    }
}

impl TableInfo {
    /// The `COPY … TO STDOUT` that reads the table's columns in attribute order. A partitioned
    /// table has no rows of its own: it is read through a query.
    pub fn copy_sql(&self, format: CopyFormat) -> String {
        self.copy(None, format)
    }

    /// The `COPY … TO STDOUT` that reads the rows stored in pages `from` up to (not
    /// including) `to`, or to the end; PostgreSQL 14+ reads just those pages (a TID range
    /// scan). Not for partitioned tables, whose row addresses repeat across partitions.
    pub fn copy_pages_sql(&self, from: u64, to: Option<u64>, format: CopyFormat) -> String {
        self.copy(Some((from, to)), format)
    }

    /// `COPY table (columns)` when that reads the rows wanted, else `COPY (SELECT …)` (page
    /// ranges, the publication's row filter, partitioned tables, and generated columns,
    /// which `COPY table (columns)` refuses on every version).
    /// `COPY table TO` reads the table's own rows, but a `SELECT` from an inheritance parent
    /// reads its children's rows too, which are published as tables of their own: so
    /// `FROM ONLY`, except for a partitioned table, whose rows are all in its partitions.
    fn copy(&self, pages: Option<(u64, Option<u64>)>, format: CopyFormat) -> String {
        let cols = self.column_list();
        let options = format.options();
        let mut conditions = Vec::new();
        if let Some((from, to)) = pages {
            conditions.push(format!("ctid >= '({from},0)'::tid"));
            if let Some(to) = to {
                conditions.push(format!("ctid < '({to},0)'::tid"));
            }
        }
        if let Some(filter) = &self.row_filter {
            conditions.push(format!("({filter})"));
        }
        if conditions.is_empty() && !self.partitioned && !self.reads_generated() {
            return format!("COPY {} ({cols}) TO STDOUT{options}", self.name);
        }
        let only = if self.partitioned { "" } else { "ONLY " };
        let filter = if conditions.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conditions.join(" AND "))
        };
        format!(
            "COPY (SELECT {cols} FROM {only}{}{filter}) TO STDOUT{options}",
            self.name
        )
    }

    /// Whether a column read is a generated one.
    fn reads_generated(&self) -> bool {
        self.columns.iter().any(|(name, _)| {
            self.attributes
                .iter()
                .any(|a| a.generated && &a.name == name)
        })
    }

    fn column_list(&self) -> String {
        self.columns
            .iter()
            .map(|(n, _)| quote_ident(n))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Server facts checked at start.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub version_num: u32,
    pub database: String,
    pub role: String,
}

/// Checks `wal_level` and the REPLICATION attribute.
pub async fn check_server(client: &Client) -> Result<ServerInfo, PreflightError> {
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'), current_setting('server_version_num')::int4, \
             current_database()::text, current_user::text, \
             (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user)",
            &[],
        )
        .await?;
    let wal_level: String = row.get(0);
    let version_num: i32 = row.get(1);
    let info = ServerInfo {
        version_num: u32::try_from(version_num).unwrap_or(0),
        database: row.get(2),
        role: row.get(3),
    };
    if wal_level != "logical" {
        return Err(PreflightError::WalLevel(wal_level));
    }
    let can_replicate: Option<bool> = row.get(4);
    if can_replicate != Some(true) {
        return Err(PreflightError::NoReplication(info.role));
    }
    Ok(info)
}

/// A table's columns (`$1`: its OID) in attribute order: name, type, whether stored
/// generated. Virtual generated columns (PostgreSQL 18) are never published.
pub const ATTRIBUTES_SQL: &str = "SELECT attname::text, atttypid, attgenerated = 's' \
     FROM pg_attribute \
     WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped AND attgenerated IN ('', 's') \
     ORDER BY attnum";

/// Looks up tables, their columns, keys and privileges.
pub async fn describe_tables(
    client: &Client,
    names: &[TableName],
) -> Result<Vec<TableInfo>, PreflightError> {
    let mut out = Vec::with_capacity(names.len());
    for t in names {
        let row = client
            .query_opt(
                "SELECT c.oid, c.relkind::text, c.relreplident::text, \
                        has_table_privilege(c.oid, 'SELECT'), current_user::text \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2",
                &[&t.schema, &t.name],
            )
            .await?
            .ok_or_else(|| PreflightError::NoSuchTable(t.clone()))?;
        let oid: u32 = row.get(0);
        let relkind: String = row.get(1);
        let replident: String = row.get(2);
        let can_select: bool = row.get(3);
        if relkind != "r" && relkind != "p" {
            return Err(PreflightError::NotATable(t.clone()));
        }
        if !can_select {
            return Err(PreflightError::NoSelect {
                role: row.get(4),
                table: t.clone(),
            });
        }
        let attributes: Vec<Attribute> = client
            .query(ATTRIBUTES_SQL, &[&oid])
            .await?
            .iter()
            .map(|r| Attribute {
                name: r.get(0),
                type_oid: r.get(1),
                generated: r.get(2),
            })
            .collect();
        // Generated columns only when the publication publishes them (see `restrict`).
        let columns = attributes
            .iter()
            .filter(|a| !a.generated)
            .map(|a| (a.name.clone(), a.type_oid))
            .collect();
        let key = table_key(client, oid).await?;
        match replident.as_str() {
            "d" if !key.has_pk => return Err(PreflightError::NoIdentity(t.clone(), "DEFAULT")),
            "n" => return Err(PreflightError::NoIdentity(t.clone(), "NOTHING")),
            "i" if key.identity_index_gone => {
                return Err(PreflightError::NoIdentity(
                    t.clone(),
                    "USING INDEX of an index that no longer exists",
                ))
            }
            _ => {}
        }
        let key = key.columns;
        if key.is_empty() {
            tracing::warn!(table = %t, "table has REPLICA IDENTITY FULL and no primary key: its events get a null Kafka key, so per-row ordering across partitions is not guaranteed (add a primary key for keyed events)");
        }
        out.push(TableInfo {
            partitioned: relkind == "p",
            row_filter: None,
            unpublished: Vec::new(),
            oid,
            name: t.clone(),
            columns,
            attributes,
            key,
        });
    }
    Ok(out)
}

/// What a publication publishes of one table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Published {
    /// The published columns (PostgreSQL 15+ lists them, with or without a column list);
    /// `None`: every column.
    pub columns: Option<Vec<String>>,
    /// The row filter, as `pg_get_expr` deparses it.
    pub row_filter: Option<String>,
    /// Generated columns among `columns` are published (PostgreSQL 18+: with
    /// `publish_generated_columns = stored`, or named in the column list). Before 18
    /// pgoutput never sends them — and 15's `pg_publication_tables` lists them anyway.
    pub generated: bool,
}

/// What `publication` publishes of `table`, or `None` when it does not publish it. Column
/// lists and row filters exist since PostgreSQL 15 (`pg_publication_tables.attnames`,
/// `.rowfilter`); before, a publication publishes whole tables. For a partitioned table
/// published through its root, the root's list and filter are the ones that apply.
pub async fn published(
    client: &Client,
    publication: &str,
    table: &TableName,
) -> Result<Option<Published>, PreflightError> {
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await?
        .get(0);
    let sql = if version >= 150_000 {
        "SELECT attnames::text[], rowfilter FROM pg_publication_tables \
         WHERE pubname = $1 AND schemaname = $2 AND tablename = $3"
    } else {
        "SELECT NULL::text[], NULL::text FROM pg_publication_tables \
         WHERE pubname = $1 AND schemaname = $2 AND tablename = $3"
    };
    let row = client
        .query_opt(sql, &[&publication, &table.schema, &table.name])
        .await?;
    Ok(row.map(|r| Published {
        columns: r.get(0),
        row_filter: r.get(1),
        generated: version >= 180_000,
    }))
}

impl TableInfo {
    /// Narrows the table to what `p` publishes: its columns, its rows. Refuses a column list
    /// that leaves out a key column, naming the statements that fix it.
    pub fn restrict(&mut self, publication: &str, p: Published) -> Result<(), PreflightError> {
        self.row_filter = p.row_filter;
        let Some(names) = p.columns else {
            return Ok(());
        };
        // The stored generated columns the publication publishes, and the others it lists.
        let all: Vec<(String, u32)> = self
            .attributes
            .iter()
            .filter(|a| !a.generated || (p.generated && names.contains(&a.name)))
            .map(|a| (a.name.clone(), a.type_oid))
            .collect();
        let (columns, unpublished): (Vec<_>, Vec<_>) =
            all.iter().cloned().partition(|(c, _)| names.contains(c));
        self.columns = columns;
        self.unpublished = unpublished.into_iter().map(|(c, _)| c).collect();
        let missing: Vec<&String> = self.key.iter().filter(|k| !names.contains(k)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let wanted: Vec<String> = all
            .iter()
            .filter(|(c, _)| names.contains(c) || self.key.contains(c))
            .map(|(c, _)| quote_ident(c))
            .collect();
        let filter = self
            .row_filter
            .as_ref()
            .map_or(String::new(), |f| format!(" WHERE ({f})"));
        let publication_q = quote_ident(publication);
        Err(PreflightError::KeyNotPublished {
            publication: publication.to_string(),
            table: self.name.clone(),
            missing: missing
                .iter()
                .map(|k| quote_ident(k))
                .collect::<Vec<_>>()
                .join(", "),
            fix: format!(
                "ALTER PUBLICATION {publication_q} DROP TABLE {t}; \
                 ALTER PUBLICATION {publication_q} ADD TABLE {t} ({cols}){filter};",
                t = self.name,
                cols = wanted.join(", ")
            ),
        })
    }
}

/// [`describe_tables`], narrowed to what `publication` publishes of each (see [`published`]):
/// the tables the snapshot reads.
pub async fn describe_published(
    client: &Client,
    publication: &str,
    names: &[TableName],
) -> Result<Vec<TableInfo>, PreflightError> {
    let mut tables = describe_tables(client, names).await?;
    for t in &mut tables {
        if let Some(p) = published(client, publication, &t.name).await? {
            t.restrict(publication, p)?;
            // PostgreSQL 15+ lists every column when there is no column list: say something
            // only when part of the table is left out.
            if !t.unpublished.is_empty() || t.row_filter.is_some() {
                tracing::info!(table = %t.name, left_out = ?t.unpublished, row_filter = ?t.row_filter, "the publication publishes part of this table: the snapshot reads that part");
            }
        }
    }
    Ok(tables)
}

/// A publication's definition as pgcdc read it (see [`publication_state`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicationSeen {
    pub name: String,
    pub state: String,
}

impl PublicationSeen {
    /// Whether the publication existed when read.
    pub fn exists(&self) -> bool {
        !self.state.starts_with("[null")
    }
}

/// The definition of `publication` as one text: its `pg_publication` row, its
/// `pg_publication_rel` rows (tables, column lists, row filters) and, on PostgreSQL 15+, its
/// `pg_publication_namespace` rows (`FOR TABLES IN SCHEMA`), each as `to_jsonb` of the whole
/// row (the columns differ between versions). Read in a transaction, catalog rows are those
/// its snapshot sees: the snapshot compares its consistent point's with what pgcdc read at
/// start (see [`crate::source::snapshot`]).
pub async fn publication_state(
    client: &Client,
    publication: &str,
) -> Result<PublicationSeen, tokio_postgres::Error> {
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await?
        .get(0);
    let schemas = if version >= 150_000 {
        "(SELECT jsonb_agg(to_jsonb(n) ORDER BY n.oid) FROM pg_publication_namespace n \
          WHERE n.pnpubid = (SELECT oid FROM p))"
    } else {
        "NULL::jsonb"
    };
    let sql = format!(
        "WITH p AS (SELECT * FROM pg_publication WHERE pubname = $1) \
         SELECT jsonb_build_array( \
             (SELECT to_jsonb(p) FROM p), \
             (SELECT jsonb_agg(to_jsonb(r) ORDER BY r.oid) FROM pg_publication_rel r \
              WHERE r.prpubid = (SELECT oid FROM p)), \
             {schemas})::text"
    );
    let row = client.query_one(&sql, &[&publication]).await?;
    Ok(PublicationSeen {
        name: publication.to_string(),
        state: row.get(0),
    })
}

/// The Kafka key of a table, and what it rests on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableKey {
    /// Key columns in key (index) order; empty: no key.
    pub columns: Vec<String>,
    pub has_pk: bool,
    /// `REPLICA IDENTITY USING INDEX` whose index no longer exists: PostgreSQL then logs no
    /// old row at all, as with NOTHING.
    pub identity_index_gone: bool,
}

/// The Kafka key of table `oid`: the columns of its replica identity index under `REPLICA
/// IDENTITY USING INDEX`, else its primary key (DEFAULT and FULL), else none.
///
/// Why the replica identity first: it is what the old-row tuple of every update and delete
/// carries (pgoutput sends only those columns), and its columns are NOT NULL, so it is in
/// every snapshot row, insert, update and delete. A primary key outside it would be null in
/// deletes. Under FULL the old row has every column, and the primary key is the row's name.
pub async fn table_key(client: &Client, oid: u32) -> Result<TableKey, PreflightError> {
    let replident: Option<String> = client
        .query_opt(
            "SELECT relreplident::text FROM pg_class WHERE oid = $1",
            &[&oid],
        )
        .await?
        .map(|r| r.get(0));
    let key_rows = client
        .query(
            "SELECT a.attname::text, i.indisprimary, i.indisreplident FROM pg_index i \
             CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE i.indrelid = $1 AND (i.indisprimary OR i.indisreplident) \
             ORDER BY k.ord",
            &[&oid],
        )
        .await?;
    let columns = |flag: usize| -> Vec<String> {
        key_rows
            .iter()
            .filter(|r| r.get::<_, bool>(flag))
            .map(|r| r.get(0))
            .collect()
    };
    let (pk, identity) = (columns(1), columns(2));
    let by_index = replident.as_deref() == Some("i");
    Ok(TableKey {
        has_pk: !pk.is_empty(),
        identity_index_gone: by_index && identity.is_empty(),
        columns: if by_index && !identity.is_empty() {
            identity
        } else {
            pk
        },
    })
}

/// Makes sure the publication exists and covers `requested` (created when missing), and
/// returns the tables to capture: `requested`, or every table of the publication.
///
/// Publications are created with `publish_via_partition_root`, so a partitioned table's
/// changes arrive under its own name, like its snapshot rows.
pub async fn ensure_publication(
    client: &Client,
    publication: &str,
    requested: &[TableName],
) -> Result<Vec<TableName>, PreflightError> {
    let row = client
        .query_opt(
            "SELECT pubinsert, pubupdate, pubdelete, pubviaroot FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await?;
    let Some(row) = row else {
        if requested.is_empty() {
            return Err(PreflightError::NoPublication(publication.to_string()));
        }
        let tables = requested
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "CREATE PUBLICATION {} FOR TABLE {tables} WITH (publish_via_partition_root = true)",
            quote_ident(publication)
        );
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| PreflightError::CreatePublication {
                publication: publication.to_string(),
                tables: tables.clone(),
                cause: e
                    .as_db_error()
                    .map(|d| d.message().to_string())
                    .unwrap_or_else(|| e.to_string()),
            })?;
        tracing::info!(publication, %tables, "created publication");
        return Ok(requested.to_vec());
    };
    let missing_ops: Vec<&str> = [("inserts", 0), ("updates", 1), ("deletes", 2)]
        .iter()
        .filter(|(_, i)| !row.get::<_, bool>(*i))
        .map(|(n, _)| *n)
        .collect();
    if !missing_ops.is_empty() {
        return Err(PreflightError::PublicationOps(
            publication.to_string(),
            missing_ops.join(", "),
        ));
    }
    let published: Vec<TableName> = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1, 2",
            &[&publication],
        )
        .await?
        .iter()
        .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect();
    if !row.get::<_, bool>(3) {
        let partitioned = client
            .query_opt(
                "SELECT n.nspname::text, c.relname::text FROM pg_publication_rel pr \
                 JOIN pg_publication p ON p.oid = pr.prpubid \
                 JOIN pg_class c ON c.oid = pr.prrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE p.pubname = $1 AND c.relkind = 'p' LIMIT 1",
                &[&publication],
            )
            .await?;
        if let Some(r) = partitioned {
            return Err(PreflightError::PartitionRoot(
                publication.to_string(),
                TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
            ));
        }
    }
    if requested.is_empty() {
        if published.is_empty() {
            return Err(PreflightError::EmptyPublication(publication.to_string()));
        }
        return Ok(published);
    }
    let missing: Vec<String> = requested
        .iter()
        .filter(|t| !published.contains(t))
        .map(ToString::to_string)
        .collect();
    if !missing.is_empty() {
        return Err(PreflightError::PublicationMissingTables {
            publication: publication.to_string(),
            missing: missing.join(", "),
        });
    }
    Ok(requested.to_vec())
}

/// A replication slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone)]
pub struct SlotInfo {
    pub confirmed_flush: Lsn,
    /// PostgreSQL invalidated the slot: the WAL (`wal_status` `lost`) or the catalog rows
    /// (a conflict on a standby, 16+) it needed are gone, or it timed out (18+). It can no
    /// longer be read.
    pub invalidated: bool,
}

/// Looks up `slot` and rejects slots pgcdc cannot use.
pub async fn inspect_slot(
    client: &Client,
    slot: &str,
    database: &str,
) -> Result<Option<SlotInfo>, PreflightError> {
    // The view as JSON: the columns that say a slot is invalidated differ by version
    // (`wal_status` 13+, `conflicting` 16+, `invalidation_reason` 17+).
    let Some(row) = client
        .query_opt(
            "SELECT coalesce(plugin::text, ''), coalesce(database::text, ''), active, \
                    coalesce(active_pid, 0), confirmed_flush_lsn, \
                    coalesce(s.wal_status, ''), \
                    coalesce((to_jsonb(s) ->> 'conflicting')::bool, false), \
                    to_jsonb(s) ->> 'invalidation_reason' \
             FROM pg_replication_slots s WHERE slot_name = $1",
            &[&slot],
        )
        .await?
    else {
        return Ok(None);
    };
    let plugin: String = row.get(0);
    let db: String = row.get(1);
    let active: bool = row.get(2);
    let pid: i32 = row.get(3);
    let confirmed: Option<Lsn> = row.try_get(4)?;
    let wal_status: String = row.get(5);
    let conflicting: bool = row.get(6);
    let invalidation: Option<String> = row.get(7);
    if plugin != "pgoutput" {
        return Err(PreflightError::SlotPlugin {
            slot: slot.into(),
            plugin,
        });
    }
    if db != database {
        return Err(PreflightError::SlotDatabase {
            slot: slot.into(),
            database: db,
        });
    }
    if active {
        return Err(PreflightError::SlotActive {
            slot: slot.into(),
            pid,
        });
    }
    Ok(Some(SlotInfo {
        confirmed_flush: confirmed.unwrap_or(Lsn::INVALID),
        invalidated: wal_status == "lost" || conflicting || invalidation.is_some(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names() {
        let t: TableName = "public.orders".parse().unwrap();
        assert_eq!(t, TableName::new("public", "orders"));
        let t: TableName = "Orders".parse().unwrap();
        assert_eq!(t, TableName::new("public", "orders"));
        let t: TableName = r#""My Schema"."Or""ders""#.parse().unwrap();
        assert_eq!(t, TableName::new("My Schema", "Or\"ders"));
        assert_eq!(t.to_string(), r#""My Schema"."Or""ders""#);
        for bad in ["", ".", "a.", ".b", "a.b.c", "a b", "\"x", "a.\"b"] {
            assert!(bad.parse::<TableName>().is_err(), "{bad:?}");
        }
    }

    fn attribute(name: &str, type_oid: u32, generated: bool) -> Attribute {
        Attribute {
            name: name.into(),
            type_oid,
            generated,
        }
    }

    fn info(partitioned: bool) -> TableInfo {
        TableInfo {
            oid: 1,
            name: TableName::new("public", "user"),
            columns: vec![("order".into(), 23), ("Mixed \"Case\"".into(), 25)],
            attributes: vec![
                attribute("order", 23, false),
                attribute("Mixed \"Case\"", 25, false),
            ],
            key: vec!["order".into()],
            partitioned,
            row_filter: None,
            unpublished: Vec::new(),
        }
    }

    #[test]
    fn copy_statements_quote_every_name_and_read_only_the_tables_own_rows() {
        let t = info(false);
        let cols = r#""order", "Mixed ""Case""""#;
        assert_eq!(
            t.copy_sql(CopyFormat::Text),
            format!(r#"COPY "public"."user" ({cols}) TO STDOUT"#)
        );
        assert_eq!(
            t.copy_pages_sql(8, Some(16), CopyFormat::Binary),
            format!(
                r#"COPY (SELECT {cols} FROM ONLY "public"."user" WHERE ctid >= '(8,0)'::tid AND ctid < '(16,0)'::tid) TO STDOUT (FORMAT binary)"#
            )
        );
        assert_eq!(
            t.copy_pages_sql(16, None, CopyFormat::Text),
            format!(
                r#"COPY (SELECT {cols} FROM ONLY "public"."user" WHERE ctid >= '(16,0)'::tid) TO STDOUT"#
            )
        );
        assert_eq!(
            info(true).copy_sql(CopyFormat::Binary),
            format!(r#"COPY (SELECT {cols} FROM "public"."user") TO STDOUT (FORMAT binary)"#)
        );
    }

    #[test]
    fn a_publication_narrows_columns_and_rows_and_must_keep_the_key() {
        let mut t = info(false);
        t.columns.push(("secret".into(), 25));
        t.attributes.push(attribute("secret", 25, false));
        let published = Published {
            columns: Some(vec!["order".into(), "Mixed \"Case\"".into()]),
            row_filter: Some("(\"order\" > 5)".into()),
            generated: false,
        };
        t.restrict("p", published.clone()).unwrap();
        assert_eq!(t.unpublished, ["secret"]);
        let cols = r#""order", "Mixed ""Case""""#;
        let from = r#"FROM ONLY "public"."user""#;
        assert_eq!(
            t.copy_sql(CopyFormat::Text),
            format!(r#"COPY (SELECT {cols} {from} WHERE (("order" > 5))) TO STDOUT"#)
        );
        assert_eq!(
            t.copy_pages_sql(0, Some(8), CopyFormat::Binary),
            format!(
                r#"COPY (SELECT {cols} {from} WHERE ctid >= '(0,0)'::tid AND ctid < '(8,0)'::tid AND (("order" > 5))) TO STDOUT (FORMAT binary)"#
            )
        );
        let mut p = info(true);
        p.restrict("p", published).unwrap();
        assert_eq!(
            p.copy_sql(CopyFormat::Text),
            format!(r#"COPY (SELECT {cols} FROM "public"."user" WHERE (("order" > 5))) TO STDOUT"#)
        );

        // Every column, every row: as without a publication.
        let mut whole = info(false);
        whole.restrict("p", Published::default()).unwrap();
        assert_eq!(
            whole.copy_sql(CopyFormat::Text),
            info(false).copy_sql(CopyFormat::Text)
        );

        let mut keyless = info(false);
        let err = keyless
            .restrict(
                "my pub",
                Published {
                    columns: Some(vec!["Mixed \"Case\"".into()]),
                    row_filter: Some("true".into()),
                    generated: false,
                },
            )
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(r#"key column(s) "order""#), "{msg}");
        assert!(
            msg.contains(&format!(
                r#"ALTER PUBLICATION "my pub" ADD TABLE "public"."user" ({cols}) WHERE (true);"#
            )),
            "{msg}"
        );
    }

    #[test]
    fn generated_columns_are_read_when_published_and_through_a_query() {
        let mut t = info(false);
        // As `describe_tables` leaves it: the generated column known, not read.
        t.attributes.insert(1, attribute("twice", 23, true));
        let listed = |generated| Published {
            columns: Some(vec![
                "order".into(),
                "twice".into(),
                "Mixed \"Case\"".into(),
            ]),
            row_filter: None,
            generated,
        };
        // PostgreSQL 15 lists it, but pgoutput before 18 never sends it.
        let mut before_18 = t.clone();
        before_18.restrict("p", listed(false)).unwrap();
        assert_eq!(before_18.columns, info(false).columns);
        assert_eq!(
            before_18.copy_sql(CopyFormat::Text),
            info(false).copy_sql(CopyFormat::Text)
        );
        // 18, published: read, in attribute order, with a query (`COPY t (twice)` is refused).
        let mut t18 = t.clone();
        t18.restrict("p", listed(true)).unwrap();
        let names: Vec<&str> = t18.columns.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["order", "twice", "Mixed \"Case\""]);
        assert_eq!(
            t18.copy_sql(CopyFormat::Text),
            r#"COPY (SELECT "order", "twice", "Mixed ""Case""" FROM ONLY "public"."user") TO STDOUT"#
        );
        // 18, not published: as before.
        let mut not_listed = t;
        not_listed
            .restrict(
                "p",
                Published {
                    columns: Some(vec!["order".into(), "Mixed \"Case\"".into()]),
                    row_filter: None,
                    generated: true,
                },
            )
            .unwrap();
        assert_eq!(not_listed.columns, info(false).columns);
        assert!(not_listed.unpublished.is_empty());
    }

    #[test]
    fn column_refs() {
        let c: ColumnRef = "public.Users.email".parse().unwrap();
        assert_eq!(c.table, TableName::new("public", "users"));
        assert_eq!(c.column, "email");
        let c: ColumnRef = r#"users."E Mail""#.parse().unwrap();
        assert_eq!(c.table, TableName::new("public", "users"));
        assert_eq!(c.column, "E Mail");
        assert_eq!(c.to_string(), r#""public"."users"."E Mail""#);
        for bad in ["", "users", "a.b.c.d", "a..b", "a.b c"] {
            assert!(bad.parse::<ColumnRef>().is_err(), "{bad:?}");
        }
    }
}
