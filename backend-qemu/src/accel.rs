//! Choosing between KVM and TCG.
//!
//! `/dev/kvm` existing proves nothing: on some hosts it opens and creates VMs, and guests
//! then hang. So KVM is trusted only after a probe boot: a 150-byte PVH kernel that writes
//! to QEMU's `isa-debug-exit` port must make QEMU exit with the expected status within
//! seconds. The verdict is cached per host boot and QEMU binary.

use crate::cache::{digest, file_identity, Cache};
use std::path::Path;
use std::time::Duration;
use vmtest_core::spec::AccelChoice;
use vmtest_core::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The byte the probe writes; QEMU then exits with `(PROBE_BYTE << 1) | 1`.
const PROBE_BYTE: u8 = 0x2a;
pub const PROBE_EXIT: i32 = ((PROBE_BYTE as i32) << 1) | 1;
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// A minimal 32-bit ELF with a PVH entry note whose code is `out 0xf4, 0x2a; hlt`.
pub fn probe_kernel() -> Vec<u8> {
    const BASE: u32 = 0x10_0000;
    const EHDR: usize = 52;
    const PHDR: usize = 32;
    let note_off = EHDR + 2 * PHDR;
    let code_off = note_off + 20;
    let code: [u8; 7] = [0xb0, PROBE_BYTE, 0xe6, 0xf4, 0xfa, 0xf4, 0xeb]; // mov al; out; cli; hlt; jmp
    let total = code_off + code.len() + 1;
    let entry = BASE + code_off as u32;
    let mut f = Vec::with_capacity(total);
    let u16le = |f: &mut Vec<u8>, v: u16| f.extend_from_slice(&v.to_le_bytes());
    let u32le = |f: &mut Vec<u8>, v: u32| f.extend_from_slice(&v.to_le_bytes());
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 1, 1, 1, 0]);
    f.extend_from_slice(&[0; 8]);
    u16le(&mut f, 2); // ET_EXEC
    u16le(&mut f, 3); // EM_386
    u32le(&mut f, 1);
    u32le(&mut f, entry);
    u32le(&mut f, EHDR as u32); // e_phoff
    u32le(&mut f, 0); // e_shoff
    u32le(&mut f, 0); // e_flags
    u16le(&mut f, EHDR as u16);
    u16le(&mut f, PHDR as u16);
    u16le(&mut f, 2); // e_phnum
    u16le(&mut f, 40);
    u16le(&mut f, 0);
    u16le(&mut f, 0);
    // PT_LOAD: the whole file at BASE.
    for v in [1, 0, BASE, BASE, total as u32, total as u32, 5, 0x1000] {
        u32le(&mut f, v);
    }
    // PT_NOTE: the PVH entry.
    for v in [4, note_off as u32, BASE + note_off as u32, BASE + note_off as u32, 20, 20, 4, 4] {
        u32le(&mut f, v);
    }
    for v in [4, 4, 18] {
        u32le(&mut f, v); // namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY
    }
    f.extend_from_slice(b"Xen\0");
    u32le(&mut f, entry);
    f.extend_from_slice(&code);
    f.push(0xfd); // jmp -3 (back to hlt)
    f
}

/// Why KVM cannot be used here, or `None` when `/dev/kvm` opens and creates a VM.
pub fn kvm_device_problem() -> Option<String> {
    use std::os::fd::AsRawFd;
    let dev = match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(f) => f,
        Err(e) => return Some(format!("cannot open /dev/kvm: {e}")),
    };
    const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
    const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
    // SAFETY: ioctls on an fd we own, with integer arguments.
    unsafe {
        let v = libc::ioctl(dev.as_raw_fd(), KVM_GET_API_VERSION, 0);
        if v != 12 {
            return Some(format!("/dev/kvm reports API version {v}, not 12"));
        }
        let vm = libc::ioctl(dev.as_raw_fd(), KVM_CREATE_VM, 0);
        if vm < 0 {
            return Some(format!("/dev/kvm cannot create a VM: {}", std::io::Error::last_os_error()));
        }
        libc::close(vm);
    }
    None
}

/// Boot the probe kernel under `accel`. `Ok(())` when it ran to its `out` instruction.
pub async fn probe_boot(qemu: &Path, accel: Accel, cache: &Cache) -> std::result::Result<(), String> {
    let dir = cache.dir("probe").map_err(|e| e.to_string())?;
    let kernel = dir.join("probe.elf");
    if !kernel.is_file() {
        Cache::write_atomic(&kernel, &probe_kernel()).map_err(|e| e.to_string())?;
    }
    let mut cmd = tokio::process::Command::new(qemu);
    cmd.args(["-M", "microvm", "-accel", accel.name(), "-m", "16", "-nodefaults", "-no-user-config"])
        .args(["-display", "none", "-serial", "none", "-no-reboot"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-kernel"])
        .arg(&kernel)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    if accel == Accel::Kvm {
        cmd.args(["-cpu", "host"]);
    }
    let child = cmd.spawn().map_err(|e| format!("cannot run {}: {e}", qemu.display()))?;
    match tokio::time::timeout(PROBE_TIMEOUT, child.wait_with_output()).await {
        Err(_) => Err(format!("a probe guest did not finish within {PROBE_TIMEOUT:?} (the guest hangs)")),
        Ok(Err(e)) => Err(format!("probe: {e}")),
        Ok(Ok(out)) if out.status.code() == Some(PROBE_EXIT) => Ok(()),
        Ok(Ok(out)) => Err(format!(
            "probe guest ended with {} ({})",
            out.status,
            String::from_utf8_lossy(&out.stderr).lines().next().unwrap_or("no message")
        )),
    }
}

/// The verdict on KVM, probed once per host boot and QEMU binary (a device that cannot even
/// create a VM is part of the verdict, so a cached answer costs one file read).
pub async fn kvm_verdict(qemu: &Path, cache: &Cache) -> std::result::Result<(), String> {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let qemu_id = file_identity(qemu).unwrap_or_default();
    let key = digest([boot_id.trim().as_bytes(), qemu_id.as_bytes()]);
    let verdict_path = cache.dir("probe").map_err(|e| e.to_string())?.join(format!("kvm-{key}"));
    if let Ok(saved) = std::fs::read_to_string(&verdict_path) {
        return if saved == "ok" { Ok(()) } else { Err(saved) };
    }
    let verdict = match kvm_device_problem() {
        Some(problem) => Err(problem),
        None => {
            probe_boot(qemu, Accel::Kvm, cache).await.map_err(|e| format!("KVM is present but unusable: {e}"))
        }
    };
    let saved = match &verdict {
        Ok(()) => "ok".to_owned(),
        Err(e) => e.clone(),
    };
    let _ = Cache::write_atomic(&verdict_path, saved.as_bytes());
    verdict.map_err(|_| saved)
}

/// Pick the accelerator for `choice`. The second value is a one-line note when falling back.
pub async fn choose(choice: AccelChoice, qemu: &Path, cache: &Cache) -> Result<(Accel, Option<String>)> {
    match choice {
        AccelChoice::Tcg => Ok((Accel::Tcg, None)),
        AccelChoice::Kvm => match kvm_verdict(qemu, cache).await {
            Ok(()) => Ok((Accel::Kvm, None)),
            Err(why) => Err(Error::preflight(format!("--accel kvm: {why}; use --accel tcg or --accel auto"))),
        },
        AccelChoice::Auto => match kvm_verdict(qemu, cache).await {
            Ok(()) => Ok((Accel::Kvm, None)),
            Err(why) => Ok((Accel::Tcg, Some(format!("using TCG (software emulation, slower): {why}")))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_kernel_is_a_pvh_elf() {
        let k = probe_kernel();
        assert!(k.starts_with(b"\x7fELF"));
        assert!(k.windows(4).any(|w| w == b"Xen\0"));
        assert!(k.len() < 200);
    }
}
