//! Property tests for `factlib::progress::Tracker` against a reference model.
//!
//! Random streams (transactions of 0..20 facts, lone messages that are facts
//! or not, keepalives, some of them stale or arriving mid-transaction) are
//! fed in stream order, interleaved at random with acks in a random order
//! and `watermark()` reads. After every step the tracker must agree with a
//! model that recomputes, from scratch, the end of the longest prefix of
//! units that are sealed and fully acked. Independently of any notion of
//! units, the watermark must stay below the position of every fact that is
//! not acked yet (delivered or still to come): confirming that position
//! would make a restarted server skip the fact.

use std::collections::HashMap;

use factlib::progress::{Token, Tracker};
use factlib::Lsn;
use proptest::prelude::*;
use proptest::sample::Index;

/// One thing the generator puts in the stream.
#[derive(Debug, Clone)]
enum Item {
    /// A transaction with `facts` facts (a transaction holding only messages
    /// of another prefix makes no tracker call between Begin and Commit, so
    /// `facts == 0` covers it). Maybe a keepalive before fact number
    /// `keepalive_at` (the walsender can send one mid-transaction), and,
    /// rarely, a lone message before fact number `lone_at.0` (not seen with
    /// protocol v1; the tracker folds it into the open transaction).
    Tx {
        facts: usize,
        keepalive_at: Option<usize>,
        lone_at: Option<(usize, bool)>,
    },
    /// A non-transactional message.
    Lone { is_fact: bool },
    /// A keepalive; a stale one reports a `wal_end` behind the last unit.
    Keepalive { stale: bool },
}

fn item() -> impl Strategy<Value = Item> {
    prop_oneof![
        4 => (
            0..20usize,
            prop::option::weighted(0.2, 0..21usize),
            prop::option::weighted(0.05, (0..21usize, any::<bool>())),
        )
            .prop_map(|(facts, keepalive_at, lone_at)| Item::Tx {
                facts,
                keepalive_at,
                lone_at,
            }),
        2 => any::<bool>().prop_map(|is_fact| Item::Lone { is_fact }),
        1 => prop::bool::weighted(0.3).prop_map(|stale| Item::Keepalive { stale }),
    ]
}

/// One call into the tracker, in stream order. `unit` indexes the model's
/// units; `end` values are raw LSNs.
#[derive(Debug, Clone, Copy)]
enum Step {
    Begin {
        unit: usize,
    },
    /// A fact of the open transaction; `pos` is its commit end.
    Fact {
        unit: usize,
        pos: u64,
    },
    Commit {
        unit: usize,
        end: u64,
    },
    /// A lone message; with `joins` it arrives inside the open transaction
    /// `unit` and counts as one of its facts.
    Lone {
        unit: usize,
        end: u64,
        is_fact: bool,
        joins: bool,
    },
    Keepalive {
        wal_end: u64,
    },
}

impl Step {
    /// The position whose confirmation would skip this step's fact.
    fn fact_pos(self) -> Option<u64> {
        match self {
            Step::Fact { pos, .. } => Some(pos),
            Step::Lone {
                end, is_fact: true, ..
            } => Some(end),
            _ => None,
        }
    }
}

/// A unit as the model sees it. The model never pops or folds anything.
#[derive(Debug, Clone)]
struct ModelUnit {
    end: u64,
    fed: bool,
    sealed: bool,
    unacked: usize,
}

impl ModelUnit {
    fn new(end: u64) -> Self {
        ModelUnit {
            end,
            fed: false,
            sealed: false,
            unacked: 0,
        }
    }

    fn done(&self) -> bool {
        self.fed && self.sealed && self.unacked == 0
    }
}

struct Model {
    units: Vec<ModelUnit>,
    /// The start position, raised by every keepalive that may advance.
    floor: u64,
    open: bool,
}

impl Model {
    fn in_flight(&self) -> usize {
        self.units.iter().map(|u| u.unacked).sum()
    }

    /// The end of the longest fully-acked, sealed prefix (or the floor).
    fn watermark(&self) -> u64 {
        self.units
            .iter()
            .take_while(|u| u.done())
            .map(|u| u.end)
            .fold(self.floor, u64::max)
    }
}

/// Lays the items out as tracker calls with strictly increasing WAL
/// positions. A keepalive's `wal_end` never reaches a later record, except a
/// mid-transaction one, which reports that transaction's own commit end (the
/// dangerous value a tracker must ignore).
fn lay_out(start: u64, items: &[Item], gaps: &[u64]) -> (Vec<Step>, Vec<ModelUnit>) {
    let mut gaps = gaps.iter().copied().cycle();
    let mut next_gap = move || gaps.next().unwrap_or(1);
    let mut cursor = start;
    let mut steps = Vec::new();
    let mut units = Vec::new();
    for item in items {
        match *item {
            Item::Tx {
                facts,
                keepalive_at,
                lone_at,
            } => {
                // A lone message inside the transaction: its record comes
                // before the commit record.
                let lone = lone_at.map(|(at, is_fact)| {
                    cursor += next_gap();
                    (at, is_fact, cursor)
                });
                cursor += next_gap();
                let end = cursor;
                units.push(ModelUnit::new(end));
                let unit = units.len() - 1;
                steps.push(Step::Begin { unit });
                for i in 0..=facts {
                    if keepalive_at == Some(i) {
                        steps.push(Step::Keepalive { wal_end: end });
                    }
                    if let Some((at, is_fact, lone_end)) = lone {
                        if at.min(facts) == i {
                            steps.push(Step::Lone {
                                unit,
                                end: lone_end,
                                is_fact,
                                joins: true,
                            });
                        }
                    }
                    if i < facts {
                        steps.push(Step::Fact { unit, pos: end });
                    }
                }
                steps.push(Step::Commit { unit, end });
            }
            Item::Lone { is_fact } => {
                cursor += next_gap();
                units.push(ModelUnit::new(cursor));
                steps.push(Step::Lone {
                    unit: units.len() - 1,
                    end: cursor,
                    is_fact,
                    joins: false,
                });
            }
            Item::Keepalive { stale } => {
                let gap = next_gap();
                let wal_end = if stale {
                    cursor.saturating_sub(gap)
                } else {
                    cursor += gap;
                    cursor
                };
                steps.push(Step::Keepalive { wal_end });
            }
        }
    }
    (steps, units)
}

/// What the schedule does next.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// Feed the next stream step.
    Feed,
    /// Ack a random outstanding fact.
    Ack(Index),
    /// Read the watermark.
    Watermark,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Feed),
        3 => any::<Index>().prop_map(Op::Ack),
        1 => Just(Op::Watermark),
    ]
}

/// A fact handed out and not acked yet.
struct Outstanding {
    token: Token,
    unit: usize,
    pos: u64,
}

struct Harness {
    tracker: Tracker,
    model: Model,
    steps: Vec<Step>,
    /// `unfed_min[i]`: the lowest fact position among `steps[i..]`.
    unfed_min: Vec<u64>,
    fed: usize,
    outstanding: Vec<Outstanding>,
    /// Every token ever issued, and the model unit it belongs to.
    owner: HashMap<Token, usize>,
    last: Lsn,
    /// Highest keepalive `wal_end` that was allowed to advance.
    applied_keepalive: u64,
}

impl Harness {
    fn new(start: u64, steps: Vec<Step>, units: Vec<ModelUnit>) -> Self {
        let mut unfed_min = vec![u64::MAX; steps.len() + 1];
        for i in (0..steps.len()).rev() {
            unfed_min[i] = unfed_min[i + 1].min(steps[i].fact_pos().unwrap_or(u64::MAX));
        }
        Harness {
            tracker: Tracker::new(Lsn(start)),
            model: Model {
                units,
                floor: start,
                open: false,
            },
            steps,
            unfed_min,
            fed: 0,
            outstanding: Vec::new(),
            owner: HashMap::new(),
            last: Lsn(start),
            applied_keepalive: start,
        }
    }

    fn issued(&mut self, token: Token, unit: usize, pos: u64) -> Result<(), TestCaseError> {
        let owner = *self.owner.entry(token).or_insert(unit);
        prop_assert_eq!(owner, unit, "token {:?} shared by two units", token);
        self.outstanding.push(Outstanding { token, unit, pos });
        self.model.units[unit].unacked += 1;
        Ok(())
    }

    /// Feeds the next step, if any is left.
    fn feed(&mut self) -> Result<(), TestCaseError> {
        let Some(&step) = self.steps.get(self.fed) else {
            return Ok(());
        };
        self.fed += 1;
        match step {
            Step::Begin { unit } => {
                self.tracker.begin().unwrap();
                self.model.units[unit].fed = true;
                self.model.open = true;
            }
            Step::Fact { unit, pos } => {
                let token = self.tracker.fact().unwrap();
                self.issued(token, unit, pos)?;
            }
            Step::Commit { unit, end } => {
                self.tracker.commit(Lsn(end)).unwrap();
                self.model.units[unit].sealed = true;
                self.model.open = false;
            }
            Step::Lone {
                unit,
                end,
                is_fact,
                joins,
            } => {
                let token = self.tracker.lone(Lsn(end), is_fact);
                prop_assert_eq!(token.is_some(), is_fact);
                if !joins {
                    let u = &mut self.model.units[unit];
                    u.fed = true;
                    u.sealed = true;
                }
                if let Some(token) = token {
                    self.issued(token, unit, end)?;
                }
            }
            Step::Keepalive { wal_end } => {
                self.tracker.keepalive(Lsn(wal_end));
                if !self.model.open && self.model.in_flight() == 0 {
                    let ends = self.model.units.iter().filter(|u| u.fed).map(|u| u.end);
                    self.model.floor = ends.fold(self.model.floor.max(wal_end), u64::max);
                    self.applied_keepalive = self.applied_keepalive.max(wal_end);
                }
            }
        }
        Ok(())
    }

    fn ack(&mut self, pick: Index) {
        if self.outstanding.is_empty() {
            return;
        }
        let done = self
            .outstanding
            .swap_remove(pick.index(self.outstanding.len()));
        self.tracker.ack(done.token).unwrap();
        self.model.units[done.unit].unacked -= 1;
    }

    fn check_counts(&self) -> Result<(), TestCaseError> {
        prop_assert_eq!(self.tracker.in_flight(), self.model.in_flight());
        prop_assert_eq!(self.tracker.in_flight(), self.outstanding.len());
        Ok(())
    }

    fn check_watermark(&mut self) -> Result<(), TestCaseError> {
        let w = self.tracker.watermark();
        prop_assert_eq!(w, Lsn(self.model.watermark()), "watermark vs model");
        prop_assert!(w >= self.last, "watermark went back: {} < {}", w, self.last);
        // No fact that is unacked, or not even delivered yet, may be skipped.
        let lowest_unacked = self
            .outstanding
            .iter()
            .map(|o| o.pos)
            .fold(self.unfed_min[self.fed], u64::min);
        prop_assert!(
            w.0 < lowest_unacked,
            "watermark {} at or past an unacked fact at {}",
            w,
            Lsn(lowest_unacked)
        );
        self.last = w;
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn watermark_matches_the_reference_model(
        start in prop_oneof![Just(0u64), 0..1_000_000u64],
        items in prop::collection::vec(item(), 0..30),
        gaps in prop::collection::vec(1..500u64, 1..16),
        ops in prop::collection::vec(op(), 0..450),
        tail in prop::collection::vec(any::<Index>(), 1..16),
        eager in any::<bool>(),
    ) {
        let (steps, units) = lay_out(start, &items, &gaps);
        let mut h = Harness::new(start, steps, units);
        h.check_watermark()?;

        for op in ops {
            match op {
                Op::Feed => h.feed()?,
                Op::Ack(pick) => h.ack(pick),
                Op::Watermark => h.check_watermark()?,
            }
            h.check_counts()?;
            if eager {
                h.check_watermark()?;
            }
        }

        // Drain: the rest of the stream, then every outstanding ack, in a
        // random order.
        while h.fed < h.steps.len() {
            h.feed()?;
            h.check_counts()?;
            if eager {
                h.check_watermark()?;
            }
        }
        for pick in tail.iter().cycle() {
            if h.outstanding.is_empty() {
                break;
            }
            h.ack(*pick);
            h.check_counts()?;
            if eager {
                h.check_watermark()?;
            }
        }

        h.check_watermark()?;
        let max_end = h.model.units.iter().map(|u| u.end).fold(start, u64::max);
        let expected = max_end.max(h.applied_keepalive);
        prop_assert_eq!(h.tracker.watermark(), Lsn(expected));
        prop_assert_eq!(h.tracker.in_flight(), 0);
        prop_assert_eq!(h.tracker.open_units(), 0);
    }
}
