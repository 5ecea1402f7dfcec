//! The run loop for one command in one fresh VM: run dir, launch (with retries), exec,
//! teardown. Teardown happens on success, on error, on timeout and on cancellation.

use crate::error::{Error, Result};
pub use crate::events::{Event, Reporter, Silent};
use crate::exec::ExecRequest;
use crate::hypervisor::{Hypervisor, Vm};
use crate::kernel_log::KernelLog;
use crate::lock::{SlotPool, Slots};
use crate::protocol::ExitStatus;
use crate::retry::RetryPolicy;
use crate::spec::VmSpec;
use crate::state::{RunDir, StateDir};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// When a VM is left running after the run (`keep` in vmtest.toml: never, on-failure, always).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeepPolicy {
    #[default]
    Never,
    /// When the command fails (non-zero status, timeout or error after boot).
    OnFailure,
    Always,
}

/// Phase durations of one run, in order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Timings {
    pub phases: Vec<(String, Duration)>,
}

impl Timings {
    fn push(&mut self, phase: &str, d: Duration) {
        self.phases.push((phase.to_owned(), d));
    }

    pub fn get(&self, phase: &str) -> Option<Duration> {
        self.phases.iter().find(|(p, _)| p == phase).map(|(_, d)| *d)
    }
}

/// A finished run.
#[derive(Debug)]
pub struct RunOutcome {
    pub status: ExitStatus,
    /// What the command printed, when its request captured output (empty when streamed).
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub timings: Timings,
    /// The VM's name when it was kept running.
    pub kept: Option<String>,
}

/// Why a run was cancelled (a signal name, for the message).
pub type CancelReason = &'static str;

/// What a guest kernel bug report printed during the command does to the run
/// (`kernel-warnings` in vmtest.toml: fail, report, ignore).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KernelReports {
    /// The run fails ([`crate::ErrorKind::KernelReport`]), whatever the command's status.
    Fail,
    /// Each report is an [`Event::KernelReport`]; the status is the command's.
    #[default]
    Report,
    /// The kernel's log is not watched.
    Ignore,
}

/// How a run behaves around its VM.
pub struct RunOptions<'a> {
    pub retry: RetryPolicy,
    pub keep: KeepPolicy,
    /// VM slots to take before launching (`--max-vms`); `None` takes none.
    pub slots: Option<SlotPool>,
    pub reporter: &'a dyn Reporter,
    /// Where to keep the logs (`*.log`: console, hypervisor) of a run that failed, before its
    /// run dir is removed. `None` keeps nothing (a kept VM keeps its run dir anyway).
    pub failure_logs: Option<PathBuf>,
    /// What the guest kernel's bug reports do to the run.
    pub kernel_reports: KernelReports,
}

impl Default for RunOptions<'_> {
    fn default() -> Self {
        RunOptions {
            retry: RetryPolicy::default(),
            keep: KeepPolicy::Never,
            slots: None,
            reporter: &Silent,
            failure_logs: None,
            kernel_reports: KernelReports::default(),
        }
    }
}

/// Copy every `*.log` under the run dir to `dest/<run>-<path with / as ->`, for CI to upload.
pub fn save_logs(run: &RunDir, dest: &Path) {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, found);
            } else if p.extension().is_some_and(|x| x == "log") {
                found.push(p);
            }
        }
    }
    let mut logs = Vec::new();
    walk(run.path(), &mut logs);
    if logs.is_empty() || std::fs::create_dir_all(dest).is_err() {
        return;
    }
    for log in logs {
        let rel = log.strip_prefix(run.path()).unwrap_or(&log).to_string_lossy().replace('/', "-");
        let to = dest.join(format!("{}-{rel}", run.id()));
        match std::fs::copy(&log, &to) {
            Ok(_) => tracing::info!("kept {}", to.display()),
            Err(e) => tracing::warn!("cannot keep {}: {e}", log.display()),
        }
    }
}

/// Take `n` slots from the pool, reporting a wait once.
pub async fn take_slots(pool: &SlotPool, n: usize, reporter: &dyn Reporter) -> Result<Slots> {
    pool.acquire(n, |holders| reporter.event(&Event::WaitingForSlots { needed: n, max: pool.max(), holders }))
        .await
}

/// Run one command in a fresh VM of `spec`'s shape. `spec.name` is replaced by the run's
/// unique name. `cancel` resolves when the run must stop (e.g. SIGINT).
pub async fn run_command<C>(
    hv: &dyn Hypervisor,
    state: &StateDir,
    mut spec: VmSpec,
    req: ExecRequest,
    opts: RunOptions<'_>,
    cancel: C,
) -> Result<RunOutcome>
where
    C: Future<Output = CancelReason>,
{
    tokio::pin!(cancel);
    let RunOptions { retry, keep, slots, reporter, failure_logs, kernel_reports } = opts;
    // Held until the VM is gone (or kept); released on drop, also on error.
    let _slots = match &slots {
        Some(pool) => Some(tokio::select! {
            r = take_slots(pool, 1, reporter) => r?,
            reason = &mut cancel => return Err(Error::interrupted(reason)),
        }),
        None => None,
    };
    let run = state.create_run()?;
    spec.name = run.vm_name(&spec.node);
    let mut timings = Timings::default();

    let started = Instant::now();
    let launched = tokio::select! {
        r = launch_with_retry(hv, &spec, &run, retry, reporter) => r,
        reason = &mut cancel => Err(Error::interrupted(reason)),
    };
    let vm = match launched {
        Ok(vm) => vm,
        Err(e) => {
            // A launch dropped mid-way kills its own processes; records catch the rest.
            destroy_leftovers(hv, &run).await;
            if let Some(dest) = &failure_logs {
                save_logs(&run, dest);
            }
            let _ = run.remove();
            return Err(e);
        }
    };
    for (phase, d) in vm.boot_timings() {
        timings.push(phase, d);
    }
    timings.push("launch", started.elapsed());
    reporter.event(&Event::Ready { name: vm.name(), boot: started.elapsed() });

    let argv = req.argv.clone();
    reporter.event(&Event::ExecStarted { name: vm.name(), argv: &argv });
    let command_started = Instant::now();
    let kernel_log = match kernel_reports {
        KernelReports::Ignore => None,
        _ => vm.kernel_log().map(KernelLog::watch),
    };
    let result = tokio::select! {
        r = vm.exec(req) => r,
        reason = &mut cancel => Err(Error::interrupted(reason)),
    };
    timings.push("command", command_started.elapsed());
    let reports = match &kernel_log {
        Some(log) => log.take_reports().await,
        None => Vec::new(),
    };
    for report in &reports {
        reporter.event(&Event::KernelReport { name: vm.name(), report });
    }
    let result = match result {
        Ok(_) if kernel_reports == KernelReports::Fail && !reports.is_empty() => {
            Err(crate::kernel_log::failure(&reports, "the command"))
        }
        other => other,
    };
    reporter.event(&Event::ExecFinished {
        name: vm.name(),
        status: result.as_ref().ok().map(|o| o.status),
        error: result.as_ref().err(),
        duration: command_started.elapsed(),
    });

    let failed = !matches!(&result, Ok(out) if out.status.success());
    let interrupted = matches!(&result, Err(e) if e.kind() == crate::ErrorKind::Interrupted);
    let keep_it = !interrupted && (keep == KeepPolicy::Always || (keep == KeepPolicy::OnFailure && failed));

    let teardown_started = Instant::now();
    let kept = if keep_it {
        vm.detach();
        mark_kept(&run, &spec.node);
        reporter.event(&Event::Kept { name: vm.name() });
        Some(vm.name().to_owned())
    } else {
        reporter.event(&Event::TearingDown { name: vm.name(), kill: interrupted });
        let down = if interrupted { vm.kill().await } else { vm.shutdown().await };
        if let Err(e) = down {
            tracing::warn!("teardown of {}: {e}", vm.name());
            destroy_leftovers(hv, &run).await;
        }
        drop(vm);
        if let (true, Some(dest)) = (failed, &failure_logs) {
            save_logs(&run, dest);
        }
        run.remove()?;
        None
    };
    timings.push("teardown", teardown_started.elapsed());
    reporter.event(&Event::Finished { name: &spec.name, timings: &timings });

    let out = result?;
    Ok(RunOutcome { status: out.status, stdout: out.stdout, stderr: out.stderr, timings, kept })
}

async fn launch_with_retry(
    hv: &dyn Hypervisor,
    spec: &VmSpec,
    run: &RunDir,
    retry: RetryPolicy,
    reporter: &dyn Reporter,
) -> Result<Box<dyn Vm>> {
    retry
        .run(
            |attempt| {
                reporter.event(&Event::Booting { name: &spec.name, backend: hv.name(), attempt });
                hv.launch(spec, run)
            },
            || destroy_leftovers(hv, run),
        )
        .await
}

/// Destroy whatever records in this run dir still describe, then forget them.
async fn destroy_leftovers(hv: &dyn Hypervisor, run: &RunDir) {
    for rec in run.records() {
        if let Err(e) = hv.destroy_record(&rec).await {
            tracing::warn!("cleanup of {}: {e}", rec.name);
        }
        run.remove_record(&rec.node);
    }
}

fn mark_kept(run: &RunDir, node: &str) {
    if let Some(mut rec) = run.records().into_iter().find(|r| r.node == node) {
        rec.kept = true;
        let _ = run.write_record(&rec);
    }
}
