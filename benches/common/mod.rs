//! Input shared by the benches: the golden `mixed` fixture (captured from
//! PostgreSQL 15, see tests/fixtures/README.md) repeated to about 8 MiB.

/// The `mixed` fixture's backend frames, repeated to about 8 MiB.
pub fn fixture_stream() -> Vec<u8> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/pg15/mixed.stream"
    );
    let one = std::fs::read(path).expect("golden fixture tests/fixtures/pg15/mixed.stream");
    let mut all = Vec::with_capacity(8 << 20);
    while all.len() < (8 << 20) {
        all.extend_from_slice(&one);
    }
    all
}
