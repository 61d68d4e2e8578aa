//! pgoutput message decoder.
//!
//! Decodes the input (one XLogData payload) and checks the cheap
//! invariants: the decoded tag is the first input byte, the borrowed decoder
//! (`PgOutputRef`) agrees with the owned one, and the logical message's
//! prefix and content are zero-copy slices of the input.
#![no_main]

use bytes::Bytes;
use factlib::pgwire::pgoutput::{PgOutput, PgOutputRef};
use libfuzzer_sys::fuzz_target;

fn within(outer: &Bytes, inner: &Bytes) -> bool {
    if inner.is_empty() {
        return true;
    }
    let o = outer.as_ptr() as usize;
    let i = inner.as_ptr() as usize;
    i >= o && i + inner.len() <= o + outer.len()
}

fn check(input: &Bytes, m: &PgOutput) {
    assert_eq!(m.tag(), input[0], "tag() must be the wire tag");
    if let PgOutput::Message(lm) = m {
        assert!(within(input, &lm.prefix), "prefix is not a slice of the input");
        assert!(within(input, &lm.content), "content is not a slice of the input");
    }
}

fuzz_target!(|data: &[u8]| {
    let input = Bytes::copy_from_slice(data);
    let owned = PgOutput::decode(input.clone());
    if let Ok(m) = &owned {
        check(&input, m);
    }
    match PgOutputRef::decode(data) {
        Ok(PgOutputRef::Begin(b)) => assert_eq!(owned, Ok(PgOutput::Begin(b))),
        Ok(PgOutputRef::Commit(c)) => assert_eq!(owned, Ok(PgOutput::Commit(c))),
        Ok(PgOutputRef::Message(m)) => {
            let Ok(PgOutput::Message(o)) = &owned else { panic!("decoders disagree") };
            assert_eq!((m.prefix, m.content), (&o.prefix[..], &o.content[..]));
        }
        Ok(PgOutputRef::Other) => {}
        Err(e) => assert_eq!(owned, Err(e)),
    }
});
