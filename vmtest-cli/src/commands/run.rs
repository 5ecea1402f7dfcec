//! `vmtest run`.

use crate::cli::{Keep, RunArgs};
use crate::signals::Signals;
use backend_qemu::QemuOptions;
use vmtest_core::lock::{self, SlotPool};
use vmtest_core::retry::RetryPolicy;
use vmtest_core::runner::{self, KeepPolicy, RunOptions};
use vmtest_core::spec::{self, BootSpec, VmSpec};
use vmtest_core::state::StateDir;
use vmtest_core::{sweep, Error, Result};

pub async fn run(args: RunArgs) -> Result<i32> {
    let mut signals = Signals::watch().map_err(|e| Error::infra(format!("cannot watch signals: {e}")))?;
    let spec = spec_from(&args)?;
    let req = super::request::exec_request(&args.command_args, &args.command)?;
    let keep = match args.keep {
        Keep::Never => KeepPolicy::Never,
        Keep::OnFailure => KeepPolicy::OnFailure,
        Keep::Always => KeepPolicy::Always,
    };
    let qemu = QemuOptions {
        kernel_args: args
            .kernel_args
            .as_deref()
            .map(|a| a.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default(),
        // A VM that may be kept must survive this process.
        die_with_parent: keep == KeepPolicy::Never,
        ..QemuOptions::default()
    };
    let state = StateDir::from_env();
    let all = super::backends::all(qemu);
    sweep::sweep_orphans(&state, &super::backends::refs(&all)).await;
    let backend = super::backends::choose(&args.backend, all).await?;
    let max_vms = args.max_vms.unwrap_or_else(|| lock::default_max_vms(spec.memory_mib));
    if max_vms == 0 {
        return Err(Error::usage("--max-vms must be at least 1"));
    }
    let opts = RunOptions {
        retry: RetryPolicy::default(),
        keep,
        slots: Some(SlotPool::from_env(state.path(), max_vms)?),
        reporter: &super::reporter::Stderr,
    };
    let outcome = runner::run_command(backend.as_ref(), &state, spec, req, opts, signals.recv()).await?;
    if args.timings {
        let parts: Vec<String> = outcome
            .timings
            .phases
            .iter()
            .map(|(p, d)| format!("{p} {}", spec::format_duration(*d)))
            .collect();
        eprintln!("vmtest: timings: {}", parts.join(", "));
    }
    Ok(outcome.status.shell_code())
}

fn spec_from(args: &RunArgs) -> Result<VmSpec> {
    if args.cpus == 0 {
        return Err(Error::usage("--cpus must be at least 1"));
    }
    let mut spec = VmSpec::new("", "vm");
    spec.cpus = args.cpus;
    spec.memory_mib = spec::parse_memory_mib(&args.memory)?;
    spec.accel = args.accel.parse()?;
    spec.boot_timeout = spec::parse_duration(&args.boot_timeout)?;
    spec.boot = BootSpec::Kernel { kernel: args.kernel.clone() };
    Ok(spec)
}
