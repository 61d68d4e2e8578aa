//! `factlib inbox setup` installs the inbox schema; `factlib inbox`
//! consumes into it (`crate::inbox::run`) until SIGTERM/SIGINT.

use std::process::ExitCode;

use super::setup::report_install;
use super::{connect_sql, spawn_signal_watch, CliError};
use crate::config::{InboxAction, InboxArgs};
use crate::inbox::schema::SCRIPT;

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
    let installed = SCRIPT.install(&mut client).await;
    report_install(
        "inbox schema",
        &SCRIPT,
        "factlib.inbox, factlib.inbox_offsets, factlib.inbox_dead_letters, factlib.inbox_claims, factlib.inbox_claim()",
        installed,
        "the role needs CREATE on the database, or on schema factlib",
    )?;
    Ok(ExitCode::SUCCESS)
}
