//! The startup message and the authentication exchange: trust, cleartext password,
//! MD5 and SCRAM-SHA-256 (without channel binding).

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;

use super::codec::{message_name, BackendMessage};
use super::conn::Connection;
use super::error::{ReplicationError, ServerError};
use crate::source::conninfo::ConnInfo;

const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// Sends the startup message for a logical replication connection and
/// authenticates. On return the server has sent AuthenticationOk; the caller reads
/// the rest of the startup (parameters, key data) up to ReadyForQuery.
pub(crate) async fn startup(
    conn: &mut Connection,
    info: &ConnInfo,
    application_name: &str,
) -> Result<(), ReplicationError> {
    let mut params: Vec<(&str, &str)> = vec![
        ("user", &info.user),
        ("database", &info.dbname),
        ("replication", "database"),
        ("application_name", application_name),
        ("client_encoding", "UTF8"),
    ];
    if let Some(options) = &info.options {
        params.push(("options", options));
    }
    let mut buf = BytesMut::new();
    frontend::startup_message(params, &mut buf).map_err(|e| {
        ReplicationError::InvalidArgument(format!(
            "a connection setting cannot be sent to the server ({e}); user, dbname, \
             application_name and options must not contain NUL bytes"
        ))
    })?;
    conn.send(buf).await?;
    authenticate(conn, info).await
}

fn password(info: &ConnInfo) -> Result<&str, ReplicationError> {
    info.password()
        .ok_or_else(|| ReplicationError::PasswordRequired {
            user: info.user.clone(),
        })
}

async fn authenticate(conn: &mut Connection, info: &ConnInfo) -> Result<(), ReplicationError> {
    let mut scram: Option<ScramSha256> = None;
    loop {
        let msg = match conn.recv().await? {
            BackendMessage::Message(m) => m,
            other => {
                return Err(ReplicationError::Protocol(format!(
                    "unexpected {} during authentication",
                    other.name()
                )))
            }
        };
        let mut buf = BytesMut::new();
        match msg {
            Message::AuthenticationOk => {
                if scram.is_some() {
                    // The server must prove it knows the password too (SASLFinal).
                    return Err(ReplicationError::Scram(
                        "the server accepted the login without proving it knows the \
                         password (no SCRAM final message)"
                            .into(),
                    ));
                }
                return Ok(());
            }
            Message::ErrorResponse(body) => {
                return Err(ServerError::from_fields(body.fields()).into());
            }
            Message::AuthenticationCleartextPassword => {
                tracing::debug!("server asks for a cleartext password");
                frontend::password_message(password(info)?.as_bytes(), &mut buf)
                    .map_err(|_| nul_in_password())?;
            }
            Message::AuthenticationMd5Password(body) => {
                tracing::debug!("server asks for an MD5 password");
                let hashed = md5_hash(
                    info.user.as_bytes(),
                    password(info)?.as_bytes(),
                    body.salt(),
                );
                frontend::password_message(hashed.as_bytes(), &mut buf)
                    .map_err(|_| nul_in_password())?;
            }
            Message::AuthenticationSasl(body) => {
                let mut mechanisms = Vec::new();
                let mut it = body.mechanisms();
                while let Some(m) = it.next().map_err(|e| {
                    ReplicationError::Protocol(format!("malformed SASL mechanism list: {e}"))
                })? {
                    mechanisms.push(m.to_string());
                }
                tracing::debug!(?mechanisms, "server asks for SASL authentication");
                if !mechanisms.iter().any(|m| m == SCRAM_SHA_256) {
                    if mechanisms.iter().any(|m| m == SCRAM_SHA_256_PLUS) {
                        return Err(ReplicationError::ChannelBindingRequired);
                    }
                    return Err(ReplicationError::UnsupportedAuthentication {
                        method: format!("SASL ({})", mechanisms.join(", ")),
                    });
                }
                // "n": this client does not support channel binding. (Saying "y"
                // would claim the server does not support it either, which a server
                // offering SCRAM-SHA-256-PLUS rightly rejects as a downgrade.)
                let s = ScramSha256::new(password(info)?.as_bytes(), ChannelBinding::unsupported());
                frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut buf)?;
                scram = Some(s);
            }
            Message::AuthenticationSaslContinue(body) => {
                let s = scram.as_mut().ok_or_else(|| {
                    ReplicationError::Protocol("SASLContinue without a SASL exchange".into())
                })?;
                s.update(body.data())
                    .map_err(|e| ReplicationError::Scram(e.to_string()))?;
                frontend::sasl_response(s.message(), &mut buf)?;
            }
            Message::AuthenticationSaslFinal(body) => {
                let mut s = scram.take().ok_or_else(|| {
                    ReplicationError::Protocol("SASLFinal without a SASL exchange".into())
                })?;
                s.finish(body.data()).map_err(|e| {
                    ReplicationError::Scram(format!(
                        "the server's final SCRAM message does not verify ({e}); it may not \
                         know the password, or something is intercepting the connection"
                    ))
                })?;
                continue;
            }
            Message::AuthenticationKerberosV5 => return Err(unsupported("Kerberos V5")),
            Message::AuthenticationScmCredential => return Err(unsupported("SCM credential")),
            Message::AuthenticationGss | Message::AuthenticationGssContinue(_) => {
                return Err(unsupported("GSSAPI"))
            }
            Message::AuthenticationSspi => return Err(unsupported("SSPI")),
            other => {
                return Err(ReplicationError::Protocol(format!(
                    "unexpected message during authentication: {}",
                    message_name(&other)
                )))
            }
        }
        conn.send(buf).await?;
    }
}

fn unsupported(method: &str) -> ReplicationError {
    ReplicationError::UnsupportedAuthentication {
        method: method.to_string(),
    }
}

fn nul_in_password() -> ReplicationError {
    ReplicationError::InvalidArgument("the password contains a NUL byte".into())
}
