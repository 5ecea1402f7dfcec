//! `vmtest run`.

use crate::cli::{MessageFormat, RunArgs};
use crate::events::{self, JsonEvents};
use crate::ui;
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;
use vmtest_core::cancel::Cancel;
use vmtest_core::config;
use vmtest_core::exec::{ExecRequest, OutputMode, StdinSource};
use vmtest_core::plan::RunPlan;
use vmtest_core::registry::GdbStub;
use vmtest_core::spec;
use vmtest_core::state::StateDir;
use vmtest_core::{Error, Result};

pub async fn run(args: RunArgs) -> Result<i32> {
    if in_vmtest_guest() {
        return run_here(&args);
    }
    if is_test_listing(&args.command) {
        // (no timeout note: a listing prints names and ends)
        return run_here(&args);
    }
    let json_sinks = events::sinks(args.message_format == MessageFormat::Json, args.events_file.as_deref())?;
    let result = run_inner(&args, &json_sinks).await;
    events::finish(&json_sinks, "run_finished", &result);
    result
}

async fn run_inner(args: &RunArgs, json_sinks: &[JsonEvents]) -> Result<i32> {
    let cancel = crate::signals::cancellation()?;
    let cwd = std::env::current_dir().map_err(|e| {
        Error::usage(format!("cannot read the current directory: {e}; cd to an existing directory"))
    })?;
    let eff = config::resolve(&args.settings.flags(&args.command_args), &config::process_env, &cwd)?;
    for j in json_sinks {
        j.emit(
            "run_started",
            json!({
                "schema_version": events::SCHEMA_VERSION,
                "vmtest_version": env!("CARGO_PKG_VERSION"),
                "config_file": eff.file,
                "target": eff.target.as_ref().map(|t| &t.value),
                "argv": args.command.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>(),
            }),
        );
    }
    let mut plans = RunPlan::per_kernel(&eff)?;
    if plans.len() > 1 && (args.gdb.is_some() || args.gdb_wait) {
        return Err(Error::usage(format!(
            "--gdb debugs one guest, and {} kernels are given (from {}); give one --kernel",
            plans.len(),
            eff.kernel.source
        )));
    }
    for plan in &mut plans {
        plan.settings.snapshots = !args.no_snapshot;
        plan.settings.gdb = (args.gdb.is_some() || args.gdb_wait)
            .then(|| GdbStub { port: args.gdb.unwrap_or(0), wait: args.gdb_wait });
        plan.keep_failure_logs(args.failure_logs.clone());
    }
    let request = || {
        let mut req = super::request::exec_request_with(
            &args.command_args,
            &eff.env_rules(),
            eff.command_timeout()?,
            &args.command,
        )?;
        if eff.image.value.is_some() && args.command_args.cwd.is_none() {
            // An image has its own files, not the host's: the host's cwd means nothing there.
            req.cwd = None;
        }
        Ok::<_, Error>(req)
    };
    if plans.len() > 1 {
        let requests = plans.iter().map(|_| request()).collect::<Result<Vec<_>>>()?;
        return run_matrix(args, plans, requests, json_sinks, &cancel).await;
    }
    let plan = plans.remove(0);

    let human = (args.message_format == MessageFormat::Human).then(super::reporter::Human::new);
    let reporters = super::reporter::fanout(json_sinks, human.as_ref());
    let registry = super::backends::registry();
    let outcome = plan.run(&registry, &StateDir::from_env(), request()?, &reporters, &cancel).await;
    ui::set_status(None);
    let outcome = outcome?;
    if args.timings && args.message_format == MessageFormat::Human {
        let parts: Vec<String> = outcome
            .timings
            .phases
            .iter()
            .map(|(p, d)| format!("{p} {}", spec::format_duration(*d)))
            .collect();
        ui::line(&format!("vmtest: timings: {}", parts.join(", ")));
    }
    Ok(outcome.status.shell_code())
}

/// A kernel matrix: the command once per kernel, all at once within the VM slots, each
/// run's output labelled with its kernel, then a summary. The exit code is the first
/// failing kernel's (in the order given), 0 when all passed.
async fn run_matrix(
    args: &RunArgs,
    plans: Vec<RunPlan>,
    requests: Vec<ExecRequest>,
    json_sinks: &[JsonEvents],
    cancel: &Cancel,
) -> Result<i32> {
    let kernels: Vec<PathBuf> = plans.iter().map(|p| p.kernel.value.clone().unwrap_or_default()).collect();
    let labels = kernel_labels(&kernels);
    let registry = super::backends::registry();
    let state = StateDir::from_env();
    // One plain line per phase: a status line cannot show several runs at once.
    let human = (args.message_format == MessageFormat::Human)
        .then(|| super::reporter::Human { live: false, verbosity: ui::verbosity() });
    if human.is_some() {
        ui::line(&format!("vmtest: kernel matrix: {} kernels: {}", labels.len(), labels.join(", ")));
    }
    let runs = plans.into_iter().zip(requests).zip(kernels.iter().zip(&labels)).map(
        |((plan, mut req), (kernel, label))| {
            let (registry, state, human) = (&registry, &state, &human);
            async move {
                let json: Vec<JsonEvents> = json_sinks
                    .iter()
                    .map(|j| j.with_field("kernel", json!(kernel.display().to_string())))
                    .collect();
                let reporters = super::reporter::fanout(&json, human.as_ref());
                // One terminal cannot feed several guests; each gets an empty stdin.
                req.stdin = StdinSource::Null;
                req.output = OutputMode::Stream(Box::new(ui::LabelledSink::new(label)));
                let started = Instant::now();
                let result = plan.run(registry, state, req, &reporters, cancel).await;
                let took = started.elapsed();
                let code = match &result {
                    Ok(o) => o.status.shell_code(),
                    Err(e) => crate::exit_codes::of(e),
                };
                let error = result.as_ref().err().map(events::error_json);
                for j in &json {
                    j.emit(
                        "kernel_finished",
                        json!({"exit_code": code, "error": error, "duration_secs": took.as_secs_f64()}),
                    );
                }
                (code, result.err(), took)
            }
        },
    );
    let results = vmtest_core::machine::join_all(runs.collect()).await;
    if human.is_some() {
        let passed = results.iter().filter(|(code, _, _)| *code == 0).count();
        let mut text = format!("vmtest: kernel matrix: {passed} of {} passed", results.len());
        for ((code, error, took), label) in results.iter().zip(&labels) {
            let verdict = match (code, error) {
                (0, _) => "ok    ".to_owned(),
                (_, Some(_)) => "ERROR ".to_owned(),
                _ => "FAILED".to_owned(),
            };
            let why = error.as_ref().map(|e| format!("  {}", e.headline())).unwrap_or_default();
            text.push_str(&format!("\n  {verdict} {label}  exit {code}, {}{why}", ui::format_secs(*took)));
        }
        ui::line(&text);
    }
    Ok(results.iter().map(|(code, _, _)| *code).find(|c| *c != 0).unwrap_or(0))
}

/// Short names for the kernels of a matrix: their file names, or their paths when two
/// file names are the same (build trees all call theirs `bzImage`).
fn kernel_labels(kernels: &[PathBuf]) -> Vec<String> {
    let names: Vec<String> = kernels
        .iter()
        .map(|k| k.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())
        .collect();
    let unique = names.iter().all(|n| !n.is_empty() && names.iter().filter(|m| *m == n).count() == 1);
    if unique {
        names
    } else {
        kernels.iter().map(|k| k.display().to_string()).collect()
    }
}

/// True inside a vmtest guest: the agent boots every guest with [`BOOT_MARKER`] on the
/// kernel command line, which no host kernel has.
///
/// [`BOOT_MARKER`]: vmtest_core::protocol::BOOT_MARKER
pub fn in_vmtest_guest() -> bool {
    std::fs::read_to_string("/proc/cmdline")
        .map(|c| c.split_whitespace().any(|w| w == vmtest_core::protocol::BOOT_MARKER))
        .unwrap_or(false)
}

/// A libtest listing of a test binary built for this host (`BIN --list ...`, as cargo
/// nextest asks of every test binary before it runs any): the test names are compiled into
/// the binary, so the host answers it as the guest would, without booting a VM for it.
/// `VMTEST_LIST_IN_VM=1` sends listings to a VM too (for a custom harness whose list depends
/// on the machine it runs on).
pub fn is_test_listing(argv: &[std::ffi::OsString]) -> bool {
    let in_vm = std::env::var("VMTEST_LIST_IN_VM").is_ok_and(|v| !v.is_empty() && v != "0");
    let Some((binary, rest)) = argv.split_first() else { return false };
    !in_vm && rest.iter().any(|a| a == "--list") && is_host_executable(std::path::Path::new(binary))
}

/// An ELF executable for this machine's architecture (so it runs here as in the guest).
fn is_host_executable(path: &std::path::Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 20];
    let read = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut head));
    // e_machine: 62 is x86-64, 183 is aarch64 (the guest runs the host's architecture).
    let machine = u16::from_le_bytes([head[18], head[19]]);
    let host_machine = if cfg!(target_arch = "aarch64") { 183 } else { 62 };
    read.is_ok() && head.starts_with(b"\x7fELF") && machine == host_machine
}

/// `vmtest run -- CMD` inside a guest: CMD is already in a VM, so it runs here, by exec,
/// with the cwd and environment flags applied; its status is vmtest's. A test suite that
/// spawns `cargo run` (which inherits the cargo runner variable) keeps working instead of
/// trying to boot a VM inside a small guest. VM settings have nothing to act on and are
/// ignored.
fn run_here(args: &RunArgs) -> Result<i32> {
    use std::os::unix::process::CommandExt;
    let req = super::request::exec_request(&args.command_args, &args.command)?;
    if req.timeout.is_some() && in_vmtest_guest() {
        ui::line("vmtest: note: already in a vmtest guest; --timeout is not enforced for the nested command");
    }
    let (program, rest) = req.argv.split_first().ok_or_else(|| Error::usage("no command given"))?;
    let mut cmd = std::process::Command::new(program);
    cmd.args(rest).env_clear().envs(req.env.iter().map(|(k, v)| (k, v)));
    if let Some(cwd) = &req.cwd {
        cmd.current_dir(cwd);
    }
    let e = cmd.exec();
    let shown = program.to_string_lossy();
    // The shell's codes for a command that cannot start: 127 not found, 126 not runnable.
    let code = if e.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 };
    ui::line(&format!("vmtest: cannot run {shown} (nested run inside a vmtest guest): {e}"));
    Ok(code)
}

/// The error for a verb other than `run` inside a guest: they manage VMs from the host.
pub fn host_only(verb: &str) -> Error {
    Error::preflight(format!(
        "`vmtest {verb}` runs on the host, and this is a vmtest guest; only `vmtest run -- CMD` works \
         here (it runs CMD directly, since it is already in a VM)"
    ))
}
