//! The generator: from a seed, a hostile-but-legal schema, a pgcdc configuration and a
//! workload, all as plain data ([`Case`]) that prints as the SQL it runs.
//!
//! Hostile means every shape PostgreSQL accepts and a connector may get wrong: identifiers
//! that are keywords (`order`, `user`), mixed case, spaces, quotes, dots, non-ASCII and
//! 63 bytes long; keys of several types (int, bigint, text, uuid, composite, a 2–3 KB
//! incompressible text stored out of line); every replica identity (DEFAULT with a primary
//! key, FULL with and without one, USING INDEX on a unique index that is or is not beside a
//! primary key); partitioned tables, inheritance parents with children; publications with
//! column lists and row filters (PostgreSQL 15+); TOASTed values that updates leave
//! unchanged; DDL, truncates, restarts and `kill -9` mid-stream; tables joining and leaving
//! the publication.
//!
//! Values are SQL expressions of a row number `g` (`'k' || g`, `md5(...)`), so a prefill of
//! thousands of rows is one `INSERT … SELECT … FROM generate_series` and a workload insert is
//! the same expression with a literal number: deterministic, and readable when printed.
//!
//! Shapes that trigger a bug someone is fixing are generated only when that bug is enabled
//! ([`Bug`], `PGCDC_INTEGRITY_BUGS`), so the default run stays green while it is open.

use std::collections::{BTreeSet, HashSet};
use std::fmt::Write as _;

use crate::common::rng::Rng;

/// Always-quoted identifier (every identifier here is generated to need it sometimes).
pub fn q(id: &str) -> String {
    format!("\"{}\"", id.replace('"', "\"\""))
}

/// A string literal (standard_conforming_strings is on).
pub fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Known bugs, each with the shapes that trigger it. A shape is generated only when its bug
/// is enabled; remove a bug from [`OPEN_BUGS`] when its fix lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Bug {
    /// Identifiers that are SQL keywords (`order`, `user`, `current_date`) are not quoted:
    /// the snapshot fails, or reads the SQL function (`user` → "postgres").
    KeywordNames,
    /// The snapshot ignores a publication's column lists and row filters.
    PublicationFilters,
    /// A primary key beside REPLICA IDENTITY USING INDEX on another index: the key is the
    /// primary key, so deletes (whose old row has only the index columns) get a null key.
    UsingIndexKey,
    /// A TOASTed text key that an update leaves unchanged is not sent: null key.
    ToastKey,
    /// A table added to the publication while pgcdc was stopped is never snapshotted.
    AddedWhileStopped,
    /// An inheritance parent read by page ranges (`--snapshot-workers 2`, > 8 MB) includes
    /// its children's rows.
    InheritPages,
    /// A rewrite (ALTER … TYPE) committed right after the snapshot's consistent point makes
    /// the table look empty to the snapshot.
    RewriteAfterPoint,
    /// DDL (or TRUNCATE) while the snapshot runs: a column dropped or renamed after pgcdc
    /// read the catalog failed the snapshot (exit 3, "column … does not exist"); with
    /// `--snapshot-workers 2`, a statement that needs ACCESS EXCLUSIVE queued behind the
    /// coordinator's ACCESS SHARE lock while a worker's COPY queued behind it: pgcdc, the
    /// statement and every later query of the table hung (a deadlock PostgreSQL cannot see).
    /// While it is open, the runner holds such statements until pgcdc streams; its shapes are
    /// DDL steps and a column DDL the moment the slot exists.
    DdlDuringSnapshot,
    /// PostgreSQL 18, `publish_generated_columns = stored` or a column list naming a stored
    /// generated column: the stream carries generated columns, the snapshot left them out
    /// (rows not changed since lacked them).
    GeneratedColumns18,
}

impl Bug {
    pub const ALL: [Bug; 9] = [
        Bug::KeywordNames,
        Bug::PublicationFilters,
        Bug::UsingIndexKey,
        Bug::ToastKey,
        Bug::AddedWhileStopped,
        Bug::InheritPages,
        Bug::RewriteAfterPoint,
        Bug::DdlDuringSnapshot,
        Bug::GeneratedColumns18,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Bug::KeywordNames => "keyword_names",
            Bug::PublicationFilters => "publication_filters",
            Bug::UsingIndexKey => "using_index_key",
            Bug::ToastKey => "toast_key",
            Bug::AddedWhileStopped => "added_while_stopped",
            Bug::InheritPages => "inherit_pages",
            Bug::RewriteAfterPoint => "rewrite_after_point",
            Bug::DdlDuringSnapshot => "ddl_during_snapshot",
            Bug::GeneratedColumns18 => "generated_columns_18",
        }
    }
}

/// Bugs not fixed yet: their shapes are left out unless enabled.
pub const OPEN_BUGS: &[Bug] = &[];

/// What the generator may produce.
#[derive(Debug, Clone)]
pub struct Config {
    /// PostgreSQL major version of the cluster.
    pub major: u32,
    /// Shapes of these open bugs are generated too.
    pub enabled: BTreeSet<Bug>,
    /// Scale of the workload (1 = CI size).
    pub scale: u32,
}

impl Config {
    pub fn new(major: u32) -> Config {
        Config {
            major,
            enabled: BTreeSet::new(),
            scale: 1,
        }
    }

    /// Whether shapes of `bug` may be generated.
    pub fn allows(&self, bug: Bug) -> bool {
        !OPEN_BUGS.contains(&bug) || self.enabled.contains(&bug)
    }

    /// `PGCDC_INTEGRITY_BUGS`: `all`, or bug names separated by commas.
    pub fn enable_from_env(&mut self) {
        let Ok(v) = std::env::var("PGCDC_INTEGRITY_BUGS") else {
            return;
        };
        for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if part == "all" {
                self.enabled.extend(Bug::ALL);
            } else if let Some(b) = Bug::ALL.iter().find(|b| b.name() == part) {
                self.enabled.insert(*b);
            } else {
                panic!(
                    "PGCDC_INTEGRITY_BUGS: unknown bug {part:?}; known: all, {}",
                    Bug::ALL.map(Bug::name).join(", ")
                );
            }
        }
    }
}

/// Column types. Every value is an expression of the row number `g`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ty {
    Int4,
    Int8,
    Text,
    Varchar(u32),
    Numeric,
    Timestamptz,
    Jsonb,
    Bytea,
    TextArr,
    Int4Arr,
    Bool,
    Uuid,
    Date,
    Float8,
}

impl Ty {
    pub fn sql(&self) -> String {
        match self {
            Ty::Int4 => "integer".into(),
            Ty::Int8 => "bigint".into(),
            Ty::Text => "text".into(),
            Ty::Varchar(n) => format!("varchar({n})"),
            Ty::Numeric => "numeric".into(),
            Ty::Timestamptz => "timestamptz".into(),
            Ty::Jsonb => "jsonb".into(),
            Ty::Bytea => "bytea".into(),
            Ty::TextArr => "text[]".into(),
            Ty::Int4Arr => "integer[]".into(),
            Ty::Bool => "boolean".into(),
            Ty::Uuid => "uuid".into(),
            Ty::Date => "date".into(),
            Ty::Float8 => "double precision".into(),
        }
    }

    /// A data value for row number `g` (`salt` varies it between updates); NULL now and then.
    fn value(&self, g: &str, salt: u64, rng: &mut Rng) -> String {
        if rng.chance(8) {
            return "NULL".into();
        }
        let s = salt % 1000;
        match self {
            Ty::Int4 => format!("(({g}) * 7 + {s}) % 1000000000"),
            Ty::Int8 => format!("({g})::int8 * 3000000019 + {s}"),
            Ty::Text | Ty::Varchar(_) => {
                let v = *rng.pick(TEXT_VALUES);
                format!("{} || ({g}) || '-{s}'", lit(v))
            }
            Ty::Numeric => format!("(({g}) * 1.25 + {s}.5)::numeric"),
            Ty::Timestamptz => format!(
                "timestamptz '2024-02-29 12:34:56.789+05' + (({g}) * 3661 + {s}) * interval '1 second'"
            ),
            Ty::Jsonb => format!(
                "jsonb_build_object('g', {g}, 'salt', {s}, 'nested', jsonb_build_array(1.50, NULL, {}))",
                lit("q\"é")
            ),
            Ty::Bytea => format!("decode(md5(({g})::text || '{s}'), 'hex')"),
            Ty::TextArr => format!("ARRAY['a b', NULL, 'x' || ({g}), {}]", lit("q\"\\,{}")),
            Ty::Int4Arr => format!("ARRAY[({g})::int % 1000, NULL, {s}]"),
            Ty::Bool => format!("(({g}) + {s}) % 2 = 0"),
            Ty::Uuid => format!("md5(({g})::text || 'u{s}')::uuid"),
            Ty::Date => format!("date '2000-01-01' + (({g}) % 5000)::int + {s}"),
            Ty::Float8 => format!("(({g}) + {s})::float8 / 3"),
        }
    }

    /// A type change whose values keep their JSON form (`int` → `bigint`, …).
    fn widened(&self) -> Option<Ty> {
        match self {
            Ty::Int4 => Some(Ty::Int8),
            Ty::Varchar(_) => Some(Ty::Text),
            Ty::Text => Some(Ty::Varchar(400)),
            _ => None,
        }
    }
}

const TEXT_VALUES: &[&str] = &[
    "plain ",
    "it's \"quoted\" ",
    "back\\slash\ttab ",
    "héllo wörld ",
    "日本語 ",
    "🐘 ",
    "comma,{brace} ",
    "NULL",
    "",
];

const DATA_TYPES: &[Ty] = &[
    Ty::Int4,
    Ty::Int8,
    Ty::Text,
    Ty::Varchar(200),
    Ty::Numeric,
    Ty::Timestamptz,
    Ty::Jsonb,
    Ty::Bytea,
    Ty::TextArr,
    Ty::Int4Arr,
    Ty::Bool,
    Ty::Uuid,
    Ty::Date,
    Ty::Float8,
];

/// The shape of a table's key values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyShape {
    Int,
    Bigint,
    Text,
    Uuid,
    /// `(integer, text)`.
    Composite,
    /// A 2–2.6 KB incompressible text, stored out of line.
    ToastText,
}

/// What a column is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Part of the unique key values are generated for (`i`: position in the key).
    Key(usize),
    Data,
    /// A large incompressible text (TOASTed); updates often leave it unchanged.
    Big,
    /// ~1.4 KB of incompressible text stored in the row itself: makes a table big in pages.
    Pad,
    /// `GENERATED ALWAYS AS (expr) STORED`.
    Generated(String),
}

#[derive(Debug, Clone)]
pub struct Col {
    pub name: String,
    pub ty: Ty,
    pub role: Role,
    /// A generated column depends on it: never dropped or retyped.
    pub pinned: bool,
}

/// Replica identity and key constraints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    /// Primary key on the key columns, REPLICA IDENTITY DEFAULT.
    Default,
    /// Primary key, REPLICA IDENTITY FULL.
    FullWithPk,
    /// No key at all, REPLICA IDENTITY FULL: events have a null Kafka key.
    FullNoKey,
    /// A unique index on the key columns as REPLICA IDENTITY USING INDEX; with a primary key
    /// on a separate `id` column when `with_pk`.
    UsingIndex { with_pk: bool },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    Plain,
    /// `PARTITION BY HASH` on the first key column, with this many partitions.
    Partitioned(u32),
    /// An inheritance parent; its children are tables of their own (by index).
    Parent(Vec<usize>),
    /// An inheritance child of the table at this index.
    Child(usize),
}

/// DDL already applied, for the oracle: a key's last event may predate it.
#[derive(Debug, Clone, Default)]
pub struct DdlLog {
    pub added: Vec<String>,
    pub dropped: Vec<String>,
    /// (from, to)
    pub renamed: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct Table {
    pub schema: String,
    pub name: String,
    pub cols: Vec<Col>,
    pub key_shape: KeyShape,
    pub identity: Identity,
    /// Name of the `id` primary-key column of `UsingIndex { with_pk: true }`.
    pub pk_id: Option<String>,
    pub layout: Layout,
    /// Publication column list (own publication only).
    pub pub_cols: Option<Vec<String>>,
    /// Publication row filter (own publication only).
    pub row_filter: Option<String>,
    /// Rows inserted at setup.
    pub prefill: u64,
    /// Joins the publication later (not in it at setup).
    pub late: bool,
    /// Text appended to text keys, to make them hostile.
    pub key_suffix: String,
    // --- the generator's model while it writes the workload ---
    pub next: u64,
    pub live: u64,
    pub in_pub: bool,
    /// Left the publication: never written again.
    pub removed: bool,
    pub ddl: DdlLog,
}

impl Table {
    pub fn qname(&self) -> String {
        format!("{}.{}", q(&self.schema), q(&self.name))
    }

    /// `ONLY` where the table's own rows are meant (not a partitioned table's).
    fn only(&self) -> &'static str {
        match self.layout {
            Layout::Partitioned(_) => "",
            _ => "ONLY ",
        }
    }

    fn key_cols(&self) -> Vec<&Col> {
        let mut k: Vec<&Col> = self
            .cols
            .iter()
            .filter(|c| matches!(c.role, Role::Key(_)))
            .collect();
        k.sort_by_key(|c| match c.role {
            Role::Key(i) => i,
            _ => 0,
        });
        k
    }

    fn key_list(&self) -> String {
        self.key_cols()
            .iter()
            .map(|c| q(&c.name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Column `i` of the key for row number `g`.
    fn key_value(&self, i: usize, g: &str) -> String {
        match (self.key_shape, i) {
            (KeyShape::Int, _) => format!("({g})::int"),
            (KeyShape::Bigint, _) => format!("({g})::int8 * 1000000007"),
            (KeyShape::Text, _) => format!("'k' || ({g}) || {}", lit(&self.key_suffix)),
            (KeyShape::Uuid, _) => format!("md5({} || ({g}))::uuid", lit(&self.name)),
            (KeyShape::Composite, 0) => format!("({g})::int % 7"),
            (KeyShape::Composite, _) => format!("'c' || ({g}) || {}", lit(&self.key_suffix)),
            (KeyShape::ToastText, _) => format!(
                "({g}) || ':' || (SELECT string_agg(md5(({g}) || '/' || i), '') FROM generate_series(1, {}) i)",
                66 + (self.name.len() % 12)
            ),
        }
    }

    fn big_value(g: &str, salt: u64) -> String {
        format!(
            "(SELECT string_agg(md5(({g}) || '.' || i || '.{salt}'), '') FROM generate_series(1, {}) i)",
            100 + salt % 150
        )
    }

    /// Columns an insert writes and their values for row number `g`.
    fn insert_values(&self, g: &str, salt: u64, rng: &mut Rng) -> (Vec<String>, Vec<String>) {
        let mut cols = Vec::new();
        let mut vals = Vec::new();
        for c in &self.cols {
            let v = match &c.role {
                Role::Key(i) => self.key_value(*i, g),
                Role::Data => {
                    if Some(&c.name) == self.pk_id.as_ref() {
                        format!("({g})::int")
                    } else {
                        c.ty.value(g, salt, rng)
                    }
                }
                Role::Big => {
                    if rng.chance(10) {
                        "NULL".into()
                    } else {
                        Self::big_value(g, salt)
                    }
                }
                Role::Pad => format!(
                    "(SELECT string_agg(md5(({g}) || 'p' || i), '') FROM generate_series(1, 45) i)"
                ),
                Role::Generated(_) => continue,
            };
            cols.push(q(&c.name));
            vals.push(v);
        }
        (cols, vals)
    }

    /// `INSERT` of rows `from..to`.
    fn insert_sql(&self, from: u64, to: u64, rng: &mut Rng) -> String {
        let salt = rng.range(0, 1000);
        let (cols, vals) = self.insert_values("g", salt, rng);
        format!(
            "INSERT INTO {} ({}) SELECT {} FROM generate_series({from}, {}) g",
            self.qname(),
            cols.join(", "),
            vals.join(", "),
            to - 1
        )
    }

    /// A subquery selecting `n` existing rows, deterministic given the table's state.
    fn pick_rows(&self, n: u64, offset: u64) -> String {
        let key = self.key_list();
        let multi = self.key_cols().len() > 1;
        let lhs = if multi {
            format!("({key})")
        } else {
            key.clone()
        };
        format!(
            "{lhs} IN (SELECT {key} FROM {}{} ORDER BY {key} LIMIT {n} OFFSET {offset})",
            self.only(),
            self.qname()
        )
    }

    fn data_cols(&self) -> Vec<&Col> {
        self.cols
            .iter()
            .filter(|c| c.role == Role::Data && Some(&c.name) != self.pk_id.as_ref())
            .collect()
    }

    fn big_col(&self) -> Option<&Col> {
        self.cols.iter().find(|c| c.role == Role::Big)
    }
}

/// How pgcdc learns its tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PubMode {
    /// `--table` for each table; pgcdc creates the publication.
    Tables,
    /// The test creates publication `pub` (column lists, row filters); pgcdc runs with
    /// `--publication` and no `--table` (it follows tables joining the publication).
    Own,
    /// Own publication, and `--table` naming these tables (a subset).
    OwnSubset(Vec<usize>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    Kafka,
    /// `--sink stdout --progress-file …`
    Stdout,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopKind {
    /// SIGTERM: a graceful stop.
    Term,
    /// `kill -9`.
    Kill,
}

/// One step of the workload.
#[derive(Debug, Clone)]
pub enum Step {
    /// One transaction; `what` summarizes it. `ddl`: it takes an ACCESS EXCLUSIVE lock
    /// or changes columns (see [`Bug::DdlDuringSnapshot`]).
    Sql {
        sql: Vec<String>,
        what: String,
        ddl: bool,
        /// Run only once pgcdc streams: a table leaving the publication must have been
        /// snapshotted, or its topic cannot hold the table as it was then.
        settle: bool,
    },
    /// Stop pgcdc (the following steps run while it is stopped, until [`Step::Start`]).
    Stop(StopKind),
    Start,
    /// Stop and start again at once.
    Restart(StopKind),
    /// Let pgcdc work for a while.
    Pause(u64),
}

/// Everything one run does.
#[derive(Debug, Clone)]
pub struct Case {
    pub seed: u64,
    pub major: u32,
    pub tables: Vec<Table>,
    /// The schema, the prefill and (own mode) the publication.
    pub setup: Vec<String>,
    pub pub_mode: PubMode,
    /// PostgreSQL 18: `publish_generated_columns = stored` on the own publication.
    pub publish_generated: bool,
    pub sink: Sink,
    pub snapshot_workers: u32,
    /// DDL run the moment the slot exists, racing the snapshot.
    pub right_after_slot: Option<String>,
    pub steps: Vec<Step>,
    /// Bugs whose shapes this case contains.
    pub shapes: BTreeSet<Bug>,
}

impl Case {
    /// Tables pgcdc captures at the end (by index).
    pub fn captured(&self) -> Vec<usize> {
        match &self.pub_mode {
            PubMode::Tables => (0..self.tables.len())
                .filter(|&i| !matches!(self.tables[i].layout, Layout::Child(_)))
                .collect(),
            PubMode::OwnSubset(s) => s.clone(),
            PubMode::Own => (0..self.tables.len())
                .filter(|&i| {
                    let t = &self.tables[i];
                    t.in_pub || t.removed
                })
                .collect(),
        }
    }

    /// The `--table` values, if any.
    pub fn table_flags(&self) -> Vec<String> {
        let list: Vec<usize> = match &self.pub_mode {
            PubMode::Tables => self.captured(),
            PubMode::OwnSubset(s) => s.clone(),
            PubMode::Own => Vec::new(),
        };
        list.iter().map(|&i| self.tables[i].qname()).collect()
    }

    /// What a failing case prints: the options, the schema SQL and the workload.
    pub fn describe(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "PostgreSQL {}; publication: {:?}; sink: {:?}; --snapshot-workers {}{}; shapes of known bugs: {:?}",
            self.major,
            self.pub_mode,
            self.sink,
            self.snapshot_workers,
            if self.publish_generated {
                "; publish_generated_columns = stored"
            } else {
                ""
            },
            self.shapes
        );
        let _ = writeln!(o, "-- schema and prefill");
        for s in &self.setup {
            let _ = writeln!(o, "{};", shorten(s, 400));
        }
        if let Some(d) = &self.right_after_slot {
            let _ = writeln!(o, "-- the moment the slot exists:\n{d};");
        }
        let _ = writeln!(o, "-- workload ({} steps)", self.steps.len());
        for (i, s) in self.steps.iter().enumerate() {
            match s {
                Step::Sql { sql, what, .. } => {
                    let _ = writeln!(o, "{i:>3}. {what}");
                    if sql.len() == 1 && what.starts_with("DDL") {
                        let _ = writeln!(o, "       {}", shorten(&sql[0], 200));
                    }
                }
                other => {
                    let _ = writeln!(o, "{i:>3}. {other:?}");
                }
            }
        }
        o
    }
}

pub fn shorten(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len())
}

// --- identifiers ------------------------------------------------------------------------------

const KEYWORDS: &[&str] = &[
    "order",
    "group",
    "user",
    "select",
    "table",
    "from",
    "where",
    "limit",
    "default",
    "check",
    "column",
    "desc",
    "primary",
    "end",
    "offset",
    "current_user",
    "session_user",
    "current_date",
    "current_timestamp",
    "localtime",
    "all",
    "case",
];

/// Names in one namespace (schema names, a schema's tables, a table's columns).
#[derive(Debug, Default)]
struct Names(HashSet<String>);

impl Names {
    /// A fresh identifier: plain, keyword, mixed case, spaces, quotes, dots, non-ASCII or
    /// exactly 63 bytes. `hostile` is the chance of anything but plain.
    fn fresh(&mut self, rng: &mut Rng, base: &str, hostile: u64, keywords: bool) -> String {
        for attempt in 0..100 {
            let n = self.0.len() + attempt;
            let name = if !rng.chance(hostile) {
                format!("{base}{n}")
            } else {
                match rng.range(0, 11) {
                    0 | 1 if keywords => rng.pick(KEYWORDS).to_string(),
                    0 | 1 => format!("{base}_kw{n}"),
                    2 => format!("{}{n}", capitalize(base)),
                    3 => format!("{base} {n} with spaces"),
                    4 => format!("we\"ird{n}"),
                    5 => format!("it's{n}"),
                    6 => format!("{base}.{n}"),
                    7 => format!("naïve_{base}_{n}_日本"),
                    8 => format!("🐘{n}"),
                    9 => long_name(base, n),
                    _ => format!("{n}{base}$%"),
                }
            };
            if self.0.insert(name.clone()) {
                return name;
            }
        }
        unreachable!("no fresh name in 100 attempts")
    }

    fn take(&mut self, name: &str) {
        self.0.insert(name.to_string());
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => format!("{}{}", f.to_uppercase(), c.as_str()).replace('_', "Of"),
        None => String::new(),
    }
}

/// Exactly 63 bytes (PostgreSQL's limit), non-ASCII included.
fn long_name(base: &str, n: usize) -> String {
    let mut s = format!("{base}{n}_");
    for c in "ÄÖÜ_long_identifier_äöü_".chars().cycle() {
        if s.len() + c.len_utf8() > 63 {
            break;
        }
        s.push(c);
    }
    while s.len() < 63 {
        s.push('x');
    }
    s
}

// --- schema -----------------------------------------------------------------------------------

struct Gen<'a> {
    cfg: &'a Config,
    rng: Rng,
    shapes: BTreeSet<Bug>,
}

/// Generates the case of `seed`.
pub fn generate(seed: u64, cfg: &Config) -> Case {
    let mut g = Gen {
        cfg,
        rng: Rng::new(seed),
        shapes: BTreeSet::new(),
    };
    let keywords = cfg.allows(Bug::KeywordNames);
    // Options first, so that the schema can depend on them.
    let filters_ok = cfg.major >= 15;
    let pub_roll = g.rng.range(0, 100);
    let own = pub_roll < 55;
    let sink = if g.rng.chance(20) {
        Sink::Stdout
    } else {
        Sink::Kafka
    };
    let snapshot_workers = if g.rng.chance(30) { 2 } else { 1 };

    let mut schemas = Names::default();
    schemas.take("public");
    let n_schemas = g.rng.range(1, 3);
    let mut schema_names: Vec<String> = Vec::new();
    for _ in 0..n_schemas {
        let s = if g.rng.chance(35) {
            "public".to_string()
        } else {
            schemas.fresh(&mut g.rng, "sch", 80, keywords)
        };
        if !schema_names.contains(&s) {
            schema_names.push(s);
        }
    }
    let mut table_names: Vec<Names> = schema_names.iter().map(|_| Names::default()).collect();

    let n_tables = g.rng.range(2, 5 + u64::from(cfg.scale)) as usize;
    let mut tables: Vec<Table> = Vec::new();
    for _ in 0..n_tables {
        let s = g.rng.below(schema_names.len());
        let name = table_names[s].fresh(&mut g.rng, "tbl", 75, keywords);
        let t = g.table(
            schema_names[s].clone(),
            name,
            own,
            filters_ok,
            snapshot_workers,
        );
        let idx = tables.len();
        tables.push(t);
        // An inheritance parent gets one or two children.
        if tables[idx].layout == Layout::Parent(Vec::new()) {
            let n = g.rng.range(1, 3);
            let mut children = Vec::new();
            for _ in 0..n {
                let cname = table_names[s].fresh(&mut g.rng, "child", 50, keywords);
                let mut c = tables[idx].clone();
                c.name = cname;
                c.layout = Layout::Child(idx);
                c.prefill = g.rng.range(0, 30);
                c.next = c.prefill + 1;
                c.live = c.prefill;
                c.pub_cols = None;
                c.row_filter = None;
                children.push(tables.len());
                tables.push(c);
            }
            tables[idx].layout = Layout::Parent(children);
        }
    }
    // Tables that join the publication later (own publication, pgcdc following it).
    let pub_mode = if own {
        if g.rng.chance(20) && tables.len() > 2 {
            let subset: Vec<usize> = (0..tables.len())
                .filter(|&i| !matches!(tables[i].layout, Layout::Child(_)) && g.rng.chance(60))
                .collect();
            if subset.is_empty() {
                PubMode::Own
            } else {
                PubMode::OwnSubset(subset)
            }
        } else {
            PubMode::Own
        }
    } else {
        PubMode::Tables
    };
    if pub_mode == PubMode::Own {
        for _ in 0..g.rng.range(0, 3) {
            let s = g.rng.below(schema_names.len());
            let name = table_names[s].fresh(&mut g.rng, "late", 60, keywords);
            let mut t = g.table(schema_names[s].clone(), name, true, filters_ok, 1);
            t.layout = Layout::Plain;
            t.late = true;
            t.in_pub = false;
            t.pub_cols = None;
            t.row_filter = None;
            t.prefill = 0;
            tables.push(t);
        }
    }
    let publish_generated =
        cfg.major >= 18 && own && g.rng.chance(50) && cfg.allows(Bug::GeneratedColumns18);

    let mut case = Case {
        seed,
        major: cfg.major,
        setup: Vec::new(),
        tables,
        pub_mode,
        publish_generated,
        sink,
        snapshot_workers,
        right_after_slot: None,
        steps: Vec::new(),
        shapes: BTreeSet::new(),
    };
    case.setup = setup_sql(&case, &schema_names);
    // Before the workload: it runs on the initial column names.
    if cfg.allows(Bug::RewriteAfterPoint) && g.rng.chance(25) {
        g.rewrite_after_slot(&mut case);
    }
    if case.right_after_slot.is_none() && cfg.allows(Bug::DdlDuringSnapshot) {
        g.ddl_after_slot(&mut case);
    }
    g.workload(&mut case);
    case.shapes = g.shapes;
    let ddl = case
        .steps
        .iter()
        .any(|s| matches!(s, Step::Sql { ddl: true, .. }));
    if ddl && cfg.allows(Bug::DdlDuringSnapshot) {
        case.shapes.insert(Bug::DdlDuringSnapshot);
    }
    note_shapes(&mut case);
    case
}

impl Gen<'_> {
    fn table(
        &mut self,
        schema: String,
        name: String,
        own: bool,
        filters_ok: bool,
        workers: u32,
    ) -> Table {
        let rng = &mut self.rng;
        let cfg = self.cfg;
        let keywords = cfg.allows(Bug::KeywordNames);
        let mut cols = Names::default();
        let mut key_shape = *rng.pick(&[
            KeyShape::Int,
            KeyShape::Int,
            KeyShape::Bigint,
            KeyShape::Text,
            KeyShape::Uuid,
            KeyShape::Composite,
            KeyShape::ToastText,
        ]);
        if key_shape == KeyShape::ToastText && !cfg.allows(Bug::ToastKey) {
            key_shape = KeyShape::Text;
        }
        let identity = match rng.range(0, 100) {
            0..=49 => Identity::Default,
            50..=64 => Identity::FullWithPk,
            65..=71 => Identity::FullNoKey,
            72..=85 => Identity::UsingIndex { with_pk: false },
            _ if cfg.allows(Bug::UsingIndexKey) => Identity::UsingIndex { with_pk: true },
            _ => Identity::UsingIndex { with_pk: false },
        };
        let mut t_cols = Vec::new();
        let mut pk_id = None;
        if identity == (Identity::UsingIndex { with_pk: true }) {
            let n = cols.fresh(rng, "id", 40, keywords);
            pk_id = Some(n.clone());
            t_cols.push(Col {
                name: n,
                ty: Ty::Int4,
                role: Role::Data,
                pinned: true,
            });
        }
        let key_types: Vec<Ty> = match key_shape {
            KeyShape::Int => vec![Ty::Int4],
            KeyShape::Bigint => vec![Ty::Int8],
            KeyShape::Text | KeyShape::ToastText => vec![Ty::Text],
            KeyShape::Uuid => vec![Ty::Uuid],
            KeyShape::Composite => vec![Ty::Int4, Ty::Text],
        };
        for (i, ty) in key_types.into_iter().enumerate() {
            t_cols.push(Col {
                name: cols.fresh(rng, "k", 60, keywords),
                ty,
                role: Role::Key(i),
                pinned: true,
            });
        }
        for _ in 0..rng.range(2, 6) {
            t_cols.push(Col {
                name: cols.fresh(rng, "c", 55, keywords),
                ty: rng.pick(DATA_TYPES).clone(),
                role: Role::Data,
                pinned: false,
            });
        }
        if rng.chance(40) {
            t_cols.push(Col {
                name: cols.fresh(rng, "big", 40, keywords),
                ty: Ty::Text,
                role: Role::Big,
                pinned: false,
            });
        }
        if rng.chance(20) {
            // A generated column over an integer data column (not published before 18).
            let src = t_cols
                .iter()
                .position(|c| c.role == Role::Data && c.ty == Ty::Int4 && !c.pinned);
            if let Some(src) = src {
                t_cols[src].pinned = true;
                let expr = format!("{} * 2", q(&t_cols[src].name));
                t_cols.push(Col {
                    name: cols.fresh(rng, "gen", 40, keywords),
                    ty: Ty::Int4,
                    role: Role::Generated(expr),
                    pinned: true,
                });
            }
        }
        // Shuffle the columns so keys are not always first.
        for i in (1..t_cols.len()).rev() {
            let j = rng.below(i + 1);
            t_cols.swap(i, j);
        }
        let mut layout = match rng.range(0, 100) {
            0..=69 => Layout::Plain,
            70..=84 => Layout::Partitioned(rng.range(2, 4) as u32),
            _ => Layout::Parent(Vec::new()),
        };
        // Partitioned tables: the key must hold the partition key; keep DEFAULT identity.
        if matches!(layout, Layout::Partitioned(_)) && identity != Identity::Default {
            layout = Layout::Plain;
        }
        if matches!(layout, Layout::Parent(_)) && identity == Identity::FullNoKey {
            layout = Layout::Plain;
        }
        let mut prefill = match rng.range(0, 100) {
            0..=14 => 0,
            15..=84 => rng.range(1, 60),
            _ => rng.range(100, 400),
        };
        let big_parent =
            matches!(layout, Layout::Parent(_)) && workers > 1 && cfg.allows(Bug::InheritPages);
        if big_parent && rng.chance(60) {
            // Over 16 MB (two page ranges of 8 MB): read in ranges with --snapshot-workers 2.
            prefill = 11_000;
            t_cols.push(Col {
                name: cols.fresh(rng, "pad", 30, keywords),
                ty: Ty::Text,
                role: Role::Pad,
                pinned: true,
            });
        }
        let mut t = Table {
            schema,
            name,
            cols: t_cols,
            key_shape,
            identity,
            pk_id,
            layout,
            pub_cols: None,
            row_filter: None,
            prefill,
            late: false,
            key_suffix: rng.pick(TEXT_VALUES).to_string(),
            next: prefill + 1,
            live: prefill,
            in_pub: true,
            removed: false,
            ddl: DdlLog::default(),
        };
        let plain_or_partitioned = matches!(t.layout, Layout::Plain | Layout::Partitioned(_));
        if own && filters_ok && plain_or_partitioned && cfg.allows(Bug::PublicationFilters) {
            if rng.chance(35) && identity != Identity::FullWithPk && identity != Identity::FullNoKey
            {
                // Leave out one or two data columns (never a replica identity column).
                let data: Vec<String> = t.data_cols().iter().map(|c| c.name.clone()).collect();
                if data.len() >= 2 {
                    let skip = rng.range(1, 3) as usize;
                    let left_out: Vec<String> = data.iter().take(skip).cloned().collect();
                    // PostgreSQL 18 publishes a stored generated column the list names
                    // (before, naming one is an error).
                    let generated = t.cols.iter().any(|c| matches!(c.role, Role::Generated(_)));
                    let list_generated = generated
                        && cfg.major >= 18
                        && cfg.allows(Bug::GeneratedColumns18)
                        && rng.chance(50);
                    t.pub_cols = Some(
                        t.cols
                            .iter()
                            .filter(|c| {
                                !left_out.contains(&c.name)
                                    && (list_generated || !matches!(c.role, Role::Generated(_)))
                            })
                            .map(|c| c.name.clone())
                            .collect(),
                    );
                }
            }
            if rng.chance(35) && identity != Identity::FullNoKey {
                t.row_filter = Some(t.filter_expr());
            }
        }
        t
    }

    fn workload(&mut self, case: &mut Case) {
        let n_steps = self.rng.range(12, 30) * u64::from(self.cfg.scale);
        let mut running = true;
        let mut stopped_for = 0;
        let own = case.pub_mode == PubMode::Own;
        for _ in 0..n_steps {
            let roll = self.rng.range(0, 100);
            let step = match roll {
                0..=54 => self.txn(case),
                55..=59 => self.truncate(case),
                60..=67 => self.ddl(case),
                68..=73 if running => {
                    let kind = if self.rng.chance(50) {
                        StopKind::Term
                    } else {
                        StopKind::Kill
                    };
                    Some(Step::Restart(kind))
                }
                74..=77 if running => {
                    running = false;
                    stopped_for = 0;
                    Some(Step::Stop(if self.rng.chance(50) {
                        StopKind::Term
                    } else {
                        StopKind::Kill
                    }))
                }
                78..=83 if own => self.membership(case, running),
                _ => Some(Step::Pause(self.rng.range(20, 400))),
            };
            if let Some(s) = step {
                case.steps.push(s);
            }
            if !running {
                stopped_for += 1;
                if stopped_for > 3 || self.rng.chance(30) {
                    running = true;
                    case.steps.push(Step::Start);
                }
            }
        }
        if !running {
            case.steps.push(Step::Start);
        }
        // A last round of changes once everything settled, so the stream is exercised
        // after the final restart too.
        if let Some(s) = self.txn(case) {
            case.steps.push(s);
        }
    }

    /// Tables the workload may write (in the publication's view, the late ones only once
    /// they joined).
    fn writable(&self, case: &Case) -> Vec<usize> {
        (0..case.tables.len())
            .filter(|&i| {
                let t = &case.tables[i];
                !t.removed && (!t.late || t.in_pub)
            })
            .collect()
    }

    fn txn(&mut self, case: &mut Case) -> Option<Step> {
        let writable = self.writable(case);
        if writable.is_empty() {
            return None;
        }
        let mut sql = Vec::new();
        let mut what = Vec::new();
        for _ in 0..self.rng.range(1, 5) {
            let ti = *self.rng.pick(&writable);
            let (s, w) = self.statement(&mut case.tables[ti]);
            sql.push(s);
            what.push(w);
        }
        Some(Step::Sql {
            sql,
            what: format!("txn: {}", what.join("; ")),
            ddl: false,
            settle: false,
        })
    }

    fn statement(&mut self, t: &mut Table) -> (String, String) {
        let rng = &mut self.rng;
        let label = shorten(&t.name, 20);
        let roll = rng.range(0, 100);
        if t.live == 0 || roll < 35 {
            let n = rng.range(1, 6);
            let from = t.next;
            t.next += n;
            t.live += n;
            return (
                t.insert_sql(from, from + n, rng),
                format!("insert {n} into {label}"),
            );
        }
        let n = rng.range(1, 4).min(t.live);
        let offset = rng.range(0, t.live.saturating_sub(n) + 1);
        if roll < 80 {
            // Update data columns; the big column only sometimes (else it stays unchanged).
            let salt = rng.range(0, 1000);
            let mut sets = Vec::new();
            for c in t.data_cols() {
                if rng.chance(60) {
                    sets.push(format!(
                        "{} = {}",
                        q(&c.name),
                        c.ty.value(&format!("{}", t.next + salt), salt, rng)
                    ));
                }
            }
            if let Some(b) = t.big_col() {
                if rng.chance(25) {
                    sets.push(format!(
                        "{} = {}",
                        q(&b.name),
                        Table::big_value(&(t.next + salt).to_string(), salt)
                    ));
                }
            }
            let key_change = rng.chance(20) && n == 1;
            if key_change {
                let g = t.next.to_string();
                t.next += 1;
                for (i, c) in t.key_cols().iter().enumerate() {
                    sets.push(format!("{} = {}", q(&c.name), t.key_value(i, &g)));
                }
            }
            if sets.is_empty() {
                let c = t.key_cols()[0].name.clone();
                sets.push(format!("{} = {}", q(&c), q(&c)));
            }
            return (
                format!(
                    "UPDATE {}{} SET {} WHERE {}",
                    t.only(),
                    t.qname(),
                    sets.join(", "),
                    t.pick_rows(n, offset)
                ),
                format!(
                    "update {n} of {label}{}",
                    if key_change { " (key change)" } else { "" }
                ),
            );
        }
        t.live -= n;
        (
            format!(
                "DELETE FROM {}{} WHERE {}",
                t.only(),
                t.qname(),
                t.pick_rows(n, offset)
            ),
            format!("delete {n} from {label}"),
        )
    }

    fn truncate(&mut self, case: &mut Case) -> Option<Step> {
        if !self.rng.chance(50) {
            return self.txn(case);
        }
        let w = self.writable(case);
        if w.is_empty() {
            return None;
        }
        let ti = *self.rng.pick(&w);
        let t = &mut case.tables[ti];
        t.live = 0;
        Some(Step::Sql {
            sql: vec![format!("TRUNCATE {}{}", t.only(), t.qname())],
            what: format!("truncate {}", shorten(&t.name, 20)),
            ddl: true,
            settle: false,
        })
    }

    /// Tables whose columns DDL may change.
    fn ddl_candidates(&self, case: &Case) -> Vec<usize> {
        self.writable(case)
            .into_iter()
            .filter(|&i| {
                let t = &case.tables[i];
                t.layout == Layout::Plain
                    && t.pub_cols.is_none()
                    && t.row_filter.is_none()
                    && t.identity != Identity::FullNoKey
            })
            .collect()
    }

    /// A column added, dropped, renamed or retyped the moment the slot exists: after the
    /// snapshot's consistent point, racing its lock. Drawn from a random stream of its own, so
    /// that seeds without it keep their cases.
    fn ddl_after_slot(&mut self, case: &mut Case) {
        let main = std::mem::replace(&mut self.rng, Rng::new(case.seed ^ 0xDD1));
        if self.rng.chance(30) && !self.ddl_candidates(case).is_empty() {
            if let Some(Step::Sql { sql, .. }) = self.ddl(case) {
                case.right_after_slot = Some(sql.join(";\n"));
                self.shapes.insert(Bug::DdlDuringSnapshot);
            }
        }
        self.rng = main;
    }

    fn ddl(&mut self, case: &mut Case) -> Option<Step> {
        let candidates = self.ddl_candidates(case);
        if candidates.is_empty() {
            return self.txn(case);
        }
        let ti = *self.rng.pick(&candidates);
        let keywords = self.cfg.allows(Bug::KeywordNames);
        let rng = &mut self.rng;
        let t = &mut case.tables[ti];
        let mut names = Names::default();
        for c in &t.cols {
            names.take(&c.name);
        }
        // Names once used stay taken: a consumer's row may still carry them.
        for n in t
            .ddl
            .dropped
            .iter()
            .chain(t.ddl.renamed.iter().map(|(from, _)| from))
        {
            names.take(n);
        }
        let mutable: Vec<usize> = (0..t.cols.len())
            .filter(|&i| t.cols[i].role == Role::Data && !t.cols[i].pinned)
            .collect();
        let label = shorten(&t.name, 20);
        let (sql, what) = match rng.range(0, 4) {
            0 | 1 if !mutable.is_empty() && rng.chance(50) => {
                let i = *rng.pick(&mutable);
                if let Some(ty) = t.cols[i].ty.widened() {
                    let sql = format!(
                        "ALTER TABLE {} ALTER COLUMN {} TYPE {}",
                        t.qname(),
                        q(&t.cols[i].name),
                        ty.sql()
                    );
                    t.cols[i].ty = ty;
                    (sql, format!("DDL: retype a column of {label}"))
                } else {
                    let old = t.cols[i].name.clone();
                    let new = names.fresh(rng, "renamed", 60, keywords);
                    t.cols[i].name = new.clone();
                    t.ddl.renamed.push((old.clone(), new.clone()));
                    (
                        format!(
                            "ALTER TABLE {} RENAME COLUMN {} TO {}",
                            t.qname(),
                            q(&old),
                            q(&new)
                        ),
                        format!("DDL: rename a column of {label}"),
                    )
                }
            }
            2 if !mutable.is_empty() => {
                let i = *rng.pick(&mutable);
                let c = t.cols.remove(i);
                t.ddl.dropped.push(c.name.clone());
                (
                    format!("ALTER TABLE {} DROP COLUMN {}", t.qname(), q(&c.name)),
                    format!("DDL: drop a column of {label}"),
                )
            }
            _ => {
                let name = names.fresh(rng, "added", 60, keywords);
                let ty = rng.pick(DATA_TYPES).clone();
                let default = if rng.chance(50) {
                    format!(" DEFAULT {}", ty.value("42", 7, rng))
                } else {
                    String::new()
                };
                // A volatile default makes PostgreSQL rewrite the table; a constant one does not.
                let sql = format!(
                    "ALTER TABLE {} ADD COLUMN {} {}{default}",
                    t.qname(),
                    q(&name),
                    ty.sql()
                );
                t.ddl.added.push(name.clone());
                t.cols.push(Col {
                    name,
                    ty,
                    role: Role::Data,
                    pinned: false,
                });
                (sql, format!("DDL: add a column to {label}"))
            }
        };
        Some(Step::Sql {
            sql: vec![sql],
            what,
            ddl: true,
            settle: false,
        })
    }

    /// A table joins or leaves the own publication.
    fn membership(&mut self, case: &mut Case, running: bool) -> Option<Step> {
        let pub_name = "pub";
        let late: Vec<usize> = (0..case.tables.len())
            .filter(|&i| case.tables[i].late && !case.tables[i].in_pub)
            .collect();
        if !late.is_empty() && self.rng.chance(70) {
            let ti = *self.rng.pick(&late);
            let mut sql = Vec::new();
            let t = &mut case.tables[ti];
            // While pgcdc runs, only an empty table: rows it held before joining are not
            // snapshotted then (a known limitation, not checked here).
            if !running && self.cfg.allows(Bug::AddedWhileStopped) && self.rng.chance(70) {
                let n = self.rng.range(1, 30);
                sql.push(t.insert_sql(t.next, t.next + n, &mut self.rng));
                t.next += n;
                t.live += n;
                self.shapes.insert(Bug::AddedWhileStopped);
            }
            t.in_pub = true;
            sql.push(format!(
                "ALTER PUBLICATION {pub_name} ADD TABLE {}",
                t.qname()
            ));
            return Some(Step::Sql {
                sql,
                what: format!(
                    "{} joins the publication{}",
                    shorten(&t.name, 20),
                    if running {
                        " (empty, pgcdc running)"
                    } else {
                        " (pgcdc stopped)"
                    }
                ),
                ddl: false,
                settle: false,
            });
        }
        // Leave: plain tables only (a parent would take its children along), without a
        // column list or row filter (the oracle reads those from the publication).
        let members: Vec<usize> = (0..case.tables.len())
            .filter(|&i| {
                let t = &case.tables[i];
                t.in_pub
                    && !t.removed
                    && t.layout == Layout::Plain
                    && t.pub_cols.is_none()
                    && t.row_filter.is_none()
            })
            .collect();
        if members.len() < 2 || !running || !self.rng.chance(50) {
            return self.txn(case);
        }
        let ti = *self.rng.pick(&members);
        let t = &mut case.tables[ti];
        t.in_pub = false;
        t.removed = true;
        Some(Step::Sql {
            sql: vec![format!(
                "ALTER PUBLICATION {pub_name} DROP TABLE {}",
                t.qname()
            )],
            what: format!("{} leaves the publication", shorten(&t.name, 20)),
            ddl: false,
            settle: true,
        })
    }

    /// An `ALTER … TYPE` (a rewrite) racing the snapshot, on a table with rows.
    fn rewrite_after_slot(&mut self, case: &mut Case) {
        let captured = case.captured();
        for &ti in &captured {
            let t = &mut case.tables[ti];
            if t.layout != Layout::Plain || t.prefill == 0 || t.row_filter.is_some() {
                continue;
            }
            let Some(i) = (0..t.cols.len()).find(|&i| {
                t.cols[i].role == Role::Data && !t.cols[i].pinned && t.cols[i].ty == Ty::Int4
            }) else {
                continue;
            };
            // Retyped in place; the workload's later statements do not depend on the type.
            case.right_after_slot = Some(format!(
                "ALTER TABLE {} ALTER COLUMN {} TYPE bigint",
                t.qname(),
                q(&t.cols[i].name)
            ));
            t.cols[i].ty = Ty::Int8;
            self.shapes.insert(Bug::RewriteAfterPoint);
            return;
        }
    }
}

impl Table {
    /// A row filter on replica identity columns (as PostgreSQL requires for updates and
    /// deletes to be published).
    fn filter_expr(&self) -> String {
        let k = self.key_cols();
        let c = q(&k[0].name);
        match self.key_shape {
            KeyShape::Int | KeyShape::Bigint | KeyShape::Composite => format!("({c} % 3) <> 1"),
            KeyShape::Text | KeyShape::ToastText => format!("length({c}) % 2 = 0"),
            // A uuid's text is not allowed in a row filter (an I/O conversion): compare uuids.
            KeyShape::Uuid => format!("{c} < '90000000-0000-0000-0000-000000000000'::uuid"),
        }
    }
}

/// CREATE statements, prefill and the own publication.
fn setup_sql(case: &Case, schemas: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut done = HashSet::new();
    for s in schemas {
        if s != "public" && done.insert(s.clone()) {
            out.push(format!("CREATE SCHEMA {}", q(s)));
        }
    }
    let mut rng = Rng::new(case.seed ^ 0x5E7);
    for (ti, t) in case.tables.iter().enumerate() {
        let mut defs: Vec<String> = Vec::new();
        for c in &t.cols {
            let mut d = format!("{} {}", q(&c.name), c.ty.sql());
            if let Role::Generated(e) = &c.role {
                let _ = write!(d, " GENERATED ALWAYS AS ({e}) STORED");
            }
            if matches!(c.role, Role::Key(_)) || Some(&c.name) == t.pk_id.as_ref() {
                d.push_str(" NOT NULL");
            }
            defs.push(d);
        }
        let pk: Option<String> = match t.identity {
            Identity::Default | Identity::FullWithPk => Some(t.key_list()),
            Identity::UsingIndex { with_pk: true } => t.pk_id.as_ref().map(|n| q(n)),
            _ => None,
        };
        if let Some(pk) = &pk {
            defs.push(format!("PRIMARY KEY ({pk})"));
        }
        let create = match &t.layout {
            Layout::Child(p) => {
                let parent = &case.tables[*p];
                // The child's own columns come from the parent; it declares its key.
                let key = pk
                    .map(|pk| format!("PRIMARY KEY ({pk})"))
                    .unwrap_or_default();
                format!(
                    "CREATE TABLE {} ({key}) INHERITS ({})",
                    t.qname(),
                    parent.qname()
                )
            }
            Layout::Partitioned(_) => format!(
                "CREATE TABLE {} ({}) PARTITION BY HASH ({})",
                t.qname(),
                defs.join(", "),
                q(&t.key_cols()[0].name)
            ),
            _ => format!("CREATE TABLE {} ({})", t.qname(), defs.join(", ")),
        };
        out.push(create);
        if let Layout::Partitioned(n) = t.layout {
            for r in 0..n {
                out.push(format!(
                    "CREATE TABLE {}.{} PARTITION OF {} FOR VALUES WITH (MODULUS {n}, REMAINDER {r})",
                    q(&t.schema),
                    q(&format!("part_{ti}_{r}")),
                    t.qname()
                ));
            }
        }
        match t.identity {
            Identity::UsingIndex { .. } => {
                let idx = format!("ri_{ti}");
                out.push(format!(
                    "CREATE UNIQUE INDEX {} ON {} ({})",
                    q(&idx),
                    t.qname(),
                    t.key_list()
                ));
                out.push(format!(
                    "ALTER TABLE {} REPLICA IDENTITY USING INDEX {}",
                    t.qname(),
                    q(&idx)
                ));
            }
            Identity::FullWithPk | Identity::FullNoKey => {
                out.push(format!("ALTER TABLE {} REPLICA IDENTITY FULL", t.qname()));
            }
            Identity::Default => {}
        }
        if t.prefill > 0 {
            out.push(t.insert_sql(1, t.prefill + 1, &mut rng));
        }
    }
    let own = matches!(case.pub_mode, PubMode::Own | PubMode::OwnSubset(_));
    if own {
        let members: Vec<String> = case
            .tables
            .iter()
            .filter(|t| !t.late && !matches!(t.layout, Layout::Child(_)))
            .map(|t| {
                let mut m = t.qname();
                if let Some(cols) = &t.pub_cols {
                    let _ = write!(
                        m,
                        " ({})",
                        cols.iter().map(|c| q(c)).collect::<Vec<_>>().join(", ")
                    );
                }
                if let Some(f) = &t.row_filter {
                    let _ = write!(m, " WHERE ({f})");
                }
                m
            })
            .collect();
        let mut with = "publish_via_partition_root = true".to_string();
        if case.publish_generated {
            with.push_str(", publish_generated_columns = stored");
        }
        out.push(format!(
            "CREATE PUBLICATION pub FOR TABLE {} WITH ({with})",
            members.join(", ")
        ));
    }
    out
}

/// Notes which shapes of known bugs a generated case contains (for the report and the gating).
pub fn note_shapes(case: &mut Case) {
    for t in &case.tables {
        let names = std::iter::once(t.schema.as_str())
            .chain(std::iter::once(t.name.as_str()))
            .chain(t.cols.iter().map(|c| c.name.as_str()));
        let mut kw = false;
        for n in names {
            kw |= KEYWORDS.contains(&n);
        }
        if kw {
            case.shapes.insert(Bug::KeywordNames);
        }
        if t.pub_cols.is_some() || t.row_filter.is_some() {
            case.shapes.insert(Bug::PublicationFilters);
        }
        if t.identity == (Identity::UsingIndex { with_pk: true }) {
            case.shapes.insert(Bug::UsingIndexKey);
        }
        if t.key_shape == KeyShape::ToastText {
            case.shapes.insert(Bug::ToastKey);
        }
        if matches!(t.layout, Layout::Parent(_)) && t.prefill >= 10_000 && case.snapshot_workers > 1
        {
            case.shapes.insert(Bug::InheritPages);
        }
        let generated = |c: &Col| matches!(c.role, Role::Generated(_));
        let listed = |c: &Col| t.pub_cols.as_ref().is_some_and(|l| l.contains(&c.name));
        if t.cols
            .iter()
            .any(|c| generated(c) && (case.publish_generated || listed(c)))
        {
            case.shapes.insert(Bug::GeneratedColumns18);
        }
    }
}
