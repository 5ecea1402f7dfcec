//! Configuration from the environment, and the two flavors.

use crate::host::{HostCommand, Privilege};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;
use vmtest_core::{Error, Result};

/// Where the FreeBSD and illumos bhyve differ (reference §4).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Flavor {
    FreeBsd,
    Illumos,
}

impl Flavor {
    pub fn parse(s: &str) -> Result<Flavor> {
        match s {
            "freebsd" => Ok(Flavor::FreeBsd),
            "illumos" => Ok(Flavor::Illumos),
            other => Err(Error::usage(format!(
                "VMTEST_BHYVE_FLAVOR=`{other}` is not known; use freebsd or illumos"
            ))),
        }
    }

    /// From the host's `uname -s`.
    pub fn detect() -> Option<Flavor> {
        // SAFETY: uname fills a plain struct.
        let sys = unsafe {
            let mut u: libc::utsname = std::mem::zeroed();
            if libc::uname(&mut u) != 0 {
                return None;
            }
            std::ffi::CStr::from_ptr(u.sysname.as_ptr()).to_string_lossy().into_owned()
        };
        match sys.as_str() {
            "FreeBSD" => Some(Flavor::FreeBsd),
            "SunOS" | "illumos" => Some(Flavor::Illumos),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Flavor::FreeBsd => "freebsd",
            Flavor::Illumos => "illumos",
        }
    }

    /// The block device the VMM gets for a zvol: `/dev/zvol/<ds>` or the raw `/dev/zvol/rdsk/<ds>`.
    pub fn zvol_path(self, dataset: &str) -> String {
        match self {
            Flavor::FreeBsd => format!("/dev/zvol/{dataset}"),
            Flavor::Illumos => format!("/dev/zvol/rdsk/{dataset}"),
        }
    }

    /// `-o` options for new zvols and clones.
    pub fn zvol_options(self) -> &'static [&'static str] {
        match self {
            Flavor::FreeBsd => &["-o", "volmode=dev"],
            Flavor::Illumos => &["-o", "volblocksize=4k"],
        }
    }

    /// Where each system installs bhyve's UEFI firmware, in the order they are tried: FreeBSD's
    /// edk2-bhyve port; OmniOS/Helios (`BHYVE_RELEASE.fd` and its `BHYVE.fd` link); SmartOS.
    pub fn bootrom_candidates(self) -> &'static [&'static str] {
        match self {
            Flavor::FreeBsd => &["/usr/local/share/uefi-firmware/BHYVE_UEFI.fd"],
            Flavor::Illumos => &[
                "/usr/share/bhyve/firmware/BHYVE_RELEASE.fd",
                "/usr/share/bhyve/firmware/BHYVE.fd",
                "/usr/share/bhyve/uefi-rom.bin",
            ],
        }
    }

    /// The first firmware candidate that exists under `root` (`/` on a real host), as its
    /// host path; `None` when there is none.
    pub fn probe_bootrom(self, root: &std::path::Path) -> Option<String> {
        self.bootrom_candidates()
            .iter()
            .find(|c| root.join(c.trim_start_matches('/')).is_file())
            .map(|c| (*c).to_owned())
    }

    /// How to install the firmware.
    pub fn bootrom_fix(self) -> &'static str {
        match self {
            Flavor::FreeBsd => {
                "install it (`pkg install edk2-bhyve`), or set VMTEST_BHYVE_BOOTROM to its path \
                                (or to `none` to load FreeBSD guests with bhyveload)"
            }
            Flavor::Illumos => {
                "install it (OmniOS/Helios: `pkg install system/bhyve/firmware`; SmartOS ships \
                                it), or set VMTEST_BHYVE_BOOTROM to its path"
            }
        }
    }

    fn default_pool(self) -> &'static str {
        match self {
            Flavor::FreeBsd => "zroot",
            Flavor::Illumos => "rpool",
        }
    }

    fn default_image(self) -> &'static str {
        match self {
            Flavor::FreeBsd => "freebsd-14",
            Flavor::Illumos => "helios-2.0",
        }
    }
}

/// How files reach the guest.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ShareMode {
    /// Base64 chunks over the serial console, checked with `cksum`.
    Serial,
    /// A virtio-9p share of a host dir, pulled in the guest with `p9kp pull` (illumos guests).
    P9kp,
}

/// Everything the backend reads from the environment. See the crate docs for the variables.
#[derive(Clone, Debug)]
pub struct Config {
    /// `None` when neither the host nor `VMTEST_BHYVE_FLAVOR` names one.
    pub flavor: Option<Flavor>,
    pub pool: String,
    pub image: String,
    pub host: HostCommand,
    /// Where `/dev` is for files this process opens itself (zvols, nmdm, vmm).
    pub devroot: PathBuf,
    pub user: String,
    pub password: Option<String>,
    /// FreeBSD: the bridge a tap joins; illumos: the link a VNIC goes over. None: no NIC.
    pub nic: Option<String>,
    pub share: ShareMode,
    /// The UEFI firmware; `None`: FreeBSD guests are loaded with `bhyveload` (illumos has none).
    pub bootrom: Option<String>,
    /// Size of each VM's disk: the clone grows to it (`zfs set volsize`); never shrinks.
    pub disk_bytes: u64,
    /// Guest directory for copied-in programs (omicron's cargo bay).
    pub bay: String,
    /// Copy a host program named by path into the bay before running it (cargo runner use).
    pub copy_program: bool,
    /// Pause between retries of busy datasets and links.
    pub retry_pause: Duration,
    pub retries: u32,
    /// From SIGTERM to bhyve (the guest's power button) to `bhyvectl --destroy`.
    pub stop_grace: Duration,
}

/// The default disk of a VM, as falcon's.
pub const DEFAULT_DISK: u64 = 20 << 30;

/// `20G`, `512M`, `1T` or bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&s[..i], 1 << 20),
        (i, 'G' | 'g') => (&s[..i], 1 << 30),
        (i, 'T' | 't') => (&s[..i], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>().ok().filter(|n| *n > 0).and_then(|n| n.checked_mul(mult))
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl Config {
    /// The guest's console login.
    pub fn login(&self) -> vmtest_core::shell::Login {
        vmtest_core::shell::Login { user: self.user.clone(), password: self.password.clone() }
    }

    pub fn from_env() -> Result<Config> {
        let flavor = match var("VMTEST_BHYVE_FLAVOR") {
            Some(f) => Some(Flavor::parse(&f)?),
            None => Flavor::detect(),
        };
        let root = unsafe { libc::geteuid() } == 0;
        let privilege = match var("VMTEST_PRIV") {
            Some(p) => Privilege::parse(&p)?,
            None if root => Privilege::None,
            None if flavor == Some(Flavor::Illumos) => Privilege::Pfexec,
            None => Privilege::Sudo,
        };
        let path_override =
            var("VMTEST_BHYVE_PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
        let fl = flavor.unwrap_or(Flavor::FreeBsd);
        let share = match var("VMTEST_BHYVE_SHARE").as_deref() {
            Some("p9kp") => ShareMode::P9kp,
            Some("serial") | Some("none") => ShareMode::Serial,
            Some(other) => {
                return Err(Error::usage(format!(
                    "VMTEST_BHYVE_SHARE=`{other}` is not known; use p9kp or serial"
                )))
            }
            None if fl == Flavor::Illumos => ShareMode::P9kp,
            None => ShareMode::Serial,
        };
        let ms = |name: &str, default: u64| var(name).and_then(|v| v.parse().ok()).unwrap_or(default);
        Ok(Config {
            flavor,
            pool: var("VMTEST_BHYVE_POOL").unwrap_or_else(|| fl.default_pool().to_owned()),
            image: var("VMTEST_BHYVE_IMAGE").unwrap_or_else(|| fl.default_image().to_owned()),
            host: HostCommand::new(privilege, path_override),
            devroot: var("VMTEST_BHYVE_DEVROOT").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/dev")),
            user: var("VMTEST_BHYVE_USER").unwrap_or_else(|| "root".to_owned()),
            password: var("VMTEST_BHYVE_PASSWORD"),
            nic: var("VMTEST_BHYVE_NIC"),
            share,
            bootrom: match var("VMTEST_BHYVE_BOOTROM").as_deref() {
                Some("none") if fl == Flavor::Illumos => {
                    return Err(Error::usage(
                        "VMTEST_BHYVE_BOOTROM=none: illumos bhyve has no bhyveload, it boots only with UEFI \
                         firmware; unset the variable (the firmware is found) or name the firmware file",
                    ))
                }
                Some("none") => None,
                Some(p) => Some(p.to_owned()),
                // Not found: the first candidate, which pre-flight reports missing.
                None => Some(
                    fl.probe_bootrom(std::path::Path::new("/"))
                        .unwrap_or_else(|| fl.bootrom_candidates()[0].to_owned()),
                ),
            },
            disk_bytes: match var("VMTEST_BHYVE_DISK") {
                Some(d) => parse_size(&d).ok_or_else(|| {
                    Error::usage(format!("VMTEST_BHYVE_DISK=`{d}` is not a size; write e.g. 20G or 20480M"))
                })?,
                None => DEFAULT_DISK,
            },
            bay: var("VMTEST_BHYVE_BAY").unwrap_or_else(|| "/opt/cargo-bay".to_owned()),
            copy_program: var("VMTEST_BHYVE_COPY_PROGRAM").as_deref() != Some("0"),
            retry_pause: Duration::from_millis(ms("VMTEST_BHYVE_RETRY_MS", 1000)),
            retries: ms("VMTEST_BHYVE_RETRIES", 30) as u32,
            stop_grace: Duration::from_millis(ms("VMTEST_BHYVE_STOP_GRACE_MS", 10_000)),
        })
    }

    pub fn flavor(&self) -> Result<Flavor> {
        self.flavor.ok_or_else(|| {
            Error::preflight(
                "bhyve runs only on FreeBSD and illumos hosts; use --backend qemu here, or set \
                 VMTEST_BHYVE_FLAVOR=freebsd|illumos to drive a (fake) bhyve anyway",
            )
        })
    }

    /// `<pool>/vmtest/img/<image>`.
    pub fn image_dataset(&self, image: &str) -> String {
        format!("{}/vmtest/img/{image}", self.pool)
    }

    /// `<pool>/vmtest/run/<run>`.
    pub fn run_dataset(&self, run: &str) -> String {
        format!("{}/vmtest/run/{run}", self.pool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn illumos_firmware_is_found_where_omnios_helios_and_smartos_install_it() {
        for (installed, want) in [
            ("usr/share/bhyve/firmware/BHYVE_RELEASE.fd", "/usr/share/bhyve/firmware/BHYVE_RELEASE.fd"),
            ("usr/share/bhyve/uefi-rom.bin", "/usr/share/bhyve/uefi-rom.bin"),
        ] {
            let root = tempfile::tempdir().unwrap();
            let f = root.path().join(installed);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(&f, b"uefi").unwrap();
            assert_eq!(Flavor::Illumos.probe_bootrom(root.path()).as_deref(), Some(want));
            assert_eq!(Flavor::FreeBsd.probe_bootrom(root.path()), None);
        }
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(Flavor::Illumos.probe_bootrom(empty.path()), None);
    }

    #[test]
    fn disk_sizes_parse() {
        assert_eq!(parse_size("20G"), Some(20 << 30));
        assert_eq!(parse_size("512m"), Some(512 << 20));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("0G"), None);
        assert_eq!(parse_size("big"), None);
    }
}
