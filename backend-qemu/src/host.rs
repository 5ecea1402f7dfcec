//! What the backend asks of the host OS: programs on `PATH`, random bytes, the clock, free
//! disk space, qcow2 overlays.

use std::path::{Path, PathBuf};
use vmtest_core::{Error, Result};

/// Resolve a program name on `PATH` (or check a path), as a shell would.
pub(crate) fn find_executable(name: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let is_exec =
        |p: &Path| p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false);
    if name.components().count() > 1 {
        return is_exec(name).then(|| name.to_owned());
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(name))
        .find(|p| is_exec(p))
}

/// `n` bytes from the kernel's random source.
pub(crate) fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    // SAFETY: getrandom writes at most `buf.len()` bytes into `buf`.
    let got = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    buf.truncate(got.max(0) as usize);
    buf
}

/// The time now, as Unix seconds and nanoseconds.
pub(crate) fn now_unix() -> (i64, u32) {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos())
}

/// The bytes an unprivileged user may still write on the filesystem of `path`.
pub(crate) fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: a valid path and a zeroed out-struct.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(c.as_ptr(), &mut st) == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
    }
}

/// `qemu-img create -f qcow2 -F qcow2 -b BACKING overlay` (replacing any `overlay`): a VM
/// writes only to its overlay, never to what it is backed by.
pub(crate) fn qcow2_overlay(backing: &Path, overlay: &Path) -> Result<()> {
    let _ = std::fs::remove_file(overlay);
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(backing)
        .arg(overlay)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| Error::preflight(format!("cannot run qemu-img: {e}; apt-get install qemu-utils")))?;
    if !out.status.success() {
        return Err(Error::infra(format!(
            "qemu-img create of the overlay failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The backing file a qcow2 file names in its header (`backing_file_offset` at byte 8,
/// `backing_file_size` at byte 16, big-endian), or an error for a file without one.
pub(crate) fn qcow2_backing(path: &Path) -> Result<PathBuf> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::ffi::OsStrExt;
    let bad = |why: &str| Error::infra(format!("{} is not a qcow2 overlay: {why}", path.display()));
    let mut f =
        std::fs::File::open(path).map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
    let mut header = [0u8; 20];
    f.read_exact(&mut header).map_err(|_| bad("too short"))?;
    if &header[..4] != b"QFI\xfb" {
        return Err(bad("no qcow2 magic"));
    }
    let offset = u64::from_be_bytes(header[8..16].try_into().expect("8 bytes"));
    let size = u32::from_be_bytes(header[16..20].try_into().expect("4 bytes")) as usize;
    if offset == 0 || size == 0 || size > 4096 {
        return Err(bad("no backing file"));
    }
    let mut name = vec![0u8; size];
    f.seek(SeekFrom::Start(offset)).and_then(|_| f.read_exact(&mut name)).map_err(|_| bad("truncated"))?;
    Ok(PathBuf::from(std::ffi::OsStr::from_bytes(&name)))
}
