//! `--exclude-column`: columns whose values never leave pgcdc.
//!
//! An excluded column is not read by the snapshot (`COPY` names only the kept columns) and
//! is dropped from streamed tuples before encoding, so it appears in no event, no key and no
//! schema fingerprint. Key columns cannot be excluded: the key is how a consumer tells rows
//! apart, and a keyless event for a keyed row would be a lie about identity. Exclusions are
//! by name, so a column added later with an excluded name is excluded too.

use std::collections::{HashMap, HashSet};

use crate::source::catalog::{ColumnRef, TableInfo, TableName};

/// An `--exclude-column` that cannot be honoured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExcludeError {
    #[error("--exclude-column {0}: that column is part of the Kafka key of {table}, and key columns cannot be excluded (they identify the row). Fix: remove this --exclude-column, or key the table differently (primary key or REPLICA IDENTITY USING INDEX)", table = .0.table)]
    KeyColumn(ColumnRef),
    #[error("--exclude-column {0}: {table} has no such column. Fix: check the spelling; names are lower case unless quoted (\"Email\")", table = .0.table)]
    NoSuchColumn(ColumnRef),
}

/// The excluded column names per table.
#[derive(Debug, Clone, Default)]
pub struct Exclusions(HashMap<TableName, HashSet<String>>);

impl Exclusions {
    pub fn new(columns: &[ColumnRef]) -> Self {
        let mut map: HashMap<TableName, HashSet<String>> = HashMap::new();
        for c in columns {
            map.entry(c.table.clone())
                .or_default()
                .insert(c.column.clone());
        }
        Exclusions(map)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The excluded columns of `table`, if any.
    pub fn of(&self, table: &TableName) -> Option<&HashSet<String>> {
        self.0.get(table)
    }

    /// Whether `column` of `table` is excluded.
    pub fn excludes(&self, table: &TableName, column: &str) -> bool {
        self.of(table).is_some_and(|s| s.contains(column))
    }

    /// The first excluded key column of `table`, as an error.
    pub fn check_key(&self, table: &TableName, key: &[String]) -> Result<(), ExcludeError> {
        match key.iter().find(|k| self.excludes(table, k)) {
            Some(k) => Err(ExcludeError::KeyColumn(ColumnRef {
                table: table.clone(),
                column: k.clone(),
            })),
            None => Ok(()),
        }
    }

    /// Checks the exclusions against the captured tables: no key column, no unknown column.
    /// Exclusions for tables not captured (yet) are kept for tables joining later.
    pub fn check(&self, tables: &[TableInfo]) -> Result<(), ExcludeError> {
        for t in tables {
            let Some(cols) = self.of(&t.name) else {
                continue;
            };
            self.check_key(&t.name, &t.key)?;
            let mut sorted: Vec<&String> = cols.iter().collect();
            sorted.sort();
            // A column the publication's column list leaves out is excluded already.
            if let Some(c) = sorted
                .into_iter()
                .find(|c| !t.columns.iter().any(|(n, _)| n == *c) && !t.unpublished.contains(c))
            {
                return Err(ExcludeError::NoSuchColumn(ColumnRef {
                    table: t.name.clone(),
                    column: c.clone(),
                }));
            }
        }
        Ok(())
    }

    /// `info` without its excluded columns.
    pub fn apply(&self, info: &TableInfo) -> TableInfo {
        let mut info = info.clone();
        if let Some(cols) = self.of(&info.name) {
            info.columns.retain(|(n, _)| !cols.contains(n));
        }
        info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> TableInfo {
        TableInfo {
            partitioned: false,
            oid: 1,
            name: TableName::new("public", "users"),
            columns: vec![("id".into(), 23), ("email".into(), 25), ("n".into(), 23)],
            attributes: Vec::new(),
            key: vec!["id".into()],
            row_filter: None,
            unpublished: vec!["hidden".into()],
        }
    }

    #[test]
    fn checks_and_applies() {
        let ex = Exclusions::new(&["public.users.email".parse().unwrap()]);
        assert_eq!(ex.check(&[info()]), Ok(()));
        let kept: Vec<String> = ex.apply(&info()).columns.into_iter().map(|c| c.0).collect();
        assert_eq!(kept, vec!["id", "n"]);

        let key = Exclusions::new(&["users.id".parse().unwrap()]);
        let err = key.check(&[info()]).unwrap_err();
        assert!(matches!(err, ExcludeError::KeyColumn(_)));
        assert!(err.to_string().contains("cannot be excluded"), "{err}");

        let typo = Exclusions::new(&["public.users.emial".parse().unwrap()]);
        assert!(matches!(
            typo.check(&[info()]),
            Err(ExcludeError::NoSuchColumn(_))
        ));

        let unpublished = Exclusions::new(&["public.users.hidden".parse().unwrap()]);
        assert_eq!(unpublished.check(&[info()]), Ok(()));

        let other = Exclusions::new(&["public.other.x".parse().unwrap()]);
        assert_eq!(other.check(&[info()]), Ok(()));
    }
}
