//! Configuration: the `--config` file, merged under the command line's flags ([`file`]).
//! How to reach PostgreSQL (a libpq-compatible conninfo) is the source's:
//! [`crate::source::conninfo`].

pub mod file;
