//! The QEMU backend of vmtest.
//!
//! Kernel mode: direct boot of a (distro) kernel with a generated initramfs whose `/init` is
//! `vmtest-agent`; the host's `/` shared read-only over 9p under a tmpfs overlay; commands run
//! through the agent over virtio-serial. Image mode: the same boot of an image's own kernel,
//! on a throwaway qcow2 overlay of the image's disk. KVM only when a probe boot proves it works.
//!
//! An embedding program needs [`QemuBackend`] and [`QemuOptions`]; the public modules are
//! the cache and what fills it: [`cache`] and [`cache_usage`] (what it holds, pruning),
//! [`kernel`] and [`fetch`] (kernels), [`qemu_fetch`] (QEMU), [`image_build`] (images).

#![warn(missing_docs)]

mod accel;
mod agent_client;
mod boot;
pub mod cache;
pub mod cache_usage;
mod command;
mod dump;
pub mod fetch;
mod health;
mod host;
mod image;
pub mod image_build;
mod initramfs;
pub mod kernel;
mod modules;
pub mod qemu_fetch;
mod qmp;
mod saved;
mod settings;
mod snapshot;
mod ssh;
mod vm;

pub use command::Gdb;

use crate::cache::Cache;
use crate::command::Root;
use crate::kernel::Kernel;
use async_trait::async_trait;
use std::path::{Path, PathBuf};
use vmtest_core::spec::{BootSpec, VmSpec};
use vmtest_core::state::{RunDir, VmRecord};
use vmtest_core::{Check, Error, Hypervisor, Preflight, Result, Vm};

/// How the backend behaves; the defaults suit `vmtest run`.
#[derive(Clone, Debug)]
pub struct QemuOptions {
    /// The QEMU binary; default `$VMTEST_QEMU`, else `qemu-system-x86_64` on `PATH`, else
    /// one fetched into the cache.
    pub qemu: Option<PathBuf>,
    /// Fetch the distro's kernel, and QEMU, into the cache when none is found.
    pub auto_fetch: bool,
    /// Kill QEMU when the runner dies. Off when a VM may be kept after the run.
    pub die_with_parent: bool,
    /// Extra kernel command-line words.
    pub kernel_args: Vec<String>,
    /// Start guests from a snapshot taken at "agent ready" (made on first use) instead of
    /// booting them.
    pub snapshots: bool,
    /// Let the preflight probe KVM when no verdict is cached (`vmtest doctor`); otherwise it
    /// only reports a cached verdict, since `auto` runs the preflight before every run.
    pub prove_kvm: bool,
    /// Expose QEMU's gdb stub on loopback (kernel mode).
    pub gdb: Option<Gdb>,
    /// Dump a guest's memory into this directory when its kernel panics, as an ELF core
    /// (`vmcore-<vm>.elf`), if it is no larger than `$VMTEST_DUMP_MAX` (default 2G).
    pub dump_dir: Option<PathBuf>,
}

impl Default for QemuOptions {
    fn default() -> Self {
        QemuOptions {
            qemu: None,
            auto_fetch: true,
            die_with_parent: true,
            kernel_args: Vec::new(),
            snapshots: true,
            prove_kvm: false,
            gdb: None,
            dump_dir: None,
        }
    }
}

/// The QEMU [`Hypervisor`]: boots kernel-mode and image-mode guests with the QEMU, kernel and
/// images it finds (or fetches) through its [`Cache`].
pub struct QemuBackend {
    opts: QemuOptions,
    cache: Cache,
}

impl QemuBackend {
    /// A backend with the cache of the environment ([`Cache::from_env`]).
    pub fn new(opts: QemuOptions) -> Self {
        QemuBackend { opts, cache: Cache::from_env() }
    }

    /// A backend that keeps kernels, QEMU, initramfs, snapshots and images in `cache`.
    pub fn with_cache(opts: QemuOptions, cache: Cache) -> Self {
        QemuBackend { opts, cache }
    }

    /// Where this backend keeps what it fetches and builds.
    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// The options it was made with.
    pub fn options(&self) -> &QemuOptions {
        &self.opts
    }

    /// The QEMU binary to run and where it came from, without fetching: `None` when there
    /// is none yet (no `VMTEST_QEMU`, none on `PATH`, none fetched).
    pub fn locate_qemu(&self) -> Result<Option<(PathBuf, String)>> {
        let named = match &self.opts.qemu {
            Some(q) => Some((q.clone(), "the embedding program")),
            None => std::env::var_os("VMTEST_QEMU")
                .filter(|v| !v.is_empty())
                .map(|v| (PathBuf::from(v), "$VMTEST_QEMU")),
        };
        if let Some((named, origin)) = named {
            return match host::find_executable(&named) {
                Some(path) => Ok(Some((path, format!("from {origin}")))),
                None => Err(Error::preflight(format!(
                    "QEMU {} (from {origin}) is not an executable file; fix the path, or unset it to use \
                     the system's QEMU (apt-get install qemu-system-x86) or one vmtest fetches",
                    named.display()
                ))),
            };
        }
        if let Some(path) = host::find_executable(Path::new(qemu_fetch::BINARY)) {
            return Ok(Some((path, "on PATH".into())));
        }
        Ok(qemu_fetch::cached(&self.cache)
            .map(|f| (f.binary, format!("{} {} fetched into the cache", qemu_fetch::PACKAGE, f.version))))
    }

    /// The QEMU binary to run, fetching the distro's into the cache when there is none and
    /// fetching is allowed.
    pub async fn qemu_binary(&self) -> Result<PathBuf> {
        if let Some((path, _)) = self.locate_qemu()? {
            return Ok(path);
        }
        if !self.opts.auto_fetch {
            return Err(Error::preflight(
                "QEMU not found (qemu-system-x86_64 on PATH, $VMTEST_QEMU, or fetched); install it: \
                 apt-get install qemu-system-x86 (Debian/Ubuntu), dnf install qemu-system-x86-core (Fedora), \
                 or run `vmtest qemu fetch`",
            ));
        }
        let cache = self.cache.clone();
        let fetched = tokio::task::spawn_blocking(move || qemu_fetch::fetch(&cache))
            .await
            .map_err(|e| Error::infra(format!("QEMU fetch: {e}")))??;
        Ok(fetched.binary)
    }

    /// Find the kernel, fetching the distro's when allowed and none is found.
    /// with its modules: `modules` (else `$VMTEST_MODULES`) when given, else those found
    /// beside it.
    pub fn kernel(&self, explicit: Option<&Path>, modules: Option<&Path>) -> Result<Kernel> {
        let k = self.find_kernel(explicit)?;
        let env = std::env::var_os("VMTEST_MODULES").filter(|v| !v.is_empty()).map(PathBuf::from);
        match modules.map(Path::to_owned).or(env) {
            Some(dir) => k.with_modules(&dir),
            None => Ok(k),
        }
    }

    fn find_kernel(&self, explicit: Option<&Path>) -> Result<Kernel> {
        if let Some(k) = kernel::locate(explicit, &self.cache)? {
            return Ok(k);
        }
        if !self.opts.auto_fetch {
            return Err(Error::preflight(
                "no kernel found (no --kernel, no $VMTEST_KERNEL, no readable /boot/vmlinuz-*, none cached); \
                 run `vmtest kernel fetch` or pass --kernel PATH",
            ));
        }
        tracing::warn!(
            "no kernel found; fetching the distro's kernel package into {} (once)",
            self.cache.root().display()
        );
        fetch::fetch(&self.cache, None)
    }

    /// The raw boot floor: the same QEMU, kernel and machine, with an initramfs whose init
    /// powers off at once. What `cargo xtask bench` compares `vmtest run -- true` against.
    pub async fn floor_command(
        &self,
        spec: &VmSpec,
        dir: &Path,
    ) -> Result<(PathBuf, Vec<std::ffi::OsString>)> {
        let p = self.prepare(spec).await?;
        let mut cmd = self.plan(&p, spec, dir).await?;
        cmd.root = Root::None;
        cmd.initramfs = initramfs::build_poweroff(&self.cache, initramfs::AGENT)?;
        cmd.kernel_args.push(vmtest_core::protocol::POWEROFF_MARKER.into());
        Ok((p.qemu, cmd.args()))
    }
}

impl QemuBackend {
    /// The acceleration line of the preflight: the verdict for the default kernel and its
    /// evidence. Only a cached verdict unless [`QemuOptions::prove_kvm`] asks for a probe.
    async fn acceleration_check(&self, qemu: &Path, kernel: &Kernel) -> Check {
        let boot = match kernel::boot_image(kernel, &self.cache) {
            Ok(b) => b,
            Err(e) => {
                return Check::warn(
                    "acceleration",
                    format!("cannot tell: {}", e.message()),
                    "check the kernel",
                )
            }
        };
        let verdict = if self.opts.prove_kvm {
            accel::verdict(qemu, &boot, &self.cache).await.ok()
        } else {
            accel::cached_verdict(qemu, &boot, &self.cache)
        };
        match verdict {
            Some(v) if v.usable => Check::ok("acceleration", format!("KVM works: {}", v.evidence)),
            Some(v) => Check::warn(
                "acceleration",
                format!("no usable KVM, TCG is used (slower): {}", v.evidence),
                "on bare metal, enable virtualization in firmware and give your user access to /dev/kvm; \
                 the verdict is made again after a reboot or a new QEMU or kernel",
            ),
            None => Check::ok(
                "acceleration",
                format!(
                    "KVM not proven yet: the first run boots the kernel under KVM (at most {}s) to decide",
                    accel::PROBE_DEADLINE.as_secs()
                ),
            ),
        }
    }
}

#[async_trait]
impl Hypervisor for QemuBackend {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn private_networks(&self) -> bool {
        true
    }

    fn boots_kernels(&self) -> bool {
        true
    }

    async fn preflight(&self) -> Preflight {
        let mut pf = Preflight::default();
        // No `qemu --version` here: `auto` runs this before every run, and a spawn costs.
        let qemu = match self.locate_qemu() {
            Ok(Some((q, origin))) => {
                pf.push(Check::ok("qemu", format!("{} ({origin})", q.display())));
                Some(q)
            }
            Ok(None) if self.opts.auto_fetch => {
                pf.push(Check::warn(
                    "qemu",
                    "none installed; the first run fetches the distro's qemu-system-x86 into the cache (no root)",
                    "run `vmtest qemu fetch` now, or apt-get install qemu-system-x86",
                ));
                None
            }
            Ok(None) => {
                pf.push(Check::fail(
                    "qemu",
                    "qemu-system-x86_64 not found",
                    "apt-get install qemu-system-x86, or run `vmtest qemu fetch`",
                ));
                None
            }
            Err(e) => {
                pf.push(Check::fail("qemu", e.message().to_owned(), "fix VMTEST_QEMU or unset it"));
                None
            }
        };
        pf.push(disk_check(self.cache.root()));
        let kernel = match kernel::locate(None, &self.cache) {
            Ok(Some(k)) => {
                pf.push(Check::ok(
                    "kernel",
                    format!("{} {} (from {})", k.image.display(), k.release, k.origin),
                ));
                Some(k)
            }
            Ok(None) if self.opts.auto_fetch => {
                pf.push(Check::warn(
                    "kernel",
                    "no kernel found yet; the first run fetches the distro's kernel package",
                    "run `vmtest kernel fetch` now, or pass --kernel PATH",
                ));
                None
            }
            Ok(None) => {
                pf.push(Check::fail(
                    "kernel",
                    "no kernel found",
                    "run `vmtest kernel fetch` or pass --kernel PATH",
                ));
                None
            }
            Err(e) => {
                pf.push(Check::fail(
                    "kernel",
                    e.message().to_owned(),
                    "pass a readable kernel with --kernel PATH",
                ));
                None
            }
        };
        if let (Some(q), Some(k)) = (&qemu, &kernel) {
            pf.push(self.acceleration_check(q, k).await);
        }
        pf
    }

    async fn launch(&self, spec: &VmSpec, run: &RunDir) -> Result<Box<dyn Vm>> {
        match &spec.boot {
            BootSpec::Kernel { .. } => Ok(Box::new(self.start(spec, run).await?.vm)),
            BootSpec::Image { .. } => image::launch(self, spec, run).await,
        }
    }

    fn checkpoint_store(&self) -> Option<PathBuf> {
        // Kept within the snapshots' bound: each save of a guest applies it (QemuVm::save).
        Some(self.cache.root().join("checkpoints"))
    }

    async fn state_identity(&self, spec: &VmSpec) -> Result<String> {
        let p = self.prepare(spec).await?;
        let mut parts = vec![
            format!("vmtest {}", env!("CARGO_PKG_VERSION")),
            format!("accel {}", p.accel.name()),
            format!("args {:?}", self.opts.kernel_args),
        ];
        let mut files = vec![p.qemu.clone(), p.boot.path.clone(), p.initramfs.clone()];
        if let boot::System::Image { base, .. } = &p.system {
            files.push(base.clone());
        }
        for f in files {
            parts.push(
                cache::file_identity(&f).map_err(|e| Error::io(format!("cannot stat {}", f.display()), e))?,
            );
        }
        Ok(parts.join("\n"))
    }

    async fn list_images(&self) -> Result<Vec<String>> {
        Ok(image_build::ImageStore::new(&self.cache)?.list().into_iter().map(|i| i.info.name).collect())
    }

    async fn attach(&self, record: &VmRecord) -> Result<Box<dyn Vm>> {
        Ok(Box::new(vm::QemuVm::attach(record).await?))
    }

    async fn destroy_record(&self, record: &VmRecord) -> Result<()> {
        for p in &record.processes {
            if p.is_alive() {
                // SAFETY: the pid and its start time match the QEMU this record started.
                unsafe { libc::kill(p.pid as i32, libc::SIGKILL) };
                for _ in 0..100 {
                    if !p.is_alive() {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            }
        }
        for path in &record.paths {
            let res = if path.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
            if let Err(e) = res {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(Error::io(format!("cannot remove {}", path.display()), e));
                }
            }
        }
        Ok(())
    }
}

/// Free space where VM files go (the cache: kernels, initramfs, images), warned under 10 GB.
fn disk_check(dir: &Path) -> Check {
    const WARN_BELOW: u64 = 10 << 30;
    let existing = dir.ancestors().find(|d| d.exists()).unwrap_or(Path::new("/"));
    match host::free_bytes(existing) {
        Some(free) if free < WARN_BELOW => Check::warn(
            "disk",
            format!("{:.1} GB free on the filesystem of {}", free as f64 / 1e9, existing.display()),
            "free some space, or set VMTEST_CACHE_DIR to a larger filesystem",
        ),
        Some(free) => Check::ok(
            "disk",
            format!("{:.1} GB free on the filesystem of {}", free as f64 / 1e9, existing.display()),
        ),
        None => {
            Check::warn("disk", format!("cannot tell the free space of {}", existing.display()), "check `df`")
        }
    }
}
