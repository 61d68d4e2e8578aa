//! Topic names: a template parsed once, rendered per fact, and checked
//! against Kafka's rules for topic names.
//!
//! ```text
//!  "{prefix}.{aggregate_type}" ──parse──► TopicTemplate ──render("factlib", "order", …)──► "factlib.order"
//! ```
//!
//! **Invariants**
//! - A template only names the placeholders in [`PLACEHOLDERS`]; anything
//!   else is rejected when it is parsed, not when the first fact arrives.
//! - [`TopicTemplate::render`] only returns legal Kafka topic names
//!   (1..=249 characters of `[a-zA-Z0-9._-]`, not `.` or `..`). A fact whose
//!   fields would make an illegal name gets a [`RouteError`], and the relay
//!   sends it to the dead-letter topic.

use super::RouteError;

/// The template used when none is configured.
pub const DEFAULT_TEMPLATE: &str = "{prefix}.{aggregate_type}";

/// The placeholders a template may use, with their braces.
pub const PLACEHOLDERS: [&str; 3] = ["{prefix}", "{aggregate_type}", "{event_type}"];

/// The longest legal Kafka topic name (`Topic.MAX_NAME_LENGTH`).
pub const MAX_TOPIC_LEN: usize = 249;

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Prefix,
    AggregateType,
    EventType,
}

/// A parsed topic template such as `{prefix}.{aggregate_type}`.
///
/// Parse it once at startup with [`TopicTemplate::parse`]; rendering is a
/// concatenation plus a validity check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    source: String,
    parts: Vec<Part>,
}

impl Default for TopicTemplate {
    /// The [`DEFAULT_TEMPLATE`], `{prefix}.{aggregate_type}`.
    fn default() -> Self {
        Self {
            source: DEFAULT_TEMPLATE.to_owned(),
            parts: vec![
                Part::Prefix,
                Part::Literal(".".to_owned()),
                Part::AggregateType,
            ],
        }
    }
}

impl TopicTemplate {
    /// Parses a template. Placeholders are `{prefix}`, `{aggregate_type}`
    /// and `{event_type}`; every other character must be legal in a topic
    /// name (`[a-zA-Z0-9._-]`), so braces never need escaping.
    ///
    /// Fails on an empty template, an unknown placeholder, an unbalanced
    /// brace, or a character Kafka does not allow in topic names.
    pub fn parse(template: &str) -> Result<Self, RouteError> {
        let err = |reason: String| RouteError::Template {
            template: template.to_owned(),
            reason,
        };
        if template.is_empty() {
            return Err(err("the template is empty".to_owned()));
        }
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = template.char_indices();
        while let Some((at, c)) = rest.next() {
            match c {
                '{' => {
                    let body_start = at + 1;
                    let mut close = None;
                    for (i, c) in rest.by_ref() {
                        match c {
                            '}' => {
                                close = Some(i);
                                break;
                            }
                            '{' => {
                                return Err(err(format!(
                                    "unbalanced '{{' at byte {at}: a placeholder is not closed before the next '{{'"
                                )))
                            }
                            _ => {}
                        }
                    }
                    let Some(close) = close else {
                        return Err(err(format!(
                            "unbalanced '{{' at byte {at}: no closing '}}'"
                        )));
                    };
                    let name = &template[body_start..close];
                    let part = match name {
                        "prefix" => Part::Prefix,
                        "aggregate_type" => Part::AggregateType,
                        "event_type" => Part::EventType,
                        _ => {
                            return Err(err(format!("unknown placeholder {{{name}}}")));
                        }
                    };
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(part);
                }
                '}' => {
                    return Err(err(format!(
                        "unbalanced '}}' at byte {at}: no opening '{{'"
                    )));
                }
                c if is_legal_topic_char(c) => literal.push(c),
                c => {
                    return Err(err(format!(
                        "{c:?} at byte {at} is not allowed in a Kafka topic name (only a-z, A-Z, 0-9, '.', '_' and '-')"
                    )));
                }
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Self {
            source: template.to_owned(),
            parts,
        })
    }

    /// The template as it was written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// True if the template uses `{event_type}`, so facts of one aggregate
    /// type may go to several topics.
    pub fn uses_event_type(&self) -> bool {
        self.parts.contains(&Part::EventType)
    }

    /// The topic for a fact.
    ///
    /// Fails with [`RouteError::InvalidTopic`] when a value the template
    /// uses is empty, or the result is not a legal Kafka topic name, e.g.
    /// because `aggregate_type` contains a space or a `/`, or makes the name
    /// longer than 249 characters. That is definite for the fact: it goes to the DLQ.
    pub fn render(
        &self,
        prefix: &str,
        aggregate_type: &str,
        event_type: &str,
    ) -> Result<String, RouteError> {
        let len = self
            .parts
            .iter()
            .map(|p| match p {
                Part::Literal(s) => s.len(),
                Part::Prefix => prefix.len(),
                Part::AggregateType => aggregate_type.len(),
                Part::EventType => event_type.len(),
            })
            .fold(0usize, usize::saturating_add);
        let mut topic = String::with_capacity(len.min(MAX_TOPIC_LEN.saturating_add(1)));
        let mut empty = None;
        for part in &self.parts {
            let (value, name) = match part {
                Part::Literal(s) => (s.as_str(), ""),
                Part::Prefix => (prefix, "prefix"),
                Part::AggregateType => (aggregate_type, "aggregate_type"),
                Part::EventType => (event_type, "event_type"),
            };
            if value.is_empty() && empty.is_none() {
                empty = Some(name);
            }
            topic.push_str(value);
        }
        if let Some(name) = empty {
            // Legal or not ("factlib." is), a topic missing a part is wrong.
            return Err(RouteError::InvalidTopic {
                topic,
                reason: format!("{{{name}}} is empty"),
            });
        }
        validate_topic(&topic)?;
        if is_reserved(prefix, &topic) {
            return Err(RouteError::Reserved { topic });
        }
        Ok(topic)
    }

    /// Checks the template for `prefix` at startup: one that always renders
    /// to a reserved topic (it uses neither `{aggregate_type}` nor
    /// `{event_type}`) can never route a fact.
    pub fn check(&self, prefix: &str) -> Result<(), RouteError> {
        if self.parts.contains(&Part::AggregateType) || self.uses_event_type() {
            return Ok(());
        }
        match self.render(prefix, "-", "-") {
            Err(RouteError::Reserved { topic }) => Err(RouteError::Template {
                template: self.source.clone(),
                reason: format!(
                    "it always renders to {topic:?}, a topic Factlib reserves for its own records"
                ),
            }),
            _ => Ok(()),
        }
    }
}

impl std::str::FromStr for TopicTemplate {
    type Err = RouteError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl std::fmt::Display for TopicTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.source)
    }
}

/// The dead-letter topic for a prefix: `{prefix}.dlq`.
pub fn dlq_topic(prefix: &str) -> String {
    format!("{prefix}.{DLQ_SUFFIX}")
}

/// The exactly-once checkpoint topic for a prefix: `{prefix}.checkpoints`.
pub fn checkpoint_topic(prefix: &str) -> String {
    format!("{prefix}.{CHECKPOINT_SUFFIX}")
}

const DLQ_SUFFIX: &str = "dlq";
const CHECKPOINT_SUFFIX: &str = "checkpoints";

/// Topics under `{prefix}.` that Factlib keeps for its own records: the
/// dead letters, and the exactly-once checkpoints.
const RESERVED_SUFFIXES: [&str; 2] = [DLQ_SUFFIX, CHECKPOINT_SUFFIX];

/// True if `topic` is one Factlib keeps for its own records under `prefix`;
/// no fact may be routed there.
pub fn is_reserved(prefix: &str, topic: &str) -> bool {
    topic
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('.'))
        .is_some_and(|suffix| RESERVED_SUFFIXES.contains(&suffix))
}

/// Checks Kafka's rules for a topic name (`org.apache.kafka.common.internals.Topic.validate`):
/// 1..=249 characters of `[a-zA-Z0-9._-]`, and not `.` or `..`.
pub fn validate_topic(topic: &str) -> Result<(), RouteError> {
    let invalid = |reason: String| RouteError::InvalidTopic {
        topic: topic.to_owned(),
        reason,
    };
    if topic.is_empty() {
        return Err(invalid("the name is empty".to_owned()));
    }
    if topic == "." || topic == ".." {
        return Err(invalid("'.' and '..' are reserved".to_owned()));
    }
    // Legal characters are ASCII, so byte length equals character count
    // once the character check has passed.
    if let Some(c) = topic.chars().find(|&c| !is_legal_topic_char(c)) {
        return Err(invalid(format!(
            "{c:?} is not allowed (only a-z, A-Z, 0-9, '.', '_' and '-')"
        )));
    }
    if topic.len() > MAX_TOPIC_LEN {
        return Err(invalid(format!(
            "{} characters, the limit is {MAX_TOPIC_LEN}",
            topic.len()
        )));
    }
    Ok(())
}

fn is_legal_topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(e: RouteError) -> String {
        e.to_string()
    }

    #[test]
    fn default_template_renders_prefix_dot_aggregate_type() {
        let t = TopicTemplate::default();
        assert_eq!(t, TopicTemplate::parse(DEFAULT_TEMPLATE).unwrap());
        assert_eq!(
            t.render("factlib", "order", "order.placed").unwrap(),
            "factlib.order"
        );
        assert!(!t.uses_event_type());
        assert_eq!(t.to_string(), DEFAULT_TEMPLATE);
    }

    #[test]
    fn all_placeholders_and_literals() {
        let t: TopicTemplate = "x-{prefix}_{aggregate_type}.{event_type}.v1"
            .parse()
            .unwrap();
        assert!(t.uses_event_type());
        assert_eq!(
            t.render("p", "order", "placed").unwrap(),
            "x-p_order.placed.v1"
        );
        let t = TopicTemplate::parse("{event_type}{event_type}").unwrap();
        assert_eq!(t.render("p", "a", "e").unwrap(), "ee");
        let t = TopicTemplate::parse("all-facts").unwrap();
        assert_eq!(t.render("p", "a", "e").unwrap(), "all-facts");
    }

    #[test]
    fn unknown_placeholder_names_the_allowed_ones() {
        let msg = reason(TopicTemplate::parse("{prefix}.{aggregate}").unwrap_err());
        assert!(msg.contains("unknown placeholder {aggregate}"), "{msg}");
        for p in PLACEHOLDERS {
            assert!(msg.contains(p), "{msg} should list {p}");
        }
        assert!(TopicTemplate::parse("{}").is_err());
        assert!(TopicTemplate::parse("{PREFIX}").is_err());
    }

    #[test]
    fn unbalanced_braces_are_rejected() {
        for bad in [
            "{prefix",
            "prefix}",
            "{prefix}.{aggregate_type",
            "{pre{fix}",
            "}{prefix}",
            "{",
            "}",
        ] {
            let msg = reason(TopicTemplate::parse(bad).unwrap_err());
            assert!(msg.contains("unbalanced"), "{bad}: {msg}");
            assert!(msg.contains("{aggregate_type}"), "{bad}: {msg}");
        }
    }

    #[test]
    fn illegal_literal_characters_and_empty_template_are_rejected() {
        assert!(TopicTemplate::parse("").is_err());
        assert!(TopicTemplate::parse("{prefix}/{aggregate_type}").is_err());
        assert!(TopicTemplate::parse("{prefix} {aggregate_type}").is_err());
        assert!(TopicTemplate::parse("{prefix}.é").is_err());
    }

    #[test]
    fn render_rejects_illegal_topics() {
        let t = TopicTemplate::default();
        for bad in ["", "has space", "a/b", "ördér", "x\0", "a:b"] {
            let e = t.render("factlib", bad, "e").unwrap_err();
            assert!(matches!(e, RouteError::InvalidTopic { .. }), "{bad:?}: {e}");
        }
        // An unused empty value is fine; a used one is not.
        assert_eq!(t.render("factlib", "order", "").unwrap(), "factlib.order");
        let with_event = TopicTemplate::parse("{prefix}.{aggregate_type}.{event_type}").unwrap();
        let msg = reason(with_event.render("factlib", "order", "").unwrap_err());
        assert!(msg.contains("{event_type} is empty"), "{msg}");
        let t = TopicTemplate::parse("{aggregate_type}").unwrap();
        assert!(t.render("p", "", "e").is_err());
        assert!(t.render("p", ".", "e").is_err());
        assert!(t.render("p", "..", "e").is_err());
        assert_eq!(t.render("p", "...", "e").unwrap(), "...");
    }

    #[test]
    fn length_limit_is_249() {
        let t = TopicTemplate::parse("{aggregate_type}").unwrap();
        let ok = "a".repeat(MAX_TOPIC_LEN);
        assert_eq!(t.render("p", &ok, "e").unwrap(), ok);
        let long = "a".repeat(MAX_TOPIC_LEN + 1);
        let msg = reason(t.render("p", &long, "e").unwrap_err());
        assert!(msg.contains("250 characters"), "{msg}");
        let t = TopicTemplate::default();
        let just = "a".repeat(MAX_TOPIC_LEN - "factlib.".len());
        assert!(t.render("factlib", &just, "e").is_ok());
        assert!(t.render("factlib", &format!("{just}a"), "e").is_err());
    }

    /// The bug: `aggregate_type = "dlq"` rendered to the dead-letter topic.
    #[test]
    fn reserved_topics_are_never_rendered() {
        let t = TopicTemplate::default();
        for agg in ["dlq", "checkpoints"] {
            assert_eq!(
                t.render("p", agg, "e"),
                Err(RouteError::Reserved {
                    topic: format!("p.{agg}")
                })
            );
        }
        assert_eq!(t.render("p", "dlq2", "e").unwrap(), "p.dlq2");
        let other = TopicTemplate::parse("{aggregate_type}.dlq").unwrap();
        assert_eq!(other.render("p", "q", "e").unwrap(), "q.dlq", "not p's");
        assert!(t.check("p").is_ok());
        let constant = TopicTemplate::parse("{prefix}.dlq").unwrap();
        let e = constant.check("p").unwrap_err();
        assert!(e.to_string().contains("reserves"), "{e}");
        assert!(TopicTemplate::parse("{prefix}.all")
            .unwrap()
            .check("p")
            .is_ok());
        assert!(TopicTemplate::parse("p.checkpoints")
            .unwrap()
            .check("p")
            .is_err());
    }

    #[test]
    fn dlq_topic_is_prefix_dot_dlq() {
        assert_eq!(dlq_topic("factlib"), "factlib.dlq");
        assert!(validate_topic(&dlq_topic("factlib")).is_ok());
    }
}
