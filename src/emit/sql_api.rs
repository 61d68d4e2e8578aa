//! The SQL emitter API: `factlib.emit`, `factlib.emit_json` and
//! `factlib.emit_traced`, PL/pgSQL functions that build the envelope in the
//! database (`sql_api.sql`), and their versioned install by `factlib setup`.
//!
//! ```text
//!  setup ──BEGIN; advisory lock; factlib.api_version()?──┬─ same or newer: leave it
//!                                                         └─ missing/older: run sql_api.sql
//!                                                            (CREATE OR REPLACE …); COMMIT
//!  service tx ──SELECT factlib.emit(…)──► pg_logical_emit_message(true, prefix, envelope)
//! ```
//!
//! **Invariants**
//! - The install is one transaction, serialised by an advisory lock, so
//!   concurrent `setup`s never see (or leave) half an API.
//! - An installed API newer than [`VERSION`] is never replaced by this
//!   build's older one.
//! - The SQL file and [`VERSION`] agree (a unit test reads the file), and
//!   an install that doesn't report [`VERSION`] afterwards is rolled back.

use tokio_postgres::Client;

/// The SQL that creates the API; it sets `factlib.api_version()`.
pub(crate) const SQL: &str = include_str!("sql_api.sql");

/// The version of the API in [`SQL`].
pub(crate) const VERSION: i32 = 1;

/// The public functions the API creates, for messages.
pub(crate) const FUNCTIONS: &str = "factlib.emit, factlib.emit_json, factlib.emit_traced";

/// Key of the transaction-level advisory lock that serialises installs
/// (the bytes of "factlib1").
const LOCK_KEY: i64 = 0x6661_6374_6c69_6231;

/// What [`install`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Installed {
    /// There was no API; [`VERSION`] is installed now.
    Created,
    /// An older version was replaced by [`VERSION`].
    Upgraded {
        /// The version that was there.
        from: i32,
    },
    /// [`VERSION`] was there already; nothing was changed.
    Unchanged,
    /// A newer version (from a newer factlib) is there; it was left alone.
    Newer {
        /// The version that is there.
        installed: i32,
    },
}

/// Why the API could not be installed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SqlApiError {
    /// A statement failed (e.g. no CREATE privilege on the database).
    #[error("{context}: {source}")]
    Postgres {
        /// What we were doing.
        context: &'static str,
        /// The driver error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The SQL ran but `factlib.api_version()` does not report [`VERSION`]:
    /// a bug in this build. Nothing was changed.
    #[error(
        "after installing the SQL API v{VERSION}, factlib.api_version() reports {0}; \
         nothing was changed. This is a bug in factlib: please report it, and use --sql-api none meanwhile"
    )]
    Inconsistent(i32),
}

fn pg(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> SqlApiError {
    move |source| SqlApiError::Postgres { context, source }
}

/// Installs (or upgrades to) [`VERSION`] in one transaction, unless it or
/// a newer version is there already.
pub(crate) async fn install(client: &mut Client) -> Result<Installed, SqlApiError> {
    let tx = client
        .transaction()
        .await
        .map_err(pg("starting the SQL API install"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .await
        .map_err(pg("waiting for other installs of the SQL API"))?;
    let present: bool = tx
        .query_one(
            "SELECT to_regprocedure('factlib.api_version()') IS NOT NULL",
            &[],
        )
        .await
        .map_err(pg("looking up factlib.api_version()"))?
        .get(0);
    let before = if present {
        Some(installed_version(&tx).await?)
    } else {
        None
    };
    let outcome = match before {
        Some(v) if v == VERSION => return Ok(Installed::Unchanged),
        Some(v) if v > VERSION => return Ok(Installed::Newer { installed: v }),
        Some(from) => Installed::Upgraded { from },
        None => Installed::Created,
    };
    tx.batch_execute(SQL)
        .await
        .map_err(pg("installing the SQL API in schema factlib"))?;
    let after = installed_version(&tx).await?;
    if after != VERSION {
        return Err(SqlApiError::Inconsistent(after));
    }
    tx.commit()
        .await
        .map_err(pg("committing the SQL API install"))?;
    Ok(outcome)
}

async fn installed_version(tx: &tokio_postgres::Transaction<'_>) -> Result<i32, SqlApiError> {
    Ok(tx
        .query_one("SELECT factlib.api_version()", &[])
        .await
        .map_err(pg("reading factlib.api_version()"))?
        .get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The file's `factlib.api_version()` returns [`VERSION`].
    #[test]
    fn sql_file_declares_this_version() {
        let at = SQL
            .find("CREATE OR REPLACE FUNCTION factlib.api_version()")
            .expect("the SQL defines factlib.api_version()");
        let body = &SQL[at..];
        let ret = body.find("RETURN ").expect("api_version has a RETURN body");
        let end = body[ret..].find(';').expect("RETURN …;") + ret;
        let declared: i32 = body[ret + "RETURN ".len()..end]
            .trim()
            .parse()
            .expect("api_version returns an integer literal");
        assert_eq!(declared, VERSION);
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
