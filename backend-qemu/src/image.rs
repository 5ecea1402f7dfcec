//! Image mode, running: a guest boots a throwaway qcow2 overlay on a cached base image.
//!
//! Boot is direct, as in kernel mode: the image's own kernel (copied out at build time, its
//! ELF vmlinux extracted once for PVH) and a vmtest initramfs with the image's virtio/ext4
//! modules and `vmtest-agent` as `/init`. The agent mounts `/dev/vda` (the overlay), adds
//! itself as a systemd service, a serial-console autologin and the run's SSH key, and execs
//! the image's `/sbin/init`: systemd runs the image's services (nginx...) as on real hardware.
//!
//! The agent (virtio-serial) always does the setup (clock, hostname, NICs, /etc/hosts) and
//! file copies. Commands go through the transport of [`ExecVia`]: the agent, SSH (ssh2, a
//! per-run key, a loopback port forward), or a `ShellSession` on the serial console.
//! Snapshots are not used in image mode (the disk state would have to match).

use crate::accel::Accel;
use crate::command::{MachineKind, QemuCommand};
use crate::image_build::{Image, ImageStore};
use crate::initramfs::AGENT;
use crate::ssh::SshTarget;
use crate::vm::QemuVm;
use crate::{kernel, modules, QemuBackend};
use async_trait::async_trait;
use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};
use vmtest_core::console::Console;
use vmtest_core::exec::{ExecOutput, ExecRequest};
use vmtest_core::protocol::{GuestNic, GuestSetup};
use vmtest_core::shell::{ShellOptions, ShellSession};
use vmtest_core::spec::{ExecVia, VmSpec};
use vmtest_core::state::{RunDir, VmRecord};
use vmtest_core::{Capabilities, Error, Result, Vm};

/// The guest side of the SSH forward: QEMU user networking's default guest address.
const USER_NET_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x76, 0x6d, 0x01];
const USER_NET_ADDR: [u8; 4] = [10, 0, 2, 15];

/// The modules an image guest needs from its initramfs.
fn guest_modules(kind: MachineKind) -> &'static [&'static str] {
    match kind {
        // ext4 needs a crc32c driver, a soft dependency that modules.dep does not list.
        MachineKind::Microvm => {
            &["virtio_mmio", "virtio_console", "virtio_blk", "crc32c_generic", "ext4", "virtio_net"]
        }
        MachineKind::Pc => {
            &["virtio_pci", "virtio_console", "virtio_blk", "crc32c_generic", "ext4", "virtio_net"]
        }
    }
}

/// `qemu-img create -f qcow2 -F qcow2 -b BASE overlay`: the VM writes only here.
pub fn create_overlay(base: &Path, overlay: &Path) -> Result<()> {
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(base)
        .arg(overlay)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| Error::preflight(format!("cannot run qemu-img: {e}; apt-get install qemu-utils")))?;
    if !out.status.success() {
        return Err(Error::infra(format!(
            "qemu-img create of the overlay failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Boot a guest of `spec` from the image `name`.
pub async fn launch(b: &QemuBackend, spec: &VmSpec, run: &RunDir, name: &str) -> Result<Box<dyn Vm>> {
    let store = ImageStore::new(b.cache())?;
    let image: Image = store.find(name)?;
    let qemu = b.qemu_binary().await?;
    let cache = b.cache().clone();
    let kernel_path = image.kernel_image();
    let (boot, initramfs) = tokio::task::spawn_blocking(move || -> Result<_> {
        let k = kernel::Kernel::from_image(&kernel_path, "image")?;
        let boot = kernel::boot_image(&k, &cache)?;
        let mods = match &k.modules {
            Some(dir) => modules::resolve_cached(&cache, dir, guest_modules(MachineKind::for_kernel(&boot)))?,
            None => Vec::new(),
        };
        let initramfs = crate::initramfs::build(&cache, AGENT, &mods, k.accepts_unsigned_modules())?;
        Ok((boot, initramfs))
    })
    .await
    .map_err(|e| Error::infra(format!("image boot files: {e}")))??;
    let (accel, note) = crate::accel::choose(spec.accel, &qemu, &boot, b.cache()).await?;
    if let Some(note) = &note {
        tracing::warn!("{note}");
    }

    let vm_dir = run.vm_dir(&spec.node)?;
    let overlay = vm_dir.join("disk.qcow2");
    let mut record = VmRecord::new(&spec.name, &spec.node, run.id(), "qemu");
    record.paths.push(vm_dir.clone());
    record.paths.push(overlay.clone());
    let (agent_socket, console_socket) = crate::vm::socket_paths(&vm_dir);
    record.backend_data = serde_json::json!({
        "qemu": qemu,
        "image": name,
        "base": image.base(),
        "overlay": overlay,
        "accel": accel.name(),
        "exec": spec.exec,
        "console_socket": console_socket,
        "agent_socket": agent_socket,
    });
    run.write_record(&record)?;
    create_overlay(&image.base(), &overlay)?;

    let mut kernel_args = vec!["vmtest.root=/dev/vda".to_owned()];
    let mut extra: Vec<OsString> = Vec::new();
    let kind = MachineKind::for_kernel(&boot);
    let dev = |base: &str| match kind {
        MachineKind::Microvm => format!("{base}-device"),
        MachineKind::Pc => format!("{base}-pci"),
    };
    extra.push("-drive".into());
    extra.push(
        format!("file={},if=none,id=root,format=qcow2,cache=unsafe,discard=unmap", overlay.display()).into(),
    );
    extra.push("-device".into());
    extra.push(format!("{},drive=root", dev("virtio-blk")).into());
    let mut nics: Vec<GuestNic> =
        spec.nics.iter().map(|n| GuestNic { mac: n.mac, address: n.address, prefix: n.prefix }).collect();
    let mut ssh = None;
    if spec.exec == ExecVia::Ssh {
        let key = vm_dir.join("ssh_key");
        let public = {
            let key = key.clone();
            tokio::task::spawn_blocking(move || crate::ssh::make_key(&key))
                .await
                .map_err(|e| Error::infra(format!("ssh-keygen: {e}")))??
        };
        kernel_args.push(format!("vmtest.ssh_key={}", crate::ssh::key_param(&public)));
        let port = crate::ssh::free_port()?;
        // restrict=on: the guest reaches nothing through this NIC; only the forward comes in.
        extra.push("-netdev".into());
        extra.push(format!("user,id=usr0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22").into());
        extra.push("-device".into());
        let mac = USER_NET_MAC.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
        let rom = if kind == MachineKind::Pc { ",romfile=" } else { "" };
        extra.push(format!("{},netdev=usr0,mac={mac}{rom}", dev("virtio-net")).into());
        nics.push(GuestNic { mac: USER_NET_MAC, address: USER_NET_ADDR, prefix: 24 });
        ssh = Some(SshTarget { port, key, user: "root".into() });
        record.backend_data["ssh_port"] = port.into();
        run.write_record(&record)?;
    }
    kernel_args.extend(b.options().kernel_args.iter().cloned());
    let cmd = QemuCommand {
        qemu: qemu.clone(),
        accel,
        kernel: boot,
        initramfs,
        cpus: spec.cpus,
        memory_mib: spec.memory_mib,
        share_root: false,
        agent_socket,
        console_socket,
        kernel_args,
        nics: spec
            .nics
            .iter()
            .map(|n| crate::command::QemuNic {
                mac: n.mac_string(),
                local: n.guest_socket.clone(),
                remote: n.switch_socket.clone(),
            })
            .collect(),
    };
    let (secs, nanos) = crate::host::now_unix();
    let setup = GuestSetup {
        root_tag: None,
        shares: Vec::new(),
        hostname: spec.node.clone(),
        unix_time_secs: secs,
        unix_time_nanos: nanos,
        overlay_size: String::new(),
        nics,
        hosts: spec.hosts.clone(),
        entropy: crate::host::random_bytes(32),
        modules_dir: None,
    };
    let t0 = Instant::now();
    let die_with_parent = b.options().die_with_parent;
    let first = QemuVm::boot_with_args(
        &cmd,
        &extra,
        &mut record,
        run,
        crate::vm::BootMode::Cold(setup.clone()),
        spec.boot_timeout,
        die_with_parent,
    )
    .await;
    let mut inner = match first {
        Err(e) if crate::accel::is_kvm_failure(&e) && cmd.accel == Accel::Kvm => {
            let accel = b.after_kvm_failure(spec.accel, &qemu, &cmd.kernel, &e)?;
            // The failed attempt may have written to the overlay: start from the base again.
            let _ = std::fs::remove_file(&overlay);
            create_overlay(&image.base(), &overlay)?;
            let cmd = QemuCommand { accel, ..cmd.clone() };
            let mode = crate::vm::BootMode::Cold(setup);
            QemuVm::boot_with_args(&cmd, &extra, &mut record, run, mode, spec.boot_timeout, die_with_parent)
                .await?
        }
        other => other?,
    };
    let mut shell = None;
    match spec.exec {
        ExecVia::Agent => {}
        ExecVia::Ssh => {
            let target = ssh.clone().expect("ssh target");
            let left = spec.boot_timeout.saturating_sub(t0.elapsed()).max(Duration::from_secs(10));
            let took = tokio::task::spawn_blocking(move || target.wait_ready(left))
                .await
                .map_err(|e| Error::infra(format!("ssh wait: {e}")))?;
            match took {
                Ok(d) => inner.add_timing_last("ssh-ready", d),
                Err(e) => {
                    let _ = inner.kill().await;
                    let tail = inner.console_log().tail(30);
                    return Err(e.with_detail(format!("console (last lines):\n{tail}")));
                }
            }
        }
        ExecVia::Serial => {
            let t1 = Instant::now();
            let opts = ShellOptions {
                login: None,
                exec_sh: true,
                ready_timeout: spec.boot_timeout.saturating_sub(t0.elapsed()).max(Duration::from_secs(10)),
                nudge_every: Duration::from_secs(2),
            };
            // The setup must reach the shell, not the tty before getty opens it (agetty
            // flushes pending input): wait for the autologin's root prompt first.
            let mut console = inner.console()?;
            let prompt = regex::bytes::Regex::new(r"root@\S+:\S*# *$").unwrap();
            let deadline = Instant::now() + opts.ready_timeout;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    let _ = inner.kill().await;
                    return Err(Error::boot(
                        "no root shell appeared on the serial console (is serial-getty@ttyS0 in the image?)",
                    )
                    .with_detail(inner.console_log().tail(30)));
                }
                match console.wait_for(&prompt, left.min(Duration::from_secs(3))).await {
                    Ok(_) => break,
                    Err(e) if e.kind() == vmtest_core::ErrorKind::Timeout => console.send(b"\r").await?,
                    Err(e) => return Err(e),
                }
            }
            match ShellSession::start(console, opts).await {
                Ok(s) => {
                    inner.add_timing_last("shell-ready", t1.elapsed());
                    shell = Some(tokio::sync::Mutex::new(s));
                }
                Err(e) => {
                    let _ = inner.kill().await;
                    return Err(e);
                }
            }
        }
    }
    Ok(Box::new(ImageVm { inner, via: spec.exec, ssh, shell }))
}

/// A guest booted from an image.
pub struct ImageVm {
    inner: QemuVm,
    via: ExecVia,
    ssh: Option<SshTarget>,
    shell: Option<tokio::sync::Mutex<ShellSession>>,
}

impl ImageVm {
    pub fn exec_via(&self) -> ExecVia {
        self.via
    }
}

#[async_trait]
impl Vm for ImageVm {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn kernel_log(&self) -> Option<Box<dyn Console>> {
        self.inner.kernel_log()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            network: true,
            snapshots: false,
            concurrent_exec: self.via != ExecVia::Serial,
            console: true,
            host_root: false,
        }
    }

    async fn exec(&self, req: ExecRequest) -> Result<ExecOutput> {
        match (self.via, &self.ssh, &self.shell) {
            (ExecVia::Ssh, Some(t), _) => {
                crate::ssh::exec_async(t.clone(), req, self.inner.name().to_owned()).await
            }
            (ExecVia::Serial, _, Some(s)) => s.lock().await.exec(req).await,
            _ => self.inner.exec(req).await,
        }
    }

    async fn copy_in(&self, host: &Path, guest: &Path) -> Result<()> {
        self.inner.copy_in(host, guest).await
    }

    async fn copy_out(&self, guest: &Path, host: &Path) -> Result<()> {
        self.inner.copy_out(guest, host).await
    }

    fn console(&self) -> Result<Box<dyn Console>> {
        self.inner.console()
    }

    async fn shutdown(&self) -> Result<()> {
        self.inner.shutdown().await
    }

    async fn kill(&self) -> Result<()> {
        self.inner.kill().await
    }

    fn detach(&self) {
        self.inner.detach()
    }

    async fn prepare_interactive_console(&self) -> Result<()> {
        // The image's serial getty logs root in on the console already.
        Ok(())
    }

    fn boot_timings(&self) -> Vec<(&'static str, Duration)> {
        self.inner.boot_timings()
    }
}
