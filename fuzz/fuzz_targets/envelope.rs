//! Fact envelope (protobuf) decoders.
//!
//! The relay's zero-copy view (`fact::decode_view`) must agree with prost on
//! every input: both fail, or both give the same fact. Anything that decodes
//! must survive encode → decode unchanged, re-encode to the same bytes, and
//! keep `payload` a zero-copy slice of the input.
#![no_main]

use bytes::Bytes;
use factlib::fact;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let input = Bytes::copy_from_slice(data);
    let prost = fact::decode(input.clone());
    let view = fact::decode_view(input.clone());
    match (&prost, &view) {
        (Ok(p), Ok(v)) => assert_eq!(*p, v.to_fact(), "the view and prost disagree"),
        (Err(_), Err(_)) => {}
        (p, v) => panic!("prost gave {p:?}, the view gave {v:?}"),
    }
    let Ok(f) = prost else { return };

    if !f.payload.is_empty() {
        let o = input.as_ptr() as usize;
        let p = f.payload.as_ptr() as usize;
        assert!(
            p >= o && p + f.payload.len() <= o + input.len(),
            "payload is not a zero-copy slice of the input"
        );
    }

    let encoded = fact::encode(&f);
    let again = fact::decode(Bytes::from(encoded.clone()))
        .unwrap_or_else(|e| panic!("re-encoded fact does not decode: {e}"));
    assert_eq!(f, again, "encode/decode round trip changed the fact");
    assert_eq!(encoded, fact::encode(&again), "re-encoding is not stable");
});
