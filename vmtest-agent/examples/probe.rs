//! Reports what a command sees of its process and system, one `key: value` line each, so a
//! test can compare the host's report with a vmtest guest's (vmtest-cli/tests/host_parity.rs).
//!
//! Usage: `probe SHARED_DIR TMP_DIR`. SHARED_DIR holds files `file` (with the attribute
//! `user.vmtest.present=yes` where the host's file system takes it) and `written` the host
//! created (in the guest they come from the read-only host root; `written` is opened for
//! writing); TMP_DIR is where scratch files go.
//! Only std and libc, so it builds fast and runs anywhere.

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

fn main() {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [shared, tmp] = &args[..] else {
        eprintln!("usage: probe SHARED_DIR TMP_DIR");
        std::process::exit(2);
    };
    let mut out = Vec::new();
    process_model(&mut out);
    limits(&mut out);
    dev_entries(&mut out);
    modules(&mut out);
    shared_root(&mut out, shared);
    scratch(&mut out, tmp);
    let mut stdout = std::io::stdout().lock();
    for (k, v) in out {
        let _ = writeln!(stdout, "{k}: {v}");
    }
}

type Report = Vec<(String, String)>;

/// Signal dispositions and mask as the process inherited them, recorded before Rust's
/// runtime starts (it ignores SIGPIPE itself): bit n-1 is signal n.
static INHERITED_IGNORED: AtomicU64 = AtomicU64::new(0);
static INHERITED_BLOCKED: AtomicU64 = AtomicU64::new(0);

#[used]
#[link_section = ".init_array"]
static RECORD_SIGNALS: extern "C" fn() = record_signals;

extern "C" fn record_signals() {
    let (mut ignored, mut blocked) = (0u64, 0u64);
    // SAFETY: queries into zeroed out-structs; no handler is changed.
    unsafe {
        for sig in 1..=64 {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN {
                ignored |= 1 << (sig - 1);
            }
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigprocmask(libc::SIG_BLOCK, std::ptr::null(), &mut set);
        for sig in 1..=64 {
            if libc::sigismember(&set, sig) == 1 {
                blocked |= 1 << (sig - 1);
            }
        }
    }
    INHERITED_IGNORED.store(ignored, Ordering::Relaxed);
    INHERITED_BLOCKED.store(blocked, Ordering::Relaxed);
}

fn put(out: &mut Report, key: &str, value: impl ToString) {
    out.push((key.to_owned(), value.to_string()));
}

fn errno_name(e: &std::io::Error) -> String {
    let names = [
        (libc::ENOENT, "ENOENT"),
        (libc::ENODATA, "ENODATA"),
        (libc::EOPNOTSUPP, "EOPNOTSUPP"),
        (libc::EPERM, "EPERM"),
        (libc::EACCES, "EACCES"),
        (libc::EROFS, "EROFS"),
        (libc::ENXIO, "ENXIO"),
        (libc::ENODEV, "ENODEV"),
        (libc::EINVAL, "EINVAL"),
        (libc::EISDIR, "EISDIR"),
        (libc::EBUSY, "EBUSY"),
    ];
    let code = e.raw_os_error().unwrap_or(0);
    names.iter().find(|(c, _)| *c == code).map(|(_, n)| n.to_string()).unwrap_or(format!("errno {code}"))
}

fn outcome(r: std::io::Result<()>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(e) => errno_name(&e),
    }
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// The process-model facts: who leads the group and session, the terminal, signals, fds.
fn process_model(out: &mut Report) {
    // SAFETY: plain getters.
    let (pid, pgid, sid) = unsafe { (libc::getpid(), libc::getpgid(0), libc::getsid(0)) };
    put(out, "process.group_leader", pgid == pid);
    put(out, "process.session_leader", sid == pid);
    // A session id of 0 is the kernel's own (init's) session: no real session at all.
    put(out, "process.in_a_session", sid > 0);
    let tty = std::fs::OpenOptions::new().read(true).open("/dev/tty");
    put(out, "process.controlling_tty", tty.is_ok());
    put(out, "process.signals_ignored", format!("{:016x}", INHERITED_IGNORED.load(Ordering::Relaxed)));
    put(out, "process.signals_blocked", format!("{:016x}", INHERITED_BLOCKED.load(Ordering::Relaxed)));
    let mut fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    // One of them is the directory being read; it is closed by now.
    fds.retain(|fd| std::fs::read_link(format!("/proc/self/fd/{fd}")).is_ok());
    fds.sort();
    put(out, "process.fds", format!("{fds:?}"));
    // SAFETY: umask is read by setting and restoring it.
    let mask = unsafe {
        let m = libc::umask(0o022);
        libc::umask(m);
        m
    };
    put(out, "process.umask", format!("{mask:04o}"));
}

fn limits(out: &mut Report) {
    let names = [
        (libc::RLIMIT_CPU, "cpu"),
        (libc::RLIMIT_FSIZE, "fsize"),
        (libc::RLIMIT_DATA, "data"),
        (libc::RLIMIT_STACK, "stack"),
        (libc::RLIMIT_CORE, "core"),
        (libc::RLIMIT_RSS, "rss"),
        (libc::RLIMIT_NPROC, "nproc"),
        (libc::RLIMIT_NOFILE, "nofile"),
        (libc::RLIMIT_MEMLOCK, "memlock"),
        (libc::RLIMIT_AS, "as"),
        (libc::RLIMIT_LOCKS, "locks"),
        (libc::RLIMIT_SIGPENDING, "sigpending"),
        (libc::RLIMIT_MSGQUEUE, "msgqueue"),
        (libc::RLIMIT_NICE, "nice"),
        (libc::RLIMIT_RTPRIO, "rtprio"),
        (libc::RLIMIT_RTTIME, "rttime"),
    ];
    for (res, name) in names {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: a valid out-pointer.
        unsafe { libc::getrlimit(res, &mut r) };
        let show =
            |v: libc::rlim_t| if v == libc::RLIM_INFINITY { "unlimited".into() } else { v.to_string() };
        put(out, &format!("rlimit.{name}"), format!("{} {}", show(r.rlim_cur), show(r.rlim_max)));
    }
}

/// What a minimal systemd/udev system has in /dev.
fn dev_entries(out: &mut Report) {
    for name in [
        "stdin",
        "stdout",
        "stderr",
        "fd",
        "core",
        "null",
        "zero",
        "full",
        "random",
        "urandom",
        "tty",
        "ptmx",
        "pts",
        "shm",
        "mqueue",
        "kmsg",
        "net/tun",
        "fuse",
        "loop-control",
    ] {
        let path = Path::new("/dev").join(name);
        let desc = match std::fs::symlink_metadata(&path) {
            Err(e) => errno_name(&e),
            Ok(m) if m.file_type().is_symlink() => {
                format!(
                    "-> {}",
                    std::fs::read_link(&path).map(|t| t.display().to_string()).unwrap_or_default()
                )
            }
            Ok(m) if m.file_type().is_char_device() => {
                use std::os::unix::fs::MetadataExt;
                let rdev = m.rdev();
                let (maj, min) = (libc::major(rdev), libc::minor(rdev));
                format!("char {maj}:{min}")
            }
            Ok(m) if m.is_dir() => "dir".into(),
            Ok(_) => "other".into(),
        };
        put(out, &format!("dev.{name}"), desc);
    }
}

/// The running kernel's modules: its tree is where modprobe looks, and opening a static node
/// of an autoloadable module loads the module.
fn modules(out: &mut Report) {
    // SAFETY: uname fills a zeroed struct.
    let release = unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        libc::uname(&mut u);
        std::ffi::CStr::from_ptr(u.release.as_ptr()).to_string_lossy().into_owned()
    };
    let tree = Path::new("/lib/modules").join(&release);
    put(out, "modules.tree", tree.join("modules.dep").is_file());
    let tun = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun");
    put(out, "modules.open_dev_net_tun", outcome(tun.map(drop)));
    let loaded = std::fs::read_to_string("/proc/modules").unwrap_or_default();
    let builtin = std::fs::read_to_string(tree.join("modules.builtin")).unwrap_or_default();
    put(
        out,
        "modules.tun_present",
        loaded.lines().any(|l| l.starts_with("tun ")) || builtin.lines().any(|l| l.ends_with("/tun.ko")),
    );
}

/// File semantics on a file of the (host's) root file system.
fn shared_root(out: &mut Report, dir: &Path) {
    let file = dir.join("file");
    put(out, "shared.read", outcome(std::fs::read(&file).map(drop)));
    let mut buf = [0u8; 16];
    let name = CString::new("user.vmtest.missing").unwrap();
    // SAFETY: valid strings and buffer.
    let r =
        unsafe { libc::getxattr(cstr(&file).as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    put(
        out,
        "shared.getxattr_missing",
        if r < 0 { errno_name(&std::io::Error::last_os_error()) } else { "found".into() },
    );
    // The host gave `file` this attribute (when its file system takes user attributes).
    let present = CString::new("user.vmtest.present").unwrap();
    // SAFETY: as above.
    let r =
        unsafe { libc::getxattr(cstr(&file).as_ptr(), present.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    put(
        out,
        "shared.getxattr_present",
        if r < 0 {
            errno_name(&std::io::Error::last_os_error())
        } else {
            String::from_utf8_lossy(&buf[..r as usize]).into_owned()
        },
    );
    // SAFETY: as above.
    let r = unsafe { libc::getxattr(cstr(dir).as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    put(
        out,
        "shared.getxattr_missing_on_dir",
        if r < 0 { errno_name(&std::io::Error::last_os_error()) } else { "found".into() },
    );
    // Opening for writing is what makes an overlay copy a file up to its upper layer.
    let written = dir.join("written");
    let opened = std::fs::OpenOptions::new().append(true).open(&written);
    put(out, "shared.open_for_append", outcome(opened.map(drop)));
    // SAFETY: as above.
    let r =
        unsafe { libc::getxattr(cstr(&written).as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    put(
        out,
        "shared.getxattr_missing_after_write",
        if r < 0 { errno_name(&std::io::Error::last_os_error()) } else { "found".into() },
    );
    // SAFETY: as above; a size query.
    let r = unsafe { libc::listxattr(cstr(&file).as_ptr(), std::ptr::null_mut(), 0) };
    put(
        out,
        "shared.listxattr",
        if r < 0 { errno_name(&std::io::Error::last_os_error()) } else { "ok".into() },
    );
}

/// File semantics on scratch files under a temp directory.
fn scratch(out: &mut Report, tmp: &Path) {
    use std::os::fd::AsRawFd;
    let dir = tmp.join(format!("vmtest-probe-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("append");
    let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path);
    let Ok(mut f) = file else {
        put(out, "tmp.create", "failed");
        return;
    };
    let _ = f.write_all(b"abc");
    // SAFETY: lseek on our fd.
    unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_SET) };
    let data = b"de";
    let iov = libc::iovec { iov_base: data.as_ptr() as *mut _, iov_len: data.len() };
    // SAFETY: one valid iovec; offset -1 means "the file position".
    let n = unsafe { libc::pwritev2(f.as_raw_fd(), &iov, 1, -1, libc::RWF_APPEND) };
    // SAFETY: as above.
    let pos = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_CUR) };
    put(out, "tmp.pwritev2_append_wrote", n);
    put(out, "tmp.pwritev2_append_position", pos);
    put(
        out,
        "tmp.pwritev2_append_content",
        String::from_utf8_lossy(&std::fs::read(&path).unwrap_or_default()),
    );
    // Open, unlink, then use: what tempfile() does.
    let gone = dir.join("unlinked");
    let r = std::fs::File::create(&gone).and_then(|mut g| {
        std::fs::remove_file(&gone)?;
        g.write_all(b"x")?;
        g.metadata().map(drop)
    });
    put(out, "tmp.unlinked_fstat", outcome(r));
    let name = CString::new("user.vmtest").unwrap();
    // SAFETY: valid strings and a 1-byte value.
    let r = unsafe { libc::setxattr(cstr(&path).as_ptr(), name.as_ptr(), b"1".as_ptr().cast(), 1, 0) };
    put(
        out,
        "tmp.setxattr_user",
        if r < 0 { errno_name(&std::io::Error::last_os_error()) } else { "ok".into() },
    );
    // SAFETY: O_TMPFILE open of a directory path.
    let fd = unsafe { libc::open(cstr(&dir).as_ptr(), libc::O_TMPFILE | libc::O_RDWR, 0o600) };
    put(
        out,
        "tmp.o_tmpfile",
        if fd < 0 { errno_name(&std::io::Error::last_os_error()) } else { "ok".into() },
    );
    if fd >= 0 {
        // SAFETY: our fd.
        unsafe { libc::close(fd) };
    }
    let linked = dir.join("hardlink");
    put(out, "tmp.hard_link", outcome(std::fs::hard_link(&path, &linked)));
    let _ = std::fs::remove_dir_all(&dir);
}
