//! The SQL emitter API: `factlib.emit`, `factlib.emit_json` and
//! `factlib.emit_traced`, PL/pgSQL functions that build the envelope in the
//! database (`sql_api.sql`), installed by `factlib setup` as a versioned
//! [`Script`] (see `crate::schema`).
//!
//! ```text
//!  setup ──Script::install (version factlib.api_version())──► CREATE OR REPLACE …
//!  service tx ──SELECT factlib.emit(…)──► pg_logical_emit_message(true, prefix, envelope)
//! ```
//!
//! **Invariants**
//! - The SQL file and [`VERSION`] agree (a unit test reads the file).

use crate::schema::Script;

/// The SQL that creates the API; it sets `factlib.api_version()`.
const SQL: &str = include_str!("sql_api.sql");

/// The version of the API in [`SQL`].
pub(crate) const VERSION: i32 = 1;

/// The public functions the API creates, for messages.
pub(crate) const FUNCTIONS: &str = "factlib.emit, factlib.emit_json, factlib.emit_traced";

/// The API as `factlib setup` installs it.
pub(crate) const SCRIPT: Script = Script {
    what: "the SQL API",
    sql: SQL,
    version: VERSION,
    version_fn: "factlib.api_version()",
    // The bytes of "factlib1".
    lock_key: 0x6661_6374_6c69_6231,
    meanwhile: ", and use --sql-api none meanwhile",
};

#[cfg(test)]
mod tests {
    use super::*;

    /// The file's `factlib.api_version()` returns [`VERSION`].
    #[test]
    fn sql_file_declares_this_version() {
        assert_eq!(SCRIPT.declared_version(), Some(VERSION));
    }

    /// Every public function named in messages is created by the file.
    #[test]
    fn sql_file_creates_the_named_functions() {
        for f in FUNCTIONS.split(", ") {
            assert!(
                SQL.contains(&format!("CREATE OR REPLACE FUNCTION {f}(")),
                "{f} is not created by sql_api.sql"
            );
        }
    }
}
