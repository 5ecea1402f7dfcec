//! The backends this build carries, registered in the host OS's `auto` order: the core
//! knows none by name.

use backend_bhyve::BhyveBackend;
use backend_multipass::MultipassBackend;
use vmtest_core::registry::{BackendSettings, Registry};
use vmtest_core::Hypervisor;

/// The backend for test files that name none: the one with private networks.
pub const FILE_DEFAULT: &str = "qemu";

/// Every backend of this build, native hypervisors first in `auto` order.
pub fn registry() -> Registry {
    let bhyve = |_: &BackendSettings| -> Box<dyn Hypervisor> { Box::new(BhyveBackend::from_env()) };
    let multipass = |_: &BackendSettings| -> Box<dyn Hypervisor> { Box::new(MultipassBackend::from_env()) };
    let registry = Registry::new();
    if cfg!(any(target_os = "freebsd", target_os = "illumos", target_os = "solaris")) {
        registry.register("bhyve", bhyve).register("qemu", qemu).register("multipass", multipass)
    } else if cfg!(target_os = "macos") {
        registry.register("multipass", multipass).register("qemu", qemu).register("bhyve", bhyve)
    } else {
        registry.register("qemu", qemu).register("multipass", multipass).register("bhyve", bhyve)
    }
}

/// The QEMU backend, with what the command asked.
#[cfg(target_os = "linux")]
fn qemu(s: &BackendSettings) -> Box<dyn Hypervisor> {
    Box::new(backend_qemu::QemuBackend::new(s.into()))
}

#[cfg(not(target_os = "linux"))]
fn qemu(_: &BackendSettings) -> Box<dyn Hypervisor> {
    Box::new(unavailable::QemuBackend)
}

/// Off Linux, `qemu` is a backend that says why it cannot run here: QEMU's kernel mode shares
/// a Linux host's root with a Linux guest, so backend-qemu is built for Linux only.
#[cfg(not(target_os = "linux"))]
mod unavailable {
    use async_trait::async_trait;
    use vmtest_core::spec::VmSpec;
    use vmtest_core::state::{RunDir, VmRecord};
    use vmtest_core::{Check, Error, Hypervisor, Preflight, Result, Vm};

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
pub fn qemu_unavailable() -> vmtest_core::Error {
    unavailable::error()
}
