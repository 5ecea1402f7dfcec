//! The contracts every backend implements.

use crate::console::Console;
use crate::error::Result;
use crate::exec::{ExecOutput, ExecRequest};
use crate::spec::VmSpec;
use crate::state::{RunDir, VmRecord};
use async_trait::async_trait;
use std::path::{Path, PathBuf};

/// The outcome of one pre-flight check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    Ok,
    /// Works, but worse than it could (e.g. no KVM, low disk).
    Warn,
    /// The backend cannot run until this is fixed.
    Fail,
}

/// One pre-flight check: what was looked at, what was found, how to fix it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Check {
    pub name: String,
    pub status: CheckStatus,
    pub detail: String,
    pub fix: Option<String>,
}

impl Check {
    pub fn ok(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Check { name: name.into(), status: CheckStatus::Ok, detail: detail.into(), fix: None }
    }

    pub fn warn(name: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Check { name: name.into(), status: CheckStatus::Warn, detail: detail.into(), fix: Some(fix.into()) }
    }

    pub fn fail(name: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Check { name: name.into(), status: CheckStatus::Fail, detail: detail.into(), fix: Some(fix.into()) }
    }
}

/// Everything a backend checked before launching.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Preflight {
    pub checks: Vec<Check>,
}

impl Preflight {
    pub fn push(&mut self, check: Check) {
        self.checks.push(check);
    }

    /// True when no check failed.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.status != CheckStatus::Fail)
    }

    /// The first failed check, if any.
    pub fn first_failure(&self) -> Option<&Check> {
        self.checks.iter().find(|c| c.status == CheckStatus::Fail)
    }

    /// The first failed check as a one-line preflight error.
    pub fn into_result(self) -> Result<Preflight> {
        match self.first_failure() {
            None => Ok(self),
            Some(c) => {
                let fix = c.fix.as_deref().map(|f| format!("; {f}")).unwrap_or_default();
                Err(crate::Error::preflight(format!("{}: {}{fix}", c.name, c.detail)))
            }
        }
    }
}

/// What a VM can do beyond exec. A backend answers "unsupported" instead of pretending.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Capabilities {
    /// Private network links between VMs.
    pub network: bool,
    /// Save and restore the whole VM.
    pub snapshots: bool,
    /// Several commands at once.
    pub concurrent_exec: bool,
    /// An interactive serial console.
    pub console: bool,
    /// The guest sees the host's files at the same paths.
    pub host_root: bool,
}

/// A hypervisor on this host.
#[async_trait]
pub trait Hypervisor: Send + Sync {
    /// Short name: `qemu`, `bhyve`, `multipass`.
    fn name(&self) -> &'static str;

    /// Is it installed, is its daemon up, is acceleration usable, is there disk.
    async fn preflight(&self) -> Preflight;

    /// Can its VMs join the runner's private L2 networks ([`VmSpec::nics`]), with partitions
    /// and link faults? Default: no; multi-VM tests then run without private networks.
    fn private_networks(&self) -> bool {
        false
    }

    /// Can it boot a given kernel file (kernel mode, `BootSpec::Kernel { kernel: Some(..) }`)?
    /// Default: no, it boots images.
    fn boots_kernels(&self) -> bool {
        false
    }

    /// Boot a VM and wait until commands can run in it. Everything teardown needs is written
    /// to the run dir's record before anything is started.
    async fn launch(&self, spec: &VmSpec, dir: &RunDir) -> Result<Box<dyn Vm>>;

    /// VMs of this backend that vmtest created, as the backend itself sees them (by the
    /// `vmt-` name prefix or an owner tag), with as much of a record as the backend can
    /// rebuild. The orphan sweep compares them with the records in the state dir, so a VM
    /// whose record was never written is still found. Default: none.
    async fn list_owned(&self) -> Result<Vec<VmRecord>> {
        Ok(Vec::new())
    }

    /// Import a raw disk image file as the named base image (`vmtest image import`).
    /// Returns where it now lives. Default: this backend has no image store.
    async fn import_image(&self, file: &Path, name: &str, force: bool) -> Result<String> {
        let _ = (file, force);
        Err(crate::Error::usage(format!(
            "the {} backend cannot import images (asked for `{name}`)",
            self.name()
        )))
    }

    /// The names of the base images this backend has. Default: none.
    async fn list_images(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    /// Reach a VM that outlived its runner (`--keep`), from its record: exec, console.
    /// Dropping the handle leaves the VM running. Default: unsupported.
    async fn attach(&self, record: &VmRecord) -> Result<Box<dyn Vm>> {
        Err(crate::Error::usage(format!("the {} backend cannot attach to {}", self.name(), record.name)))
    }

    /// Destroy what a record describes (the orphan sweep, `vmtest destroy`). Idempotent: a
    /// part already gone is not an error.
    async fn destroy_record(&self, record: &VmRecord) -> Result<()>;

    /// Where this backend keeps the checkpoints of test files (`checkpoint = "..."`), or
    /// `None` when its guests cannot be saved ([`Vm::save`]). Default: `None`.
    fn checkpoint_store(&self) -> Option<PathBuf> {
        None
    }

    /// What a saved state of a guest of `spec` depends on beyond the spec itself: the
    /// identities of the hypervisor, the kernel and the image, and vmtest's version. Hashed
    /// into checkpoint keys, so that a rebuilt image or another QEMU makes a new checkpoint
    /// instead of restoring a stale one. Default: unsupported.
    async fn state_identity(&self, spec: &VmSpec) -> Result<String> {
        Err(crate::Error::usage(format!("the {} backend cannot save {}", self.name(), spec.node)))
    }
}

/// A running VM.
#[async_trait]
pub trait Vm: Send + Sync {
    fn name(&self) -> &str;

    fn capabilities(&self) -> Capabilities;

    /// Run a command and wait for it. A non-zero status is an `Ok`; `Err` means the command
    /// could not be run or its deadline passed.
    async fn exec(&self, req: ExecRequest) -> Result<ExecOutput>;

    async fn copy_in(&self, host: &Path, guest: &Path) -> Result<()>;

    async fn copy_out(&self, guest: &Path, host: &Path) -> Result<()>;

    /// The serial console.
    fn console(&self) -> Result<Box<dyn Console>>;

    /// Stop the guest cleanly if it can, then make sure everything is gone. Idempotent.
    async fn shutdown(&self) -> Result<()>;

    /// Stop at once. Idempotent.
    async fn kill(&self) -> Result<()>;

    /// Let the VM outlive this handle (`--keep`): dropping it no longer tears anything down.
    fn detach(&self);

    /// Make the serial console interactive (e.g. start a shell on it where the guest runs
    /// no getty). Default: nothing to do.
    async fn prepare_interactive_console(&self) -> Result<()> {
        Ok(())
    }

    /// How long each boot phase took (e.g. `boot`, `agent-ready`), in order.
    fn boot_timings(&self) -> Vec<(&'static str, std::time::Duration)> {
        Vec::new()
    }

    /// Where the guest kernel's messages appear (its console), from now on, for watching
    /// them for bug reports. `None`: this backend does not show them (the default).
    fn kernel_log(&self) -> Option<Box<dyn Console>> {
        None
    }

    /// Save the guest's whole state (memory, devices and disk) into `dir` (an existing, empty
    /// directory) and keep the guest running. A later launch of the same spec with
    /// [`VmSpec::resume`] set to `dir` starts from that state instead of booting.
    /// [`Capabilities::snapshots`] says whether this works. Default: unsupported.
    async fn save(&self, dir: &Path) -> Result<()> {
        Err(crate::Error::usage(format!("{} cannot be saved (to {})", self.name(), dir.display())))
    }
}
