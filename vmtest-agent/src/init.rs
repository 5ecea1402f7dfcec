//! PID 1 duties: early mounts, kernel modules, the root switch, reaping orphans.

use crate::sys;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use vmtest_core::protocol::{GuestSetup, AGENT_PORT_NAME, POWEROFF_MARKER};

/// Where the initramfs keeps its modules: `order` lists the files in load order.
const MODULE_DIR: &str = "/lib/modules/vmtest";

/// Boot milestones (ms of uptime), reported in the agent's hello. Set before the fork.
pub static INIT_MS: AtomicU64 = AtomicU64::new(0);
pub static MODULES_MS: AtomicU64 = AtomicU64::new(0);

/// Entry point when the kernel started us as init. Never returns.
pub fn pid1() -> ! {
    INIT_MS.store(sys::uptime_ms(), Ordering::Relaxed);
    if let Err(e) = early_mounts() {
        eprintln!("vmtest-agent: early mounts failed: {e}");
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if cmdline.split_whitespace().any(|w| w == POWEROFF_MARKER) {
        sys::power_off();
    }
    let before = sys::uptime_ms();
    load_modules();
    MODULES_MS.store(sys::uptime_ms() - before, Ordering::Relaxed);
    if let Some(dev) = crate::imageroot::param(&cmdline, "vmtest.root") {
        // Image mode: the image's own init becomes PID 1 and starts the agent as a service.
        let e = crate::imageroot::boot(&cmdline, dev);
        eprintln!("vmtest-agent: cannot boot the image root: {e}");
        sys::power_off();
    }
    // SAFETY: fork in a single-threaded process; the child goes on to serve.
    match unsafe { libc::fork() } {
        0 => serve_as_child(),
        pid if pid > 0 => reap_until(pid),
        _ => {
            eprintln!("vmtest-agent: fork failed: {}", io::Error::last_os_error());
            serve_as_child()
        }
    }
}

fn serve_as_child() -> ! {
    let result = find_port(AGENT_PORT_NAME, Duration::from_secs(30))
        .and_then(|port| crate::server::serve(&port, true));
    match result {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("vmtest-agent: {e}");
            std::process::exit(1)
        }
    }
}

/// Reap every child; when the agent itself ends, power off so the host sees the VM stop.
fn reap_until(agent: libc::pid_t) -> ! {
    loop {
        let mut status = 0;
        // SAFETY: a valid out-pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid == agent {
            eprintln!("vmtest-agent: agent exited (status {status}); powering off");
            sys::power_off();
        }
        if pid < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
            sys::power_off();
        }
    }
}

fn early_mounts() -> io::Result<()> {
    let nodev = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    sys::mount("proc", Path::new("/proc"), "proc", nodev, "")?;
    sys::mount("sysfs", Path::new("/sys"), "sysfs", nodev, "")?;
    // The kernel may have mounted devtmpfs already (CONFIG_DEVTMPFS_MOUNT).
    match sys::mount("devtmpfs", Path::new("/dev"), "devtmpfs", libc::MS_NOSUID, "mode=0755") {
        Err(e) if e.raw_os_error() != Some(libc::EBUSY) => Err(e),
        _ => Ok(()),
    }
}

fn load_modules() {
    let order = match std::fs::read_to_string(Path::new(MODULE_DIR).join("order")) {
        Ok(o) => o,
        Err(_) => return, // a kernel with everything built in
    };
    for name in order.lines().filter(|l| !l.is_empty()) {
        let path = Path::new(MODULE_DIR).join(name);
        if let Err(e) = sys::load_module(&path) {
            eprintln!("vmtest-agent: cannot load module {name}: {e}");
        }
    }
}

/// Find the `/dev/vportNpM` whose name is `name`, waiting for the device to appear.
pub fn find_port(name: &str, wait: Duration) -> io::Result<PathBuf> {
    let deadline = Instant::now() + wait;
    loop {
        if let Ok(entries) = std::fs::read_dir("/sys/class/virtio-ports") {
            for e in entries.flatten() {
                let port_name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
                if port_name.trim() == name {
                    let dev = Path::new("/dev").join(e.file_name());
                    if dev.exists() {
                        return Ok(dev);
                    }
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "virtio-serial port {name} not found after {wait:?}: the guest kernel lacks \
                     virtio_console (or the host did not attach the port)"
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Prepare the guest for commands: clock, hostname, loopback, and the root switch.
pub fn setup(s: &GuestSetup) -> io::Result<()> {
    if let Err(e) = sys::set_clock(s.unix_time_secs, s.unix_time_nanos) {
        eprintln!("vmtest-agent: cannot set the clock: {e}");
    }
    if !s.entropy.is_empty() {
        sys::add_entropy(&s.entropy)
            .map_err(|e| io::Error::new(e.kind(), format!("reseeding the RNG: {e}")))?;
    }
    if let Some(key) = &s.authorized_key {
        crate::imageroot::authorize(Path::new("/"), key)
            .map_err(|e| io::Error::new(e.kind(), format!("writing root's authorized_keys: {e}")))?;
    }
    if s.new_machine_id {
        crate::imageroot::new_machine_id(&s.entropy)
            .map_err(|e| io::Error::new(e.kind(), format!("writing /etc/machine-id: {e}")))?;
    }
    if s.resumed {
        // A checkpoint's guest keeps its name, addresses and root.
        return Ok(());
    }
    sys::set_hostname(&s.hostname)?;
    sys::loopback_up().map_err(|e| io::Error::new(e.kind(), format!("loopback up: {e}")))?;
    if let Some(tag) = &s.root_tag {
        let modules = s.modules_dir.as_deref().map(|d| Path::new(std::ffi::OsStr::from_bytes(d)));
        switch_root(tag, &s.overlay_size, &s.hostname, modules)?;
    }
    for share in &s.shares {
        let target = Path::new(std::ffi::OsStr::from_bytes(&share.guest_path));
        let flags = if share.read_only { libc::MS_RDONLY } else { 0 };
        sys::mount(&share.tag, target, "9p", flags, NINEP_OPTS)?;
    }
    crate::net::configure(s)?;
    Ok(())
}

/// 9p options: the 9P2000.L dialect, large messages, guest-side permission checks, and
/// loose caching (the share is read-only, so there is nothing to keep coherent).
const NINEP_OPTS: &str = "trans=virtio,version=9p2000.L,msize=512000,access=client,cache=loose";

/// Make `host / (9p, read-only) + tmpfs` the root: every write lands in guest memory.
fn switch_root(tag: &str, overlay_size: &str, hostname: &str, modules_dir: Option<&Path>) -> io::Result<()> {
    let lower = Path::new("/mnt/lower");
    let rw = Path::new("/mnt/rw");
    let root = Path::new("/mnt/root");
    sys::mount(tag, lower, "9p", libc::MS_RDONLY, NINEP_OPTS)?;
    sys::mount("tmpfs", rw, "tmpfs", 0, &format!("mode=0755,size={overlay_size}"))?;
    std::fs::create_dir_all(rw.join("upper"))?;
    std::fs::create_dir_all(rw.join("work"))?;
    sys::mount(
        "overlay",
        root,
        "overlay",
        0,
        "lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work,xino=off,index=off,metacopy=off",
    )?;
    let nodev = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    sys::mount("proc", &root.join("proc"), "proc", nodev, "")?;
    sys::mount("sysfs", &root.join("sys"), "sysfs", nodev, "")?;
    sys::move_mount(Path::new("/dev"), &root.join("dev"))?;
    sys::mount(
        "devpts",
        &root.join("dev/pts"),
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "mode=0620,ptmxmode=0666",
    )?;
    sys::mount("tmpfs", &root.join("dev/shm"), "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, "mode=1777")?;
    // /tmp is the overlay's, like every other directory: the host's files stay visible (a
    // checkout or a temp dir under /tmp is still there), and what the guest writes lives in
    // the tmpfs upper layer, where open-unlink-fstat works (danobi/vmtest#83) and nothing
    // reaches the host.
    sys::mount("tmpfs", &root.join("run"), "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, "mode=0755")?;
    if let Err(e) = sys::mount("cgroup2", &root.join("sys/fs/cgroup"), "cgroup2", nodev, "") {
        eprintln!("vmtest-agent: {e} (continuing without cgroups)");
    }
    populate_dev(&root.join("dev"));
    // The guest kernel's modules (a directory of the read-only host root), where the
    // kernel's module helper (in this initramfs) and modprobe in the new root both look.
    // Held open through the root switch, then bound in.
    // A guest without them still runs commands: a failure here is only reported.
    let modules = modules_dir.and_then(|dir| match mount_modules(lower, dir) {
        Ok(held) => Some(held),
        Err(e) => {
            eprintln!("vmtest-agent: no kernel modules on demand: {e}");
            None
        }
    });
    sys::chroot_here(root)?;
    if let Some((dir, tree)) = modules {
        use std::os::fd::AsRawFd;
        let held = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
        match sys::bind_mount(&held, &tree) {
            Ok(()) => crate::modprobe::static_nodes(&tree, Path::new("/dev")),
            Err(e) => eprintln!("vmtest-agent: no kernel modules in the guest root: {e}"),
        }
    }
    add_hosts_entry(hostname);
    Ok(())
}

/// Bind the module tree `dir` of the host root (mounted at `lower`) at the initramfs's
/// `/lib/modules/<release>` and link the kernel's module helper; the tree stays open, to be
/// bound into the new root after the switch.
fn mount_modules(lower: &Path, dir: &Path) -> io::Result<(std::fs::File, PathBuf)> {
    let tree = Path::new("/lib/modules").join(sys::kernel_release());
    sys::bind_mount(&lower.join(dir.strip_prefix("/").unwrap_or(dir)), &tree)?;
    // The kernel's default helper path, linked only now: the module requests of boot
    // (crypto self-tests and the like) keep failing at once, as a missing helper does,
    // instead of each starting the agent for nothing.
    std::fs::create_dir_all("/sbin")?;
    std::os::unix::fs::symlink("/init", "/sbin/modprobe")?;
    Ok((std::fs::File::open(&tree)?, tree))
}

/// The links and mounts udev and systemd give every Linux system's /dev.
fn populate_dev(dev: &Path) {
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("core", "/proc/kcore"),
    ] {
        let _ = std::os::unix::fs::symlink(target, dev.join(name));
    }
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    if let Err(e) = sys::mount("mqueue", &dev.join("mqueue"), "mqueue", flags, "") {
        eprintln!("vmtest-agent: {e} (continuing without /dev/mqueue)");
    }
}

/// Let the guest resolve its own name, as most tools expect.
fn add_hosts_entry(hostname: &str) {
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    if !hosts.split_whitespace().any(|w| w == hostname) {
        let _ = std::fs::write("/etc/hosts", format!("{hosts}127.0.1.1\t{hostname}\n"));
    }
}
