//! Framing of the PostgreSQL protocol over a byte stream.
//!
//! Every backend message is `Byte1 tag, Int32 length (including itself), body`. The
//! decoder checks the length *before* buffering the body, so a hostile or corrupted
//! length cannot make it allocate more than [`MAX_MESSAGE_LEN`]. Bodies are parsed by
//! `postgres_protocol`, except the two tags it does not know: `W` (CopyBothResponse,
//! the start of streaming replication) and `v` (NegotiateProtocolVersion).

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::message::backend::Message;
use tokio_util::codec::{Decoder, Encoder};

use super::error::ReplicationError;

/// The largest backend message accepted: 1 GiB, PostgreSQL's own allocation limit
/// (`MaxAllocSize`), so no legitimate message is larger.
pub const MAX_MESSAGE_LEN: usize = 1 << 30;

/// A decoded backend message.
pub(crate) enum BackendMessage {
    Message(Message),
    /// `W`: the server switched to CopyBoth mode (START_REPLICATION succeeded).
    CopyBothResponse,
    /// `v`: the server speaks an older minor protocol version or ignored options.
    NegotiateProtocolVersion {
        newest_minor: i32,
        unrecognized: Vec<String>,
    },
}

impl BackendMessage {
    /// The message's name, for error messages (never its content).
    pub(crate) fn name(&self) -> &'static str {
        match self {
            BackendMessage::CopyBothResponse => "CopyBothResponse",
            BackendMessage::NegotiateProtocolVersion { .. } => "NegotiateProtocolVersion",
            BackendMessage::Message(m) => message_name(m),
        }
    }
}

impl std::fmt::Debug for BackendMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A short name of a backend message.
pub(crate) fn message_name(m: &Message) -> &'static str {
    match m {
        Message::AuthenticationOk => "AuthenticationOk",
        Message::BackendKeyData(_) => "BackendKeyData",
        Message::BindComplete => "BindComplete",
        Message::CloseComplete => "CloseComplete",
        Message::CommandComplete(_) => "CommandComplete",
        Message::CopyData(_) => "CopyData",
        Message::CopyDone => "CopyDone",
        Message::CopyInResponse(_) => "CopyInResponse",
        Message::CopyOutResponse(_) => "CopyOutResponse",
        Message::DataRow(_) => "DataRow",
        Message::EmptyQueryResponse => "EmptyQueryResponse",
        Message::ErrorResponse(_) => "ErrorResponse",
        Message::NoData => "NoData",
        Message::NoticeResponse(_) => "NoticeResponse",
        Message::NotificationResponse(_) => "NotificationResponse",
        Message::ParameterDescription(_) => "ParameterDescription",
        Message::ParameterStatus(_) => "ParameterStatus",
        Message::ParseComplete => "ParseComplete",
        Message::PortalSuspended => "PortalSuspended",
        Message::ReadyForQuery(_) => "ReadyForQuery",
        Message::RowDescription(_) => "RowDescription",
        _ => "an authentication request",
    }
}

/// Decodes backend messages; encodes pre-serialized frontend messages.
#[derive(Debug, Default)]
pub(crate) struct PgCodec;

impl Decoder for PgCodec {
    type Item = BackendMessage;
    type Error = ReplicationError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BackendMessage>, ReplicationError> {
        let Some(header) = src.get(..5) else {
            return Ok(None);
        };
        let tag = header[0];
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if len < 4 {
            return Err(ReplicationError::Protocol(format!(
                "message {:?} has length {len}, less than the 4 bytes of the length itself",
                char::from(tag)
            )));
        }
        if len > MAX_MESSAGE_LEN {
            return Err(ReplicationError::MessageTooLarge {
                len,
                max: MAX_MESSAGE_LEN,
            });
        }
        let total = len + 1;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        match tag {
            b'W' => {
                let mut frame = src.split_to(total).freeze();
                frame.advance(5);
                parse_copy_both(frame).map(Some)
            }
            b'v' => {
                let mut frame = src.split_to(total).freeze();
                frame.advance(5);
                parse_negotiate(frame).map(Some)
            }
            _ => match Message::parse(src) {
                Ok(Some(m)) => Ok(Some(BackendMessage::Message(m))),
                // Cannot happen: the whole frame is buffered. Never loop on it.
                Ok(None) => Err(ReplicationError::Protocol(
                    "incomplete message after the whole frame was read".into(),
                )),
                Err(e) => Err(ReplicationError::Protocol(format!(
                    "malformed {:?} message from the server: {e}",
                    char::from(tag)
                ))),
            },
        }
    }
}

fn parse_copy_both(mut body: Bytes) -> Result<BackendMessage, ReplicationError> {
    // Int8 overall format, Int16 column count, Int16 format per column.
    if body.remaining() < 3 {
        return Err(ReplicationError::Protocol(
            "CopyBothResponse is too short".into(),
        ));
    }
    let _format = body.get_u8();
    let columns = usize::from(body.get_u16());
    if body.remaining() != columns * 2 {
        return Err(ReplicationError::Protocol(
            "CopyBothResponse length does not match its column count".into(),
        ));
    }
    Ok(BackendMessage::CopyBothResponse)
}

fn parse_negotiate(mut body: Bytes) -> Result<BackendMessage, ReplicationError> {
    let bad = || ReplicationError::Protocol("malformed NegotiateProtocolVersion".into());
    if body.remaining() < 8 {
        return Err(bad());
    }
    let newest_minor = body.get_i32();
    let count = body.get_i32();
    let mut unrecognized = Vec::new();
    for _ in 0..count.max(0) {
        let end = body.iter().position(|b| *b == 0).ok_or_else(bad)?;
        unrecognized.push(String::from_utf8_lossy(&body[..end]).into_owned());
        body.advance(end + 1);
    }
    Ok(BackendMessage::NegotiateProtocolVersion {
        newest_minor,
        unrecognized,
    })
}

impl Encoder<Bytes> for PgCodec {
    type Error = ReplicationError;

    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> Result<(), ReplicationError> {
        dst.extend_from_slice(&item);
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A backend message: tag, length, body.
    pub(crate) fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn decodes_in_pieces() {
        let mut all = frame(b'Z', b"I");
        all.extend(frame(b'W', &[0, 0, 0]));
        all.extend(frame(b'd', b"hello"));
        let mut codec = PgCodec;
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for b in all {
            buf.extend_from_slice(&[b]);
            while let Some(m) = codec.decode(&mut buf).unwrap() {
                out.push(m);
            }
        }
        assert_eq!(out.len(), 3);
        assert!(
            matches!(&out[0], BackendMessage::Message(Message::ReadyForQuery(b)) if b.status() == b'I')
        );
        assert!(matches!(out[1], BackendMessage::CopyBothResponse));
        assert!(
            matches!(&out[2], BackendMessage::Message(Message::CopyData(d)) if d.data() == b"hello")
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn hostile_length_is_refused_without_allocating() {
        let mut codec = PgCodec;
        let mut buf = BytesMut::from(&[b'd', 0xFF, 0xFF, 0xFF, 0xF0][..]);
        let err = codec.decode(&mut buf).unwrap_err();
        assert!(
            matches!(err, ReplicationError::MessageTooLarge { .. }),
            "{err}"
        );
        assert!(buf.capacity() < 1024);
        let mut buf = BytesMut::from(&[b'd', 0, 0, 0, 3][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(ReplicationError::Protocol(_))
        ));
    }

    #[test]
    fn malformed_bodies_are_errors() {
        let mut codec = PgCodec;
        for bad in [
            frame(b'W', &[0]),
            frame(b'W', &[0, 0, 2, 0, 0]),
            frame(b'v', &[0, 0]),
            frame(b'v', &[0, 0, 0, 0, 0, 0, 0, 1, b'x']),
            frame(b'Z', b""),
            frame(b'?', b""),
        ] {
            let mut buf = BytesMut::from(&bad[..]);
            assert!(codec.decode(&mut buf).is_err(), "{bad:?}");
        }
        let mut buf = BytesMut::from(&frame(b'v', &[0, 0, 0, 0, 0, 0, 0, 1, b'x', 0])[..]);
        assert!(matches!(
            codec.decode(&mut buf).unwrap(),
            Some(BackendMessage::NegotiateProtocolVersion { newest_minor: 0, ref unrecognized }) if unrecognized == &["x"]
        ));
    }
}
