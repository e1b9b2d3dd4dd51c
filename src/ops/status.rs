//! `pgcdc status`: one slot's health, from PostgreSQL's point of view and pgcdc's.
//!
//! A logical slot is a promise PostgreSQL keeps at the cost of disk: it retains every WAL
//! segment from the slot's `restart_lsn` on, whether or not anyone reads the slot. A stopped
//! pgcdc therefore fills the disk of a busy primary, or — with `max_slot_wal_keep_size` —
//! gets its slot invalidated and must snapshot again. This command shows the numbers that
//! tell which way it is going (retained bytes, `wal_status`, `safe_wal_size`) and exits 5
//! when the slot needs attention, so it can serve as a cron or monitoring check.

use anyhow::anyhow;
use serde::Serialize;

use super::{human_bytes, EXIT_UNHEALTHY};
use crate::checkpoint::{Progress, SnapshotState};
use crate::cli::StatusArgs;
use crate::model::failure::{Classify, Failure, FailureKind};
use crate::model::Lsn;

/// Everything `status` reports; also its `--json` form.
#[derive(Debug, Serialize)]
pub struct SlotStatus {
    pub slot: String,
    pub exists: bool,
    pub database: Option<String>,
    pub plugin: Option<String>,
    pub active: bool,
    pub active_pid: Option<i32>,
    pub restart_lsn: Option<String>,
    pub confirmed_flush_lsn: Option<String>,
    /// The server's current WAL position.
    pub current_wal_lsn: String,
    /// WAL kept for the slot: current position minus `restart_lsn`.
    pub retained_wal_bytes: Option<i64>,
    /// How far the confirmed position is behind the server: current minus confirmed.
    pub lag_bytes: Option<i64>,
    /// The walsender's replay lag as PostgreSQL measures it, when the slot is active.
    pub replay_lag_ms: Option<i64>,
    /// `reserved`, `extended`, `unreserved` (about to be lost) or `lost`.
    pub wal_status: Option<String>,
    /// Bytes that can still be written before the slot is invalidated (with
    /// `max_slot_wal_keep_size`), if limited.
    pub safe_wal_size: Option<i64>,
    pub max_retained_wal_bytes: u64,
    pub progress: Option<ProgressView>,
    /// Where the progress record was looked for.
    pub progress_location: String,
    pub healthy: bool,
    pub warnings: Vec<String>,
}

/// The progress record, for display.
#[derive(Debug, Serialize)]
pub struct ProgressView {
    /// `in_progress`, `completed` or `skipped`.
    pub snapshot: &'static str,
    pub tables: Vec<String>,
    pub snapshot_rows: Option<u64>,
    /// The slot's consistent point when pgcdc created it.
    pub slot_lsn: String,
    pub updated_ms: i64,
}

impl From<&Progress> for ProgressView {
    fn from(p: &Progress) -> Self {
        let (snapshot, tables, rows) = match &p.snapshot {
            SnapshotState::InProgress { tables, .. } => ("in_progress", tables.clone(), None),
            SnapshotState::Completed { tables, rows } => ("completed", tables.clone(), Some(*rows)),
            SnapshotState::Skipped => ("skipped", Vec::new(), None),
        };
        ProgressView {
            snapshot,
            tables,
            snapshot_rows: rows,
            slot_lsn: Lsn(p.slot_lsn).to_string(),
            updated_ms: p.updated_ms,
        }
    }
}

/// Runs `pgcdc status`; returns the exit code (0 healthy, 5 needs attention).
pub async fn run(args: StatusArgs) -> Result<u8, Failure> {
    let (_, client) = super::connect_source(&args.conn).await?;
    let status = inspect(&client, &args).await?;
    if args.output.json {
        let text = serde_json::to_string_pretty(&status)
            .map_err(|e| Failure::new(FailureKind::Usage, anyhow!("cannot encode JSON: {e}")))?;
        println!("{text}");
    } else {
        print!("{}", render(&status));
    }
    for w in &status.warnings {
        tracing::warn!(slot = %status.slot, "{w}");
    }
    Ok(if status.healthy { 0 } else { EXIT_UNHEALTHY })
}

/// Gathers the slot's state and the progress record.
pub async fn inspect(
    client: &tokio_postgres::Client,
    args: &StatusArgs,
) -> Result<SlotStatus, Failure> {
    let slot = args.conn.pg.slot.as_str();
    let row = client
        .query_one(
            "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
                    ELSE pg_current_wal_lsn() END, current_database()::text",
            &[],
        )
        .await
        .or_fail(FailureKind::Source)?;
    let current: Option<Lsn> = row.try_get(0).or_fail(FailureKind::Source)?;
    let current_db: String = row.get(1);
    let current_lsn = current.unwrap_or_default();

    let slot_row = client
        .query_opt(
            "SELECT coalesce(plugin::text, ''), database::text, active, active_pid, \
                    restart_lsn, confirmed_flush_lsn, wal_status, safe_wal_size \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .or_fail(FailureKind::Source)?;

    let mut s = SlotStatus {
        slot: slot.to_string(),
        exists: slot_row.is_some(),
        database: None,
        plugin: None,
        active: false,
        active_pid: None,
        restart_lsn: None,
        confirmed_flush_lsn: None,
        current_wal_lsn: current_lsn.to_string(),
        retained_wal_bytes: None,
        lag_bytes: None,
        replay_lag_ms: None,
        wal_status: None,
        safe_wal_size: None,
        max_retained_wal_bytes: args.max_retained_wal,
        progress: None,
        progress_location: String::new(),
        healthy: true,
        warnings: Vec::new(),
    };
    if let Some(r) = &slot_row {
        let restart: Option<Lsn> = r.try_get(4).or_fail(FailureKind::Source)?;
        let confirmed: Option<Lsn> = r.try_get(5).or_fail(FailureKind::Source)?;
        s.plugin = Some(r.get(0));
        s.database = r.get(1);
        s.active = r.get(2);
        s.active_pid = r.get(3);
        s.restart_lsn = restart.map(|l| l.to_string());
        s.confirmed_flush_lsn = confirmed.map(|l| l.to_string());
        s.retained_wal_bytes = restart.map(|l| current_lsn.0.saturating_sub(l.0) as i64);
        s.lag_bytes = confirmed.map(|l| current_lsn.0.saturating_sub(l.0) as i64);
        s.wal_status = r.get(6);
        s.safe_wal_size = r.get(7);
        if let Some(pid) = s.active_pid {
            let lag = client
                .query_opt(
                    "SELECT (extract(epoch FROM replay_lag) * 1000)::int8 \
                     FROM pg_stat_replication WHERE pid = $1",
                    &[&pid],
                )
                .await
                .or_fail(FailureKind::Source)?;
            s.replay_lag_ms = lag.and_then(|r| r.get(0));
        }
    }

    let database = s.database.clone().unwrap_or(current_db);
    let location = super::progress_store(&args.conn, &database);
    s.progress_location = location.describe();
    let progress = location.load().await?;
    s.progress = progress.as_ref().map(ProgressView::from);

    assess(&mut s, progress.as_ref());
    Ok(s)
}

/// Fills `warnings` and `healthy`.
fn assess(s: &mut SlotStatus, progress: Option<&Progress>) {
    let slot = s.slot.clone();
    if !s.exists {
        s.warnings.push(format!(
            "slot `{slot}` does not exist: pgcdc has not run with --slot {slot} on this database, \
             or the slot was dropped; the next `pgcdc run` takes a new snapshot"
        ));
    }
    match s.wal_status.as_deref() {
        Some("lost") => s.warnings.push(format!(
            "slot `{slot}` is INVALIDATED (wal_status lost): the WAL it needed was removed, so \
             changes were lost for it. Fix: `pgcdc drop --slot {slot} --yes`, then run pgcdc \
             again for a fresh snapshot"
        )),
        Some("unreserved") => s.warnings.push(format!(
            "slot `{slot}` is about to be invalidated (wal_status unreserved, {} left before \
             max_slot_wal_keep_size is reached): start pgcdc now, or raise max_slot_wal_keep_size",
            s.safe_wal_size.map_or("little".into(), human_bytes)
        )),
        _ => {}
    }
    if let Some(retained) = s.retained_wal_bytes {
        if retained > 0 && retained as u64 > s.max_retained_wal_bytes {
            let who = if s.active {
                "pgcdc is running but not keeping up (check its logs and the sink)"
            } else {
                "no pgcdc is reading it: start pgcdc, or drop the slot if it is no longer needed"
            };
            s.warnings.push(format!(
                "slot `{slot}` retains {} of WAL, more than --max-retained-wal {}: {who}",
                human_bytes(retained),
                human_bytes(s.max_retained_wal_bytes as i64)
            ));
        }
    }
    if s.plugin.as_deref().is_some_and(|p| p != "pgoutput") {
        s.warnings.push(format!(
            "slot `{slot}` uses the plugin `{}`, not pgoutput: it is not a pgcdc slot",
            s.plugin.as_deref().unwrap_or_default()
        ));
    }
    if s.exists && progress.is_some_and(|p| !p.snapshot_done()) && !s.active {
        // Not unhealthy: the next run redoes the snapshot. Worth saying, though.
        tracing::info!(slot = %slot, "the recorded snapshot did not complete; the next run takes it again");
    }
    s.healthy = s.warnings.is_empty();
}

/// The human form.
pub fn render(s: &SlotStatus) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(o, "slot                 {}", s.slot);
    if !s.exists {
        let _ = writeln!(o, "state                does not exist");
    } else {
        let state = match (s.active, s.active_pid) {
            (true, Some(pid)) => format!("active (process {pid})"),
            (true, None) => "active".to_string(),
            (false, _) => "inactive (no pgcdc is reading it)".to_string(),
        };
        let _ = writeln!(o, "state                {state}");
        let _ = writeln!(
            o,
            "database             {}",
            s.database.as_deref().unwrap_or("-")
        );
        let _ = writeln!(
            o,
            "wal_status           {}",
            s.wal_status.as_deref().unwrap_or("-")
        );
        let _ = writeln!(
            o,
            "confirmed_flush_lsn  {}",
            s.confirmed_flush_lsn.as_deref().unwrap_or("-")
        );
        let _ = writeln!(o, "current WAL          {}", s.current_wal_lsn);
        let _ = writeln!(
            o,
            "lag                  {}{}",
            s.lag_bytes.map_or("-".into(), human_bytes),
            s.replay_lag_ms
                .map_or(String::new(), |ms| format!(" ({ms} ms replay lag)"))
        );
        let _ = writeln!(
            o,
            "retained WAL         {} (warn above {})",
            s.retained_wal_bytes.map_or("-".into(), human_bytes),
            human_bytes(s.max_retained_wal_bytes as i64)
        );
        if let Some(safe) = s.safe_wal_size {
            let _ = writeln!(o, "safe_wal_size        {}", human_bytes(safe));
        }
    }
    match &s.progress {
        None => {
            let hint = if s.progress_location.starts_with("file") {
                "; with the Kafka sink, give --kafka and --topic-prefix"
            } else {
                ""
            };
            let _ = writeln!(
                o,
                "snapshot             no progress record ({}{hint})",
                s.progress_location
            );
        }
        Some(p) => {
            let rows = p
                .snapshot_rows
                .map_or(String::new(), |r| format!(", {r} rows"));
            let _ = writeln!(
                o,
                "snapshot             {}{rows} ({})",
                p.snapshot,
                if p.tables.is_empty() {
                    "-".to_string()
                } else {
                    p.tables.join(", ")
                }
            );
            let age = (crate::model::now_ms() - p.updated_ms).max(0) / 1000;
            let _ = writeln!(
                o,
                "progress written     {age}s ago, slot created at {} ({})",
                p.slot_lsn, s.progress_location
            );
        }
    }
    if s.healthy {
        let _ = writeln!(o, "health               ok");
    } else {
        for w in &s.warnings {
            let _ = writeln!(o, "WARNING: {w}");
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot() -> SlotStatus {
        SlotStatus {
            slot: "s".into(),
            exists: true,
            database: Some("db".into()),
            plugin: Some("pgoutput".into()),
            active: false,
            active_pid: None,
            restart_lsn: Some("0/10".into()),
            confirmed_flush_lsn: Some("0/20".into()),
            current_wal_lsn: "0/1000".into(),
            retained_wal_bytes: Some(4000),
            lag_bytes: Some(3000),
            replay_lag_ms: None,
            wal_status: Some("reserved".into()),
            safe_wal_size: None,
            max_retained_wal_bytes: 1 << 30,
            progress: None,
            progress_location: "file x".into(),
            healthy: true,
            warnings: Vec::new(),
        }
    }

    #[test]
    fn invalidated_and_unreserved_slots_need_attention() {
        let mut s = slot();
        assess(&mut s, None);
        assert!(s.healthy);
        let mut s = slot();
        s.wal_status = Some("lost".into());
        assess(&mut s, None);
        assert!(!s.healthy);
        assert!(s.warnings[0].contains("INVALIDATED"), "{:?}", s.warnings);
        assert!(render(&s).contains("WARNING: slot `s` is INVALIDATED"));
        let mut s = slot();
        s.wal_status = Some("unreserved".into());
        s.safe_wal_size = Some(2048);
        assess(&mut s, None);
        assert!(s.warnings[0].contains("2.0 kiB left"), "{:?}", s.warnings);
    }
}
