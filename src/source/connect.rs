//! Ordinary (non-replication) connections through tokio-postgres, for queries and
//! COPY, built from the same [`ConnInfo`] as the replication connection and with the
//! same `sslmode` semantics.
//!
//! tokio-postgres itself knows only `disable`, `prefer` and `require`; `verify-ca` and
//! `verify-full` are `require` plus OpenSSL verification configured here (chain
//! against `sslrootcert`, and the host name only for `verify-full`).

use crate::source::pg_tls::MakeTls;
use tokio_postgres::config::{SslMode as PgSslMode, TargetSessionAttrs};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{Client, Config, NoTls, Socket};

use crate::source::conninfo::{ConnInfo, SslMode};
use crate::source::replication::tls::{self, TlsError};

/// Why an ordinary connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Tls(#[from] TlsError),

    /// The message is complete in itself (the server's error, or the network's, and how to
    /// fix it), so `error` is not chained as a source: printing the chain would repeat it.
    #[error("could not connect to PostgreSQL at {target}: {}", explain(error))]
    Postgres {
        target: String,
        error: tokio_postgres::Error,
    },

    #[error(
        "target_session_attrs={0} is not supported for pgcdc's connections: use any, \
         read-write or read-only"
    )]
    UnsupportedTargetSessionAttrs(String),
}

impl ConnectError {
    /// The SQLSTATE when the server refused the connection.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ConnectError::Postgres { error, .. } => error.code().map(|c| c.code()),
            _ => None,
        }
    }

    /// Whether retrying may help: network errors, and the server shutting down,
    /// starting up or out of connections. Authentication, TLS and configuration
    /// errors are definite.
    pub fn is_transient(&self) -> bool {
        match self {
            ConnectError::Postgres { error, .. } => is_transient(error),
            _ => false,
        }
    }
}

/// Whether a connection or query error may clear on its own: the connection was lost (an
/// I/O error somewhere in the chain, or closed), or the server is shutting down, starting up,
/// out of connections, or ended the session (SQLSTATE class 08, 57P01–57P03, 53300).
pub(crate) fn is_transient(error: &tokio_postgres::Error) -> bool {
    match error.code() {
        Some(code) => {
            let c = code.code();
            c.starts_with("08") || ["57P01", "57P02", "57P03", "53300"].contains(&c)
        }
        None => {
            let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
            let mut io = error.is_closed();
            while let Some(c) = cause {
                io |= c.is::<std::io::Error>();
                cause = c.source();
            }
            io
        }
    }
}

/// The server's or the network's account of a failed connection, with the fix for the
/// mistakes users make most: wrong password, unknown user or database, unknown host, nothing
/// listening.
fn explain(e: &tokio_postgres::Error) -> String {
    let fix = if let Some(db) = e.as_db_error() {
        match db.code().code() {
            "28P01" => {
                ". Fix: check the password (password= in --source, PGPASSWORD, or ~/.pgpass)"
            }
            "28000" => ". Fix: check the user name, and that pg_hba.conf lets it connect from here",
            "3D000" => {
                ". Fix: create the database, or name an existing one with dbname= in --source \
                 (or PGDATABASE)"
            }
            _ => "",
        }
    } else {
        let innermost = innermost(e);
        let io_kind = innermost
            .downcast_ref::<std::io::Error>()
            .map(std::io::Error::kind);
        if innermost.to_string().contains("lookup address") {
            ". Fix: check host= in --source (or PGHOST): the name does not resolve"
        } else if io_kind == Some(std::io::ErrorKind::ConnectionRefused) {
            ". Fix: check that PostgreSQL runs and listens on that address and port \
             (listen_addresses, port)"
        } else {
            ""
        }
    };
    format!("{}{fix}", describe(e))
}

/// A tokio-postgres error in one line, without repeating itself: the server's severity, code,
/// message (and detail and hint, when it sent them), or what happened on the network. An
/// error shown this way is not chained as a source as well, which printed "db error" twice.
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut out = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
        if let Some(detail) = db.detail() {
            out.push_str(&format!(" ({detail})"));
        }
        if let Some(hint) = db.hint() {
            out.push_str(&format!(". Hint: {hint}"));
        }
        return out;
    }
    // The innermost cause says what happened on the network.
    let what = innermost(e).to_string();
    if what == e.to_string() {
        what
    } else {
        format!("{e}: {what}")
    }
}

fn innermost(e: &tokio_postgres::Error) -> &(dyn std::error::Error + 'static) {
    let mut innermost: &(dyn std::error::Error + 'static) = e;
    while let Some(c) = innermost.source() {
        innermost = c;
    }
    innermost
}

/// Builds the tokio-postgres configuration for `info` (without TLS).
pub fn config(info: &ConnInfo) -> Result<Config, ConnectError> {
    let mut config = Config::new();
    if let Some(host) = &info.host {
        if host.starts_with('/') {
            config.host_path(host);
        } else {
            config.host(host);
        }
    }
    if let Some(addr) = info.hostaddr {
        config.hostaddr(addr);
        if info.host.is_none() {
            config.host(addr.to_string());
        }
    }
    config
        .port(info.port)
        .user(&info.user)
        .dbname(&info.dbname)
        .keepalives(true)
        .application_name(
            info.application_name
                .as_deref()
                .unwrap_or(crate::source::replication::DEFAULT_APPLICATION_NAME),
        );
    if let Some(password) = info.password() {
        config.password(password);
    }
    if let Some(options) = &info.options {
        config.options(options);
    }
    if let Some(timeout) = info.connect_timeout {
        config.connect_timeout(timeout);
    }
    let tsa = match info.target_session_attrs.as_deref() {
        None | Some("any") => TargetSessionAttrs::Any,
        Some("read-write") => TargetSessionAttrs::ReadWrite,
        Some("read-only") => TargetSessionAttrs::ReadOnly,
        Some(other) => return Err(ConnectError::UnsupportedTargetSessionAttrs(other.into())),
    };
    config.target_session_attrs(tsa);
    config.ssl_mode(if info.is_unix_socket() {
        // As in libpq, TLS is not used over Unix sockets.
        PgSslMode::Disable
    } else {
        match tls::effective_mode(info) {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Allow | SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => PgSslMode::Require,
        }
    });
    Ok(config)
}

/// Builds the TLS connector with `info`'s verification rules.
pub fn tls_connector(info: &ConnInfo) -> Result<MakeTls, TlsError> {
    Ok(MakeTls::new(
        tls::build_connector(info)?,
        tls::effective_mode(info),
    ))
}

/// Opens an ordinary connection and spawns its driver task on the current tokio
/// runtime; the driver's final error, if any, is logged.
pub async fn connect(info: &ConnInfo) -> Result<Client, ConnectError> {
    let config = config(info)?;
    if info.is_unix_socket() || tls::effective_mode(info) == SslMode::Disable {
        spawn_connect(info, &config, NoTls).await
    } else {
        spawn_connect(info, &config, tls_connector(info)?).await
    }
}

/// Asks the server to cancel what `client` runs now (a wait for a lock, say), on a
/// connection of its own made with `info`'s TLS rules. Best effort, and a few seconds at most:
/// the caller is giving up on the query anyway.
pub async fn cancel(client: &Client, info: &ConnInfo) {
    let token = client.cancel_token();
    let sent = async {
        if info.is_unix_socket() || tls::effective_mode(info) == SslMode::Disable {
            token.cancel_query(NoTls).await.ok()
        } else {
            match tls_connector(info) {
                Ok(tls) => token.cancel_query(tls).await.ok(),
                Err(_) => None,
            }
        }
    };
    if tokio::time::timeout(std::time::Duration::from_secs(3), sent)
        .await
        .ok()
        .flatten()
        .is_none()
    {
        tracing::debug!("could not cancel a query (the connection ends with pgcdc anyway)");
    }
}

async fn spawn_connect<T>(info: &ConnInfo, config: &Config, tls: T) -> Result<Client, ConnectError>
where
    T: MakeTlsConnect<Socket> + 'static + Send,
    T::TlsConnect: Send,
    T::Stream: Send + 'static,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    let (client, connection) =
        config
            .connect(tls)
            .await
            .map_err(|error| ConnectError::Postgres {
                target: info.target(),
                error,
            })?;
    let target = info.target();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::error!(target_addr = %target, error = %e, "PostgreSQL connection failed");
        }
    });
    Ok(client)
}
