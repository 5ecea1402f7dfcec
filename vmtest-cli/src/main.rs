//! The `vmtest` command line. Parsing and presentation only: what it does lives in
//! vmtest-core and the backend crates.

mod cli;
mod commands;
mod config;
mod events;
mod signals;
mod ui;

use clap::Parser;
use std::process::ExitCode;
use vmtest_core::Error;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    init_logging(args.verbose, args.quiet);
    // One thread: everything here waits on I/O, and QEMU's parent-death signal is tied to
    // the thread that spawned it, which must live as long as the run.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return report(&Error::infra(format!("cannot start the async runtime: {e}"))),
    };
    match runtime.block_on(commands::dispatch(args)) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => report(&e),
    }
}

/// Print an error as one line (plus its detail block) and pick its exit code.
fn report(e: &Error) -> ExitCode {
    let mut text = format!("vmtest: error: {}", e.message());
    if let Some(detail) = e.detail() {
        for line in detail.lines() {
            text.push_str(&format!("\n  {line}"));
        }
    }
    ui::set_status(None);
    ui::line(&text);
    ExitCode::from(e.exit_code() as u8)
}

/// Logs go through the terminal lock (never inside the status line or a command's line).
/// `VMTEST_LOG` takes a `RUST_LOG`-style filter (e.g. `debug`, `backend_qemu=trace`) and
/// wins over -q/-v.
fn init_logging(verbose: u8, quiet: bool) {
    use tracing_subscriber::EnvFilter;
    ui::set_verbosity(match (quiet, verbose) {
        (true, _) => ui::Verbosity::Quiet,
        (false, 0) => ui::Verbosity::Normal,
        _ => ui::Verbosity::Verbose,
    });
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env("VMTEST_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    // Colour only for a terminal: logs in CI and in files must stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(ui::log_writer)
        .with_target(false)
        .with_ansi(ansi)
        .init();
}
