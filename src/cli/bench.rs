//! `factlib bench emit` (the load generator) and `factlib bench verify`
//! (reads the topics back and checks every committed fact arrived once,
//! exactly as written).
//!
//! ```text
//!  bench emit ──real transactions (some rolled back)──► PostgreSQL
//!      └─ manifest: one line per *committed* fact (topic, id, key, value hash, content hash)
//!  bench verify ──reads the topics from the start──► compares with the manifest
//!  bench verify --inbox-database-url ──reads factlib.inbox──► compares the content hashes
//! ```
//!
//! **Invariants**
//! - A fact enters the manifest only after its transaction's COMMIT returned.
//! - The checksum is order-independent: the wrapping sum of FNV-1a 64 over
//!   `id || value` of every fact, so emit and verify compute the same number
//!   when the same facts arrive. The inbox keeps the decoded fields, not the
//!   envelope, so its checksum sums [`content_hash`] instead.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{connect_sql, messages_reach_the_relay, CliError};
use crate::config::{
    BenchCommand, BenchEmitArgs, BenchVerifyArgs, CommonArgs, DeliveryArg, IsolationArg,
};
use crate::emit::{self, NewFact};
use crate::fact;
use crate::route::TopicTemplate;
use crate::sink::SinkSettings;

/// FNV-1a, 64 bit.
pub fn fnv1a64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// FNV-1a 64 over a fact's id, aggregate type, aggregate id, event type
/// and payload, separated by 0x1f: what the inbox keeps of a fact.
pub fn content_hash(
    id: &str,
    aggregate_type: &str,
    aggregate_id: &str,
    event_type: &str,
    payload: &[u8],
) -> u64 {
    let sep: &[u8] = &[0x1f];
    fnv1a64(&[
        id.as_bytes(),
        sep,
        aggregate_type.as_bytes(),
        sep,
        aggregate_id.as_bytes(),
        sep,
        event_type.as_bytes(),
        sep,
        payload,
    ])
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> CliError {
    let context = context.into();
    move |source| CliError::Io { context, source }
}

/// Runs `factlib bench …`.
pub async fn run(common: &CommonArgs, cmd: &BenchCommand) -> Result<ExitCode, CliError> {
    match cmd {
        BenchCommand::Emit(a) => emit_load(common, a).await,
        BenchCommand::Verify(a) => verify(a).await,
    }
}

/// The manifest's first line when it was written for an exactly-once relay.
const EXACTLY_ONCE_HEADER: &str = "# factlib manifest: delivery=exactly-once";

struct Line {
    topic: String,
    id: String,
    key: String,
    hash: u64,
    /// [`content_hash`]; 0 in manifests from before it was written.
    content: u64,
}

async fn emit_load(common: &CommonArgs, a: &BenchEmitArgs) -> Result<ExitCode, CliError> {
    let template = TopicTemplate::parse(&a.topic_template)
        .map_err(|e| CliError::Precondition(e.to_string()))?;
    let types: Vec<String> = a.aggregate_types.clone();
    if types.is_empty() {
        return Err(CliError::Precondition(
            "--aggregate-types needs at least one type".into(),
        ));
    }
    let mut manifest = match &a.manifest {
        Some(p) => {
            let mut m = std::io::BufWriter::new(
                std::fs::File::create(p).map_err(io(format!("creating {}", p.display())))?,
            );
            if a.delivery == DeliveryArg::ExactlyOnce {
                writeln!(m, "{EXACTLY_ONCE_HEADER}").map_err(io("writing the manifest"))?;
            }
            Some(m)
        }
        None => None,
    };
    let payload_pad = "x".repeat(usize::try_from(a.payload_bytes).unwrap_or(0));
    let txn_size = usize::try_from(a.txn_size).unwrap_or(1).max(1);
    let txn_size_max = a
        .txn_size_max
        .map_or(txn_size, |m| usize::try_from(m).unwrap_or(1))
        .max(txn_size);
    let connections = usize::try_from(a.connections).unwrap_or(1).max(1);
    let mut clients = Vec::new();
    for _ in 0..connections {
        let c = connect_sql(&common.database_url).await?;
        if clients.is_empty() {
            messages_reach_the_relay(&c).await?;
        }
        // Like an application on default settings: a commit returns once its
        // WAL is flushed, which is also when the walsender may send it.
        c.batch_execute("SET synchronous_commit = on")
            .await
            .map_err(|source| CliError::Postgres {
                context: "SET synchronous_commit".into(),
                source,
            })?;
        // Prepared once per session, not per transaction: the load
        // generator shares the machine with what it measures.
        let emit = c
            .prepare("SELECT pg_logical_emit_message(true, $1::text, $2::bytea)")
            .await
            .map_err(|source| CliError::Postgres {
                context: "preparing the emit".into(),
                source,
            })?;
        clients.push((c, emit));
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs(a.duration_secs);
    let mean_size = (txn_size + txn_size_max) as f64 / 2.0;
    let per_txn = Duration::from_secs_f64(mean_size / a.rate.max(1) as f64);
    let (mut committed, mut rolled_back, mut txns, mut checksum, mut n) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut next_progress = start + Duration::from_secs(1);
    let mut next_txn = start;
    // Transactions run `connections` at a time, each on its own session.
    while Instant::now() < deadline {
        let mut batch = Vec::new();
        for (c, emit) in clients.iter_mut() {
            let rollback = a.rollback_every > 0 && (txns + 1) % a.rollback_every == 0;
            txns += 1;
            // A fixed pseudo-random walk over [txn_size, txn_size_max].
            let spread = u64::try_from(txn_size_max - txn_size + 1).unwrap_or(1);
            let size = txn_size + usize::try_from(txns.wrapping_mul(7919) % spread).unwrap_or(0);
            let mut facts = Vec::with_capacity(size);
            for _ in 0..size {
                n += 1;
                let ty = &types[usize::try_from(n).unwrap_or(0) % types.len()];
                let key = format!("{ty}-{}", n % a.aggregates.max(1));
                let payload = format!("{{\"n\":{n},\"pad\":\"{payload_pad}\"}}");
                facts.push(NewFact {
                    aggregate_type: ty.clone(),
                    aggregate_id: key,
                    event_type: format!("{ty}.changed"),
                    payload: Bytes::from(payload),
                    metadata: BTreeMap::from([("bench".to_owned(), "1".to_owned())]),
                    trace_info: None,
                });
            }
            batch.push(one_txn(c, emit, &common.prefix, facts, rollback));
            next_txn += per_txn;
        }
        for r in futures_util::future::join_all(batch).await {
            let (written, rollback) = r?;
            if rollback {
                rolled_back += u64::try_from(written.len()).unwrap_or(0);
                continue;
            }
            for (f, envelope) in written {
                committed += 1;
                let hash = fnv1a64(&[f.id.as_bytes(), &envelope]);
                checksum = checksum.wrapping_add(hash);
                if let Some(m) = manifest.as_mut() {
                    let topic = template
                        .render(&common.prefix, &f.aggregate_type, &f.event_type)
                        .map_err(|e| CliError::Precondition(e.to_string()))?;
                    let content = content_hash(
                        &f.id,
                        &f.aggregate_type,
                        &f.aggregate_id,
                        &f.event_type,
                        &f.payload,
                    );
                    writeln!(
                        m,
                        "{topic}\t{}\t{}\t{hash:016x}\t{content:016x}",
                        f.id, f.aggregate_id
                    )
                    .map_err(io("writing the manifest"))?;
                }
            }
        }
        let now = Instant::now();
        if now >= next_progress {
            let secs = now.duration_since(start).as_secs_f64();
            eprintln!(
                "bench emit: {committed} facts committed, {rolled_back} rolled back, {:.0} facts/s",
                committed as f64 / secs
            );
            next_progress = now + Duration::from_secs(1);
        }
        if next_txn > now {
            tokio::time::sleep(next_txn - now).await;
        }
    }
    if let Some(mut m) = manifest {
        m.flush().map_err(io("writing the manifest"))?;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "emitted: {committed} facts committed in {} transactions, {rolled_back} facts rolled back, {:.0} facts/s over {secs:.1} s, checksum {checksum:016x}",
        txns,
        committed as f64 / secs
    );
    Ok(ExitCode::SUCCESS)
}

type Written = Vec<(fact::Fact, Vec<u8>)>;

async fn one_txn(
    client: &mut tokio_postgres::Client,
    emit: &tokio_postgres::Statement,
    prefix: &str,
    facts: Vec<NewFact>,
    rollback: bool,
) -> Result<(Written, bool), CliError> {
    let pg = |context: &'static str| {
        move |source| CliError::Postgres {
            context: context.into(),
            source,
        }
    };
    let tx = client.transaction().await.map_err(pg("BEGIN"))?;
    let mut written = Vec::with_capacity(facts.len());
    for f in facts {
        let built = emit::build(f)?;
        let envelope = fact::encode(&built);
        written.push((built, envelope));
    }
    // All emits of the transaction go out pipelined: one round trip.
    let params: Vec<[&(dyn tokio_postgres::types::ToSql + Sync); 2]> = written
        .iter()
        .map(|(_, envelope)| {
            [
                &prefix as &(dyn tokio_postgres::types::ToSql + Sync),
                envelope,
            ]
        })
        .collect();
    let sends = params.iter().map(|p| tx.execute(emit, p));
    for r in futures_util::future::join_all(sends).await {
        r.map_err(pg("emitting a fact"))?;
    }
    if rollback {
        tx.rollback().await.map_err(pg("ROLLBACK"))?;
    } else {
        tx.commit().await.map_err(pg("COMMIT"))?;
    }
    Ok((written, rollback))
}

/// The manifest's lines, and whether it was written for an exactly-once
/// relay.
fn read_manifest(path: &Path) -> Result<(Vec<Line>, bool), CliError> {
    let f = std::fs::File::open(path).map_err(io(format!("opening {}", path.display())))?;
    let mut out = Vec::new();
    let mut exactly_once = false;
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(io("reading the manifest"))?;
        if line.starts_with('#') {
            exactly_once |= line == EXACTLY_ONCE_HEADER;
            continue;
        }
        let mut it = line.split('\t');
        let (Some(topic), Some(id), Some(key), Some(hash)) =
            (it.next(), it.next(), it.next(), it.next())
        else {
            return Err(CliError::Precondition(format!(
                "{}:{}: not a manifest line",
                path.display(),
                i + 1
            )));
        };
        let hex = |h: &str| {
            u64::from_str_radix(h, 16).map_err(|_| {
                CliError::Precondition(format!("{}:{}: bad hash", path.display(), i + 1))
            })
        };
        let content = match it.next() {
            Some(c) => hex(c)?,
            None => 0,
        };
        out.push(Line {
            topic: topic.into(),
            id: id.into(),
            key: key.into(),
            hash: hex(hash)?,
            content,
        });
    }
    Ok((out, exactly_once))
}

async fn verify(a: &BenchVerifyArgs) -> Result<ExitCode, CliError> {
    let (lines, exactly_once) = read_manifest(&a.manifest)?;
    if let Some(url) = &a.inbox_database_url {
        return verify_inbox(url, &lines, Duration::from_secs(a.timeout_secs)).await;
    }
    let isolation = a.isolation.unwrap_or(if exactly_once {
        IsolationArg::ReadCommitted
    } else {
        IsolationArg::ReadUncommitted
    });
    println!(
        "verify: reading with isolation.level={} ({} manifest)",
        isolation.as_str(),
        if exactly_once {
            "exactly-once"
        } else {
            "at-least-once"
        }
    );
    let expected: HashMap<&str, &Line> = lines.iter().map(|l| (l.id.as_str(), l)).collect();
    let topics: Vec<String> = lines
        .iter()
        .map(|l| l.topic.clone())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let kafka = a.kafka.reader()?;
    let timeout = Duration::from_secs(a.timeout_secs);
    let want = lines.len();
    let records =
        tokio::task::spawn_blocking(move || read_topics(&kafka, &topics, want, timeout, isolation))
            .await
            .map_err(|e| CliError::Precondition(format!("reader thread failed: {e}")))??;
    let mut seen: HashMap<String, u32> = HashMap::new();
    let (mut mismatched, mut unexpected, mut checksum) = (0u64, 0u64, 0u64);
    for (topic, key, id, value) in &records {
        let Some(l) = expected.get(id.as_str()) else {
            unexpected += 1;
            continue;
        };
        let hash = fnv1a64(&[id.as_bytes(), value]);
        let count = seen.entry(id.clone()).or_default();
        *count += 1;
        if *count == 1 {
            checksum = checksum.wrapping_add(hash);
        }
        if hash != l.hash || *topic != l.topic || key.as_deref() != Some(l.key.as_bytes()) {
            mismatched += 1;
        }
    }
    let missing = lines.iter().filter(|l| !seen.contains_key(&l.id)).count();
    let duplicates: u64 = seen.values().map(|c| u64::from(c.saturating_sub(1))).sum();
    let want_sum = lines.iter().fold(0u64, |s, l| s.wrapping_add(l.hash));
    println!(
        "verify: {} committed facts expected, {} records read: {} arrived, {missing} missing, {duplicates} duplicates, {mismatched} not as written, {unexpected} unexpected",
        lines.len(),
        records.len(),
        seen.len()
    );
    println!("verify: checksum expected {want_sum:016x}, read {checksum:016x}");
    let verdict = Verdict::of(
        missing == 0 && mismatched == 0 && unexpected == 0 && checksum == want_sum,
        duplicates,
        exactly_once,
    );
    match verdict {
        Verdict::Exact => {
            println!("VERIFIED: every committed fact arrived exactly once, exactly as written");
        }
        Verdict::AtLeastOnce => println!(
            "VERIFIED (at-least-once): every committed fact arrived as written; {duplicates} duplicates"
        ),
        Verdict::Duplicated => println!(
            "FAILED: {duplicates} duplicates, and the manifest was written for an exactly-once relay"
        ),
        Verdict::Failed => println!("FAILED: see the counts above"),
    }
    Ok(if verdict.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `bench verify --inbox-database-url`: waits (up to `timeout`) until
/// every committed fact is in factlib.inbox, then compares each row of the
/// manifest's topics with its line.
async fn verify_inbox(url: &str, lines: &[Line], timeout: Duration) -> Result<ExitCode, CliError> {
    if lines.iter().any(|l| l.content == 0) {
        return Err(CliError::Precondition(
            "the manifest has no content hashes (written by an older factlib): emit it again"
                .into(),
        ));
    }
    println!("verify: reading factlib.inbox");
    let client = connect_sql(url).await?;
    let pg = |context: &'static str| {
        move |source| CliError::Postgres {
            context: context.into(),
            source,
        }
    };
    let topics: Vec<&str> = lines
        .iter()
        .map(|l| l.topic.as_str())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let ids: Vec<&str> = lines.iter().map(|l| l.id.as_str()).collect();
    let deadline = Instant::now() + timeout;
    loop {
        let arrived: i64 = client
            .query_one(
                "SELECT count(*) FROM factlib.inbox WHERE id = ANY($1::text[]::uuid[])",
                &[&ids],
            )
            .await
            .map_err(pg("counting the facts in factlib.inbox"))?
            .get(0);
        if usize::try_from(arrived).unwrap_or(0) >= lines.len() || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let rows = client
        .query(
            "SELECT id::text, topic, aggregate_type, aggregate_id, event_type, payload \
             FROM factlib.inbox WHERE topic = ANY($1)",
            &[&topics],
        )
        .await
        .map_err(pg("reading factlib.inbox"))?;
    let expected: HashMap<&str, &Line> = lines.iter().map(|l| (l.id.as_str(), l)).collect();
    let mut seen: HashMap<String, u32> = HashMap::new();
    let (mut mismatched, mut unexpected, mut checksum) = (0u64, 0u64, 0u64);
    for r in &rows {
        let (id, topic, at, ai, et, payload): (String, String, String, String, String, Vec<u8>) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5));
        let Some(l) = expected.get(id.as_str()) else {
            unexpected += 1;
            continue;
        };
        let content = content_hash(&id, &at, &ai, &et, &payload);
        let count = seen.entry(id).or_default();
        *count += 1;
        if *count == 1 {
            checksum = checksum.wrapping_add(content);
        }
        if content != l.content || topic != l.topic || ai != l.key {
            mismatched += 1;
        }
    }
    let missing = lines.iter().filter(|l| !seen.contains_key(&l.id)).count();
    let duplicates: u64 = seen.values().map(|c| u64::from(c.saturating_sub(1))).sum();
    let want_sum = lines.iter().fold(0u64, |s, l| s.wrapping_add(l.content));
    println!(
        "verify: {} committed facts expected, {} inbox rows in their topics: {} arrived, {missing} missing, {duplicates} duplicates, {mismatched} not as written, {unexpected} unexpected",
        lines.len(),
        rows.len(),
        seen.len()
    );
    println!("verify: checksum expected {want_sum:016x}, read {checksum:016x}");
    let complete = missing == 0 && mismatched == 0 && unexpected == 0 && checksum == want_sum;
    if complete && duplicates == 0 {
        println!(
            "VERIFIED: every committed fact is in factlib.inbox exactly once, exactly as written"
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!("FAILED: see the counts above");
        Ok(ExitCode::from(1))
    }
}

/// What `bench verify` concludes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Everything arrived once, as written.
    Exact,
    /// Everything arrived as written, some twice: fine for an
    /// at-least-once relay.
    AtLeastOnce,
    /// Everything arrived as written, some twice, from an exactly-once
    /// relay.
    Duplicated,
    /// Something is missing, altered or unexpected.
    Failed,
}

impl Verdict {
    fn of(complete: bool, duplicates: u64, exactly_once: bool) -> Self {
        match (complete, duplicates, exactly_once) {
            (false, _, _) => Verdict::Failed,
            (true, 0, _) => Verdict::Exact,
            (true, _, false) => Verdict::AtLeastOnce,
            (true, _, true) => Verdict::Duplicated,
        }
    }

    fn passed(self) -> bool {
        matches!(self, Verdict::Exact | Verdict::AtLeastOnce)
    }
}

type Read = (String, Option<Vec<u8>>, String, Vec<u8>);

fn read_topics(
    kafka: &SinkSettings,
    topics: &[String],
    want: usize,
    timeout: Duration,
    isolation: IsolationArg,
) -> Result<Vec<Read>, CliError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};

    let fail = |e: rdkafka::error::KafkaError| CliError::Precondition(format!("Kafka: {e}"));
    let group = format!("factlib-verify-{}", std::process::id());
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("isolation.level", isolation.as_str());
    kafka.security.apply(&mut config);
    let consumer: BaseConsumer = config.create().map_err(fail)?;
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        let md = consumer
            .fetch_metadata(Some(t), Duration::from_secs(10))
            .map_err(fail)?;
        for mt in md.topics() {
            for p in mt.partitions() {
                tpl.add_partition_offset(mt.name(), p.id(), Offset::Beginning)
                    .map_err(fail)?;
            }
        }
    }
    consumer.assign(&tpl).map_err(fail)?;
    let start = Instant::now();
    let mut out = Vec::new();
    let mut quiet_since = Instant::now();
    while start.elapsed() < timeout {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let id = m
                    .headers()
                    .and_then(|h| {
                        h.iter()
                            .find(|h| h.key == "factlib-id")
                            .and_then(|h| h.value.map(<[u8]>::to_vec))
                    })
                    .map(|v| String::from_utf8_lossy(&v).into_owned())
                    .unwrap_or_default();
                out.push((
                    m.topic().to_owned(),
                    m.key().map(<[u8]>::to_vec),
                    id,
                    m.payload().unwrap_or_default().to_vec(),
                ));
                quiet_since = Instant::now();
            }
            Some(Err(e)) => return Err(fail(e)),
            None => {
                // Everything expected is in, and nothing more came for 2 s.
                if out.len() >= want && quiet_since.elapsed() >= Duration::from_secs(2) {
                    break;
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_fail_only_an_exactly_once_manifest() {
        assert_eq!(Verdict::of(true, 0, true), Verdict::Exact);
        assert_eq!(Verdict::of(true, 3, false), Verdict::AtLeastOnce);
        assert_eq!(Verdict::of(true, 3, true), Verdict::Duplicated);
        assert_eq!(Verdict::of(false, 0, false), Verdict::Failed);
        assert!(Verdict::AtLeastOnce.passed() && !Verdict::Duplicated.passed());
    }

    #[test]
    fn the_manifest_header_records_exactly_once() {
        let dir = tempfile::tempdir().unwrap();
        let eo = dir.path().join("eo.tsv");
        std::fs::write(
            &eo,
            format!("{EXACTLY_ONCE_HEADER}\nt\tid1\tk\t00000000000000ff\n"),
        )
        .unwrap();
        let (lines, exactly_once) = read_manifest(&eo).unwrap();
        assert!(exactly_once);
        assert_eq!((lines.len(), lines[0].hash), (1, 0xff));
        let alo = dir.path().join("alo.tsv");
        std::fs::write(&alo, "t\tid1\tk\t00000000000000ff\n").unwrap();
        assert!(!read_manifest(&alo).unwrap().1);
    }

    #[test]
    fn fnv_matches_reference_values() {
        assert_eq!(fnv1a64(&[b""]), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(&[b"a"]), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(&[b"foo", b"bar"]), fnv1a64(&[b"foobar"]));
    }
}
