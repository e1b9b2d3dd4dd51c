//! `pgcdc drop`: remove what `run` created for a slot — the slot, the publication and the
//! stored progress — so that nothing keeps WAL on the server and a later run starts afresh.
//!
//! A running pgcdc holds the slot's lock (see [`crate::source::slot_lock`]) for its whole
//! life, also while it takes a snapshot and does not read the slot yet: `drop` refuses then.
//!
//! Order matters. The slot goes first: while it exists it pins WAL, and dropping it is the
//! step that can be refused (another process reads it). The progress record goes last, and
//! only after the slot is gone: a record without its slot is harmless (the next run takes a
//! new snapshot), a slot whose record says "completed" but belongs to another run is not.
//! Topics and their events stay: they are the consumers' data.

use anyhow::anyhow;
use tokio::sync::{oneshot, watch};
use tokio_postgres::error::SqlState;

use crate::checkpoint::ProgressStore;
use crate::cli::DropArgs;
use crate::kafka;
use crate::model::failure::{Classify, Failure, FailureKind};
use crate::model::Lsn;
use crate::model::{Record, SinkItem};
use crate::sink;
use crate::source::catalog::quote_ident;
use crate::source::slot_lock;

/// Runs `pgcdc drop`; returns the exit code.
pub async fn run(args: DropArgs) -> Result<u8, Failure> {
    let (_, client) = super::connect_source(&args.conn).await?;
    let slot = args.conn.pg.slot.as_str();
    let row = client
        .query_opt(
            "SELECT active, active_pid, database::text FROM pg_replication_slots \
             WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .or_fail(FailureKind::Source)?;
    let database: String = match row.as_ref().and_then(|r| r.get::<_, Option<String>>(2)) {
        Some(db) => db,
        None => client
            .query_one("SELECT current_database()::text", &[])
            .await
            .or_fail(FailureKind::Source)?
            .get(0),
    };
    if let Some(r) = &row {
        let active: bool = r.get(0);
        let pid: Option<i32> = r.get(1);
        if active {
            return Err(in_use(slot, pid));
        }
    }
    // A pgcdc taking its snapshot holds the slot's lock but does not read the slot yet (see
    // source::slot_lock). Held from here to the end, it also keeps a new pgcdc out meanwhile.
    if !slot_lock::try_lock(&client, slot)
        .await
        .or_fail(FailureKind::Source)?
    {
        let holder = slot_lock::holder(&client, slot).await;
        return Err(Failure::new(
            FailureKind::Source,
            anyhow!(
                "another pgcdc is running for slot `{slot}` ({holder}): stop it first, then run \
                 drop again; nothing was removed"
            ),
        ));
    }
    let publication_exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&args.publication.name],
        )
        .await
        .or_fail(FailureKind::Source)?
        .is_some();
    let location = super::progress_store(&args.conn, &database);

    let mut plan = Vec::new();
    if row.is_some() {
        plan.push(format!("replication slot `{slot}`"));
    }
    if publication_exists && !args.keep_publication {
        plan.push(format!("publication `{}`", args.publication.name));
    }
    plan.push(format!("the progress record ({})", location.describe()));
    if !args.yes {
        eprintln!("pgcdc drop would remove:");
        for p in &plan {
            eprintln!("  - {p}");
        }
        return Err(Failure::new(
            FailureKind::Usage,
            anyhow!("nothing removed: add --yes to remove the above"),
        ));
    }

    if row.is_some() {
        match client
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
        {
            Ok(_) => tracing::info!(slot, "dropped replication slot"),
            Err(e) if e.code() == Some(&SqlState::OBJECT_IN_USE) => {
                // Became active between the check and the drop.
                let pid = client
                    .query_opt(
                        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                        &[&slot],
                    )
                    .await
                    .ok()
                    .flatten()
                    .and_then(|r| r.get::<_, Option<i32>>(0));
                return Err(in_use(slot, pid));
            }
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_OBJECT) => {
                tracing::info!(slot, "the slot was already gone");
            }
            Err(e) => {
                return Err(Failure::new(
                    FailureKind::Source,
                    anyhow::Error::new(e).context(format!(
                        "cannot drop replication slot `{slot}` (the role needs REPLICATION)"
                    )),
                ))
            }
        }
    } else {
        tracing::info!(slot, "no such replication slot; nothing to drop there");
    }

    if args.keep_publication {
        tracing::info!(publication = %args.publication.name, "keeping the publication (--keep-publication)");
    } else if publication_exists {
        client
            .batch_execute(&format!(
                "DROP PUBLICATION IF EXISTS {}",
                quote_ident(&args.publication.name)
            ))
            .await
            .map_err(|e| {
                Failure::new(
                    FailureKind::Source,
                    anyhow::Error::new(e).context(format!(
                        "cannot drop publication `{}`: drop it as its owner, or pass \
                         --keep-publication",
                        args.publication.name
                    )),
                )
            })?;
        tracing::info!(publication = %args.publication.name, "dropped publication");
    }

    remove_progress(&location).await?;
    tracing::info!(progress = %location.describe(), "removed the progress record");
    Ok(0)
}

fn in_use(slot: &str, pid: Option<i32>) -> Failure {
    let who = pid.map_or("another process".to_string(), |p| format!("process {p}"));
    Failure::new(
        FailureKind::Source,
        anyhow!(
            "replication slot `{slot}` is in use by {who}: stop that pgcdc first (or end it: \
             SELECT pg_terminate_backend({})), then run drop again; nothing was removed",
            pid.map_or("<pid>".to_string(), |p| p.to_string())
        ),
    )
}

/// Deletes the progress file, or writes a tombstone for the record's key (compaction then
/// forgets it; readers treat a tombstone as "no record" at once).
async fn remove_progress(location: &ProgressStore) -> Result<(), Failure> {
    match location {
        ProgressStore::File(f) => match std::fs::remove_file(&f.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Failure::new(
                FailureKind::Sink,
                anyhow!("cannot remove progress file {}: {e}", f.path.display()),
            )),
        },
        ProgressStore::Kafka { cfg, topic, key } => {
            if location.load().await?.is_none() {
                return Ok(());
            }
            kafka::wait_for_cluster(cfg, Some(std::time::Duration::from_secs(30)))
                .await
                .or_fail(FailureKind::Sink)?;
            let producer = sink::KafkaSink::new(cfg.clone()).or_fail(FailureKind::Sink)?;
            let (tx, rx) = crate::model::channel(4, crate::model::channel::CHANNEL_BYTES);
            let (acked, _) = watch::channel(Lsn::INVALID);
            let task = tokio::spawn(sink::run(sink::Sink::Kafka(producer), rx, acked));
            let (done_tx, done_rx) = oneshot::channel();
            let sent = tx
                .send(SinkItem::Record(Record {
                    topic: topic.as_str().into(),
                    key: Some(key.clone().into_bytes().into()),
                    value: None,
                    partition: None,
                    headers: Vec::new(),
                }))
                .await
                .is_ok()
                && tx.send(SinkItem::Barrier(done_tx)).await.is_ok();
            drop(tx);
            let result = task.await;
            match result {
                Ok(Ok(_)) if sent && done_rx.await.is_ok() => Ok(()),
                Ok(Err(e)) => Err(Failure::new(FailureKind::Sink, e)),
                _ => Err(Failure::new(
                    FailureKind::Sink,
                    anyhow!("could not write the tombstone for {key} to {topic}"),
                )),
            }
        }
    }
}
