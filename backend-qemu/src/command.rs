//! The QEMU command line for a kernel-mode guest.
//!
//! microvm with virtio-mmio devices when the kernel boots through PVH (fastest under TCG, see
//! reference/tcg-boot.md), the `pc` machine with virtio-pci otherwise. Sockets are created
//! by QEMU in the VM's private directory.

use crate::accel::Accel;
use crate::kernel::BootImage;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use vmtest_core::protocol::{AGENT_PORT_NAME, BOOT_MARKER};

/// The 9p mount tag of the host root share.
pub const ROOT_TAG: &str = "vmtest-root";

/// Everything that decides a guest's QEMU command line.
#[derive(Clone, Debug)]
pub struct QemuCommand {
    pub qemu: PathBuf,
    pub accel: Accel,
    pub kernel: BootImage,
    pub initramfs: PathBuf,
    pub cpus: u32,
    pub memory_mib: u64,
    /// Share the host's `/` read-only under [`ROOT_TAG`].
    pub share_root: bool,
    pub agent_socket: PathBuf,
    pub console_socket: PathBuf,
    /// Extra words for the kernel command line.
    pub kernel_args: Vec<String>,
    /// NICs on private networks: QEMU `-netdev dgram` over unix sockets to the switch.
    pub nics: Vec<QemuNic>,
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
    pub fn for_kernel(kernel: &BootImage) -> Self {
        if kernel.pvh {
            MachineKind::Microvm
        } else {
            MachineKind::Pc
        }
    }

    /// The modules this machine's devices need in the guest.
    pub fn guest_modules(self) -> &'static [&'static str] {
        match self {
            MachineKind::Microvm => &["virtio_mmio", "virtio_console", "9pnet_virtio", "9p", "overlay"],
            MachineKind::Pc => &["virtio_pci", "virtio_console", "9pnet_virtio", "9p", "overlay"],
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
    pub fn machine(&self) -> MachineKind {
        MachineKind::for_kernel(&self.kernel)
    }

    /// The kernel command line.
    pub fn kernel_cmdline(&self) -> String {
        let mut words: Vec<String> = [
            "console=ttyS0",
            "quiet",
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
        words.extend(self.kernel_args.iter().cloned());
        words.join(" ")
    }

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
        if self.share_root {
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
        a
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
            share_root: true,
            agent_socket: "/run/a.sock".into(),
            console_socket: "/run/c.sock".into(),
            kernel_args: vec!["extra=1".into()],
            nics: Vec::new(),
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
}
