//! The command line as documented: every flag of every subcommand appears in README.md's
//! configuration reference, and `--help` lists the exit codes.

use clap::CommandFactory;
use pgcdc::cli::Cli;

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
    ] {
        assert!(help.contains(code), "--help lacks `{code}`:\n{help}");
    }
}
