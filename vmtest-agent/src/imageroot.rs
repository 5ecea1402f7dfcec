//! Image mode: the initramfs agent mounts the image's disk as the root, injects what vmtest
//! needs (itself as a systemd service, a serial autologin) into the VM's throwaway overlay, and hands PID 1 to the image's own init (`/sbin/init`, systemd).
//!
//! The kernel command line carries the request:
//! - `vmtest.root=/dev/vda` the root device (ext4);
//! - `vmtest.init=/sbin/init` the init to run (optional).

use crate::sys;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// Where the agent puts itself in the image.
const AGENT_IN_IMAGE: &str = "usr/local/sbin/vmtest-agent";

const AGENT_UNIT: &str = "[Unit]
Description=vmtest agent (commands from the host over virtio-serial)
DefaultDependencies=no
After=systemd-remount-fs.service

[Service]
ExecStart=/usr/local/sbin/vmtest-agent
Restart=always
RestartSec=100ms
KillMode=process

[Install]
WantedBy=sysinit.target
";

const AUTOLOGIN: &str = "[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200,38400,9600 %I dumb
";

/// The value of `key=` on the kernel command line.
pub fn param<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// Mount the image root and exec its init. Returns only on failure.
pub fn boot(cmdline: &str, root_dev: &str) -> io::Error {
    match prepare(root_dev) {
        Ok(()) => {}
        Err(e) => return e,
    }
    let init = param(cmdline, "vmtest.init").unwrap_or("/sbin/init");
    let prog = std::ffi::CString::new(init).unwrap_or_default();
    let argv = [prog.as_ptr(), std::ptr::null()];
    // SAFETY: a NUL-terminated argv of valid strings.
    unsafe { libc::execv(prog.as_ptr(), argv.as_ptr()) };
    io::Error::new(io::Error::last_os_error().kind(), format!("exec {init}: {}", io::Error::last_os_error()))
}

fn prepare(root_dev: &str) -> io::Result<()> {
    let dev = Path::new(root_dev);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dev.exists() {
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{root_dev} did not appear in 30s: the kernel lacks virtio_blk, or no disk is attached"
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let root = Path::new("/mnt/root");
    sys::mount(root_dev, root, "ext4", 0, "")?;
    inject(root)?;
    // The new root gets /dev as it is; systemd mounts /proc, /sys, /run itself.
    sys::move_mount(Path::new("/dev"), &root.join("dev"))?;
    for m in ["/proc", "/sys"] {
        let c = sys::cstr(Path::new(m))?;
        // SAFETY: a valid path string.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
    sys::chroot_here(root)
}

/// Write vmtest's additions into the image root (the VM's overlay; the base never changes).
fn inject(root: &Path) -> io::Result<()> {
    let agent = std::fs::read("/init")?;
    let at = root.join(AGENT_IN_IMAGE);
    std::fs::create_dir_all(at.parent().unwrap())?;
    std::fs::write(&at, agent)?;
    std::fs::set_permissions(&at, std::fs::Permissions::from_mode(0o755))?;
    let units = root.join("etc/systemd/system");
    std::fs::create_dir_all(units.join("sysinit.target.wants"))?;
    std::fs::write(units.join("vmtest-agent.service"), AGENT_UNIT)?;
    let link = units.join("sysinit.target.wants/vmtest-agent.service");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink("/etc/systemd/system/vmtest-agent.service", &link)?;
    let getty = units.join("serial-getty@ttyS0.service.d");
    std::fs::create_dir_all(&getty)?;
    std::fs::write(getty.join("vmtest-autologin.conf"), AUTOLOGIN)?;
    Ok(())
}

/// Make `key` (`TYPE BASE64`) root's only authorized SSH key, in the root at `root`. Run
/// at every setup, so a guest restored from a snapshot takes this run's key, not the one of
/// the run that made the snapshot.
pub fn authorize(root: &Path, key: &str) -> io::Result<()> {
    let ssh = root.join("root/.ssh");
    std::fs::create_dir_all(&ssh)?;
    std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o700))?;
    let tmp = ssh.join(".authorized_keys.vmtest");
    std::fs::write(&tmp, format!("{key} vmtest-run\n"))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&tmp, ssh.join("authorized_keys"))
}

/// A fresh `/etc/machine-id` from `entropy` (32 hex digits, a version-4 UUID as systemd
/// writes them). Processes started from now on see it; systemd itself keeps the one it
/// read at boot.
pub fn new_machine_id(entropy: &[u8]) -> io::Result<()> {
    let mut id = [0u8; 16];
    for (i, b) in entropy.iter().enumerate() {
        id[i % 16] ^= b;
    }
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write("/etc/machine-id", format!("{hex}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_are_found_by_exact_key() {
        let c = "quiet vmtest.root=/dev/vda vmtest.ssh_key=ssh-ed25519:AAAA vmtest.rootx=1";
        assert_eq!(param(c, "vmtest.root"), Some("/dev/vda"));
        assert_eq!(param(c, "vmtest.ssh_key"), Some("ssh-ed25519:AAAA"));
        assert_eq!(param(c, "vmtest.init"), None);
    }
}
