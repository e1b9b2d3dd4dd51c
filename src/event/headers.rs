//! The Kafka headers pgcdc puts on its records. Names are NUL-terminated (librdkafka takes
//! C strings) and shared: a builder makes each [`Arc`] once and clones it per record.

use std::ffi::CStr;
use std::sync::Arc;

/// The stable id of an event, the same when a crash makes pgcdc publish it again: consumers
/// deduplicate replays by it (README, "Event ids").
pub const EVENT_ID: &CStr = c"pgcdc-event-id";

/// The transaction's annotations, the JSON object also found in `source.annotations`.
pub const ANNOTATIONS: &CStr = c"pgcdc-annotations";

/// A shared header name.
pub fn name(n: &CStr) -> Arc<CStr> {
    Arc::from(n)
}
