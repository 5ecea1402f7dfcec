//! The QEMU backend of vmtest.
//!
//! Kernel mode: direct boot of a (distro) kernel with a generated initramfs whose `/init` is
//! `vmtest-agent`; the host's `/` shared read-only over 9p under a tmpfs overlay; commands run
//! through the agent over virtio-serial. KVM only when a probe boot proves it works.

pub mod accel;
pub mod agent_client;
pub mod cache;
pub mod cache_usage;
pub mod command;
pub mod fetch;
pub mod health;
pub mod image;
pub mod image_build;
pub mod initramfs;
pub mod kernel;
pub mod modules;
pub mod qemu_fetch;
pub mod qmp;
pub mod snapshot;
pub mod ssh;
pub mod vm;

use crate::accel::Accel;
use crate::cache::Cache;
use crate::command::{MachineKind, QemuCommand, ROOT_TAG};
use crate::kernel::{BootImage, Kernel};
use async_trait::async_trait;
use std::path::{Path, PathBuf};
use vmtest_core::protocol::GuestSetup;
use vmtest_core::spec::{BootSpec, VmSpec};
use vmtest_core::state::{RunDir, VmRecord};
use vmtest_core::{Check, Error, Hypervisor, Preflight, Result, Vm};

/// The static agent binary, built by build.rs.
pub const AGENT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/vmtest-agent"));

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
}

/// QEMU's gdb stub for a kernel-mode guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gdb {
    /// The loopback port; 0 picks a free one.
    pub port: u16,
    /// Start the guest halted, until gdb continues it (boots cold: a restore has no
    /// "before the kernel" to stop at).
    pub wait: bool,
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
        }
    }
}

/// What every guest of one kernel shares: found, extracted and built once.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub qemu: PathBuf,
    pub kernel: Kernel,
    pub boot: BootImage,
    pub initramfs: PathBuf,
    pub accel: Accel,
    /// One line to show the user (e.g. the TCG fallback), at most once per process.
    pub note: Option<String>,
    /// Set when the kernel's drivers could not be checked before boot: what was looked for,
    /// added to a boot failure.
    pub unchecked: Option<String>,
}

pub struct QemuBackend {
    opts: QemuOptions,
    cache: Cache,
}

impl QemuBackend {
    pub fn new(opts: QemuOptions) -> Self {
        QemuBackend { opts, cache: Cache::from_env() }
    }

    pub fn with_cache(opts: QemuOptions, cache: Cache) -> Self {
        QemuBackend { opts, cache }
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

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
            return match find_executable(&named) {
                Some(path) => Ok(Some((path, format!("from {origin}")))),
                None => Err(Error::preflight(format!(
                    "QEMU {} (from {origin}) is not an executable file; fix the path, or unset it to use \
                     the system's QEMU (apt-get install qemu-system-x86) or one vmtest fetches",
                    named.display()
                ))),
            };
        }
        if let Some(path) = find_executable(Path::new(qemu_fetch::BINARY)) {
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

    /// Find the kernel, fetching the distro's when allowed and none is found, with its
    /// modules: `modules` (else `$VMTEST_MODULES`) when given, else those found beside it.
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

    /// Everything a boot of `spec` needs, ready on disk.
    pub async fn prepare(&self, spec: &VmSpec) -> Result<Prepared> {
        let (explicit, modules) = match &spec.boot {
            BootSpec::Kernel { kernel, modules } => (kernel.clone(), modules.clone()),
            BootSpec::Image { name } => {
                return Err(Error::usage(format!(
                    "image `{name}`: an image guest is prepared by `launch`, not `prepare`"
                )))
            }
        };
        let qemu = self.qemu_binary().await?;
        let cache = self.cache.clone();
        let kernel = {
            let this = QemuBackend { opts: self.opts.clone(), cache: cache.clone() };
            tokio::task::spawn_blocking(move || this.kernel(explicit.as_deref(), modules.as_deref()))
                .await
                .map_err(|e| Error::infra(format!("kernel lookup: {e}")))??
        };
        let (boot, initramfs, unchecked) = {
            let (kernel, cache) = (kernel.clone(), cache.clone());
            let with_net = !spec.nics.is_empty();
            tokio::task::spawn_blocking(move || -> Result<(BootImage, PathBuf, Option<String>)> {
                let boot = kernel::boot_image(&kernel, &cache)?;
                let mut wanted = MachineKind::for_kernel(&boot).guest_modules().to_vec();
                if with_net {
                    wanted.extend_from_slice(command::NET_MODULES);
                }
                // A kernel that lacks a driver is refused here, before it boots.
                let guest = modules::for_guest(&cache, &kernel, &wanted)?;
                if let Some(why) = &guest.unchecked {
                    tracing::info!("{why}");
                }
                let strip = kernel.accepts_unsigned_modules();
                let initramfs = initramfs::build(&cache, AGENT, &guest.modules, strip)?;
                Ok((boot, initramfs, guest.unchecked))
            })
            .await
            .map_err(|e| Error::infra(format!("initramfs build: {e}")))??
        };
        let (accel, note) = accel::choose(spec.accel, &qemu, &boot, &self.cache).await?;
        Ok(Prepared { qemu, kernel, boot, initramfs, accel, note, unchecked })
    }

    /// The QEMU command for a guest of `spec` in `vm_dir`.
    pub fn command(&self, p: &Prepared, spec: &VmSpec, vm_dir: &Path, share_root: bool) -> QemuCommand {
        let (agent_socket, console_socket) = vm::socket_paths(vm_dir);
        QemuCommand {
            qemu: p.qemu.clone(),
            accel: p.accel,
            kernel: p.boot.clone(),
            initramfs: p.initramfs.clone(),
            cpus: spec.cpus,
            memory_mib: spec.memory_mib,
            share_root,
            agent_socket,
            console_socket,
            kernel_args: self.opts.kernel_args.clone(),
            nics: spec
                .nics
                .iter()
                .map(|n| command::QemuNic {
                    mac: n.mac_string(),
                    local: n.guest_socket.clone(),
                    remote: n.switch_socket.clone(),
                })
                .collect(),
        }
    }

    /// The raw boot floor: the same QEMU, kernel and machine, with an initramfs whose init
    /// powers off at once. What `cargo xtask bench` compares `vmtest run -- true` against.
    pub async fn floor_command(
        &self,
        spec: &VmSpec,
        dir: &Path,
    ) -> Result<(PathBuf, Vec<std::ffi::OsString>)> {
        let p = self.prepare(spec).await?;
        let floor = initramfs::build_poweroff(&self.cache, AGENT)?;
        let mut cmd = self.command(&p, spec, dir, false);
        cmd.initramfs = floor;
        cmd.kernel_args.push(vmtest_core::protocol::POWEROFF_MARKER.into());
        Ok((p.qemu.clone(), cmd.args()))
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

    /// KVM failed during a boot although the verdict said it works. Correct the verdict;
    /// under `auto` go on with TCG (the accelerator to retry with), under `--accel kvm` fail.
    pub(crate) fn after_kvm_failure(
        &self,
        choice: vmtest_core::spec::AccelChoice,
        qemu: &Path,
        boot: &BootImage,
        err: &Error,
    ) -> Result<Accel> {
        accel::record_failure(qemu, boot, &self.cache, accel::kvm_failure(err).unwrap_or(err.message()));
        if choice != vmtest_core::spec::AccelChoice::Auto {
            return Err(accel::forced_kvm_error(err));
        }
        tracing::warn!("{}; retrying under TCG (later runs use TCG at once)", err.message());
        Ok(Accel::Tcg)
    }

    /// Boot a kernel-mode guest with everything prepared: from the snapshot when there is
    /// one, else cold.
    async fn launch_prepared(&self, prepared: &Prepared, spec: &VmSpec, run: &RunDir) -> Result<Box<dyn Vm>> {
        if let Some(note) = &prepared.note {
            tracing::warn!("{note}");
        } else if prepared.accel == Accel::Tcg {
            tracing::info!("using TCG (software emulation)");
        }
        let vm_dir = run.vm_dir(&spec.node)?;
        let cmd = self.command(prepared, spec, &vm_dir, true);
        let mut record = VmRecord::new(&spec.name, &spec.node, run.id(), self.name());
        record.paths.push(vm_dir.clone());
        record.backend_data = serde_json::json!({
            "qemu": prepared.qemu,
            "kernel": prepared.kernel.image,
            "accel": prepared.accel.name(),
            "console_socket": cmd.console_socket,
            "agent_socket": cmd.agent_socket,
        });
        run.write_record(&record)?;
        let (secs, nanos) = now_unix();
        let setup = GuestSetup {
            root_tag: Some(ROOT_TAG.to_owned()),
            shares: Vec::new(),
            hostname: spec.node.clone(),
            unix_time_secs: secs,
            unix_time_nanos: nanos,
            overlay_size: "50%".into(),
            nics: spec
                .nics
                .iter()
                .map(|n| vmtest_core::protocol::GuestNic { mac: n.mac, address: n.address, prefix: n.prefix })
                .collect(),
            hosts: spec.hosts.clone(),
            entropy: random_bytes(32),
            // The tree is reached through the host root: no share of its own, so nothing
            // at boot (or in the snapshot) changes.
            modules_dir: prepared.kernel.modules.as_ref().map(|d| d.as_os_str().as_encoded_bytes().to_vec()),
        };
        // A guest held for gdb boots cold: a restored one is past the point to stop at.
        let snapshots = self.opts.snapshots && !self.opts.gdb.is_some_and(|g| g.wait);
        if snapshots {
            if let Some(vm) = self.restore(prepared, spec, run, &cmd, &vm_dir, &mut record, &setup).await? {
                return Ok(Box::new(vm));
            }
        }
        let mut extra = Vec::new();
        let mut boot_timeout = spec.boot_timeout;
        if let Some(gdb) = self.opts.gdb {
            extra = self.gdb_args(gdb, prepared)?;
            if gdb.wait {
                // The guest waits for a person at a debugger.
                boot_timeout = boot_timeout.max(std::time::Duration::from_secs(24 * 3600));
            }
        }
        let mode = vm::BootMode::Cold(setup);
        let vm = vm::QemuVm::boot_with_args(
            &cmd,
            &extra,
            &mut record,
            run,
            mode,
            boot_timeout,
            self.opts.die_with_parent,
        )
        .await?;
        Ok(Box::new(vm))
    }

    /// QEMU's arguments for the gdb stub, and the notice with the gdb command to use.
    fn gdb_args(&self, gdb: Gdb, prepared: &Prepared) -> Result<Vec<std::ffi::OsString>> {
        let port = if gdb.port == 0 { ssh::free_port()? } else { gdb.port };
        let symbols = kernel::debug_symbols(&prepared.kernel);
        let file = symbols.as_ref().unwrap_or(&prepared.boot.path);
        tracing::warn!(
            target: "vmtest_notice",
            "gdb stub on 127.0.0.1:{port}{}: gdb -ex 'target remote 127.0.0.1:{port}' {}{}",
            if gdb.wait { " (the guest waits for gdb to continue it)" } else { "" },
            file.display(),
            match symbols {
                Some(_) => String::new(),
                None => format!(
                    "  (this kernel has no debug symbols: Debian's are in linux-image-{}-dbg, \
                     /usr/lib/debug/boot/vmlinux-{})",
                    prepared.kernel.release, prepared.kernel.release
                ),
            }
        );
        let mut args: Vec<std::ffi::OsString> = vec!["-gdb".into(), format!("tcp:127.0.0.1:{port}").into()];
        if gdb.wait {
            args.push("-S".into());
        }
        Ok(args)
    }

    /// Start the guest from its snapshot, making the snapshot first if there is none.
    /// `Ok(None)`: no snapshot could be made or restored; the caller boots cold. A guest of
    /// this shape that fails to boot at all is an error: a cold boot would fail the same way.
    #[allow(clippy::too_many_arguments)]
    async fn restore(
        &self,
        p: &Prepared,
        spec: &VmSpec,
        run: &RunDir,
        cmd: &QemuCommand,
        vm_dir: &Path,
        record: &mut VmRecord,
        setup: &GuestSetup,
    ) -> Result<Option<vm::QemuVm>> {
        let state = match snapshot::path_for(&self.cache, &p.qemu, &cmd.args(), vm_dir) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("no snapshot: {e}");
                return Ok(None);
            }
        };
        let mut made = None;
        if !state.is_file() {
            let started = std::time::Instant::now();
            match self.make_snapshot(p, spec, run, &state).await {
                Ok(()) => {
                    made = Some(started.elapsed());
                    cache_usage::bound_snapshots(&self.cache, &state);
                    tracing::info!("saved a snapshot in {:?}: {}", started.elapsed(), state.display())
                }
                Err(e) if e.kind() == vmtest_core::ErrorKind::Boot || accel::is_kvm_failure(&e) => {
                    return Err(e)
                }
                Err(e) => {
                    tracing::warn!("could not save a snapshot ({e}); booting without one");
                    return Ok(None);
                }
            }
        }
        let mode = vm::BootMode::Restore { state: &state, setup: setup.clone() };
        match vm::QemuVm::boot(cmd, record, run, mode, spec.boot_timeout, self.opts.die_with_parent).await {
            Ok(mut vm) => {
                cache_usage::touch(&state);
                if let Some(took) = made {
                    vm.add_timing("snapshot", took);
                }
                Ok(Some(vm))
            }
            // The accelerator failed, not the snapshot.
            Err(e) if accel::is_kvm_failure(&e) => Err(e),
            Err(e) => {
                // A snapshot that does not restore is useless: drop it, boot cold this time.
                tracing::warn!("restoring {} failed ({e}); discarding it and booting cold", state.display());
                let _ = std::fs::remove_file(&state);
                Ok(None)
            }
        }
    }

    /// Boot a guest of this shape to "agent ready" and save its state to `state`.
    async fn make_snapshot(&self, p: &Prepared, spec: &VmSpec, run: &RunDir, state: &Path) -> Result<()> {
        let node = format!("{}-snapshot", spec.node);
        let dir = run.vm_dir(&node)?;
        let cmd = self.command(p, spec, &dir, true);
        let mut record = VmRecord::new(&format!("{}-snapshot", spec.name), &node, run.id(), self.name());
        record.paths.push(dir.clone());
        run.write_record(&record)?;
        let qmp = dir.join("qmp.sock");
        let mode = vm::BootMode::SnapshotSource { qmp: &qmp };
        let saved = match vm::QemuVm::boot(&cmd, &mut record, run, mode, spec.boot_timeout, true).await {
            Ok(vm) => {
                let saved = snapshot::save(&qmp, state).await;
                let _ = vm.kill().await;
                saved
            }
            Err(e) => Err(e),
        };
        let _ = std::fs::remove_dir_all(&dir);
        run.remove_record(&node);
        saved
    }
}

/// `n` bytes from the kernel's random source.
fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    // SAFETY: getrandom writes at most `buf.len()` bytes into `buf`.
    let got = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    buf.truncate(got.max(0) as usize);
    buf
}

/// Resolve a program name on `PATH` (or check a path), as a shell would.
pub fn find_executable(name: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let is_exec =
        |p: &Path| p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false);
    if name.components().count() > 1 {
        return is_exec(name).then(|| name.to_owned());
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(name))
        .find(|p| is_exec(p))
}

fn now_unix() -> (i64, u32) {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos())
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
        if let BootSpec::Image { name } = &spec.boot {
            return image::launch(self, spec, run, name).await;
        }
        let mut prepared = self.prepare(spec).await?;
        loop {
            match self.launch_prepared(&prepared, spec, run).await {
                Err(e) if accel::is_kvm_failure(&e) && prepared.accel == Accel::Kvm => {
                    prepared.accel =
                        self.after_kvm_failure(spec.accel, &prepared.qemu, &prepared.boot, &e)?;
                    // The failed attempt's sockets and logs go; the retry starts afresh.
                    let _ = std::fs::remove_dir_all(run.vm_dir(&spec.node)?);
                }
                Err(e) if e.kind() == vmtest_core::ErrorKind::Boot => {
                    return Err(match (&prepared.unchecked, e.hint().map(str::to_owned)) {
                        (Some(why), Some(hint)) => e.with_hint(format!("{hint}; {why}")),
                        (Some(why), None) => e.with_hint(why.clone()),
                        (None, _) => e,
                    })
                }
                other => return other,
            }
        }
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
    match free_bytes(existing) {
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

fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: a valid path and a zeroed out-struct.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(c.as_ptr(), &mut st) == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
    }
}
