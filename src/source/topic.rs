//! The topic of each table: `<prefix>.<schema>.<table>`, made a name Kafka accepts, and never
//! one that two captured tables share.
//!
//! Apache Kafka accepts topic names of at most 249 characters from `[A-Za-z0-9._-]`, and
//! PostgreSQL names may hold anything (spaces, quotes, non-ASCII, dots). Dots are the worst:
//! `"a.b".c` and `a."b.c"` would both be `<prefix>.a.b.c`, one topic whose consumers could not
//! tell the two tables' rows apart. So [`topic_name`]:
//!
//! - keeps `<prefix>.<schema>.<table>` as it is when schema and table are made only of
//!   `[A-Za-z0-9_-]` (no dot) and the whole fits in 249 characters — the topics of such
//!   tables never move;
//! - otherwise replaces every character of the schema and of the table outside
//!   `[A-Za-z0-9_-]` by `_`, and appends to the table part `_` and a hash of the exact names
//!   (the first 8 hex digits of the SHA-256 of the schema's UTF-8 bytes, a zero byte, and the
//!   table's): `"Sales"."Order Lines"` → `<prefix>.Sales.Order_Lines_<hash>`. When that is
//!   longer than 249 characters, the longer of the two parts is cut first.
//!
//! Names of the first kind have exactly two dots after the prefix, so they split back into
//! schema and table; names of the second kind carry a hash of the exact names. Two tables
//! still meet only by accident — a hash collision, or a table literally named like another's
//! changed name — or in Kafka's eyes: it treats `.` and `_` as the same character (its metric
//! names cannot tell them apart) and refuses a topic that differs from an existing one only so
//! (`p.a_b.c` and `p.a.b_c`). [`check_distinct`] refuses both cases at start, and
//! [`Topics::add`] when a table joins the publication while pgcdc streams: events of two
//! tables are never merged into one topic.

use std::collections::HashMap;

use crate::source::catalog::TableName;

/// Kafka's limit on a topic name's length.
pub const MAX_TOPIC_LEN: usize = 249;

/// The longest `--topic-prefix`: room is left for a schema and a table part.
pub const MAX_PREFIX_LEN: usize = 200;

/// Hex digits of the hash in a changed name.
const HASH_DIGITS: usize = 8;

/// Why topic names do not work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("--topic-prefix `{0}` is not usable in Kafka topic names: use at most {MAX_PREFIX_LEN} characters from A-Z, a-z, 0-9, '.', '_' and '-'")]
    Prefix(String),
    #[error("{0}")]
    Shared(Box<Clash>),
}

/// Two tables whose topics are one, or one to Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clash {
    pub first: TableName,
    pub first_topic: String,
    pub second: TableName,
    pub second_topic: String,
}

impl std::fmt::Display for Clash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Clash {
            first,
            first_topic,
            second,
            second_topic,
        } = self;
        if first_topic == second_topic {
            write!(
                f,
                "tables {first} and {second} would both publish to the topic `{first_topic}`, \
                 which would mix their rows"
            )?;
        } else {
            write!(
                f,
                "tables {first} and {second} would publish to the topics `{first_topic}` and \
                 `{second_topic}`, which differ only in '.' versus '_': Kafka treats those as \
                 the same name and refuses the second topic"
            )?;
        }
        write!(
            f,
            ". Fix: rename one of them (ALTER TABLE … RENAME TO …), or capture them with \
             separate pgcdc runs (each with its own --slot, --publication and --topic-prefix)"
        )
    }
}

/// Whether `c` may appear in a schema or table part kept as it is.
fn plain(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// The topic of `table`'s events (see the module documentation).
pub fn topic_name(prefix: &str, table: &TableName) -> String {
    let (schema, name) = (&table.schema, &table.name);
    let kept = format!("{prefix}.{schema}.{name}");
    let legal = |s: &str| !s.is_empty() && s.chars().all(plain);
    if legal(schema) && legal(name) && kept.len() <= MAX_TOPIC_LEN {
        return kept;
    }
    let clean = |s: &str| -> String { s.chars().map(|c| if plain(c) { c } else { '_' }).collect() };
    let (mut s, mut t) = (clean(schema), clean(name));
    // `<prefix>.` `<s>` `.` `<t>` `_` `<hash>`
    let room = MAX_TOPIC_LEN.saturating_sub(prefix.len() + 3 + HASH_DIGITS);
    if s.len() + t.len() > room {
        let half = room / 2;
        let (s_len, t_len) = if s.len() <= half {
            (s.len(), room - s.len())
        } else if t.len() <= room - half {
            (room - t.len(), t.len())
        } else {
            (half, room - half)
        };
        // Both are ASCII now: any length is a character boundary.
        s.truncate(s_len.max(1));
        t.truncate(t_len.max(1));
    }
    format!("{prefix}.{s}.{t}_{}", hash(schema, name))
}

/// The first [`HASH_DIGITS`] hex digits of SHA-256(schema, 0, table).
fn hash(schema: &str, table: &str) -> String {
    let mut bytes = Vec::with_capacity(schema.len() + 1 + table.len());
    bytes.extend_from_slice(schema.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(table.as_bytes());
    let digest = openssl::sha::sha256(&bytes);
    digest[..HASH_DIGITS / 2]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Checks `--topic-prefix`: Kafka's characters, and short enough to leave room for tables.
pub fn check_prefix(prefix: &str) -> Result<(), TopicError> {
    let ok = !prefix.is_empty()
        && prefix.len() <= MAX_PREFIX_LEN
        && prefix.chars().all(|c| plain(c) || c == '.');
    if ok {
        Ok(())
    } else {
        Err(TopicError::Prefix(prefix.to_string()))
    }
}

/// The topics of the captured tables, one per table (see [`check_distinct`]).
#[derive(Debug, Clone, Default)]
pub struct Topics {
    prefix: String,
    /// By the name Kafka compares (`.` as `_`): the topic and its table.
    by_kafka_name: HashMap<String, (String, TableName)>,
}

impl Topics {
    pub fn new(prefix: &str) -> Topics {
        Topics {
            prefix: prefix.to_string(),
            by_kafka_name: HashMap::new(),
        }
    }

    /// Adds `table`, refusing it when its topic would be another table's (or one Kafka
    /// would refuse beside it); returns its topic.
    pub fn add(&mut self, table: &TableName) -> Result<String, TopicError> {
        let topic = topic_name(&self.prefix, table);
        let key = topic.replace('.', "_");
        match self.by_kafka_name.get(&key) {
            Some((_, other)) if other == table => {}
            Some((other_topic, other)) => {
                return Err(TopicError::Shared(Box::new(Clash {
                    first: other.clone(),
                    first_topic: other_topic.clone(),
                    second: table.clone(),
                    second_topic: topic,
                })))
            }
            None => {
                self.by_kafka_name
                    .insert(key, (topic.clone(), table.clone()));
            }
        }
        Ok(topic)
    }
}

/// Refuses a prefix Kafka would not accept, and two tables of `tables` that would share a
/// topic (see the module documentation). Returns the topics, as [`Topics`] to add tables
/// that join later.
pub fn check_distinct(prefix: &str, tables: &[TableName]) -> Result<Topics, TopicError> {
    check_prefix(prefix)?;
    let mut topics = Topics::new(prefix);
    for t in tables {
        topics.add(t)?;
    }
    Ok(topics)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(schema: &str, name: &str) -> TableName {
        TableName::new(schema, name)
    }

    fn legal(topic: &str) -> bool {
        topic.len() <= MAX_TOPIC_LEN
            && topic
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    }

    #[test]
    fn legal_names_are_kept_as_they_are() {
        for (schema, name) in [
            ("public", "orders"),
            ("Sales", "Orders"),
            ("a-b", "c_d"),
            ("s", "x_0123abcd"),
        ] {
            assert_eq!(
                topic_name("pgcdc", &t(schema, name)),
                format!("pgcdc.{schema}.{name}")
            );
        }
        assert_eq!(
            topic_name("prod.cdc", &t("public", "orders")),
            "prod.cdc.public.orders"
        );
    }

    #[test]
    fn other_names_are_made_legal_with_a_hash_of_the_exact_names() {
        // The documented examples (README, Event format).
        assert_eq!(
            topic_name("pgcdc", &t("Sales", "Order Lines")),
            "pgcdc.Sales.Order_Lines_c2765b86"
        );
        assert_eq!(topic_name("pgcdc", &t("a.b", "c")), "pgcdc.a_b.c_8b745bb4");
        assert_eq!(topic_name("pgcdc", &t("a", "b.c")), "pgcdc.a.b_c_ad8a94ab");
        assert_eq!(
            topic_name("pgcdc", &t("public", "naïve \"x\" 日本")),
            "pgcdc.public.na_ve__x_____58dd341f"
        );
        for (schema, name) in [
            ("a.b", "c"),
            ("a", "b.c"),
            ("public", "it's"),
            ("🐘", "🐘"),
            ("", "x"),
            (&"ä".repeat(31), &"Ö".repeat(31)),
        ] {
            let topic = topic_name("p", &t(schema, name));
            assert!(legal(&topic), "{topic}");
            assert_eq!(topic, topic_name("p", &t(schema, name)), "deterministic");
        }
    }

    #[test]
    fn long_names_are_cut_to_kafkas_limit() {
        let long = "x".repeat(63);
        let prefix = "p".repeat(MAX_PREFIX_LEN);
        for (schema, name) in [(long.as_str(), long.as_str()), ("s", &long), (&long, "t")] {
            let topic = topic_name(&prefix, &t(schema, name));
            assert!(legal(&topic), "{} characters", topic.len());
            assert!(topic.starts_with(&format!("{prefix}.")));
        }
        // Cut to the same length, still told apart by the hash.
        let a = topic_name(&prefix, &t(&long, &format!("{long}a")));
        let b = topic_name(&prefix, &t(&long, &format!("{long}b")));
        assert_ne!(a, b);
    }

    #[test]
    fn tables_that_would_share_a_topic_are_refused() {
        // Distinct once changed: the dotted names that used to merge.
        check_distinct("p", &[t("a.b", "c"), t("a", "b.c"), t("a", "b_c")]).unwrap();
        // Equal after '.' -> '_' (Kafka refuses the second topic).
        let err = check_distinct("p", &[t("a_b", "c"), t("a", "b_c")]).unwrap_err();
        assert!(
            matches!(&err, TopicError::Shared(c)
                if c.first_topic == "p.a_b.c" && c.second_topic == "p.a.b_c"),
            "{err}"
        );
        assert!(err.to_string().contains("'.' versus '_'"), "{err}");
        assert!(
            err.to_string().contains(r#""a_b"."c" and "a"."b_c""#),
            "{err}"
        );
        // A table literally named like another's changed name.
        let changed = topic_name("p", &t("s", "x y"));
        let literal = changed.trim_start_matches("p.s.").to_string();
        let err = check_distinct("p", &[t("s", "x y"), t("s", &literal)]).unwrap_err();
        assert!(
            matches!(&err, TopicError::Shared(c) if c.first_topic == c.second_topic),
            "{err}"
        );
        assert!(err.to_string().contains("would both publish"), "{err}");
        // The same table twice is one table.
        check_distinct("p", &[t("s", "t"), t("s", "t")]).unwrap();
        // Prefixes.
        for bad in ["", "a b", "ü", &"p".repeat(MAX_PREFIX_LEN + 1)] {
            assert!(check_prefix(bad).is_err(), "{bad:?}");
        }
        check_prefix("prod.cdc-1_x").unwrap();
    }
}
