//! Text of the replication commands, and parsing of the server version: pure
//! functions, tested without a server. Names and values are quoted by the same functions
//! as SQL ([`quote_ident`], [`quote_literal`]): the replication command parser reads
//! `"name"` and `'value'` as the SQL parser does.

use crate::model::Lsn;
use crate::source::catalog::{quote_ident, quote_literal};

/// What `CREATE_REPLICATION_SLOT` does with the snapshot of the slot's starting point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotAction {
    /// Export it: other sessions can import it with `SET TRANSACTION SNAPSHOT` while
    /// this connection stays open and runs no other command.
    Export,
    /// Do not create one.
    NoExport,
    /// Make it the snapshot of the current transaction on this connection, which must
    /// have run `BEGIN ISOLATION LEVEL REPEATABLE READ` and nothing else yet.
    Use,
}

/// `CREATE_REPLICATION_SLOT` in the syntax the server version understands: PostgreSQL
/// 15 and later take an option list (`(SNAPSHOT 'export')`), older ones keywords
/// (`EXPORT_SNAPSHOT`).
pub fn create_logical_slot(
    server_version_num: u32,
    slot: &str,
    plugin: &str,
    snapshot: SnapshotAction,
    temporary: bool,
) -> String {
    let temporary = if temporary { " TEMPORARY" } else { "" };
    let slot = quote_ident(slot);
    let plugin = quote_ident(plugin);
    if server_version_num >= 150000 {
        let action = match snapshot {
            SnapshotAction::Export => "export",
            SnapshotAction::NoExport => "nothing",
            SnapshotAction::Use => "use",
        };
        format!("CREATE_REPLICATION_SLOT {slot}{temporary} LOGICAL {plugin} (SNAPSHOT '{action}')")
    } else {
        let action = match snapshot {
            SnapshotAction::Export => "EXPORT_SNAPSHOT",
            SnapshotAction::NoExport => "NOEXPORT_SNAPSHOT",
            SnapshotAction::Use => "USE_SNAPSHOT",
        };
        format!("CREATE_REPLICATION_SLOT {slot}{temporary} LOGICAL {plugin} {action}")
    }
}

/// `DROP_REPLICATION_SLOT "slot" [WAIT]`.
pub fn drop_slot(slot: &str, wait: bool) -> String {
    let wait = if wait { " WAIT" } else { "" };
    format!("DROP_REPLICATION_SLOT {}{wait}", quote_ident(slot))
}

/// `START_REPLICATION SLOT "slot" LOGICAL X/X ("name" 'value', ...)`.
pub fn start_logical_replication(slot: &str, start: Lsn, options: &[(&str, &str)]) -> String {
    let mut cmd = format!(
        "START_REPLICATION SLOT {} LOGICAL {start}",
        quote_ident(slot)
    );
    if !options.is_empty() {
        let opts: Vec<String> = options
            .iter()
            .map(|(k, v)| format!("{} {}", quote_ident(k), quote_literal(v)))
            .collect();
        cmd.push_str(" (");
        cmd.push_str(&opts.join(", "));
        cmd.push(')');
    }
    cmd
}

/// Turns `server_version` (`15.18 (Debian 15.18-0+deb12u1)`, `16beta1`, `9.6.24`)
/// into the `server_version_num` form (`150018`, `160000`, `90624`).
pub fn parse_server_version(s: &str) -> Option<u32> {
    let numeric: String = s
        .trim()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let mut parts = numeric.split('.').filter(|p| !p.is_empty());
    let major: u32 = parts.next()?.parse().ok()?;
    let mut next = || -> Option<u32> {
        match parts.next() {
            None => Some(0),
            Some(p) => p.parse().ok(),
        }
    };
    if major >= 10 {
        let minor = next()?;
        if minor >= 10000 {
            return None;
        }
        major.checked_mul(10000)?.checked_add(minor)
    } else {
        let minor = next()?;
        let patch = next()?;
        (minor < 100 && patch < 100).then_some(major * 10000 + minor * 100 + patch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("slot"), "\"slot\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal(r"a\b"), r"'a\b'");
    }

    #[test]
    fn create_slot_syntax() {
        assert_eq!(
            create_logical_slot(150018, "s", "pgoutput", SnapshotAction::Export, false),
            "CREATE_REPLICATION_SLOT \"s\" LOGICAL \"pgoutput\" (SNAPSHOT 'export')"
        );
        assert_eq!(
            create_logical_slot(160000, "s", "pgoutput", SnapshotAction::NoExport, true),
            "CREATE_REPLICATION_SLOT \"s\" TEMPORARY LOGICAL \"pgoutput\" (SNAPSHOT 'nothing')"
        );
        assert_eq!(
            create_logical_slot(140010, "s", "pgoutput", SnapshotAction::Export, true),
            "CREATE_REPLICATION_SLOT \"s\" TEMPORARY LOGICAL \"pgoutput\" EXPORT_SNAPSHOT"
        );
        assert_eq!(
            create_logical_slot(100000, "s", "pgoutput", SnapshotAction::Use, false),
            "CREATE_REPLICATION_SLOT \"s\" LOGICAL \"pgoutput\" USE_SNAPSHOT"
        );
        assert!(
            create_logical_slot(130000, "s", "p", SnapshotAction::NoExport, false)
                .ends_with("NOEXPORT_SNAPSHOT")
        );
    }

    #[test]
    fn start_and_drop_syntax() {
        assert_eq!(
            start_logical_replication(
                "s",
                "16/B374D848".parse().unwrap(),
                &[
                    ("proto_version", "2"),
                    ("publication_names", "\"pub\""),
                    ("messages", "true")
                ]
            ),
            "START_REPLICATION SLOT \"s\" LOGICAL 16/B374D848 (\"proto_version\" '2', \
             \"publication_names\" '\"pub\"', \"messages\" 'true')"
        );
        assert_eq!(
            start_logical_replication("s", Lsn(0), &[]),
            "START_REPLICATION SLOT \"s\" LOGICAL 0/0"
        );
        assert_eq!(drop_slot("s", true), "DROP_REPLICATION_SLOT \"s\" WAIT");
        assert_eq!(drop_slot("s", false), "DROP_REPLICATION_SLOT \"s\"");
    }

    #[test]
    fn server_versions() {
        assert_eq!(
            parse_server_version("15.18 (Debian 15.18-0+deb12u1)"),
            Some(150018)
        );
        assert_eq!(parse_server_version("16beta1"), Some(160000));
        assert_eq!(parse_server_version("17devel"), Some(170000));
        assert_eq!(parse_server_version("9.6.24"), Some(90624));
        assert_eq!(parse_server_version("10.1"), Some(100001));
        assert_eq!(parse_server_version(""), None);
        assert_eq!(parse_server_version("x"), None);
        assert_eq!(parse_server_version("99999999999"), None);
        assert_eq!(parse_server_version("4000000.1"), None);
    }
}
