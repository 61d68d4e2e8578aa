//! Model-checking tests of the rings' push / pop / wake protocol under
//! shuttle (a randomized, PCT-capable scheduler for Rust threads and
//! futures). Run them with
//! `cargo test --features model-check --lib route::ring::model`;
//! tests/run does.
//!
//! ```text
//!  shuttle: one OS thread, its tasks switched at scheduling points
//!     ├─ pusher:  block_on(push) or block_on(try_push + room)  (real tokio Notify)
//!     ├─ flusher: pop / pop_into + wait_for_work                (real condvar protocol)
//!     └─ closer:  close()
//! ```
//!
//! The code under test is the real `Rings`: under the `model-check` feature
//! `sync` builds it on shuttle's atomics, mutex and condvar, and puts a
//! scheduling point before every fence and every queue and `Notify`
//! operation. Each test runs [`SCHEDULES`] PCT schedules and as many
//! uniformly random ones ([`check`]); a failure prints the schedule to pass
//! to `shuttle::replay`.
//!
//! **What this checks**
//! - The logic of both handshakes (announce, fence, re-check | change,
//!   fence, read the announcement) and of `close`, under the interleavings
//!   the schedulers try: no item is lost, duplicated or reordered, and no
//!   thread sleeps forever. A lost wakeup leaves a flusher parked on its
//!   condvar or a pusher parked on `room`; with no runnable task left,
//!   shuttle reports a deadlock and the test fails. No test needs a timeout
//!   to finish, and the flushers stop after the items they expect (not at
//!   `close`), so `close` cannot hide a missed wake.
//!
//! **What this does not check**
//! - Memory orderings and fences. shuttle runs every access as if it were
//!   `SeqCst` and its `fence` does nothing, so deleting a fence or
//!   weakening an ordering still passes here. The store-buffering argument
//!   in the module doc of `route::ring` stays argued, not checked. loom
//!   models fences, but not this code as it stands: crossbeam's queue and
//!   tokio's `Notify` become loom-visible only under `--cfg crossbeam_loom`
//!   / `--cfg loom` RUSTFLAGS (which rebuild every dependency), and loom
//!   treats `SeqCst` loads and stores as `AcqRel` (its README; issue
//!   tokio-rs/loom#180), too weak for `close`, whose `SeqCst` store of
//!   `closed` pairs with `SeqCst` loads and `Notify`'s `SeqCst` counter.
//! - Timeouts and spurious wakeups. shuttle has no clock: its
//!   `Condvar::wait_timeout` never times out and its condvars never wake
//!   spuriously. The timed path of `wait_for_work` ([`TIMED`]) is checked
//!   as if the timeout never fired, the stricter property: no wakeup may
//!   depend on the sink's 100 ms timeout. The "woken, but the rings are
//!   empty again" branch is reached by real wakes (a pusher that saw
//!   `sleeping` after the flusher had taken its item).
//! - The relay's keep-alive timer beside `room` (`src/relay/session.rs`): it
//!   only adds wakeups, and a timer cannot run under shuttle.
//! - Every interleaving: coverage is sampled. PCT finds a bug that needs at
//!   most [`PCT_DEPTH`] badly placed preemptions with a known minimum
//!   probability per schedule.
//!
//! Can it fail? Announcing `sleeping` only after the re-check (just before
//! `cond.wait`) fails three of these tests with shuttle's `deadlock!
//! blocked tasks: [main-thread (..., pending future), <unknown> (...)]`
//! (two still fail at 10 schedules). So, with a deadlock each, do a
//! `signal_room` that skips a lone waiter, a `room` without its
//! re-check, and a `close` that skips `notify_waiters` or the flushers'
//! locks. Deleting every fence passes, as said above.

use std::sync::Arc;
use std::time::Duration;

use shuttle::future::block_on;
use shuttle::scheduler::{PctScheduler, RandomScheduler};
use shuttle::thread;
use shuttle::{Config, Runner};

use super::{push_waiting, Rings, Wake};

/// Schedules per scheduler and test. Each breakage in the module doc was
/// caught at 30 (in two runs of each); this many leaves a wide margin for
/// subtler ones while the whole run stays within seconds.
const SCHEDULES: usize = 1000;
/// PCT depth: the number of priority changes, i.e. bugs that need up to
/// this many badly timed preemptions are found with a known probability.
const PCT_DEPTH: usize = 3;
/// The sink's flusher waits with a timeout; shuttle never times out, so any
/// value checks the same thing. One that cannot elapse keeps runs replayable.
const TIMED: Duration = Duration::from_secs(3600);

/// Runs `test` under the PCT scheduler, then under the uniformly random one.
fn check(test: impl Fn() + Send + Sync + 'static) {
    let test = Arc::new(test);
    let config = || {
        let mut config = Config::new();
        // shuttle warns once that it treats every ordering as SeqCst; the
        // module doc says so and why.
        config.silence_warnings = true;
        config
    };
    let t = Arc::clone(&test);
    Runner::new(PctScheduler::new(PCT_DEPTH, SCHEDULES), config()).run(move || t());
    Runner::new(RandomScheduler::new(SCHEDULES), config()).run(move || test());
}

/// The sink's flusher loop (`src/sink/flusher.rs`), except that it stops
/// after `want` items instead of at `close`: the only way to its last item
/// is a wake from a push.
fn flush(r: &Rings<u32>, k: usize, want: usize, timeout: Duration) -> Vec<(usize, u32)> {
    let mine: Vec<usize> = r.rings_of(k).collect();
    let mut got = Vec::new();
    let mut batch = Vec::new();
    while got.len() < want {
        let mut took = 0;
        for &ring in &mine {
            took += r.pop_into(ring, &mut batch, 2);
            got.extend(batch.drain(..).map(|x| (ring, x)));
        }
        if took == 0 {
            assert_ne!(r.wait_for_work(k, timeout), Wake::Closed);
        }
    }
    got
}

/// (a) One async pusher fills a ring of one slot; the flusher pops one item
/// at a time and sleeps in between. Both sleep paths are used: the pusher
/// waits for room after every item, the flusher for work.
#[test]
fn push_wakes_a_sleeping_flusher() {
    check(|| {
        let r = Rings::new(1, 1, 1).unwrap();
        let flusher = {
            let r = Arc::clone(&r);
            thread::spawn(move || {
                let mut got = Vec::new();
                while got.len() < 3 {
                    match r.pop(0) {
                        Some(x) => got.push(x),
                        None => assert_ne!(r.wait_for_work(0, Duration::MAX), Wake::Closed),
                    }
                }
                got
            })
        };
        block_on(async {
            for i in 0..3 {
                push_waiting(&r, 0, i).await.unwrap();
            }
        });
        assert_eq!(flusher.join().unwrap(), vec![0, 1, 2]);
        assert_eq!(r.total_len(), 0);
    });
}

/// Ring `ring`'s items in `two_pushers_one_flusher_keep_each_ring_in_order`.
fn base(ring: usize) -> u32 {
    10 * u32::try_from(ring).unwrap()
}

/// (a) Two pushers on two rings of one slot, one flusher owning both, with
/// the sink's timed wait: both pushers can wait on the shared `room` at once.
#[test]
fn two_pushers_one_flusher_keep_each_ring_in_order() {
    check(|| {
        let r = Rings::new(2, 1, 1).unwrap();
        let flusher = {
            let r = Arc::clone(&r);
            thread::spawn(move || flush(&r, 0, 4, TIMED))
        };
        let pushers: Vec<_> = (0..2usize)
            .map(|ring| {
                let r = Arc::clone(&r);
                thread::spawn(move || {
                    block_on(async {
                        for i in 0..2 {
                            push_waiting(&r, ring, base(ring) + i).await.unwrap();
                        }
                    })
                })
            })
            .collect();
        for p in pushers {
            p.join().unwrap();
        }
        let got = flusher.join().unwrap();
        for ring in 0..2usize {
            let mine: Vec<u32> = got
                .iter()
                .filter(|&&(r, _)| r == ring)
                .map(|&(_, x)| x)
                .collect();
            assert_eq!(mine, vec![base(ring), base(ring) + 1], "ring {ring}");
        }
    });
}

/// (c) The relay's pattern, `try_push` + `room`, against the sink's flusher
/// loop on a ring of one slot.
#[test]
fn room_and_try_push_like_the_relay() {
    check(|| {
        let r = Rings::new(1, 1, 1).unwrap();
        let flusher = {
            let r = Arc::clone(&r);
            thread::spawn(move || flush(&r, 0, 3, TIMED))
        };
        block_on(async {
            for i in 0..3 {
                push_waiting(&r, 0, i).await.unwrap();
            }
        });
        assert_eq!(flusher.join().unwrap(), vec![(0, 0), (0, 1), (0, 2)]);
    });
}

/// (b) `close` races with a flusher asleep on an empty ring and two
/// pushers waiting in `room` on a full ring nobody drains: all three wake,
/// and both pushers get their item back.
#[test]
fn close_wakes_a_sleeping_flusher_and_waiting_pushers() {
    check(|| {
        // Ring 0 (flusher 0, not running) is full; ring 1 (flusher 1) empty.
        let r = Rings::new(2, 1, 2).unwrap();
        r.try_push(0, 0).unwrap();
        let flusher = {
            let r = Arc::clone(&r);
            thread::spawn(move || r.wait_for_work(1, Duration::MAX))
        };
        let pusher = {
            let r = Arc::clone(&r);
            thread::spawn(move || block_on(push_waiting(&r, 0, 7)))
        };
        let relay = {
            let r = Arc::clone(&r);
            thread::spawn(move || block_on(push_waiting(&r, 0, 8)))
        };
        r.close();
        assert_eq!(flusher.join().unwrap(), Wake::Closed);
        assert_eq!(pusher.join().unwrap(), Err(7));
        assert_eq!(relay.join().unwrap(), Err(8));
        assert_eq!(r.pop(0), Some(0), "what was accepted before close stays");
        assert_eq!(r.total_len(), 0);
    });
}

/// (b) Pushes racing with `close` and a draining flusher: every item is
/// flushed, left in the ring, or handed back, exactly once and in order. A
/// push that passed the `closed` check may land after the flusher stopped
/// (documented on `close`); it stays in the ring.
#[test]
fn pushes_racing_close_lose_nothing() {
    check(|| {
        let r = Rings::new(1, 1, 1).unwrap();
        let flusher = {
            let r = Arc::clone(&r);
            thread::spawn(move || {
                let mut got = Vec::new();
                loop {
                    got.extend(std::iter::from_fn(|| r.pop(0)));
                    match r.wait_for_work(0, Duration::MAX) {
                        Wake::Work => {}
                        Wake::Closed => return got,
                        Wake::TimedOut => panic!("an unbounded wait timed out"),
                    }
                }
            })
        };
        let pusher = {
            let r = Arc::clone(&r);
            thread::spawn(move || {
                block_on(async {
                    let (mut accepted, mut back) = (Vec::new(), Vec::new());
                    for i in 0..3 {
                        match push_waiting(&r, 0, i).await {
                            Ok(()) => accepted.push(i),
                            Err(item) => back.push(item),
                        }
                    }
                    (accepted, back)
                })
            })
        };
        r.close();
        let (accepted, back) = pusher.join().unwrap();
        let mut flushed = flusher.join().unwrap();
        flushed.extend(std::iter::from_fn(|| r.pop(0)));
        assert_eq!(flushed, accepted, "flushed or left in the ring, in order");
        let all: Vec<u32> = accepted.into_iter().chain(back).collect();
        assert_eq!(all, vec![0, 1, 2], "handed back only after close");
    });
}
