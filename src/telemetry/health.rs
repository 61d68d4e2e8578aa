//! Liveness and readiness: what `/healthz` and `/readyz` answer.
//!
//! ```text
//!  relay thread: heartbeat task (every second) ──Beat::tick──┐
//!  flusher threads / txn flusher + committer ──Beat::tick────┼─► BEATS ──► liveness()  ──► /healthz
//!  session: Connected / stream_ended ──► STREAMING ──────────┐
//!  librdkafka statistics (brokers UP) / AllBrokersDown ──► KAFKA ──► readiness() ──► /readyz
//! ```
//!
//! Owns the registry of heartbeats and the readiness state; the pipeline
//! only reports into them, the HTTP server only reads them.
//!
//! *Alive*: every registered loop ticked within [`LIVENESS_BOUND`] and none
//! died (its thread panicked). The relay's loop is represented by a task on
//! its own executor: it ticks as long as the relay's thread is not blocked,
//! also while the relay waits (a Kafka outage, a reconnect backoff). The
//! sink's threads tick on each pass of their loops, which wake at least
//! every 100 ms, or on each commit attempt (at most 10 s).
//!
//! *Ready*: streaming from the slot, and Kafka reachable: librdkafka's
//! last statistics (every [`KAFKA_STATS_INTERVAL`]) showed a broker up, no
//! more than [`KAFKA_FRESH`] ago, and no "all brokers down" came after.
//!
//! **Invariants**
//! - Reporting is a relaxed atomic store, or a short lock when a thread
//!   starts or ends; it never fails or blocks the pipeline.
//! - A loop that ends normally unregisters; one whose thread panics stays
//!   registered as dead, so `/healthz` fails.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A loop that has not ticked for this long is wedged. Above the longest
/// single wait of any loop (a commit attempt: 10 s).
pub(crate) const LIVENESS_BOUND: Duration = Duration::from_secs(30);

/// How often librdkafka reports its brokers' states (statistics), when
/// metrics are served.
pub(crate) const KAFKA_STATS_INTERVAL: Duration = Duration::from_secs(1);

/// A report of a broker up older than this no longer counts.
pub(crate) const KAFKA_FRESH: Duration = Duration::from_secs(5);

/// How often the relay's heartbeat task ticks.
const HEARTBEAT: Duration = Duration::from_secs(1);

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Milliseconds on a monotonic clock; never 0 (0 means "never").
fn mono_ms() -> u64 {
    u64::try_from(EPOCH.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

#[derive(Debug)]
struct BeatState {
    name: String,
    last_ms: AtomicU64,
    ended: AtomicBool,
    died: AtomicBool,
}

static BEATS: Mutex<Vec<Arc<BeatState>>> = Mutex::new(Vec::new());

/// A loop's heartbeat. Tick it on each pass; drop it when the loop ends.
#[derive(Debug)]
pub(crate) struct Beat(Arc<BeatState>);

impl Beat {
    /// Registers a loop named `name` (it counts as having ticked now).
    pub(crate) fn register(name: impl Into<String>) -> Beat {
        let state = Arc::new(BeatState {
            name: name.into(),
            last_ms: AtomicU64::new(mono_ms()),
            ended: AtomicBool::new(false),
            died: AtomicBool::new(false),
        });
        BEATS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::clone(&state));
        Beat(state)
    }

    /// The loop is alive now.
    pub(crate) fn tick(&self) {
        self.0.last_ms.store(mono_ms(), Ordering::Relaxed);
    }
}

impl Clone for Beat {
    /// Another handle on the same heartbeat (two threads of one stage).
    /// Either one ending ends it.
    fn clone(&self) -> Self {
        Beat(Arc::clone(&self.0))
    }
}

impl Drop for Beat {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.died.store(true, Ordering::Relaxed);
        } else {
            self.0.ended.store(true, Ordering::Relaxed);
        }
    }
}

/// Ticks a heartbeat named `name` every second on the current thread's
/// `LocalSet`, as long as its executor runs. Abort the task when the
/// command ends.
pub(crate) fn spawn_heartbeat(name: &'static str) -> tokio::task::JoinHandle<()> {
    tokio::task::spawn_local(async move {
        let beat = Beat::register(name);
        let mut every = tokio::time::interval(HEARTBEAT);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            beat.tick();
        }
    })
}

/// A loop's state as liveness judges it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pulse {
    name: String,
    last_ms: u64,
    died: bool,
}

/// `Ok` if every loop is alive at `now_ms`, else which is not.
fn judge_liveness(pulses: &[Pulse], now_ms: u64, bound: Duration) -> Result<(), String> {
    let bound_ms = u64::try_from(bound.as_millis()).unwrap_or(u64::MAX);
    for p in pulses {
        if p.died {
            return Err(format!("{} died (its thread panicked)", p.name));
        }
        let silent = now_ms.saturating_sub(p.last_ms);
        if silent > bound_ms {
            return Err(format!("{} has not ticked for {} s", p.name, silent / 1000));
        }
    }
    Ok(())
}

/// `Ok` while the process and its loops are alive; else a short reason.
pub(crate) fn liveness() -> Result<(), String> {
    let pulses: Vec<Pulse> = {
        let mut beats = BEATS.lock().unwrap_or_else(PoisonError::into_inner);
        beats.retain(|b| !b.ended.load(Ordering::Relaxed) || b.died.load(Ordering::Relaxed));
        beats
            .iter()
            .map(|b| Pulse {
                name: b.name.clone(),
                last_ms: b.last_ms.load(Ordering::Relaxed),
                died: b.died.load(Ordering::Relaxed),
            })
            .collect()
    };
    judge_liveness(&pulses, mono_ms(), LIVENESS_BOUND)
}

static STREAMING: AtomicBool = AtomicBool::new(false);
/// When librdkafka last reported a broker up (mono ms; 0: never).
static KAFKA_UP_MS: AtomicU64 = AtomicU64::new(0);
/// When librdkafka last reported every broker down (mono ms; 0: never).
static KAFKA_DOWN_MS: AtomicU64 = AtomicU64::new(0);
/// Brokers up in librdkafka's last statistics.
static BROKERS_UP: AtomicI64 = AtomicI64::new(0);

/// Streaming from the slot (true), or not any more (false).
pub(crate) fn set_streaming(on: bool) {
    STREAMING.store(on, Ordering::Relaxed);
}

/// librdkafka's statistics counted `up` brokers in state UP.
pub(crate) fn kafka_brokers(up: usize) {
    BROKERS_UP.store(i64::try_from(up).unwrap_or(i64::MAX), Ordering::Relaxed);
    if up > 0 {
        KAFKA_UP_MS.store(mono_ms(), Ordering::Relaxed);
    }
}

/// librdkafka reported that every broker is down.
pub(crate) fn kafka_all_down() {
    BROKERS_UP.store(0, Ordering::Relaxed);
    KAFKA_DOWN_MS.store(mono_ms(), Ordering::Relaxed);
}

/// The readiness state, read once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub(crate) streaming: bool,
    pub(crate) brokers_up: i64,
    kafka_up_ms: u64,
    kafka_down_ms: u64,
    now_ms: u64,
}

pub(crate) fn snapshot() -> Snapshot {
    Snapshot {
        streaming: STREAMING.load(Ordering::Relaxed),
        brokers_up: BROKERS_UP.load(Ordering::Relaxed),
        kafka_up_ms: KAFKA_UP_MS.load(Ordering::Relaxed),
        kafka_down_ms: KAFKA_DOWN_MS.load(Ordering::Relaxed),
        now_ms: mono_ms(),
    }
}

impl Snapshot {
    /// `Ok` if ready to relay, else a short reason.
    fn readiness(&self, fresh: Duration) -> Result<(), &'static str> {
        if !self.streaming {
            return Err(match super::role() {
                super::Role::Relay => "not streaming from PostgreSQL",
                super::Role::Inbox => "not consuming into the inbox database",
            });
        }
        if self.kafka_up_ms == 0 {
            return Err("kafka: no broker reported up yet");
        }
        if self.kafka_down_ms >= self.kafka_up_ms {
            return Err("kafka: all brokers down");
        }
        let fresh_ms = u64::try_from(fresh.as_millis()).unwrap_or(u64::MAX);
        if self.now_ms.saturating_sub(self.kafka_up_ms) > fresh_ms {
            return Err("kafka: no broker reported up recently");
        }
        Ok(())
    }
}

/// `Ok` while streaming from PostgreSQL with Kafka reachable; else a short
/// reason.
pub(crate) fn readiness() -> Result<(), &'static str> {
    snapshot().readiness(KAFKA_FRESH)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pulse(name: &str, last_ms: u64, died: bool) -> Pulse {
        Pulse {
            name: name.into(),
            last_ms,
            died,
        }
    }

    #[test]
    fn liveness_fails_on_a_silent_or_dead_loop() {
        let bound = Duration::from_secs(30);
        assert_eq!(judge_liveness(&[], 100_000, bound), Ok(()));
        let ok = [
            pulse("relay", 90_000, false),
            pulse("flusher-0", 99_000, false),
        ];
        assert_eq!(judge_liveness(&ok, 100_000, bound), Ok(()));
        let silent = [
            pulse("relay", 90_000, false),
            pulse("flusher-0", 60_000, false),
        ];
        assert_eq!(
            judge_liveness(&silent, 100_000, bound),
            Err("flusher-0 has not ticked for 40 s".into())
        );
        let dead = [pulse("txn", 99_000, true)];
        assert!(judge_liveness(&dead, 100_000, bound)
            .unwrap_err()
            .contains("txn died"));
    }

    #[test]
    fn a_beat_that_ends_unregisters_and_one_that_panics_stays_dead() {
        let name = "test-beat-panics";
        std::thread::spawn(move || {
            let _b = Beat::register(name);
            panic!("boom");
        })
        .join()
        .unwrap_err();
        let ended = Beat::register("test-beat-ends");
        drop(ended);
        let _ = liveness();
        let beats = BEATS.lock().unwrap();
        assert!(beats
            .iter()
            .any(|b| b.name == name && b.died.load(Ordering::Relaxed)));
        assert!(!beats.iter().any(|b| b.name == "test-beat-ends"));
        drop(beats);
        // Leave the global registry as other tests expect it.
        BEATS.lock().unwrap().retain(|b| b.name != name);
    }

    #[test]
    fn ready_only_while_streaming_with_a_broker_recently_up() {
        let fresh = Duration::from_secs(5);
        let s = |streaming, up, down, now| Snapshot {
            streaming,
            brokers_up: 1,
            kafka_up_ms: up,
            kafka_down_ms: down,
            now_ms: now,
        };
        assert_eq!(s(true, 9_000, 0, 10_000).readiness(fresh), Ok(()));
        assert_eq!(
            s(false, 9_000, 0, 10_000).readiness(fresh),
            Err("not streaming from PostgreSQL")
        );
        assert_eq!(
            s(true, 0, 0, 10_000).readiness(fresh),
            Err("kafka: no broker reported up yet")
        );
        assert_eq!(
            s(true, 9_000, 9_500, 10_000).readiness(fresh),
            Err("kafka: all brokers down")
        );
        assert_eq!(
            s(true, 9_000, 0, 20_000).readiness(fresh),
            Err("kafka: no broker reported up recently")
        );
        assert_eq!(
            s(true, 9_900, 9_500, 10_000).readiness(fresh),
            Ok(()),
            "up again"
        );
    }
}
