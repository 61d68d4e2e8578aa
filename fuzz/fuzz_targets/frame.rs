//! Backend framing + CopyBoth sub-protocol.
//!
//! Feeds the input to `backend::parse` three ways — whole, in two chunks split
//! at a data-derived point, and (for small inputs) one byte at a time — and
//! asserts that every way yields the same frames at the same offsets and ends
//! the same way. Framing by runs (`backend::parse_run`, as the relay's reader
//! does) must give the same frames at the same offsets, and each run's
//! bodies are decoded in place (`ReplicationRef`, `PgOutputRef`, the
//! envelope view) and checked against the owned decoders. Every CopyData
//! body goes through `ReplicationMessage::parse`,
//! and XLogData payloads further through pgoutput and the fact envelope, so
//! the whole decode pipeline is exercised from raw socket bytes.
#![no_main]

use bytes::{Bytes, BytesMut};
use factlib::fact;
use factlib::pgwire::backend::{self, Backend, DEFAULT_MAX_FRAME};
use factlib::pgwire::pgoutput::{PgOutput, PgOutputRef};
use factlib::pgwire::replication::{ReplicationMessage, ReplicationRef};
use factlib::pgwire::DecodeError;
use libfuzzer_sys::fuzz_target;

/// Byte-at-a-time feeding is O(n) parse calls; only do it for small inputs.
const BYTEWISE_MAX: usize = 4096;

/// What one `parse` call produced, with the absolute stream offset reached.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    /// A frame; `end` is the stream offset just after it.
    Frame { end: usize, frame: Frame },
    /// `parse` failed with the first `start` bytes consumed before the call.
    Error { start: usize, err: DecodeError },
    /// All input fed; `parse` wants more. `consumed` bytes were used.
    NeedMore { consumed: usize },
}

#[derive(Debug, PartialEq, Eq)]
enum Frame {
    CopyData(Bytes),
    /// Everything else, by its Debug form (lossy for `Other`, but the
    /// offsets pin down which bytes it came from).
    Other(String),
}

/// A stream decoder fed in arbitrary chunks, recording its events.
struct Feeder {
    buf: BytesMut,
    fed: usize,
    events: Vec<Event>,
    done: bool,
    /// Frame with `parse_run` (as the relay's reader does), not `parse`.
    runs: bool,
}

impl Feeder {
    fn new(runs: bool) -> Self {
        Feeder { buf: BytesMut::new(), fed: 0, events: Vec::new(), done: false, runs }
    }

    /// Appends a chunk and parses every frame now complete.
    fn feed(&mut self, chunk: &[u8]) {
        if self.done {
            return;
        }
        self.buf.extend_from_slice(chunk);
        self.fed += chunk.len();
        loop {
            let start = self.fed - self.buf.len();
            let before = self.buf.len();
            let parsed = if self.runs {
                backend::parse_run(&mut self.buf, DEFAULT_MAX_FRAME)
            } else {
                backend::parse(&mut self.buf, DEFAULT_MAX_FRAME)
            };
            match parsed {
                Ok(None) => {
                    assert_eq!(self.buf.len(), before, "Ok(None) must consume nothing");
                    return;
                }
                Ok(Some(msg)) => {
                    assert!(self.buf.len() < before, "a frame must consume bytes");
                    let end = self.fed - self.buf.len();
                    let frame = match msg {
                        Backend::CopyRun(mut run) => {
                            // One event per message, at the offset each ends.
                            let mut at = start;
                            while let Some(body) = run.next_body() {
                                decode_in_place(run.bytes(), body.clone());
                                at += body.len() + 5;
                                let b = run.bytes().slice(body);
                                self.events.push(Event::Frame { end: at, frame: Frame::CopyData(b) });
                            }
                            assert_eq!(at, end, "a run's messages cover it exactly");
                            continue;
                        }
                        Backend::CopyData(b) => {
                            assert!(!self.runs, "parse_run never returns a lone CopyData");
                            assert_eq!(b.len() + 5, end - start, "CopyData body length");
                            Frame::CopyData(b)
                        }
                        other => Frame::Other(format!("{other:?}")),
                    };
                    self.events.push(Event::Frame { end, frame });
                }
                Err(err) => {
                    self.events.push(Event::Error { start, err });
                    self.done = true;
                    return;
                }
            }
        }
    }

    fn finish(mut self) -> Vec<Event> {
        if !self.done {
            let consumed = self.fed - self.buf.len();
            self.events.push(Event::NeedMore { consumed });
        }
        self.events
    }
}

/// Decodes a CopyData body the way the relay does, down to the envelope.
fn decode_copy_data(body: &Bytes) {
    let Ok(msg) = ReplicationMessage::parse(body.clone()) else { return };
    let ReplicationMessage::XLogData(x) = msg else { return };
    assert_eq!(x.data.len() + 25, body.len(), "XLogData header is 25 bytes");
    if let Ok(PgOutput::Message(m)) = PgOutput::decode(x.data.clone()) {
        if &m.prefix[..] == fact::DEFAULT_PREFIX.as_bytes() {
            let _ = fact::decode(m.content);
        }
    }
}

/// Decodes a CopyData body in place, the way the relay does, down to the
/// envelope view; the owned decoders must agree with it.
fn decode_in_place(run: &Bytes, body: std::ops::Range<usize>) {
    let Ok(ReplicationRef::XLogData(x)) = ReplicationRef::parse(&run[body.clone()]) else { return };
    let owned = PgOutput::decode(run.slice_ref(x.data));
    match PgOutputRef::decode(x.data) {
        Ok(PgOutputRef::Message(m)) => {
            let Ok(PgOutput::Message(o)) = owned else { panic!("decoders disagree") };
            assert_eq!((m.prefix, m.content), (&o.prefix[..], &o.content[..]));
            if m.prefix == fact::DEFAULT_PREFIX.as_bytes() {
                let _ = fact::view::decode_view(run.slice_ref(m.content));
            }
        }
        Ok(PgOutputRef::Begin(b)) => assert_eq!(owned, Ok(PgOutput::Begin(b))),
        Ok(PgOutputRef::Commit(c)) => assert_eq!(owned, Ok(PgOutput::Commit(c))),
        Ok(PgOutputRef::Other) => {}
        Err(e) => assert_eq!(owned, Err(e)),
    }
}

fuzz_target!(|data: &[u8]| {
    // Whole input at once.
    let mut whole = Feeder::new(false);
    whole.feed(data);
    let whole = whole.finish();

    // In runs, whole and in two chunks: the same frames at the same offsets.
    let mut runs = Feeder::new(true);
    runs.feed(data);
    assert_eq!(whole, runs.finish(), "framing by runs changed the frames");
    for ev in &whole {
        if let Event::Frame { frame: Frame::CopyData(b), .. } = ev {
            decode_copy_data(b);
        }
    }

    // Two chunks, split where the last two input bytes say.
    let split = match data {
        [.., a, b] => usize::from(u16::from_be_bytes([*a, *b])) % (data.len() + 1),
        _ => data.len() / 2,
    };
    for runs in [false, true] {
        let mut two = Feeder::new(runs);
        two.feed(&data[..split]);
        two.feed(&data[split..]);
        assert_eq!(whole, two.finish(), "chunking at {split} changed the frames (runs: {runs})");
    }

    // One byte at a time.
    if data.len() <= BYTEWISE_MAX {
        let mut bytewise = Feeder::new(false);
        for b in data.chunks(1) {
            bytewise.feed(b);
        }
        assert_eq!(whole, bytewise.finish(), "byte-at-a-time feeding changed the frames");
    }
});
