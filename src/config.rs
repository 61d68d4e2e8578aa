//! The command line: one clap [`Cli`] with a sub-struct per stage.
//!
//! Owns every tunable. Each flag also reads a `FACTLIB_*` environment
//! variable, and each has a `--help` text that says what it does and its
//! default.
//!
//! **Invariants**
//! - Values are validated here (or in [`ConnectionConfig::from_url`]) so a
//!   stage never sees a nonsensical setting.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::fact::DEFAULT_PREFIX;

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
    /// Show the slot's position, lag and retained WAL; exits 1 if it is missing.
    Status,
    /// Relay facts from the slot to Kafka; the slot advances only past facts
    /// Kafka has acknowledged.
    Relay(RelayArgs),
    /// Load generation and end-to-end verification.
    #[command(subcommand)]
    Bench(BenchCommand),
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
    /// Kafka bootstrap servers.
    #[arg(long, env = "FACTLIB_BROKERS", default_value = "127.0.0.1:19092")]
    pub brokers: String,
    /// Give up reading after this many seconds.
    #[arg(long, env = "FACTLIB_BENCH_VERIFY_TIMEOUT_SECS", default_value_t = 120)]
    pub timeout_secs: u64,
}

/// `factlib setup`
#[derive(Debug, Args)]
pub struct SetupArgs {
    /// Tables to add to the publication (schema-qualified, comma-separated).
    /// Without any, the publication carries logical messages only.
    #[arg(long, env = "FACTLIB_TABLES", value_delimiter = ',')]
    pub tables: Vec<String>,
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
    /// Replication connection settings.
    #[command(flatten)]
    pub source: SourceArgs,
}

/// `factlib relay`
#[derive(Debug, Clone, Args)]
pub struct RelayArgs {
    /// Kafka bootstrap servers, comma-separated host:port.
    #[arg(long, env = "FACTLIB_BROKERS", default_value = "127.0.0.1:19092")]
    pub brokers: String,

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
    #[arg(long, env = "FACTLIB_VALUE", value_enum, default_value_t = crate::sink::ValueMode::Envelope)]
    pub value: crate::sink::ValueMode,

    /// Which Kafka headers each fact's record carries: `standard` (id, event
    /// type, LSN, metadata entries, trace context), `full` (standard plus the
    /// aggregate type), or `minimal` (the LSN only; the rest stays in the
    /// envelope). Each header costs librdkafka CPU per record.
    #[arg(long, env = "FACTLIB_HEADERS", value_enum, default_value_t = crate::sink::record::HeaderSet::Standard)]
    pub headers: crate::sink::record::HeaderSet,

    /// Compression of Kafka batches.
    #[arg(long, env = "FACTLIB_COMPRESSION", value_enum, default_value_t = Compression::Lz4)]
    pub compression: Compression,

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

    /// Longest wait between reconnection attempts, in milliseconds (the
    /// backoff doubles from 100 ms, with jitter).
    #[arg(long, env = "FACTLIB_MAX_BACKOFF_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub max_backoff_ms: u64,

    /// Stop (as on SIGTERM) once every fact up to this LSN (`X/Y`) is
    /// acknowledged and confirmed: a one-shot drain, used by `perf/drain`.
    #[arg(long, env = "FACTLIB_STOP_AT_LSN")]
    pub stop_at_lsn: Option<crate::lsn::Lsn>,

    /// Replication connection settings.
    #[command(flatten)]
    pub source: SourceArgs,
}

/// Kafka batch compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Compression {
    /// LZ4: fast, the default.
    Lz4,
    /// Zstandard: smaller, more CPU.
    Zstd,
    /// Snappy.
    Snappy,
    /// No compression.
    None,
}

impl Compression {
    /// The librdkafka `compression.type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
            Compression::Snappy => "snappy",
            Compression::None => "none",
        }
    }
}

/// Replication-connection tunables (shared by `tail` and `relay`).
#[derive(Debug, Clone, Args)]
pub struct SourceArgs {
    /// Socket transport for the replication stream: `auto` uses io_uring
    /// when the kernel allows it, else plain tokio.
    #[arg(long, env = "FACTLIB_TRANSPORT", value_enum, default_value_t = Transport::Auto)]
    pub transport: Transport,

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
    /// The status interval as a `Duration`.
    pub fn status_interval(&self) -> Duration {
        Duration::from_millis(self.status_interval_ms)
    }
}

/// Which socket implementation reads the replication stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    /// io_uring if the kernel allows it, else tokio.
    Auto,
    /// io_uring through tokio-uring; fails if unavailable.
    Uring,
    /// Plain tokio (epoll).
    Tokio,
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
    /// The database URL does not parse.
    #[error("invalid --database-url: {0}; expected e.g. postgresql://user:password@127.0.0.1:5432/dbname")]
    DatabaseUrl(#[source] tokio_postgres::Error),
    /// The URL names no TCP host.
    #[error("--database-url names no TCP host; the replication client needs host and port (e.g. 127.0.0.1:5432)")]
    NoTcpHost,
    /// The URL names no user.
    #[error("--database-url names no user")]
    NoUser,
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
}

/// Where and how to connect, as parsed from the URL.
#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    /// TCP host.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Role.
    pub user: String,
    /// Password, from the URL or PGPASSWORD.
    pub password: Option<String>,
    /// Database name (defaults to the user name, like libpq).
    pub dbname: String,
}

impl ConnectionConfig {
    /// Parses a libpq URL or key/value string.
    pub fn from_url(url: &str) -> Result<Self, ConfigError> {
        let cfg: tokio_postgres::Config = url.parse().map_err(ConfigError::DatabaseUrl)?;
        let host = cfg
            .get_hosts()
            .iter()
            .find_map(|h| match h {
                tokio_postgres::config::Host::Tcp(h) => Some(h.clone()),
                #[allow(unreachable_patterns)]
                _ => None,
            })
            .ok_or(ConfigError::NoTcpHost)?;
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        let user = cfg.get_user().ok_or(ConfigError::NoUser)?.to_owned();
        let password = cfg
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .or_else(|| std::env::var("PGPASSWORD").ok());
        let dbname = cfg.get_dbname().unwrap_or(&user).to_owned();
        Ok(ConnectionConfig {
            host,
            port,
            user,
            password,
            dbname,
        })
    }
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
    fn parses_urls() {
        let c = ConnectionConfig::from_url("postgresql://u:p@127.0.0.1:5433/db").unwrap();
        assert_eq!(
            (
                c.host.as_str(),
                c.port,
                c.user.as_str(),
                c.password.as_deref(),
                c.dbname.as_str()
            ),
            ("127.0.0.1", 5433, "u", Some("p"), "db")
        );
        let c = ConnectionConfig::from_url("host=localhost user=x").unwrap();
        assert_eq!((c.port, c.dbname.as_str()), (5432, "x"));
        assert!(matches!(
            ConnectionConfig::from_url("postgresql://127.0.0.1/db"),
            Err(ConfigError::NoUser)
        ));
        assert!(ConnectionConfig::from_url("not a url ===").is_err());
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
}
