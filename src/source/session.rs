//! One canonical text form for every value, on both of pgcdc's connections.
//!
//! Values reach the encoder as PostgreSQL's text output — from `COPY` on the snapshot
//! connection and from pgoutput on the replication connection — and several types print
//! according to session settings: dates and times (`DateStyle`, `TimeZone`), intervals
//! (`IntervalStyle`), floats (`extra_float_digits`), `bytea` (`bytea_output`) and `money`
//! (`lc_monetary`). If the two sessions differed, one row would encode differently when read
//! and when streamed. So both connections are opened with the same settings in the startup
//! packet's `options`, which the walsender honours just like a normal backend. They are
//! appended after the user's own `options`, so a user setting for something else is kept,
//! and pgcdc's value wins for these few.
//!
//! The same options switch off the server's session timeouts, which a role or database may
//! set (`ALTER ROLE … SET statement_timeout`) for its interactive users: a snapshot's `COPY`
//! lasts as long as the table takes to read, its transaction sits idle while the sink waits
//! for Kafka or while other connections read (`--snapshot-workers`), and a wait for a table
//! lock lasts until the lock is free. A timeout shorter than that ended the snapshot, and the
//! next one ended the same way, for ever. `statement_timeout`, `lock_timeout` and
//! `idle_in_transaction_session_timeout` exist in every supported version; PostgreSQL 14's
//! `idle_session_timeout` would end the connections pgcdc keeps open and idle (the one that
//! holds the slot's lock, the replication connection while the snapshot is read), but an
//! unknown name in the startup options is a fatal error on older servers, so it is added only
//! once the server's version is known ([`for_server`], and [`pin_idle`] for the connection
//! that learned it).

use crate::source::conninfo::ConnInfo;

/// The settings pgcdc pins, as `-c name=value` startup options.
pub const CANONICAL_OPTIONS: &str = "-c DateStyle=ISO,YMD -c IntervalStyle=iso_8601 \
     -c TimeZone=UTC -c extra_float_digits=3 -c bytea_output=hex -c lc_monetary=C \
     -c statement_timeout=0 -c lock_timeout=0 -c idle_in_transaction_session_timeout=0";

/// `idle_session_timeout` first exists in this version.
const IDLE_SESSION_TIMEOUT_SINCE: u32 = 140_000;

/// The option that keeps PostgreSQL 14+ from ending a connection pgcdc leaves idle.
const IDLE_OPTION: &str = "-c idle_session_timeout=0";

/// `info` with [`CANONICAL_OPTIONS`] appended to its `options`.
pub fn canonical(info: &ConnInfo) -> ConnInfo {
    let mut info = info.clone();
    info.options = Some(match info.options.take() {
        Some(own) if !own.trim().is_empty() => format!("{own} {CANONICAL_OPTIONS}"),
        _ => CANONICAL_OPTIONS.to_string(),
    });
    info
}

/// `info` (already [`canonical`]) for a server of version `version_num`: on PostgreSQL 14+
/// it also switches off `idle_session_timeout`.
pub fn for_server(info: &ConnInfo, version_num: u32) -> ConnInfo {
    let mut info = info.clone();
    if version_num >= IDLE_SESSION_TIMEOUT_SINCE {
        info.options = Some(match info.options.take() {
            Some(own) if !own.trim().is_empty() => format!("{own} {IDLE_OPTION}"),
            _ => IDLE_OPTION.to_string(),
        });
    }
    info
}

/// Switches off `idle_session_timeout` on a connection opened before the server's version
/// was known (see [`for_server`]).
pub async fn pin_idle(
    client: &tokio_postgres::Client,
    version_num: u32,
) -> Result<(), tokio_postgres::Error> {
    if version_num >= IDLE_SESSION_TIMEOUT_SINCE {
        client.batch_execute("SET idle_session_timeout = 0").await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_to_the_users_options() {
        let own =
            ConnInfo::parse_with_env("host=h user=u options='-c statement_timeout=0'", |_| None)
                .unwrap();
        let c = canonical(&own);
        let opts = c.options.unwrap();
        assert!(
            opts.starts_with("-c statement_timeout=0 -c DateStyle=ISO,YMD"),
            "{opts}"
        );
        let none = ConnInfo::parse_with_env("host=h user=u", |_| None).unwrap();
        assert_eq!(canonical(&none).options.as_deref(), Some(CANONICAL_OPTIONS));
    }

    #[test]
    fn idle_session_timeout_only_for_servers_that_know_it() {
        let c = canonical(&ConnInfo::parse_with_env("host=h user=u", |_| None).unwrap());
        assert_eq!(for_server(&c, 130_011).options, c.options);
        let opts = for_server(&c, 140_000).options.unwrap();
        assert!(
            opts.starts_with(CANONICAL_OPTIONS) && opts.ends_with(" -c idle_session_timeout=0"),
            "{opts}"
        );
    }
}
