//! Input shared by the benches: golden fixtures (captured from PostgreSQL
//! 15, see tests/fixtures/README.md) repeated to about 8 MiB.

use bytes::BytesMut;
use factlib::pgwire::backend::{self, Backend, DEFAULT_MAX_FRAME};
use factlib::pgwire::replication::ReplicationMessage;

/// How long the repeated streams are, at least.
const STREAM_LEN: usize = 8 << 20;

/// The `mixed` fixture's backend frames, repeated to about 8 MiB: facts,
/// other prefixes, lone messages, a rolled-back and an empty transaction.
pub fn fixture_stream() -> Vec<u8> {
    repeat(&fixture("mixed"))
}

/// What a relay's publication (messages only) streams when every
/// transaction emits one fact: the `single_fact` fixture's Begin, Message
/// and Commit frames (its keepalives dropped), repeated to about 8 MiB.
#[allow(dead_code)] // not every bench that shares this module uses it
pub fn relay_stream() -> Vec<u8> {
    let one = fixture("single_fact");
    let mut buf = BytesMut::from(&one[..]);
    let (mut txn, mut tags, mut at) = (Vec::new(), Vec::new(), 0);
    while let Some(m) = backend::parse(&mut buf, DEFAULT_MAX_FRAME).expect("golden frames parse") {
        let end = one.len() - buf.len();
        if let Backend::CopyData(body) = m {
            if let Ok(ReplicationMessage::XLogData(x)) = ReplicationMessage::parse(body) {
                tags.push(*x.data.first().expect("a pgoutput tag"));
                txn.extend_from_slice(one.get(at..end).expect("the frame just parsed"));
            }
        }
        at = end;
    }
    assert_eq!(
        tags, b"BMC",
        "single_fact holds one transaction of one fact"
    );
    repeat(&txn)
}

/// A golden fixture's stream, `tests/fixtures/pg15/<name>.stream`.
fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/fixtures/pg15/{name}.stream",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("golden fixture {path}: {e}"))
}

/// `one` repeated to at least [`STREAM_LEN`] bytes.
fn repeat(one: &[u8]) -> Vec<u8> {
    assert!(!one.is_empty(), "an empty stream repeats forever");
    let mut all = Vec::with_capacity(STREAM_LEN + one.len());
    while all.len() < STREAM_LEN {
        all.extend_from_slice(one);
    }
    all
}
