//! Bounded per-partition rings between the WAL reader and the flushers.
//!
//! ```text
//!  reader task (async, one)             flusher threads (N)
//!  ────────────────────────             ───────────────────
//!  try_push(ring i, item) ──────────►  ArrayQueue[i] ──► pop(i)      by flusher i % N
//!       │ full? await `room` ◄──────── notify_waiters ◄─┘ (only if a pusher waits)
//!       └─ pushed: wake flusher i % N ──► condvar ──► wait_for_work(i % N)
//! ```
//!
//! Each ring is a `crossbeam::queue::ArrayQueue`: fixed capacity, lock-free,
//! items moved in and out (never cloned). The only locks are on the sleep
//! paths: a flusher takes its own mutex to sleep, a pusher that sees it
//! asleep takes it to wake it; a full ring makes the pusher await a
//! `tokio::sync::Notify`, which a popping consumer signals only when some
//! pusher is actually waiting.
//!
//! **Invariants**
//! - Nothing is dropped: a full ring, or closed rings, hand the item back
//!   ([`Rings::try_push`]); the pusher waits for [`Rings::room`] and tries
//!   again.
//! - Each ring is FIFO.
//! - Ring `i` belongs to flusher `i % N`; a push wakes that flusher only.
//! - No lost wakeups. Both sleep paths use the same handshake: the sleeper
//!   announces itself (flag or counter), issues a `SeqCst` fence, then
//!   re-checks the queue; the other side changes the queue, issues a `SeqCst`
//!   fence, then reads the announcement. The fences order the two, so at
//!   least one side sees the other: the sleeper finds the item/room, or the
//!   waker sees the sleeper and wakes it.
//!
//! **Model checking.** `sync` is the seam between this protocol and the
//! primitives it runs on: std's, crossbeam's and tokio's in every normal
//! build, shuttle's under the `model-check` feature. `model` (run by
//! tests/run: `cargo test --features model-check --lib route::ring::model`)
//! drives the real `Rings` with an async pusher, flusher threads and
//! `close` on rings of one slot, over a bounded number of PCT and random
//! schedules, and checks that nothing is lost, duplicated or reordered and
//! that nobody sleeps forever (a lost wakeup is a deadlock shuttle
//! reports). It checks the handshakes' logic under sequential consistency,
//! not the fences: shuttle runs every access as `SeqCst`, so the
//! store-buffering argument above is still only argued, not checked.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use crossbeam::utils::CachePadded;

use super::RouteError;
use sync::{fence, ArrayQueue, AtomicBool, AtomicUsize, Condvar, Mutex, MutexGuard, Notify};

#[cfg(all(test, feature = "model-check"))]
mod model;
mod sync;

/// Why [`Rings::wait_for_work`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// At least one of the flusher's rings has items (this wins over
    /// `Closed`, so a flusher can drain before it stops).
    Work,
    /// [`Rings::close`] was called and the flusher's rings are empty.
    Closed,
    /// The timeout passed with nothing to do.
    TimedOut,
}

/// The sleep state of one flusher.
struct FlusherSlot {
    /// True while the flusher is (about to be) asleep; a pusher that swaps
    /// it to false owns the duty to wake it.
    sleeping: AtomicBool,
    /// Set by a waker under the lock; the flusher sleeps until it is true.
    woken: Mutex<bool>,
    cond: Condvar,
}

/// Per-partition bounded lock-free rings with async backpressure for the
/// producer and blocking waits for flusher threads.
///
/// Ring `i` is consumed by flusher `i % flushers`. Built with
/// [`Rings::new`]; shared as an `Arc`.
pub struct Rings<T> {
    rings: Box<[ArrayQueue<T>]>,
    flushers: Box<[CachePadded<FlusherSlot>]>,
    /// Signalled by consumers when they free room and a pusher is waiting.
    room: Notify,
    /// How many `room` calls are waiting.
    room_waiters: CachePadded<AtomicUsize>,
    closed: AtomicBool,
    capacity: usize,
}

impl<T> fmt::Debug for Rings<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rings")
            .field("rings", &self.rings.len())
            .field("capacity", &self.capacity)
            .field("flushers", &self.flushers.len())
            .field("total_len", &self.total_len())
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// Counts a waiting pusher for as long as it lives, so that a cancelled
/// `room` future stops asking consumers for wakeups.
struct RoomWaiter<'a>(&'a AtomicUsize);

impl<'a> RoomWaiter<'a> {
    fn register(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        RoomWaiter(count)
    }
}

impl Drop for RoomWaiter<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn lock(m: &Mutex<bool>) -> MutexGuard<'_, bool> {
    // The guarded bool is valid whatever a panicking holder was doing.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<T> Rings<T> {
    /// Creates `rings` rings of `capacity` items each, consumed by
    /// `flushers` flusher threads (ring `i` by flusher `i % flushers`).
    ///
    /// All three must be at least 1. More flushers than rings is allowed;
    /// the extra flushers own no ring.
    pub fn new(rings: usize, capacity: usize, flushers: usize) -> Result<Arc<Self>, RouteError> {
        if rings == 0 || capacity == 0 || flushers == 0 {
            return Err(RouteError::Rings(format!(
                "rings ({rings}), ring capacity ({capacity}) and flushers ({flushers}) must all be at least 1"
            )));
        }
        Ok(Arc::new(Self {
            rings: (0..rings).map(|_| ArrayQueue::new(capacity)).collect(),
            flushers: (0..flushers)
                .map(|_| {
                    CachePadded::new(FlusherSlot {
                        sleeping: AtomicBool::new(false),
                        woken: Mutex::new(false),
                        cond: Condvar::new(),
                    })
                })
                .collect(),
            room: Notify::new(),
            room_waiters: CachePadded::new(AtomicUsize::new(0)),
            closed: AtomicBool::new(false),
            capacity,
        }))
    }

    /// The number of rings.
    pub fn ring_count(&self) -> usize {
        self.rings.len()
    }

    /// The number of flushers the rings are split between.
    pub fn flusher_count(&self) -> usize {
        self.flushers.len()
    }

    /// The capacity of each ring.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The flusher that owns `ring`.
    pub fn flusher_of(&self, ring: usize) -> usize {
        ring % self.flushers.len()
    }

    /// The rings flusher `flusher` owns, in ascending order (empty for an
    /// out-of-range flusher).
    pub fn rings_of(&self, flusher: usize) -> impl Iterator<Item = usize> {
        let start = if flusher < self.flushers.len() {
            flusher
        } else {
            self.rings.len()
        };
        (start..self.rings.len()).step_by(self.flushers.len())
    }

    /// Pushes `item` onto `ring` if there is room, and wakes the ring's
    /// flusher if it sleeps. Never blocks and never drops: when the ring is
    /// full, or the rings are closed, the item comes back as `Err`.
    ///
    /// # Panics
    /// If `ring >= ring_count()`: that is a wiring bug, not bad input.
    pub fn try_push(&self, ring: usize, item: T) -> Result<(), T> {
        let queue = self.ring(ring);
        if self.closed.load(Ordering::Acquire) {
            return Err(item);
        }
        queue.push(item)?;
        self.wake_flusher(self.flusher_of(ring));
        Ok(())
    }

    /// Pops the oldest item of `ring`, or `None` if it is empty (or out of
    /// range). Wakes a pusher waiting for room.
    pub fn pop(&self, ring: usize) -> Option<T> {
        let item = self.rings.get(ring)?.pop()?;
        self.signal_room();
        Some(item)
    }

    /// Pops up to `max` items of `ring` into `out`, oldest first, and
    /// returns how many. Wakes waiting pushers once for the whole batch.
    pub fn pop_into(&self, ring: usize, out: &mut Vec<T>, max: usize) -> usize {
        let Some(queue) = self.rings.get(ring) else {
            return 0;
        };
        let mut n = 0;
        while n < max {
            match queue.pop() {
                Some(item) => {
                    out.push(item);
                    n += 1;
                }
                None => break,
            }
        }
        if n > 0 {
            self.signal_room();
        }
        n
    }

    /// Blocks the calling flusher thread until one of its rings has items,
    /// [`Rings::close`] is called, or `timeout` passes. Returns at once if
    /// there is already work. For flusher `k`, its rings are
    /// [`Rings::rings_of`]`(k)`.
    ///
    /// Meant for one thread per flusher index; spurious returns are
    /// possible, so callers loop.
    ///
    /// # Panics
    /// If `flusher >= flusher_count()`.
    pub fn wait_for_work(&self, flusher: usize, timeout: Duration) -> Wake {
        let Some(slot) = self.flushers.get(flusher) else {
            panic!(
                "flusher {flusher} out of range: only {} flushers",
                self.flushers.len()
            );
        };
        let deadline = Instant::now().checked_add(timeout);
        let mut woken = lock(&slot.woken);
        // Any earlier wake is stale: we re-check the rings below.
        *woken = false;
        slot.sleeping.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let outcome = loop {
            if self.has_work(flusher) {
                break Wake::Work;
            }
            if self.is_closed() {
                break Wake::Closed;
            }
            if *woken {
                // Woken but the rings are empty again (someone else popped):
                // go back to sleep, announcing ourselves again.
                *woken = false;
                slot.sleeping.store(true, Ordering::Relaxed);
                fence(Ordering::SeqCst);
                continue;
            }
            woken = match deadline {
                None => slot
                    .cond
                    .wait(woken)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break Wake::TimedOut;
                    }
                    slot.cond
                        .wait_timeout(woken, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        };
        *woken = false;
        slot.sleeping.store(false, Ordering::Relaxed);
        outcome
    }

    /// Waits until `ring` may have room (or the rings close): a pusher
    /// whose [`Rings::try_push`] found the ring full awaits this, then tries
    /// again. It owns no item, so dropping it (the caller has something else
    /// to do meanwhile, such as keeping a connection alive) loses nothing.
    /// Spurious returns are possible.
    pub async fn room(&self, ring: usize) {
        // `notified()` sees every `notify_waiters` after it is created,
        // even before it is polled. Create it, then announce ourselves,
        // then fence and re-check: a consumer that pops after our
        // re-check failed must see the announcement.
        let notified = self.room.notified();
        let _waiter = RoomWaiter::register(&self.room_waiters);
        fence(Ordering::SeqCst);
        if self.is_closed() || self.rings.get(ring).is_none_or(|q| !q.is_full()) {
            return;
        }
        notified.await;
    }

    /// Closes the rings: pushes hand items back from now on, and every
    /// waiting pusher and flusher wakes up. Items already in the rings stay
    /// there for flushers to drain (a push racing with `close` may still
    /// land; check [`Rings::total_len`] after the flushers stop).
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.room.notify_waiters();
        for slot in self.flushers.iter() {
            // Taking the lock orders us after a flusher's check of `closed`
            // or before it; either way it cannot sleep through this.
            let mut woken = lock(&slot.woken);
            *woken = true;
            slot.cond.notify_all();
        }
    }

    /// True once [`Rings::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Items in `ring` (0 if out of range).
    pub fn len(&self, ring: usize) -> usize {
        self.rings.get(ring).map_or(0, ArrayQueue::len)
    }

    /// True if `ring` is empty (or out of range).
    pub fn is_empty(&self, ring: usize) -> bool {
        self.rings.get(ring).is_none_or(ArrayQueue::is_empty)
    }

    /// Items in all rings.
    pub fn total_len(&self) -> usize {
        self.rings.iter().map(ArrayQueue::len).sum()
    }

    fn ring(&self, ring: usize) -> &ArrayQueue<T> {
        match self.rings.get(ring) {
            Some(queue) => queue,
            None => panic!("ring {ring} out of range: only {} rings", self.rings.len()),
        }
    }

    fn has_work(&self, flusher: usize) -> bool {
        self.rings_of(flusher).any(|r| !self.is_empty(r))
    }

    /// After a push: wake the ring's flusher if it sleeps.
    fn wake_flusher(&self, flusher: usize) {
        let Some(slot) = self.flushers.get(flusher) else {
            return;
        };
        // Pairs with the fence in `wait_for_work`: either the flusher's
        // re-check sees our item, or we see `sleeping`.
        fence(Ordering::SeqCst);
        if slot.sleeping.load(Ordering::Relaxed) && slot.sleeping.swap(false, Ordering::AcqRel) {
            let mut woken = lock(&slot.woken);
            *woken = true;
            slot.cond.notify_one();
        }
    }

    /// After a pop: wake pushers waiting for room, if any.
    fn signal_room(&self) {
        // Pairs with the fence in `room`: either the pusher's re-check sees
        // the room, or we see it waiting.
        fence(Ordering::SeqCst);
        if self.room_waiters.load(Ordering::Relaxed) > 0 {
            self.room.notify_waiters();
        }
    }
}

/// A pusher as the relay is one (`relay::deliver`, less its keep-alive
/// timer and stop request): `try_push`, and while the ring is full, `room`.
#[cfg(test)]
async fn push_waiting<T>(r: &Rings<T>, ring: usize, mut item: T) -> Result<(), T> {
    loop {
        match r.try_push(ring, item) {
            Ok(()) => return Ok(()),
            Err(back) => item = back,
        }
        if r.is_closed() {
            return Err(item);
        }
        r.room(ring).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::collections::HashSet;
    use std::future::{poll_fn, Future};
    use std::pin::pin;
    use std::sync::mpsc;
    use std::task::Poll;
    use std::thread;

    /// Long enough that hitting it means a lost wakeup, not a slow machine.
    const NO_LOST_WAKEUP: Duration = Duration::from_secs(20);

    fn current_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn rejects_zero_sizes() {
        assert!(Rings::<u8>::new(0, 1, 1).is_err());
        assert!(Rings::<u8>::new(1, 0, 1).is_err());
        assert!(Rings::<u8>::new(1, 1, 0).is_err());
        let r = Rings::<u8>::new(5, 4, 2).unwrap();
        assert_eq!((r.ring_count(), r.capacity(), r.flusher_count()), (5, 4, 2));
    }

    #[test]
    fn fifo_per_ring() {
        let r = Rings::new(3, 16, 1).unwrap();
        for i in 0..10u32 {
            r.try_push((i % 3) as usize, i).unwrap();
        }
        assert_eq!(r.len(0), 4);
        assert_eq!(r.total_len(), 10);
        for ring in 0..3 {
            let got: Vec<u32> = std::iter::from_fn(|| r.pop(ring)).collect();
            let want: Vec<u32> = (0..10).filter(|i| i % 3 == ring as u32).collect();
            assert_eq!(got, want);
        }
        assert_eq!(r.total_len(), 0);
        assert!(r.pop(0).is_none());
        assert!(r.pop(99).is_none(), "out of range pops nothing");
        assert_eq!(r.len(99), 0);
    }

    #[test]
    fn full_ring_hands_the_item_back_unchanged() {
        let r = Rings::new(2, 2, 1).unwrap();
        r.try_push(0, Bytes::from_static(b"a")).unwrap();
        r.try_push(0, Bytes::from_static(b"b")).unwrap();
        let third = Bytes::from(vec![7u8; 64]);
        let ptr = third.as_ptr();
        let back = r.try_push(0, third).unwrap_err();
        assert_eq!(back.as_ptr(), ptr, "moved back, not copied");
        assert_eq!(r.len(0), 2);
        // The other ring is independent.
        r.try_push(1, Bytes::from_static(b"c")).unwrap();
        assert_eq!(r.pop(0).unwrap(), "a");
        r.try_push(0, back).unwrap();
        let got: Vec<Bytes> = std::iter::from_fn(|| r.pop(0)).collect();
        assert_eq!(
            got,
            vec![Bytes::from_static(b"b"), Bytes::from(vec![7u8; 64])]
        );
        assert_eq!(got[1].as_ptr(), ptr);
    }

    #[test]
    fn pop_into_takes_a_batch_in_order() {
        let r = Rings::new(1, 8, 1).unwrap();
        for i in 0..8 {
            r.try_push(0, i).unwrap();
        }
        let mut out = Vec::new();
        assert_eq!(r.pop_into(0, &mut out, 5), 5);
        assert_eq!(r.pop_into(0, &mut out, 5), 3);
        assert_eq!(r.pop_into(0, &mut out, 5), 0);
        assert_eq!(r.pop_into(9, &mut out, 5), 0);
        assert_eq!(out, (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn async_push_waits_for_room_and_resumes_after_a_pop() {
        let r = Rings::new(1, 2, 1).unwrap();
        let (go, go_rx) = mpsc::channel::<()>();
        let consumer = {
            let r = Arc::clone(&r);
            thread::spawn(move || {
                let mut got = Vec::new();
                go_rx.recv().unwrap();
                // Pop one to make room, then drain the rest as it arrives.
                while got.len() < 3 {
                    match r.pop(0) {
                        Some(x) => got.push(x),
                        None => {
                            assert_ne!(r.wait_for_work(0, NO_LOST_WAKEUP), Wake::TimedOut);
                        }
                    }
                }
                got
            })
        };
        current_thread().block_on(async {
            push_waiting(&r, 0, 1).await.unwrap();
            push_waiting(&r, 0, 2).await.unwrap();
            let mut third = pin!(push_waiting(&r, 0, 3));
            let first_poll = poll_fn(|cx| Poll::Ready(third.as_mut().poll(cx))).await;
            assert!(first_poll.is_pending(), "a full ring makes push wait");
            assert_eq!(r.len(0), 2);
            go.send(()).unwrap();
            third.await.unwrap();
        });
        assert_eq!(consumer.join().unwrap(), vec![1, 2, 3]);
    }

    #[test]
    fn wait_for_work_returns_at_once_when_items_are_there() {
        let r = Rings::new(4, 4, 2).unwrap();
        assert_eq!(r.wait_for_work(1, Duration::ZERO), Wake::TimedOut);
        r.try_push(3, 'x').unwrap();
        assert_eq!(r.wait_for_work(0, Duration::ZERO), Wake::TimedOut);
        assert_eq!(r.wait_for_work(1, Duration::MAX), Wake::Work);
    }

    #[test]
    fn flushers_own_every_nth_ring() {
        let r = Rings::<u8>::new(7, 1, 3).unwrap();
        assert_eq!(r.rings_of(0).collect::<Vec<_>>(), vec![0, 3, 6]);
        assert_eq!(r.rings_of(1).collect::<Vec<_>>(), vec![1, 4]);
        assert_eq!(r.rings_of(2).collect::<Vec<_>>(), vec![2, 5]);
        assert_eq!(r.rings_of(3).count(), 0);
        assert!((0..7).all(|ring| r.rings_of(r.flusher_of(ring)).any(|x| x == ring)));
        let more_flushers = Rings::<u8>::new(2, 1, 4).unwrap();
        assert_eq!(more_flushers.rings_of(3).count(), 0);
    }

    /// A flusher loop as the sink will run it: drain own rings, sleep
    /// until woken, stop when closed and drained.
    fn flusher<T: Send>(r: &Rings<T>, k: usize) -> Vec<(usize, T)> {
        let mut got = Vec::new();
        let mut batch = Vec::new();
        loop {
            for ring in r.rings_of(k) {
                r.pop_into(ring, &mut batch, 64);
                got.extend(batch.drain(..).map(|x| (ring, x)));
            }
            match r.wait_for_work(k, NO_LOST_WAKEUP) {
                Wake::Work => {}
                Wake::Closed => return got,
                Wake::TimedOut => panic!("flusher {k} slept through a push"),
            }
        }
    }

    #[test]
    fn each_flusher_sees_only_its_rings() {
        const RINGS: usize = 10;
        const FLUSHERS: usize = 3;
        let r = Rings::new(RINGS, 4, FLUSHERS).unwrap();
        let handles: Vec<_> = (0..FLUSHERS)
            .map(|k| {
                let r = Arc::clone(&r);
                thread::spawn(move || flusher(&r, k))
            })
            .collect();
        current_thread().block_on(async {
            for i in 0..2_000usize {
                push_waiting(&r, i % RINGS, i).await.unwrap();
            }
        });
        r.close();
        let mut total = 0;
        for (k, h) in handles.into_iter().enumerate() {
            let got = h.join().unwrap();
            assert!(got
                .iter()
                .all(|&(ring, i)| ring % FLUSHERS == k && i % RINGS == ring));
            total += got.len();
        }
        assert_eq!(total, 2_000);
    }

    #[test]
    fn concurrent_stress_loses_and_duplicates_nothing() {
        const RINGS: usize = 16;
        const FLUSHERS: usize = 3;
        const PRODUCERS: usize = 3;
        const PER_PRODUCER: u64 = 70_000;
        let r = Rings::new(RINGS, 64, FLUSHERS).unwrap();
        let flushers: Vec<_> = (0..FLUSHERS)
            .map(|k| {
                let r = Arc::clone(&r);
                thread::spawn(move || flusher(&r, k))
            })
            .collect();
        // Each producer is an async task on its own current-thread runtime,
        // like the reader; several of them exercise the room notifications.
        let producers: Vec<_> = (0..PRODUCERS)
            .map(|p| {
                let r = Arc::clone(&r);
                thread::spawn(move || {
                    current_thread().block_on(async {
                        for seq in 0..PER_PRODUCER {
                            let ring = usize::try_from(seq % RINGS as u64).unwrap();
                            let mut item = seq.to_le_bytes().to_vec();
                            item.push(u8::try_from(p).unwrap());
                            push_waiting(&r, ring, Bytes::from(item)).await.unwrap();
                        }
                    })
                })
            })
            .collect();
        for p in producers {
            p.join().unwrap();
        }
        r.close();
        let mut seen = HashSet::new();
        let mut last = vec![[None::<u64>; RINGS]; PRODUCERS];
        for h in flushers {
            for (ring, item) in h.join().unwrap() {
                let seq = u64::from_le_bytes(item[..8].try_into().unwrap());
                let p = usize::from(item[8]);
                assert!(seen.insert((p, seq)), "duplicate {p}/{seq}");
                assert!(
                    last[p][ring] < Some(seq),
                    "ring {ring} out of order for producer {p}"
                );
                last[p][ring] = Some(seq);
            }
        }
        assert_eq!(
            seen.len(),
            PRODUCERS * usize::try_from(PER_PRODUCER).unwrap()
        );
        assert_eq!(r.total_len(), 0);
    }

    #[test]
    fn close_wakes_a_sleeping_flusher() {
        let r = Rings::<u8>::new(2, 2, 2).unwrap();
        let (ready, ready_rx) = mpsc::channel();
        let sleeper = {
            let r = Arc::clone(&r);
            thread::spawn(move || {
                ready.send(()).unwrap();
                r.wait_for_work(1, Duration::MAX)
            })
        };
        ready_rx.recv().unwrap();
        r.close();
        assert_eq!(sleeper.join().unwrap(), Wake::Closed);
        assert!(r.is_closed());
        assert_eq!(r.wait_for_work(0, Duration::MAX), Wake::Closed);
    }

    #[test]
    fn close_wakes_a_waiting_pusher_and_hands_the_item_back() {
        let r = Rings::new(1, 1, 1).unwrap();
        r.try_push(0, 1u32).unwrap();
        let (go, go_rx) = mpsc::channel::<()>();
        let closer = {
            let r = Arc::clone(&r);
            thread::spawn(move || {
                go_rx.recv().unwrap();
                r.close();
            })
        };
        current_thread().block_on(async {
            let mut second = pin!(push_waiting(&r, 0, 2));
            let first_poll = poll_fn(|cx| Poll::Ready(second.as_mut().poll(cx))).await;
            assert!(first_poll.is_pending());
            go.send(()).unwrap();
            assert_eq!(second.await, Err(2));
            assert_eq!(push_waiting(&r, 0, 3).await, Err(3));
        });
        closer.join().unwrap();
        assert_eq!(r.try_push(0, 4), Err(4));
        // What was accepted before close is still there to drain.
        assert_eq!(r.pop(0), Some(1));
        assert_eq!(r.wait_for_work(0, Duration::ZERO), Wake::Closed);
    }

    #[test]
    fn a_cancelled_push_stops_waiting() {
        let r = Rings::new(1, 1, 1).unwrap();
        r.try_push(0, 1u8).unwrap();
        current_thread().block_on(async {
            {
                let mut fut = pin!(push_waiting(&r, 0, 2));
                assert!(poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx)))
                    .await
                    .is_pending());
                assert_eq!(r.room_waiters.load(Ordering::SeqCst), 1);
            }
            assert_eq!(r.room_waiters.load(Ordering::SeqCst), 0);
        });
    }
}
