//! The QEMU command line of a guest, in kernel mode and image mode alike: one plan
//! ([`QemuCommand`]), rendered to argv.
//!
//! microvm with virtio-mmio devices when the kernel boots through PVH (fastest under TCG, see
//! reference/tcg-boot.md), the `pc` machine with virtio-pci otherwise. Sockets are created
//! by QEMU in the VM's private directory. What differs between the modes is data: the
//! guest's `/` ([`Root`]) and, for an image reached over SSH, the port forward.

use crate::accel::Accel;
use crate::dump::Dump;
use crate::kernel::BootImage;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use vmtest_core::protocol::{AGENT_PORT_NAME, BOOT_MARKER};

/// The 9p mount tag of the host root share.
pub const ROOT_TAG: &str = "vmtest-root";

/// The MAC and address of the user-mode NIC that carries the SSH forward (QEMU user
/// networking's default guest address).
pub const USER_NET_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x76, 0x6d, 0x01];
pub const USER_NET_ADDR: [u8; 4] = [10, 0, 2, 15];

/// Everything that decides a guest's QEMU command line.
#[derive(Clone, Debug)]
pub struct QemuCommand {
    pub qemu: PathBuf,
    pub accel: Accel,
    pub kernel: BootImage,
    pub initramfs: PathBuf,
    pub cpus: u32,
    pub memory_mib: u64,
    /// What the guest's `/` is.
    pub root: Root,
    pub agent_socket: PathBuf,
    pub console_socket: PathBuf,
    /// Extra words for the kernel command line.
    pub kernel_args: Vec<String>,
    /// NICs on private networks: QEMU `-netdev dgram` over unix sockets to the switch.
    pub nics: Vec<QemuNic>,
    /// A user-mode NIC through which only a loopback forward to the guest's sshd comes in.
    pub ssh: Option<SshForward>,
    /// QEMU's gdb stub, on a known port.
    pub gdb: Option<Gdb>,
    /// What happens to the guest's memory when its kernel panics; `None`: nothing.
    pub dump: Option<Dump>,
}

/// The guest's `/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Root {
    /// Only the initramfs (the boot floor, the KVM probe).
    None,
    /// Kernel mode: the host's `/`, read-only over 9p under [`ROOT_TAG`].
    Host,
    /// Image mode: this qcow2 overlay, as `/dev/vda`.
    Disk(PathBuf),
}

/// The SSH forward of an image guest: host loopback `port` to the guest's port 22, and the
/// public key the guest is to accept (given on its kernel command line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SshForward {
    pub port: u16,
    pub public_key: String,
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

/// What one start of QEMU adds to the guest's machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start<'a> {
    /// A boot.
    Boot,
    /// A boot whose state is to be saved (through the [`QemuCommand::control_qmp`] socket).
    SnapshotSource,
    /// A restore of a saved state (`-incoming`).
    Restore { incoming: &'a str },
}

/// One NIC: QEMU binds `local` and sends every frame to the switch port at `remote`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuNic {
    pub mac: String,
    pub local: PathBuf,
    pub remote: PathBuf,
}

/// Modules a guest with a NIC needs on top of [`MachineKind::guest_modules`]
/// (virtio_net pulls in net_failover and failover through the dependency resolver).
pub const NET_MODULES: &[&str] = &["virtio_net"];

/// Which devices a machine type takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MachineKind {
    /// `-M microvm`: no PCI; virtio-mmio devices. Needs a PVH kernel.
    Microvm,
    /// `-M pc`: virtio-pci devices; boots any bzImage.
    Pc,
}

impl MachineKind {
    /// The machine a kernel boots on: microvm when it boots through PVH.
    pub fn for_kernel(kernel: &BootImage) -> Self {
        if kernel.pvh {
            MachineKind::Microvm
        } else {
            MachineKind::Pc
        }
    }

    /// The modules this machine's devices need in a guest on the host's root.
    pub fn guest_modules(self) -> &'static [&'static str] {
        match self {
            MachineKind::Microvm => &["virtio_mmio", "virtio_console", "9pnet_virtio", "9p", "overlay"],
            MachineKind::Pc => &["virtio_pci", "virtio_console", "9pnet_virtio", "9p", "overlay"],
        }
    }

    /// The modules this machine's devices need in a guest on an image's disk.
    pub fn image_modules(self) -> &'static [&'static str] {
        match self {
            // ext4 needs a crc32c driver, a soft dependency that modules.dep does not list.
            MachineKind::Microvm => {
                &["virtio_mmio", "virtio_console", "virtio_blk", "crc32c_generic", "ext4", "virtio_net"]
            }
            MachineKind::Pc => {
                &["virtio_pci", "virtio_console", "virtio_blk", "crc32c_generic", "ext4", "virtio_net"]
            }
        }
    }

    fn device(self, base: &str) -> String {
        match self {
            MachineKind::Microvm => format!("{base}-device"),
            MachineKind::Pc => format!("{base}-pci"),
        }
    }
}

impl QemuCommand {
    /// The machine type this command boots.
    pub fn machine(&self) -> MachineKind {
        MachineKind::for_kernel(&self.kernel)
    }

    /// The kernel command line.
    pub fn kernel_cmdline(&self) -> String {
        let mut words: Vec<String> = [
            "console=ttyS0",
            "quiet",
            // Warnings too (quiet shows errors only): WARNING and lockdep reports are
            // printed at warning level, and vmtest watches the console for bug reports.
            "loglevel=5",
            // A panic ends QEMU at once (with -no-reboot) instead of hanging the run.
            "panic=-1",
            "oops=panic",
            "rdinit=/init",
            "nokaslr",
            "mitigations=off",
            "8250.nr_uarts=1",
            "random.trust_cpu=on",
            BOOT_MARKER,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if self.accel == Accel::Tcg {
            // Under TCG the kernel cannot calibrate the TSC on microvm and hangs without this.
            words.push(format!("tsc_early_khz={}", host_tsc_khz()));
            words.push("tsc=reliable".into());
        }
        if let Root::Disk(_) = self.root {
            words.push("vmtest.root=/dev/vda".into());
        }
        if self.dumps() {
            // A panic spins instead, to be seen, stopped and dumped (see [`crate::dump`]).
            words.iter_mut().filter(|w| *w == "panic=-1").for_each(|w| *w = "panic=0".into());
        }
        words.extend(self.kernel_args.iter().cloned());
        words.join(" ")
    }

    /// The guest's machine: what two guests that can share a snapshot have in common (the
    /// snapshot key hashes it), without what one start adds (see [`QemuCommand::argv`]).
    pub fn args(&self) -> Vec<OsString> {
        let m = self.machine();
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: &str| a.push(s.into());
        push("-M");
        push(match m {
            MachineKind::Microvm => "microvm",
            MachineKind::Pc => "pc",
        });
        push("-accel");
        push(self.accel.name());
        if self.accel == Accel::Kvm {
            push("-cpu");
            push("host");
        }
        for s in ["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"] {
            push(s);
        }
        push("-smp");
        push(&self.cpus.to_string());
        push("-m");
        push(&format!("{}M", self.memory_mib));
        // Serial console on a socket QEMU listens on; the runner connects, `vmtest console` too.
        push("-chardev");
        push(&format!("socket,id=con0,path={},server=on,wait=off", self.console_socket.display()));
        push("-serial");
        push("chardev:con0");
        push("-chardev");
        push(&format!("socket,id=agent0,path={},server=on,wait=off", self.agent_socket.display()));
        push("-device");
        push(&m.device("virtio-serial"));
        push("-device");
        push(&format!("virtserialport,chardev=agent0,name={AGENT_PORT_NAME}"));
        if self.root == Root::Host {
            push("-fsdev");
            push("local,id=root,path=/,security_model=none,readonly=on,multidevs=remap");
            push("-device");
            push(&format!("{},fsdev=root,mount_tag={ROOT_TAG}", m.device("virtio-9p")));
        }
        for (i, nic) in self.nics.iter().enumerate() {
            a.push("-netdev".into());
            a.push(
                format!(
                    "dgram,id=net{i},local.type=unix,local.path={},remote.type=unix,remote.path={}",
                    nic.local.display(),
                    nic.remote.display()
                )
                .into(),
            );
            a.push("-device".into());
            let rom = if m == MachineKind::Pc { ",romfile=" } else { "" };
            a.push(format!("{},netdev=net{i},mac={}{rom}", m.device("virtio-net"), nic.mac).into());
        }
        a.push("-kernel".into());
        a.push(self.kernel.path.clone().into());
        a.push("-initrd".into());
        a.push(self.initramfs.clone().into());
        a.push("-append".into());
        a.push(self.kernel_cmdline().into());
        a.extend(self.image_devices(m));
        a
    }

    /// An image guest's disk and SSH forward.
    fn image_devices(&self, m: MachineKind) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        if let Root::Disk(overlay) = &self.root {
            a.push("-drive".into());
            a.push(
                format!("file={},if=none,id=root,format=qcow2,cache=unsafe,discard=unmap", overlay.display())
                    .into(),
            );
            a.push("-device".into());
            a.push(format!("{},drive=root", m.device("virtio-blk")).into());
        }
        if let Some(ssh) = &self.ssh {
            // restrict=on: the guest reaches nothing through this NIC; only the forward comes in.
            a.push("-netdev".into());
            a.push(format!("user,id=usr0,restrict=on,hostfwd=tcp:127.0.0.1:{}-:22", ssh.port).into());
            a.push("-device".into());
            let mac = USER_NET_MAC.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
            let rom = if m == MachineKind::Pc { ",romfile=" } else { "" };
            a.push(format!("{},netdev=usr0,mac={mac}{rom}", m.device("virtio-net")).into());
        }
        a
    }

    /// The whole argv of one start: the machine, the gdb stub, under KVM or for a dump the
    /// health watcher's QMP socket, and what `start` adds.
    pub fn argv(&self, start: Start<'_>) -> Vec<OsString> {
        let mut a = self.args();
        if let Some(gdb) = self.gdb {
            a.push("-gdb".into());
            a.push(format!("tcp:127.0.0.1:{}", gdb.port).into());
            if gdb.wait {
                a.push("-S".into());
            }
        }
        if let Some(path) = self.watch_qmp() {
            a.push("-qmp".into());
            a.push(format!("unix:{},server=on,wait=off", path.display()).into());
        }
        if matches!(start, Start::SnapshotSource) || self.saveable() {
            a.push("-qmp".into());
            a.push(format!("unix:{},server=on,wait=off", self.control_qmp().display()).into());
        }
        if let Start::Restore { incoming } = start {
            a.push("-incoming".into());
            a.push(incoming.into());
        }
        a
    }

    /// Whether the running guest can be saved ([`vmtest_core::Vm::save`]): an image guest,
    /// whose disk is a qcow2 overlay. A guest on the host root is not: QEMU refuses to
    /// migrate a guest with a mounted 9p share.
    pub fn saveable(&self) -> bool {
        matches!(self.root, Root::Disk(_))
    }

    /// The QMP socket a guest is saved through: every saveable guest has one, and so has
    /// the source of a snapshot.
    pub fn control_qmp(&self) -> PathBuf {
        self.console_socket.with_file_name("qmp.sock")
    }

    /// Under KVM or for a dump, a QMP socket of its own through which the health watcher
    /// reads the run state (and dumps the guest).
    pub fn watch_qmp(&self) -> Option<PathBuf> {
        (self.accel == Accel::Kvm || self.dumps())
            .then(|| self.console_socket.with_file_name("qmp-watch.sock"))
    }

    /// Whether a panic of this guest is dumped (see [`crate::dump`]).
    pub fn dumps(&self) -> bool {
        self.dump.as_ref().is_some_and(|d| d.path().is_some())
    }

    /// Whether the guest is held for gdb (`-S`) until a person continues it.
    pub fn held_for_gdb(&self) -> bool {
        self.gdb.is_some_and(|g| g.wait)
    }
}

/// The host TSC frequency in kHz, from /proc/cpuinfo (the guest's TSC runs at host speed
/// under TCG's `-cpu` default). Falls back to 2 GHz, which only affects early timing.
pub fn host_tsc_khz() -> u64 {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("cpu MHz"))
                .and_then(|l| l.split(':').nth(1))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .map(|mhz| (mhz * 1000.0) as u64)
        .unwrap_or(2_000_000)
}

/// Render argv for a log line.
pub fn display(qemu: &Path, args: &[OsString]) -> String {
    let mut all = vec![qemu.as_os_str().to_owned()];
    all.extend(args.iter().cloned());
    vmtest_core::exec::display_argv(&all)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(pvh: bool, accel: Accel) -> QemuCommand {
        QemuCommand {
            qemu: "qemu-system-x86_64".into(),
            accel,
            kernel: BootImage { path: "/k".into(), pvh },
            initramfs: "/i".into(),
            cpus: 2,
            memory_mib: 512,
            root: Root::Host,
            agent_socket: "/run/a.sock".into(),
            console_socket: "/run/c.sock".into(),
            kernel_args: vec!["extra=1".into()],
            nics: Vec::new(),
            ssh: None,
            gdb: None,
            dump: None,
        }
    }

    #[test]
    fn nics_are_dgram_netdevs_with_their_macs() {
        let mut c = cmd(true, Accel::Tcg);
        c.nics.push(QemuNic {
            mac: "52:54:00:12:01:02".into(),
            local: "/r/n0".into(),
            remote: "/r/sw".into(),
        });
        let args: Vec<String> = c.args().iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert!(args.contains(
            &"dgram,id=net0,local.type=unix,local.path=/r/n0,remote.type=unix,remote.path=/r/sw".to_owned()
        ));
        assert!(args.contains(&"virtio-net-device,netdev=net0,mac=52:54:00:12:01:02".to_owned()));
        let mut c = cmd(false, Accel::Tcg);
        c.nics.push(QemuNic {
            mac: "52:54:00:12:01:02".into(),
            local: "/r/n0".into(),
            remote: "/r/sw".into(),
        });
        let args: Vec<String> = c.args().iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert!(args.contains(&"virtio-net-pci,netdev=net0,mac=52:54:00:12:01:02,romfile=".to_owned()));
    }

    #[test]
    fn microvm_uses_mmio_devices_and_tsc_hint_under_tcg() {
        let c = cmd(true, Accel::Tcg);
        let args: Vec<String> = c.args().iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert!(args.windows(2).any(|w| w == ["-M", "microvm"]));
        assert!(args.contains(&"virtio-serial-device".to_owned()));
        assert!(args.iter().any(|a| a.starts_with("virtio-9p-device,fsdev=root")));
        assert!(c.kernel_cmdline().contains("tsc_early_khz="));
        assert!(c.kernel_cmdline().ends_with("extra=1"));
        assert!(!args.contains(&"host".to_owned()));
    }

    #[test]
    fn pc_uses_pci_devices_and_kvm_uses_host_cpu() {
        let c = cmd(false, Accel::Kvm);
        let args: Vec<String> = c.args().iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert!(args.windows(2).any(|w| w == ["-M", "pc"]));
        assert!(args.contains(&"virtio-serial-pci".to_owned()));
        assert!(args.windows(2).any(|w| w == ["-cpu", "host"]));
        assert!(!c.kernel_cmdline().contains("tsc_early_khz"));
        assert!(args.iter().any(|a| a.contains("readonly=on")), "the host root is shared read-only");
    }

    fn strings(args: Vec<OsString>) -> Vec<String> {
        args.iter().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn an_image_guest_boots_its_overlay_and_forwards_ssh() {
        let mut c = cmd(false, Accel::Tcg);
        c.root = Root::Disk("/run/disk.qcow2".into());
        c.ssh = Some(SshForward { port: 2222, public_key: "ssh-ed25519 AAAA vmtest".into() });
        let args = strings(c.args());
        assert!(!args.iter().any(|a| a.contains("9p")), "no host root: {args:?}");
        let tail: Vec<&str> =
            args.iter().skip_while(|a| *a != "-append").skip(2).map(String::as_str).collect();
        assert_eq!(
            tail,
            [
                "-drive",
                "file=/run/disk.qcow2,if=none,id=root,format=qcow2,cache=unsafe,discard=unmap",
                "-device",
                "virtio-blk-pci,drive=root",
                "-netdev",
                "user,id=usr0,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22",
                "-device",
                "virtio-net-pci,netdev=usr0,mac=52:54:00:76:6d:01,romfile=",
            ]
        );
        let line = c.kernel_cmdline();
        // The key goes in the setup, so a snapshot holds no run's key.
        assert!(line.ends_with("vmtest.root=/dev/vda extra=1"), "{line}");
        let argv = strings(c.argv(Start::Boot));
        assert!(argv.ends_with(&["-qmp".into(), "unix:/run/qmp.sock,server=on,wait=off".into()]), "saveable");
    }

    #[test]
    fn a_start_adds_gdb_the_watchers_qmp_and_its_own_part_after_the_machine() {
        let mut c = cmd(true, Accel::Kvm);
        c.gdb = Some(Gdb { port: 1234, wait: true });
        let machine = strings(c.args());
        assert!(!machine.iter().any(|a| a.contains("gdb") || a == "-qmp"), "the snapshot key has neither");
        let argv = strings(c.argv(Start::Restore { incoming: "exec:cat /s" }));
        assert_eq!(argv[..machine.len()], machine[..]);
        assert_eq!(
            argv[machine.len()..],
            [
                "-gdb",
                "tcp:127.0.0.1:1234",
                "-S",
                "-qmp",
                "unix:/run/qmp-watch.sock,server=on,wait=off",
                "-incoming",
                "exec:cat /s"
            ]
        );
        assert!(c.held_for_gdb());
        let c = cmd(true, Accel::Tcg);
        let argv = strings(c.argv(Start::SnapshotSource));
        assert_eq!(argv[argv.len() - 2..], ["-qmp", "unix:/run/qmp.sock,server=on,wait=off"]);
        assert_eq!(c.watch_qmp(), None, "only KVM and dumps are watched");
        assert_eq!(strings(c.argv(Start::Boot)), strings(c.args()));
    }

    #[test]
    fn a_guest_to_be_dumped_spins_on_a_panic_and_is_watched() {
        let mut c = cmd(true, Accel::Tcg);
        c.dump = Some(Dump::Refused("no memory dump: too big".into()));
        assert_eq!(strings(c.argv(Start::Boot)), strings(c.args()), "a refused dump changes nothing");
        assert!(c.kernel_cmdline().contains(" panic=-1 "));
        c.dump = Some(Dump::To("/logs/vmcore-vmt-1-a.elf".into()));
        assert!(c.kernel_cmdline().contains(" panic=0 ") && !c.kernel_cmdline().contains("panic=-1"));
        let argv = strings(c.argv(Start::Boot));
        assert_eq!(argv[argv.len() - 2..], ["-qmp", "unix:/run/qmp-watch.sock,server=on,wait=off"]);
    }
}
