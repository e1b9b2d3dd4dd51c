//! The command line as documented: every flag of every subcommand appears in README.md's
//! configuration reference, and `--help` lists the exit codes.

mod common;

use clap::CommandFactory;
use common::api::Cli;

#[test]
fn every_flag_of_every_subcommand_is_in_the_readme() {
    let whole = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    // The flags must be in the configuration reference itself, not just mentioned somewhere.
    let start = whole
        .find("### Configuration reference")
        .expect("README.md has a `### Configuration reference` section");
    let rest = &whole[start..];
    let end = rest[4..].find("\n## ").map_or(rest.len(), |i| i + 4);
    let readme = &rest[..end];
    let cmd = Cli::command();
    let mut missing = Vec::new();
    let globals = cmd.get_arguments().map(|a| ("(global)", a));
    let subs = cmd
        .get_subcommands()
        .flat_map(|s| s.get_arguments().map(move |a| (s.get_name(), a)));
    for (sub, arg) in globals.chain(subs) {
        if matches!(arg.get_id().as_str(), "help" | "version") {
            continue;
        }
        let flag = match (arg.get_long(), arg.get_short()) {
            (Some(long), _) => format!("`--{long}"),
            (None, Some(short)) => format!("`-{short}"),
            (None, None) => continue,
        };
        // `--progress` must not pass for `--progress-file`: the name must end there.
        let documented = ["`", " ", "="]
            .iter()
            .any(|end| readme.contains(&format!("{flag}{end}")));
        if !documented {
            missing.push(format!("{sub} {flag}`"));
        }
    }
    assert!(
        missing.is_empty(),
        "flags missing from README.md's configuration reference: {missing:?}"
    );
    for sub in cmd.get_subcommands() {
        let name = format!("pgcdc {}", sub.get_name());
        assert!(whole.contains(&name), "README.md never mentions `{name}`");
    }
}

/// The cells of a markdown table row (`\|` is a literal bar inside a cell).
fn cells(line: &str) -> Vec<String> {
    let line = line.trim();
    if !line.starts_with('|') {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut cell = String::new();
    let mut chars = line[1..].chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                cell.push('|');
                chars.next();
            }
            '|' => out.push(std::mem::take(&mut cell).trim().to_string()),
            c => cell.push(c),
        }
    }
    out
}

/// The flag as the README writes it at the start of a cell: `` `--name`` or `` `-X``.
fn flag_text(arg: &clap::Arg) -> Option<String> {
    match (arg.get_long(), arg.get_short()) {
        (Some(long), _) => Some(format!("--{long}")),
        (None, Some(short)) => Some(format!("-{short}")),
        (None, None) => None,
    }
}

/// Whether `cell` names `flag` (followed by a space, a backtick or `=`).
fn names_flag(cell: &str, flag: &str) -> bool {
    ["`", " ", "="]
        .iter()
        .any(|end| cell.contains(&format!("`{flag}{end}")))
}

/// Per command, the README's reference says which flags it takes and under which variable and
/// default, as `--help` does: `run`'s and the global flags in their tables (flag, variable,
/// default), `status`/`verify`/`drop` as the shared connection flags or in rows naming the
/// command.
#[test]
fn the_readme_reference_and_help_agree_per_command() {
    let whole = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let start = whole
        .find("### Configuration reference")
        .expect("reference");
    let rest = &whole[start..];
    let end = rest[4..].find("\n### ").map_or(rest.len(), |i| i + 4);
    let reference = &rest[..end];
    let rows: Vec<Vec<String>> = reference
        .lines()
        .map(cells)
        .filter(|c| c.len() >= 4)
        .collect();
    let shared_start = reference
        .find("share the connection flags")
        .expect("the shared connection flags sentence");
    let shared = &reference[shared_start
        ..reference[shared_start..]
            .find("plus:")
            .map_or(reference.len(), |i| shared_start + i)];
    let cmd = Cli::command();
    let run = cmd.find_subcommand("run").expect("run");
    let mut wrong = Vec::new();
    let check_row = |row: &[String], arg: &clap::Arg, what: &str, wrong: &mut Vec<String>| {
        let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
        if let Some(env) = env {
            let as_run = row[0].contains("as for `run`");
            if !row[0].contains(&format!("`{env}`")) && !as_run {
                wrong.push(format!("{what}: variable {env} not in {row:?}"));
            }
        }
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|d| d.to_string_lossy().into_owned())
            .filter(|d| !d.is_empty())
            .collect();
        if !arg.is_hide_default_value_set() {
            for d in defaults {
                let shown = row[1].contains(&format!("`{d}`"))
                    || (d == "false" && row[1] == "off")
                    || row[1].contains("as for `run`");
                if !shown {
                    wrong.push(format!("{what}: default `{d}` not in {row:?}"));
                }
            }
        }
    };
    // Global flags and run's: `| flag | variable | default | meaning |`.
    for (what, arg) in cmd
        .get_arguments()
        .map(|a| ("(global)", a))
        .chain(run.get_arguments().map(|a| ("run", a)))
    {
        let Some(flag) = flag_text(arg) else { continue };
        if matches!(arg.get_id().as_str(), "help" | "version") {
            continue;
        }
        match rows.iter().find(|r| names_flag(&r[0], &flag)) {
            Some(r) => check_row(&r[1..], arg, &format!("{what} {flag}"), &mut wrong),
            None => wrong.push(format!("{what} {flag}: no row")),
        }
    }
    // The other commands: `| command | flag | variable | default | meaning |`, or shared.
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "run") {
        let name = sub.get_name();
        for arg in sub.get_arguments() {
            let Some(flag) = flag_text(arg) else { continue };
            if matches!(arg.get_id().as_str(), "help" | "version") {
                continue;
            }
            let what = format!("{name} {flag}");
            let row = rows.iter().find(|r| {
                r.len() >= 5
                    && r[0].split(',').any(|c| c.trim() == name)
                    && names_flag(&r[1], &flag)
            });
            match row {
                Some(r) => check_row(&r[2..], arg, &what, &mut wrong),
                None if names_flag(shared, &flag) => {
                    // "same variables and defaults as for `run`"
                    let run_arg = run
                        .get_arguments()
                        .find(|a| flag_text(a).as_deref() == Some(&flag));
                    match run_arg {
                        Some(r)
                            if r.get_env() == arg.get_env()
                                && r.get_default_values() == arg.get_default_values() => {}
                        _ => wrong.push(format!("{what}: shared, but not as for `run`")),
                    }
                }
                None => wrong.push(format!("{what}: no row names the command and flag")),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "README.md's reference disagrees with --help:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn help_lists_the_exit_codes() {
    let help = Cli::command().render_long_help().to_string();
    for code in [
        "0  done",
        "1  verify",
        "2  usage",
        "3  PostgreSQL",
        "4  sink",
        "5  status",
        "6  wait",
    ] {
        assert!(help.contains(code), "--help lacks `{code}`:\n{help}");
    }
}

/// `pgcdc [<command>] --help` as an operator sees it, byte for byte, against the files in
/// tests/golden/help/: a change to a flag's name, variable, default or wording shows up here
/// and has to be made on purpose. The binary runs with a fixed width (`COLUMNS`, no terminal)
/// and without `PGCDC_*` variables, whose values `--help` would print.
/// `PGCDC_UPDATE_GOLDEN=1 cargo test --test cli` rewrites the files.
#[test]
fn help_is_as_recorded() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/help");
    let update = std::env::var_os("PGCDC_UPDATE_GOLDEN").is_some();
    let mut differ = Vec::new();
    for command in ["", "run", "status", "verify", "drop", "wait"] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pgcdc"));
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("PGCDC_") {
                cmd.env_remove(name);
            }
        }
        if !command.is_empty() {
            cmd.arg(command);
        }
        let out = cmd
            .arg("--help")
            .env("COLUMNS", "100")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run pgcdc --help");
        assert!(out.status.success(), "pgcdc {command} --help: {out:?}");
        let help = String::from_utf8(out.stdout).expect("UTF-8 help");
        let file = dir.join(format!(
            "{}.txt",
            if command.is_empty() { "pgcdc" } else { command }
        ));
        if update {
            std::fs::create_dir_all(&dir).expect("create tests/golden/help");
            std::fs::write(&file, &help).expect("write golden help");
            continue;
        }
        let golden = std::fs::read_to_string(&file).unwrap_or_default();
        if help != golden {
            differ.push(format!(
                "pgcdc {command} --help differs from {}:\n{help}",
                file.display()
            ));
        }
    }
    assert!(
        differ.is_empty(),
        "{}\n(PGCDC_UPDATE_GOLDEN=1 rewrites the files after a deliberate change)",
        differ.join("\n")
    );
}
