//! The library's backend settings, as this backend takes them.

use crate::{Gdb, QemuOptions};
use vmtest_core::registry::BackendSettings;

impl From<&BackendSettings> for QemuOptions {
    /// What a command asked of every backend; QEMU's own choices (binary, fetching) keep
    /// their defaults.
    fn from(s: &BackendSettings) -> Self {
        QemuOptions {
            die_with_parent: s.die_with_parent,
            kernel_args: s.kernel_args.clone(),
            snapshots: s.snapshots,
            prove_kvm: s.prove_acceleration,
            gdb: s.gdb.map(|g| Gdb { port: g.port, wait: g.wait }),
            dump_dir: s.dump_dir.clone(),
            ..QemuOptions::default()
        }
    }
}
