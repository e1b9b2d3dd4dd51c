//! How each column's text form becomes JSON, decided once per column.
//!
//! The hot path must not look anything up: a [`Kind`] is resolved when a table's shape
//! becomes known (at start from the catalog, later from a Relation message) and stored in
//! the column, so encoding a value is one `match`. Built-in scalar types are recognised by
//! their fixed OIDs; everything else — arrays, domains, composites, ranges, multiranges,
//! enums, extension types — is described by a [`TypeDesc`] read from `pg_type` and kept in a
//! [`TypeRegistry`]. A type the registry does not know is encoded as its text form, which is
//! never wrong, only less structured.

use std::collections::HashMap;
use std::sync::Arc;

use super::json;

/// `--decimal`: how `numeric` values are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DecimalMode {
    /// A JSON string with the exact digits, e.g. "12.3400" (NaN and ±Infinity too).
    #[default]
    String,
    /// A JSON number with the exact digits; NaN and ±Infinity stay strings.
    Number,
}

/// `--binary`: how `bytea` values (and message contents) are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BinaryMode {
    /// Standard base64 with padding.
    #[default]
    Base64,
    /// Lower-case hexadecimal, two digits per byte, no prefix.
    Hex,
}

/// How one value is encoded. Cheap to clone (nested kinds are shared).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A JSON string of the text form.
    Text,
    Bool,
    /// Integers: the text form is a JSON number.
    Int,
    /// `real`/`double precision`: a number, or the string "NaN"/"Infinity"/"-Infinity".
    Float,
    /// `numeric` as a string with its exact digits.
    Numeric,
    /// `numeric` as a number with its exact digits (`--decimal number`).
    NumericNumber,
    /// `json`/`jsonb`: the document itself.
    Json,
    /// `bytea` (hex text form) as base64.
    BytesBase64,
    /// `bytea` as plain hex digits.
    BytesHex,
    Date,
    Timestamp,
    TimestampTz,
    TimeTz,
    Array(Arc<ArrayKind>),
    Composite(Arc<[Field]>),
    Range(Arc<Kind>),
    Multirange(Arc<Kind>),
    /// The `hstore` extension type, as an object of strings (or nulls).
    Hstore,
}

/// Arrays: the element kind and the delimiter between elements (`;` for `box`, else `,`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArrayKind {
    pub elem: Kind,
    pub delim: u8,
}

/// One attribute of a composite type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// `"name":`, pre-encoded.
    pub label: Box<[u8]>,
    pub kind: Kind,
}

impl Field {
    pub fn new(name: &str, kind: Kind) -> Self {
        let mut label = Vec::with_capacity(name.len() + 3);
        json::write_str(&mut label, name.as_bytes());
        label.push(b':');
        Field {
            label: label.into_boxed_slice(),
            kind,
        }
    }
}

/// Type OIDs of the built-in types with a kind of their own. OIDs below 10000 are fixed
/// when PostgreSQL is built and never change.
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const MONEY: u32 = 790;
    pub const DATE: u32 = 1082;
    pub const TIME: u32 = 1083;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const INTERVAL: u32 = 1186;
    pub const TIMETZ: u32 = 1266;
    pub const NUMERIC: u32 = 1700;
    pub const JSONB: u32 = 3802;
}

/// The kind of a built-in scalar type, or `None` when the catalog must say.
pub fn builtin(type_oid: u32, decimal: DecimalMode, binary: BinaryMode) -> Option<Kind> {
    Some(match type_oid {
        oid::BOOL => Kind::Bool,
        oid::INT2 | oid::INT4 | oid::INT8 => Kind::Int,
        oid::FLOAT4 | oid::FLOAT8 => Kind::Float,
        oid::NUMERIC => match decimal {
            DecimalMode::String => Kind::Numeric,
            DecimalMode::Number => Kind::NumericNumber,
        },
        oid::JSON | oid::JSONB => Kind::Json,
        oid::BYTEA => match binary {
            BinaryMode::Base64 => Kind::BytesBase64,
            BinaryMode::Hex => Kind::BytesHex,
        },
        oid::DATE => Kind::Date,
        oid::TIMESTAMP => Kind::Timestamp,
        oid::TIMESTAMPTZ => Kind::TimestampTz,
        oid::TIMETZ => Kind::TimeTz,
        // Text forms that are already what the event wants.
        oid::TEXT | oid::OID | oid::MONEY | oid::TIME | oid::INTERVAL => Kind::Text,
        _ => return None,
    })
}

/// What `pg_type` says about a non-built-in type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeDesc {
    pub name: String,
    /// `typtype`: b base, c composite, d domain, e enum, p pseudo, r range, m multirange.
    pub typtype: u8,
    /// Element type, for true arrays only (not `point`, `int2vector`, …).
    pub elem: Option<u32>,
    pub delim: u8,
    /// Base type, for domains.
    pub base: Option<u32>,
    /// Attributes (name, type), for composites; dropped attributes left out.
    pub fields: Vec<(String, u32)>,
    /// Subtype, for ranges and multiranges.
    pub subtype: Option<u32>,
}

impl TypeDesc {
    /// The types this one is built from.
    pub fn references(&self) -> impl Iterator<Item = u32> + '_ {
        self.elem
            .into_iter()
            .chain(self.base)
            .chain(self.subtype)
            .chain(self.fields.iter().map(|(_, t)| *t))
    }
}

/// Nesting deeper than this is encoded as text (PostgreSQL forbids cycles; this is a guard).
const MAX_DEPTH: usize = 16;

/// Type descriptions and the `--decimal`/`--binary` choices: everything needed to resolve a
/// type OID to a [`Kind`].
#[derive(Debug, Clone, Default)]
pub struct TypeRegistry {
    descs: HashMap<u32, TypeDesc>,
    pub decimal: DecimalMode,
    pub binary: BinaryMode,
}

impl TypeRegistry {
    pub fn new(decimal: DecimalMode, binary: BinaryMode) -> Self {
        TypeRegistry {
            descs: HashMap::new(),
            decimal,
            binary,
        }
    }

    pub fn insert(&mut self, type_oid: u32, desc: TypeDesc) {
        self.descs.insert(type_oid, desc);
    }

    /// Whether `type_oid` resolves without asking the catalog.
    pub fn knows(&self, type_oid: u32) -> bool {
        builtin(type_oid, self.decimal, self.binary).is_some() || self.descs.contains_key(&type_oid)
    }

    /// Of `oids` and the types they are built from, those neither built in nor described.
    pub fn unknown(&self, oids: impl IntoIterator<Item = u32>) -> Vec<u32> {
        let mut out = Vec::new();
        let mut stack: Vec<u32> = oids.into_iter().collect();
        let mut seen = std::collections::HashSet::new();
        while let Some(t) = stack.pop() {
            if !seen.insert(t) || builtin(t, self.decimal, self.binary).is_some() {
                continue;
            }
            match self.descs.get(&t) {
                Some(d) => stack.extend(d.references()),
                None => out.push(t),
            }
        }
        out.sort_unstable();
        out
    }

    /// The kind of `type_oid`; unknown types are text.
    pub fn kind(&self, type_oid: u32) -> Kind {
        self.kind_at(type_oid, 0)
    }

    fn kind_at(&self, type_oid: u32, depth: usize) -> Kind {
        if let Some(k) = builtin(type_oid, self.decimal, self.binary) {
            return k;
        }
        let (Some(d), true) = (self.descs.get(&type_oid), depth < MAX_DEPTH) else {
            return Kind::Text;
        };
        let next = depth + 1;
        if let Some(elem) = d.elem {
            return Kind::Array(Arc::new(ArrayKind {
                elem: self.kind_at(elem, next),
                delim: d.delim,
            }));
        }
        match d.typtype {
            b'd' => d.base.map_or(Kind::Text, |b| self.kind_at(b, next)),
            b'c' => Kind::Composite(
                d.fields
                    .iter()
                    .map(|(name, t)| Field::new(name, self.kind_at(*t, next)))
                    .collect(),
            ),
            b'r' => d
                .subtype
                .map_or(Kind::Text, |s| Kind::Range(Arc::new(self.kind_at(s, next)))),
            b'm' => d.subtype.map_or(Kind::Text, |s| {
                Kind::Multirange(Arc::new(self.kind_at(s, next)))
            }),
            b'b' if d.name == "hstore" => Kind::Hstore,
            _ => Kind::Text,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(typtype: u8) -> TypeDesc {
        TypeDesc {
            name: "t".into(),
            typtype,
            elem: None,
            delim: b',',
            base: None,
            fields: Vec::new(),
            subtype: None,
        }
    }

    #[test]
    fn resolves_nested_types() {
        let mut r = TypeRegistry::new(DecimalMode::Number, BinaryMode::Hex);
        // A domain over numeric, an array of it, a composite holding both, a range of dates.
        r.insert(
            50_000,
            TypeDesc {
                base: Some(oid::NUMERIC),
                ..desc(b'd')
            },
        );
        r.insert(
            50_001,
            TypeDesc {
                elem: Some(50_000),
                ..desc(b'b')
            },
        );
        r.insert(
            50_002,
            TypeDesc {
                fields: vec![("a".into(), 50_000), ("b".into(), 50_001)],
                ..desc(b'c')
            },
        );
        r.insert(
            50_003,
            TypeDesc {
                subtype: Some(oid::DATE),
                ..desc(b'r')
            },
        );
        assert_eq!(r.kind(50_000), Kind::NumericNumber);
        let Kind::Array(a) = r.kind(50_001) else {
            panic!("array")
        };
        assert_eq!(a.elem, Kind::NumericNumber);
        let Kind::Composite(f) = r.kind(50_002) else {
            panic!("composite")
        };
        assert_eq!(&*f[0].label, b"\"a\":");
        assert!(matches!(f[1].kind, Kind::Array(_)));
        assert_eq!(r.kind(50_003), Kind::Range(Arc::new(Kind::Date)));
        assert_eq!(r.kind(17), Kind::BytesHex);
        assert_eq!(r.kind(99_999), Kind::Text);
        assert_eq!(r.unknown([50_002, 99_999, 16]), vec![99_999]);
    }

    #[test]
    fn self_reference_is_bounded() {
        let mut r = TypeRegistry::default();
        r.insert(
            60_000,
            TypeDesc {
                base: Some(60_000),
                ..desc(b'd')
            },
        );
        assert_eq!(r.kind(60_000), Kind::Text);
        assert!(r.unknown([60_000]).is_empty());
    }
}
