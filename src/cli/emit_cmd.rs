//! `factlib emit`: one fact in its own transaction.

use std::io::Read;
use std::process::ExitCode;

use bytes::Bytes;

use super::{connect_sql, messages_reach_the_relay, CliError};
use crate::config::{CommonArgs, EmitArgs};
use crate::emit::{emit, NewFact};

pub(super) async fn run(common: &CommonArgs, args: EmitArgs) -> Result<ExitCode, CliError> {
    let payload = match (&args.payload, &args.payload_file) {
        (Some(p), _) => Bytes::from(p.clone().into_bytes()),
        (None, Some(path)) if path.as_os_str() == "-" => {
            let mut v = Vec::new();
            std::io::stdin()
                .read_to_end(&mut v)
                .map_err(|source| CliError::Io {
                    context: "reading the payload from stdin".into(),
                    source,
                })?;
            Bytes::from(v)
        }
        (None, Some(path)) => Bytes::from(std::fs::read(path).map_err(|source| CliError::Io {
            context: format!("reading --payload-file {}", path.display()),
            source,
        })?),
        (None, None) => {
            return Err(CliError::Precondition(
                "give the payload with --payload or --payload-file".into(),
            ))
        }
    };
    let mut client = connect_sql(&common.database_url).await?;
    messages_reach_the_relay(&client).await?;
    let tx = client
        .transaction()
        .await
        .map_err(|source| CliError::Postgres {
            context: "BEGIN".into(),
            source,
        })?;
    let new = NewFact {
        aggregate_type: args.aggregate_type,
        aggregate_id: args.aggregate_id,
        event_type: args.event_type,
        payload,
        metadata: args.metadata.into_iter().collect(),
        trace_info: None,
    };
    let (fact, lsn) = emit(&tx, &common.prefix, new).await?;
    tx.commit().await.map_err(|source| CliError::Postgres {
        context: "COMMIT".into(),
        source,
    })?;
    println!(
        "{}",
        serde_json::json!({ "id": fact.id, "lsn": lsn.to_string() })
    );
    Ok(ExitCode::SUCCESS)
}
