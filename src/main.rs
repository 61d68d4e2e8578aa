//! The `factlib` command.

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser;
use factlib::config::{Cli, Command, LogFormat};
use factlib::source::{transport, Transport};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = match tracing_subscriber::EnvFilter::try_new(&cli.common.log) {
        Ok(f) => f,
        Err(e) => {
            report(format_args!(
                "invalid --log / FACTLIB_LOG filter {:?}: {e}; use tracing's EnvFilter syntax, e.g. `info` or `factlib=debug,info`",
                cli.common.log
            ));
            return ExitCode::from(2);
        }
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A log line that can't be written (stderr closed, as in
        // `factlib relay 2>&1 | head -1`) is dropped; reporting that on
        // stderr as well would panic.
        .log_internal_errors(false);
    match cli.common.log_format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }

    let t = match &cli.command {
        Command::Tail(a) => a.source.settings().transport,
        Command::Relay(a) => a.source.settings().transport,
        _ => Transport::Tokio,
    };
    let format = cli.common.log_format;
    let result = transport::block_on(t, factlib::cli::run(cli));
    match result {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => {
            fail(format, format_args!("{}", anyhow::Error::from(e)));
            ExitCode::from(2)
        }
        Err(e) => {
            fail(format, format_args!("{e}"));
            ExitCode::from(2)
        }
    }
}

/// The error that ends the command: `error: …` on stderr, or an `ERROR` log
/// line with `--log-format json`, so a log shipper sees it too.
fn fail(format: LogFormat, msg: std::fmt::Arguments<'_>) {
    match format {
        LogFormat::Json if tracing::enabled!(tracing::Level::ERROR) => tracing::error!("{msg}"),
        _ => report(msg),
    }
}

/// Writes `error: …` to stderr. A closed stderr is not worth a panic: the
/// exit status still tells.
fn report(msg: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "error: {msg}");
}
