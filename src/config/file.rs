//! `--config pgcdc.toml`: every flag, in a file.
//!
//! The file is a flat TOML table whose keys are the long flag names (`topic-prefix`,
//! `source`, `table`, …; `kafka-properties` for `-X`). A key applies to every command that
//! has that flag, so one file serves `run`, `status`, `verify` and `drop` alike; a key that no
//! command knows is an error naming it, so a typo never silently falls back to a default.
//!
//! Precedence is flag > `PGCDC_*` variable > file > default. clap knows where each value
//! came from (`ArgMatches::value_source`): the command line is parsed once, and every flag
//! whose value is missing or a default gets the file's value as if it had been typed; then
//! the command line is parsed again with those additions. Values thus go through the same
//! parsers and checks as typed flags, with the same error messages.
//!
//! Not taken from a file: `--config` itself, `drop --yes` (a confirmation must be typed) and
//! `verify --table` (which table to check is a question for the moment; `table` in the file
//! is `run`'s list).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command, CommandFactory, FromArgMatches};

use crate::cli::Cli;

/// Why the configuration could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A flag problem: clap's own error, printed and exited by clap.
    #[error(transparent)]
    Clap(#[from] clap::Error),
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config file {path}: unknown key `{key}`; keys are the long flag names, e.g. {known}")]
    UnknownKey {
        path: PathBuf,
        key: String,
        known: String,
    },
    #[error("config file {path}: `{key}` {problem}")]
    Value {
        path: PathBuf,
        key: String,
        problem: String,
    },
    #[error("PGCDC_KAFKA_PROPERTIES: {0}")]
    Env(String),
    #[error("config file {path}: {message} (the value came from the file's `{key}`)")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// Parses the command line, applying `--config` (or `PGCDC_CONFIG`) where flags and
/// variables leave values unset.
pub fn parse_cli<I, T>(args: I) -> Result<Cli, ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let cmd = Cli::command();
    let matches = cmd.clone().try_get_matches_from(&args)?;
    let Some(path) = matches.get_one::<PathBuf>("config").cloned() else {
        return finish(&matches);
    };
    let table = load(&path)?;
    check_keys(&cmd, &table, &path)?;

    let mut extra: Vec<OsString> = Vec::new();
    // Global flags live on the top-level matches.
    for arg in cmd.get_arguments() {
        add_from_file(arg, &matches, &table, &path, None, &mut extra)?;
    }
    if let Some((name, sub_matches)) = matches.subcommand() {
        if let Some(sub) = cmd.find_subcommand(name) {
            for arg in sub.get_arguments() {
                add_from_file(arg, sub_matches, &table, &path, Some(name), &mut extra)?;
            }
        }
    }
    if extra.is_empty() {
        return finish(&matches);
    }
    let mut all = args.clone();
    all.extend(extra);
    let matches = match cmd.try_get_matches_from(&all) {
        Ok(m) => m,
        Err(e) => {
            // The command line parsed without the file's values, so the file is to blame.
            let key = e
                .get(clap::error::ContextKind::InvalidArg)
                .map(|v| v.to_string())
                .unwrap_or_default();
            let key = key
                .trim_start_matches('-')
                .split([' ', '<', '='])
                .next()
                .unwrap_or_default()
                .to_string();
            return Err(ConfigError::Invalid {
                path,
                key,
                message: e.kind().as_str().unwrap_or("invalid value").to_string()
                    + &first_line(&e.to_string()),
            });
        }
    };
    finish(&matches)
}

/// The parsed command line, with `PGCDC_KAFKA_PROPERTIES` split into its properties when the
/// `-X` values came from it (clap splits nothing: a flag's or the file's value is one
/// property, even with a `;` in it).
fn finish(matches: &ArgMatches) -> Result<Cli, ConfigError> {
    let mut cli = Cli::from_arg_matches(matches)?;
    let Some((_, sub)) = matches.subcommand() else {
        return Ok(cli);
    };
    if let Some(from_env) = crate::cli::properties_from_env(sub, "kafka_properties") {
        let properties = from_env.map_err(ConfigError::Env)?;
        match &mut cli.command {
            crate::cli::Command::Run(a) => a.kafka.properties = properties,
            crate::cli::Command::Status(a) => a.conn.kafka.properties = properties,
            crate::cli::Command::Verify(a) => a.conn.kafka.properties = properties,
            crate::cli::Command::Drop(a) => a.conn.kafka.properties = properties,
            // No Kafka flags.
            crate::cli::Command::Wait(_) => {}
        }
    }
    Ok(cli)
}

fn first_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or_default();
    let line = line.trim_start_matches("error: ");
    format!(": {line}")
}

fn load(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    text.parse::<toml::Table>()
        .map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.message().to_string(),
        })
}

/// The file key of a flag: its long name, or its id for short-only flags (`-X`).
pub fn file_key(arg: &Arg) -> String {
    arg.get_long()
        .map(str::to_string)
        .unwrap_or_else(|| arg.get_id().as_str().replace('_', "-"))
}

/// Flags never taken from a file (see the module docs).
fn excluded(command: Option<&str>, key: &str) -> bool {
    matches!(key, "help" | "version" | "config" | "yes")
        || (command == Some("verify") && key == "table")
}

/// Every key some command accepts from a file.
pub fn known_keys(cmd: &Command) -> Vec<String> {
    let mut keys: Vec<String> = cmd
        .get_arguments()
        .map(file_key)
        .filter(|k| !excluded(None, k))
        .collect();
    for sub in cmd.get_subcommands() {
        for arg in sub.get_arguments() {
            let k = file_key(arg);
            if !excluded(None, &k) && !keys.contains(&k) {
                keys.push(k);
            }
        }
    }
    keys.sort();
    keys
}

fn check_keys(cmd: &Command, table: &toml::Table, path: &Path) -> Result<(), ConfigError> {
    let known = known_keys(cmd);
    for key in table.keys() {
        if !known.contains(key) {
            let near: Vec<&String> = known
                .iter()
                .filter(|k| k.contains(key.as_str()) || key.contains(k.as_str()))
                .collect();
            let hint = if near.is_empty() {
                "source, kafka, slot, topic-prefix, table".to_string()
            } else {
                near.iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(ConfigError::UnknownKey {
                path: path.to_path_buf(),
                key: key.clone(),
                known: hint,
            });
        }
    }
    Ok(())
}

/// Appends `arg`'s value from the file to `out` when neither a flag nor a variable set it.
fn add_from_file(
    arg: &Arg,
    matches: &ArgMatches,
    table: &toml::Table,
    path: &Path,
    command: Option<&str>,
    out: &mut Vec<OsString>,
) -> Result<(), ConfigError> {
    let key = file_key(arg);
    if excluded(command, &key) {
        return Ok(());
    }
    let Some(value) = table.get(&key) else {
        return Ok(());
    };
    let id = arg.get_id().as_str();
    let source = matches
        .try_contains_id(id)
        .ok()
        .and_then(|_| matches.value_source(id));
    if matches!(
        source,
        Some(ValueSource::CommandLine) | Some(ValueSource::EnvVariable)
    ) {
        return Ok(());
    }
    let bad = |problem: &str| ConfigError::Value {
        path: path.to_path_buf(),
        key: key.clone(),
        problem: problem.to_string(),
    };
    let flag = |v: &str| -> OsString {
        match arg.get_long() {
            Some(long) => format!("--{long}={v}").into(),
            None => format!("-{}{v}", arg.get_short().unwrap_or('X')).into(),
        }
    };
    match arg.get_action() {
        ArgAction::SetTrue => match value {
            toml::Value::Boolean(true) => out.push(flag_only(arg)),
            toml::Value::Boolean(false) => {}
            _ => return Err(bad("takes true or false")),
        },
        ArgAction::Append => {
            let items: Vec<String> = match value {
                toml::Value::Array(a) => a
                    .iter()
                    .map(|v| scalar(v).ok_or_else(|| bad("must be a list of strings or numbers")))
                    .collect::<Result<_, _>>()?,
                // `kafka-properties = { "compression.type" = "zstd" }`
                toml::Value::Table(t) => t
                    .iter()
                    .map(|(k, v)| {
                        scalar(v)
                            .map(|v| format!("{k}={v}"))
                            .ok_or_else(|| bad("values must be strings or numbers"))
                    })
                    .collect::<Result<_, _>>()?,
                other => {
                    vec![scalar(other).ok_or_else(|| bad("must be a string, number or list"))?]
                }
            };
            out.extend(items.iter().map(|v| flag(v)));
        }
        _ => {
            let v = scalar(value).ok_or_else(|| bad("must be a string, number or boolean"))?;
            out.push(flag(&v));
        }
    }
    Ok(())
}

fn flag_only(arg: &Arg) -> OsString {
    match arg.get_long() {
        Some(long) => format!("--{long}").into(),
        None => format!("-{}", arg.get_short().unwrap_or('X')).into(),
    }
}

fn scalar(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Command as Sub;

    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pgcdc-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn file_fills_unset_flags_and_flags_win() {
        let p = write(
            "a.toml",
            r#"
            source = "host=db"
            slot = "from_file"
            topic-prefix = "filepfx"
            table = ["public.a", "b"]
            snapshot-only = true
            tombstones = false
            status-interval = 5
            kafka-properties = { "linger.ms" = 7 }
            log-format = "json"
            max-retained-wal = "2MB"
            "#,
        );
        let p = p.to_str().unwrap();
        let cli = parse_cli(["pgcdc", "--config", p, "run", "--slot", "flag"]).unwrap();
        let Sub::Run(run) = &cli.command else {
            panic!("run expected")
        };
        assert_eq!(run.pg.slot, "flag");
        assert_eq!(run.kafka.topic_prefix, "filepfx");
        assert_eq!(run.pg.source, "host=db");
        assert_eq!(run.tables.len(), 2);
        assert!(run.snapshot_only);
        assert!(!run.tombstones);
        assert_eq!(run.status_interval, std::time::Duration::from_secs(5));
        assert_eq!(run.kafka.properties[0].key, "linger.ms");
        assert_eq!(cli.global.log_format, crate::cli::LogFormat::Json);
        // The same file serves status; `table` does not apply to verify.
        let cli = parse_cli(["pgcdc", "status", "--config", p]).unwrap();
        let Sub::Status(st) = cli.command else {
            panic!("status expected")
        };
        assert_eq!(st.conn.pg.slot, "from_file");
        assert_eq!(st.max_retained_wal, 2 << 20);
    }

    #[test]
    fn a_files_property_value_is_taken_whole() {
        let p = write(
            "x.toml",
            "kafka-properties = { \"sasl.password\" = \"a;b\", \"client.id\" = \"c\" }\n",
        );
        let cli = parse_cli(["pgcdc", "status", "--config", p.to_str().unwrap()]).unwrap();
        let Sub::Status(st) = cli.command else {
            panic!("status expected")
        };
        let mut p: Vec<(String, String)> = st
            .conn
            .kafka
            .properties
            .into_iter()
            .map(|p| (p.key, p.value))
            .collect();
        p.sort();
        assert_eq!(
            p,
            [
                ("client.id".to_string(), "c".to_string()),
                ("sasl.password".to_string(), "a;b".to_string())
            ]
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let p = write("b.toml", "slott = \"x\"\n");
        let e = parse_cli(["pgcdc", "run", "--config", p.to_str().unwrap()]).unwrap_err();
        assert!(e.to_string().contains("unknown key `slott`"), "{e}");
        let p = write("c.toml", "status-interval = \"soon\"\n");
        let e = parse_cli(["pgcdc", "run", "--config", p.to_str().unwrap()]).unwrap_err();
        assert!(e.to_string().contains("status-interval"), "{e}");
        let p = write("d.toml", "yes = true\n");
        let e = parse_cli(["pgcdc", "drop", "--config", p.to_str().unwrap()]).unwrap_err();
        assert!(e.to_string().contains("unknown key `yes`"), "{e}");
    }

    #[test]
    fn a_property_value_is_taken_whole() {
        let cli = parse_cli([
            "pgcdc",
            "run",
            "-X",
            "sasl.password=a;b=c",
            "-X",
            "client.id=x",
        ])
        .unwrap();
        let Sub::Run(run) = cli.command else {
            panic!("run expected")
        };
        let p = &run.kafka.properties;
        assert_eq!(
            (p[0].key.as_str(), p[0].value.as_str()),
            ("sasl.password", "a;b=c")
        );
        assert_eq!(p.len(), 2);
        let e = parse_cli(["pgcdc", "run", "-X", "secret-4417"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("key=value") && !e.contains("secret-4417"), "{e}");
        assert!(!format!("{:?}", p[0]).contains("a;b"));
    }
}
