//! The command line: one clap [`Cli`] with a sub-struct per subcommand,
//! converted here, in one place, into each stage's own plain settings
//! struct ([`SourceSettings`], [`SinkSettings`], [`RelaySettings`], …).
//!
//! Owns every tunable. Each flag also reads a `FACTLIB_*` environment
//! variable, and each has a `--help` text that says what it does and its
//! default. No stage imports this module or clap.
//!
//! **Invariants**
//! - Values are validated here (ranges, names, the URL, the template) so a
//!   stage never sees a nonsensical setting.
//! - With no flag given, each conversion yields the stage's `Default`
//!   (checked by a test), so the library and the command line agree.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::fact::DEFAULT_PREFIX;
use crate::inbox::{InboxSettings, Subscription};
use crate::outbox::{ColumnNames, ExtraColumns, OutboxSettings};
use crate::relay::{DeliveryMode, ExactlyOnce, RelaySettings};
use crate::route::{RingSettings, RouteError, TopicTemplate};
use crate::sink::record::{HeaderSet, RecordShape, ValueMode};
use crate::sink::{
    Compression, CreateTopics, KafkaSecurity, SaslCredentials, SaslMechanism, Secret,
    SecurityProtocol, SinkSettings,
};
use crate::source::{sql_config, ConnectionConfig, SourceSettings, Transport, UrlError};
use crate::telemetry::{self, MetricsSettings};

/// Factlib: relays facts that services write to PostgreSQL's WAL.
#[derive(Debug, Parser)]
#[command(name = "factlib", version, about, long_about = None)]
pub struct Cli {
    /// Connection and naming options shared by every command.
    #[command(flatten)]
    pub common: CommonArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand shares.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// PostgreSQL connection URL (libpq form; the password may be given in
    /// PGPASSWORD instead). Only TCP hosts are supported for replication.
    #[arg(
        long,
        global = true,
        env = "FACTLIB_DATABASE_URL",
        default_value = "postgresql://factlib:factlib@127.0.0.1:54329/factlib",
        hide_env_values = true
    )]
    pub database_url: String,

    /// Logical replication slot that holds the relay's position.
    #[arg(long, global = true, env = "FACTLIB_SLOT", default_value = "factlib")]
    pub slot: String,

    /// Publication the slot streams (messages only unless tables are added).
    #[arg(
        long,
        global = true,
        env = "FACTLIB_PUBLICATION",
        default_value = "factlib"
    )]
    pub publication: String,

    /// Logical-message prefix that marks a fact; messages under other
    /// prefixes are skipped.
    #[arg(long, global = true, env = "FACTLIB_PREFIX", default_value = DEFAULT_PREFIX)]
    pub prefix: String,

    /// Log filter, in tracing's EnvFilter syntax (e.g. `info`,
    /// `factlib=debug`). Logs go to stderr.
    #[arg(long, global = true, env = "FACTLIB_LOG", default_value = "info")]
    pub log: String,

    /// Log line format on stderr: text (for people) or json (one object per
    /// line, for log shippers).
    #[arg(
        long,
        global = true,
        env = "FACTLIB_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text
    )]
    pub log_format: LogFormat,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line: timestamp, level, target, fields.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check wal_level and create the publication and the slot if missing.
    Setup(SetupArgs),
    /// Emit one fact in its own transaction.
    Emit(EmitArgs),
    /// Stream facts from the slot and print one JSON object per line.
    Tail(TailArgs),
    /// Show the slot's position, lag and retained WAL, and the exactly-once
    /// checkpoint; exits 1 if the slot is missing.
    Status(StatusArgs),
    /// Relay facts from the slot to Kafka; the slot advances only past facts
    /// Kafka has acknowledged.
    Relay(Box<RelayArgs>),
    /// Load generation and end-to-end verification.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Consume facts from Kafka into the consuming service's own
    /// PostgreSQL (factlib.inbox), exactly once; `inbox setup` creates the
    /// tables.
    Inbox(Box<InboxArgs>),
}

/// `factlib inbox`
#[derive(Debug, Args)]
pub struct InboxArgs {
    /// `setup`: create or upgrade the inbox schema; without it, consume.
    #[command(subcommand)]
    pub action: Option<InboxAction>,

    /// The consuming service's PostgreSQL (libpq URL; TLS as its sslmode
    /// says), where factlib.inbox lives.
    #[arg(
        long,
        global = true,
        env = "FACTLIB_INBOX_DATABASE_URL",
        hide_env_values = true
    )]
    pub inbox_database_url: Option<String>,

    /// Topics to read: a comma-separated list, or one regular expression
    /// starting with ^ (librdkafka's syntax, no commas), e.g.
    /// '^factlib\.order.*'. The relay writes the envelope (its default
    /// --value envelope), which the inbox needs.
    #[arg(long, env = "FACTLIB_INBOX_TOPICS", value_delimiter = ',')]
    pub topics: Vec<String>,

    /// Kafka consumer group. Processes in one group share the partitions;
    /// the positions are stored per group in factlib.inbox_offsets.
    #[arg(long, env = "FACTLIB_INBOX_GROUP", default_value = "factlib-inbox")]
    pub group: String,

    /// Write a batch (one database transaction) once it holds this many
    /// records.
    #[arg(long, env = "FACTLIB_INBOX_BATCH_MAX_FACTS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub batch_max_facts: u64,

    /// ... or once its first record waited this many milliseconds.
    #[arg(long, env = "FACTLIB_INBOX_BATCH_MAX_MS", default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub batch_max_ms: u64,

    /// Database connections writing batches at once. Each partition is
    /// written by one of them, in order; more use more of the database's
    /// cores.
    #[arg(long, env = "FACTLIB_INBOX_WRITERS", default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub writers: u64,

    /// librdkafka's fetch queue (queued.max.messages.kbytes), in KiB: how
    /// much is read ahead of the writers.
    #[arg(long, env = "FACTLIB_INBOX_FETCH_QUEUE_KBYTES", default_value_t = 16_384, value_parser = clap::value_parser!(u64).range(1..=2_097_151))]
    pub fetch_queue_kbytes: u64,

    /// Kafka's session.timeout.ms: a process that stops heartbeating (it
    /// died) loses its partitions to the others after this long. The
    /// broker allows 6,000 and up by default.
    #[arg(long, env = "FACTLIB_INBOX_SESSION_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1_000..=3_600_000))]
    pub session_timeout_ms: u64,

    /// Delete processed facts (processed_at set) older than this, e.g.
    /// 7d, 12h, 30m, 90s; checked every minute, 5,000 rows a statement.
    /// A deleted fact's id is forgotten: a replay older than this is
    /// written again. Off by default.
    #[arg(long, env = "FACTLIB_INBOX_RETENTION", value_parser = parse_age)]
    pub inbox_retention: Option<Duration>,

    /// Longest wait between reconnection attempts, in milliseconds (as for
    /// the relay: 50-100 ms after a healthy session, doubling over
    /// failures in a row).
    #[arg(long, env = "FACTLIB_MAX_BACKOFF_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub max_backoff_ms: u64,

    /// Print a progress line every this many seconds (0: never).
    #[arg(long, env = "FACTLIB_PROGRESS_INTERVAL_SECS", default_value_t = 10)]
    pub progress_interval_secs: u64,

    /// Serve Prometheus metrics on http://HOST:PORT/metrics (facts
    /// written, duplicates, dead letters, batch time, lag per partition),
    /// with /healthz and /readyz (200 while consuming into the database
    /// with Kafka reachable). Off by default.
    #[arg(long, env = "FACTLIB_METRICS_ADDR", value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,

    /// Extra librdkafka consumer properties (key=value, comma-separated or
    /// repeated), applied last, e.g. fetch.max.bytes=10485760.
    #[arg(long = "consumer-property", env = "FACTLIB_CONSUMER_PROPERTIES", value_delimiter = ',', value_parser = parse_key_value)]
    pub consumer_properties: Vec<(String, String)>,

    /// How to reach Kafka.
    #[command(flatten)]
    pub kafka: KafkaArgs,
}

/// `factlib inbox …`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Subcommand)]
pub enum InboxAction {
    /// Create (or upgrade) factlib.inbox, its offsets, dead-letter and
    /// claims tables and factlib.inbox_claim() in --inbox-database-url;
    /// versioned and idempotent.
    Setup,
}

impl InboxArgs {
    /// The inbox database URL, which has no default.
    pub fn database_url(&self) -> Result<&str, ConfigError> {
        self.inbox_database_url.as_deref().ok_or_else(|| {
            ConfigError::Inbox(
                "set --inbox-database-url (or FACTLIB_INBOX_DATABASE_URL) to the consuming service's PostgreSQL"
                    .into(),
            )
        })
    }

    /// The inbox's settings.
    pub fn settings(&self) -> Result<InboxSettings, ConfigError> {
        let topics = match self.topics.as_slice() {
            [] => {
                return Err(ConfigError::Inbox(
                    "set --topics (or FACTLIB_INBOX_TOPICS): the topics to read, e.g. factlib.order,factlib.payment, or a pattern such as '^factlib\\.order.*'".into(),
                ))
            }
            [one] if one.starts_with('^') => Subscription::Pattern(one.clone()),
            many if many.iter().any(|t| t.starts_with('^')) => {
                return Err(ConfigError::Inbox(
                    "--topics: give either a list of topics or one pattern starting with ^, not both".into(),
                ))
            }
            many => Subscription::Topics(many.iter().map(|t| t.trim().to_owned()).collect()),
        };
        sql_config(self.database_url()?)?;
        Ok(InboxSettings {
            database_url: self.database_url()?.to_owned(),
            brokers: self.kafka.brokers.clone(),
            security: self.kafka.security()?,
            group: self.group.clone(),
            topics,
            batch_max_facts: to_usize(self.batch_max_facts),
            batch_max: Duration::from_millis(self.batch_max_ms),
            writers: to_usize(self.writers),
            fetch_queue_kbytes: to_usize(self.fetch_queue_kbytes),
            session_timeout: Duration::from_millis(self.session_timeout_ms),
            consumer_properties: self.consumer_properties.clone(),
            retention: self.inbox_retention,
            max_backoff: Duration::from_millis(self.max_backoff_ms),
            progress_interval: (self.progress_interval_secs > 0)
                .then(|| Duration::from_secs(self.progress_interval_secs)),
            metrics: self
                .metrics_addr
                .as_ref()
                .map(|addr| MetricsSettings { addr: addr.clone() }),
        })
    }
}

/// An age such as `7d`, `12h`, `30m` or `90s`.
fn parse_age(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("expected a number and a unit (s, m, h or d), e.g. 7d; got {s:?}"))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(format!("unknown unit {unit:?} in {s:?}: use s, m, h or d")),
    };
    if n == 0 {
        return Err("the retention must be more than 0".into());
    }
    Ok(Duration::from_secs(n.saturating_mul(secs)))
}

/// `factlib bench …`
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Emit facts in real transactions at a steady rate, with rolled-back
    /// transactions mixed in; optionally record the committed ones.
    Emit(BenchEmitArgs),
    /// Read the topics back and check every fact in a manifest arrived once,
    /// exactly as written.
    Verify(BenchVerifyArgs),
}

/// `factlib bench emit`
#[derive(Debug, Args)]
pub struct BenchEmitArgs {
    /// Target facts per second.
    #[arg(long, env = "FACTLIB_BENCH_RATE", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub rate: u64,
    /// How long to emit, in seconds.
    #[arg(long, env = "FACTLIB_BENCH_DURATION_SECS", default_value_t = 10)]
    pub duration_secs: u64,
    /// Facts per transaction.
    #[arg(long, env = "FACTLIB_BENCH_TXN_SIZE", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub txn_size: u64,
    /// Vary transaction sizes between --txn-size and this (a fixed
    /// pseudo-random sequence).
    #[arg(long, env = "FACTLIB_BENCH_TXN_SIZE_MAX", value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub txn_size_max: Option<u64>,
    /// The relay's delivery mode, recorded in the manifest: `bench verify`
    /// then reads with isolation.level=read_committed and counts any
    /// duplicate as a failure when it is `exactly-once`.
    #[arg(long, env = "FACTLIB_DELIVERY", value_enum, default_value_t = DeliveryArg::AtLeastOnce)]
    pub delivery: DeliveryArg,
    /// Roll back every Nth transaction (0: never).
    #[arg(long, env = "FACTLIB_BENCH_ROLLBACK_EVERY", default_value_t = 10)]
    pub rollback_every: u64,
    /// Padding added to each JSON payload, in bytes.
    #[arg(long, env = "FACTLIB_BENCH_PAYLOAD_BYTES", default_value_t = 200)]
    pub payload_bytes: u64,
    /// Distinct aggregate ids per aggregate type.
    #[arg(long, env = "FACTLIB_BENCH_AGGREGATES", default_value_t = 100)]
    pub aggregates: u64,
    /// Aggregate types to spread facts over (comma-separated).
    #[arg(
        long,
        env = "FACTLIB_BENCH_AGGREGATE_TYPES",
        value_delimiter = ',',
        default_value = "order,invoice"
    )]
    pub aggregate_types: Vec<String>,
    /// Concurrent sessions, each running its own transactions.
    #[arg(long, env = "FACTLIB_BENCH_CONNECTIONS", default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub connections: u64,
    /// Write one line per committed fact (topic, id, key, value hash) here,
    /// for `bench verify`.
    #[arg(long, env = "FACTLIB_BENCH_MANIFEST")]
    pub manifest: Option<std::path::PathBuf>,
    /// The relay's topic template, to record each fact's topic.
    #[arg(
        long,
        env = "FACTLIB_TOPIC_TEMPLATE",
        default_value = "{prefix}.{aggregate_type}"
    )]
    pub topic_template: String,
}

/// `factlib bench verify`
#[derive(Debug, Args)]
pub struct BenchVerifyArgs {
    /// The manifest written by `bench emit --manifest`.
    #[arg(long, env = "FACTLIB_BENCH_MANIFEST")]
    pub manifest: std::path::PathBuf,
    /// How to reach Kafka.
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Give up reading after this many seconds.
    #[arg(long, env = "FACTLIB_BENCH_VERIFY_TIMEOUT_SECS", default_value_t = 120)]
    pub timeout_secs: u64,
    /// The consumer's isolation.level. Default: read-committed when the
    /// manifest was written for an exactly-once relay, read-uncommitted
    /// otherwise.
    #[arg(long, env = "FACTLIB_BENCH_ISOLATION", value_enum)]
    pub isolation: Option<IsolationArg>,
    /// Verify factlib.inbox in this database (written by `factlib inbox`)
    /// instead of the Kafka topics: every committed fact in it once, with
    /// the fields it was emitted with, and nothing else from the
    /// manifest's topics.
    #[arg(
        long,
        env = "FACTLIB_VERIFY_INBOX_DATABASE_URL",
        hide_env_values = true
    )]
    pub inbox_database_url: Option<String>,
}

/// `bench verify --isolation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IsolationArg {
    /// Only records of committed Kafka transactions.
    ReadCommitted,
    /// Every record, aborted transactions included.
    ReadUncommitted,
}

impl IsolationArg {
    /// The librdkafka `isolation.level` value.
    pub fn as_str(self) -> &'static str {
        match self {
            IsolationArg::ReadCommitted => "read_committed",
            IsolationArg::ReadUncommitted => "read_uncommitted",
        }
    }
}

/// `factlib status`
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// How to reach Kafka, to read the exactly-once checkpoint from
    /// {prefix}.checkpoints.
    #[command(flatten)]
    pub kafka: KafkaArgs,

    /// Print one JSON object instead of text: the same fields, null where
    /// a value is unknown (`lag_seconds_unknown` and `checkpoint_error` say
    /// why).
    #[arg(long, env = "FACTLIB_STATUS_JSON")]
    pub json: bool,
}

/// How every Kafka client reaches the brokers (`relay`, `status`,
/// `bench verify`).
#[derive(Debug, Clone, Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, comma-separated host:port.
    #[arg(long, env = "FACTLIB_BROKERS", default_value = "127.0.0.1:19092")]
    pub brokers: String,

    /// How to talk to the brokers: plaintext, ssl (TLS), sasl_plaintext
    /// (SASL without TLS), or sasl_ssl (SASL over TLS).
    #[arg(
        long,
        env = "FACTLIB_KAFKA_SECURITY_PROTOCOL",
        value_enum,
        ignore_case = true,
        default_value_t = SecurityProtocolArg::Plaintext
    )]
    pub kafka_security_protocol: SecurityProtocolArg,

    /// SASL mechanism; required with sasl_plaintext and sasl_ssl.
    #[arg(
        long,
        env = "FACTLIB_KAFKA_SASL_MECHANISM",
        value_enum,
        ignore_case = true
    )]
    pub kafka_sasl_mechanism: Option<SaslMechanismArg>,

    /// SASL user; required with sasl_plaintext and sasl_ssl.
    #[arg(long, env = "FACTLIB_KAFKA_SASL_USERNAME")]
    pub kafka_sasl_username: Option<String>,

    /// SASL password; required with sasl_plaintext and sasl_ssl. Give it in
    /// the environment variable rather than as a flag (flags show in `ps`).
    /// Never logged.
    #[arg(long, env = "FACTLIB_KAFKA_SASL_PASSWORD", hide_env_values = true)]
    pub kafka_sasl_password: Option<Secret>,

    /// PEM file of the CA certificates that sign the brokers' certificates
    /// (ssl and sasl_ssl). Default: the system's CA store.
    #[arg(long, env = "FACTLIB_KAFKA_CA")]
    pub kafka_ca: Option<std::path::PathBuf>,
}

/// `--kafka-security-protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SecurityProtocolArg {
    /// No TLS, no authentication.
    Plaintext,
    /// TLS.
    Ssl,
    /// SASL without TLS.
    #[value(name = "sasl_plaintext")]
    SaslPlaintext,
    /// SASL over TLS.
    #[value(name = "sasl_ssl")]
    SaslSsl,
}

/// `--kafka-sasl-mechanism`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SaslMechanismArg {
    /// PLAIN (sends the password itself; use with sasl_ssl).
    #[value(name = "PLAIN")]
    Plain,
    /// SCRAM-SHA-256.
    #[value(name = "SCRAM-SHA-256")]
    ScramSha256,
    /// SCRAM-SHA-512.
    #[value(name = "SCRAM-SHA-512")]
    ScramSha512,
}

impl KafkaArgs {
    /// The security settings, checked: a SASL protocol needs all three SASL
    /// settings, and a CA file must be readable. SASL settings under a
    /// protocol without SASL (or a CA without TLS) are not used, with a
    /// warning: the environment may carry them for other commands.
    pub fn security(&self) -> Result<KafkaSecurity, ConfigError> {
        let protocol = match self.kafka_security_protocol {
            SecurityProtocolArg::Plaintext => SecurityProtocol::Plaintext,
            SecurityProtocolArg::Ssl => SecurityProtocol::Ssl,
            SecurityProtocolArg::SaslPlaintext => SecurityProtocol::SaslPlaintext,
            SecurityProtocolArg::SaslSsl => SecurityProtocol::SaslSsl,
        };
        let name = self.kafka_security_protocol.to_possible_value();
        let name = name.as_ref().map_or("", |v| v.get_name());
        let sasl = if protocol.uses_sasl() {
            let missing = |flag| {
                ConfigError::Kafka(format!(
                "--kafka-security-protocol {name} needs {flag} (or its FACTLIB_KAFKA_… variable)"
            ))
            };
            let mechanism = match self
                .kafka_sasl_mechanism
                .ok_or_else(|| missing("--kafka-sasl-mechanism"))?
            {
                SaslMechanismArg::Plain => SaslMechanism::Plain,
                SaslMechanismArg::ScramSha256 => SaslMechanism::ScramSha256,
                SaslMechanismArg::ScramSha512 => SaslMechanism::ScramSha512,
            };
            let username = self
                .kafka_sasl_username
                .clone()
                .filter(|u| !u.is_empty())
                .ok_or_else(|| missing("--kafka-sasl-username"))?;
            let password = self
                .kafka_sasl_password
                .clone()
                .filter(|p| !p.is_empty())
                .ok_or_else(|| missing("--kafka-sasl-password"))?;
            Some(SaslCredentials {
                mechanism,
                username,
                password,
            })
        } else {
            let given = [
                (
                    "--kafka-sasl-mechanism",
                    self.kafka_sasl_mechanism.is_some(),
                ),
                ("--kafka-sasl-username", self.kafka_sasl_username.is_some()),
                ("--kafka-sasl-password", self.kafka_sasl_password.is_some()),
            ];
            let unused: Vec<&str> = given
                .iter()
                .filter(|(_, set)| *set)
                .map(|(flag, _)| *flag)
                .chain((self.kafka_ca.is_some() && !protocol.uses_tls()).then_some("--kafka-ca"))
                .collect();
            if !unused.is_empty() {
                tracing::warn!(
                    "{} set, but --kafka-security-protocol is {name}: not used; choose \
                     sasl_ssl, sasl_plaintext or ssl to use them",
                    unused.join(", ")
                );
            }
            None
        };
        let ca = match &self.kafka_ca {
            Some(_) if !protocol.uses_tls() => None,
            Some(ca) => match std::fs::File::open(ca) {
                Ok(_) => Some(ca.clone()),
                Err(e) => {
                    return Err(ConfigError::Kafka(format!(
                        "cannot read --kafka-ca {}: {e}",
                        ca.display()
                    )))
                }
            },
            None => None,
        };
        Ok(KafkaSecurity { protocol, sasl, ca })
    }

    /// The sink's settings for a client that only reads (`status`,
    /// `bench verify`): the brokers and security, defaults otherwise.
    pub fn reader(&self) -> Result<SinkSettings, ConfigError> {
        Ok(SinkSettings {
            brokers: self.brokers.clone(),
            security: self.security()?,
            ..SinkSettings::default()
        })
    }
}

/// `factlib setup`
#[derive(Debug, Args)]
pub struct SetupArgs {
    /// An outbox table (Debezium's layout, see `relay --outbox-columns`) to
    /// add to the publication, e.g. `public.outbox`; repeat or
    /// comma-separate for more. Each row inserted becomes a fact. Without
    /// any, the publication carries logical messages only.
    #[arg(
        long = "outbox-table",
        visible_alias = "tables",
        env = "FACTLIB_OUTBOX_TABLES",
        value_delimiter = ',',
        value_name = "SCHEMA.TABLE"
    )]
    pub tables: Vec<String>,
    /// The SQL emitter API to install in schema `factlib` (factlib.emit,
    /// factlib.emit_json, factlib.emit_traced): `v1`, or `none` to skip it.
    /// An older installed version is replaced, the same or a newer one is
    /// left alone. Needs CREATE on the database.
    #[arg(long, env = "FACTLIB_SQL_API", value_enum, default_value_t = SqlApiArg::V1)]
    pub sql_api: SqlApiArg,
    /// Make the slot a failover slot (PostgreSQL 17 and later), so a
    /// standby with `sync_replication_slots = on` keeps a copy that the
    /// relay goes on from after the standby is promoted; an existing slot
    /// is changed (with no relay streaming from it). Prints the settings
    /// the primary and the standby need.
    #[arg(long, env = "FACTLIB_FAILOVER")]
    pub failover: bool,
}

/// `--sql-api`: which SQL emitter API `setup` installs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SqlApiArg {
    /// Version 1 (the default).
    V1,
    /// Don't install or change it.
    None,
}

/// `factlib emit`
#[derive(Debug, Args)]
pub struct EmitArgs {
    /// The aggregate's type, e.g. `order`.
    #[arg(long, env = "FACTLIB_AGGREGATE_TYPE")]
    pub aggregate_type: String,
    /// The aggregate's id; becomes the Kafka key.
    #[arg(long, env = "FACTLIB_AGGREGATE_ID")]
    pub aggregate_id: String,
    /// What happened, e.g. `order.placed`.
    #[arg(long, env = "FACTLIB_EVENT_TYPE")]
    pub event_type: String,
    /// The payload, as a string.
    #[arg(
        long,
        env = "FACTLIB_PAYLOAD",
        conflicts_with = "payload_file",
        required_unless_present = "payload_file"
    )]
    pub payload: Option<String>,
    /// Read the payload (any bytes) from this file; `-` reads stdin.
    #[arg(long, env = "FACTLIB_PAYLOAD_FILE")]
    pub payload_file: Option<std::path::PathBuf>,
    /// Metadata entry `key=value`; repeat for more.
    #[arg(long = "metadata", env = "FACTLIB_METADATA", value_delimiter = ',', value_parser = parse_key_value)]
    pub metadata: Vec<(String, String)>,
}

/// `factlib tail`
#[derive(Debug, Args)]
pub struct TailArgs {
    /// Stop after printing this many facts.
    #[arg(long, env = "FACTLIB_TAIL_LIMIT")]
    pub limit: Option<u64>,
    /// Never confirm: the slot keeps its position, and the facts come again.
    #[arg(long, env = "FACTLIB_TAIL_NO_CONFIRM")]
    pub no_confirm: bool,
    /// How outbox-table rows become facts.
    #[command(flatten)]
    pub outbox: OutboxArgs,
    /// Replication connection settings.
    #[command(flatten)]
    pub source: SourceArgs,
}

/// How rows of outbox tables (the tables in the publication, see `setup
/// --outbox-table`) become facts.
#[derive(Debug, Clone, Args)]
pub struct OutboxArgs {
    /// Outbox columns with other names than Debezium's, as
    /// field=column pairs (comma-separated). Fields and their default
    /// columns: id=id, aggregate_type=aggregatetype,
    /// aggregate_id=aggregateid, event_type=type, payload=payload,
    /// timestamp=timestamp (optional), tracing=tracingspancontext
    /// (optional).
    #[arg(long, env = "FACTLIB_OUTBOX_COLUMNS", value_delimiter = ',', value_parser = parse_key_value, value_name = "FIELD=COLUMN")]
    pub outbox_columns: Vec<(String, String)>,
    /// What becomes of an outbox table's other columns: each non-NULL value
    /// a metadata entry named after its column, or nothing.
    #[arg(long, env = "FACTLIB_OUTBOX_EXTRA", value_enum, default_value_t = OutboxExtraArg::Metadata)]
    pub outbox_extra: OutboxExtraArg,
}

/// `--outbox-extra`: [`ExtraColumns`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutboxExtraArg {
    /// Other columns become metadata (the default).
    Metadata,
    /// Other columns are dropped.
    Ignore,
}

impl OutboxArgs {
    /// The outbox mapping.
    pub fn settings(&self) -> Result<OutboxSettings, ConfigError> {
        let mut columns = ColumnNames::default();
        for (field, column) in &self.outbox_columns {
            let slot = match field.as_str() {
                "id" => &mut columns.id,
                "aggregate_type" => &mut columns.aggregate_type,
                "aggregate_id" => &mut columns.aggregate_id,
                "event_type" => &mut columns.event_type,
                "payload" => &mut columns.payload,
                "timestamp" => &mut columns.timestamp,
                "tracing" => &mut columns.tracing,
                other => return Err(ConfigError::OutboxField(other.to_owned())),
            };
            column.clone_into(slot);
        }
        Ok(OutboxSettings {
            columns,
            extra: match self.outbox_extra {
                OutboxExtraArg::Metadata => ExtraColumns::Metadata,
                OutboxExtraArg::Ignore => ExtraColumns::Ignore,
            },
        })
    }
}

/// `factlib relay`
#[derive(Debug, Clone, Args)]
pub struct RelayArgs {
    /// How to reach Kafka.
    #[command(flatten)]
    pub kafka: KafkaArgs,

    /// Topic for each fact. Placeholders: {prefix}, {aggregate_type},
    /// {event_type}.
    #[arg(
        long,
        env = "FACTLIB_TOPIC_TEMPLATE",
        default_value = "{prefix}.{aggregate_type}"
    )]
    pub topic_template: String,

    /// Create missing topics (the DLQ topic too) instead of stopping with an
    /// error.
    #[arg(long, env = "FACTLIB_CREATE_TOPICS")]
    pub create_topics: bool,

    /// Partitions for topics created by --create-topics.
    #[arg(long, env = "FACTLIB_PARTITIONS", default_value_t = 6, value_parser = clap::value_parser!(i32).range(1..=100_000))]
    pub partitions: i32,

    /// Replication factor for topics created by --create-topics.
    #[arg(long, env = "FACTLIB_REPLICATION_FACTOR", default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=32))]
    pub replication_factor: i32,

    /// Record value: the whole protobuf envelope, or only the payload.
    #[arg(long, env = "FACTLIB_VALUE", value_enum, default_value_t = ValueArg::Envelope)]
    pub value: ValueArg,

    /// Which Kafka headers each fact's record carries: `standard` (id, event
    /// type, LSN, metadata entries, trace context), `full` (standard plus the
    /// aggregate type), `minimal` (the LSN only; the rest stays in the
    /// envelope), or `go-factlib` (the Go relay's headers). Each header costs
    /// librdkafka CPU per record.
    #[arg(long, env = "FACTLIB_HEADERS", value_enum, default_value_t = HeadersArg::Standard)]
    pub headers: HeadersArg,

    /// Compression of Kafka batches.
    #[arg(long, env = "FACTLIB_COMPRESSION", value_enum, default_value_t = CompressionArg::Lz4)]
    pub compression: CompressionArg,

    /// How long the producer waits to fill a batch (linger.ms).
    #[arg(long, env = "FACTLIB_LINGER_MS", default_value_t = 1)]
    pub linger_ms: u64,

    /// Largest batch per partition in bytes (batch.size).
    #[arg(long, env = "FACTLIB_BATCH_BYTES", default_value_t = 1 << 20, value_parser = clap::value_parser!(u64).range(1..=(1 << 30)))]
    pub batch_bytes: u64,

    /// Most messages per batch (batch.num.messages).
    #[arg(long, env = "FACTLIB_BATCH_MESSAGES", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub batch_messages: u64,

    /// Most records queued inside the producer (queue.buffering.max.messages).
    #[arg(long, env = "FACTLIB_QUEUE_MESSAGES", default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub queue_messages: u64,

    /// Most KiB queued inside the producer (queue.buffering.max.kbytes);
    /// bounds memory while Kafka is slow or away.
    #[arg(long, env = "FACTLIB_QUEUE_KBYTES", default_value_t = 16_384, value_parser = clap::value_parser!(u64).range(1..=2_097_151))]
    pub queue_kbytes: u64,

    /// Largest record, in bytes, the producer sends (librdkafka
    /// message.max.bytes); also the max.message.bytes of topics that
    /// --create-topics makes. A larger fact stops the relay with an error
    /// naming every limit involved; the broker's message.max.bytes (or an
    /// existing topic's max.message.bytes) must allow it too.
    #[arg(long, env = "FACTLIB_MAX_MESSAGE_BYTES", default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1000..=1_000_000_000))]
    pub max_message_bytes: u64,

    /// Extra librdkafka producer property `key=value`; repeat for more
    /// (e.g. security.protocol=ssl).
    #[arg(long = "producer-property", env = "FACTLIB_PRODUCER_PROPERTIES", value_delimiter = ',', value_parser = parse_key_value)]
    pub producer_properties: Vec<(String, String)>,

    /// Facts each per-partition ring holds before the reader waits.
    #[arg(long, env = "FACTLIB_RING_CAPACITY", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(2..=16_777_216))]
    pub ring_capacity: u64,

    /// Number of rings; each (topic, partition) is pinned to one.
    #[arg(long, env = "FACTLIB_RINGS", default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pub rings: u64,

    /// Flusher threads draining the rings into the producer.
    #[arg(long, env = "FACTLIB_FLUSHERS", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub flushers: u64,

    /// Print a progress line every this many seconds (0: never).
    #[arg(long, env = "FACTLIB_PROGRESS_INTERVAL_SECS", default_value_t = 10)]
    pub progress_interval_secs: u64,

    /// Confirm newly acknowledged positions to PostgreSQL at most this often,
    /// in milliseconds.
    #[arg(long, env = "FACTLIB_CONFIRM_INTERVAL_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub confirm_interval_ms: u64,

    /// On SIGTERM/SIGINT, wait at most this long for in-flight facts to be
    /// acknowledged before exiting.
    #[arg(long, env = "FACTLIB_SHUTDOWN_TIMEOUT_SECS", default_value_t = 30)]
    pub shutdown_timeout_secs: u64,

    /// Longest wait between reconnection attempts, in milliseconds. After
    /// a healthy session (its first message received, then 1 s of
    /// streaming) the first retry waits 50-100 ms; failures in a row
    /// (refused connections, a failed start-up, sessions dying within 1 s)
    /// double that, with jitter, up to this cap.
    #[arg(long, env = "FACTLIB_MAX_BACKOFF_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub max_backoff_ms: u64,

    /// While another process streams from the slot, this relay waits as a
    /// standby and checks the slot this often, in milliseconds; it takes
    /// over once the slot is free (the active relay stopped or died).
    #[arg(long, env = "FACTLIB_STANDBY_POLL_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub standby_poll_ms: u64,

    /// Stop (as on SIGTERM) once every fact up to this LSN (`X/Y`) is
    /// acknowledged and confirmed: a one-shot drain, used by `perf/drain`.
    #[arg(long, env = "FACTLIB_STOP_AT_LSN")]
    pub stop_at_lsn: Option<crate::lsn::Lsn>,

    /// `at-least-once`: every fact reaches Kafka, a few may twice after a
    /// crash. `exactly-once`: Kafka transactions of whole PostgreSQL
    /// transactions, each with a checkpoint, so a consumer with
    /// isolation.level=read_committed sees every fact once; uses one ring
    /// of 4 × --ring-capacity records and one flusher.
    #[arg(long, env = "FACTLIB_DELIVERY", value_enum, default_value_t = DeliveryArg::AtLeastOnce)]
    pub delivery: DeliveryArg,

    /// Exactly-once: the relay's two producers use this with -0 and -1
    /// appended as their transactional.id; {slot} is replaced by the slot
    /// name. Starting a relay fences any older one with the same id. Keep
    /// one id per slot.
    #[arg(
        long,
        env = "FACTLIB_TRANSACTIONAL_ID",
        default_value = "factlib-{slot}"
    )]
    pub transactional_id: String,

    /// Exactly-once: commit a Kafka transaction once it is this many
    /// milliseconds old, at the next PostgreSQL transaction end.
    #[arg(long, env = "FACTLIB_TXN_MAX_MS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub txn_max_ms: u64,

    /// Exactly-once: commit a Kafka transaction once it holds this many
    /// facts, at the next PostgreSQL transaction end (a larger PostgreSQL
    /// transaction still goes in one Kafka transaction).
    #[arg(long, env = "FACTLIB_TXN_MAX_FACTS", default_value_t = 50_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub txn_max_facts: u64,

    /// Exactly-once: ignore the checkpoint stored in {prefix}.checkpoints
    /// for this source and start from the slot; the next commit replaces
    /// it. Only for a restored or different database under the same system
    /// identifier, database and slot: facts the old checkpoint covered
    /// would be dropped otherwise.
    #[arg(long, env = "FACTLIB_RESET_CHECKPOINT")]
    pub reset_checkpoint: bool,

    /// Serve Prometheus metrics on http://HOST:PORT/metrics, with
    /// /healthz (200 while the relay's loops are alive) and /readyz (200
    /// while streaming from PostgreSQL with Kafka reachable), e.g.
    /// 127.0.0.1:9187. Off by default.
    #[arg(long, env = "FACTLIB_METRICS_ADDR", value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,

    /// How outbox-table rows become facts.
    #[command(flatten)]
    pub outbox: OutboxArgs,

    /// Replication connection settings.
    #[command(flatten)]
    pub source: SourceArgs,
}

/// `--delivery`: [`DeliveryMode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeliveryArg {
    /// Every fact at least once (the default).
    AtLeastOnce,
    /// Every fact exactly once, for read_committed consumers.
    ExactlyOnce,
}

/// `--compression`: [`Compression`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompressionArg {
    /// LZ4: fast, the default.
    Lz4,
    /// Zstandard: smaller, more CPU.
    Zstd,
    /// Snappy.
    Snappy,
    /// No compression.
    None,
}

impl From<CompressionArg> for Compression {
    fn from(c: CompressionArg) -> Self {
        match c {
            CompressionArg::Lz4 => Compression::Lz4,
            CompressionArg::Zstd => Compression::Zstd,
            CompressionArg::Snappy => Compression::Snappy,
            CompressionArg::None => Compression::None,
        }
    }
}

/// `--value`: [`ValueMode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ValueArg {
    /// The whole protobuf envelope, as the emitter wrote it.
    Envelope,
    /// Only the fact's payload bytes.
    Payload,
}

impl From<ValueArg> for ValueMode {
    fn from(v: ValueArg) -> Self {
        match v {
            ValueArg::Envelope => ValueMode::Envelope,
            ValueArg::Payload => ValueMode::Payload,
        }
    }
}

/// `--headers`: [`HeaderSet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HeadersArg {
    /// `factlib-id`, `factlib-event-type`, `factlib-lsn`, one per metadata
    /// entry, and `traceparent`/`tracestate` when the fact is traced.
    Standard,
    /// `standard` plus `factlib-aggregate-type`.
    Full,
    /// Only `factlib-lsn`; the rest stays inside the envelope value.
    Minimal,
    /// Exactly the headers of the Go Factlib relay (owlpost), for consumers
    /// migrating from it: `event_id`, `event_type`, `LSN` (the end of the
    /// fact's WAL message, `X/Y`, as owlpost wrote it) and, when the fact
    /// has a trace id, `trace_id`, `span_id` and one per trace-metadata
    /// entry (an entry with one of these names replaces that header). The
    /// fact's metadata is not written as headers, as in owlpost.
    GoFactlib,
}

impl From<HeadersArg> for HeaderSet {
    fn from(h: HeadersArg) -> Self {
        match h {
            HeadersArg::Standard => HeaderSet::Standard,
            HeadersArg::Full => HeaderSet::Full,
            HeadersArg::Minimal => HeaderSet::Minimal,
            HeadersArg::GoFactlib => HeaderSet::GoFactlib,
        }
    }
}

/// Replication-connection tunables (shared by `tail` and `relay`).
#[derive(Debug, Clone, Args)]
pub struct SourceArgs {
    /// Socket transport for the replication stream: `tokio` (epoll, the
    /// default), `uring` (io_uring through tokio-uring; fails where the
    /// kernel refuses it), or `auto` (io_uring when the kernel allows it,
    /// else tokio). io_uring did not pay here: the same drain time, 8-9%
    /// more CPU (perf/README.md). A connection that runs over TLS (any
    /// sslmode but `disable`, when the server accepts TLS) always uses
    /// tokio: io_uring carries plain TCP only.
    #[arg(long, env = "FACTLIB_TRANSPORT", value_enum, default_value_t = TransportArg::Tokio)]
    pub transport: TransportArg,

    /// How often to send a standby status update to the server, in
    /// milliseconds (also sent whenever the server asks).
    #[arg(long, env = "FACTLIB_STATUS_INTERVAL_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    pub status_interval_ms: u64,

    /// Size of each socket read buffer, in bytes.
    #[arg(long, env = "FACTLIB_READ_BUFFER", default_value_t = 1 << 20, value_parser = clap::value_parser!(u64).range(4096..=(1 << 30)))]
    pub read_buffer: u64,

    /// Read batches queued between the socket reader and the decoder before
    /// the reader stops reading (backpressure). Each batch can hold a whole
    /// read buffer of WAL in memory.
    #[arg(long, env = "FACTLIB_READ_QUEUE", default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pub read_queue: u64,

    /// Give up connecting after this many milliseconds.
    #[arg(long, env = "FACTLIB_CONNECT_TIMEOUT_MS", default_value_t = 10_000)]
    pub connect_timeout_ms: u64,
}

impl SourceArgs {
    /// The replication connection's settings.
    pub fn settings(&self) -> SourceSettings {
        SourceSettings {
            transport: self.transport.into(),
            status_interval: Duration::from_millis(self.status_interval_ms),
            read_buffer: to_usize(self.read_buffer),
            read_queue: to_usize(self.read_queue),
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
        }
    }
}

/// `--transport`: [`Transport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TransportArg {
    /// io_uring if the kernel allows it, else tokio.
    Auto,
    /// io_uring through tokio-uring; fails if unavailable.
    Uring,
    /// Plain tokio (epoll).
    Tokio,
}

impl From<TransportArg> for Transport {
    fn from(t: TransportArg) -> Self {
        match t {
            TransportArg::Auto => Transport::Auto,
            TransportArg::Uring => Transport::Uring,
            TransportArg::Tokio => Transport::Tokio,
        }
    }
}

impl RelayArgs {
    /// The relay's settings, with the shared options in `common`.
    pub fn settings(&self, common: &CommonArgs) -> Result<RelaySettings, ConfigError> {
        let template = TopicTemplate::parse(&self.topic_template)?;
        template.check(&common.prefix)?;
        Ok(RelaySettings {
            connection: ConnectionConfig::from_url(&common.database_url)?,
            slot: common.slot.clone(),
            publication: common.publication.clone(),
            prefix: common.prefix.clone(),
            template,
            outbox: self.outbox.settings()?,
            source: self.source.settings(),
            delivery: self.delivery(common)?,
            sink: SinkSettings {
                brokers: self.kafka.brokers.clone(),
                security: self.kafka.security()?,
                compression: self.compression.into(),
                linger_ms: self.linger_ms,
                batch_bytes: self.batch_bytes,
                batch_messages: self.batch_messages,
                queue_messages: self.queue_messages,
                queue_kbytes: self.queue_kbytes,
                max_message_bytes: self.max_message_bytes,
                extra: self.producer_properties.clone(),
                // Broker states for /readyz.
                statistics_interval: self
                    .metrics_addr
                    .is_some()
                    .then_some(telemetry::KAFKA_STATS_INTERVAL),
            },
            rings: RingSettings {
                rings: to_usize(self.rings),
                capacity: to_usize(self.ring_capacity),
                flushers: to_usize(self.flushers),
            },
            shape: RecordShape {
                value: self.value.into(),
                headers: self.headers.into(),
            },
            create_topics: self.create_topics.then_some(CreateTopics {
                partitions: self.partitions,
                replication: self.replication_factor,
                max_message_bytes: self.max_message_bytes,
            }),
            confirm_interval: Duration::from_millis(self.confirm_interval_ms),
            progress_interval: (self.progress_interval_secs > 0)
                .then(|| Duration::from_secs(self.progress_interval_secs)),
            shutdown_timeout: Duration::from_secs(self.shutdown_timeout_secs),
            max_backoff: Duration::from_millis(self.max_backoff_ms),
            standby_poll: Duration::from_millis(self.standby_poll_ms),
            stop_at_lsn: self.stop_at_lsn,
            metrics: self
                .metrics_addr
                .as_ref()
                .map(|addr| MetricsSettings { addr: addr.clone() }),
        })
    }
}

impl RelayArgs {
    fn delivery(&self, common: &CommonArgs) -> Result<DeliveryMode, ConfigError> {
        match self.delivery {
            DeliveryArg::AtLeastOnce if self.reset_checkpoint => {
                Err(ConfigError::ExactlyOnceOnly("--reset-checkpoint"))
            }
            DeliveryArg::AtLeastOnce => Ok(DeliveryMode::AtLeastOnce),
            DeliveryArg::ExactlyOnce => Ok(DeliveryMode::ExactlyOnce(ExactlyOnce {
                transactional_id: self.transactional_id.replace("{slot}", &common.slot),
                txn_max: Duration::from_millis(self.txn_max_ms),
                txn_max_facts: to_usize(self.txn_max_facts),
                reset_checkpoint: self.reset_checkpoint,
            })),
        }
    }
}

/// Every count flag is range-checked by clap far below `usize::MAX`.
fn to_usize(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected key=value, got {s:?}")),
    }
}

/// A configuration value that cannot work. Definite.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The database URL is unusable.
    #[error(transparent)]
    Url(#[from] UrlError),
    /// The topic template is unusable.
    #[error(transparent)]
    Template(#[from] RouteError),
    /// A name that cannot be used as a slot or publication.
    #[error(
        "invalid {what} name {name:?}: use lowercase letters, digits and underscores (at most 63)"
    )]
    BadName {
        /// `slot` or `publication`.
        what: &'static str,
        /// The name given.
        name: String,
    },
    /// Inconsistent Kafka security flags.
    #[error("{0}")]
    Kafka(String),
    /// A flag that means something only in exactly-once mode.
    #[error("{0} applies only with --delivery exactly-once")]
    ExactlyOnceOnly(&'static str),
    /// A missing or inconsistent `factlib inbox` setting.
    #[error("{0}")]
    Inbox(String),
    /// An `--outbox-columns` entry that names no field.
    #[error("--outbox-columns: unknown field {0:?}; use id, aggregate_type, aggregate_id, event_type, payload, timestamp or tracing")]
    OutboxField(String),
}

/// Checks a slot or publication name (PostgreSQL's rule for slot names, also
/// applied to publications so they need no quoting).
pub fn check_name(what: &'static str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::BadName {
            what,
            name: name.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent_and_every_flag_has_help() {
        Cli::command().debug_assert();
        fn walk(cmd: &clap::Command) {
            for a in cmd.get_arguments() {
                if a.get_id() == "help" || a.get_id() == "version" {
                    continue;
                }
                let env = a.get_env().map(|e| e.to_string_lossy().into_owned());
                assert!(
                    env.as_deref().is_some_and(|e| e.starts_with("FACTLIB_")),
                    "--{} of {} reads no FACTLIB_* variable",
                    a.get_id(),
                    cmd.get_name()
                );
                assert!(
                    a.get_help().is_some(),
                    "--{} of {} has no help",
                    a.get_id(),
                    cmd.get_name()
                );
            }
            for s in cmd.get_subcommands() {
                walk(s);
            }
        }
        walk(&Cli::command());
    }

    #[test]
    fn outbox_columns_map_fields_and_refuse_unknown_ones() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["factlib", "relay"];
            argv.extend_from_slice(extra);
            let cli = Cli::try_parse_from(argv).unwrap();
            let Command::Relay(args) = cli.command else {
                panic!("not relay");
            };
            args.outbox.settings()
        };
        let s = parse(&[
            "--outbox-columns",
            "aggregate_type=kind,payload=body",
            "--outbox-extra",
            "ignore",
        ])
        .unwrap();
        assert_eq!(s.columns.aggregate_type, "kind");
        assert_eq!(s.columns.payload, "body");
        assert_eq!(s.columns.id, "id", "the others keep Debezium's names");
        assert_eq!(s.extra, ExtraColumns::Ignore);
        let err = parse(&["--outbox-columns", "aggregatetype=kind"]).unwrap_err();
        assert!(err.to_string().contains("aggregate_type"), "{err}");
    }

    /// Each stage's `Default` is the documented default: what the command
    /// line gives with no flags.
    #[test]
    fn no_flags_give_each_stage_its_default() {
        let cli = Cli::try_parse_from(["factlib", "relay"]).unwrap();
        let Command::Relay(args) = &cli.command else {
            panic!("not relay");
        };
        let s = args.settings(&cli.common).unwrap();
        assert_eq!(s.source, SourceSettings::default());
        assert_eq!(s.sink, SinkSettings::default());
        assert_eq!(s.rings, RingSettings::default());
        assert_eq!(s.shape, RecordShape::default());
        // The test environment's URL (in FACTLIB_DATABASE_URL) may differ.
        assert_eq!(
            RelaySettings {
                connection: RelaySettings::default().connection,
                ..s
            },
            RelaySettings::default()
        );
        let cli = Cli::try_parse_from(["factlib", "tail"]).unwrap();
        let Command::Tail(args) = &cli.command else {
            panic!("not tail");
        };
        assert_eq!(args.source.settings(), SourceSettings::default());
    }

    #[test]
    fn relay_flags_reach_the_settings() {
        let cli = Cli::try_parse_from([
            "factlib",
            "--prefix",
            "app",
            "relay",
            "--create-topics",
            "--partitions",
            "3",
            "--max-message-bytes",
            "4194304",
            "--compression",
            "zstd",
            "--headers",
            "minimal",
            "--value",
            "payload",
            "--transport",
            "tokio",
            "--rings",
            "4",
            "--progress-interval-secs",
            "0",
        ])
        .unwrap();
        let Command::Relay(args) = &cli.command else {
            panic!("not relay");
        };
        let s = args.settings(&cli.common).unwrap();
        assert_eq!(s.prefix, "app");
        assert_eq!(s.sink.max_message_bytes, 4 << 20);
        assert_eq!(s.sink.compression, Compression::Zstd);
        assert_eq!(
            s.create_topics,
            Some(CreateTopics {
                partitions: 3,
                replication: 1,
                max_message_bytes: 4 << 20
            })
        );
        assert_eq!(
            s.shape,
            RecordShape {
                value: ValueMode::Payload,
                headers: HeaderSet::Minimal
            }
        );
        assert_eq!(s.source.transport, Transport::Tokio);
        assert_eq!(s.rings.rings, 4);
        assert_eq!(s.progress_interval, None);
    }

    #[test]
    fn metrics_addr_serves_metrics_and_turns_on_broker_statistics() {
        let cli =
            Cli::try_parse_from(["factlib", "relay", "--metrics-addr", "127.0.0.1:9187"]).unwrap();
        let Command::Relay(args) = &cli.command else {
            panic!("not relay");
        };
        let s = args.settings(&cli.common).unwrap();
        assert_eq!(
            s.metrics,
            Some(MetricsSettings {
                addr: "127.0.0.1:9187".into()
            })
        );
        assert_eq!(
            s.sink.statistics_interval,
            Some(telemetry::KAFKA_STATS_INTERVAL)
        );
    }

    #[test]
    fn a_template_that_can_only_hit_a_reserved_topic_is_refused() {
        let cli =
            Cli::try_parse_from(["factlib", "relay", "--topic-template", "{prefix}.dlq"]).unwrap();
        let Command::Relay(args) = &cli.command else {
            panic!("not relay");
        };
        let e = args.settings(&cli.common).unwrap_err();
        assert!(e.to_string().contains("reserves"), "{e}");
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("slot", "factlib_1").is_ok());
        for bad in ["", "Upper", "with-dash", "x y", &"a".repeat(64)] {
            assert!(check_name("slot", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn metadata_pairs() {
        assert_eq!(
            parse_key_value("a=b=c").unwrap(),
            ("a".into(), "b=c".into())
        );
        assert!(parse_key_value("=x").is_err());
        assert!(parse_key_value("nokey").is_err());
    }

    fn kafka(protocol: SecurityProtocolArg) -> KafkaArgs {
        KafkaArgs {
            brokers: "b:9093".into(),
            kafka_security_protocol: protocol,
            kafka_sasl_mechanism: Some(SaslMechanismArg::ScramSha512),
            kafka_sasl_username: Some("relay".into()),
            kafka_sasl_password: Some(Secret::new("pw")),
            kafka_ca: None,
        }
    }

    #[test]
    fn kafka_security_flags_are_checked() {
        let s = kafka(SecurityProtocolArg::SaslSsl).security().unwrap();
        assert_eq!(s.protocol, SecurityProtocol::SaslSsl);
        let sasl = s.sasl.unwrap();
        assert_eq!(sasl.mechanism, SaslMechanism::ScramSha512);
        assert_eq!(
            (sasl.username.as_str(), sasl.password.expose()),
            ("relay", "pw")
        );

        for (unset, flag) in [
            (0, "--kafka-sasl-mechanism"),
            (1, "--kafka-sasl-username"),
            (2, "--kafka-sasl-password"),
        ] {
            let mut a = kafka(SecurityProtocolArg::SaslPlaintext);
            match unset {
                0 => a.kafka_sasl_mechanism = None,
                1 => a.kafka_sasl_username = Some(String::new()),
                _ => a.kafka_sasl_password = None,
            }
            let e = a.security().unwrap_err().to_string();
            assert!(e.contains(flag) && e.contains("sasl_plaintext"), "{e}");
        }

        // Credentials under a protocol without SASL are not used.
        let plain = kafka(SecurityProtocolArg::Plaintext).security().unwrap();
        assert_eq!(plain, KafkaSecurity::default());
        let ssl = kafka(SecurityProtocolArg::Ssl).security().unwrap();
        assert_eq!((ssl.protocol, ssl.sasl), (SecurityProtocol::Ssl, None));

        let mut a = kafka(SecurityProtocolArg::Ssl);
        a.kafka_ca = Some("/nonexistent/ca.pem".into());
        let e = a.security().unwrap_err().to_string();
        assert!(e.contains("--kafka-ca /nonexistent/ca.pem"), "{e}");
        let ca = tempfile::NamedTempFile::new().unwrap();
        a.kafka_ca = Some(ca.path().to_owned());
        assert_eq!(a.security().unwrap().ca.as_deref(), Some(ca.path()));
        a.kafka_security_protocol = SecurityProtocolArg::Plaintext;
        assert_eq!(a.security().unwrap().ca, None);
    }

    #[test]
    fn kafka_flags_parse() {
        let cli = Cli::try_parse_from([
            "factlib",
            "status",
            "--kafka-security-protocol",
            "sasl_ssl",
            "--kafka-sasl-mechanism",
            "SCRAM-SHA-256",
        ])
        .unwrap();
        let Command::Status(args) = &cli.command else {
            panic!("not status");
        };
        assert_eq!(
            args.kafka.kafka_security_protocol,
            SecurityProtocolArg::SaslSsl
        );
        assert_eq!(
            args.kafka.kafka_sasl_mechanism,
            Some(SaslMechanismArg::ScramSha256)
        );
        assert!(!format!("{cli:?}").contains("factlib-sasl-secret"));
    }
}
