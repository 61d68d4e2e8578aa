//! Versioned SQL scripts that a `setup` command installs: the SQL emitter
//! API (`factlib setup`) and the inbox schema (`factlib inbox setup`).
//!
//! ```text
//!  setup ──BEGIN; advisory lock; version function?──┬─ same or newer: leave it
//!                                                   └─ missing/older: run the script; check the
//!                                                      version it reports; COMMIT
//! ```
//!
//! **Invariants**
//! - An install is one transaction, serialised by an advisory lock, so
//!   concurrent `setup`s never see (or leave) half a script.
//! - An installed version newer than the script's is never replaced.
//! - An install that doesn't report the script's version afterwards is
//!   rolled back.

use tokio_postgres::Client;

/// A SQL script that declares its version through a function.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Script {
    /// What it installs, for messages ("the SQL API").
    pub(crate) what: &'static str,
    /// The SQL; it (re)defines `version_fn`.
    pub(crate) sql: &'static str,
    /// The version the SQL declares.
    pub(crate) version: i32,
    /// The function that reports the installed version, e.g.
    /// `factlib.api_version()`.
    pub(crate) version_fn: &'static str,
    /// Key of the transaction-level advisory lock that serialises installs.
    pub(crate) lock_key: i64,
    /// What to do if this build's script is inconsistent (a bug).
    pub(crate) meanwhile: &'static str,
}

/// What [`install`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Installed {
    /// There was nothing; the script's version is installed now.
    Created,
    /// An older version was replaced.
    Upgraded {
        /// The version that was there.
        from: i32,
    },
    /// This version was there already; nothing was changed.
    Unchanged,
    /// A newer version (from a newer factlib) is there; it was left alone.
    Newer {
        /// The version that is there.
        installed: i32,
    },
}

/// Why a script could not be installed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SchemaError {
    /// A statement failed (e.g. no CREATE privilege on the database).
    #[error("{context}: {source}")]
    Postgres {
        /// What we were doing.
        context: String,
        /// The driver error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The script ran but its version function reports another version: a
    /// bug in this build. Nothing was changed.
    #[error(
        "after installing {what} v{version}, {version_fn} reports {found}; nothing was changed. \
         This is a bug in factlib: please report it{meanwhile}"
    )]
    Inconsistent {
        /// [`Script::what`].
        what: &'static str,
        /// [`Script::version`].
        version: i32,
        /// [`Script::version_fn`].
        version_fn: &'static str,
        /// What it reported.
        found: i32,
        /// [`Script::meanwhile`].
        meanwhile: &'static str,
    },
}

impl Script {
    fn pg(&self, doing: &str) -> impl FnOnce(tokio_postgres::Error) -> SchemaError {
        let context = format!("{doing} {}", self.what);
        move |source| SchemaError::Postgres { context, source }
    }

    /// Installs (or upgrades to) this version in one transaction, unless it
    /// or a newer version is there already.
    pub(crate) async fn install(&self, client: &mut Client) -> Result<Installed, SchemaError> {
        let tx = client
            .transaction()
            .await
            .map_err(self.pg("starting the install of"))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&self.lock_key])
            .await
            .map_err(self.pg("waiting for other installs of"))?;
        let present: bool = tx
            .query_one(
                "SELECT to_regprocedure($1) IS NOT NULL",
                &[&self.version_fn],
            )
            .await
            .map_err(self.pg("looking up the version of"))?
            .get(0);
        let before = if present {
            Some(self.installed_version(&tx).await?)
        } else {
            None
        };
        let outcome = match before {
            Some(v) if v == self.version => return Ok(Installed::Unchanged),
            Some(v) if v > self.version => return Ok(Installed::Newer { installed: v }),
            Some(from) => Installed::Upgraded { from },
            None => Installed::Created,
        };
        tx.batch_execute(self.sql)
            .await
            .map_err(self.pg("installing"))?;
        let after = self.installed_version(&tx).await?;
        if after != self.version {
            return Err(SchemaError::Inconsistent {
                what: self.what,
                version: self.version,
                version_fn: self.version_fn,
                found: after,
                meanwhile: self.meanwhile,
            });
        }
        tx.commit()
            .await
            .map_err(self.pg("committing the install of"))?;
        Ok(outcome)
    }

    async fn installed_version(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
    ) -> Result<i32, SchemaError> {
        Ok(tx
            .query_one(&format!("SELECT {}", self.version_fn), &[])
            .await
            .map_err(self.pg("reading the version of"))?
            .get(0))
    }

    /// The version the SQL's `CREATE OR REPLACE FUNCTION <version_fn> …`
    /// declares, as `RETURN n;` or as a quoted body `$$ SELECT n $$;`, for
    /// tests.
    #[cfg(test)]
    pub(crate) fn declared_version(&self) -> Option<i32> {
        let at = self
            .sql
            .find(&format!("CREATE OR REPLACE FUNCTION {}", self.version_fn))?;
        let body = &self.sql[at..];
        let body = &body[..body.find(';')?];
        let (_, n) = body
            .split_once("RETURN ")
            .or_else(|| body.split_once("$$ SELECT "))?;
        n.trim().trim_end_matches("$$").trim().parse().ok()
    }
}
