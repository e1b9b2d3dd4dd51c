//! The capability to create topics, handed to the source.
//!
//! When a table joins the publication while pgcdc streams, its topic must exist before its
//! first event is published. The source learns of the table (a Relation message) but knows
//! nothing of Kafka: it receives a [`TopicProvisioner`] from `run`, which implements it with
//! the Kafka admin client (and hands none to a stdout run, which has no topics to create).

use std::error::Error;
use std::fmt;
use std::future::Future;
use std::pin::Pin;

use super::failure::{Recoverable, Recovery};

/// A boxed future, so that [`TopicProvisioner`] is object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Creates topics that do not exist yet.
pub trait TopicProvisioner: Send + Sync {
    /// Creates `topic` unless it exists.
    fn ensure<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<(), ProvisionError>>;
}

/// A topic could not be created. Shows its cause's message as its own (the cause names the
/// fix), and carries its cause's classification.
#[derive(Debug)]
pub struct ProvisionError {
    error: Box<dyn Error + Send + Sync + 'static>,
    recovery: Recovery,
}

impl ProvisionError {
    pub fn new(
        recovery: Recovery,
        error: impl Into<Box<dyn Error + Send + Sync + 'static>>,
    ) -> Self {
        ProvisionError {
            error: error.into(),
            recovery,
        }
    }
}

impl Recoverable for ProvisionError {
    fn recovery(&self) -> Recovery {
        self.recovery
    }
}

impl fmt::Display for ProvisionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, f)
    }
}

impl Error for ProvisionError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.error.source()
    }
}
