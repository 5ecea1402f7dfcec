//! The `vmtest` command line. Parsing and presentation only: what it does lives in
//! vmtest-core and the backend crates.

mod cli;
mod commands;
mod events;
mod exit_codes;
mod logging;
mod signals;
mod ui;

use clap::error::ErrorKind as ClapErrorKind;
use clap::Parser;
use std::process::ExitCode;
use vmtest_core::Error;

fn main() -> ExitCode {
    let args = match cli::Cli::try_parse() {
        Ok(args) => args,
        Err(e) => return usage_error(e),
    };
    ui::process_start();
    let format = match &args.command {
        cli::Command::Run(run) => run.message_format,
        cli::Command::Test(test) => test.message_format,
        _ => cli::MessageFormat::Human,
    };
    if format == cli::MessageFormat::Json {
        ui::set_json_mode();
    }
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
    if ui::json_mode() {
        // `run_finished` (`test_finished`) carries the error when the stream got that far;
        // else it ends here.
        if !events::stream_finished() {
            ui::line(&events::error_line(e));
        }
        return ExitCode::from(exit_codes::of(e) as u8);
    }
    let mut text = format!("vmtest: error: {}", e.headline());
    if let Some(detail) = e.detail() {
        for line in detail.lines() {
            text.push_str(&format!("\n  {line}"));
        }
    }
    ui::set_status(None);
    ui::line(&text);
    ExitCode::from(exit_codes::of(e) as u8)
}

/// clap's own errors: help and version exit 0, bad usage exits 64 like every other usage
/// error (clap would exit 2, which test runners read as a failure of their own).
fn usage_error(e: clap::Error) -> ExitCode {
    let _ = e.print();
    match e.kind() {
        ClapErrorKind::DisplayHelp | ClapErrorKind::DisplayVersion => ExitCode::SUCCESS,
        _ => ExitCode::from(exit_codes::USAGE as u8),
    }
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
    logging::init(filter);
}
