//! The inbox schema (`schema.sql`): `factlib.inbox`, its offsets, dead
//! letters and claims, and `factlib.inbox_claim`, installed by `factlib
//! inbox setup` as a versioned [`Script`].
//!
//! **Invariants**
//! - The SQL file and [`VERSION`] agree (a unit test reads the file).
//! - `factlib inbox` starts only on the version it was built for.

use tokio_postgres::Client;

use super::InboxError;
use crate::schema::Script;

/// The SQL that creates the schema; it sets `factlib.inbox_version()`.
const SQL: &str = include_str!("schema.sql");

/// The version of the schema in [`SQL`].
pub(crate) const VERSION: i32 = 2;

/// The schema as `factlib inbox setup` installs it.
pub(crate) const SCRIPT: Script = Script {
    what: "the inbox schema",
    sql: SQL,
    version: VERSION,
    version_fn: "factlib.inbox_version()",
    // The bytes of "factinb1".
    lock_key: 0x6661_6374_696e_6231,
    meanwhile: "",
};

/// Checks that the inbox schema is installed at [`VERSION`].
pub(crate) async fn check(client: &Client) -> Result<(), InboxError> {
    let row = client
        .query_one(
            "SELECT to_regprocedure('factlib.inbox_version()') IS NOT NULL",
            &[],
        )
        .await
        .map_err(|e| InboxError::db("looking up the inbox schema", e))?;
    if !row.get::<_, bool>(0) {
        return Err(InboxError::Schema(
            "the inbox schema is not installed in the inbox database: run `factlib inbox setup` (with the same --inbox-database-url)".into(),
        ));
    }
    let found: i32 = client
        .query_one("SELECT factlib.inbox_version()", &[])
        .await
        .map_err(|e| InboxError::db("reading factlib.inbox_version()", e))?
        .get(0);
    if found != VERSION {
        return Err(InboxError::Schema(format!(
            "the inbox schema is v{found}, this factlib needs v{VERSION}: {}",
            if found < VERSION {
                "run `factlib inbox setup` to upgrade it"
            } else {
                "upgrade factlib"
            }
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sql_file_declares_this_version() {
        assert_eq!(SCRIPT.declared_version(), Some(VERSION));
    }
}
