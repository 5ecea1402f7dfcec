//! What a VM should be, independent of the hypervisor that runs it.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// Which CPU acceleration to use.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    /// Hardware acceleration when it is proven to work, software emulation otherwise.
    #[default]
    Auto,
    /// Hardware acceleration or fail.
    Kvm,
    /// Software emulation (QEMU TCG), always available and always slow.
    Tcg,
}

impl std::str::FromStr for AccelChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Kvm),
            "tcg" => Ok(AccelChoice::Tcg),
            other => Err(Error::usage(format!("unknown accelerator `{other}`; use one of auto, kvm, tcg"))),
        }
    }
}

/// How the guest boots.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum BootSpec {
    /// Direct kernel boot with the host's root shared read-only. `None` lets the backend find
    /// a kernel (`$VMTEST_KERNEL`, `/boot`, the cache).
    Kernel {
        kernel: Option<PathBuf>,
        /// The kernel's modules: an `INSTALL_MOD_PATH` of `make modules_install` or its
        /// `lib/modules/<release>`. `None` lets the backend look (`$VMTEST_MODULES`, beside
        /// the kernel, its build tree's `.vmtest-modules`, `/lib/modules/<release>`).
        #[serde(default)]
        modules: Option<PathBuf>,
    },
    /// A named image from the backend's image store.
    Image { name: String },
}

/// The shape of one VM.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct VmSpec {
    /// Unique name, `vmt-<run>-<node>`.
    pub name: String,
    /// The node's short name inside its test (also the guest hostname).
    pub node: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub boot: BootSpec,
    pub accel: AccelChoice,
    /// How long the guest may take to reach "agent ready".
    pub boot_timeout: Duration,
    /// Network interfaces on private networks (multi-VM tests); empty for none.
    #[serde(default)]
    pub nics: Vec<NicSpec>,
    /// `/etc/hosts` lines for the guest (the other nodes' names).
    #[serde(default)]
    pub hosts: Vec<crate::protocol::HostsEntry>,
    /// How commands reach an image-mode guest (kernel mode always uses the agent).
    #[serde(default)]
    pub exec: ExecVia,
    /// Start from the state [`crate::Vm::save`] wrote in this directory instead of booting.
    /// The guest keeps what it had then (hostname, addresses, files, running services); its
    /// clock, random pool and the run's SSH key are renewed. A state that is missing,
    /// corrupt or of another machine is an error, never used.
    #[serde(default)]
    pub resume: Option<std::path::PathBuf>,
}

/// How commands reach a guest booted from an image.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ExecVia {
    /// vmtest-agent over virtio-serial (started by the image's init).
    #[default]
    Agent,
    /// SSH to the guest's sshd through a loopback port forward, with a per-run key.
    Ssh,
    /// A shell on the serial console (`ShellSession`): no network needed.
    Serial,
}

impl std::str::FromStr for ExecVia {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "agent" => Ok(ExecVia::Agent),
            "ssh" => Ok(ExecVia::Ssh),
            "serial" => Ok(ExecVia::Serial),
            other => {
                Err(Error::usage(format!("unknown exec transport `{other}`; use one of agent, ssh, serial")))
            }
        }
    }
}

/// One NIC attached to a private network switch (see [`crate::network`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NicSpec {
    /// The network number: addresses are `192.168.<network>.<node>`.
    pub network: u8,
    pub mac: [u8; 6],
    pub address: [u8; 4],
    pub prefix: u8,
    /// The switch port's unix datagram socket (the switch binds it).
    pub switch_socket: PathBuf,
    /// The guest side's unix datagram socket (the hypervisor binds it; the switch sends there).
    pub guest_socket: PathBuf,
}

impl NicSpec {
    /// `52:54:00:12:34:56`.
    pub fn mac_string(&self) -> String {
        self.mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
    }
}

impl VmSpec {
    /// A single-VM spec with the defaults `vmtest run` uses.
    pub fn new(name: impl Into<String>, node: impl Into<String>) -> Self {
        VmSpec {
            name: name.into(),
            node: node.into(),
            cpus: 1,
            memory_mib: 512,
            boot: BootSpec::Kernel { kernel: None, modules: None },
            accel: AccelChoice::Auto,
            boot_timeout: Duration::from_secs(120),
            nics: Vec::new(),
            hosts: Vec::new(),
            exec: ExecVia::Agent,
            resume: None,
        }
    }
}

/// Parse a memory size as QEMU's `-m` does: a bare number is MiB; suffixes K, M, G, T (with an
/// optional `i`/`iB`/`B`) are binary units. Returns MiB.
pub fn parse_memory_mib(s: &str) -> Result<u64> {
    let bad = || {
        Error::usage(format!("bad memory size `{s}`; write a number of MiB or use a suffix, e.g. 512M or 2G"))
    };
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let unit = unit.trim().to_ascii_uppercase();
    let unit = unit.trim_end_matches('B').trim_end_matches('I');
    let mib = match unit {
        "" | "M" => Some(n),
        "K" => Some(n / 1024),
        "G" => n.checked_mul(1024),
        "T" => n.checked_mul(1024 * 1024),
        _ => None,
    }
    .ok_or_else(bad)?;
    if mib < 64 {
        return Err(Error::usage(format!(
            "memory size `{s}` is below the 64 MiB a Linux guest needs; use at least 64M"
        )));
    }
    Ok(mib)
}

/// Parse a duration: `90`, `90s`, `500ms`, `5m`, `1h`, `1m30s`, `7d`.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let bad = || {
        Error::usage(format!(
            "bad duration `{s}`; write e.g. 30s, 500ms, 5m, 1h, 7d or 1m30s (a bare number is seconds)"
        ))
    };
    let t = s.trim();
    if t.is_empty() {
        return Err(bad());
    }
    if let Ok(secs) = t.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let part = match &rest[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            "d" => Duration::from_secs(n * 86_400),
            _ => return Err(bad()),
        };
        total += part;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

/// Format a duration for humans: `850ms`, `2.41s`, `3m05s`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.2}s", d.as_secs_f64())
    } else {
        format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes_follow_qemu() {
        assert_eq!(parse_memory_mib("512").unwrap(), 512);
        assert_eq!(parse_memory_mib("512M").unwrap(), 512);
        assert_eq!(parse_memory_mib("2G").unwrap(), 2048);
        assert_eq!(parse_memory_mib("2GiB").unwrap(), 2048);
        assert_eq!(parse_memory_mib("1048576k").unwrap(), 1024);
        assert!(parse_memory_mib("lots").is_err());
        assert!(parse_memory_mib("2X").is_err());
        let small = parse_memory_mib("16M").unwrap_err();
        assert!(small.message().contains("64 MiB"), "{small}");
    }

    #[test]
    fn durations_parse_and_reject() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        for bad in ["", "s", "5x", "1.5s", "-3s", "m5"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.message().contains("bad duration"), "{bad}: {e}");
        }
    }

    #[test]
    fn durations_format_for_humans() {
        assert_eq!(format_duration(Duration::from_millis(850)), "850ms");
        assert_eq!(format_duration(Duration::from_millis(2410)), "2.41s");
        assert_eq!(format_duration(Duration::from_secs(185)), "3m05s");
    }

    #[test]
    fn accel_parses() {
        assert_eq!("tcg".parse::<AccelChoice>().unwrap(), AccelChoice::Tcg);
        assert!("hvf".parse::<AccelChoice>().unwrap_err().message().contains("auto, kvm, tcg"));
    }
}
