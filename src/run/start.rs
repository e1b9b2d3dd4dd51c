//! Start-up: what a run does first, decided from what it finds.
//!
//! A run finds a replication slot (usable, missing, or invalidated by PostgreSQL), a progress
//! record (see [`crate::checkpoint`]) or none, the tables it is asked to capture, and the
//! flags. [`decide`] turns exactly those into a [`Plan`]; it does no I/O, so every case is a
//! line of the decision table in its unit tests, and `run` only executes the plan.
//!
//! The rules, and why:
//!
//! * **A slot and a record that says its tables were snapshotted: resume.** The slot holds
//!   every change since its confirmed position, and the record says everything before that
//!   position was published. Tables recorded as snapshotted but no longer captured are just
//!   dropped from the record.
//! * **A table that is captured now but not recorded as snapshotted** (added to the
//!   publication or to `--table` while pgcdc was stopped, dropped and created again, or left
//!   unfinished by a crash): snapshot *that table only*, at a new consistent point C. The slot
//!   first publishes everything it holds before C, then moves to C, so no change of the other
//!   tables is skipped or repeated; the new table's rows are read as of C and its later
//!   changes come from the slot. Other tables are not read again.
//! * **A slot without a record** (created by hand, or the record was lost): snapshot every
//!   table the same way, over the existing slot.
//! * **No slot and no record:** a new slot with a snapshot of every table.
//! * **A record but no slot, or an invalidated slot** (dropped by hand, lost on failover,
//!   removed by `max_slot_wal_keep_size`): the changes made since the record's position were
//!   kept only by that slot; deletes among them can never be published, and derived views
//!   would keep those rows forever. That is not pgcdc's to paper over: the run stops with an
//!   error that explains the gap, unless `--snapshot always` says to take a new snapshot
//!   anyway (its per-table snapshot markers let consumers remove rows it does not contain).
//! * `--snapshot always` snapshots every table; `--snapshot never` never snapshots (a new
//!   slot starts streaming at its creation); `--snapshot-only` reads every table through a
//!   temporary slot and keeps nothing.

use std::collections::BTreeMap;

use crate::checkpoint::{Progress, SnapshotState};
use crate::cli::SnapshotMode;
use crate::model::Lsn;
use crate::source::catalog::TableName;

/// What PostgreSQL says about the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SlotState {
    Missing,
    Usable {
        confirmed_flush: Lsn,
    },
    /// PostgreSQL invalidated it: the WAL or rows it needed are gone.
    Invalidated,
}

/// Everything the decision depends on.
#[derive(Debug, Clone, Copy)]
pub(super) struct Found<'a> {
    pub slot: SlotState,
    /// The record of this slot on this server, if any.
    pub progress: Option<&'a Progress>,
    /// The tables to capture now, with their OIDs.
    pub tables: &'a [(TableName, u32)],
    pub mode: SnapshotMode,
    pub snapshot_only: bool,
}

/// Why tables are snapshotted over an existing slot (for the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Why {
    /// `--snapshot always`.
    Requested,
    /// The slot exists but no record says anything was snapshotted from it.
    NoRecord,
    /// A snapshot of these tables did not finish, or they are new to the record.
    NotRecorded,
}

/// What a run does before it streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Plan {
    /// `--snapshot-only`: read every table through a temporary slot, publish, exit.
    SnapshotOnly,
    /// Create the slot. With `snapshot`, every table is read at its consistent point;
    /// without (`--snapshot never`), streaming starts there. `drop_invalidated`: an
    /// invalidated slot of that name is dropped first.
    NewSlot {
        snapshot: bool,
        drop_invalidated: bool,
    },
    /// The slot exists: publish what it holds up to a new snapshot's consistent point, move
    /// it there, snapshot `tables` (a subset of the captured ones, in their order), stream.
    /// `completed`: the other captured tables, whose snapshot is recorded as complete.
    Resnapshot {
        tables: Vec<TableName>,
        completed: Vec<TableName>,
        why: Why,
    },
    /// Stream from the slot's confirmed position. `rewrite_record`: the record names tables
    /// that are no longer captured, and is written again without them.
    Resume { rewrite_record: bool },
    /// Stop: the slot's changes since the recorded position are lost.
    Refuse(Refusal),
}

/// Why a run refuses to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Refusal {
    /// A record says events were published from the slot, and the slot is gone.
    SlotGone { invalidated: bool, acked: Lsn },
    /// The slot is invalidated and nothing says what was published from it.
    Invalidated,
}

impl Refusal {
    /// The message, naming the way forward.
    pub(super) fn message(&self, slot: &str) -> String {
        match self {
            Refusal::SlotGone { invalidated, acked } => {
                let gone = if *invalidated {
                    "was invalidated by PostgreSQL (the WAL it needed is gone)"
                } else {
                    "does not exist (dropped, or lost in a failover)"
                };
                let upto = if acked.is_valid() {
                    format!(" (acknowledged up to {acked})")
                } else {
                    String::new()
                };
                format!(
                    "replication slot `{slot}` {gone}, but pgcdc's progress record says events \
                     were published from it{upto}. Changes committed since then were kept only \
                     by that slot: they can no longer be published, and consumers may keep rows \
                     that were deleted meanwhile. To go on, take a new snapshot with \
                     --snapshot always (every row is published again, and each table's \
                     snapshot marker lets consumers remove the rows it does not contain, as \
                     pgcdc-indexer does); or, to start over as a new pipeline, remove the \
                     record with `pgcdc drop --slot {slot} --yes`"
                )
            }
            Refusal::Invalidated => format!(
                "replication slot `{slot}` was invalidated by PostgreSQL: the WAL it needed is \
                 gone, so changes it held are lost. Fix: run with --snapshot always (pgcdc drops \
                 the invalidated slot and takes a new snapshot), or remove it with \
                 `pgcdc drop --slot {slot} --yes`"
            ),
        }
    }
}

/// The tables a record says are snapshotted, with the OID recorded for each (if any).
fn snapshotted(progress: &Progress) -> BTreeMap<TableName, Option<u32>> {
    let oids: BTreeMap<TableName, u32> = progress
        .table_oids
        .iter()
        .filter_map(|(n, oid)| Some((n.parse().ok()?, *oid)))
        .collect();
    progress
        .snapshot
        .completed_tables()
        .iter()
        .filter_map(|n| n.parse::<TableName>().ok())
        .map(|n| {
            let oid = oids.get(&n).copied();
            (n, oid)
        })
        .collect()
}

/// Decides what the run does first; see the module docs for the rules.
pub(super) fn decide(found: Found<'_>) -> Plan {
    if found.snapshot_only {
        return Plan::SnapshotOnly;
    }
    let all = || found.tables.iter().map(|(n, _)| n.clone()).collect();
    let usable = matches!(found.slot, SlotState::Usable { .. });
    let invalidated = found.slot == SlotState::Invalidated;
    match (found.mode, found.progress) {
        (SnapshotMode::Always, _) if usable => Plan::Resnapshot {
            tables: all(),
            completed: Vec::new(),
            why: Why::Requested,
        },
        (SnapshotMode::Always, _) => Plan::NewSlot {
            snapshot: true,
            drop_invalidated: invalidated,
        },
        (_, Some(p)) if !usable => Plan::Refuse(Refusal::SlotGone {
            invalidated,
            acked: p.acked(),
        }),
        (_, None) if invalidated => Plan::Refuse(Refusal::Invalidated),
        (SnapshotMode::Never, _) if usable => Plan::Resume {
            rewrite_record: false,
        },
        (SnapshotMode::Never, _) => Plan::NewSlot {
            snapshot: false,
            drop_invalidated: false,
        },
        (SnapshotMode::Initial, None) if usable => Plan::Resnapshot {
            tables: all(),
            completed: Vec::new(),
            why: Why::NoRecord,
        },
        (SnapshotMode::Initial, None) => Plan::NewSlot {
            snapshot: true,
            drop_invalidated: false,
        },
        (SnapshotMode::Initial, Some(p)) => {
            if p.snapshot == SnapshotState::Skipped {
                // Streaming without a snapshot was chosen for this slot: new tables too.
                return Plan::Resume {
                    rewrite_record: false,
                };
            }
            let done = snapshotted(p);
            let (missing, completed): (Vec<_>, Vec<_>) =
                found
                    .tables
                    .iter()
                    .partition(|(name, oid)| match done.get(name) {
                        Some(Some(recorded)) => recorded != oid,
                        Some(None) => false,
                        None => true,
                    });
            let names = |t: Vec<&(TableName, u32)>| t.into_iter().map(|(n, _)| n.clone()).collect();
            if !missing.is_empty() {
                return Plan::Resnapshot {
                    tables: names(missing),
                    completed: names(completed),
                    why: Why::NotRecorded,
                };
            }
            let unfinished = !p.snapshot_done();
            let dropped = done
                .keys()
                .any(|n| !found.tables.iter().any(|(t, _)| t == n));
            Plan::Resume {
                rewrite_record: unfinished || dropped,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: Lsn = Lsn(0x1000);

    fn t(name: &str) -> TableName {
        name.parse().unwrap()
    }

    fn record(state: SnapshotState, oids: &[(&str, u32)]) -> Progress {
        Progress {
            version: Progress::VERSION,
            system_id: "1".into(),
            database: "db".into(),
            slot: "s".into(),
            snapshot: state,
            slot_lsn: C.0,
            acked_lsn: C.0,
            updated_ms: 0,
            table_oids: oids.iter().map(|(n, o)| (n.to_string(), *o)).collect(),
        }
    }

    fn completed(tables: &[&str]) -> SnapshotState {
        SnapshotState::Completed {
            tables: tables.iter().map(|s| s.to_string()).collect(),
            rows: 1,
        }
    }

    fn in_progress(tables: &[&str], completed: &[&str]) -> SnapshotState {
        SnapshotState::InProgress {
            tables: tables.iter().map(|s| s.to_string()).collect(),
            completed: completed.iter().map(|s| s.to_string()).collect(),
        }
    }

    const USABLE: SlotState = SlotState::Usable { confirmed_flush: C };

    /// The tables captured now: `public.a` (OID 1) and `public.b` (OID 2).
    fn now() -> Vec<(TableName, u32)> {
        vec![(t("public.a"), 1), (t("public.b"), 2)]
    }

    fn decide_with(
        slot: SlotState,
        progress: Option<&Progress>,
        mode: SnapshotMode,
        tables: &[(TableName, u32)],
    ) -> Plan {
        decide(Found {
            slot,
            progress,
            tables,
            mode,
            snapshot_only: false,
        })
    }

    /// A re-snapshot of `tables`; the other tables of [`now`] are the completed ones.
    fn resnapshot(tables: &[&str], why: Why) -> Plan {
        let tables: Vec<TableName> = tables.iter().map(|n| t(n)).collect();
        let completed = match why {
            Why::NotRecorded => now()
                .into_iter()
                .map(|(n, _)| n)
                .filter(|n| !tables.contains(n))
                .collect(),
            _ => Vec::new(),
        };
        Plan::Resnapshot {
            tables,
            completed,
            why,
        }
    }

    const NEW_WITH_SNAPSHOT: Plan = Plan::NewSlot {
        snapshot: true,
        drop_invalidated: false,
    };
    const RESUME: Plan = Plan::Resume {
        rewrite_record: false,
    };

    #[test]
    fn decision_table() {
        use SnapshotMode::{Always, Initial, Never};
        let tables = now();
        let done = record(completed(&["public.a", "public.b"]), &[]);
        let done_a = record(completed(&["public.a"]), &[]);
        let done_old_names = record(completed(&["a", "\"public\".\"b\""]), &[]);
        let done_extra = record(completed(&["public.a", "public.b", "public.gone"]), &[]);
        let done_oids = record(
            completed(&["public.a", "public.b"]),
            &[("public.a", 1), ("\"public\".\"b\"", 99)],
        );
        let unfinished = record(in_progress(&["public.a", "public.b"], &[]), &[]);
        let unfinished_b = record(in_progress(&["public.b"], &["public.a"]), &[]);
        let skipped = record(SnapshotState::Skipped, &[]);
        let gone = |invalidated| {
            Plan::Refuse(Refusal::SlotGone {
                invalidated,
                acked: C,
            })
        };
        let cases: Vec<(&str, SlotState, Option<&Progress>, SnapshotMode, Plan)> = vec![
            // A first start.
            (
                "fresh",
                SlotState::Missing,
                None,
                Initial,
                NEW_WITH_SNAPSHOT,
            ),
            ("resume", USABLE, Some(&done), Initial, RESUME),
            (
                "older records name tables without quotes",
                USABLE,
                Some(&done_old_names),
                Initial,
                RESUME,
            ),
            (
                "slot without record",
                USABLE,
                None,
                Initial,
                resnapshot(&["public.a", "public.b"], Why::NoRecord),
            ),
            (
                "crash mid-snapshot",
                USABLE,
                Some(&unfinished),
                Initial,
                resnapshot(&["public.a", "public.b"], Why::NotRecorded),
            ),
            (
                "crash while snapshotting an added table",
                USABLE,
                Some(&unfinished_b),
                Initial,
                resnapshot(&["public.b"], Why::NotRecorded),
            ),
            (
                "table added while stopped",
                USABLE,
                Some(&done_a),
                Initial,
                resnapshot(&["public.b"], Why::NotRecorded),
            ),
            (
                "table dropped and created again",
                USABLE,
                Some(&done_oids),
                Initial,
                resnapshot(&["public.b"], Why::NotRecorded),
            ),
            (
                "table no longer captured",
                USABLE,
                Some(&done_extra),
                Initial,
                Plan::Resume {
                    rewrite_record: true,
                },
            ),
            (
                "stream without snapshot, by request",
                USABLE,
                Some(&skipped),
                Initial,
                RESUME,
            ),
            // The slot is gone while a record says events came from it.
            (
                "slot dropped",
                SlotState::Missing,
                Some(&done),
                Initial,
                gone(false),
            ),
            (
                "slot invalidated",
                SlotState::Invalidated,
                Some(&done),
                Initial,
                gone(true),
            ),
            (
                "slot dropped mid-snapshot",
                SlotState::Missing,
                Some(&unfinished),
                Initial,
                gone(false),
            ),
            (
                "slot of --snapshot never dropped",
                SlotState::Missing,
                Some(&skipped),
                Never,
                gone(false),
            ),
            (
                "invalidated, no record",
                SlotState::Invalidated,
                None,
                Initial,
                Plan::Refuse(Refusal::Invalidated),
            ),
            (
                "invalidated, no record, never",
                SlotState::Invalidated,
                None,
                Never,
                Plan::Refuse(Refusal::Invalidated),
            ),
            // --snapshot always: every table, whatever is recorded.
            (
                "always over a slot",
                USABLE,
                Some(&done),
                Always,
                resnapshot(&["public.a", "public.b"], Why::Requested),
            ),
            (
                "always after the slot was dropped",
                SlotState::Missing,
                Some(&done),
                Always,
                NEW_WITH_SNAPSHOT,
            ),
            (
                "always after invalidation",
                SlotState::Invalidated,
                Some(&done),
                Always,
                Plan::NewSlot {
                    snapshot: true,
                    drop_invalidated: true,
                },
            ),
            (
                "always, fresh",
                SlotState::Missing,
                None,
                Always,
                NEW_WITH_SNAPSHOT,
            ),
            // --snapshot never.
            (
                "never, fresh",
                SlotState::Missing,
                None,
                Never,
                Plan::NewSlot {
                    snapshot: false,
                    drop_invalidated: false,
                },
            ),
            ("never over a slot", USABLE, None, Never, RESUME),
            (
                "never over a slot with an unfinished snapshot",
                USABLE,
                Some(&unfinished),
                Never,
                RESUME,
            ),
        ];
        for (name, slot, progress, mode, want) in cases {
            assert_eq!(
                decide_with(slot, progress, mode, &tables),
                want,
                "case: {name}"
            );
        }
    }

    #[test]
    fn snapshot_only_ignores_everything_else() {
        let done = record(completed(&["public.a"]), &[]);
        for slot in [SlotState::Missing, USABLE, SlotState::Invalidated] {
            for mode in [
                SnapshotMode::Initial,
                SnapshotMode::Never,
                SnapshotMode::Always,
            ] {
                for progress in [None, Some(&done)] {
                    let plan = decide(Found {
                        slot,
                        progress,
                        tables: &now(),
                        mode,
                        snapshot_only: true,
                    });
                    assert_eq!(plan, Plan::SnapshotOnly);
                }
            }
        }
    }

    #[test]
    fn an_unfinished_record_whose_tables_are_all_done_is_rewritten() {
        // Every captured table is recorded as complete, but the record is still marked in
        // progress (the table being snapshotted left the capture): resume, and say so.
        let p = record(
            in_progress(&["public.gone"], &["public.a", "public.b"]),
            &[],
        );
        assert_eq!(
            decide_with(USABLE, Some(&p), SnapshotMode::Initial, &now()),
            Plan::Resume {
                rewrite_record: true
            }
        );
    }

    #[test]
    fn refusals_name_the_way_forward() {
        let m = Refusal::SlotGone {
            invalidated: false,
            acked: C,
        }
        .message("shop");
        assert!(
            m.contains("--snapshot always") && m.contains("pgcdc drop --slot shop --yes"),
            "{m}"
        );
        let m = Refusal::Invalidated.message("shop");
        assert!(m.contains("--snapshot always"), "{m}");
    }
}
