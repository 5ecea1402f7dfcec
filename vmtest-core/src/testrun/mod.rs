//! Running a checked test file: boot its nodes (in parallel, within the lock slots), run its
//! steps in order, report one JUnit case per subtest, tear everything down (or keep it).
//!
//! A file with a checkpoint starts from the stored one when its key matches, and makes it
//! otherwise (`checkpointed.rs`); its `from` subtests run on copies of it (`copies.rs`).

mod cases;
mod checkpointed;
mod copies;
#[cfg(test)]
mod fake;
mod run;
mod steps;
mod stop;
#[cfg(test)]
mod tests;

pub use cases::SETUP_CASE;
pub use steps::describe_step;

use crate::error::{Error, ErrorKind};
use crate::events::{Event, FileRef};
use crate::hypervisor::Hypervisor;
use crate::junit::Suite;
use crate::lock::SlotPool;
use crate::machine::{NetworkKeeper, NodeConfig};
use crate::runner::{CancelReason, KernelReports, Reporter};
use crate::spec::{AccelChoice, BootSpec, VmSpec};
use crate::state::StateDir;
use crate::testfile::{BackendTraits, TestFile};
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

/// How to run test files.
pub struct RunConfig<'a> {
    /// Run only subtests whose name contains this; steps outside subtests always run.
    pub filter: Option<String>,
    /// On failure, leave the machines running.
    pub keep: bool,
    pub slots: Option<SlotPool>,
    /// Receives the file's events (and its machines').
    pub reporter: &'a dyn Reporter,
    pub accel: AccelChoice,
    /// What a guest kernel's bug report during a step does: fail the step, or be reported
    /// (as an event and in the step's JUnit case).
    pub kernel_reports: KernelReports,
    /// With `keep`: starts a process that serves a kept run's private network (given the
    /// run dir), so kept machines stay connected. See [`crate::machine::Cluster::keep`].
    pub keep_network: Option<&'a NetworkKeeper>,
    /// Reuse and store checkpoints in the backend's store. Off (`--no-snapshot`): every
    /// run makes its checkpoint afresh and keeps it only for its own `from` subtests.
    pub store_checkpoints: bool,
}

/// How a test file ended.
#[derive(Debug)]
pub enum Verdict {
    Passed,
    /// A step failed; the message names the step, the node and the output.
    Failed(Error),
    /// The test could not run to the end: boot, preflight, global timeout, interrupted.
    Error(Error),
}

#[derive(Debug)]
pub struct FileOutcome {
    pub verdict: Verdict,
    pub suite: Suite,
    /// VM names left running (`keep`).
    pub kept: Vec<String>,
}

impl FileOutcome {
    /// Tell the reporter the file is over, and hand the outcome on.
    fn reported(self, cfg: &RunConfig<'_>, file: &FileRef<'_>) -> FileOutcome {
        cfg.reporter.event(&Event::FileFinished { file, outcome: &self });
        self
    }
}

/// Run one test file. `cancel` resolves on SIGINT and the like.
pub async fn run_file<C>(
    hv: Arc<dyn Hypervisor>,
    state: &StateDir,
    file: &TestFile,
    cfg: &RunConfig<'_>,
    cancel: C,
) -> FileOutcome
where
    C: Future<Output = CancelReason>,
{
    let started = Instant::now();
    let file_ref = &FileRef { name: &file.name, path: &file.path };
    let cases = cases::Cases::new(file, cfg.filter.as_deref());
    if let Err(e) = file.check_backend(backend_traits(hv.as_ref())) {
        return cases.finish(file, started, Verdict::Error(e), Vec::new()).reported(cfg, file_ref);
    }
    let nodes = node_configs(hv.as_ref(), file, cfg);
    let names: Vec<&str> = file.nodes.iter().map(|n| n.name.as_str()).collect();
    cfg.reporter.event(&Event::FileStarted { file: file_ref, backend: hv.name(), nodes: &names });
    if !hv.private_networks() && names.len() > 1 {
        let message = format!(
            "the {} backend has no private networks: the nodes are not connected to each other by vmtest",
            hv.name()
        );
        cfg.reporter.event(&Event::FileNotice { file: file_ref, message: &message });
    }
    let deadline = tokio::time::Instant::now() + file.timeout;
    let (failure, kept) = stop::until_stopped(cancel, deadline, |stop| async {
        let run = run::FileRun { hv, state, file, cfg, file_ref, stop, cases: &cases, nodes };
        run.run().await
    })
    .await;
    let verdict = failure.map(Halt::verdict).unwrap_or(Verdict::Passed);
    cases.finish(file, started, verdict, kept).reported(cfg, file_ref)
}

/// The VM shape of each node of `file`.
fn node_configs(hv: &dyn Hypervisor, file: &TestFile, cfg: &RunConfig<'_>) -> Vec<NodeConfig> {
    let private_networks = hv.private_networks();
    file.nodes
        .iter()
        .map(|n| {
            let mut spec = VmSpec::new("", &n.name);
            spec.cpus = n.cpus;
            spec.memory_mib = n.memory_mib;
            spec.boot = match &n.image {
                Some(name) => BootSpec::Image { name: name.clone() },
                None => BootSpec::Kernel { kernel: n.kernel.clone(), modules: n.modules.clone() },
            };
            spec.exec = n.exec;
            spec.accel = cfg.accel;
            spec.boot_timeout = n.boot_timeout;
            // Without private networks, nodes that kept the default network get none
            // (check_backend refused explicit ones).
            let networks = if private_networks { n.networks.clone() } else { Vec::new() };
            let watch_kernel_log = cfg.kernel_reports != KernelReports::Ignore;
            NodeConfig { spec, networks, files: n.files.clone(), watch_kernel_log }
        })
        .collect()
}

/// Why a part of a file's run did not finish.
#[derive(Debug)]
enum Halt {
    /// A step failed.
    Failed(Error),
    /// Its machines or its checkpoint could not be had (boot, slots, save).
    Broken(Error),
    /// A signal or the file's `timeout`.
    Stopped(Error),
}

impl Halt {
    fn error(&self) -> &Error {
        match self {
            Halt::Failed(e) | Halt::Broken(e) | Halt::Stopped(e) => e,
        }
    }

    fn map(self, f: impl FnOnce(Error) -> Error) -> Halt {
        match self {
            Halt::Failed(e) => Halt::Failed(f(e)),
            Halt::Broken(e) => Halt::Broken(f(e)),
            Halt::Stopped(e) => Halt::Stopped(f(e)),
        }
    }

    /// Interrupted by a signal: tear down at once, keep nothing.
    fn interrupted(&self) -> bool {
        self.error().kind() == ErrorKind::Interrupted
    }

    fn verdict(self) -> Verdict {
        match self {
            Halt::Failed(e) => Verdict::Failed(e),
            Halt::Broken(e) | Halt::Stopped(e) => Verdict::Error(e),
        }
    }
}

/// What `hv` can do, as [`TestFile::check_backend`] asks it.
pub fn backend_traits(hv: &dyn Hypervisor) -> BackendTraits<'_> {
    BackendTraits {
        name: hv.name(),
        private_networks: hv.private_networks(),
        boots_kernels: hv.boots_kernels(),
        checkpoints: hv.checkpoint_store().is_some(),
    }
}

/// `e` with `what: ` before its message; its kind and detail kept.
fn prefixed(e: Error, what: &str) -> Error {
    let out = Error::new(e.kind(), format!("{what}: {}", e.headline()));
    match e.detail() {
        Some(d) => out.with_detail(d.to_owned()),
        None => out,
    }
}
