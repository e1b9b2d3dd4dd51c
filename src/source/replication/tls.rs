//! TLS with libpq's `sslmode` semantics, shared by the replication connection and the
//! ordinary tokio-postgres connection ([`crate::source::connect`]).
//!
//! | sslmode | TLS | certificate chain | host name |
//! |---|---|---|---|
//! | disable | never | | |
//! | allow, prefer | if the server offers it | not checked | not checked |
//! | require | mandatory | not checked (checked, like verify-ca, when `sslrootcert` is set — libpq does the same) | not checked |
//! | verify-ca | mandatory | against `sslrootcert` | not checked |
//! | verify-full | mandatory | against `sslrootcert` | must match `host` (or `hostaddr`) |
//!
//! `sslrootcert` defaults to `~/.postgresql/root.crt`; `sslrootcert=system` uses the
//! operating system's trust store. `sslcert`/`sslkey` present a client certificate.
//! Over Unix sockets TLS is never attempted, as in libpq.

use std::path::PathBuf;
use std::sync::Mutex;

use openssl::error::ErrorStack;
use openssl::ssl::{ConnectConfiguration, SslConnector, SslFiletype, SslMethod, SslVerifyMode};

use crate::source::conninfo::{ConnInfo, SslMode};

/// Why TLS could not be set up or negotiated.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "sslmode={mode} needs a root certificate to verify the server, but none was \
         found: set sslrootcert=/path/to/root.crt (or PGSSLROOTCERT), or install it as \
         ~/.postgresql/root.crt, or use sslrootcert=system for the system trust store"
    )]
    MissingRootCert { mode: SslMode },

    #[error("cannot load the {what} from {}: {source}", path.display())]
    Load {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: ErrorStack,
    },

    #[error(
        "sslcert is set without sslkey (or the reverse): give both the client \
         certificate and its private key"
    )]
    IncompleteClientCert,

    #[error("cannot set up TLS: {0}")]
    Setup(#[from] ErrorStack),

    #[error(
        "the server at {target} does not accept TLS, but sslmode={mode} requires it: \
         enable ssl on the server, or use sslmode=prefer to allow unencrypted connections"
    )]
    NotOffered { target: String, mode: SslMode },

    #[error("TLS handshake with {target} failed: {detail}")]
    Handshake { target: String, detail: String },

    #[error("the server at {target} sent an unexpected answer (byte 0x{byte:02x}) to the TLS request; is this a PostgreSQL server?")]
    BadAnswer { target: String, byte: u8 },
}

/// The sslmode actually applied: `require` with an explicit `sslrootcert` verifies the
/// chain, as libpq does.
pub(crate) fn effective_mode(info: &ConnInfo) -> SslMode {
    if info.sslmode == SslMode::Require && info.sslrootcert.is_some() {
        SslMode::VerifyCa
    } else {
        info.sslmode
    }
}

fn default_root_cert() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let path = PathBuf::from(home).join(".postgresql").join("root.crt");
    path.is_file().then_some(path)
}

/// An OpenSSL connector for `info`'s sslmode (not `disable`), reused while the settings stay
/// the same: building one loads the system trust store (~40 ms of CPU), and every start opens
/// two connections and every reconnect another. The key includes the certificate files'
/// modification times, so rotated certificates are picked up by the next connection.
pub(crate) fn build_connector(info: &ConnInfo) -> Result<SslConnector, TlsError> {
    // One entry: a process connects to one source.
    static LAST: Mutex<Option<(String, SslConnector)>> = Mutex::new(None);
    let with_mtime = |p: Option<PathBuf>| {
        let modified = p
            .as_ref()
            .and_then(|p| std::fs::metadata(p).ok())
            .and_then(|m| m.modified().ok());
        (p, modified)
    };
    let key = format!(
        "{:?}|{:?}|{:?}|{:?}",
        effective_mode(info),
        with_mtime(info.sslrootcert.clone().or_else(default_root_cert)),
        with_mtime(info.sslcert.clone()),
        with_mtime(info.sslkey.clone()),
    );
    if let Ok(last) = LAST.lock() {
        if let Some((_, c)) = last.as_ref().filter(|(k, _)| *k == key) {
            return Ok(c.clone());
        }
    }
    let connector = new_connector(info)?;
    if let Ok(mut last) = LAST.lock() {
        *last = Some((key, connector.clone()));
    }
    Ok(connector)
}

fn new_connector(info: &ConnInfo) -> Result<SslConnector, TlsError> {
    let mode = effective_mode(info);
    let mut builder = SslConnector::builder(SslMethod::tls_client())?;
    if mode.verifies_certificate() {
        builder.set_verify(SslVerifyMode::PEER);
        let root = match &info.sslrootcert {
            Some(p) => Some(p.clone()),
            None => default_root_cert(),
        };
        match root {
            Some(p) if p.as_os_str() == "system" => builder.set_default_verify_paths()?,
            Some(p) => builder.set_ca_file(&p).map_err(|source| TlsError::Load {
                what: "root certificate (sslrootcert)",
                path: p.clone(),
                source,
            })?,
            None => return Err(TlsError::MissingRootCert { mode }),
        }
    } else {
        builder.set_verify(SslVerifyMode::NONE);
    }
    match (&info.sslcert, &info.sslkey) {
        (Some(cert), Some(key)) => {
            builder
                .set_certificate_chain_file(cert)
                .map_err(|source| TlsError::Load {
                    what: "client certificate (sslcert)",
                    path: cert.clone(),
                    source,
                })?;
            builder
                .set_private_key_file(key, SslFiletype::PEM)
                .map_err(|source| TlsError::Load {
                    what: "client key (sslkey)",
                    path: key.clone(),
                    source,
                })?;
        }
        (None, None) => {}
        _ => return Err(TlsError::IncompleteClientCert),
    }
    Ok(builder.build())
}

/// Per-connection settings: the host name is checked only under verify-full.
pub(crate) fn configure(config: &mut ConnectConfiguration, mode: SslMode) {
    config.set_verify_hostname(mode.verifies_hostname());
}

/// A readable description of a failed handshake, including the certificate
/// verification result when that is what failed.
pub(crate) fn describe_handshake_error(
    err: &openssl::ssl::Error,
    verify: Option<openssl::x509::X509VerifyResult>,
) -> String {
    match verify {
        Some(v) if v != openssl::x509::X509VerifyResult::OK => {
            format!(
                "certificate verification failed: {} (check sslrootcert, and that the \
                 certificate names the host for verify-full)",
                v.error_string()
            )
        }
        _ => err.to_string(),
    }
}
