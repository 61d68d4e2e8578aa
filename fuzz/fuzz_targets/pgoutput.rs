//! pgoutput message decoder.
//!
//! Decodes the input (one XLogData payload) in both stream contexts and
//! checks the cheap invariants: the decoded tag is the first input byte,
//! messages without a streamed xid decode identically in both contexts, the
//! streamed xid is present exactly when the context says so, and the
//! logical message's prefix and content are zero-copy slices of the input.
#![no_main]

use bytes::Bytes;
use factlib::pgwire::pgoutput::{DecodeContext, PgOutput};
use libfuzzer_sys::fuzz_target;

const PLAIN: DecodeContext = DecodeContext { in_streamed_txn: false };
const STREAMED: DecodeContext = DecodeContext { in_streamed_txn: true };

/// The streamed xid of messages that carry one, `None` for the others.
fn streamed_xid(m: &PgOutput) -> Option<Option<u32>> {
    match m {
        PgOutput::Message(m) => Some(m.xid),
        PgOutput::Relation(m) => Some(m.xid),
        PgOutput::Type(m) => Some(m.xid),
        PgOutput::Insert(m) => Some(m.xid),
        PgOutput::Update(m) => Some(m.xid),
        PgOutput::Delete(m) => Some(m.xid),
        PgOutput::Truncate(m) => Some(m.xid),
        _ => None,
    }
}

fn within(outer: &Bytes, inner: &Bytes) -> bool {
    if inner.is_empty() {
        return true;
    }
    let o = outer.as_ptr() as usize;
    let i = inner.as_ptr() as usize;
    i >= o && i + inner.len() <= o + outer.len()
}

fn check(input: &Bytes, ctx: DecodeContext, m: &PgOutput) {
    assert_eq!(m.tag(), input[0], "tag() must be the wire tag");
    if let Some(xid) = streamed_xid(m) {
        assert_eq!(xid.is_some(), ctx.in_streamed_txn, "streamed xid presence");
    }
    if let PgOutput::Message(lm) = m {
        assert!(within(input, &lm.prefix), "prefix is not a slice of the input");
        assert!(within(input, &lm.content), "content is not a slice of the input");
    }
}

fuzz_target!(|data: &[u8]| {
    let input = Bytes::copy_from_slice(data);
    let plain = PgOutput::decode(input.clone(), PLAIN);
    let streamed = PgOutput::decode(input.clone(), STREAMED);
    if let Ok(m) = &plain {
        check(&input, PLAIN, m);
    }
    if let Ok(m) = &streamed {
        check(&input, STREAMED, m);
    }
    // Messages without a streamed xid do not depend on the context.
    let ctx_free = |r: &Result<PgOutput, _>| r.as_ref().is_ok_and(|m| streamed_xid(m).is_none());
    if ctx_free(&plain) || ctx_free(&streamed) {
        assert_eq!(plain, streamed, "context changed a message without a streamed xid");
    }
});
