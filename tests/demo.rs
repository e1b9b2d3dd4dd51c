//! The demo: `scripts/demo.sh` end to end (with the binaries this test run built), and the
//! Docker files checked as far as a machine without a Docker engine can: `docker-compose config`
//! accepts the compose file, and the compose file and Dockerfile agree with the crate.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(name: &str) -> String {
    std::fs::read_to_string(repo().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The value of `KEY: value` in the compose file (first occurrence).
fn compose_value<'a>(compose: &'a str, key: &str) -> &'a str {
    compose
        .lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}:")))
        .map(str::trim)
        .unwrap_or_else(|| panic!("{key} not in docker-compose.yml"))
}

#[test]
fn docker_compose_config_accepts_the_compose_file() {
    let version = Command::new("docker-compose").arg("version").output();
    if version.is_err() {
        eprintln!(
            "note: docker_compose_config_accepts_the_compose_file: skipped: no docker-compose \
             binary (scripts/test-env.sh installs Debian's docker-compose)"
        );
        return;
    }
    let run = |args: &[&str]| {
        let out = Command::new("docker-compose")
            .arg("-f")
            .arg(repo().join("docker-compose.yml"))
            .args(args)
            .env_remove("PGCDC_DEMO_PG_PORT")
            .env_remove("PGCDC_DEMO_KAFKA_PORT")
            .env_remove("PGCDC_DEMO_MEILI_PORT")
            .env_remove("MEILI_MASTER_KEY")
            .stdin(Stdio::null())
            .output()
            .expect("docker-compose runs");
        assert!(
            out.status.success(),
            "docker-compose {args:?} rejected the file:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let services: Vec<String> = run(&["config", "--services"])
        .lines()
        .map(String::from)
        .collect();
    let mut sorted = services.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        ["indexer", "kafka", "meilisearch", "pgcdc", "postgres"],
        "{services:?}"
    );
    let config = run(&["config"]);
    for expected in [
        "wal_level=logical",
        "image: apache/kafka:",
        "image: getmeili/meilisearch:",
        "image: postgres:",
        "KAFKA_PROCESS_ROLES: broker,controller",
        "docker-entrypoint-initdb.d/10-demo.sql",
        "restart: unless-stopped",
        "PGCDC_INDEXER_TARGET: meilisearch",
        // Defaults of the ${VAR:-default} substitutions.
        "published: 7700",
        "MEILI_MASTER_KEY: pgcdc-demo-master-key",
    ] {
        assert!(
            config.contains(expected),
            "`{expected}` missing from:\n{config}"
        );
    }
}

#[test]
fn compose_file_agrees_with_the_crate() {
    let compose = read("docker-compose.yml");
    // The indexer reads exactly the topics pgcdc writes.
    let prefix = compose_value(&compose, "PGCDC_TOPIC_PREFIX");
    let tables = compose_value(&compose, "PGCDC_TABLES");
    let topics: Vec<String> = tables.split(',').map(|t| format!("{prefix}.{t}")).collect();
    assert_eq!(
        compose_value(&compose, "PGCDC_INDEXER_TOPICS"),
        topics.join(",")
    );
    // Every PGCDC_ variable it sets is one the binaries read.
    let sources = [read("src/cli.rs"), read("src/bin/pgcdc-indexer.rs")].join("\n");
    for line in compose.lines() {
        let Some((key, _)) = line.trim().split_once(':') else {
            continue;
        };
        if key.starts_with("PGCDC_") && !key.starts_with("PGCDC_DEMO_") {
            assert!(
                sources.contains(&format!("\"{key}\"")),
                "docker-compose.yml sets {key}, which no flag reads"
            );
        }
    }
    // The seed it mounts exists.
    assert!(repo().join("sql/demo.sql").is_file());
}

#[test]
fn dockerfile_installs_every_binary_and_runs_unprivileged() {
    let dockerfile = read("Dockerfile");
    let manifest = read("Cargo.toml");
    let bins: Vec<&str> = manifest
        .split("[[bin]]")
        .skip(1)
        .filter_map(|section| {
            section
                .lines()
                .find_map(|l| l.trim().strip_prefix("name = "))
                .map(|n| n.trim_matches('"'))
        })
        .collect();
    assert!(
        bins.contains(&"pgcdc") && bins.contains(&"pgcdc-indexer"),
        "{bins:?}"
    );
    let install = dockerfile
        .lines()
        .find(|l| l.contains("install -D"))
        .expect("an install line");
    for b in &bins {
        assert!(
            install.contains(&format!("target/release/{b}")),
            "the image lacks {b}"
        );
    }
    let runtime = dockerfile
        .rsplit_once("\nFROM ")
        .map(|(_, stage)| stage)
        .expect("a runtime stage");
    assert!(runtime.starts_with("debian:bookworm-slim"), "{runtime}");
    assert!(runtime.contains("libssl3 ca-certificates"));
    let user = runtime
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER in the runtime stage");
    assert!(user != "root" && user != "0", "{user}");
    assert!(runtime.contains("ENTRYPOINT [\"pgcdc\"]"));
    // The build context keeps what the Dockerfile copies.
    let ignore = read(".dockerignore");
    for kept in ["!Cargo.toml", "!Cargo.lock", "!src", "!README.md"] {
        assert!(ignore.lines().any(|l| l == kept), "{kept}");
    }
}

/// The lines of `out` between the headers `== {from}` and the next `== `.
fn section<'a>(out: &'a str, from: &str) -> Vec<&'a str> {
    out.lines()
        .skip_while(|l| !l.starts_with(&format!("== {from}")))
        .skip(1)
        .take_while(|l| !l.starts_with("== "))
        .collect()
}

fn has(lines: &[&str], parts: &[&str]) -> bool {
    lines.iter().any(|l| parts.iter().all(|p| l.contains(p)))
}

/// Drops the demo's database when the test ends, passed or not (the script drops its slot).
struct DropDatabase(String);

impl Drop for DropDatabase {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.0);
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            let env = common::env();
            if let Ok(c) = crate::common::api::connect(&env.admin("postgres")).await {
                if let Err(e) = c.batch_execute(&sql).await {
                    eprintln!("note: {sql}: {e}");
                }
            }
        });
    }
}

#[test]
fn demo_script_runs_end_to_end() {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_pgcdc"))
        .parent()
        .expect("binary directory")
        .to_path_buf();
    assert!(Path::new(env!("CARGO_BIN_EXE_pgcdc-indexer")).starts_with(&bin_dir));
    let db = format!("pgcdc_demo_test_{}", std::process::id());
    let _cleanup = DropDatabase(db.clone());
    let start = Instant::now();
    let child = Command::new("bash")
        .arg(repo().join("scripts/demo.sh"))
        .env("PGCDC_DEMO_BIN_DIR", &bin_dir)
        .env("PGCDC_DEMO_DB", &db)
        .env("PGCDC_DEMO_TIMEOUT", "20")
        .env_remove("PGCDC_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bash runs");
    // A backstop: the script bounds each of its own waits.
    let pid = child.id().to_string();
    let watchdog = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return;
            }
        }
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
    });
    let out = child.wait_with_output().expect("demo output");
    let _ = watchdog.join();
    let elapsed = start.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo.sh failed ({:?}):\n{stdout}\n--- stderr ---\n{stderr}",
        out.status
    );
    assert!(elapsed < Duration::from_secs(60), "took {elapsed:?}");

    let snapshot = section(&stdout, "1.");
    assert_eq!(
        snapshot.iter().filter(|l| l.contains("upsert")).count(),
        5,
        "{stdout}"
    );
    assert!(
        has(&snapshot, &["orders/100", "\"status\": \"paid\""]),
        "{stdout}"
    );
    assert!(has(&snapshot, &["customers/2", "Grace Hopper"]), "{stdout}");

    let live = section(&stdout, "2.");
    assert!(
        has(&live, &["upsert", "orders/100", "\"status\": \"shipped\""]),
        "{stdout}"
    );
    assert!(
        has(&live, &["upsert", "orders/102", "\"total\": \"42.00\""]),
        "{stdout}"
    );
    assert!(has(&live, &["delete", "orders/101"]), "{stdout}");
    assert!(has(&live, &["delete", "customers/2"]), "{stdout}");
    assert!(
        has(&live, &["upsert", "customers/4", "Grace Hopper"]),
        "{stdout}"
    );
    assert!(
        has(&live, &["applied by the indexer", "ms after the commit"]),
        "{stdout}"
    );

    let ryw = section(&stdout, "3.");
    assert!(has(&ryw, &["/wait?lsn=", "\"reached\":true"]), "{stdout}");
    assert!(
        has(&ryw, &["upsert", "customers/4", "Grace Brewster Hopper"]),
        "{stdout}"
    );
    assert!(
        has(&ryw, &["the index has it", "ms after the commit returned"]),
        "{stdout}"
    );

    let last = section(&stdout, "4.");
    let docs: Vec<&str> = last
        .iter()
        .filter(|l| l.trim_start().starts_with("document"))
        .copied()
        .collect();
    assert_eq!(docs.len(), 5, "{stdout}");
    assert!(has(&docs, &["orders/100", "shipped"]));
    assert!(
        has(&docs, &["customers/4", "Grace Brewster Hopper"]),
        "{stdout}"
    );
    assert!(
        !has(&docs, &["orders/101"]) && !has(&docs, &["customers/2 "]),
        "{stdout}"
    );
    assert!(
        has(
            &section(&stdout, "5."),
            &["the index holds exactly the 5 rows"]
        ),
        "{stdout}"
    );
}
