//! Failover of the primary, as `setup` and `status` see it: PostgreSQL
//! 17's failover slots (`failover = true`, synchronized to a standby by its
//! slot sync worker), and the warnings for a slot a promotion would lose.
//!
//! Owns the questions asked of the servers about failover and the advice
//! printed from the answers. `setup --failover` turns the flag on
//! ([`enable`]); [`inspect`] only reads.
//!
//! **Invariants**
//! - [`inspect`] changes nothing on any server.
//! - Each server of a multi-host `--database-url` is looked at on its own
//!   (any role), over a replication connection: a hot standby answers
//!   those, and the relay's role has the right to open them.
//! - A warning names what to change and where.

use crate::lsn::Lsn;
use crate::source::{ConnectionConfig, ReplicationStream, SourceError, SourceSettings};

use super::{pg, CliError};

/// The first major version with failover slots.
pub(crate) const FAILOVER_SINCE: u32 = 17;

/// What the servers say about the slot and failover.
#[derive(Debug, serde::Serialize)]
pub(super) struct Failover {
    /// Whether the slot is a failover slot; `None` before 17.
    pub slot_failover: Option<bool>,
    /// The server's `synchronized_standby_slots` (17 and later).
    pub synchronized_standby_slots: Option<String>,
    /// Physical standbys streaming from this server now.
    pub physical_standbys: i64,
    /// Each server of a multi-host `--database-url` (empty with one).
    pub servers: Vec<ServerView>,
    /// What a failover would break, and what to do.
    pub warnings: Vec<String>,
}

/// One server of the connection string.
#[derive(Debug, serde::Serialize)]
pub(super) struct ServerView {
    /// `host:port`.
    pub server: String,
    /// `primary`, `standby` or `unreachable`.
    pub role: &'static str,
    /// The slot there; `None` if it has none (or is unreachable).
    pub slot: Option<SlotCopy>,
    /// Why it is unreachable.
    pub error: Option<String>,
}

/// The slot as one server has it.
#[derive(Debug, serde::Serialize)]
pub(super) struct SlotCopy {
    /// Synchronized from the primary (17 and later; `None` before).
    pub synced: Option<bool>,
    /// Still temporary: the sync worker has not yet caught up with the
    /// primary's slot, and a promotion would drop it.
    pub temporary: bool,
    pub confirmed_flush_lsn: Option<String>,
    /// How far it is behind the slot the relay streams from.
    pub behind_bytes: Option<u64>,
    /// Why PostgreSQL gave it up (17 and later).
    pub invalidation_reason: Option<String>,
    /// On a standby: synchronized, persistent and valid, so a promotion
    /// keeps it and the relay goes on from it.
    pub ready_for_failover: bool,
}

/// Reads what failover needs: from `client`, a primary (the server
/// `status` reports on), and from each server of `url` when it names more
/// than one.
pub(super) async fn inspect(
    client: &tokio_postgres::Client,
    url: &str,
    major: u32,
    slot: &str,
    primary_flush: Option<&str>,
) -> Result<Failover, CliError> {
    let physical_standbys: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_replication r WHERE NOT EXISTS \
               (SELECT 1 FROM pg_replication_slots s \
                WHERE s.active_pid = r.pid AND s.slot_type = 'logical')",
            &[],
        )
        .await
        .map_err(pg("counting the physical standbys"))?
        .get(0);
    let (slot_failover, synchronized_standby_slots) = if major >= FAILOVER_SINCE {
        let r = client
            .query_one(
                "SELECT (SELECT failover FROM pg_replication_slots WHERE slot_name = $1), \
                        current_setting('synchronized_standby_slots')",
                &[&slot],
            )
            .await
            .map_err(pg("reading the slot's failover flag"))?;
        (r.get::<_, Option<bool>>(0), Some(r.get::<_, String>(1)))
    } else {
        (None, None)
    };
    let mut f = Failover {
        slot_failover,
        synchronized_standby_slots,
        physical_standbys,
        servers: Vec::new(),
        warnings: Vec::new(),
    };
    let conn = ConnectionConfig::from_url(url).map_err(crate::config::ConfigError::from)?;
    if conn.hosts.len() > 1 {
        let primary_flush: Option<Lsn> = primary_flush.and_then(|l| l.parse().ok());
        for endpoint in &conn.hosts {
            f.servers
                .push(look_at(&conn.only(endpoint), slot, primary_flush).await);
        }
    }
    f.warnings = warnings(&f, major, slot);
    Ok(f)
}

/// One server: its role and its copy of the slot.
async fn look_at(conn: &ConnectionConfig, slot: &str, primary_flush: Option<Lsn>) -> ServerView {
    let server = conn.hosts[0].to_string();
    match slot_copy(conn, slot, primary_flush).await {
        Ok((standby, copy)) => ServerView {
            server,
            role: if standby { "standby" } else { "primary" },
            slot: copy,
            error: None,
        },
        Err(e) => ServerView {
            server,
            role: "unreachable",
            slot: None,
            error: Some(e.to_string()),
        },
    }
}

async fn slot_copy(
    conn: &ConnectionConfig,
    slot: &str,
    primary_flush: Option<Lsn>,
) -> Result<(bool, Option<SlotCopy>), SourceError> {
    let mut s = ReplicationStream::connect(conn, &SourceSettings::default()).await?;
    let rows = s
        .query("SELECT pg_is_in_recovery()::text, current_setting('server_version_num')")
        .await?;
    let get = |rows: &[Vec<Option<String>>], i: usize| {
        rows.first().and_then(|r| r.get(i)).cloned().flatten()
    };
    let cell = |rows: &[Vec<Option<String>>], i: usize| get(rows, i).unwrap_or_default();
    let standby = cell(&rows, 0) == "true";
    let major = cell(&rows, 1).parse::<u32>().map_or(0, |n| n / 10_000);
    // The slot name is checked (lowercase letters, digits, `_`) by config.
    let columns = if major >= FAILOVER_SINCE {
        "synced::text, invalidation_reason"
    } else {
        "NULL, NULL"
    };
    let rows = s
        .query(&format!(
            "SELECT temporary::text, confirmed_flush_lsn::text, {columns} \
             FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ))
        .await?;
    let copy = rows.first().map(|_| {
        let synced = (major >= FAILOVER_SINCE).then(|| cell(&rows, 2) == "true");
        let temporary = cell(&rows, 0) == "true";
        let confirmed_flush_lsn = get(&rows, 1);
        let invalidation_reason = get(&rows, 3);
        let behind_bytes = primary_flush.zip(
            confirmed_flush_lsn
                .as_deref()
                .and_then(|l| l.parse::<Lsn>().ok()),
        );
        SlotCopy {
            ready_for_failover: standby
                && synced == Some(true)
                && !temporary
                && invalidation_reason.is_none(),
            synced,
            temporary,
            behind_bytes: behind_bytes.map(|(p, c)| p.0.saturating_sub(c.0)),
            confirmed_flush_lsn,
            invalidation_reason,
        }
    });
    Ok((standby, copy))
}

/// What a promotion would break, seen from a primary.
fn warnings(f: &Failover, major: u32, slot: &str) -> Vec<String> {
    let mut w = Vec::new();
    let failover = f.slot_failover == Some(true);
    if f.physical_standbys > 0 && !failover {
        let what = if major >= FAILOVER_SINCE {
            "run `factlib setup --failover` (with the relay stopped) to make it one".to_owned()
        } else {
            format!(
                "failover slots need PostgreSQL {FAILOVER_SINCE}; before that, see the README's \
                 \"Failover before PostgreSQL 17\" for what to do after a promotion"
            )
        };
        w.push(format!(
            "this primary streams to {} physical standby(s), but slot \"{slot}\" is not a failover slot: \
             if a standby is promoted, the slot is not on it and the relay cannot go on; {what}",
            f.physical_standbys
        ));
    }
    if failover && f.synchronized_standby_slots.as_deref() == Some("") {
        w.push(
            "synchronized_standby_slots is empty on this primary: the relay may receive facts that a \
             standby has not yet, and after a failover to that standby those facts are not in its WAL. \
             Set it to the standbys' physical slot names (ALTER SYSTEM SET synchronized_standby_slots = \
             '<slot>'; SELECT pg_reload_conf())"
                .to_owned(),
        );
    }
    let primaries = f.servers.iter().filter(|s| s.role == "primary").count();
    if primaries > 1 {
        w.push(format!(
            "{primaries} servers of --database-url are primaries: after a failover, stop the old \
             primary (or take it out of the URL) before it takes writes again"
        ));
    }
    for s in f.servers.iter().filter(|s| s.role == "standby") {
        let server = &s.server;
        match &s.slot {
            _ if !failover => {}
            None => w.push(format!(
                "standby {server} has no copy of slot \"{slot}\": set sync_replication_slots = on, \
                 hot_standby_feedback = on and a primary_slot_name there, and dbname in its \
                 primary_conninfo (`factlib setup --failover` prints the settings)"
            )),
            Some(c) if !c.ready_for_failover => w.push(format!(
                "standby {server}'s copy of slot \"{slot}\" is not ready for failover ({}): a promotion \
                 now would leave the relay without its slot",
                if let Some(r) = &c.invalidation_reason {
                    format!("invalidated: {r}")
                } else if c.temporary {
                    "still temporary: the sync worker waits for the standby to catch up".to_owned()
                } else {
                    "not synchronized".to_owned()
                }
            )),
            Some(_) => {}
        }
    }
    w
}

/// Makes `slot` a failover slot (17 and later): `ALTER_REPLICATION_SLOT`,
/// over a replication connection. Fails while a relay streams from it.
pub(super) async fn enable(url: &str, slot: &str) -> Result<(), CliError> {
    let conn = ConnectionConfig::from_url(url).map_err(crate::config::ConfigError::from)?;
    let mut s = ReplicationStream::connect(&conn, &SourceSettings::default()).await?;
    // The slot name is checked (lowercase letters, digits, `_`) by config.
    s.query(&format!("ALTER_REPLICATION_SLOT {slot} ( FAILOVER true )"))
        .await
        .map_err(|e| match e.sqlstate() {
            Some("55006") => CliError::Precondition(format!(
                "slot \"{slot}\" is in use, so its failover flag cannot be changed: stop the relay, \
                 run `factlib setup --failover` again, then start the relay"
            )),
            _ => e.into(),
        })?;
    Ok(())
}

/// The settings a failover slot needs on each server, filled in with what
/// this primary has.
pub(super) fn requirements(physical_slots: &[String], dbname: &str, user: &str) -> String {
    let slot = physical_slots
        .first()
        .map_or("<the standby's physical slot>", String::as_str);
    let listed = if physical_slots.is_empty() {
        "<the standbys' physical slots>".to_owned()
    } else {
        physical_slots.join(",")
    };
    format!(
        "failover: what the servers need (PostgreSQL {FAILOVER_SINCE}):\n  \
         on the primary:  synchronized_standby_slots = '{listed}'\n  \
         on the standby:  sync_replication_slots = on, hot_standby_feedback = on, wal_level = logical,\n                   \
         primary_slot_name = '{slot}', and dbname={dbname} in primary_conninfo (e.g. \
         'host=<primary> user={user} dbname={dbname}')\n  \
         for the relay:   list both servers with target_session_attrs=read-write, e.g.\n                   \
         postgresql://{user}@<primary>:5432,<standby>:5432/{dbname}?target_session_attrs=read-write\n  \
         then `factlib status` shows whether the standby's copy of the slot is ready for failover"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn primary_with(slot_failover: Option<bool>, standbys: i64, sss: Option<&str>) -> Failover {
        Failover {
            slot_failover,
            synchronized_standby_slots: sss.map(str::to_owned),
            physical_standbys: standbys,
            servers: Vec::new(),
            warnings: Vec::new(),
        }
    }

    fn view(role: &'static str, slot: Option<SlotCopy>) -> ServerView {
        ServerView {
            server: format!("{role}:5432"),
            role,
            slot,
            error: None,
        }
    }

    fn copy(temporary: bool, ready: bool) -> SlotCopy {
        SlotCopy {
            synced: Some(true),
            temporary,
            confirmed_flush_lsn: Some("0/10".into()),
            behind_bytes: Some(0),
            invalidation_reason: None,
            ready_for_failover: ready,
        }
    }

    #[test]
    fn a_slot_a_promotion_would_lose_is_named_with_the_fix_for_the_version() {
        let w = warnings(&primary_with(Some(false), 2, Some("")), 17, "s");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("2 physical standby(s)") && w[0].contains("setup --failover"));
        let w = warnings(&primary_with(None, 1, None), 16, "s");
        assert!(w[0].contains("Failover before PostgreSQL 17"), "{w:?}");
        // No standby, nothing to lose.
        assert!(warnings(&primary_with(Some(false), 0, Some("")), 17, "s").is_empty());
        assert!(warnings(&primary_with(None, 0, None), 15, "s").is_empty());
    }

    #[test]
    fn a_failover_slot_needs_synchronized_standby_slots_and_a_ready_copy() {
        let w = warnings(&primary_with(Some(true), 1, Some("")), 17, "s");
        assert!(
            w.len() == 1 && w[0].contains("synchronized_standby_slots is empty"),
            "{w:?}"
        );
        let mut f = primary_with(Some(true), 1, Some("phys"));
        f.servers = vec![view("primary", None), view("standby", None)];
        let w = warnings(&f, 17, "s");
        assert!(
            w.len() == 1 && w[0].contains("has no copy") && w[0].contains("sync_replication_slots"),
            "{w:?}"
        );
        f.servers[1] = view("standby", Some(copy(true, false)));
        let w = warnings(&f, 17, "s");
        assert!(w.len() == 1 && w[0].contains("still temporary"), "{w:?}");
        f.servers[1] = view("standby", Some(copy(false, true)));
        assert!(warnings(&f, 17, "s").is_empty());
    }

    #[test]
    fn two_primaries_in_the_url_are_called_out() {
        let mut f = primary_with(Some(true), 0, Some("phys"));
        f.servers = vec![view("primary", None), view("primary", None)];
        let w = warnings(&f, 17, "s");
        assert!(
            w.iter()
                .any(|w| w.contains("2 servers of --database-url are primaries")),
            "{w:?}"
        );
    }
}
