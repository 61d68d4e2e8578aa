//! Cross-runtime envelope fixtures: bytes written by the real Python
//! (`protobuf`, upb) and Go (`google.golang.org/protobuf`) runtimes from
//! `proto/factlib/v1/fact.proto` decode unchanged with `factlib::fact::decode`
//! (`tests/fixtures/emitters/`, see its README.md). No server is needed.
//!
//! ```text
//!  python/<name>.bin, go/<name>.bin, go/<name>.deterministic.bin
//!      ──fact::decode──► Fact  ==?  <lang>/expected.json (values as the emitter set them)
//!      ──fact::encode──► bytes ──fact::decode──► same Fact
//! ```
//!
//! With `FACTLIB_EMITTERS_REENCODED_DIR=DIR` set, the Rust re-encoding of
//! every case is also written to `DIR/<name>.bin`, so that the Python and Go
//! parsers can check it (`make.py --verify DIR`, `go run . -verify DIR`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bytes::Bytes;
use factlib::fact::{self, Fact, TraceInfo};
use serde_json::Value;

const LANGS: [&str; 2] = ["python", "go"];

/// Cases every emitter must write (the same list in `make.py` and `main.go`).
const CASES: [&str; 12] = [
    "full",
    "required_only",
    "empty_payload",
    "created_at_min",
    "created_at_max",
    "created_at_negative",
    "created_at_minus_one",
    "trace_ids_only",
    "trace_empty",
    "many_metadata",
    "large_payload",
    "all_default",
];

fn dir(lang: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/emitters")
        .join(lang)
}

fn expected_doc(lang: &str) -> Value {
    let path = dir(lang).join("expected.json");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

fn facts(doc: &Value) -> &Vec<Value> {
    doc["facts"].as_array().expect("expected.json: facts[]")
}

fn str_field<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("expected.json: {key} is not a string: {v}"))
}

fn string_map(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .unwrap_or_else(|| panic!("expected.json: metadata is not an object: {v}"))
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().expect("metadata value").to_owned()))
        .collect()
}

/// The fact as the emitter set it, from its `expected.json` entry.
fn expected_fact(v: &Value) -> Fact {
    let payload = B64
        .decode(str_field(v, "payload"))
        .expect("expected.json: payload is not base64");
    let trace_info = match &v["trace_info"] {
        Value::Null => None,
        t => Some(TraceInfo {
            trace_id: str_field(t, "trace_id").to_owned(),
            span_id: str_field(t, "span_id").to_owned(),
            metadata: string_map(&t["metadata"]),
        }),
    };
    Fact {
        id: str_field(v, "id").to_owned(),
        aggregate_type: str_field(v, "aggregate_type").to_owned(),
        aggregate_id: str_field(v, "aggregate_id").to_owned(),
        event_type: str_field(v, "event_type").to_owned(),
        payload: Bytes::from(payload),
        created_at: v["created_at"]
            .as_i64()
            .unwrap_or_else(|| panic!("expected.json: created_at is not an i64: {v}")),
        metadata: string_map(&v["metadata"]),
        trace_info,
    }
}

/// Field by field, so that a failure names the field (and does not print a
/// 20 kB payload).
fn assert_fact_eq(what: &str, got: &Fact, want: &Fact) {
    assert_eq!(got.id, want.id, "{what}: id");
    assert_eq!(
        got.aggregate_type, want.aggregate_type,
        "{what}: aggregate_type"
    );
    assert_eq!(got.aggregate_id, want.aggregate_id, "{what}: aggregate_id");
    assert_eq!(got.event_type, want.event_type, "{what}: event_type");
    assert_eq!(
        got.payload.len(),
        want.payload.len(),
        "{what}: payload length"
    );
    if let Some(i) = (0..got.payload.len()).find(|&i| got.payload[i] != want.payload[i]) {
        panic!(
            "{what}: payload differs first at byte {i}: {:#04x} != {:#04x}",
            got.payload[i], want.payload[i]
        );
    }
    assert_eq!(got.created_at, want.created_at, "{what}: created_at");
    assert_eq!(got.metadata, want.metadata, "{what}: metadata");
    assert_eq!(
        got.trace_info.is_some(),
        want.trace_info.is_some(),
        "{what}: trace_info presence"
    );
    assert_eq!(got.trace_info, want.trace_info, "{what}: trace_info");
    assert_eq!(got, want, "{what}");
}

/// Decodes every file of every case of one emitter and checks it against
/// that emitter's `expected.json`; returns how many files were checked.
fn check_emitter(lang: &str) -> usize {
    let doc = expected_doc(lang);
    let mut checked = 0;
    for entry in facts(&doc) {
        let name = str_field(entry, "name");
        let want = expected_fact(&entry["fact"]);
        let files = entry["files"].as_array().expect("expected.json: files[]");
        assert!(!files.is_empty(), "{lang}/{name}: no files");
        for file in files {
            let file = file.as_str().expect("file name");
            let what = format!("{lang}/{file}");
            let raw =
                std::fs::read(dir(lang).join(file)).unwrap_or_else(|e| panic!("read {what}: {e}"));
            let input = Bytes::from(raw);
            let got = fact::decode(input.clone())
                .unwrap_or_else(|e| panic!("{what}: does not decode: {e}"));
            assert_fact_eq(&what, &got, &want);

            // The payload stays a zero-copy slice of the emitter's bytes.
            if !got.payload.is_empty() {
                let range = input.as_ptr() as usize..input.as_ptr() as usize + input.len();
                assert!(
                    range.contains(&(got.payload.as_ptr() as usize)),
                    "{what}: payload must borrow the input"
                );
            }

            // Rust's re-encoding decodes to the same fact.
            let again = fact::decode(Bytes::from(fact::encode(&got)))
                .unwrap_or_else(|e| panic!("{what}: re-encoding does not decode: {e}"));
            assert_fact_eq(&format!("{what} (re-encoded)"), &again, &want);
            checked += 1;
        }
    }
    checked
}

#[test]
fn python_protobuf_bytes_decode_unchanged() {
    let n = check_emitter("python");
    assert_eq!(n, CASES.len(), "python: one file per case");
}

#[test]
fn go_protobuf_bytes_decode_unchanged() {
    let n = check_emitter("go");
    assert_eq!(n, 2 * CASES.len(), "go: plain + deterministic per case");
}

/// Both emitters were given the same values, and cover every case.
#[test]
fn emitters_wrote_the_same_cases() {
    let docs = LANGS.map(expected_doc);
    for (lang, doc) in LANGS.iter().zip(&docs) {
        let names: Vec<&str> = facts(doc).iter().map(|f| str_field(f, "name")).collect();
        assert_eq!(names, CASES, "{lang}: cases");
        assert_eq!(doc["generator"]["language"], *lang, "{lang}: generator");
    }
    for (py, go) in facts(&docs[0]).iter().zip(facts(&docs[1])) {
        assert_eq!(
            py["fact"], go["fact"],
            "{}: python and go values",
            py["name"]
        );
    }
}

/// No fixture file lies around unchecked, and every listed one exists.
#[test]
fn every_fixture_file_is_listed() {
    for lang in LANGS {
        let listed: BTreeSet<String> = facts(&expected_doc(lang))
            .iter()
            .flat_map(|f| f["files"].as_array().expect("files[]").iter())
            .map(|f| f.as_str().expect("file name").to_owned())
            .collect();
        let on_disk: BTreeSet<String> = std::fs::read_dir(dir(lang))
            .expect("read fixture dir")
            .map(|e| e.expect("dir entry").file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".bin"))
            .collect();
        assert_eq!(listed, on_disk, "{lang}: .bin files vs expected.json");
    }
}

/// The canonical form agrees: the Go emitter's deterministic bytes are
/// exactly what prost writes for the same fact, except where a map entry has
/// an empty key or value — prost leaves those defaults out of the entry,
/// Go writes them; both forms are valid and decode to the same fact.
#[test]
fn prost_encoding_matches_go_deterministic() {
    let doc = expected_doc("go");
    for entry in facts(&doc) {
        let name = str_field(entry, "name");
        let want = expected_fact(&entry["fact"]);
        let go = std::fs::read(dir("go").join(format!("{name}.deterministic.bin")))
            .expect("read deterministic fixture");
        let rust = fact::encode(&want);
        let empty_in_map =
            |m: &BTreeMap<String, String>| m.iter().any(|(k, v)| k.is_empty() || v.is_empty());
        let has_empty_entry = empty_in_map(&want.metadata)
            || want
                .trace_info
                .as_ref()
                .is_some_and(|t| empty_in_map(&t.metadata));
        if has_empty_entry {
            assert!(
                rust.len() < go.len(),
                "go/{name}: prost omits default entry fields"
            );
        } else {
            assert_eq!(rust, go, "go/{name}.deterministic.bin vs prost");
        }
    }
}

/// Optional: `FACTLIB_EMITTERS_REENCODED_DIR=DIR` writes the Rust encoding of
/// every case to `DIR/<name>.bin` for the Python and Go parsers to check.
#[test]
fn write_reencoded_for_other_parsers() {
    let Some(out) = std::env::var_os("FACTLIB_EMITTERS_REENCODED_DIR") else {
        return;
    };
    let out = PathBuf::from(out);
    std::fs::create_dir_all(&out).expect("create FACTLIB_EMITTERS_REENCODED_DIR");
    for entry in facts(&expected_doc("python")) {
        let name = str_field(entry, "name");
        let raw = std::fs::read(dir("python").join(format!("{name}.bin"))).expect("read fixture");
        let decoded = fact::decode(Bytes::from(raw)).expect("decode");
        std::fs::write(out.join(format!("{name}.bin")), fact::encode(&decoded))
            .expect("write re-encoded");
    }
}
