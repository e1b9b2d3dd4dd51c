use std::fmt;

/// Why bytes are not a valid pgoutput message. These are definite errors: the same bytes
/// will never decode, so retrying is pointless.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("the pgoutput message is empty")]
    Empty,
    #[error(
        "the pgoutput message ends early: the {what} needs {needed} bytes but only {remaining} remain"
    )]
    Truncated {
        what: &'static str,
        needed: usize,
        remaining: usize,
    },
    #[error("unknown pgoutput message type {}", ShowByte(*.0))]
    UnknownTag(u8),
    #[error("unknown tuple column kind {} (expected 'n', 'u', 't' or 'b')", ShowByte(*.0))]
    UnknownTupleKind(u8),
    #[error("the {what} is not valid UTF-8")]
    InvalidUtf8 { what: &'static str },
    #[error("the {what} has no terminating NUL byte")]
    MissingNul { what: &'static str },
    #[error("{count} unexpected bytes follow a complete pgoutput message of type {}", ShowByte(*.tag))]
    TrailingBytes { tag: u8, count: usize },
    #[error("invalid {what}: {value}")]
    InvalidValue { what: &'static str, value: i64 },
    #[error("invalid {what}: expected {expected}, found {}", ShowByte(*.found))]
    UnexpectedByte {
        what: &'static str,
        expected: &'static str,
        found: u8,
    },
}

/// Shows a protocol byte as the character it stands for when printable: `'Z' (0x5A)`.
struct ShowByte(u8);

impl fmt::Display for ShowByte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() {
            write!(f, "'{}' (0x{:02X})", char::from(self.0), self.0)
        } else {
            write!(f, "0x{:02X}", self.0)
        }
    }
}
