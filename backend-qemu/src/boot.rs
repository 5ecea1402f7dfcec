//! One boot for kernel mode and image mode: a `VmSpec` becomes the QEMU command a guest is
//! started with ([`QemuBackend::plan`]), and the guest is started from it
//! ([`QemuBackend::start`]): from a snapshot when there is one, else cold, with one KVM ->
//! TCG retry.
//!
//! The modes differ only in data ([`System`]): where the kernel comes from (the host's, or
//! the image's own, copied out at build time), which modules the initramfs carries, and what
//! the guest's `/` is (the host's over 9p, or a throwaway qcow2 overlay on the image, with an
//! SSH forward when commands go over SSH).

use crate::accel::{self, Accel};
use crate::command::{Gdb, MachineKind, QemuCommand, QemuNic, Root, SshForward, NET_MODULES};
use crate::command::{ROOT_TAG, USER_NET_ADDR, USER_NET_MAC};
use crate::dump::Dump;
use crate::image_build::ImageStore;
use crate::initramfs::{self, AGENT};
use crate::kernel::{self, BootImage, Kernel};
use crate::saved::SavedGuest;
use crate::ssh::{self, SshTarget};
use crate::vm::{self, BootMode, QemuVm, Saveable};
use crate::{host, modules, snapshot, QemuBackend};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;
use vmtest_core::protocol::{GuestNic, GuestSetup};
use vmtest_core::spec::{AccelChoice, BootSpec, ExecVia, VmSpec};
use vmtest_core::state::{RunDir, VmRecord};
use vmtest_core::{Error, Hypervisor, Result};

/// What a guest runs on: the part of a boot that differs between the two modes.
#[derive(Clone, Debug)]
pub(crate) enum System {
    /// Kernel mode: a kernel from the host (or the cache) and the host's `/`.
    Host,
    /// Image mode: the image `name`, its own kernel, and an overlay on its disk, `base`.
    Image { name: String, kernel: PathBuf, base: PathBuf },
}

impl System {
    /// The modules the initramfs carries for a guest on `machine`.
    fn guest_modules(&self, machine: MachineKind, with_net: bool) -> Vec<&'static str> {
        match self {
            System::Host => {
                let mut wanted = machine.guest_modules().to_vec();
                if with_net {
                    wanted.extend_from_slice(NET_MODULES);
                }
                wanted
            }
            System::Image { .. } => machine.image_modules().to_vec(),
        }
    }
}

/// What every guest of one kernel (or image) shares: found, extracted and built once.
#[derive(Clone, Debug)]
pub(crate) struct Prepared {
    pub qemu: PathBuf,
    pub kernel: Kernel,
    pub boot: BootImage,
    pub initramfs: PathBuf,
    pub accel: Accel,
    /// One line to show the user (e.g. the TCG fallback), at most once per process.
    pub note: Option<String>,
    pub system: System,
    /// Set when the kernel's drivers could not be checked before boot: what was looked for,
    /// added to a boot failure.
    pub unchecked: Option<String>,
}

/// A started guest.
pub(crate) struct Started {
    pub vm: QemuVm,
    /// How to reach its sshd (an image guest whose commands go over SSH).
    pub ssh: Option<SshTarget>,
    /// When its first QEMU started (the boot timeout counts from here).
    pub since: Instant,
    /// Whether it was restored (from a snapshot or a saved guest) rather than booted.
    pub restored: bool,
}

/// The image guest's overlay and SSH key, in its VM directory.
const OVERLAY: &str = "disk.qcow2";
const SSH_KEY: &str = "ssh_key";

impl QemuBackend {
    /// Everything a boot of `spec` needs, ready on disk.
    pub(crate) async fn prepare(&self, spec: &VmSpec) -> Result<Prepared> {
        let (system, explicit, modules) = match &spec.boot {
            BootSpec::Kernel { kernel, modules } => (System::Host, kernel.clone(), modules.clone()),
            BootSpec::Image { name } => {
                let image = ImageStore::new(&self.cache)?.find(name)?;
                let system =
                    System::Image { name: name.clone(), kernel: image.kernel_image(), base: image.base() };
                (system, None, None)
            }
        };
        let qemu = self.qemu_binary().await?;
        let (kernel, boot, initramfs, unchecked) = {
            let this = QemuBackend { opts: self.opts.clone(), cache: self.cache.clone() };
            let (sys, with_net) = (system.clone(), !spec.nics.is_empty());
            tokio::task::spawn_blocking(move || {
                this.boot_files(&sys, explicit.as_deref(), modules.as_deref(), with_net)
            })
            .await
            .map_err(|e| Error::infra(format!("boot files: {e}")))??
        };
        let (accel, note) = accel::choose(spec.accel, &qemu, &boot, &self.cache).await?;
        Ok(Prepared { qemu, kernel, boot, initramfs, accel, note, system, unchecked })
    }

    /// The kernel of `system`, the image QEMU boots of it, its initramfs, and what could
    /// not be checked about its drivers (blocking: this may fetch a kernel, extract one and
    /// build an initramfs).
    fn boot_files(
        &self,
        system: &System,
        explicit: Option<&Path>,
        modules: Option<&Path>,
        with_net: bool,
    ) -> Result<(Kernel, BootImage, PathBuf, Option<String>)> {
        let kernel = match system {
            System::Host => self.kernel(explicit, modules)?,
            System::Image { kernel, .. } => Kernel::from_image(kernel, "image")?,
        };
        let boot = kernel::boot_image(&kernel, &self.cache)?;
        let wanted = system.guest_modules(MachineKind::for_kernel(&boot), with_net);
        let (modules, unchecked) = match (system, &kernel.modules) {
            // A host kernel that lacks a driver is refused here, before it boots; the guest
            // loads more modules on demand from its tree, through the host root.
            (System::Host, _) => {
                let guest = modules::for_guest(&self.cache, &kernel, &wanted)?;
                if let Some(why) = &guest.unchecked {
                    tracing::info!("{why}");
                }
                (guest.modules, guest.unchecked)
            }
            (System::Image { .. }, Some(dir)) => (modules::resolve_cached(&self.cache, dir, &wanted)?, None),
            // No module tree: an image kernel with the drivers built in (or the agent says
            // what is missing).
            (System::Image { .. }, None) => (Vec::new(), None),
        };
        let initramfs = initramfs::build(&self.cache, AGENT, &modules, kernel.accepts_unsigned_modules())?;
        Ok((kernel, boot, initramfs, unchecked))
    }

    /// The one place a `VmSpec` becomes the QEMU command of a guest in `vm_dir`, in either
    /// mode. What the command names in `vm_dir` is made here too: an image guest's overlay
    /// and SSH key.
    pub(crate) async fn plan(&self, p: &Prepared, spec: &VmSpec, vm_dir: &Path) -> Result<QemuCommand> {
        let (agent_socket, console_socket) = vm::socket_paths(vm_dir);
        let mut plan = QemuCommand {
            qemu: p.qemu.clone(),
            accel: p.accel,
            kernel: p.boot.clone(),
            initramfs: p.initramfs.clone(),
            cpus: spec.cpus,
            memory_mib: spec.memory_mib,
            root: Root::Host,
            agent_socket,
            console_socket,
            kernel_args: self.opts.kernel_args.clone(),
            nics: spec
                .nics
                .iter()
                .map(|n| QemuNic {
                    mac: n.mac_string(),
                    local: n.guest_socket.clone(),
                    remote: n.switch_socket.clone(),
                })
                .collect(),
            ssh: None,
            gdb: None,
            dump: self.opts.dump_dir.as_ref().map(|dir| Dump::plan(dir, &spec.name, spec.memory_mib)),
        };
        match &p.system {
            System::Host => {
                if let Some(gdb) = self.opts.gdb {
                    let port = if gdb.port == 0 { ssh::free_port()? } else { gdb.port };
                    plan.gdb = Some(Gdb { port, ..gdb });
                }
            }
            System::Image { base, .. } => {
                let overlay = vm_dir.join(OVERLAY);
                host::qcow2_overlay(base, &overlay)?;
                plan.root = Root::Disk(overlay);
                if spec.exec == ExecVia::Ssh {
                    let key = vm_dir.join(SSH_KEY);
                    let public_key = tokio::task::spawn_blocking(move || ssh::make_key(&key))
                        .await
                        .map_err(|e| Error::infra(format!("ssh-keygen: {e}")))??;
                    plan.ssh = Some(SshForward { port: ssh::free_port()?, public_key });
                }
            }
        }
        Ok(plan)
    }

    /// Start a guest of `spec`, in either mode. KVM failing during the boot although the
    /// verdict said it works is retried once under TCG with `--accel auto` (the failed
    /// attempt's directory, with its sockets, logs and disk, removed first).
    pub(crate) async fn start(&self, spec: &VmSpec, run: &RunDir) -> Result<Started> {
        let mut p = self.prepare(spec).await?;
        let mut first_start = None;
        loop {
            match self.attempt(&p, spec, run, &mut first_start).await {
                Err(e) if accel::is_kvm_failure(&e) && p.accel == Accel::Kvm => {
                    p.accel = self.after_kvm_failure(spec.accel, &p, &e)?;
                    let _ = std::fs::remove_dir_all(run.vm_dir(&spec.node)?);
                }
                Err(e) if e.kind() == vmtest_core::ErrorKind::Boot => return Err(with_unchecked(e, &p)),
                other => return other,
            }
        }
    }

    /// One try at starting the guest under `p.accel`: from its snapshot when
    /// [`snapshot::start`] gives one, else cold.
    async fn attempt(
        &self,
        p: &Prepared,
        spec: &VmSpec,
        run: &RunDir,
        first_start: &mut Option<Instant>,
    ) -> Result<Started> {
        if let Some(note) = &p.note {
            tracing::warn!("{note}");
        } else if p.accel == Accel::Tcg && matches!(p.system, System::Host) {
            tracing::info!("using TCG (software emulation)");
        }
        let vm_dir = run.vm_dir(&spec.node)?;
        let plan = self.plan(p, spec, &vm_dir).await?;
        let mut record = record(self.name(), p, spec, run, &plan, &vm_dir);
        run.write_record(&record)?;
        let setup = guest_setup(spec, &plan, &p.kernel);
        let ssh = plan.ssh.as_ref().map(|f| SshTarget {
            port: f.port,
            key: vm_dir.join(SSH_KEY),
            user: "root".into(),
        });
        let since = *first_start.get_or_insert_with(Instant::now);
        let (cache, opts) = (&self.cache, &self.opts);
        let base = match &p.system {
            System::Image { base, .. } => Some(base.as_path()),
            System::Host => None,
        };
        let restored = match &spec.resume {
            Some(dir) => Some(self.resume(&plan, dir, run, &mut record, setup.clone(), spec).await?),
            None => {
                let boot_timeout = spec.boot_timeout;
                snapshot::start(cache, opts, &plan, base, run, &mut record, &setup, boot_timeout).await?
            }
        };
        let restored_any = restored.is_some();
        // After a restore the stub is up; before a cold boot, a guest held for gdb waits for it.
        if let Some(gdb) = plan.gdb {
            announce_gdb(gdb, p);
        }
        let mut vm = match restored {
            Some(vm) => vm,
            None => {
                let mode = BootMode::Cold(setup);
                QemuVm::boot(&plan, &mut record, run, mode, spec.boot_timeout, opts.die_with_parent).await?
            }
        };
        if let Root::Disk(overlay) = &plan.root {
            let backing = host::qcow2_backing(overlay)?;
            let qmp = plan.control_qmp();
            vm.set_saveable(Saveable { overlay: overlay.clone(), backing, qmp, cache: self.cache.clone() });
        }
        Ok(Started { vm, ssh, since, restored: restored_any })
    }

    /// Start the guest of `plan` from the guest saved in `dir` ([`VmSpec::resume`]): its
    /// seal checked, a fresh overlay over its disk, and only the clock, the random pool and
    /// the run's SSH key renewed.
    async fn resume(
        &self,
        plan: &QemuCommand,
        dir: &Path,
        run: &RunDir,
        record: &mut VmRecord,
        mut setup: GuestSetup,
        spec: &VmSpec,
    ) -> Result<QemuVm> {
        let Root::Disk(overlay) = &plan.root else {
            return Err(Error::usage(format!(
                "{} cannot be resumed from {}: only image guests can be saved (a kernel-mode \
                 guest's 9p root cannot be migrated)",
                spec.node,
                dir.display()
            )));
        };
        let saved = SavedGuest::at(dir);
        saved.check().await?;
        host::qcow2_overlay(&saved.disk(), overlay)?;
        setup.resumed = true;
        let mode = BootMode::Restore { incoming: saved.incoming_uri(), setup };
        let die = self.opts.die_with_parent;
        QemuVm::boot(plan, record, run, mode, spec.boot_timeout, die)
            .await
            .map_err(|e| e.context(format!("resuming {} from {}", spec.node, dir.display())))
    }

    /// KVM failed during a boot although the verdict said it works. Correct the verdict;
    /// under `auto` go on with TCG (the accelerator to retry with), under `--accel kvm` fail.
    fn after_kvm_failure(&self, choice: AccelChoice, p: &Prepared, err: &Error) -> Result<Accel> {
        accel::record_failure(
            &p.qemu,
            &p.boot,
            &self.cache,
            accel::kvm_failure(err).unwrap_or(err.message()),
        );
        if choice != AccelChoice::Auto {
            return Err(accel::forced_kvm_error(err));
        }
        tracing::warn!("{}; retrying under TCG (later runs use TCG at once)", err.message());
        Ok(Accel::Tcg)
    }
}

/// The guest's record: everything teardown, `vmtest list` and `attach` need.
fn record(
    backend: &str,
    p: &Prepared,
    spec: &VmSpec,
    run: &RunDir,
    plan: &QemuCommand,
    vm_dir: &Path,
) -> VmRecord {
    let mut record = VmRecord::new(&spec.name, &spec.node, run.id(), backend);
    record.paths.push(vm_dir.to_owned());
    let mut data = json!({
        "qemu": p.qemu,
        "accel": plan.accel.name(),
        "console_socket": plan.console_socket,
        "agent_socket": plan.agent_socket,
    });
    match &p.system {
        System::Host => data["kernel"] = json!(p.kernel.image),
        System::Image { name, base, .. } => {
            let overlay = vm_dir.join(OVERLAY);
            record.paths.push(overlay.clone());
            data["image"] = json!(name);
            data["base"] = json!(base);
            data["overlay"] = json!(overlay);
            data["exec"] = json!(spec.exec);
            if let Some(ssh) = &plan.ssh {
                data["ssh_port"] = ssh.port.into();
            }
        }
    }
    record.backend_data = data;
    record
}

/// What the agent sets up in the guest: its root, clock, name, NICs, hosts and entropy.
fn guest_setup(spec: &VmSpec, plan: &QemuCommand, kernel: &Kernel) -> GuestSetup {
    let on_host = plan.root == Root::Host;
    let mut nics: Vec<GuestNic> =
        spec.nics.iter().map(|n| GuestNic { mac: n.mac, address: n.address, prefix: n.prefix }).collect();
    if plan.ssh.is_some() {
        nics.push(GuestNic { mac: USER_NET_MAC, address: USER_NET_ADDR, prefix: 24 });
    }
    let (secs, nanos) = host::now_unix();
    GuestSetup {
        root_tag: on_host.then(|| ROOT_TAG.to_owned()),
        shares: Vec::new(),
        hostname: spec.node.clone(),
        unix_time_secs: secs,
        unix_time_nanos: nanos,
        overlay_size: if on_host { "50%".into() } else { String::new() },
        nics,
        hosts: spec.hosts.clone(),
        entropy: host::random_bytes(32),
        authorized_key: plan.ssh.as_ref().map(|f| ssh::authorized_key(&f.public_key)),
        new_machine_id: false,
        resumed: false,
        // The tree is reached through the host root: no share of its own, so nothing
        // at boot (or in the snapshot) changes.
        modules_dir: kernel
            .modules
            .as_ref()
            .filter(|_| on_host)
            .map(|d| d.as_os_str().as_encoded_bytes().to_vec()),
    }
}

/// Tell the user the gdb command that attaches to the guest's stub.
fn announce_gdb(gdb: Gdb, p: &Prepared) {
    let symbols = kernel::debug_symbols(&p.kernel);
    let file = symbols.as_ref().unwrap_or(&p.boot.path);
    tracing::warn!(
        target: "vmtest_notice",
        "gdb stub on 127.0.0.1:{}{}: gdb -ex 'target remote 127.0.0.1:{}' {}{}",
        gdb.port,
        if gdb.wait { " (the guest waits for gdb to continue it)" } else { "" },
        gdb.port,
        file.display(),
        match symbols {
            Some(_) => String::new(),
            None => format!(
                "  (this kernel has no debug symbols: Debian's are in linux-image-{}-dbg, \
                 /usr/lib/debug/boot/vmlinux-{})",
                p.kernel.release, p.kernel.release
            ),
        }
    );
}

/// A boot failure of a kernel whose drivers could not be checked says what was looked for.
fn with_unchecked(e: Error, p: &Prepared) -> Error {
    match (&p.unchecked, e.hint().map(str::to_owned)) {
        (Some(why), Some(hint)) => e.with_hint(format!("{hint}; {why}")),
        (Some(why), None) => e.with_hint(why.clone()),
        (None, _) => e,
    }
}
