//! `factlib inbox setup` installs the inbox schema; `factlib inbox`
//! consumes into it (`crate::inbox::run`) until SIGTERM/SIGINT.

use std::process::ExitCode;

use super::{connect_sql, spawn_signal_watch, CliError};
use crate::config::{InboxAction, InboxArgs};
use crate::inbox::schema::{SCRIPT, VERSION};
use crate::schema::{Installed, SchemaError};

/// Runs `factlib inbox [setup]`.
pub async fn run(args: &InboxArgs) -> Result<ExitCode, CliError> {
    match args.action {
        Some(InboxAction::Setup) => setup(args).await,
        None => {
            let settings = args.settings()?;
            let stop = spawn_signal_watch();
            crate::inbox::run(settings, stop).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn setup(args: &InboxArgs) -> Result<ExitCode, CliError> {
    let mut client = connect_sql(args.database_url()?).await?;
    let tables = "factlib.inbox, factlib.inbox_offsets, factlib.inbox_dead_letters, factlib.inbox_claims, factlib.inbox_claim()";
    match SCRIPT.install(&mut client).await {
        Ok(Installed::Created) => println!("inbox schema: installed v{VERSION} ({tables})"),
        Ok(Installed::Upgraded { from }) => {
            println!("inbox schema: upgraded v{from} to v{VERSION} ({tables})")
        }
        Ok(Installed::Unchanged) => println!("inbox schema: v{VERSION} exists, unchanged"),
        Ok(Installed::Newer { installed }) => println!(
            "inbox schema: v{installed} exists, newer than this factlib's v{VERSION}; left unchanged"
        ),
        Err(SchemaError::Postgres { context, source }) => {
            return Err(CliError::Postgres {
                context: format!("{context} (the role needs CREATE on the database, or on schema factlib)"),
                source,
            })
        }
        Err(e @ SchemaError::Inconsistent { .. }) => {
            return Err(CliError::Precondition(e.to_string()))
        }
    }
    Ok(ExitCode::SUCCESS)
}
