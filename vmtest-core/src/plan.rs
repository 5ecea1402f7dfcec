//! One command in one fresh VM, from resolved settings to its outcome: what `vmtest run`
//! does once its flags are parsed, for any program that embeds vmtest.
//!
//! ```no_run
//! # async fn demo() -> vmtest_core::Result<()> {
//! use vmtest_core::{cancel::Cancel, config, events::Silent, plan::RunPlan, registry::Registry};
//! # let registry = Registry::new();
//! let cwd = std::env::current_dir().unwrap();
//! let settings = config::resolve(&config::Flags::default(), &config::process_env, &cwd)?;
//! let plan = RunPlan::new(&settings)?;
//! let request = vmtest_core::exec::ExecRequest::new(["uname", "-r"]);
//! let state = vmtest_core::state::StateDir::from_env();
//! let outcome = plan.run(&registry, &state, request, &Silent, &Cancel::never()).await?;
//! println!("{}", outcome.status);
//! # Ok(()) }
//! ```

use crate::cancel::Cancel;
use crate::config::{blame, Effective, Val};
use crate::error::{Error, Result};
use crate::events::Reporter;
use crate::exec::ExecRequest;
use crate::lock::{self, SlotPool};
use crate::registry::{BackendSettings, Registry};
use crate::retry::RetryPolicy;
use crate::runner::{self, KeepPolicy, KernelReports, RunOptions, RunOutcome};
use crate::spec::{BootSpec, VmSpec};
use crate::state::StateDir;
use crate::sweep;
use std::path::PathBuf;

/// Everything one command run needs, resolved from defaults, `vmtest.toml`, the
/// environment and flags ([`crate::config::resolve`]).
#[derive(Clone, Debug)]
pub struct RunPlan {
    /// The VM's shape and boot source.
    pub vm: VmSpec,
    /// A backend name or `auto`, and where it came from.
    pub backend: Val<String>,
    /// What the backends are made with (snapshots, gdb and the like can be changed here).
    pub settings: BackendSettings,
    /// The kernel file asked for, checked once the backend is known to boot kernels.
    pub kernel: Val<Option<PathBuf>>,
    /// The kernel's modules asked for, checked with the kernel.
    pub modules: Val<Option<PathBuf>>,
    pub keep: KeepPolicy,
    pub kernel_reports: KernelReports,
    /// VMs at once over every vmtest process of this user.
    pub max_vms: usize,
    /// Where to keep the logs of a failed run ([`RunPlan::keep_failure_logs`] sets it).
    pub failure_logs: Option<PathBuf>,
}

impl RunPlan {
    /// One plan per kernel of a kernel matrix (one plan when `settings` name one kernel or
    /// none). Each plan takes its own VM slot, so they may run at once within `max_vms`.
    pub fn per_kernel(settings: &Effective) -> Result<Vec<RunPlan>> {
        let plan = RunPlan::new(settings)?;
        if settings.kernel.value.len() < 2 {
            return Ok(vec![plan]);
        }
        let source = &settings.kernel.source;
        Ok(settings
            .kernel
            .value
            .iter()
            .map(|k| {
                let mut one = plan.clone();
                one.vm.boot =
                    BootSpec::Kernel { kernel: Some(k.clone()), modules: plan.modules.value.clone() };
                one.kernel = Val { value: Some(k.clone()), source: source.clone() };
                one
            })
            .collect())
    }

    /// The plan of `settings` (its first kernel, for a matrix); a bad value is a usage
    /// error naming where it was set.
    pub fn new(settings: &Effective) -> Result<RunPlan> {
        let vm = settings.vm_spec()?;
        let max_vms = settings.max_vms.value.unwrap_or_else(|| lock::default_max_vms(vm.memory_mib));
        if max_vms == 0 {
            return Err(Error::usage(format!(
                "max-vms (from {}) must be at least 1",
                settings.max_vms.source
            )));
        }
        Ok(RunPlan {
            vm,
            backend: settings.backend.clone(),
            settings: settings.backend_settings(),
            kernel: Val {
                value: settings.kernel.value.first().cloned(),
                source: settings.kernel.source.clone(),
            },
            modules: settings.modules.clone(),
            keep: settings.keep.value,
            kernel_reports: settings.kernel_warnings.value,
            max_vms,
            failure_logs: None,
        })
    }

    /// Keep a failed run's logs in `dir`, and a guest memory dump there when its kernel
    /// panics (on backends that can dump).
    pub fn keep_failure_logs(&mut self, dir: Option<PathBuf>) {
        self.settings.dump_dir = dir.clone();
        self.failure_logs = dir;
    }

    /// Sweep what dead runs left, choose the backend, and run `request` in a fresh VM:
    /// booted (or restored), used, torn down (or kept), whatever happens.
    pub async fn run(
        self,
        registry: &Registry,
        state: &StateDir,
        request: ExecRequest,
        reporter: &dyn Reporter,
        cancel: &Cancel,
    ) -> Result<RunOutcome> {
        sweep::sweep_orphans(state, &registry.build(&self.settings).refs()).await;
        let backend =
            blame(registry.choose(&self.backend.value, &self.settings).await, &self.backend.source)?;
        // Only a backend that boots kernels reads a kernel file; the others refuse kernels
        // with their own message.
        if backend.boots_kernels() {
            self.check_kernel_file()?;
        }
        let opts = RunOptions {
            retry: RetryPolicy::default(),
            keep: self.keep,
            slots: Some(SlotPool::from_env(state.path(), self.max_vms)?),
            reporter,
            failure_logs: self.failure_logs,
            kernel_reports: self.kernel_reports,
        };
        runner::run_command(backend.as_ref(), state, self.vm, request, opts, cancel.cancelled()).await
    }

    fn check_kernel_file(&self) -> Result<()> {
        match &self.kernel.value {
            Some(k) if !k.is_file() => Err(Error::usage(format!(
                "cannot read kernel {} (from {}): not a file; give the path of a bzImage or vmlinux, or leave \
                 it out to use /boot or the cache (`vmtest kernel list` shows what vmtest finds)",
                k.display(),
                self.kernel.source
            ))),
            _ => match &self.modules.value {
                Some(m) if !m.is_dir() => Err(Error::usage(format!(
                    "kernel modules {} (from {}): not a directory; give the INSTALL_MOD_PATH of `make \
                     modules_install` or its lib/modules/<release>",
                    m.display(),
                    self.modules.source
                ))),
                _ => Ok(()),
            },
        }
    }
}
