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

use crate::config::conninfo::ConnInfo;

/// The settings pgcdc pins, as `-c name=value` startup options.
pub const CANONICAL_OPTIONS: &str = "-c DateStyle=ISO,YMD -c IntervalStyle=iso_8601 \
     -c TimeZone=UTC -c extra_float_digits=3 -c bytea_output=hex -c lc_monetary=C";

/// `info` with [`CANONICAL_OPTIONS`] appended to its `options`.
pub fn canonical(info: &ConnInfo) -> ConnInfo {
    let mut info = info.clone();
    info.options = Some(match info.options.take() {
        Some(own) if !own.trim().is_empty() => format!("{own} {CANONICAL_OPTIONS}"),
        _ => CANONICAL_OPTIONS.to_string(),
    });
    info
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
}
