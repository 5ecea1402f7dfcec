//! Guest memory dumps on a kernel panic (`--failure-logs DIR`): where a guest's dump goes or
//! why it gets none, and QMP `dump-guest-memory` into an ELF core that gdb and crash open.
//!
//! A guest that may be dumped boots with `panic=0` instead of `panic=-1`: its panic spins
//! in the guest instead of rebooting (which `-no-reboot` makes QEMU's end, and which would
//! leave no panicking CPU to see). The health watcher (see [`crate::health`]) sees the end
//! of the panic on the console, stops the guest, dumps it, then ends QEMU. Such a guest
//! always boots cold: a snapshot is of a guest booted with `panic=-1`.

use crate::qmp::Qmp;
use serde_json::json;
use std::path::{Path, PathBuf};

/// The largest guest memory dumped when `$VMTEST_DUMP_MAX` is unset.
const DEFAULT_MAX: u64 = 2 << 30;

/// Room left on the dump's filesystem beyond the guest's memory (ELF headers, and the rest
/// of the machine).
const SPARE: u64 = 64 << 20;

/// The largest guest memory dumped: `$VMTEST_DUMP_MAX` (e.g. `4G`), default 2 GiB.
fn max_bytes() -> u64 {
    std::env::var("VMTEST_DUMP_MAX")
        .ok()
        .and_then(|v| crate::cache_usage::parse_size(&v))
        .unwrap_or(DEFAULT_MAX)
}

/// What happens to a guest's memory when its kernel panics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dump {
    /// It is dumped into this file.
    To(PathBuf),
    /// Dumps were asked for, but this guest gets none: the line saying why.
    Refused(String),
}

impl Dump {
    /// The dump of guest `vm` with `memory_mib` of memory, into `dir`, within the bound.
    pub fn plan(dir: &Path, vm: &str, memory_mib: u64) -> Dump {
        let max = max_bytes();
        if memory_mib << 20 > max {
            return Dump::Refused(format!(
                "no memory dump: the guest's {memory_mib} MiB of memory exceed $VMTEST_DUMP_MAX ({} MiB)",
                max >> 20
            ));
        }
        Dump::To(dir.join(format!("vmcore-{vm}.elf")))
    }

    /// The file to dump into, when there is one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Dump::To(p) => Some(p),
            Dump::Refused(_) => None,
        }
    }
}

/// Dump the stopped guest's `memory_bytes` of memory into `path` through `qmp`. Returns the
/// line for the user: where the dump is and its size, or why there is none.
pub async fn take(qmp: &mut Qmp, path: &Path, memory_bytes: u64) -> String {
    let dir = path.parent().unwrap_or(Path::new("."));
    if let Err(e) = std::fs::create_dir_all(dir) {
        return format!("no memory dump: cannot create {}: {e}", dir.display());
    }
    let free = crate::host::free_bytes(dir).unwrap_or(u64::MAX);
    if free < memory_bytes + SPARE {
        return format!(
            "no memory dump: {} has {} MiB free, and the guest's memory takes {} MiB",
            dir.display(),
            free >> 20,
            memory_bytes >> 20
        );
    }
    let args = json!({ "paging": false, "protocol": format!("file:{}", path.display()), "format": "elf" });
    match qmp.execute("dump-guest-memory", args).await {
        Ok(_) => {
            let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            format!(
                "guest memory dump ({} MiB, ELF core): {}; open it with crash or gdb and the kernel's vmlinux \
                 with debug info",
                size >> 20,
                path.display()
            )
        }
        Err(e) => {
            let _ = std::fs::remove_file(path);
            format!("no memory dump: {}", e.message())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guests_over_the_bound_get_no_dump_and_are_told_why() {
        let dir = Path::new("/logs");
        assert_eq!(Dump::plan(dir, "vmt-1-a", 512), Dump::To("/logs/vmcore-vmt-1-a.elf".into()));
        assert_eq!(Dump::plan(dir, "vmt-1-a", 2048).path(), Some(Path::new("/logs/vmcore-vmt-1-a.elf")));
        let Dump::Refused(why) = Dump::plan(dir, "vmt-1-a", 4096) else { panic!("a 4 GiB guest is dumped") };
        assert!(why.contains("4096 MiB") && why.contains("$VMTEST_DUMP_MAX (2048 MiB)"), "{why}");
    }
}
