//! Snapshots of a guest at "agent ready": boot once, save the whole VM state, and start later
//! guests of the same shape by restoring it instead of booting (`-incoming`). The whole
//! policy is here: which guests use one ([`wanted`]), when one is made, restored or dropped
//! ([`start`]), and the key ([`path_for`]).
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
use crate::command::{QemuCommand, Root};
use crate::qmp::Qmp;
use crate::vm::{self, BootMode, QemuVm};
use crate::{accel, cache_usage, QemuOptions};
use serde_json::json;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vmtest_core::protocol::GuestSetup;
use vmtest_core::state::{RunDir, VmRecord};
use vmtest_core::{Error, ErrorKind, Result};

/// Whether a guest of `plan` starts from a snapshot: when snapshots are on, in kernel mode
/// only (an image guest's disk would have to match the saved state), and never for a guest
/// held for gdb (a restored one is past the point to stop at). A guest to be dumped on a
/// panic has a snapshot of its own: its kernel command line (`panic=0`) is part of the key.
pub fn wanted(opts: &QemuOptions, plan: &QemuCommand) -> bool {
    opts.snapshots && plan.root == Root::Host && !plan.held_for_gdb()
}

/// Start the guest of `plan` from its snapshot, making the snapshot first if there is none.
/// `Ok(None)`: no snapshot is [`wanted`], or none could be made or restored; the caller
/// boots cold. A guest of this shape that fails to boot at all is an error: a cold boot
/// would fail the same way.
pub async fn start(
    cache: &Cache,
    opts: &QemuOptions,
    plan: &QemuCommand,
    run: &RunDir,
    record: &mut VmRecord,
    setup: &GuestSetup,
    boot_timeout: Duration,
) -> Result<Option<QemuVm>> {
    if !wanted(opts, plan) {
        return Ok(None);
    }
    let state = match path_for(cache, &plan.qemu, &plan.args(), &run.vm_dir(&record.node)?) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("no snapshot: {e}");
            return Ok(None);
        }
    };
    let mut made = None;
    if !state.is_file() {
        let started = Instant::now();
        match make(plan, run, record, &state, boot_timeout).await {
            Ok(()) => {
                made = Some(started.elapsed());
                cache_usage::bound_snapshots(cache, &state);
                tracing::info!("saved a snapshot in {:?}: {}", started.elapsed(), state.display())
            }
            Err(e) if e.kind() == ErrorKind::Boot || accel::is_kvm_failure(&e) => return Err(e),
            Err(e) => {
                tracing::warn!("could not save a snapshot ({e}); booting without one");
                return Ok(None);
            }
        }
    }
    let mode = BootMode::Restore { incoming: incoming_uri(&state), setup: setup.clone() };
    match QemuVm::boot(plan, record, run, mode, boot_timeout, opts.die_with_parent).await {
        Ok(mut vm) => {
            cache_usage::touch(&state);
            if let Some(took) = made {
                vm.add_timing("snapshot", took);
            }
            Ok(Some(vm))
        }
        // The accelerator failed, not the snapshot.
        Err(e) if accel::is_kvm_failure(&e) => Err(e),
        Err(e) => {
            // A snapshot that does not restore is useless: drop it, boot cold this time.
            tracing::warn!("restoring {} failed ({e}); discarding it and booting cold", state.display());
            let _ = std::fs::remove_file(&state);
            Ok(None)
        }
    }
}

/// Boot a guest of `plan` (beside the guest of `guest`, which it is made for) to "agent
/// ready" and save its state to `state`.
async fn make(
    plan: &QemuCommand,
    run: &RunDir,
    guest: &VmRecord,
    state: &Path,
    boot_timeout: Duration,
) -> Result<()> {
    let node = format!("{}-snapshot", guest.node);
    let dir = run.vm_dir(&node)?;
    let (agent_socket, console_socket) = vm::socket_paths(&dir);
    let source = QemuCommand { agent_socket, console_socket, gdb: None, ..plan.clone() };
    let mut record = VmRecord::new(&format!("{}-snapshot", guest.name), &node, run.id(), &guest.backend);
    record.paths.push(dir.clone());
    run.write_record(&record)?;
    let qmp = dir.join("qmp.sock");
    let mode = BootMode::SnapshotSource { qmp: &qmp };
    let saved = match QemuVm::boot(&source, &mut record, run, mode, boot_timeout, true).await {
        Ok(vm) => {
            let saved = save(&qmp, state).await;
            let _ = vmtest_core::Vm::kill(&vm).await;
            saved
        }
        Err(e) => Err(e),
    };
    let _ = std::fs::remove_dir_all(&dir);
    run.remove_record(&node);
    saved
}

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
fn incoming_uri(state: &Path) -> String {
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

    use crate::dump::Dump;

    #[test]
    fn only_kernel_mode_guests_not_held_for_gdb_use_snapshots() {
        let plan = |root: Root, gdb: Option<crate::Gdb>| QemuCommand {
            qemu: "q".into(),
            accel: crate::accel::Accel::Tcg,
            kernel: crate::kernel::BootImage { path: "/k".into(), pvh: true },
            initramfs: "/i".into(),
            cpus: 1,
            memory_mib: 256,
            root,
            agent_socket: "/a".into(),
            console_socket: "/c".into(),
            kernel_args: Vec::new(),
            nics: Vec::new(),
            ssh: None,
            gdb,
            dump: None,
        };
        let on = QemuOptions::default();
        let off = QemuOptions { snapshots: false, ..QemuOptions::default() };
        assert!(wanted(&on, &plan(Root::Host, None)));
        assert!(!wanted(&off, &plan(Root::Host, None)));
        assert!(!wanted(&on, &plan(Root::Disk("/d".into()), None)), "an image's disk would have to match");
        assert!(wanted(&on, &plan(Root::Host, Some(crate::Gdb { port: 1, wait: false }))));
        assert!(!wanted(&on, &plan(Root::Host, Some(crate::Gdb { port: 1, wait: true }))), "held for gdb");
        let dumped = QemuCommand { dump: Some(Dump::To("/l/vmcore.elf".into())), ..plan(Root::Host, None) };
        assert!(wanted(&on, &dumped), "a snapshot of its own (panic=0 is in the key)");
        let refused = QemuCommand { dump: Some(Dump::Refused("too big".into())), ..plan(Root::Host, None) };
        assert!(wanted(&on, &refused), "no dump, the same machine");
    }
}
