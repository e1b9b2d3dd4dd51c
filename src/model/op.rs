//! What happened to a row: the events' `op`, and what the metrics count.

/// What happened to a row. Serialized as Debezium's one-letter codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A row read by the snapshot.
    Read,
    Create,
    Update,
    Delete,
    /// The table was truncated (no row: `before` and `after` are null).
    Truncate,
}

impl Op {
    pub fn code(self) -> &'static str {
        match self {
            Op::Read => "r",
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Truncate => "t",
        }
    }
}
