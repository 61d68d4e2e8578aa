//! Failover of the primary: a primary and its physical standby on loopback
//! (`tests/env/pg-failover`), relays following a two-host URL with
//! `target_session_attrs=read-write`.
//!
//! On PostgreSQL 17, with failover slots made by `factlib setup
//! --failover`: the primary dies under load, the standby is promoted, and
//! every fact whose commit returned is in Kafka, exactly once from the
//! exactly-once relay, at least once from the at-least-once one.
//!
//! On PostgreSQL 16, which has no failover slots: what the README's
//! "Failover before PostgreSQL 17" says happens, happens.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// One pair at a time: both tests build theirs on the same ports.
static PAIR: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The pair's script, run to completion; panics with its output on failure.
fn pair(cmd: &str) -> String {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/env/pg-failover");
    let out = std::process::Command::new(&script)
        .args(cmd.split_whitespace())
        .output()
        .expect("run tests/env/pg-failover");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "tests/env/pg-failover {cmd} failed:\n{text}"
    );
    text
}

/// Stops the pair however the test ends.
struct PairDown;
impl Drop for PairDown {
    fn drop(&mut self) {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/env/pg-failover");
        let _ = std::process::Command::new(script).arg("down").output();
    }
}

/// `KEY` from the pair's env.sh.
fn pair_env(key: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/env/failover/env.sh");
    let text = std::fs::read_to_string(&path).expect("target/env/failover/env.sh");
    text.lines()
        .find_map(|l| {
            let v = l.trim().strip_prefix("export ")?.strip_prefix(key)?;
            Some(v.strip_prefix('=')?.trim_matches('\'').to_owned())
        })
        .unwrap_or_else(|| panic!("{key} not in {}", path.display()))
}

async fn sql_to(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// What the load generator knows of its facts.
#[derive(Default)]
struct Ledger {
    /// Their commit returned.
    acked: Vec<String>,
    /// Their commit was sent and no answer came: they may or may not be.
    uncertain: Vec<String>,
}

/// `txns` transactions of 5 facts against `url`, or fewer if one fails
/// (the server died): each transaction's ids go to `acked` once its commit
/// returns, to `uncertain` if anything in it failed.
async fn load(url: String, prefix: String, ledger: Arc<Mutex<Ledger>>, txns: usize) {
    let mut c = sql_to(&url).await.expect("connect the load generator");
    let mut n = ledger.lock().unwrap().acked.len();
    for _ in 0..txns {
        let mut ids = Vec::new();
        let result = async {
            let tx = c.transaction().await?;
            for i in 0..5 {
                let (fact, _) = factlib::emit::emit(&tx, &prefix, order_fact(n + i))
                    .await
                    .map_err(|e| e.to_string())?;
                ids.push(fact.id);
            }
            tx.commit().await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        }
        .await;
        let failed = result.is_err();
        {
            let mut l = ledger.lock().unwrap();
            if failed {
                l.uncertain.extend(ids);
            } else {
                l.acked.extend(ids);
            }
        }
        if failed {
            return;
        }
        n += 5;
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

/// The UTC time of day, in seconds, at the start of a log line
/// (`2026-12-07T03:21:05.123456Z ...`).
fn seconds_of_day(line: &str) -> Option<f64> {
    let time = line.split_whitespace().next()?.split_once('T')?.1;
    let mut parts = time.trim_end_matches('Z').split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// How often each id arrived.
fn count(got: &[String]) -> HashMap<&String, usize> {
    let mut m: HashMap<&String, usize> = HashMap::new();
    for id in got {
        *m.entry(id).or_default() += 1;
    }
    m
}

/// `factlib status --json` of `slot` through `url`.
async fn status(url: &str, slot: &str, publication: &str, prefix: &str) -> serde_json::Value {
    let mut c = factlib(slot, publication, prefix);
    c.env("FACTLIB_DATABASE_URL", url)
        .env("FACTLIB_BROKERS", brokers())
        .args(["status", "--json"]);
    let r = run(c, Duration::from_secs(60)).await;
    assert_eq!(r.code, 0, "status failed:\n{}{}", r.stdout, r.stderr);
    serde_json::from_str(r.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {}", r.stdout))
}

/// A running pair, this test's alone until dropped (then stopped).
struct Pair {
    _down: PairDown,
    _one: tokio::sync::MutexGuard<'static, ()>,
}

impl Pair {
    /// The URLs of both servers (`target_session_attrs=read-write`), the
    /// primary and the standby.
    fn urls(&self) -> (String, String, String) {
        (
            pair_env("FACTLIB_FAILOVER_URL"),
            pair_env("FACTLIB_FAILOVER_PRIMARY_URL"),
            pair_env("FACTLIB_FAILOVER_STANDBY_URL"),
        )
    }
}

/// Builds a fresh pair of `major` (`tests/env/pg-failover up`), once the
/// other test's pair is gone.
async fn pair_up(major: u32) -> Pair {
    let one = PAIR.lock().await;
    let down = PairDown;
    pair(&format!("up {major}"));
    Pair {
        _down: down,
        _one: one,
    }
}

/// `factlib setup --sql-api none` (with `--failover` if asked) of `slot`
/// through `url`.
async fn setup_via(
    url: &str,
    (slot, publication, prefix): (&str, &str, &str),
    failover: bool,
) -> Run {
    let mut c = factlib(slot, publication, prefix);
    c.env("FACTLIB_DATABASE_URL", url)
        .args(["setup", "--sql-api", "none"]);
    if failover {
        c.arg("--failover");
    }
    run(c, Duration::from_secs(60)).await
}

/// The standby's view of `slot` in a status report.
fn standby_view(st: &serde_json::Value) -> Option<&serde_json::Value> {
    st["failover"]["servers"]
        .as_array()?
        .iter()
        .find(|s| s["role"] == "standby")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_standby_takes_over_with_nothing_lost_or_repeated() {
    let fo = pair_up(17).await;
    let (multi, primary, standby) = fo.urls();
    let (slot_eo, slot_alo, slot_eo2, publication, prefix) = (
        unique("fo_eo"),
        unique("fo_alo"),
        unique("fo_eo2"),
        unique("fo_pub"),
        unique("fo"),
    );

    // setup --failover through the two-host URL: the slots are failover
    // slots on the primary, and setup names what the standby needs.
    for slot in [&slot_eo, &slot_alo, &slot_eo2] {
        let r = setup_via(&multi, (slot, &publication, &prefix), true).await;
        assert_eq!(r.code, 0, "setup --failover:\n{}{}", r.stdout, r.stderr);
        assert!(
            r.stdout
                .contains(&format!("slot \"{slot}\": created (pgoutput, failover)")),
            "{}",
            r.stdout
        );
        for needed in [
            "sync_replication_slots = on",
            "hot_standby_feedback = on",
            "primary_slot_name = 'factlib_standby'",
            "synchronized_standby_slots: factlib_standby",
        ] {
            assert!(
                r.stdout.contains(needed),
                "setup names {needed:?}:\n{}",
                r.stdout
            );
        }
    }
    let p = sql_to(&primary).await.expect("connect the primary");

    // A slot made without --failover: status warns that a promotion would
    // lose it, and setup --failover makes it a failover slot.
    let slot_late = unique("fo_late");
    let late = (slot_late.as_str(), publication.as_str(), prefix.as_str());
    assert_eq!(setup_via(&multi, late, false).await.code, 0);
    let st = status(&multi, &slot_late, &publication, &prefix).await;
    assert_eq!(st["failover"]["slot_failover"], false, "{st}");
    assert_eq!(st["failover"]["physical_standbys"], 1, "{st}");
    let warned = st["failover"]["warnings"].to_string();
    assert!(
        warned.contains("not a failover slot") && warned.contains("factlib setup --failover"),
        "{st}"
    );
    let r = setup_via(&multi, late, true).await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains(&format!(
            "slot \"{slot_late}\": exists (pgoutput), now a failover slot"
        )),
        "{}",
        r.stdout
    );
    // status through the standby alone says where to point it.
    let mut c = factlib(&slot_late, &publication, &prefix);
    c.env("FACTLIB_DATABASE_URL", &standby)
        .env("FACTLIB_BROKERS", brokers())
        .arg("status");
    let r = run(c, Duration::from_secs(60)).await;
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("is a standby in recovery")
            && r.stderr.contains("target_session_attrs=read-write"),
        "{}",
        r.stderr
    );
    p.execute("SELECT pg_drop_replication_slot($1)", &[&slot_late])
        .await
        .unwrap();
    let flags: Vec<(String, bool)> = p
        .query(
            "SELECT slot_name::text, failover FROM pg_replication_slots WHERE slot_name = ANY($1) ORDER BY 1",
            &[&vec![slot_alo.clone(), slot_eo.clone(), slot_eo2.clone()]],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(flags.len(), 3, "{flags:?}");
    assert!(
        flags.iter().all(|(_, f)| *f),
        "all are failover slots: {flags:?}"
    );

    // The relays: the same facts, through three slots, to three sets of
    // topics. The third (exactly-once) dies with the primary and is started
    // again after the promotion: it starts from the standby's copy of its
    // slot, which may be behind what Kafka holds.
    let mut eo = relay_exactly_once(&slot_eo, &publication, &prefix);
    eo.env("FACTLIB_DATABASE_URL", &multi);
    let eo = spawn(eo);
    let mut alo = relay(&slot_alo, &publication, &prefix);
    alo.env("FACTLIB_DATABASE_URL", &multi)
        .args(["--topic-template", "{prefix}.alo.{aggregate_type}"]);
    let alo = spawn(alo);
    let eo2 = || {
        let mut c = relay_exactly_once(&slot_eo2, &publication, &prefix);
        c.env("FACTLIB_DATABASE_URL", &multi)
            .args(["--topic-template", "{prefix}.eo2.{aggregate_type}"]);
        spawn(c)
    };
    let mut eo2_first = eo2();

    // Load on the primary, until it dies.
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let first = tokio::spawn(load(
        primary.clone(),
        prefix.clone(),
        ledger.clone(),
        usize::MAX,
    ));

    // Before the primary dies, the standby's copies of both slots must be
    // ready (synced, persistent): status says so.
    let deadline = Instant::now() + Duration::from_secs(120);
    let loaded = Instant::now();
    loop {
        let mut ready = 0;
        for slot in [&slot_eo, &slot_alo, &slot_eo2] {
            let st = status(&multi, slot, &publication, &prefix).await;
            assert_eq!(st["failover"]["slot_failover"], true, "{st}");
            if standby_view(&st).is_some_and(|v| v["slot"]["ready_for_failover"] == true) {
                ready += 1;
            }
            if Instant::now() > deadline {
                panic!("the standby's copy of {slot} was not ready for failover in 120 s: {st}");
            }
        }
        if ready == 3 && loaded.elapsed() > Duration::from_secs(5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The primary dies mid-load, and the third relay with it; the standby is
    // promoted.
    signal(&eo2_first, "KILL").await;
    eo2_first.wait().await.unwrap();
    pair("crash-primary");
    tokio::time::timeout(Duration::from_secs(60), first)
        .await
        .expect("the load generator notices the dead primary")
        .unwrap();
    let before = ledger.lock().unwrap().acked.len();
    assert!(before > 0, "the load committed facts on the primary");
    pair("promote");
    let promoted = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        % 86_400.0;

    let eo2 = eo2();

    // More load on the new primary.
    load(standby.clone(), prefix.clone(), ledger.clone(), 300).await;
    let (acked, uncertain) = {
        let l = ledger.lock().unwrap();
        (l.acked.clone(), l.uncertain.clone())
    };
    assert_eq!(
        acked.len(),
        before + 1500,
        "the new primary took every commit"
    );
    let may: HashSet<&String> = acked.iter().chain(uncertain.iter()).collect();

    let eo_got = read_ids(
        format!("{prefix}.order"),
        acked.len(),
        Duration::from_secs(180),
    )
    .await;
    let alo_got = read_ids(
        format!("{prefix}.alo.order"),
        acked.len(),
        Duration::from_secs(120),
    )
    .await;

    let eo2_got = read_ids(
        format!("{prefix}.eo2.order"),
        acked.len(),
        Duration::from_secs(120),
    )
    .await;

    let eo_out = stop_ok(eo).await;
    let alo_out = stop_ok(alo).await;
    let eo2_out = stop_ok(eo2).await;
    let eo_log = String::from_utf8_lossy(&eo_out.stderr);
    let alo_log = String::from_utf8_lossy(&alo_out.stderr);
    let eo2_log = String::from_utf8_lossy(&eo2_out.stderr);
    let dropped = eo2_log
        .lines()
        .find(|l| l.contains("dropped units the checkpoint says"))
        .unwrap_or("(none dropped: the copy was not behind Kafka)");
    eprintln!("exactly-once, restarted after the promotion: {dropped}");

    for (name, got, log) in [
        ("exactly-once", &eo_got, &eo_log),
        ("at-least-once", &alo_got, &alo_log),
        ("exactly-once, restarted", &eo2_got, &eo2_log),
    ] {
        let counts = count(got);
        let lost = acked.iter().filter(|id| !counts.contains_key(id)).count();
        let foreign = counts.keys().filter(|id| !may.contains(*id)).count();
        let dups: usize = counts.values().map(|n| n - 1).sum();
        let from_uncertain = counts.keys().filter(|id| uncertain.contains(id)).count();
        eprintln!(
            "{name}: {} acked ({before} before the failover), {} uncertain ({from_uncertain} of them arrived), \
             {} records, {lost} lost, {dups} duplicates",
            acked.len(),
            uncertain.len(),
            got.len()
        );
        assert_eq!(lost, 0, "{name}: {lost} committed facts lost\n{log}");
        assert_eq!(foreign, 0, "{name}: facts that were never emitted arrived");
        let resumed = log
            .lines()
            .find(|l| l.contains("streaming from slot") && l.contains("127.0.0.1:15472"))
            .unwrap_or_else(|| {
                panic!("{name}: the relay streams from the promoted standby:\n{log}")
            });
        if let Some(at) = seconds_of_day(resumed) {
            eprintln!(
                "{name}: streaming from the promoted standby {:.3} s after `pg_ctl promote` returned",
                at - promoted
            );
        }
        if name.starts_with("exactly-once") {
            assert_eq!(dups, 0, "exactly-once: {dups} duplicates\n{log}");
        }
    }

    // After the failover, status through the same URL reports the new
    // primary, which still holds the failover slot.
    let st = status(&multi, &slot_eo, &publication, &prefix).await;
    assert_eq!(st["failover"]["slot_failover"], true, "{st}");
    let roles: Vec<&str> = st["failover"]["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["unreachable", "primary"], "{st}");
}

/// Emits `n` facts in transactions of 5 on `url`; returns their ids.
async fn emit_on(url: &str, prefix: &str, n: usize) -> Vec<String> {
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    load(url.to_owned(), prefix.to_owned(), ledger.clone(), n / 5).await;
    let l = ledger.lock().unwrap();
    assert_eq!(l.acked.len(), n, "every commit on {url} returned");
    l.acked.clone()
}

/// PostgreSQL 16: no failover slots. `setup --failover` refuses, `status`
/// warns, and after a promotion the relay stops with the error that names
/// `factlib setup`; the slot made again on the new primary relays what is
/// committed after it, and misses what the README says it misses: the facts
/// the relay had not confirmed on the old primary, and those committed on
/// the new one before the slot was made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_17_a_promotion_loses_the_slot_as_the_readme_says() {
    let fo = pair_up(16).await;
    let (multi, primary, standby) = fo.urls();
    let (slot, publication, prefix) = (unique("fo16"), unique("fo16_pub"), unique("fo16"));
    let names = (slot.as_str(), publication.as_str(), prefix.as_str());
    let setup = |failover: bool| setup_via(&multi, names, failover);

    let r = setup(true).await;
    assert_ne!(r.code, 0, "--failover is refused on 16:\n{}", r.stdout);
    assert!(
        r.stderr.contains("--failover needs PostgreSQL 17")
            && r.stderr.contains("nothing was created"),
        "{}",
        r.stderr
    );
    let p = sql_to(&primary).await.expect("connect the primary");
    let n: i64 = p
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_type = 'logical'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "a refused setup creates no slot");
    let r = setup(false).await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);

    let st = status(&multi, &slot, &publication, &prefix).await;
    assert_eq!(
        st["failover"]["slot_failover"],
        serde_json::Value::Null,
        "{st}"
    );
    assert_eq!(st["failover"]["physical_standbys"], 1, "{st}");
    let warned = st["failover"]["warnings"].to_string();
    assert!(
        warned.contains("not a failover slot") && warned.contains("Failover before PostgreSQL 17"),
        "{st}"
    );
    assert!(
        standby_view(&st).is_some_and(|v| v["slot"].is_null()),
        "the standby has no copy of the slot: {st}"
    );

    // Relayed before the failover.
    let relay1 = {
        let mut c = relay_exactly_once(&slot, &publication, &prefix);
        c.env("FACTLIB_DATABASE_URL", &multi);
        spawn(c)
    };
    let topic = format!("{prefix}.order");
    let relayed = emit_on(&primary, &prefix, 200).await;
    let got = read_ids(topic.clone(), relayed.len(), Duration::from_secs(120)).await;
    check_exactly_once(&relayed, &got);
    stop_ok(relay1).await;
    // Committed (and on the synchronous standby), never relayed.
    let unrelayed = emit_on(&primary, &prefix, 100).await;

    pair("crash-primary");
    // A relay started now finds the primary gone and the standby
    // read-only, and retries until the standby is promoted; there it
    // finds no slot, and stops saying so.
    let mut c = relay_exactly_once(&slot, &publication, &prefix);
    c.env("FACTLIB_DATABASE_URL", &multi);
    let waiting = tokio::spawn(run(c, Duration::from_secs(120)));
    tokio::time::sleep(Duration::from_secs(3)).await;
    pair("promote");
    // Committed on the new primary before the slot is made there.
    let before_slot = emit_on(&standby, &prefix, 50).await;
    let r = waiting.await.unwrap();
    assert_eq!(r.code, 2, "the relay stops with exit 2:\n{}", r.stderr);
    assert!(
        r.stderr.contains("does not exist") && r.stderr.contains("factlib setup"),
        "{}",
        r.stderr
    );
    if let Some(l) = r.stderr.lines().find(|l| l.contains("read-only")) {
        eprintln!("before 17, while no server is read-write: {l}");
    }
    assert!(
        r.stderr.contains("127.0.0.1:15472: read-only") && r.stderr.contains("retrying"),
        "before the promotion the relay retried past the read-only standby:\n{}",
        r.stderr
    );

    // The README's procedure: setup on the new primary, then the relay.
    let r = setup(false).await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let relay2 = {
        let mut c = relay_exactly_once(&slot, &publication, &prefix);
        c.env("FACTLIB_DATABASE_URL", &multi);
        spawn(c)
    };
    let after = emit_on(&standby, &prefix, 100).await;
    let want = relayed.len() + after.len();
    let got = read_ids(topic, want, Duration::from_secs(120)).await;
    stop_ok(relay2).await;
    let counts = count(&got);
    let missed = |ids: &[String]| ids.iter().filter(|i| !counts.contains_key(i)).count();
    eprintln!(
        "before 17: {} relayed before the failover, {} after the new slot; missed: {} of {} \
         unconfirmed on the old primary, {} of {} committed before the new slot",
        relayed.len(),
        after.len() - missed(&after),
        missed(&unrelayed),
        unrelayed.len(),
        missed(&before_slot),
        before_slot.len()
    );
    let mut expected = relayed.clone();
    expected.extend(after);
    check_exactly_once(&expected, &got);
    assert_eq!(
        missed(&unrelayed),
        unrelayed.len(),
        "the old primary's unrelayed facts are missed"
    );
    assert_eq!(
        missed(&before_slot),
        before_slot.len(),
        "facts before the new slot are missed"
    );
}
