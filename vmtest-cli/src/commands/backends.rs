//! The backends this build knows, in the host OS's `auto` order.

use backend_bhyve::BhyveBackend;
use backend_multipass::MultipassBackend;
use backend_qemu::{QemuBackend, QemuOptions};
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
