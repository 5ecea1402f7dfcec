//! The backends this build knows, in the host OS's `auto` order.

use backend_bhyve::BhyveBackend;
use backend_multipass::MultipassBackend;
use backend_qemu::{QemuBackend, QemuOptions};
use vmtest_core::{backend_choice, Hypervisor, Result};

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

/// The backend for `--backend NAME` (or `auto`).
pub async fn choose(name: &str, qemu: QemuOptions) -> Result<Box<dyn Hypervisor>> {
    backend_choice::choose(name, all(qemu)).await
}
