//! Where each fact goes: topic, partition and ring, in one place.
//!
//! ```text
//!  FactView ──(same types as the last fact? reuse its topic)──► topic
//!           └─ template.render(prefix, aggregate_type, event_type) ──► topic
//!  topic known? ── no ──► Routed::Unknown(topic): the caller looks its partition count up, then learn()
//!           └─ yes ──► partition = murmur2(aggregate_id) % partitions
//!                      ring = (topic's first ring + partition) % rings
//! ```
//!
//! The router is pure: it never waits for Kafka. Partition counts come in
//! through [`Router::learn`].
//!
//! **Invariants**
//! - A topic's partition count and first ring are fixed once learned, so a
//!   key maps to one partition and one ring for the whole run, and facts
//!   with the same key keep their order.
//! - Consecutive topics' partitions take consecutive rings, so the
//!   partitions of a topic spread over the rings.
//! - No fact is routed to a reserved topic ([`super::topic::is_reserved`]).

use std::collections::HashMap;
use std::sync::Arc;

use super::murmur2::partition_for_key;
use super::topic::{dlq_topic, TopicTemplate};
use super::RouteError;
use crate::fact::{FactView, TextField};

/// Where a record goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// The topic, shared by every record to it.
    pub topic: Arc<str>,
    /// The partition (Java-compatible murmur2 of the key).
    pub partition: i32,
    /// The ring that carries it to its flusher.
    pub ring: usize,
}

/// The answer to [`Router::route`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routed {
    /// Ready to go.
    To(Destination),
    /// The topic's partition count is not known yet: look it up, call
    /// [`Router::learn`], and route again.
    Unknown(String),
}

/// A topic the router has learned.
#[derive(Debug, Clone)]
struct Topic {
    name: Arc<str>,
    partitions: u32,
    first_ring: usize,
}

/// The last fact's types and their topic: a transaction's facts are often
/// about one aggregate type, and this skips the render and the lookups.
#[derive(Debug)]
struct Memo {
    aggregate_type: Box<[u8]>,
    event_type: Box<[u8]>,
    topic: Topic,
}

/// Routes facts: topic from the template, partition from the key, ring
/// from the partition.
#[derive(Debug)]
pub struct Router {
    prefix: String,
    template: TopicTemplate,
    rings: usize,
    topics: HashMap<String, Topic>,
    next_ring: usize,
    memo: Option<Memo>,
}

impl Router {
    /// A router for facts under `prefix` over `rings` rings. Fails if the
    /// template can never route a fact (see [`TopicTemplate::check`]).
    pub fn new(prefix: &str, template: TopicTemplate, rings: usize) -> Result<Self, RouteError> {
        template.check(prefix)?;
        if rings == 0 {
            return Err(RouteError::Rings("at least one ring is needed".into()));
        }
        Ok(Router {
            prefix: prefix.to_owned(),
            template,
            rings,
            topics: HashMap::new(),
            next_ring: 0,
            memo: None,
        })
    }

    /// Where `fact` goes. A [`RouteError`] is definite for the fact (its
    /// types make no legal topic): it belongs in the dead-letter topic.
    pub fn route(&mut self, fact: &FactView) -> Result<Routed, RouteError> {
        let key = fact.utf8(TextField::AggregateId);
        if let Some(m) = &self.memo {
            if *m.aggregate_type == *fact.utf8(TextField::AggregateType)
                && *m.event_type == *fact.utf8(TextField::EventType)
            {
                return Ok(Routed::To(self.destination(&m.topic, key)));
            }
        }
        let name = self
            .template
            .render(&self.prefix, fact.aggregate_type(), fact.event_type())?;
        let Some(topic) = self.topics.get(&name).cloned() else {
            return Ok(Routed::Unknown(name));
        };
        let to = self.destination(&topic, key);
        self.memo = Some(Memo {
            aggregate_type: fact.utf8(TextField::AggregateType).into(),
            event_type: fact.utf8(TextField::EventType).into(),
            topic,
        });
        Ok(Routed::To(to))
    }

    /// Where a dead letter goes: partition 0 of the dead-letter topic.
    pub fn dead_letter(&self) -> Routed {
        let name = dlq_topic(&self.prefix);
        match self.topics.get(&name) {
            Some(topic) => Routed::To(self.destination(topic, &[])),
            None => Routed::Unknown(name),
        }
    }

    /// Records `topic`'s partition count (at least 1). A topic learned
    /// before keeps its first count.
    pub fn learn(&mut self, topic: &str, partitions: u32) {
        if self.topics.contains_key(topic) {
            return;
        }
        let partitions = partitions.max(1);
        let first_ring = self.next_ring;
        self.next_ring = (self.next_ring + usize::try_from(partitions).unwrap_or(1)) % self.rings;
        self.topics.insert(
            topic.to_owned(),
            Topic {
                name: Arc::from(topic),
                partitions,
                first_ring,
            },
        );
    }

    fn destination(&self, topic: &Topic, key: &[u8]) -> Destination {
        // A dead letter has no key and goes to partition 0.
        let partition = if key.is_empty() {
            0
        } else {
            partition_for_key(key, topic.partitions)
        };
        let p = usize::try_from(partition).unwrap_or(0);
        Destination {
            topic: Arc::clone(&topic.name),
            partition: i32::try_from(partition).unwrap_or(0),
            ring: (topic.first_ring + p) % self.rings,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fact::{decode_view, encode, Fact};
    use bytes::Bytes;

    fn view(agg_type: &str, agg: &str, event: &str) -> FactView {
        decode_view(Bytes::from(encode(&Fact {
            id: "i".into(),
            aggregate_type: agg_type.into(),
            aggregate_id: agg.into(),
            event_type: event.into(),
            ..Fact::default()
        })))
        .unwrap()
    }

    fn to(r: Result<Routed, RouteError>) -> Destination {
        match r.unwrap() {
            Routed::To(d) => d,
            other => panic!("not routed: {other:?}"),
        }
    }

    #[test]
    fn unknown_topics_are_asked_for_then_routed_by_key() {
        let mut r = Router::new("p", TopicTemplate::default(), 8).unwrap();
        let f = view("order", "o-1", "placed");
        assert_eq!(r.route(&f), Ok(Routed::Unknown("p.order".into())));
        r.learn("p.order", 6);
        let d = to(r.route(&f));
        assert_eq!(&*d.topic, "p.order");
        let want = partition_for_key(b"o-1", 6);
        assert_eq!(d.partition, i32::try_from(want).unwrap());
        assert_eq!(d.ring, usize::try_from(want).unwrap());
        // The memo gives the same answer for the next fact of the same types.
        assert_eq!(to(r.route(&view("order", "o-1", "placed"))), d);
        let other_key = to(r.route(&view("order", "o-2", "placed")));
        assert_eq!(
            other_key.partition,
            i32::try_from(partition_for_key(b"o-2", 6)).unwrap()
        );
    }

    #[test]
    fn topics_take_consecutive_rings() {
        let mut r = Router::new("p", TopicTemplate::default(), 8).unwrap();
        r.learn("p.a", 6);
        r.learn("p.b", 3);
        r.learn("p.a", 99);
        let dlq = dlq_topic("p");
        assert_eq!(r.dead_letter(), Routed::Unknown(dlq.clone()));
        r.learn(&dlq, 1);
        let d = match r.dead_letter() {
            Routed::To(d) => d,
            other => panic!("{other:?}"),
        };
        // p.a: rings 0..6, p.b: 6, 7, 0; the DLQ's partition 0: ring 1.
        assert_eq!((d.partition, d.ring), (0, 1));
        let b = to(r.route(&view("b", "k", "e")));
        let want = usize::try_from(partition_for_key(b"k", 3)).unwrap();
        assert_eq!(b.ring, (6 + want) % 8);
        let a = to(r.route(&view("a", "k", "e")));
        assert_eq!(
            a.partition,
            i32::try_from(partition_for_key(b"k", 6)).unwrap(),
            "the first partition count stays"
        );
    }

    #[test]
    fn bad_and_reserved_topics_are_errors_for_the_fact() {
        let mut r = Router::new("p", TopicTemplate::default(), 4).unwrap();
        assert!(matches!(
            r.route(&view("dlq", "k", "e")),
            Err(RouteError::Reserved { .. })
        ));
        assert!(matches!(
            r.route(&view("no spaces", "k", "e")),
            Err(RouteError::InvalidTopic { .. })
        ));
        assert!(Router::new("p", TopicTemplate::parse("p.dlq").unwrap(), 4).is_err());
        assert!(Router::new("p", TopicTemplate::default(), 0).is_err());
    }
}
