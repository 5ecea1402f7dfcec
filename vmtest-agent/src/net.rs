//! Private-network setup for multi-VM tests: each NIC (found by its MAC) gets one IPv4
//! address and is brought up; every node's name goes into `/etc/hosts`.

use std::io;
use std::time::{Duration, Instant};
use vmtest_core::protocol::{GuestNic, GuestSetup, HostsEntry};

/// Configure the NICs and hosts entries of `s`. Runs after the root switch, so `/etc/hosts`
/// is the guest's own (overlay) copy.
pub fn configure(s: &GuestSetup) -> io::Result<()> {
    for nic in &s.nics {
        let name = find_interface(&nic.mac, Duration::from_secs(10))?;
        configure_nic(&name, nic).map_err(|e| {
            io::Error::new(e.kind(), format!("configuring {name} ({}): {e}", mac_text(&nic.mac)))
        })?;
    }
    if !s.hosts.is_empty() {
        add_hosts(&s.hosts)?;
    }
    Ok(())
}

fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// The interface whose `/sys/class/net/*/address` is `mac`, waiting for it to appear (the
/// virtio_net module probes the device while init loads modules, but be patient).
fn find_interface(mac: &[u8; 6], wait: Duration) -> io::Result<String> {
    let want = mac_text(mac);
    let deadline = Instant::now() + wait;
    loop {
        if let Ok(entries) = std::fs::read_dir("/sys/class/net") {
            for e in entries.flatten() {
                let addr = std::fs::read_to_string(e.path().join("address")).unwrap_or_default();
                if addr.trim().eq_ignore_ascii_case(&want) {
                    return Ok(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "no network interface with MAC {want} after {wait:?}: is virtio_net in the initramfs?"
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn sockaddr_in(addr: [u8; 4]) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(addr) },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; this is how the ioctls take it.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn netmask(prefix: u8) -> [u8; 4] {
    let bits: u32 = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix.min(32) as u32) };
    bits.to_be_bytes()
}

/// SIOCSIFADDR, SIOCSIFNETMASK, then IFF_UP: the kernel adds the subnet route itself.
fn configure_nic(name: &str, nic: &GuestNic) -> io::Result<()> {
    // SAFETY: a plain socket used only for interface ioctls on a zeroed, filled-in ifreq.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in name.bytes().take(libc::IFNAMSIZ - 1).enumerate() {
            req.ifr_name[i] = b as libc::c_char;
        }
        let result = (|| {
            req.ifr_ifru.ifru_addr = sockaddr_in(nic.address);
            if libc::ioctl(fd, libc::SIOCSIFADDR, &req) < 0 {
                return Err(io::Error::last_os_error());
            }
            req.ifr_ifru.ifru_netmask = sockaddr_in(netmask(nic.prefix));
            if libc::ioctl(fd, libc::SIOCSIFNETMASK, &req) < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) < 0 {
                return Err(io::Error::last_os_error());
            }
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })();
        libc::close(fd);
        result
    }
}

fn add_hosts(entries: &[HostsEntry]) -> io::Result<()> {
    let mut hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    if !hosts.is_empty() && !hosts.ends_with('\n') {
        hosts.push('\n');
    }
    hosts.push_str("# vmtest private network\n");
    for e in entries {
        hosts.push_str(&format!("{}\t{}\n", e.address, e.names.join(" ")));
    }
    std::fs::write("/etc/hosts", hosts).map_err(|e| io::Error::new(e.kind(), format!("/etc/hosts: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netmasks_from_prefixes() {
        assert_eq!(netmask(24), [255, 255, 255, 0]);
        assert_eq!(netmask(16), [255, 255, 0, 0]);
        assert_eq!(netmask(32), [255, 255, 255, 255]);
        assert_eq!(netmask(0), [0, 0, 0, 0]);
    }

    #[test]
    fn macs_print_like_sysfs() {
        assert_eq!(mac_text(&[0x52, 0x54, 0, 0x12, 1, 0xab]), "52:54:00:12:01:ab");
    }
}
