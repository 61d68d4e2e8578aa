//! The `factlib` command.

use std::process::ExitCode;

use clap::Parser;
use factlib::config::{Cli, Command, Transport};
use factlib::source::transport;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.common.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();

    let t = match &cli.command {
        Command::Tail(a) => a.source.transport,
        Command::Relay(a) => a.source.transport,
        Command::Bench(_) => Transport::Tokio,
        _ => Transport::Tokio,
    };
    let result = transport::block_on(t, factlib::cli::run(cli));
    match result {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => {
            eprintln!("error: {}", anyhow::Error::from(e));
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
