//! Start-up helpers: wait for the cluster, create missing topics.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{BaseProducer, Producer};

use super::{client_config, config_error, join_error, KafkaConfig, PgcdcContext, Role, SinkError};

/// First delay between attempts to reach the cluster; doubles up to [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_secs(2);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);
/// How long one metadata request may take.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one attempt of [`wait_for_cluster`] waits for an answer before reporting. The
/// client keeps connecting between attempts, so a short attempt loses nothing.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a created topic may take to show up in metadata.
const CREATED_TOPIC_VISIBLE_WITHIN: Duration = Duration::from_secs(10);

/// A topic pgcdc needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    /// Number of partitions, or -1 for the broker's default (Kafka 2.4+).
    pub partitions: i32,
    /// Replication factor, or -1 for the broker's default (Kafka 2.4+). tansu 0.6 accepts
    /// -1 too, and any number: it does not check the factor against its single broker.
    pub replication: i32,
    /// `cleanup.policy=compact` (keep the latest record per key).
    pub compacted: bool,
}

/// Waits until the cluster answers a metadata request.
///
/// While it does not, logs a warning like `Kafka at 127.0.0.1:9 is unreachable (…); retrying
/// in 2s`, with delays doubling up to 30 s. Gives up with [`SinkError::Unreachable`] once
/// `give_up_after` has passed, if set; otherwise waits for as long as it takes.
pub async fn wait_for_cluster(
    cfg: &KafkaConfig,
    give_up_after: Option<Duration>,
) -> Result<(), SinkError> {
    let client: BaseProducer<PgcdcContext> = client_config(cfg, Role::Admin)
        .create_with_context(PgcdcContext::new(Role::Admin).quiet())
        .map_err(config_error)?;
    let client = super::OffThreadDrop::new(std::sync::Arc::new(client));
    let started = Instant::now();
    let deadline = give_up_after.map(|d| started + d);
    let mut delay = FIRST_RETRY_DELAY;
    loop {
        let timeout = match deadline {
            Some(d) => ATTEMPT_TIMEOUT.min(d.saturating_duration_since(Instant::now())),
            None => ATTEMPT_TIMEOUT,
        }
        .max(Duration::from_millis(100));
        let c = std::sync::Arc::clone(&client);
        let result = tokio::task::spawn_blocking(move || {
            let r = c.client().fetch_metadata(None, timeout).map(|_| ());
            // Serve the log and error events the attempt produced (the reason it failed).
            if r.is_err() {
                c.poll(Duration::from_millis(100));
            }
            r
        })
        .await;
        let err = match result {
            Ok(Ok(())) => {
                if started.elapsed() > FIRST_RETRY_DELAY {
                    tracing::info!("Kafka at {} is reachable", cfg.bootstrap);
                }
                return Ok(());
            }
            Ok(Err(e)) => e.to_string(),
            Err(join) => return Err(join_error(join)),
        };
        // librdkafka's own account ("Connect to … failed: Connection refused") says more
        // than the metadata call's error ("Broker transport failure").
        let reason = client.context().take_last_error().unwrap_or(err);
        let now = Instant::now();
        if let Some(d) = deadline {
            if now >= d {
                return Err(SinkError::Unreachable {
                    bootstrap: cfg.bootstrap.clone(),
                    waited_secs: started.elapsed().as_secs(),
                    reason,
                });
            }
        }
        let sleep = match deadline {
            Some(d) => delay.min(d.saturating_duration_since(now)),
            None => delay,
        };
        tracing::warn!(
            "Kafka at {} is unreachable ({reason}); retrying in {}",
            cfg.bootstrap,
            seconds(sleep)
        );
        tokio::time::sleep(sleep).await;
        delay = (delay * 2).min(MAX_RETRY_DELAY);
    }
}

fn seconds(d: Duration) -> String {
    if d >= Duration::from_millis(950) {
        format!("{:.0}s", d.as_secs_f64())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// Topic name → its partition count, as the cluster's metadata reports it.
pub type Partitions = HashMap<String, i32>;

/// Creates the topics of `topics` that do not exist yet, and returns the partition count of
/// each of them as the cluster reports it (a topic that did not show up in the metadata
/// within a few seconds of its creation is left out).
///
/// Existing topics are left as they are (their partition count and policy are the
/// operator's business); a topic created concurrently by someone else counts as success. A
/// refused creation fails with [`SinkError::TopicCreation`], naming the topic, the broker's
/// answer and what to do.
pub async fn ensure_topics(
    cfg: &KafkaConfig,
    topics: &[TopicSpec],
) -> Result<Partitions, SinkError> {
    for t in topics {
        // -1 asks for the broker's default (Kafka 2.4+; tansu 0.6 accepts it too).
        if t.partitions == 0 || t.partitions < -1 {
            return Err(SinkError::Config(format!(
                "topic `{}`: {} partitions; give at least 1 (or -1 for the broker's default)",
                t.name, t.partitions
            )));
        }
        if t.replication == 0 || t.replication < -1 {
            return Err(SinkError::Config(format!(
                "topic `{}`: replication factor {}; give at least 1 (or -1 for the broker's \
                 default)",
                t.name, t.replication
            )));
        }
    }
    if topics.is_empty() {
        return Ok(Partitions::new());
    }
    // One client lists, creates and polls: each new client costs a connection and a thread
    // set-up (pgcdc's start-up waits for all of it).
    let admin: AdminClient<PgcdcContext> = client_config(cfg, Role::Admin)
        .create_with_context(PgcdcContext::new(Role::Admin))
        .map_err(config_error)?;
    let admin = super::OffThreadDrop::new(Arc::new(admin));
    let existing = existing_topics(&admin, &cfg.bootstrap).await?;
    let counts = |existing: &HashMap<String, usize>| -> Partitions {
        topics
            .iter()
            .filter_map(|t| {
                let n = *existing.get(&t.name)?;
                Some((t.name.clone(), i32::try_from(n).ok().filter(|&n| n > 0)?))
            })
            .collect()
    };
    let missing: Vec<&TopicSpec> = topics
        .iter()
        .filter(|t| !existing.contains_key(&t.name))
        .collect();
    if missing.is_empty() {
        return Ok(counts(&existing));
    }

    let new_topics: Vec<NewTopic<'_>> = missing
        .iter()
        .map(|t| {
            let nt = NewTopic::new(
                &t.name,
                t.partitions,
                TopicReplication::Fixed(t.replication),
            );
            if t.compacted {
                nt.set("cleanup.policy", "compact")
            } else {
                nt
            }
        })
        .collect();
    let opts = AdminOptions::new()
        .request_timeout(Some(Duration::from_secs(30)))
        .operation_timeout(Some(Duration::from_secs(30)));
    let spec_of = |name: &str| missing.iter().find(|t| t.name == name).copied();
    let refused = |t: &TopicSpec, reason: String| SinkError::TopicCreation {
        topic: t.name.clone(),
        reason,
        partitions: t.partitions,
        replication: t.replication,
        compacted: t.compacted,
    };
    let results = match admin.create_topics(new_topics.iter(), &opts).await {
        Ok(r) => r,
        Err(e) => return Err(refused(missing[0], e.to_string())),
    };
    for result in results {
        match result {
            Ok(name) => tracing::info!(topic = %name, "created Kafka topic `{name}`"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                let reason = code.to_string();
                return Err(match spec_of(&name) {
                    Some(t) => refused(t, reason),
                    None => refused(missing[0], format!("{name}: {reason}")),
                });
            }
        }
    }

    // Let the new topics show up in metadata before anyone produces to or reads from them.
    let deadline = Instant::now() + CREATED_TOPIC_VISIBLE_WITHIN;
    // Usually a matter of milliseconds: check often at first.
    let mut pause = Duration::from_millis(10);
    loop {
        let existing = existing_topics(&admin, &cfg.bootstrap).await?;
        let all_there = missing
            .iter()
            .all(|t| existing.get(&t.name).is_some_and(|&n| n > 0));
        if all_there || Instant::now() >= deadline {
            return Ok(counts(&existing));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// Topic name → partition count, for every topic the cluster lists.
async fn existing_topics(
    admin: &Arc<AdminClient<PgcdcContext>>,
    bootstrap: &str,
) -> Result<HashMap<String, usize>, SinkError> {
    let bootstrap = bootstrap.to_string();
    let c = Arc::clone(admin);
    let result = tokio::task::spawn_blocking(move || {
        c.inner().fetch_metadata(None, METADATA_TIMEOUT).map(|md| {
            md.topics()
                .iter()
                .filter(|t| t.error().is_none())
                .map(|t| (t.name().to_string(), t.partitions().len()))
                .collect::<HashMap<_, _>>()
        })
    })
    .await;
    match result {
        Ok(Ok(map)) => Ok(map),
        Ok(Err(e)) => Err(SinkError::Unreachable {
            bootstrap,
            waited_secs: METADATA_TIMEOUT.as_secs(),
            reason: e.to_string(),
        }),
        Err(join) => Err(join_error(join)),
    }
}
