//! libpq-compatible connection strings.
//!
//! pgcdc accepts the same two spellings as `psql` and every libpq program:
//!
//! * a URL: `postgresql://user:secret@db.example.com:5432/app?sslmode=verify-full`
//!   (`postgres://` works too; every part is percent-decoded; a host starting with
//!   `%2F` is a Unix-socket directory), and
//! * a key=value string: `host=db.example.com port=5432 user=cdc dbname=app`, where a
//!   value with spaces is single-quoted and `\'` and `\\` escape a quote and a
//!   backslash.
//!
//! Whatever the string leaves out comes, as in libpq, from the `PG*` environment
//! variables (`PGHOST`, `PGPORT`, `PGUSER`, `PGPASSWORD`, ...), then from the password
//! file (`~/.pgpass` or `PGPASSFILE`), then from the built-in defaults: the Unix socket
//! directory `/var/run/postgresql` if it exists (else `localhost`), port 5432, the
//! operating-system user, and a database named after the user.
//!
//! The password is a secret: [`ConnInfo`]'s `Debug` and `Display` print
//! `password=********`, [`ConnInfo::redacted`] gives a loggable string, and no
//! [`ConnInfoError`] ever contains it.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// The port PostgreSQL listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 5432;

/// The Unix-socket directory of Debian's and Ubuntu's PostgreSQL packages, used as the
/// default host when it exists (libpq compiled by those distributions does the same).
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/postgresql";

/// What `password` prints as in `Debug`, `Display` and [`ConnInfo::redacted`].
pub const REDACTED: &str = "********";

/// How hard the connection insists on TLS, with libpq's meaning for each value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SslMode {
    /// Never use TLS.
    Disable,
    /// Use TLS if the server insists; pgcdc tries TLS and falls back to plain text.
    Allow,
    /// Try TLS, fall back to plain text if the server does not offer it (the default).
    #[default]
    Prefer,
    /// TLS or nothing, without checking the server certificate.
    Require,
    /// TLS, and the server certificate must chain to `sslrootcert`.
    VerifyCa,
    /// As `VerifyCa`, and the certificate must also name the host connected to.
    VerifyFull,
}

impl SslMode {
    /// All values, in libpq's order from weakest to strongest.
    pub const ALL: [SslMode; 6] = [
        SslMode::Disable,
        SslMode::Allow,
        SslMode::Prefer,
        SslMode::Require,
        SslMode::VerifyCa,
        SslMode::VerifyFull,
    ];

    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether a failed or refused TLS negotiation must abort the connection.
    pub fn requires_tls(self) -> bool {
        matches!(
            self,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }

    /// Whether the server certificate chain is verified against a root certificate.
    pub fn verifies_certificate(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }

    /// Whether the certificate must name the host that was connected to.
    pub fn verifies_hostname(self) -> bool {
        self == SslMode::VerifyFull
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SslMode {
    type Err = ConnInfoError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SslMode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| ConnInfoError::InvalidValue {
                key: "sslmode",
                value: s.to_string(),
                origin: Origin::ConnectionString,
                expected: SSLMODE_EXPECTED,
            })
    }
}

const SSLMODE_EXPECTED: &str =
    "one of disable, allow, prefer, require, verify-ca, verify-full, e.g. sslmode=verify-full";

/// Where a setting came from; error messages say it so the user knows what to fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The connection string itself.
    ConnectionString,
    /// An environment variable (its name).
    Env(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::ConnectionString => f.write_str("in the connection string"),
            Origin::Env(var) => write!(f, "from the environment variable {var}"),
        }
    }
}

/// Why a connection string was rejected. No variant ever holds the password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnInfoError {
    #[error(
        "unknown connection option \"{key}\": check its spelling; pgcdc understands \
         host, hostaddr, port, user, password, dbname, sslmode, sslrootcert, sslcert, \
         sslkey, application_name, connect_timeout, options, target_session_attrs and passfile"
    )]
    UnknownKey { key: String },

    #[error("connection option \"{key}\" is not supported by pgcdc: {reason}")]
    Unsupported { key: String, reason: &'static str },

    #[error(
        "missing \"=\" after \"{key}\" in the connection string: write key=value pairs \
         separated by spaces, e.g. host=db.example.com port=5432 dbname=app"
    )]
    MissingEquals { key: String },

    #[error(
        "missing \"=\" after the password in the connection string: a password with \
         spaces must be quoted, e.g. password='with space' (write \\' for a quote and \\\\ \
         for a backslash)"
    )]
    UnquotedPasswordWithSpace,

    #[error(
        "unknown connection option right after the password (not shown, in case it is \
         the rest of a password containing spaces): a password with spaces must be \
         quoted, e.g. password='with space'; otherwise check the spelling of the option"
    )]
    UnknownKeyAfterPassword,

    #[error(
        "empty option name before \"=\" in the connection string: write key=value, \
         e.g. port=5432"
    )]
    EmptyKey,

    #[error(
        "the quoted value of \"{key}\" is never closed: end it with a single quote, and \
         write \\' for a quote and \\\\ for a backslash inside it"
    )]
    UnterminatedQuote { key: String },

    #[error("invalid {key} \"{value}\" {origin}: expected {expected}")]
    InvalidValue {
        key: &'static str,
        value: String,
        origin: Origin,
        expected: &'static str,
    },

    #[error(
        "invalid connection URL: {reason}; the form is \
         postgresql://user:password@host:port/dbname?sslmode=require"
    )]
    InvalidUrl { reason: &'static str },

    #[error(
        "invalid percent-encoding in the {part} of the connection URL: write %XX with two \
         hexadecimal digits, e.g. %40 for '@' or %2F for '/'"
    )]
    InvalidPercentEncoding { part: &'static str },

    #[error(
        "the {part} of the connection URL contains a NUL byte (%00), which PostgreSQL \
         cannot accept"
    )]
    NulByte { part: &'static str },

    #[error(
        "several hosts are given ({part}) but pgcdc connects to exactly one server: \
         name a single host"
    )]
    MultipleHosts { part: &'static str },

    #[error(
        "no user name: set user=... in the connection string, or PGUSER, or run as an \
         operating-system user (USER)"
    )]
    NoUser,
}

/// Connection settings for one PostgreSQL server, parsed like libpq does.
///
/// Build it with [`ConnInfo::parse`] (real environment) or
/// [`ConnInfo::parse_with_env`] (injected environment, for tests). The password is
/// only reachable through [`ConnInfo::password`] and never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnInfo {
    /// Host name, IP address, or (starting with `/`) a Unix-socket directory. `None`
    /// only when `hostaddr` alone says where to connect.
    pub host: Option<String>,
    /// Numeric address to connect to instead of resolving `host`; `host` is still used
    /// for TLS verification and `.pgpass` lookups.
    pub hostaddr: Option<IpAddr>,
    pub port: u16,
    pub user: String,
    password: Option<String>,
    pub dbname: String,
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
    /// `application_name`, or `fallback_application_name` when that is absent.
    pub application_name: Option<String>,
    /// `None` waits forever, like libpq's 0. Values under two seconds become two.
    pub connect_timeout: Option<Duration>,
    /// Command-line options sent to the server at startup, e.g. `-c statement_timeout=0`.
    pub options: Option<String>,
    pub target_session_attrs: Option<String>,
    ignored: Vec<String>,
}

/// The libpq options pgcdc understands.
const SUPPORTED: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "user",
    "password",
    "dbname",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "application_name",
    "fallback_application_name",
    "connect_timeout",
    "options",
    "target_session_attrs",
    "passfile",
];

/// Valid libpq options that pgcdc accepts and ignores, with a warning.
const IGNORED: &[&str] = &[
    "channel_binding",
    "client_encoding",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "replication",
    "gssencmode",
    "sslpassword",
    "sslcompression",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "sslcertmode",
    "sslnegotiation",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "krbsrvname",
    "gsslib",
    "gssdelegation",
    "load_balance_hosts",
];

/// Valid libpq options that would change where or how safely pgcdc connects if
/// ignored, so they are refused.
const REFUSED: &[(&str, &str)] = &[
    (
        "service",
        "service files are not read; spell the host, port, user and dbname out",
    ),
    (
        "require_auth",
        "the authentication method cannot be restricted; use a server-side pg_hba.conf rule",
    ),
    (
        "requirepeer",
        "peer credential checks are not implemented; remove the option",
    ),
];

const TARGET_SESSION_ATTRS: &[&str] = &[
    "any",
    "read-write",
    "read-only",
    "primary",
    "standby",
    "prefer-standby",
];

/// The environment variable that fills each option, like libpq.
const ENV_VARS: &[(&str, &str)] = &[
    ("host", "PGHOST"),
    ("hostaddr", "PGHOSTADDR"),
    ("port", "PGPORT"),
    ("user", "PGUSER"),
    ("password", "PGPASSWORD"),
    ("dbname", "PGDATABASE"),
    ("sslmode", "PGSSLMODE"),
    ("sslrootcert", "PGSSLROOTCERT"),
    ("sslcert", "PGSSLCERT"),
    ("sslkey", "PGSSLKEY"),
    ("application_name", "PGAPPNAME"),
    ("connect_timeout", "PGCONNECT_TIMEOUT"),
    ("options", "PGOPTIONS"),
    ("target_session_attrs", "PGTARGETSESSIONATTRS"),
    ("passfile", "PGPASSFILE"),
];

/// Raw settings collected from the string, before environment and defaults.
#[derive(Default)]
struct Raw {
    values: Vec<(&'static str, String)>,
    ignored: Vec<String>,
}

impl Raw {
    fn set(&mut self, key: &str, value: String) -> Result<(), ConnInfoError> {
        if let Some(known) = SUPPORTED.iter().find(|k| **k == key) {
            self.values.retain(|(k, _)| k != known);
            self.values.push((known, value));
            return Ok(());
        }
        if let Some((k, reason)) = REFUSED.iter().find(|(k, _)| *k == key) {
            return Err(ConnInfoError::Unsupported {
                key: (*k).to_string(),
                reason,
            });
        }
        if IGNORED.contains(&key) {
            // Ignoring these would silently weaken security: refuse instead.
            if (key == "channel_binding" || key == "gssencmode") && value == "require" {
                return Err(ConnInfoError::Unsupported {
                    key: key.to_string(),
                    reason: if key == "channel_binding" {
                        "channel binding is not implemented, so it cannot be required; \
                         use sslmode=verify-full to authenticate the server instead"
                    } else {
                        "GSSAPI encryption is not implemented; use sslmode=require or stronger"
                    },
                });
            }
            if !self.ignored.iter().any(|k| k == key) {
                self.ignored.push(key.to_string());
            }
            return Ok(());
        }
        Err(ConnInfoError::UnknownKey {
            key: key.to_string(),
        })
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.values
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    }
}

impl ConnInfo {
    /// Parses a URL or key=value string, filling gaps from the process environment.
    pub fn parse(s: &str) -> Result<ConnInfo, ConnInfoError> {
        ConnInfo::parse_with_env(s, |k| std::env::var(k).ok())
    }

    /// Parses a URL or key=value string, filling gaps from `env` instead of the process
    /// environment. `env` is asked for the `PG*` variables, `USER`/`LOGNAME` (default
    /// user) and `HOME` (default `~/.pgpass`).
    pub fn parse_with_env<F>(s: &str, env: F) -> Result<ConnInfo, ConnInfoError>
    where
        F: Fn(&str) -> Option<String>,
    {
        let trimmed = s.trim();
        let mut raw = Raw::default();
        if trimmed.starts_with("postgresql://") || trimmed.starts_with("postgres://") {
            parse_url(trimmed, &mut raw)?;
        } else {
            parse_key_values(trimmed, &mut raw)?;
        }
        for key in &raw.ignored {
            tracing::warn!(
                option = %key,
                "connection option \"{key}\" is valid for libpq but ignored by pgcdc"
            );
        }
        ConnInfo::resolve(raw, &env)
    }

    /// Fills gaps from the environment and defaults, then validates every value.
    fn resolve(raw: Raw, env: &dyn Fn(&str) -> Option<String>) -> Result<ConnInfo, ConnInfoError> {
        // A value and where it came from; empty values count as absent, as in libpq.
        let lookup = |key: &'static str| -> Option<(String, Origin)> {
            if let Some(v) = raw.get(key).filter(|v| !v.is_empty()) {
                return Some((v.to_string(), Origin::ConnectionString));
            }
            let var = ENV_VARS.iter().find(|(k, _)| *k == key)?.1;
            env(var)
                .filter(|v| !v.is_empty())
                .map(|v| (v, Origin::Env(var)))
        };

        let hostaddr = match lookup("hostaddr") {
            None => None,
            Some((v, origin)) => Some(v.parse::<IpAddr>().map_err(|_| {
                if v.contains(',') {
                    ConnInfoError::MultipleHosts { part: "hostaddr" }
                } else {
                    ConnInfoError::InvalidValue {
                        key: "hostaddr",
                        value: v.clone(),
                        origin,
                        expected: "a numeric IPv4 or IPv6 address, e.g. hostaddr=10.0.0.5",
                    }
                }
            })?),
        };

        let host = match lookup("host") {
            Some((v, _)) if v.contains(',') => {
                return Err(ConnInfoError::MultipleHosts { part: "host" })
            }
            Some((v, _)) => Some(v),
            None if hostaddr.is_some() => None,
            None if Path::new(DEFAULT_SOCKET_DIR).is_dir() => Some(DEFAULT_SOCKET_DIR.to_string()),
            None => Some("localhost".to_string()),
        };

        let port = match lookup("port") {
            None => DEFAULT_PORT,
            Some((v, _)) if v.contains(',') => {
                return Err(ConnInfoError::MultipleHosts { part: "port" })
            }
            Some((v, origin)) => match v.trim().parse::<u16>() {
                Ok(p) if p != 0 => p,
                _ => {
                    return Err(ConnInfoError::InvalidValue {
                        key: "port",
                        value: v,
                        origin,
                        expected: "a number between 1 and 65535, e.g. port=5432",
                    })
                }
            },
        };

        let user = match lookup("user") {
            Some((v, _)) => v,
            None => env("USER")
                .or_else(|| env("LOGNAME"))
                .filter(|v| !v.is_empty())
                .ok_or(ConnInfoError::NoUser)?,
        };

        let dbname = lookup("dbname")
            .map(|(v, _)| v)
            .unwrap_or_else(|| user.clone());

        let sslmode = match lookup("sslmode") {
            None => SslMode::default(),
            Some((v, origin)) => SslMode::ALL.into_iter().find(|m| m.as_str() == v).ok_or(
                ConnInfoError::InvalidValue {
                    key: "sslmode",
                    value: v,
                    origin,
                    expected: SSLMODE_EXPECTED,
                },
            )?,
        };

        let connect_timeout =
            match lookup("connect_timeout") {
                None => None,
                Some((v, origin)) => match v.trim().parse::<i64>() {
                    Ok(secs) if secs <= 0 => None,
                    // libpq: "It is not recommended to use a timeout of less than 2 seconds."
                    // and it rounds 1 up to 2.
                    Ok(secs) => Some(Duration::from_secs(secs.max(2) as u64)),
                    Err(_) => return Err(ConnInfoError::InvalidValue {
                        key: "connect_timeout",
                        value: v,
                        origin,
                        expected:
                            "a whole number of seconds (0 waits forever), e.g. connect_timeout=10",
                    }),
                },
            };

        let target_session_attrs = match lookup("target_session_attrs") {
            None => None,
            Some((v, origin)) => {
                if !TARGET_SESSION_ATTRS.contains(&v.as_str()) {
                    return Err(ConnInfoError::InvalidValue {
                        key: "target_session_attrs",
                        value: v,
                        origin,
                        expected: "one of any, read-write, read-only, primary, standby, \
                                   prefer-standby, e.g. target_session_attrs=read-write",
                    });
                }
                Some(v)
            }
        };

        let application_name = lookup("application_name").map(|(v, _)| v).or_else(|| {
            raw.get("fallback_application_name")
                .filter(|v| !v.is_empty())
                .map(str::to_string)
        });

        let path = |key| lookup(key).map(|(v, _)| PathBuf::from(v));

        let mut info = ConnInfo {
            host,
            hostaddr,
            port,
            user,
            password: lookup("password").map(|(v, _)| v),
            dbname,
            sslmode,
            sslrootcert: path("sslrootcert"),
            sslcert: path("sslcert"),
            sslkey: path("sslkey"),
            application_name,
            connect_timeout,
            options: lookup("options").map(|(v, _)| v),
            target_session_attrs,
            ignored: raw.ignored.clone(),
        };

        if info.password.is_none() {
            let passfile = path("passfile")
                .or_else(|| env("HOME").map(|home| Path::new(&home).join(".pgpass")));
            if let Some(passfile) = passfile {
                info.password = pgpass::lookup(&passfile, &info);
            }
        }
        Ok(info)
    }

    /// The password, from the string, `PGPASSWORD` or the password file.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// Replaces the password (`None` removes it).
    pub fn set_password(&mut self, password: Option<String>) {
        self.password = password;
    }

    /// Options that libpq knows but pgcdc ignored (a warning was logged for each).
    pub fn ignored_options(&self) -> &[String] {
        &self.ignored
    }

    /// Whether `host` names a Unix-socket directory.
    pub fn is_unix_socket(&self) -> bool {
        self.hostaddr.is_none() && self.host.as_deref().is_some_and(|h| h.starts_with('/'))
    }

    /// The socket file, `<dir>/.s.PGSQL.<port>`, for a Unix-socket connection.
    pub fn unix_socket_path(&self) -> Option<PathBuf> {
        if !self.is_unix_socket() {
            return None;
        }
        let dir = self.host.as_deref()?;
        Some(Path::new(dir).join(format!(".s.PGSQL.{}", self.port)))
    }

    /// The name a server certificate must carry under `verify-full`: the host, or the
    /// `hostaddr` when no host is given. `None` for Unix sockets.
    pub fn tls_server_name(&self) -> Option<String> {
        if self.is_unix_socket() {
            return None;
        }
        match (&self.host, self.hostaddr) {
            (Some(h), _) if !h.starts_with('/') => Some(h.clone()),
            (_, Some(addr)) => Some(addr.to_string()),
            _ => None,
        }
    }

    /// Where the connection goes, for messages: `db.example.com:5432`,
    /// `db.example.com (10.0.0.5):5432` or `/var/run/postgresql/.s.PGSQL.5432`.
    pub fn target(&self) -> String {
        if let Some(path) = self.unix_socket_path() {
            return path.display().to_string();
        }
        let port = self.port;
        match (&self.host, self.hostaddr) {
            (Some(h), Some(a)) => format!("{h} ({a}):{port}"),
            (Some(h), None) => format!("{h}:{port}"),
            (None, Some(IpAddr::V6(a))) => format!("[{a}]:{port}"),
            (None, Some(a)) => format!("{a}:{port}"),
            (None, None) => format!("localhost:{port}"),
        }
    }

    /// The settings as a key=value string that is safe to log: the password, if any,
    /// is `********`. Values are quoted where needed, so apart from the password the
    /// string parses back to the same settings.
    pub fn redacted(&self) -> String {
        let mut out = Vec::new();
        let mut push = |k: &str, v: &str| out.push(format!("{k}={}", quote_value(v)));
        if let Some(h) = &self.host {
            push("host", h);
        }
        if let Some(a) = self.hostaddr {
            push("hostaddr", &a.to_string());
        }
        push("port", &self.port.to_string());
        push("user", &self.user);
        if self.password.is_some() {
            out.push(format!("password={REDACTED}"));
        }
        let mut push = |k: &str, v: &str| out.push(format!("{k}={}", quote_value(v)));
        push("dbname", &self.dbname);
        push("sslmode", self.sslmode.as_str());
        for (k, p) in [
            ("sslrootcert", &self.sslrootcert),
            ("sslcert", &self.sslcert),
            ("sslkey", &self.sslkey),
        ] {
            if let Some(p) = p {
                push(k, &p.display().to_string());
            }
        }
        if let Some(v) = &self.application_name {
            push("application_name", v);
        }
        if let Some(t) = self.connect_timeout {
            push("connect_timeout", &t.as_secs().to_string());
        }
        if let Some(v) = &self.options {
            push("options", v);
        }
        if let Some(v) = &self.target_session_attrs {
            push("target_session_attrs", v);
        }
        out.join(" ")
    }
}

impl fmt::Display for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnInfo")
            .field("host", &self.host)
            .field("hostaddr", &self.hostaddr)
            .field("port", &self.port)
            .field("user", &self.user)
            .field(
                "password",
                &format_args!(
                    "{}",
                    if self.password.is_some() {
                        REDACTED
                    } else {
                        "None"
                    }
                ),
            )
            .field("dbname", &self.dbname)
            .field("sslmode", &self.sslmode)
            .field("sslrootcert", &self.sslrootcert)
            .field("sslcert", &self.sslcert)
            .field("sslkey", &self.sslkey)
            .field("application_name", &self.application_name)
            .field("connect_timeout", &self.connect_timeout)
            .field("options", &self.options)
            .field("target_session_attrs", &self.target_session_attrs)
            .finish()
    }
}

impl FromStr for ConnInfo {
    type Err = ConnInfoError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ConnInfo::parse(s)
    }
}

/// Quotes a value for a key=value string when it needs it.
fn quote_value(v: &str) -> String {
    let plain = !v.is_empty()
        && !v
            .chars()
            .any(|c| c.is_whitespace() || c == '\'' || c == '\\' || c == '=');
    if plain {
        return v.to_string();
    }
    let mut out = String::with_capacity(v.len() + 2);
    out.push('\'');
    for c in v.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// Parses `key=value key2='quoted value'` the way libpq does.
fn parse_key_values(s: &str, raw: &mut Raw) -> Result<(), ConnInfoError> {
    let mut chars = s.chars().peekable();
    let mut previous_key: Option<String> = None;
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(());
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next_if_eq(&'=').is_none() {
            // A stray word right after an unquoted password is very likely the rest of
            // a password containing a space: never echo it.
            if previous_key.as_deref() == Some("password") {
                return Err(ConnInfoError::UnquotedPasswordWithSpace);
            }
            return Err(ConnInfoError::MissingEquals { key });
        }
        if key.is_empty() {
            return Err(ConnInfoError::EmptyKey);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => return Err(ConnInfoError::UnterminatedQuote { key }),
                    Some('\'') => break,
                    Some('\\') => match chars.next() {
                        None => return Err(ConnInfoError::UnterminatedQuote { key }),
                        Some(c) => value.push(c),
                    },
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some(escaped) = chars.next() {
                        value.push(escaped);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        match raw.set(&key, value) {
            Err(ConnInfoError::UnknownKey { .. })
                if previous_key.as_deref() == Some("password") =>
            {
                return Err(ConnInfoError::UnknownKeyAfterPassword)
            }
            other => other?,
        }
        previous_key = Some(key);
    }
}

/// Parses `postgres[ql]://[user[:password]@][host][:port][/dbname][?key=value&...]`.
fn parse_url(s: &str, raw: &mut Raw) -> Result<(), ConnInfoError> {
    let rest = s
        .strip_prefix("postgresql://")
        .or_else(|| s.strip_prefix("postgres://"))
        .ok_or(ConnInfoError::InvalidUrl {
            reason: "it must start with postgresql:// or postgres://",
        })?;
    if rest.contains('#') {
        return Err(ConnInfoError::InvalidUrl {
            reason: "it contains '#', which must be written %23",
        });
    }
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    // libpq ends the user-info at the first '@'; a password containing '@' or '/'
    // must be percent-encoded.
    let (userinfo, hostpart_and_path) = match before_query.find(['@', '/']) {
        Some(i) if before_query.as_bytes()[i] == b'@' => {
            (Some(&before_query[..i]), &before_query[i + 1..])
        }
        _ => (None, before_query),
    };
    if let Some(userinfo) = userinfo {
        let (user, password) = match userinfo.split_once(':') {
            Some((u, p)) => (u, Some(p)),
            None => (userinfo, None),
        };
        raw.set("user", percent_decode(user, "user name")?)?;
        if let Some(p) = password {
            raw.set("password", percent_decode(p, "password")?)?;
        }
    }
    let (hostport, path) = match hostpart_and_path.split_once('/') {
        Some((h, p)) => (h, Some(p)),
        None => (hostpart_and_path, None),
    };
    if hostport.contains(',') {
        return Err(ConnInfoError::MultipleHosts { part: "URL" });
    }
    let (host, port) = if let Some(bracketed) = hostport.strip_prefix('[') {
        let (addr, after) = bracketed.split_once(']').ok_or(ConnInfoError::InvalidUrl {
            reason: "an IPv6 address opened with '[' is never closed with ']'",
        })?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or(ConnInfoError::InvalidUrl {
                reason: "only ':port' may follow a bracketed IPv6 address",
            })?),
        };
        (addr.to_string(), port)
    } else {
        match hostport.split_once(':') {
            Some((h, p)) => (percent_decode(h, "host")?, Some(p)),
            None => (percent_decode(hostport, "host")?, None),
        }
    };
    if !host.is_empty() {
        raw.set("host", host)?;
    }
    if let Some(port) = port {
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ConnInfoError::InvalidUrl {
                reason: "the port after the host must be a number, e.g. :5432",
            });
        }
        raw.set("port", port.to_string())?;
    }
    if let Some(path) = path.filter(|p| !p.is_empty()) {
        raw.set("dbname", percent_decode(path, "database name")?)?;
    }
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or(ConnInfoError::InvalidUrl {
            reason: "every query parameter needs a value, e.g. ?sslmode=require",
        })?;
        let key = percent_decode(k, "query parameter name")?;
        let part = if key == "password" {
            "password"
        } else {
            "query parameter value"
        };
        let value = percent_decode(v, part)?;
        if key == "ssl" {
            // JDBC compatibility, as in libpq: ssl=true means sslmode=require.
            if value == "true" {
                raw.set("sslmode", "require".to_string())?;
                continue;
            }
            return Err(ConnInfoError::InvalidValue {
                key: "ssl",
                value,
                origin: Origin::ConnectionString,
                expected: "true (or use sslmode=...)",
            });
        }
        raw.set(&key, value)?;
    }
    Ok(())
}

/// Decodes `%XX` escapes (only those: `+` stays `+`, as in libpq).
fn percent_decode(s: &str, part: &'static str) -> Result<String, ConnInfoError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(ConnInfoError::InvalidPercentEncoding { part })?;
            if hex == 0 {
                return Err(ConnInfoError::NulByte { part });
            }
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ConnInfoError::InvalidPercentEncoding { part })
}

/// The password file (`~/.pgpass`), read with libpq's rules.
mod pgpass {
    use super::ConnInfo;
    use std::path::Path;

    /// The password of the first line matching host, port, database and user, if any.
    ///
    /// Lines are `hostname:port:database:username:password`; `*` matches anything in
    /// the first four fields; `\` escapes `:` and `\`; `#` starts a comment line. A
    /// Unix-socket connection matches the host name `localhost`. Like libpq, a file that
    /// group or others can read is ignored with a warning.
    pub(super) fn lookup(path: &Path, info: &ConnInfo) -> Option<String> {
        let meta = std::fs::metadata(path).ok()?;
        if !meta.is_file() {
            return None;
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    "password file has group or world access; permissions should be \
                     u=rw (0600) or less; ignoring it"
                );
                return None;
            }
        }
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read password file");
                return None;
            }
        };
        let host = if info.is_unix_socket() {
            "localhost".to_string()
        } else {
            match (&info.host, info.hostaddr) {
                (Some(h), _) => h.clone(),
                (None, Some(a)) => a.to_string(),
                (None, None) => "localhost".to_string(),
            }
        };
        let port = info.port.to_string();
        find(&text, [&host, &port, &info.dbname, &info.user])
    }

    /// Searches pgpass-formatted `text` for the first line matching `wanted`.
    pub(super) fn find(text: &str, wanted: [&str; 4]) -> Option<String> {
        text.lines()
            .map(|l| l.trim_end_matches('\r'))
            .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
            .find_map(|line| match_line(line, wanted))
            .filter(|p| !p.is_empty())
    }

    fn match_line(line: &str, wanted: [&str; 4]) -> Option<String> {
        let mut chars = line.chars();
        for want in wanted {
            let mut field = String::new();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '\\' => field.push(chars.next()?),
                    ':' => {
                        closed = true;
                        break;
                    }
                    c => field.push(c),
                }
            }
            if !closed || (field != "*" && field != want) {
                return None;
            }
        }
        // The rest of the line is the password; backslashes escape.
        let mut password = String::new();
        while let Some(c) = chars.next() {
            if c == '\\' {
                if let Some(e) = chars.next() {
                    password.push(e);
                }
            } else {
                password.push(c);
            }
        }
        Some(password)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const SECRET: &str = "s3cr3t-Pw";

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    /// An environment with a user and no password file, so tests are hermetic.
    fn base_env() -> impl Fn(&str) -> Option<String> {
        env_of(&[("USER", "osuser")])
    }

    fn parse(s: &str) -> Result<ConnInfo, ConnInfoError> {
        ConnInfo::parse_with_env(s, base_env())
    }

    #[test]
    fn key_value_basic() {
        let c = parse(
            "host=db.example.com port=6543 user=cdc password=pw dbname=app \
             sslmode=verify-full sslrootcert=/etc/ca.pem application_name=me \
             connect_timeout=10 options='-c statement_timeout=0' target_session_attrs=read-write",
        )
        .unwrap();
        assert_eq!(c.host.as_deref(), Some("db.example.com"));
        assert_eq!(c.port, 6543);
        assert_eq!(c.user, "cdc");
        assert_eq!(c.password(), Some("pw"));
        assert_eq!(c.dbname, "app");
        assert_eq!(c.sslmode, SslMode::VerifyFull);
        assert_eq!(c.sslrootcert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(c.application_name.as_deref(), Some("me"));
        assert_eq!(c.connect_timeout, Some(Duration::from_secs(10)));
        assert_eq!(c.options.as_deref(), Some("-c statement_timeout=0"));
        assert_eq!(c.target_session_attrs.as_deref(), Some("read-write"));
        assert!(!c.is_unix_socket());
        assert_eq!(c.target(), "db.example.com:6543");
        assert_eq!(c.tls_server_name().as_deref(), Some("db.example.com"));
    }

    #[test]
    fn key_value_quoting_and_spacing() {
        let c = parse(r"host = h  user='it\'s me'  password='a \\ b c' dbname=''").unwrap();
        assert_eq!(c.host.as_deref(), Some("h"));
        assert_eq!(c.user, "it's me");
        assert_eq!(c.password(), Some(r"a \ b c"));
        // An empty value counts as absent: dbname defaults to the user.
        assert_eq!(c.dbname, "it's me");
        // Backslash escapes in unquoted values too, as in libpq.
        let c = parse(r"host=h user=a\ b").unwrap();
        assert_eq!(c.user, "a b");
        // The last occurrence of a key wins.
        let c = parse("host=h port=1 port=2").unwrap();
        assert_eq!(c.port, 2);
    }

    #[test]
    fn url_full() {
        let c = parse(
            "postgresql://us%40er:p%40ss%2Fw:rd@db.example.com:6000/my%20db?sslmode=require&application_name=x",
        )
        .unwrap();
        assert_eq!(c.user, "us@er");
        assert_eq!(c.password(), Some("p@ss/w:rd"));
        assert_eq!(c.host.as_deref(), Some("db.example.com"));
        assert_eq!(c.port, 6000);
        assert_eq!(c.dbname, "my db");
        assert_eq!(c.sslmode, SslMode::Require);
        assert_eq!(c.application_name.as_deref(), Some("x"));
    }

    #[test]
    fn url_variants() {
        let c = parse("postgres://h").unwrap();
        assert_eq!(c.host.as_deref(), Some("h"));
        assert_eq!(c.user, "osuser");
        assert_eq!(c.dbname, "osuser");
        assert_eq!(c.port, 5432);

        let c = parse("postgresql://[::1]:5433/db").unwrap();
        assert_eq!(c.host.as_deref(), Some("::1"));
        assert_eq!(c.port, 5433);
        assert_eq!(c.tls_server_name().as_deref(), Some("::1"));

        let c = parse("postgresql://%2Ftmp%2Fsock/db?port=7000").unwrap();
        assert!(c.is_unix_socket());
        assert_eq!(
            c.unix_socket_path(),
            Some(PathBuf::from("/tmp/sock/.s.PGSQL.7000"))
        );
        assert_eq!(c.tls_server_name(), None);

        let c = parse("postgresql:///db?host=/run/pg&user=u").unwrap();
        assert_eq!(c.host.as_deref(), Some("/run/pg"));
        assert_eq!(c.user, "u");

        let c = parse("postgresql://u@h/db?ssl=true").unwrap();
        assert_eq!(c.sslmode, SslMode::Require);
        assert_eq!(c.password(), None);

        // '+' is not a space in libpq URLs.
        let c = parse("postgresql://h/a+b").unwrap();
        assert_eq!(c.dbname, "a+b");
    }

    #[test]
    fn hostaddr_and_target() {
        let c = parse("hostaddr=10.1.2.3 port=5000").unwrap();
        assert_eq!(c.host, None);
        assert_eq!(c.target(), "10.1.2.3:5000");
        assert_eq!(c.tls_server_name().as_deref(), Some("10.1.2.3"));
        let c = parse("host=db hostaddr=::1").unwrap();
        assert_eq!(c.target(), "db (::1):5432");
        assert_eq!(c.tls_server_name().as_deref(), Some("db"));
    }

    #[test]
    fn env_fallback_and_defaults() {
        let env = env_of(&[
            ("PGHOST", "envhost"),
            ("PGPORT", "7777"),
            ("PGUSER", "envuser"),
            ("PGPASSWORD", "envpw"),
            ("PGDATABASE", "envdb"),
            ("PGSSLMODE", "verify-ca"),
            ("PGSSLROOTCERT", "/ca.pem"),
            ("PGAPPNAME", "envapp"),
            ("PGCONNECT_TIMEOUT", "1"),
            ("USER", "osuser"),
        ]);
        let c = ConnInfo::parse_with_env("", &env).unwrap();
        assert_eq!(c.host.as_deref(), Some("envhost"));
        assert_eq!(c.port, 7777);
        assert_eq!(c.user, "envuser");
        assert_eq!(c.password(), Some("envpw"));
        assert_eq!(c.dbname, "envdb");
        assert_eq!(c.sslmode, SslMode::VerifyCa);
        assert_eq!(c.sslrootcert, Some(PathBuf::from("/ca.pem")));
        assert_eq!(c.application_name.as_deref(), Some("envapp"));
        // libpq rounds 1 second up to 2.
        assert_eq!(c.connect_timeout, Some(Duration::from_secs(2)));

        // The string wins over the environment.
        let c = ConnInfo::parse_with_env("host=h user=u sslmode=disable", &env).unwrap();
        assert_eq!(c.host.as_deref(), Some("h"));
        assert_eq!(c.user, "u");
        assert_eq!(c.dbname, "envdb");
        assert_eq!(c.sslmode, SslMode::Disable);

        // Defaults.
        let c = ConnInfo::parse_with_env("", base_env()).unwrap();
        let expected_host = if Path::new(DEFAULT_SOCKET_DIR).is_dir() {
            DEFAULT_SOCKET_DIR
        } else {
            "localhost"
        };
        assert_eq!(c.host.as_deref(), Some(expected_host));
        assert_eq!(c.port, 5432);
        assert_eq!(c.user, "osuser");
        assert_eq!(c.dbname, "osuser");
        assert_eq!(c.sslmode, SslMode::Prefer);
        assert_eq!(c.password(), None);
        assert_eq!(c.connect_timeout, None);

        let c = ConnInfo::parse_with_env("host=h", env_of(&[("LOGNAME", "ln")])).unwrap();
        assert_eq!(c.user, "ln");
        assert_eq!(
            ConnInfo::parse_with_env("host=h", env_of(&[])).unwrap_err(),
            ConnInfoError::NoUser
        );
        let c = parse("host=h connect_timeout=0").unwrap();
        assert_eq!(c.connect_timeout, None);
        let c = parse("host=h fallback_application_name=fb").unwrap();
        assert_eq!(c.application_name.as_deref(), Some("fb"));
        let c = parse("host=h fallback_application_name=fb application_name=app").unwrap();
        assert_eq!(c.application_name.as_deref(), Some("app"));
    }

    #[test]
    fn env_errors_name_the_variable() {
        let env = env_of(&[("USER", "u"), ("PGPORT", "fifty")]);
        let err = ConnInfo::parse_with_env("host=h", env).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("PGPORT"), "{msg}");
        assert!(msg.contains("fifty"), "{msg}");
        assert!(msg.contains("port=5432"), "{msg}");
    }

    fn write_pgpass(contents: &str, mode: u32) -> (PathBuf, impl Drop) {
        struct Cleanup(PathBuf);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "pgcdc-pgpass-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, contents).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let _ = mode;
        (path.clone(), Cleanup(path))
    }

    #[test]
    fn pgpass_lookup() {
        let (path, _guard) = write_pgpass(
            "# comment\n\
             other:5432:*:cdc:wrong\n\
             db.example.com:5432:app:cdc:right\\:colon\n\
             *:*:*:cdc:fallback\n\
             localhost:5432:*:sock:socketpw\n",
            0o600,
        );
        let p = path.to_str().unwrap();
        let env = env_of(&[("USER", "osuser"), ("PGPASSFILE", p)]);
        let c = ConnInfo::parse_with_env("host=db.example.com user=cdc dbname=app", &env).unwrap();
        assert_eq!(c.password(), Some("right:colon"));
        let c = ConnInfo::parse_with_env("host=elsewhere user=cdc", &env).unwrap();
        assert_eq!(c.password(), Some("fallback"));
        // Unix sockets match "localhost".
        let c = ConnInfo::parse_with_env("host=/tmp user=sock", &env).unwrap();
        assert_eq!(c.password(), Some("socketpw"));
        let c = ConnInfo::parse_with_env("host=h user=nobody", &env).unwrap();
        assert_eq!(c.password(), None);
        // An explicit password wins over the file.
        let c = ConnInfo::parse_with_env("host=h user=cdc password=given", &env).unwrap();
        assert_eq!(c.password(), Some("given"));
        // passfile= in the string, and ~/.pgpass via HOME.
        let c =
            ConnInfo::parse_with_env(&format!("host=h user=cdc passfile={p}"), base_env()).unwrap();
        assert_eq!(c.password(), Some("fallback"));
    }

    #[cfg(unix)]
    #[test]
    fn pgpass_readable_by_others_is_ignored() {
        let (path, _guard) = write_pgpass("*:*:*:*:pw\n", 0o644);
        let env = env_of(&[("USER", "u"), ("PGPASSFILE", path.to_str().unwrap())]);
        let c = ConnInfo::parse_with_env("host=h", env).unwrap();
        assert_eq!(c.password(), None);
    }

    #[test]
    fn pgpass_line_matching() {
        assert_eq!(
            pgpass::find("h:1:d:u:pw", ["h", "1", "d", "u"]).as_deref(),
            Some("pw")
        );
        assert_eq!(pgpass::find("h:1:d:u", ["h", "1", "d", "u"]), None);
        assert_eq!(pgpass::find("h:1:d:u:", ["h", "1", "d", "u"]), None);
        assert_eq!(
            pgpass::find(r"h\:x:1:d:u:p\\w", ["h:x", "1", "d", "u"]).as_deref(),
            Some(r"p\w")
        );
        assert_eq!(
            pgpass::find("h:1:d:u:pw\\", ["h", "1", "d", "u"]).as_deref(),
            Some("pw")
        );
    }

    #[test]
    fn ignored_and_refused_options() {
        let c = parse("host=h keepalives=1 client_encoding=UTF8 channel_binding=prefer").unwrap();
        assert_eq!(
            c.ignored_options(),
            ["keepalives", "client_encoding", "channel_binding"]
        );
        let err = parse("host=h service=prod").unwrap_err();
        assert!(matches!(err, ConnInfoError::Unsupported { .. }), "{err}");
        let err = parse("host=h channel_binding=require").unwrap_err();
        assert!(err.to_string().contains("channel_binding"), "{err}");
        let err = parse("host=h hots=x").unwrap_err();
        assert_eq!(err, ConnInfoError::UnknownKey { key: "hots".into() });
        assert!(err.to_string().contains("\"hots\""));
        let err = parse("postgresql://h/db?bogus=1").unwrap_err();
        assert_eq!(
            err,
            ConnInfoError::UnknownKey {
                key: "bogus".into()
            }
        );
    }

    #[test]
    fn bad_input() {
        type Check = fn(&ConnInfoError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("host", |e| matches!(e, ConnInfoError::MissingEquals { .. })),
            ("host=h port", |e| {
                matches!(e, ConnInfoError::MissingEquals { .. })
            }),
            ("=x", |e| matches!(e, ConnInfoError::EmptyKey)),
            ("host='abc", |e| {
                matches!(e, ConnInfoError::UnterminatedQuote { .. })
            }),
            ("host='abc\\", |e| {
                matches!(e, ConnInfoError::UnterminatedQuote { .. })
            }),
            ("host=h port=0", |e| {
                matches!(e, ConnInfoError::InvalidValue { key: "port", .. })
            }),
            ("host=h port=70000", |e| {
                matches!(e, ConnInfoError::InvalidValue { key: "port", .. })
            }),
            ("host=h sslmode=maybe", |e| {
                matches!(e, ConnInfoError::InvalidValue { key: "sslmode", .. })
            }),
            ("host=h connect_timeout=x", |e| {
                matches!(
                    e,
                    ConnInfoError::InvalidValue {
                        key: "connect_timeout",
                        ..
                    }
                )
            }),
            ("hostaddr=db.example.com", |e| {
                matches!(
                    e,
                    ConnInfoError::InvalidValue {
                        key: "hostaddr",
                        ..
                    }
                )
            }),
            ("host=h target_session_attrs=x", |e| {
                matches!(e, ConnInfoError::InvalidValue { .. })
            }),
            ("host=a,b", |e| {
                matches!(e, ConnInfoError::MultipleHosts { .. })
            }),
            ("postgresql://a,b/db", |e| {
                matches!(e, ConnInfoError::MultipleHosts { .. })
            }),
            ("postgresql://h:port/db", |e| {
                matches!(e, ConnInfoError::InvalidUrl { .. })
            }),
            ("postgresql://[::1/db", |e| {
                matches!(e, ConnInfoError::InvalidUrl { .. })
            }),
            ("postgresql://h/db?sslmode", |e| {
                matches!(e, ConnInfoError::InvalidUrl { .. })
            }),
            ("postgresql://h/d%zzb", |e| {
                matches!(e, ConnInfoError::InvalidPercentEncoding { .. })
            }),
            ("postgresql://h/d%00b", |e| {
                matches!(e, ConnInfoError::NulByte { .. })
            }),
            ("postgresql://h/db#frag", |e| {
                matches!(e, ConnInfoError::InvalidUrl { .. })
            }),
            ("postgresql://h/db?ssl=yes", |e| {
                matches!(e, ConnInfoError::InvalidValue { .. })
            }),
        ];
        for (input, check) in cases {
            let err = parse(input).expect_err(input);
            assert!(check(&err), "{input:?} gave {err:?}");
            // Every message explains itself at some length.
            assert!(err.to_string().len() > 30, "{input:?}: {err}");
        }
        let msg = parse("host=h sslmode=maybe").unwrap_err().to_string();
        assert!(
            msg.contains("verify-full") && msg.contains("\"maybe\""),
            "{msg}"
        );
    }

    #[test]
    fn redaction() {
        let c = parse(&format!(
            "host=h user=u password={SECRET} dbname='my db' application_name=a"
        ))
        .unwrap();
        let shown = [
            c.to_string(),
            format!("{c:?}"),
            format!("{c:#?}"),
            c.redacted(),
        ];
        for s in &shown {
            assert!(!s.contains(SECRET), "password leaked: {s}");
            assert!(s.contains(REDACTED), "no redaction marker: {s}");
        }
        assert_eq!(
            c.redacted(),
            "host=h port=5432 user=u password=******** dbname='my db' sslmode=prefer application_name=a"
        );
        // Apart from the password the redacted string parses back to the same settings.
        let mut back = parse(&c.redacted()).unwrap();
        back.set_password(Some(SECRET.to_string()));
        assert_eq!(back, c);

        let c = parse("host=h user=u").unwrap();
        assert!(!c.redacted().contains("password"));
        assert!(format!("{c:?}").contains("password: None"));
    }

    #[test]
    fn errors_never_contain_the_password() {
        let inputs = [
            format!("host=h password={SECRET} tail"),
            format!("host=h password={SECRET} more words here"),
            format!("host=h password='{SECRET}"),
            format!("host=h password={SECRET} port=x"),
            format!("host=h password={SECRET} sslmode=bogus"),
            format!("host=h password={SECRET} bogus=1"),
            format!("host=h password=a {SECRET}=1"),
            format!("postgresql://u:{SECRET}@h:x/db"),
            format!("postgresql://u:{SECRET}%zz@h/db"),
            format!("postgresql://u:{SECRET}%00@h/db"),
            format!("postgresql://u:{SECRET}@h/db?password={SECRET}%g1"),
            format!("postgresql://u:{SECRET}@a,b/db"),
            format!("postgresql://u:{SECRET}@[::1/db"),
            format!("postgresql://u:{SECRET}@h/db?sslmode=no"),
            format!("postgresql://u:{SECRET}@h/db#x"),
        ];
        for input in &inputs {
            let err = parse(input).expect_err(input);
            let shown = format!("{err} {err:?}");
            assert!(
                !shown.contains(SECRET),
                "password leaked by {input:?}: {shown}"
            );
        }
        // The special case: words after an unquoted password are never echoed.
        let err = parse("host=h password=alpha bravo").unwrap_err();
        assert_eq!(err, ConnInfoError::UnquotedPasswordWithSpace);
        assert!(!err.to_string().contains("bravo"));
    }

    #[test]
    fn sslmode_helpers() {
        for m in SslMode::ALL {
            assert_eq!(m.as_str().parse::<SslMode>().unwrap(), m);
        }
        assert!(SslMode::VerifyFull.verifies_hostname());
        assert!(!SslMode::VerifyCa.verifies_hostname());
        assert!(SslMode::VerifyCa.verifies_certificate());
        assert!(SslMode::Require.requires_tls());
        assert!(!SslMode::Prefer.requires_tls());
    }
}
