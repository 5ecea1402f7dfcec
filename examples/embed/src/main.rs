//! A program that embeds vmtest: it runs one command in a fresh VM and one test file,
//! through the library, with the QEMU backend only, and the same config semantics as the
//! `vmtest` binary (defaults < `vmtest.toml` < `VMTEST_*` variables < what it sets itself).
//!
//! `cargo run -p embed-example -- TEST_FILE`

use backend_qemu::QemuBackend;
use std::path::PathBuf;
use std::process::ExitCode;
use vmtest_core::cancel::Cancel;
use vmtest_core::config::{self, Flags};
use vmtest_core::events::{Event, Reporter, StepResult};
use vmtest_core::exec::ExecRequest;
use vmtest_core::plan::RunPlan;
use vmtest_core::registry::Registry;
use vmtest_core::state::StateDir;
use vmtest_core::suite::{self, BackendRequest, SuiteOptions};
use vmtest_core::testrun::Verdict;

/// Prints the few events this program cares about.
struct Log;

impl Reporter for Log {
    fn event(&self, event: &Event<'_>) {
        match event {
            Event::Ready { name, boot } => println!("embed: {name} ready after {boot:?}"),
            Event::StepFinished { step, result: StepResult::Passed { .. }, .. } => {
                println!("embed: ok: {}", step.description)
            }
            Event::StepFinished { step, result: StepResult::Failed { error }, .. } => {
                println!("embed: FAILED: {}: {}", step.description, error.headline())
            }
            _ => {}
        }
    }
}

fn main() -> ExitCode {
    let Some(test_file) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: embed-example TEST_FILE");
        return ExitCode::from(64);
    };
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
    match runtime.block_on(embed(test_file)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("embed: error: {}", e.headline());
            ExitCode::from(2)
        }
    }
}

async fn embed(test_file: PathBuf) -> vmtest_core::Result<bool> {
    // The only backend this program offers.
    let registry = Registry::new().register("qemu", |s| Box::new(QemuBackend::new(s.into())));
    let state = StateDir::from_env();
    let cwd = std::env::current_dir().map_err(|e| vmtest_core::Error::io("the current directory", e))?;

    // One command in one fresh VM: resolved as `vmtest run --backend qemu` would be.
    let flags = Flags { backend: Some("qemu".into()), ..Flags::default() };
    let settings = config::resolve(&flags, &config::process_env, &cwd)?;
    let request = ExecRequest::new(["uname", "-r"]);
    let outcome = RunPlan::new(&settings)?.run(&registry, &state, request, &Log, &Cancel::never()).await?;
    print!("embed: the guest runs Linux {}", String::from_utf8_lossy(&outcome.stdout));
    if !outcome.status.success() {
        return Ok(false);
    }

    // A test file, as `vmtest test --backend qemu FILE` runs it.
    let files = suite::load(&[test_file])?;
    let opts = SuiteOptions {
        backend: BackendRequest { forced: Some("qemu".into()), fallback: "qemu".into() },
        settings: settings.backend_settings(),
        accel: settings.vm_spec()?.accel,
        kernel_reports: settings.kernel_warnings.value,
        filter: None,
        keep: false,
        max_vms: settings.max_vms.value,
        keep_network: None,
    };
    let result = suite::run(&registry, &state, &files, opts, &Log, &Cancel::never()).await?;
    if let Some(e) = result.error {
        return Err(e);
    }
    let passed = result.files.iter().all(|f| matches!(f.verdict, Verdict::Passed));
    println!("embed: {} test file(s), {}", result.files.len(), if passed { "all passed" } else { "FAILED" });
    Ok(passed)
}
