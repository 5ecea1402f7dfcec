//! Snapshots of a guest at "agent ready": boot once, save the whole VM state, and start later
//! guests of the same shape by restoring it instead of booting (`-incoming`).
//!
//! The state is saved before the agent's setup, so before the 9p root is mounted (QEMU will
//! not migrate a guest with a mounted 9p share) and before anything run-specific (clock,
//! hostname, addresses, randomness) happens in the guest: each restore gets its own setup.
//! The cache key is QEMU's identity plus the full command line with the run's own paths
//! taken out, plus the identity of the kernel and initramfs files it names (a kernel rebuilt
//! in place, such as a build tree's `vmlinux`, keeps its path), so a new kernel, initramfs
//! (agent, modules), QEMU, machine type, memory or CPU count makes a new snapshot, and stale
//! ones are never used.

use crate::cache::{digest, file_identity, Cache};
use crate::qmp::Qmp;
use serde_json::json;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vmtest_core::{Error, Result};

/// The snapshot file for a guest started as `qemu args...` from `vm_dir` (the run's paths,
/// which differ every run, are replaced by placeholders before hashing).
pub fn path_for(cache: &Cache, qemu: &Path, args: &[OsString], vm_dir: &Path) -> Result<PathBuf> {
    let qemu_id = file_identity(qemu).map_err(|e| Error::io(format!("cannot stat {}", qemu.display()), e))?;
    let vm = vm_dir.to_string_lossy().into_owned();
    let run = vm_dir.parent().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
    let normalized: Vec<String> =
        args.iter().map(|a| a.to_string_lossy().replace(&vm, "<vm>").replace(&run, "<run>")).collect();
    let files: Vec<String> = args
        .windows(2)
        .filter(|w| w[0] == "-kernel" || w[0] == "-initrd")
        .map(|w| file_identity(Path::new(&w[1])).unwrap_or_default())
        .collect();
    let mut parts: Vec<&[u8]> = vec![qemu_id.as_bytes(), env!("CARGO_PKG_VERSION").as_bytes()];
    parts.extend(normalized.iter().map(|a| a.as_bytes()));
    parts.extend(files.iter().map(|f| f.as_bytes()));
    Ok(cache.dir("snapshots")?.join(format!("{}.state", digest(parts))))
}

/// The `-incoming` argument that loads a saved state.
pub fn incoming_uri(state: &Path) -> String {
    format!("exec:cat {}", shell_quote(&state.to_string_lossy()))
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Save the running guest behind `qmp_socket` to `dest`, atomically (a temporary file in
/// the same directory, renamed when QEMU reports the migration completed).
pub async fn save(qmp_socket: &Path, dest: &Path) -> Result<()> {
    let tmp = dest.with_extension(format!("tmp-{}", std::process::id()));
    let result = save_to(qmp_socket, &tmp).await.and_then(|()| {
        std::fs::rename(&tmp, dest)
            .map_err(|e| Error::io(format!("cannot move the snapshot to {}", dest.display()), e))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

async fn save_to(qmp_socket: &Path, tmp: &Path) -> Result<()> {
    let mut qmp = Qmp::connect(qmp_socket).await?;
    let uri = format!("exec:cat > {}", shell_quote(&tmp.to_string_lossy()));
    qmp.execute("migrate", json!({ "uri": uri })).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = qmp.execute("query-migrate", json!({})).await?;
        match status.get("status").and_then(|s| s.as_str()) {
            Some("completed") => return Ok(()),
            Some("failed") | Some("cancelled") => {
                let why = status.get("error-desc").and_then(|d| d.as_str()).unwrap_or("no reason given");
                return Err(Error::infra(format!("saving the VM state failed: {why}")));
            }
            _ if Instant::now() > deadline => return Err(Error::infra("saving the VM state took over 120s")),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_ignores_run_paths_but_not_the_machine() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::at(tmp.path());
        let qemu = tmp.path().join("qemu");
        std::fs::write(&qemu, b"").unwrap();
        let args = |vm: &str, mem: &str| -> Vec<OsString> {
            vec![
                "-m".into(),
                mem.into(),
                "-chardev".into(),
                format!("socket,path=/state/{vm}/vm/agent.sock").into(),
            ]
        };
        let a = path_for(&cache, &qemu, &args("run1", "512M"), Path::new("/state/run1/vm")).unwrap();
        let b = path_for(&cache, &qemu, &args("run2", "512M"), Path::new("/state/run2/vm")).unwrap();
        let c = path_for(&cache, &qemu, &args("run2", "1024M"), Path::new("/state/run2/vm")).unwrap();
        assert_eq!(a, b, "two runs of one shape share a snapshot");
        assert_ne!(b, c, "another memory size is another snapshot");
        // A kernel rebuilt at the same path is another kernel.
        let kernel = tmp.path().join("vmlinux");
        std::fs::write(&kernel, b"build 1").unwrap();
        let with_kernel = |vm: &str| {
            let mut a = args(vm, "512M");
            a.extend(["-kernel".into(), kernel.clone().into_os_string()]);
            path_for(&cache, &qemu, &a, Path::new(&format!("/state/{vm}/vm"))).unwrap()
        };
        let first = with_kernel("run1");
        assert_eq!(first, with_kernel("run2"));
        std::fs::write(&kernel, b"build 22").unwrap();
        assert_ne!(first, with_kernel("run3"), "a rebuilt kernel is another snapshot");
    }

    #[test]
    fn incoming_paths_are_quoted() {
        assert_eq!(incoming_uri(Path::new("/c/it's.state")), r"exec:cat '/c/it'\''s.state'");
    }
}
