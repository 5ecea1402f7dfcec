//! The backends this build knows, in the host OS's `auto` order.

use backend_bhyve::BhyveBackend;
use backend_multipass::MultipassBackend;
#[cfg(target_os = "linux")]
pub use backend_qemu::{Gdb, QemuBackend, QemuOptions};
#[cfg(not(target_os = "linux"))]
pub use unavailable::{Gdb, QemuBackend, QemuOptions};
use vmtest_core::{backend_choice, Error, Hypervisor, Result};

/// Every backend, ordered for `auto`.
pub fn all(qemu: QemuOptions) -> Vec<Box<dyn Hypervisor>> {
    let mut all: Vec<Box<dyn Hypervisor>> = vec![
        Box::new(QemuBackend::new(qemu)),
        Box::new(BhyveBackend::from_env()),
        Box::new(MultipassBackend::from_env()),
    ];
    let order = backend_choice::auto_order();
    all.sort_by_key(|b| order.iter().position(|n| *n == b.name()).unwrap_or(order.len()));
    all
}

pub fn refs(all: &[Box<dyn Hypervisor>]) -> Vec<&dyn Hypervisor> {
    all.iter().map(|b| b.as_ref()).collect()
}

/// The backend for `--backend NAME` (or `auto`).
pub async fn choose(name: &str, all: Vec<Box<dyn Hypervisor>>) -> Result<Box<dyn Hypervisor>> {
    backend_choice::choose(name, all).await
}

/// The backend that made a VM, by the name in its record.
pub fn named<'a>(all: &'a [Box<dyn Hypervisor>], name: &str) -> Result<&'a dyn Hypervisor> {
    all.iter()
        .find(|b| b.name() == name)
        .map(|b| b.as_ref())
        .ok_or_else(|| Error::usage(format!("backend `{name}` is not part of this vmtest")))
}

/// Off Linux, `qemu` is a backend that says why it cannot run here: QEMU's kernel mode shares
/// a Linux host's root with a Linux guest, so backend-qemu is built for Linux only.
#[cfg(not(target_os = "linux"))]
mod unavailable {
    use async_trait::async_trait;
    use std::path::PathBuf;
    use vmtest_core::spec::VmSpec;
    use vmtest_core::state::{RunDir, VmRecord};
    use vmtest_core::{Check, Error, Hypervisor, Preflight, Result, Vm};

    /// The settings the commands pass to the QEMU backend; set by them, read by nobody here.
    #[allow(dead_code)]
    #[derive(Clone, Debug)]
    pub struct QemuOptions {
        pub qemu: Option<PathBuf>,
        pub auto_fetch: bool,
        pub die_with_parent: bool,
        pub kernel_args: Vec<String>,
        pub snapshots: bool,
        pub prove_kvm: bool,
        pub gdb: Option<Gdb>,
    }

    /// The gdb stub settings (`--gdb`), as on Linux.
    #[allow(dead_code)]
    #[derive(Clone, Copy, Debug)]
    pub struct Gdb {
        pub port: u16,
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

    /// The host OS, as users call it.
    fn os() -> &'static str {
        match std::env::consts::OS {
            "macos" => "macOS",
            "freebsd" => "FreeBSD",
            "illumos" => "illumos",
            "solaris" => "Solaris",
            other => other,
        }
    }

    /// What to use instead on this OS.
    fn instead() -> &'static str {
        if cfg!(target_vendor = "apple") {
            "use --backend multipass"
        } else {
            "use --backend bhyve (or multipass where it is installed)"
        }
    }

    /// The error for every use of `qemu` (and of `vmtest kernel`, image builds, the floor).
    pub fn error() -> Error {
        Error::preflight(format!(
            "the qemu backend is not available on {}: its kernel mode shares a Linux host's root with a \
             Linux guest, so vmtest carries it on Linux only; {}",
            os(),
            instead()
        ))
    }

    pub struct QemuBackend;

    impl QemuBackend {
        pub fn new(_: QemuOptions) -> Self {
            QemuBackend
        }
    }

    #[async_trait]
    impl Hypervisor for QemuBackend {
        fn name(&self) -> &'static str {
            "qemu"
        }

        async fn preflight(&self) -> Preflight {
            let mut pf = Preflight::default();
            pf.push(Check::fail("qemu", format!("not available on {}", os()), instead()));
            pf
        }

        async fn launch(&self, _: &VmSpec, _: &RunDir) -> Result<Box<dyn Vm>> {
            Err(error())
        }

        async fn destroy_record(&self, _: &VmRecord) -> Result<()> {
            Err(error())
        }
    }
}

/// Off Linux: the error for commands that only the QEMU backend has.
#[cfg(not(target_os = "linux"))]
pub fn qemu_unavailable() -> Error {
    unavailable::error()
}
