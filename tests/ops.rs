//! The operations commands end to end — `status`, `verify`, `drop`, `--metrics-addr` and
//! `--config` — with the real binary against the private cluster and the durable broker.
//! Every test has its own database, slot, publication and topic prefix.

mod common;

use std::io::Read;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::api::{read_last_value, read_topic, sink, KafkaConfig, ReadStop, Record, SinkItem};
use common::cmd::PgcdcCmd;
use common::kafka;
use common::pipeline::Pipeline;
use common::process::stop;
use serde_json::{json, Value};

const ITEMS: &str = "CREATE TABLE public.items (id int PRIMARY KEY, v text, n int);
     INSERT INTO public.items SELECT g, 'row ' || g, g FROM generate_series(1, 50) g;";

/// `pgcdc <sub>` of this test plus `extra` (whose `--publication` replaces the test's);
/// `run` captures `items`.
fn cmd(o: &Pipeline, sub: &str, extra: &[&str]) -> Command {
    let mut c = o.pgcdc(sub);
    if extra.contains(&"--publication") {
        c = c.unset("--publication");
    }
    c = c.args(extra);
    if sub == "run" {
        c = c.args(["--table", "public.items"]);
    }
    c.command()
}

fn output(o: &Pipeline, sub: &str, extra: &[&str]) -> Output {
    cmd(o, sub, extra).output().expect("pgcdc runs")
}

/// `pgcdc run` in the background, logging to `<dir>/<log>`.
fn spawn_run(o: &Pipeline, extra: &[&str], log: &str) -> Child {
    let file = std::fs::File::create(o.dir.join(log)).expect("log file");
    cmd(o, "run", extra)
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .expect("pgcdc starts")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            stderr(out)
        )
    })
}

fn assert_code(out: &Output, code: i32, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn status_shows_the_active_slot_then_warns_about_retained_wal() {
    let o = Pipeline::new(ITEMS).await;
    let child = spawn_run(&o, &["--log-format", "json"], "run.log");
    o.wait_for_log("run.log", "streaming changes").await;
    // Machine-readable logs: every line is JSON; lines about a table name it.
    let log = o.log("run.log");
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let snapshot_line = lines
        .iter()
        .find(|l| l["message"] == "snapshot: reading table")
        .unwrap_or_else(|| panic!("{log}"));
    assert_eq!(snapshot_line["table"], r#""public"."items""#);
    assert_eq!(snapshot_line["level"], "INFO");

    let out = output(&o, "status", &["--json"]);
    assert_code(&out, 0, "a streaming slot is healthy");
    let s = json_of(&out);
    assert_eq!(s["exists"], true);
    assert_eq!(s["active"], true);
    assert!(s["active_pid"].as_i64().is_some(), "{s}");
    assert!(s["confirmed_flush_lsn"].as_str().is_some(), "{s}");
    assert_eq!(s["progress"]["snapshot"], "completed");
    assert_eq!(s["progress"]["snapshot_rows"], 50);
    assert_eq!(s["healthy"], true);

    // Stopped, with WAL written since: the slot keeps it.
    stop(child);
    o.sql("INSERT INTO items SELECT g, repeat('w', 200), g FROM generate_series(100, 3000) g")
        .await;
    let out = output(&o, "status", &["--json", "--max-retained-wal", "64kB"]);
    assert_code(&out, 5, "more WAL retained than the threshold");
    let s = json_of(&out);
    assert_eq!(s["active"], false);
    assert!(
        s["retained_wal_bytes"].as_i64().unwrap_or(0) > 64 * 1024,
        "{s}"
    );
    assert!(s["lag_bytes"].as_i64().unwrap_or(0) > 0, "{s}");
    let warning = s["warnings"][0].as_str().unwrap_or_default();
    assert!(
        warning.contains("retains") && warning.contains("no pgcdc is reading it"),
        "{s}"
    );

    let out = output(&o, "status", &["--max-retained-wal", "64kB"]);
    assert_code(&out, 5, "human form");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("inactive") && text.contains("WARNING"),
        "{text}"
    );
    // Under the default threshold (1 GB) the same slot is fine.
    assert_code(&output(&o, "status", &[]), 0, "default threshold");
}

/// Publishes pgcdc-shaped events straight to the topic, to make the topic lie.
async fn produce(topic: &str, events: &[(Value, Value)]) {
    let producer = sink::KafkaSink::new(KafkaConfig::new(kafka())).expect("producer");
    let (tx, rx) = sink::channel(16, sink::channel::CHANNEL_BYTES);
    let (acked, _) = tokio::sync::watch::channel(crate::common::api::Lsn::INVALID);
    let task = tokio::spawn(sink::run(sink::Sink::Kafka(producer), rx, acked));
    for (key, value) in events {
        let record = Record {
            topic: topic.into(),
            key: Some(serde_json::to_vec(key).unwrap().into()),
            value: Some(serde_json::to_vec(value).unwrap().into()),
            partition: None,
            headers: Vec::new(),
        };
        tx.send(SinkItem::Record(record)).await.expect("sink open");
    }
    drop(tx);
    task.await.expect("sink task").expect("records delivered");
}

fn event(op: &str, after: Value, commit_lsn: u64, lsn: u64) -> Value {
    let after = if op == "d" { Value::Null } else { after };
    json!({"before": null, "after": after,
           "source": {"connector": "pgcdc", "lsn": lsn, "commit_lsn": commit_lsn, "snapshot": "false"},
           "op": op, "ts_ms": 0})
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_finds_equal_missing_extra_and_differing_keys() {
    let o = Pipeline::new(ITEMS).await;
    let child = spawn_run(&o, &[], "run.log");
    o.wait_for_log("run.log", "streaming changes").await;
    o.sql("UPDATE items SET v = 'changed' WHERE id = 1; DELETE FROM items WHERE id = 2;")
        .await;

    let out = output(&o, "verify", &["--table", "public.items", "--json"]);
    assert_code(&out, 0, "pgcdc is running: the topic matches the table");
    let r = json_of(&out);
    assert_eq!(r["equal"], true);
    assert_eq!(r["table_rows"], 49);
    assert_eq!(r["same"], 49);

    // The topic lies about three keys, at positions before any later comparison point:
    // after the snapshot's reads (same commit_lsn, later lsn).
    let cfg = KafkaConfig::new(kafka());
    let topic = o.topic("items");
    let first = tokio::task::spawn_blocking(move || {
        read_topic(
            &cfg,
            &topic,
            ReadStop::Quiet {
                expected: Some(1),
                quiet: Duration::from_secs(5),
                max_wait: Duration::from_secs(20),
            },
        )
    })
    .await
    .unwrap()
    .expect("topic readable");
    let read: Value =
        serde_json::from_slice(first[0].value.as_deref().expect("a read event")).expect("JSON");
    let c0 = read["source"]["commit_lsn"].as_u64().expect("commit_lsn");
    produce(
        &o.topic("items"),
        &[
            // missing: a delete the table never saw
            (json!({"id": 3}), event("d", Value::Null, c0, c0 + 1)),
            // extra: a row the table never had
            (
                json!({"id": 999}),
                event("c", json!({"id": 999, "v": "ghost", "n": 999}), c0, c0 + 1),
            ),
            // differing: another value
            (
                json!({"id": 4}),
                event("u", json!({"id": 4, "v": "tampered", "n": 4}), c0, c0 + 1),
            ),
            // a replayed old event (lower position) changes nothing
            (
                json!({"id": 5}),
                event("u", json!({"id": 5, "v": "stale", "n": 5}), 1, 1),
            ),
        ],
    )
    .await;

    let out = output(&o, "verify", &["--table", "public.items", "--json"]);
    assert_code(&out, 1, "differences exit 1");
    let r = json_of(&out);
    assert_eq!(r["equal"], false);
    assert_eq!(r["missing"]["count"], 1, "{r}");
    assert_eq!(r["missing"]["examples"][0]["key"], r#"{"id":3}"#);
    assert_eq!(r["extra"]["count"], 1, "{r}");
    assert_eq!(r["extra"]["examples"][0]["key"], r#"{"id":999}"#);
    assert_eq!(r["differing"]["count"], 1, "{r}");
    assert_eq!(r["differing"]["examples"][0]["key"], r#"{"id":4}"#);
    let columns = r["differing"]["examples"][0]["columns"].to_string();
    assert!(
        columns.contains("tampered") && columns.contains("row 4"),
        "{r}"
    );
    let text = String::from_utf8_lossy(&output(&o, "verify", &["--table", "public.items"]).stdout)
        .into_owned();
    assert!(
        text.contains("DIFFERENT") && text.contains("{\"id\":999}"),
        "{text}"
    );

    // pgcdc stopped and the table changed: without --no-wait verify cannot reach a point
    // pgcdc published (and says so at once); with it, the unpublished change shows as a
    // difference.
    stop(child);
    o.sql("UPDATE items SET n = -10 WHERE id = 10").await;
    let out = output(&o, "verify", &["--table", "public.items"]);
    assert_code(&out, 3, "pgcdc is not running");
    assert!(
        stderr(&out).contains("start `pgcdc run` for this slot"),
        "{}",
        stderr(&out)
    );
    let out = output(
        &o,
        "verify",
        &["--table", "public.items", "--json", "--no-wait"],
    );
    assert_code(&out, 1, "an unpublished change differs");
    let r = json_of(&out);
    assert_eq!(r["differing"]["count"], 2, "{r}");
}

#[tokio::test(flavor = "multi_thread")]
async fn drop_refuses_while_active_then_removes_slot_publication_and_progress() {
    let o = Pipeline::new(ITEMS).await;
    let child = spawn_run(&o, &[], "run.log");
    o.wait_for_log("run.log", "streaming changes").await;
    let progress_key = format!("{}/{}", o.db.name, o.slot);
    let progress_topic = format!("{}._progress", o.prefix);
    let cfg = KafkaConfig::new(kafka());
    assert!(
        read_last_value(&cfg, &progress_topic, progress_key.as_bytes())
            .await
            .expect("progress readable")
            .is_some()
    );

    let out = output(&o, "drop", &["--yes"]);
    assert_code(&out, 3, "the slot is in use");
    let err = stderr(&out);
    assert!(
        err.contains("in use by process") && err.contains("nothing was removed"),
        "{err}"
    );
    assert!(o.slot_exists().await);

    stop(child);
    let out = output(&o, "drop", &[]);
    assert_code(&out, 2, "no --yes");
    assert!(stderr(&out).contains("--yes"), "{}", stderr(&out));
    assert!(o.slot_exists().await, "nothing removed without --yes");

    let out = output(&o, "drop", &["--yes"]);
    assert_code(&out, 0, "drop");
    assert!(!o.slot_exists().await);
    let publications: i64 =
        o.db.client()
            .await
            .query_one(
                "SELECT count(*) FROM pg_publication WHERE pubname = $1",
                &[&o.slot],
            )
            .await
            .unwrap()
            .get(0);
    assert_eq!(publications, 0);
    assert_eq!(
        read_last_value(&cfg, &progress_topic, progress_key.as_bytes())
            .await
            .expect("progress readable"),
        None,
        "progress record tombstoned"
    );
    assert_code(&output(&o, "status", &[]), 5, "status after drop");

    // The stdout sink's progress file; --keep-publication keeps the publication.
    let file = o.dir.join("progress.json");
    let file = file.to_str().unwrap();
    let mut run = cmd(
        &o,
        "run",
        &[
            "--sink",
            "stdout",
            "--progress-file",
            file,
            "--stop-lsn",
            "now",
        ],
    );
    let out = run.output().unwrap();
    assert_code(&out, 0, "stdout run");
    assert!(std::path::Path::new(file).exists());
    let mut drop_cmd = PgcdcCmd::new("drop").command();
    drop_cmd.args([
        "--source",
        &o.source(),
        "--slot",
        &o.slot,
        "--publication",
        &o.slot,
        "--progress-file",
        file,
        "--keep-publication",
        "--yes",
    ]);
    assert_code(&drop_cmd.output().unwrap(), 0, "drop with a progress file");
    assert!(!std::path::Path::new(file).exists());
    assert!(!o.slot_exists().await);
}

/// GET `path` on `addr`: (status code, body).
fn http_get(addr: &str, path: &str) -> (u16, String) {
    common::http_get(addr, path).expect("the metrics endpoint answers")
}

fn metric(body: &str, line_start: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_endpoint_counts_events_and_health_turns_503_when_stuck() {
    let o = Pipeline::new(ITEMS).await;
    let file = o.dir.join("progress.json");
    // The stdout sink into a pipe nobody reads yet: a sink that stops acknowledging.
    let (child, stdout) = common::process::spawn_piped(
        cmd(
            &o,
            "run",
            &[
                "--sink",
                "stdout",
                "--progress-file",
                file.to_str().unwrap(),
                "--metrics-addr",
                "127.0.0.1:0",
                "--unhealthy-after",
                "2",
            ],
        ),
        &o.dir.join("run.log"),
    );
    o.wait_for_log("run.log", "streaming changes").await;
    let logged = o.log("run.log");
    let addr = logged
        .split("serving metrics on http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .expect("the bound address is logged")
        .to_string();

    let (code, body) = http_get(&addr, "/metrics");
    assert_eq!(code, 200);
    assert_eq!(
        metric(&body, r#"pgcdc_events_total{table="public.items",op="r"}"#),
        Some(50.0),
        "{body}"
    );
    assert_eq!(
        metric(&body, r#"pgcdc_snapshot_rows{table="public.items"}"#),
        Some(50.0)
    );
    assert_eq!(
        metric(&body, r#"pgcdc_snapshot_done{table="public.items"}"#),
        Some(1.0)
    );
    assert_eq!(metric(&body, "pgcdc_streaming "), Some(1.0));
    for name in [
        "pgcdc_replication_lag_bytes ",
        "pgcdc_replication_lag_milliseconds ",
        "pgcdc_confirmed_lsn ",
        "pgcdc_sink_in_flight ",
        "pgcdc_reconnects_total ",
        "pgcdc_kafka_errors_total ",
    ] {
        assert!(metric(&body, name).is_some(), "{name} missing:\n{body}");
    }
    assert_eq!(http_get(&addr, "/health").0, 200);
    assert_eq!(http_get(&addr, "/nope").0, 404);

    // More than the pipe and pgcdc's buffers hold: the sink blocks, nothing is confirmed.
    o.sql("INSERT INTO items SELECT g, repeat('z', 1000), g FROM generate_series(1000, 3999) g")
        .await;
    let stuck = common::poll_until(Duration::from_secs(20), || async {
        let (code, body) = http_get(&addr, "/health");
        (code == 503).then_some(body)
    })
    .await;
    let stuck = stuck.unwrap_or_else(|| panic!("never unhealthy\n{}", o.log("run.log")));
    assert!(stuck.contains("unhealthy"), "{stuck}");
    let (_, body) = http_get(&addr, "/metrics");
    assert_eq!(metric(&body, "pgcdc_healthy "), Some(0.0), "{body}");

    // Reading the output unblocks it.
    let mut out = stdout;
    let reader = std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = out.read_to_end(&mut sink);
        sink.len()
    });
    let healthy = common::poll_until(Duration::from_secs(30), || async {
        let (code, body) = http_get(&addr, "/metrics");
        (code == 200
            && metric(&body, r#"pgcdc_events_total{table="public.items",op="c"}"#) == Some(3000.0)
            && metric(&body, "pgcdc_healthy ") == Some(1.0))
        .then_some(())
    })
    .await;
    assert!(
        healthy.is_some(),
        "{}\n{}",
        http_get(&addr, "/metrics").1,
        o.log("run.log")
    );
    assert_eq!(http_get(&addr, "/health").0, 200);
    stop(child);
    assert!(reader.join().unwrap() > 3_000_000);
}

#[tokio::test(flavor = "multi_thread")]
async fn config_file_is_overridden_by_env_then_flags() {
    let o = Pipeline::new("SELECT 1").await;
    let config = o.dir.join("pgcdc.toml");
    std::fs::write(
        &config,
        format!(
            "source = \"{}\"\nslot = \"file_slot\"\nmax-retained-wal = \"3MB\"\ntopic-prefix = \"{}\"\n",
            o.source(),
            o.prefix
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let status = |env: Option<&str>, flag: Option<&str>| {
        let mut c = PgcdcCmd::new("status").command();
        c.args(["--json", "--config", config]);
        if let Some(e) = env {
            c.env("PGCDC_SLOT", e);
        }
        if let Some(f) = flag {
            c.args(["--slot", f]);
        }
        let out = c.output().unwrap();
        assert_code(&out, 5, "no such slot");
        json_of(&out)
    };
    let s = status(None, None);
    assert_eq!(s["slot"], "file_slot");
    assert_eq!(s["max_retained_wal_bytes"], 3 << 20);
    assert_eq!(status(Some("env_slot"), None)["slot"], "env_slot");
    assert_eq!(
        status(Some("env_slot"), Some("flag_slot"))["slot"],
        "flag_slot"
    );
    assert_eq!(status(None, Some("flag_slot"))["slot"], "flag_slot");

    // PGCDC_CONFIG names the file too; an unknown key is an error naming it (exit 2).
    let bad = o.dir.join("bad.toml");
    std::fs::write(&bad, "slot = \"x\"\nkafka-bootstrap = \"k:9092\"\n").unwrap();
    let out = PgcdcCmd::new("status")
        .command()
        .env("PGCDC_CONFIG", &bad)
        .output()
        .unwrap();
    assert_code(&out, 2, "unknown key");
    assert!(
        stderr(&out).contains("unknown key `kafka-bootstrap`"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_encodes_rows_with_runs_event_options() {
    let o = Pipeline::new(
        "CREATE TABLE public.items (id int PRIMARY KEY, v text, n int, amount numeric,
                                    at timestamptz, secret text);
         INSERT INTO public.items
           SELECT g, 'row ' || g, g, g * 1.50, '2024-01-02 03:04:05+02', 'pw' || g
           FROM generate_series(1, 20) g;",
    )
    .await;
    let options = [
        "--decimal",
        "number",
        "--exclude-column",
        "public.items.secret",
    ];
    let child = spawn_run(&o, &options, "run.log");
    o.wait_for_log("run.log", "streaming changes").await;
    o.sql("UPDATE items SET amount = 9.99 WHERE id = 1").await;

    let mut args = vec!["--table", "public.items", "--json"];
    args.extend(options);
    let out = output(&o, "verify", &args);
    assert_code(&out, 0, "same options: equal");
    assert_eq!(json_of(&out)["same"], 20);

    // Without them, every row encodes differently from what was published.
    let out = output(&o, "verify", &["--table", "public.items", "--json"]);
    assert_code(&out, 1, "other options: different");
    assert_eq!(json_of(&out)["differing"]["count"], 20);
    stop(child);
}

/// `run --stop-lsn now` leaves an inactive slot that confirmed less than any later comparison
/// point (verify's own temporary slot writes WAL). With no change of the table in between,
/// verify compares at once; with one, it fails at once and names the ways out.
#[tokio::test(flavor = "multi_thread")]
async fn verify_after_a_stopped_run_compares_at_once_or_names_the_unpublished_change() {
    let o = Pipeline::new(ITEMS).await;
    // Another table of the publication changes after the run: not a change of `items`.
    o.sql("CREATE TABLE public.other (id int PRIMARY KEY, v text)")
        .await;
    let out = output(&o, "run", &["--table", "public.other", "--stop-lsn", "now"]);
    assert_code(&out, 0, "run --stop-lsn now");
    o.sql("INSERT INTO other VALUES (1, 'not items')").await;

    let started = std::time::Instant::now();
    let out = output(&o, "verify", &["--table", "public.items", "--json"]);
    assert_code(
        &out,
        0,
        "nothing of items is unpublished: compare without --no-wait",
    );
    assert_eq!(json_of(&out)["same"], 50);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "verify waited {:?} for a slot no pgcdc reads",
        started.elapsed()
    );

    // A change of the table after the stopped run: no waiting either, and the message says
    // what to do. Nothing was consumed from the slot by looking.
    o.sql("UPDATE items SET v = 'unpublished' WHERE id = 7")
        .await;
    let confirmed_before = slot_confirmed(&o).await;
    let started = std::time::Instant::now();
    let out = output(&o, "verify", &["--table", "public.items"]);
    assert_code(&out, 3, "an unpublished change of the table");
    let err = stderr(&out);
    assert!(
        err.contains("no pgcdc is reading")
            && err.contains("\"public\".\"items\"")
            && err.contains("start `pgcdc run`")
            && err.contains("--no-wait"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "verify waited {:?} before failing",
        started.elapsed()
    );
    assert_eq!(
        slot_confirmed(&o).await,
        confirmed_before,
        "peeking consumes nothing"
    );

    // pgcdc publishes it; then verify is content again.
    let out = output(&o, "run", &["--table", "public.other", "--stop-lsn", "now"]);
    assert_code(&out, 0, "run --stop-lsn now again");
    let out = output(&o, "verify", &["--table", "public.items", "--json"]);
    assert_code(&out, 0, "published now");
    assert_eq!(json_of(&out)["same"], 50);
}

async fn slot_confirmed(o: &Pipeline) -> Option<common::api::Lsn> {
    o.db.client()
        .await
        .query_one(
            "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1",
            &[&o.slot],
        )
        .await
        .expect("slot exists")
        .get(0)
}

/// A `-X` value is one property, whatever it holds: a `;` in a flag's or the config file's
/// value reaches librdkafka whole (its configuration dump, `debug=conf`, shows it). Only the
/// variable is a list, where `\;` is a literal semicolon. No error repeats a value.
#[tokio::test(flavor = "multi_thread")]
async fn kafka_properties_keep_semicolons_except_as_the_variables_separator() {
    let o = Pipeline::new("SELECT 1").await;
    // `status` of a slot that does not exist (exit 5) still reads the progress record, so it
    // creates a Kafka client with the properties. librdkafka writes its configuration dump
    // from its own thread, which a short-lived `status` may end before: a run whose output
    // has no dump at all is made again (a cut value would show as a dump with the cut value,
    // and as an error naming the tail as a property).
    let status = |flags: &[&str], env: Option<&str>, config: Option<&std::path::Path>| {
        let run = || {
            let mut c = cmd(&o, "status", flags);
            c.env("PGCDC_LOG", "librdkafka=debug");
            if let Some(e) = env {
                c.env("PGCDC_KAFKA_PROPERTIES", e);
            }
            if let Some(p) = config {
                c.arg("--config").arg(p);
            }
            c.output().expect("pgcdc runs")
        };
        let mut out = run();
        for _ in 0..5 {
            let dumped = stderr(&out).contains("client.id = ");
            let wanted = flags.contains(&"debug=conf")
                || env.is_some_and(|e| e.contains("debug=conf"))
                || config.is_some();
            if dumped || !wanted {
                break;
            }
            out = run();
        }
        out
    };
    let out = status(
        &[
            "-X",
            "client.id=flag;tail",
            "-X",
            "debug=conf",
            "-X",
            "log.queue=false",
        ],
        None,
        None,
    );
    assert_code(
        &out,
        5,
        "no slot: exit 5, after reading the progress record",
    );
    assert!(
        stderr(&out).contains("client.id = flag;tail"),
        "{}",
        stderr(&out)
    );

    let config = o.dir.join("x.toml");
    std::fs::write(
        &config,
        "kafka-properties = { \"client.id\" = \"file;tail\", \"debug\" = \"conf\", \"log.queue\" = \"false\" }\n",
    )
    .unwrap();
    let out = status(&[], None, Some(&config));
    assert_code(&out, 5, "config file");
    assert!(
        stderr(&out).contains("client.id = file;tail"),
        "{}",
        stderr(&out)
    );

    let out = status(
        &[],
        Some(r"client.id=env\;tail;debug=conf;log.queue=false"),
        None,
    );
    assert_code(&out, 5, "variable");
    assert!(
        stderr(&out).contains("client.id = env;tail"),
        "{}",
        stderr(&out)
    );

    // A password with a semicolon is not cut, and its tail is not shown as a bad property.
    let out = status(&["-X", "sasl.password=sec;ret-tail-5521"], None, None);
    assert_code(&out, 5, "a password with a semicolon");
    assert!(!stderr(&out).contains("ret-tail-5521"), "{}", stderr(&out));
    // Malformed properties are reported without their text.
    for (flags, env) in [
        (vec!["-X", "sasl.password:secret-7781"], None),
        (vec![], Some("linger.ms=5;sasl.password:secret-7781")),
    ] {
        let out = status(&flags, env, None);
        assert_code(&out, 2, "not key=value");
        let err = stderr(&out);
        assert!(
            err.contains("key=value") && !err.contains("secret-7781"),
            "{err}"
        );
    }
}

/// A snapshot that takes a while: rows of ~1 KB, analyzed so the estimate is known.
const BIG_ITEMS: &str = "CREATE TABLE public.items (id int PRIMARY KEY, v text, n int);
     INSERT INTO public.items SELECT g, repeat('p', 1000), g FROM generate_series(1, 20000) g;
     ANALYZE public.items;";

/// `--progress log`: while a table's snapshot runs, a `snapshot progress` line every 10 s with
/// rows read, the estimate, the rate and the time left. The stdout sink writing into a pipe
/// nobody reads holds the snapshot in the middle for as long as the test needs.
#[tokio::test(flavor = "multi_thread")]
async fn progress_log_lines_show_rows_rate_and_eta_during_the_snapshot() {
    let o = Pipeline::new(BIG_ITEMS).await;
    let file = o.dir.join("progress.json");
    let (child, stdout) = common::process::spawn_piped(
        cmd(
            &o,
            "run",
            &[
                "--sink",
                "stdout",
                "--progress-file",
                file.to_str().unwrap(),
                "--progress",
                "log",
                "--log-format",
                "json",
            ],
        ),
        &o.dir.join("run.log"),
    );
    let line = common::poll_until(Duration::from_secs(60), || async {
        o.log("run.log")
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|l| l["message"] == "snapshot progress")
    })
    .await
    .unwrap_or_else(|| panic!("no progress line:\n{}", o.log("run.log")));
    drop(stdout); // ends the run (a closed pipe)
    stop(child);
    assert_eq!(line["table"], "public.items", "{line}");
    let rows = line["rows"].as_u64().expect("rows");
    let estimate = line["estimated_rows"].as_u64().expect("estimated_rows");
    assert!(rows > 0 && rows < 20_000, "{line}");
    assert!((19_000..=21_000).contains(&estimate), "{line}");
    let rate = line["rows_per_sec"].as_u64().expect("rows_per_sec");
    assert!(rate > 0, "{line}");
    // Time left at the measured rate, to within rounding.
    let eta = line["eta_secs"].as_u64().expect("eta_secs");
    let expected = (estimate - rows) as f64 / rate as f64;
    assert!(
        (eta as f64 - expected).abs() <= expected * 0.1 + 1.0,
        "{line}"
    );
}

/// On a terminal (here a pseudo-terminal from `script`), `--progress auto` draws a bar per
/// table with rows of the estimate, the rate and the ETA.
#[tokio::test(flavor = "multi_thread")]
async fn progress_bar_on_a_terminal_shows_rows_rate_and_eta() {
    if Command::new("script").arg("--version").output().is_err() {
        return common::skip("progress bar", "`script` (util-linux) is not installed");
    }
    let o = Pipeline::new(BIG_ITEMS).await;
    let file = o.dir.join("progress.json");
    let run = cmd(
        &o,
        "run",
        &[
            "--sink",
            "stdout",
            "--progress-file",
            file.to_str().unwrap(),
            "--stop-lsn",
            "now",
        ],
    );
    let quote = |s: &std::ffi::OsStr| format!("'{}'", s.to_string_lossy().replace('\'', r"'\''"));
    let mut shell = quote(run.get_program());
    for a in run.get_args() {
        shell.push(' ');
        shell.push_str(&quote(a));
    }
    // stderr stays on the terminal; stdout goes to a pipe read only after 3 s, so the bar is
    // drawn while the snapshot waits.
    shell.push_str(" | (sleep 3; cat > /dev/null)");
    let mut script = Command::new("script");
    for (k, _) in std::env::vars() {
        if k.starts_with("PGCDC_") && !k.starts_with("PGCDC_TEST_") {
            script.env_remove(k);
        }
    }
    let out = script
        .args(["-q", "-e", "-c", &shell, "/dev/null"])
        .env("TERM", "xterm")
        .env("PGPASSFILE", "/nonexistent")
        .stdin(Stdio::null())
        .output()
        .expect("script runs");
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{:?}\n{screen}", out.status);
    // `public.items [=====>     ] 8,702/20,000 rows, 2,901 rows/s, ETA 4s`
    let bars: Vec<&str> = screen
        .split(['\r', '\n'])
        .filter(|l| l.contains("public.items") && l.contains("ETA"))
        .collect();
    assert!(!bars.is_empty(), "no bar drawn:\n{screen}");
    let mut waiting_eta = false;
    for bar in &bars {
        let field = |after: &str, before: &str| -> String {
            let rest = &bar[bar.find(after).unwrap_or_else(|| panic!("{bar}")) + after.len()..];
            rest[..rest.find(before).unwrap_or(rest.len())]
                .trim()
                .to_string()
        };
        let (rows, estimate) = (field("] ", "/"), field("/", " rows,"));
        let rows: u64 = rows
            .replace(',', "")
            .parse()
            .unwrap_or_else(|_| panic!("{bar}"));
        let estimate: u64 = estimate
            .replace(',', "")
            .parse()
            .unwrap_or_else(|_| panic!("{bar}"));
        assert!((19_000..=21_000).contains(&estimate), "{bar}");
        // The rate is rows read since the table's snapshot began, per second: a whole number,
        // never more than the rows there are in the time a bar needs to appear.
        let rate: u64 = field("rows, ", " rows/s")
            .replace(',', "")
            .parse()
            .unwrap_or_else(|_| panic!("{bar}"));
        assert!(rate <= 10 * estimate, "{bar}");
        let eta = field("ETA ", "\u{1b}");
        if rows > 0 && rows < estimate / 2 && eta != "0s" {
            waiting_eta = true;
        }
    }
    // While the snapshot waits for its reader, time left is time left at the rate so far.
    assert!(
        waiting_eta,
        "no bar of an unfinished snapshot shows time left:\n{}",
        bars.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_compares_what_the_publication_publishes() {
    let o = Pipeline::new(
        "CREATE TABLE public.items (id int PRIMARY KEY, v text, n int, secret text);
         INSERT INTO public.items SELECT g, 'row ' || g, g, 's' || g FROM generate_series(1, 50) g;",
    )
    .await;
    o.sql(&format!(
        "CREATE PUBLICATION {} FOR TABLE items (id, v, n) WHERE (id % 2 = 0)
         WITH (publish_via_partition_root = true)",
        o.slot
    ))
    .await;
    let child = spawn_run(&o, &[], "run.log");
    o.wait_for_log("run.log", "streaming changes").await;
    // Changes inside the filter, and rows leaving and entering it.
    o.sql(
        "UPDATE items SET v = 'changed', secret = 'x' WHERE id IN (2, 3);
         UPDATE items SET id = 101 WHERE id = 4;
         UPDATE items SET id = 102 WHERE id = 5;
         DELETE FROM items WHERE id IN (6, 7);
         INSERT INTO items VALUES (200, 'new', 1, 's'), (201, 'odd', 1, 's');",
    )
    .await;
    let out = output(&o, "verify", &["--table", "public.items", "--json"]);
    assert_code(&out, 0, "the topic holds what the publication publishes");
    let r = json_of(&out);
    assert_eq!(r["equal"], true, "{r}");
    assert_eq!(r["table_rows"], 25, "{r}");
    assert_eq!(r["same"], 25, "{r}");

    // Another publication (here: none of that name) compares the whole table, and says so.
    let out = output(
        &o,
        "verify",
        &[
            "--table",
            "public.items",
            "--json",
            "--publication",
            "other",
        ],
    );
    assert_code(&out, 1, "the whole table is not what was published");
    assert!(stderr(&out).contains("--publication"), "{}", stderr(&out));
    stop(child);
}
