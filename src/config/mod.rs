//! Configuration: how to reach PostgreSQL (a libpq-compatible conninfo) and Kafka.

pub mod conninfo;
pub mod file;
