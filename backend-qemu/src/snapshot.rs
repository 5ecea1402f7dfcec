//! Snapshots: boot a guest of one shape once to a ready point, save it (a [`SavedGuest`]),
//! and start later guests of that shape by restoring it (`-incoming`) instead of booting.
//! The whole policy is here: which guests use one ([`wanted`]), when one is made, restored
//! or dropped ([`start`]), and the key ([`dir_for`]).
//!
//! Kernel mode: saved at "agent ready", before the agent's setup, so before the 9p root is
//! mounted (QEMU will not migrate a guest with a mounted 9p share) and before anything
//! run-specific (clock, hostname, addresses, randomness) happens in the guest.
//!
//! Image mode: saved once the image's init has reached its default target (`systemctl
//! is-system-running --wait`), so the image's services are running. That guest was set up
//! with neutral values (no node name, no addresses, no SSH key) and ran on the snapshot's
//! own qcow2 layer over the image. A restored guest runs on a fresh overlay over that layer
//! (the image and the layer are never written) and gets the whole setup of its run: clock,
//! random pool, hostname, addresses, hosts, SSH key, and a new `/etc/machine-id`.
//!
//! The key is QEMU's identity plus the full command line with the run's own paths and ports
//! taken out, plus the identity of the kernel and initramfs files it names (a kernel rebuilt
//! in place, such as a build tree's `vmlinux`, keeps its path) and of the image's disk, so a
//! new kernel, initramfs (agent, modules), image, QEMU, machine type, memory or CPU count
//! makes a new snapshot, and stale ones are never used. Every restore checks the snapshot's
//! seal first: a truncated or corrupted snapshot is dropped and made again.

use crate::cache::{digest, file_identity, Cache};
use crate::command::{QemuCommand, Root};
use crate::qmp::Qmp;
use crate::saved::{self, SavedGuest};
use crate::vm::{self, BootMode, QemuVm};
use crate::{accel, cache_usage, host, QemuOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vmtest_core::exec::ExecRequest;
use vmtest_core::protocol::GuestSetup;
use vmtest_core::state::{RunDir, VmRecord};
use vmtest_core::{Error, ErrorKind, Result, Vm};

/// Snapshots being made are `.tmp-<pid>-<key>` (hidden from the cache's listing).
const TMP_PREFIX: &str = ".tmp-";

/// Whether a guest of `plan` starts from a snapshot: when snapshots are on, for kernel-mode
/// and image guests alike, and never for a guest held for gdb (a restored one is past the
/// point to stop at). A guest to be dumped on a panic has a snapshot of its own: its kernel
/// command line (`panic=0`) is part of the key.
pub fn wanted(opts: &QemuOptions, plan: &QemuCommand) -> bool {
    opts.snapshots && plan.root != Root::None && !plan.held_for_gdb()
}

/// Start the guest of `plan` from its snapshot, making the snapshot first if there is none
/// (or the one there is fails its seal). `base` is an image guest's disk image, which its
/// overlay is backed by. `Ok(None)`: no snapshot is [`wanted`], or none could be made or
/// restored; the caller boots cold (an image guest's overlay is then over `base` again).
/// A guest of this shape that fails to boot at all is an error: a cold boot would fail the
/// same way.
#[allow(clippy::too_many_arguments)]
pub async fn start(
    cache: &Cache,
    opts: &QemuOptions,
    plan: &QemuCommand,
    base: Option<&Path>,
    run: &RunDir,
    record: &mut VmRecord,
    setup: &GuestSetup,
    boot_timeout: Duration,
) -> Result<Option<QemuVm>> {
    if !wanted(opts, plan) {
        return Ok(None);
    }
    let saved = match dir_for(cache, plan, base, &run.vm_dir(&record.node)?) {
        Ok(dir) => SavedGuest::at(dir),
        Err(e) => {
            tracing::warn!("no snapshot: {e}");
            return Ok(None);
        }
    };
    if saved.dir().exists() {
        if let Err(e) = saved.check().await {
            tracing::warn!("{e}; making it again");
            saved.remove();
        }
    }
    let mut made = None;
    if !saved.dir().exists() {
        let started = Instant::now();
        match make(plan, base, run, record, &saved, boot_timeout).await {
            Ok(()) => {
                made = Some(started.elapsed());
                cache_usage::bound_snapshots(cache, saved.dir());
                tracing::info!("saved a snapshot in {:?}: {}", started.elapsed(), saved.dir().display())
            }
            Err(e) if e.kind() == ErrorKind::Boot || accel::is_kvm_failure(&e) => return Err(e),
            Err(e) => {
                tracing::warn!("could not save a snapshot ({e}); booting without one");
                return Ok(None);
            }
        }
    }
    restore(plan, base, run, record, setup, &saved, made, opts.die_with_parent, boot_timeout).await
}

/// Restore `saved` as the guest of `plan`. A snapshot that does not restore is dropped.
#[allow(clippy::too_many_arguments)]
async fn restore(
    plan: &QemuCommand,
    base: Option<&Path>,
    run: &RunDir,
    record: &mut VmRecord,
    setup: &GuestSetup,
    saved: &SavedGuest,
    made: Option<Duration>,
    die_with_parent: bool,
    boot_timeout: Duration,
) -> Result<Option<QemuVm>> {
    let mut setup = setup.clone();
    if let Root::Disk(overlay) = &plan.root {
        host::qcow2_overlay(&saved.disk(), overlay)?;
        // Other guests restore this snapshot too.
        setup.new_machine_id = true;
    }
    let mode = BootMode::Restore { incoming: saved.incoming_uri(), setup };
    match QemuVm::boot(plan, record, run, mode, boot_timeout, die_with_parent).await {
        Ok(mut vm) => {
            cache_usage::touch(saved.dir());
            if let Some(took) = made {
                vm.add_timing("snapshot", took);
            }
            Ok(Some(vm))
        }
        // The accelerator failed, not the snapshot.
        Err(e) if accel::is_kvm_failure(&e) => Err(e),
        Err(e) => {
            tracing::warn!(
                "restoring {} failed ({e}); discarding it and booting cold",
                saved.dir().display()
            );
            saved.remove();
            if let (Root::Disk(overlay), Some(base)) = (&plan.root, base) {
                host::qcow2_overlay(base, overlay)?;
            }
            Ok(None)
        }
    }
}

/// Boot a guest of `plan` (beside the guest of `guest`, which it is made for) to its ready
/// point and save it as `saved`: in a temporary directory beside it, renamed into place
/// when sealed (a concurrent run that got there first wins; ours is dropped).
async fn make(
    plan: &QemuCommand,
    base: Option<&Path>,
    run: &RunDir,
    guest: &VmRecord,
    saved: &SavedGuest,
    boot_timeout: Duration,
) -> Result<()> {
    let name = saved.dir().file_name().unwrap_or_default().to_string_lossy().into_owned();
    // Snapshots half-made by runs that died meanwhile are hidden from the cache's listing.
    if let Some(parent) = saved.dir().parent() {
        vmtest_core::state::remove_abandoned(parent, TMP_PREFIX);
    }
    let tmp =
        SavedGuest::at(saved.dir().with_file_name(format!("{TMP_PREFIX}{}-{name}", std::process::id())));
    std::fs::create_dir_all(tmp.dir())
        .map_err(|e| Error::io(format!("cannot create {}", tmp.dir().display()), e))?;
    let result = make_in(plan, base, run, guest, &tmp, boot_timeout).await.and_then(|()| {
        tmp.seal(base)?;
        match std::fs::rename(tmp.dir(), saved.dir()) {
            Ok(()) => Ok(()),
            Err(_) if saved.is_sealed() => Ok(()),
            Err(e) => Err(Error::io(format!("cannot move the snapshot to {}", saved.dir().display()), e)),
        }
    });
    if tmp.dir().exists() {
        tmp.remove();
    }
    result
}

async fn make_in(
    plan: &QemuCommand,
    base: Option<&Path>,
    run: &RunDir,
    guest: &VmRecord,
    tmp: &SavedGuest,
    boot_timeout: Duration,
) -> Result<()> {
    let node = format!("{}-snapshot", guest.node);
    let dir = run.vm_dir(&node)?;
    let (agent_socket, console_socket) = vm::socket_paths(&dir);
    let mut source = QemuCommand { agent_socket, console_socket, gdb: None, ..plan.clone() };
    let mut setup = None;
    if let (Root::Disk(_), Some(base)) = (&plan.root, base) {
        host::qcow2_overlay(base, &tmp.disk())?;
        source.root = Root::Disk(tmp.disk());
        setup = Some(neutral_setup());
    }
    let mut record = VmRecord::new(&format!("{}-snapshot", guest.name), &node, run.id(), &guest.backend);
    record.paths.push(dir.clone());
    run.write_record(&record)?;
    let mode = BootMode::SnapshotSource { setup };
    let saved = match QemuVm::boot(&source, &mut record, run, mode, boot_timeout, true).await {
        Ok(vm) => {
            let saved = async {
                if source.saveable() {
                    system_ready(&vm, boot_timeout).await?;
                }
                let mut qmp = Qmp::connect(&source.control_qmp()).await?;
                saved::migrate_to_file(&mut qmp, &tmp.state()).await
            }
            .await;
            let _ = Vm::kill(&vm).await;
            saved
        }
        Err(e) => Err(e),
    };
    let _ = std::fs::remove_dir_all(&dir);
    run.remove_record(&node);
    saved
}

/// The setup of an image snapshot's guest: nothing of any one run or node (each restore
/// gets its own), but a clock, so that the image's services start at the right time.
fn neutral_setup() -> GuestSetup {
    let (secs, nanos) = host::now_unix();
    GuestSetup {
        root_tag: None,
        shares: Vec::new(),
        hostname: "vmtest-snapshot".into(),
        unix_time_secs: secs,
        unix_time_nanos: nanos,
        overlay_size: String::new(),
        nics: Vec::new(),
        hosts: Vec::new(),
        entropy: host::random_bytes(32),
        modules_dir: None,
        authorized_key: None,
        new_machine_id: false,
        resumed: false,
    }
}

/// Wait for the image's init to reach its default target: what "ready" means for an image
/// (its services are up). `degraded` (a unit of the image failed) is ready too: a cold boot
/// would be the same. An image without systemd is an error: no snapshot, cold boots.
async fn system_ready(vm: &QemuVm, limit: Duration) -> Result<()> {
    let mut req =
        ExecRequest::shell("command -v systemctl >/dev/null || exit 127; systemctl is-system-running --wait");
    req.timeout = Some(limit);
    let out = vm.exec(req).await?;
    let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    match (out.status.shell_code(), state.as_str()) {
        (_, "running" | "degraded") => Ok(()),
        (127, _) => Err(Error::infra("the image has no systemctl: its ready point is unknown")),
        _ => Err(Error::infra(format!("the image's system did not come up (systemd says `{state}`)"))),
    }
}

/// The snapshot directory of a guest started as `plan` from `vm_dir`, on the image disk
/// `base` if any (the run's paths and ports, which differ every run, are replaced by
/// placeholders before hashing).
pub fn dir_for(cache: &Cache, plan: &QemuCommand, base: Option<&Path>, vm_dir: &Path) -> Result<PathBuf> {
    let qemu = &plan.qemu;
    let qemu_id = file_identity(qemu).map_err(|e| Error::io(format!("cannot stat {}", qemu.display()), e))?;
    let args = plan.args();
    let vm = vm_dir.to_string_lossy().into_owned();
    let run = vm_dir.parent().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
    let port = regex::Regex::new(r"hostfwd=tcp:127\.0\.0\.1:\d+-").expect("a valid regex");
    let normalized: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().replace(&vm, "<vm>").replace(&run, "<run>"))
        .map(|a| port.replace_all(&a, "hostfwd=tcp:127.0.0.1:<port>-").into_owned())
        .collect();
    let mut files: Vec<String> = args
        .windows(2)
        .filter(|w| w[0] == "-kernel" || w[0] == "-initrd")
        .map(|w| file_identity(Path::new(&w[1])).unwrap_or_default())
        .collect();
    if let Some(base) = base {
        files.push(file_identity(base).map_err(|e| Error::io(format!("cannot stat {}", base.display()), e))?);
    }
    let mut parts: Vec<&[u8]> = vec![qemu_id.as_bytes(), env!("CARGO_PKG_VERSION").as_bytes()];
    parts.extend(normalized.iter().map(|a| a.as_bytes()));
    parts.extend(files.iter().map(|f| f.as_bytes()));
    Ok(cache.dir("snapshots")?.join(digest(parts)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::SshForward;
    use crate::dump::Dump;

    fn plan(vm_dir: &Path, root: Root, gdb: Option<crate::Gdb>) -> QemuCommand {
        let (agent_socket, console_socket) = vm::socket_paths(vm_dir);
        QemuCommand {
            qemu: "q".into(),
            accel: crate::accel::Accel::Tcg,
            kernel: crate::kernel::BootImage { path: "/k".into(), pvh: true },
            initramfs: "/i".into(),
            cpus: 1,
            memory_mib: 256,
            root,
            agent_socket,
            console_socket,
            kernel_args: Vec::new(),
            nics: Vec::new(),
            ssh: None,
            gdb,
            dump: None,
        }
    }

    #[test]
    fn the_key_ignores_run_paths_and_ports_but_not_the_machine_kernel_or_image() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::at(tmp.path().join("cache"));
        let qemu = tmp.path().join("qemu");
        std::fs::write(&qemu, b"").unwrap();
        let (kernel, base) = (tmp.path().join("vmlinux"), tmp.path().join("base.qcow2"));
        std::fs::write(&kernel, b"build 1").unwrap();
        std::fs::write(&base, b"image 1").unwrap();
        let key = |run: &str, memory_mib: u64, port: u16| {
            let vm_dir = PathBuf::from(format!("/state/{run}/vm"));
            let mut p = plan(&vm_dir, Root::Disk(vm_dir.join("disk.qcow2")), None);
            p.qemu = qemu.clone();
            p.kernel.path = kernel.clone();
            p.memory_mib = memory_mib;
            p.ssh = Some(SshForward { port, public_key: format!("ssh-ed25519 {run}") });
            dir_for(&cache, &p, Some(&base), &vm_dir).unwrap()
        };
        let first = key("run1", 512, 2201);
        assert_eq!(first, key("run2", 512, 2202), "two runs of one shape share a snapshot");
        assert_ne!(first, key("run2", 1024, 2202), "another memory size is another snapshot");
        std::fs::write(&kernel, b"build 22").unwrap();
        let rebuilt = key("run3", 512, 2203);
        assert_ne!(first, rebuilt, "a rebuilt kernel is another snapshot");
        std::fs::write(&base, b"image 22").unwrap();
        assert_ne!(rebuilt, key("run4", 512, 2204), "a rebuilt image is another snapshot");
    }

    #[test]
    fn snapshots_left_half_made_by_dead_runs_are_removed_and_live_ones_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let dead = tmp.path().join(format!("{TMP_PREFIX}{}-abc", u32::MAX - 1));
        let live = tmp.path().join(format!("{TMP_PREFIX}{}-abc", std::process::id()));
        let done = tmp.path().join("abc");
        for d in [&dead, &live, &done] {
            std::fs::create_dir_all(d).unwrap();
        }
        vmtest_core::state::remove_abandoned(tmp.path(), TMP_PREFIX);
        assert!(!dead.exists(), "its runner is gone");
        assert!(live.exists(), "its runner is still saving it");
        assert!(done.exists(), "a made snapshot is not a temporary");
    }

    #[test]
    fn guests_not_held_for_gdb_use_snapshots_in_both_modes() {
        let dir = Path::new("/r/vm");
        let on = QemuOptions::default();
        let off = QemuOptions { snapshots: false, ..QemuOptions::default() };
        assert!(wanted(&on, &plan(dir, Root::Host, None)));
        assert!(!wanted(&off, &plan(dir, Root::Host, None)));
        assert!(wanted(&on, &plan(dir, Root::Disk("/d".into()), None)), "image guests too");
        assert!(!wanted(&off, &plan(dir, Root::Disk("/d".into()), None)));
        assert!(!wanted(&on, &plan(dir, Root::None, None)), "a bare initramfs guest is a probe");
        assert!(wanted(&on, &plan(dir, Root::Host, Some(crate::Gdb { port: 1, wait: false }))));
        let held = plan(dir, Root::Host, Some(crate::Gdb { port: 1, wait: true }));
        assert!(!wanted(&on, &held), "held for gdb");
        let dumped =
            QemuCommand { dump: Some(Dump::To("/l/vmcore.elf".into())), ..plan(dir, Root::Host, None) };
        assert!(wanted(&on, &dumped), "a snapshot of its own (panic=0 is in the key)");
    }
}
