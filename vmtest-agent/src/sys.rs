//! Thin, checked wrappers over the system calls the agent needs.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

pub fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// mount(2), with a message naming the target on failure.
pub fn mount(source: &str, target: &Path, fstype: &str, flags: libc::c_ulong, data: &str) -> io::Result<()> {
    std::fs::create_dir_all(target)?;
    let src = CString::new(source)?;
    let tgt = cstr(target)?;
    let fs = CString::new(fstype)?;
    let data = CString::new(data)?;
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let ret = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            if fstype.is_empty() { std::ptr::null() } else { fs.as_ptr() },
            flags,
            data.as_ptr().cast(),
        )
    };
    check(ret).map_err(|e| io::Error::new(e.kind(), format!("mount {fstype} on {}: {e}", target.display())))
}

/// Move a mount (MS_MOVE).
pub fn move_mount(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::create_dir_all(to)?;
    let (f, t) = (cstr(from)?, cstr(to)?);
    // SAFETY: valid strings; MS_MOVE ignores fstype and data.
    let ret =
        unsafe { libc::mount(f.as_ptr(), t.as_ptr(), std::ptr::null(), libc::MS_MOVE, std::ptr::null()) };
    check(ret)
        .map_err(|e| io::Error::new(e.kind(), format!("move {} to {}: {e}", from.display(), to.display())))
}

/// mknod(2) of a device node.
pub fn mknod(path: &Path, mode: libc::mode_t, major: u32, minor: u32) -> io::Result<()> {
    let p = cstr(path)?;
    // SAFETY: a valid string; makedev is arithmetic.
    check(unsafe { libc::mknod(p.as_ptr(), mode, libc::makedev(major, minor)) })
}

/// Bind-mount `from` (any path, `/proc/self/fd/N` included) on `to`.
pub fn bind_mount(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::create_dir_all(to)?;
    let (f, t) = (cstr(from)?, cstr(to)?);
    // SAFETY: valid strings; MS_BIND ignores fstype and data.
    let ret =
        unsafe { libc::mount(f.as_ptr(), t.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null()) };
    check(ret)
        .map_err(|e| io::Error::new(e.kind(), format!("bind {} on {}: {e}", from.display(), to.display())))
}

/// Load a kernel module from a file. Already loaded is fine.
pub fn load_module(path: &Path) -> io::Result<()> {
    let file = std::fs::File::open(path)?;
    use std::os::fd::AsRawFd;
    let params = CString::new("").unwrap();
    // SAFETY: a valid fd and an empty parameter string.
    let ret = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
    if ret < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EEXIST) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

pub fn chroot_here(dir: &Path) -> io::Result<()> {
    std::env::set_current_dir(dir)?;
    move_mount(Path::new("."), Path::new("/"))?;
    let dot = CString::new(".").unwrap();
    // SAFETY: a valid string.
    check(unsafe { libc::chroot(dot.as_ptr()) })?;
    std::env::set_current_dir("/")
}

pub fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: pointer and length describe `name`.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })
}

pub fn set_clock(secs: i64, nanos: u32) -> io::Result<()> {
    let ts = libc::timespec { tv_sec: secs as libc::time_t, tv_nsec: nanos as libc::c_long };
    // SAFETY: a valid timespec.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) })
}

/// Bring the loopback interface up: tests bind 127.0.0.1 all the time.
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: a plain socket used only for interface ioctls, closed below.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        let mut ret = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req);
        if ret == 0 {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            ret = libc::ioctl(fd, libc::SIOCSIFFLAGS, &req);
        }
        let err = io::Error::last_os_error();
        libc::close(fd);
        if ret < 0 {
            return Err(err);
        }
    }
    Ok(())
}

/// Flush and power the machine off. Never returns.
pub fn power_off() -> ! {
    // SAFETY: sync and reboot take no pointers.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    // Only reached without CAP_SYS_BOOT (not PID 1's case).
    std::process::exit(1)
}

/// Milliseconds since boot, from CLOCK_BOOTTIME.
pub fn uptime_ms() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

pub fn kernel_release() -> String {
    // SAFETY: uname fills a zeroed struct.
    unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        libc::uname(&mut u);
        std::ffi::CStr::from_ptr(u.release.as_ptr()).to_string_lossy().into_owned()
    }
}

/// Credit `seed` to the kernel's entropy pool and reseed the CRNG at once (RNDADDENTROPY,
/// RNDRESEEDCRNG), so the next random bytes depend on it.
pub fn add_entropy(seed: &[u8]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    let dev = std::fs::OpenOptions::new().write(true).open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + seed.len());
    info.extend_from_slice(&((seed.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(seed.len() as i32).to_ne_bytes());
    info.extend_from_slice(seed);
    // SAFETY: ioctls on our fd; `info` is laid out as struct rand_pool_info and outlives the call.
    unsafe {
        check(libc::ioctl(dev.as_raw_fd(), RNDADDENTROPY, info.as_ptr()))?;
        check(libc::ioctl(dev.as_raw_fd(), RNDRESEEDCRNG, 0))?;
    }
    Ok(())
}

/// Give a command about to be exec'd what it would inherit on the host: default signal
/// dispositions, no blocked signals, the host's resource limits and umask. Runs between fork
/// and exec, so only async-signal-safe calls, and nothing to report failures to: a limit
/// the guest kernel refuses (a hard limit above its maximum) stays the guest's.
pub fn host_like_process(rlimits: &[vmtest_core::protocol::Rlimit], umask: Option<u32>) {
    // SAFETY: sigaction, sigprocmask, setrlimit and umask are async-signal-safe and take
    // pointers to locals.
    unsafe {
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        for sig in 1..=64 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        for r in rlimits {
            let value = |v: u64| if v == u64::MAX { libc::RLIM_INFINITY } else { v };
            let lim = libc::rlimit { rlim_cur: value(r.soft), rlim_max: value(r.hard) };
            libc::setrlimit(r.resource as _, &lim);
        }
        if let Some(mask) = umask {
            libc::umask(mask as libc::mode_t);
        }
    }
}
