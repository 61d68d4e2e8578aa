//! The primitives the rings synchronise through, in one place so that the
//! model-checking tests (`model`, feature `model-check`) can swap
//! them.
//!
//! ```text
//!  normal build                          --features model-check
//!  ────────────                          ──────────────────────
//!  std AtomicBool, AtomicUsize           shuttle's (every access is a
//!  std Mutex, MutexGuard, Condvar         scheduling point)
//!  std fence                             shuttle's fence + a scheduling point
//!  crossbeam ArrayQueue                  the same, behind a scheduling point
//!  tokio Notify                          the same, behind a scheduling point
//! ```
//!
//! **Invariants**
//! - A normal build re-exports the real types and functions unchanged: the
//!   rings compile to the same code, with the same orderings and fences, as
//!   without this module. shuttle is an optional dependency that only the
//!   `model-check` feature compiles.
//! - With the feature, every operation on state shared between a pusher and
//!   a flusher is preceded by a shuttle scheduling point, so the checker can
//!   run any other thread between any two of them. The queue and the
//!   `Notify` are still the real ones: each operation on them is one atomic
//!   step, which matches their documented (linearizable) behaviour.
//! - With the feature the rings only work inside a shuttle execution; it is
//!   for `cargo test --features model-check --lib route::ring::model` only.

#[cfg(not(feature = "model-check"))]
pub(super) use crossbeam::queue::ArrayQueue;
#[cfg(not(feature = "model-check"))]
pub(super) use std::sync::atomic::{fence, AtomicBool, AtomicUsize};
#[cfg(not(feature = "model-check"))]
pub(super) use std::sync::{Condvar, Mutex, MutexGuard};
#[cfg(not(feature = "model-check"))]
pub(super) use tokio::sync::Notify;

#[cfg(feature = "model-check")]
pub(super) use checked::{fence, ArrayQueue, Notify};
#[cfg(feature = "model-check")]
pub(super) use shuttle::sync::atomic::{AtomicBool, AtomicUsize};
#[cfg(feature = "model-check")]
pub(super) use shuttle::sync::{Condvar, Mutex, MutexGuard};

/// Scheduling points around the primitives shuttle does not know about.
#[cfg(feature = "model-check")]
mod checked {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    /// Lets shuttle run another thread here. (`shuttle::thread::sleep` does
    /// not model time: it is a plain context switch, unlike `yield_now`,
    /// which some schedulers take as a hint to deprioritise the caller.)
    fn step() {
        shuttle::thread::sleep(Duration::ZERO);
    }

    /// shuttle's `fence` checks the ordering and does nothing else: shuttle
    /// runs every access sequentially consistently, so a fence has no effect
    /// to model. The scheduling point lets another thread run between the
    /// two halves of each handshake (announce | fence | re-check).
    pub(in crate::route::ring) fn fence(order: Ordering) {
        shuttle::sync::atomic::fence(order);
        step();
    }

    /// `crossbeam::queue::ArrayQueue` with a scheduling point before each
    /// operation.
    pub(in crate::route::ring) struct ArrayQueue<T>(crossbeam::queue::ArrayQueue<T>);

    impl<T> ArrayQueue<T> {
        pub(in crate::route::ring) fn new(capacity: usize) -> Self {
            Self(crossbeam::queue::ArrayQueue::new(capacity))
        }

        pub(in crate::route::ring) fn push(&self, item: T) -> Result<(), T> {
            step();
            self.0.push(item)
        }

        pub(in crate::route::ring) fn pop(&self) -> Option<T> {
            step();
            self.0.pop()
        }

        pub(in crate::route::ring) fn len(&self) -> usize {
            step();
            self.0.len()
        }

        pub(in crate::route::ring) fn is_empty(&self) -> bool {
            step();
            self.0.is_empty()
        }

        pub(in crate::route::ring) fn is_full(&self) -> bool {
            step();
            self.0.is_full()
        }
    }

    /// `tokio::sync::Notify` with a scheduling point before each operation.
    /// `Notify` is runtime-agnostic (it only stores and wakes `Waker`s), so
    /// the real one works under `shuttle::future::block_on`.
    pub(in crate::route::ring) struct Notify(tokio::sync::Notify);

    impl Notify {
        pub(in crate::route::ring) fn new() -> Self {
            Self(tokio::sync::Notify::new())
        }

        pub(in crate::route::ring) fn notified(&self) -> tokio::sync::futures::Notified<'_> {
            step();
            self.0.notified()
        }

        pub(in crate::route::ring) fn notify_waiters(&self) {
            step();
            self.0.notify_waiters();
        }
    }
}
