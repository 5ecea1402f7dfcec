//! `vmtest run`.

use crate::cli::RunArgs;
use crate::signals::Signals;
use backend_qemu::QemuOptions;
use vmtest_core::environment::EnvRules;
use vmtest_core::exec::{ExecRequest, GuestUser, OutputMode, StdinSource, StdioSink};
use vmtest_core::retry::RetryPolicy;
use vmtest_core::runner::{self, KeepPolicy};
use vmtest_core::spec::{self, BootSpec, VmSpec};
use vmtest_core::state::StateDir;
use vmtest_core::{Error, Result};

pub async fn run(args: RunArgs) -> Result<i32> {
    let mut signals = Signals::watch().map_err(|e| Error::infra(format!("cannot watch signals: {e}")))?;
    let spec = spec_from(&args)?;
    let req = request_from(&args)?;
    let qemu = QemuOptions {
        kernel_args: args.kernel_args.as_deref().map(|a| a.split_whitespace().map(str::to_owned).collect()).unwrap_or_default(),
        ..QemuOptions::default()
    };
    let backend = super::backends::choose(&args.backend, qemu).await?;
    let state = StateDir::from_env();
    let outcome = runner::run_command(
        backend.as_ref(),
        &state,
        spec,
        req,
        RetryPolicy::default(),
        KeepPolicy::Never,
        signals.recv(),
    )
    .await?;
    if args.timings {
        let parts: Vec<String> =
            outcome.timings.phases.iter().map(|(p, d)| format!("{p} {}", spec::format_duration(*d))).collect();
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

fn request_from(args: &RunArgs) -> Result<ExecRequest> {
    let mut rules = EnvRules { clear: args.clear_env, unset: args.unset_env.clone(), ..Default::default() };
    for e in &args.env {
        rules.add_env_arg(e);
    }
    let cwd = match &args.cwd {
        Some(c) => c.clone(),
        None => std::env::current_dir()
            .map_err(|e| Error::usage(format!("cannot read the current directory: {e}; pass --cwd DIR")))?,
    };
    Ok(ExecRequest {
        argv: args.command.clone(),
        cwd: Some(cwd),
        env: rules.apply(std::env::vars_os()),
        stdin: StdinSource::Reader(Box::new(std::io::stdin())),
        output: OutputMode::Stream(Box::new(StdioSink)),
        timeout: args.timeout.as_deref().map(spec::parse_duration).transpose()?,
        user: if args.root { GuestUser::ROOT } else { GuestUser::current() },
    })
}
