//! Input shared by the benches: golden fixtures (captured from PostgreSQL
//! 15, see tests/fixtures/README.md) repeated to about 8 MiB.

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
    let mut txn = Vec::new();
    let mut tags = Vec::new();
    let mut rest = &one[..];
    while !rest.is_empty() {
        // A CopyData frame: 'd', Int32 length including itself, body.
        let len = rest
            .get(1..5)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_be_bytes)
            .and_then(|n| usize::try_from(n).ok())
            .expect("a whole frame header");
        let (frame, tail) = rest.split_at_checked(1 + len).expect("a whole frame");
        // The body's first byte: 'w' XLogData (then 24 bytes of LSNs and
        // clock, then the pgoutput tag) or 'k' keepalive.
        if frame.get(5) == Some(&b'w') {
            tags.push(*frame.get(30).expect("a pgoutput tag"));
            txn.extend_from_slice(frame);
        }
        rest = tail;
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
