//! Choosing between KVM and TCG.
//!
//! `/dev/kvm` existing proves nothing: on some hosts it opens and creates VMs, runs a tiny
//! guest, and then hangs a real kernel or kills it with "KVM internal error". So KVM is
//! trusted only after the run's own kernel booted under it, on the run's machine type, to
//! its init and powered off within [`PROBE_DEADLINE`], with QEMU saying nothing of a KVM
//! failure. The verdict and its evidence are cached per host boot, QEMU binary and kernel;
//! a run that finds KVM failing after all corrects it (see [`record_failure`]).

use crate::cache::{digest, file_identity, Cache};
use crate::command::{QemuCommand, Root};
use crate::kernel::BootImage;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
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

/// How long a kernel may take to boot to its init and power off under KVM. A working KVM
/// does it in well under a second; a broken one hangs, so this bounds the cost of finding out.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(5);

/// The verdict on KVM for one host boot, QEMU binary and kernel.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Verdict {
    pub usable: bool,
    /// What was seen: the boot time, or what failed and how.
    pub evidence: String,
    /// When it was decided (Unix seconds).
    pub decided_unix: u64,
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
        let v = libc::ioctl(dev.as_raw_fd(), KVM_GET_API_VERSION as _, 0);
        if v != 12 {
            return Some(format!("/dev/kvm reports API version {v}, not 12"));
        }
        let vm = libc::ioctl(dev.as_raw_fd(), KVM_CREATE_VM as _, 0);
        if vm < 0 {
            return Some(format!("/dev/kvm cannot create a VM: {}", std::io::Error::last_os_error()));
        }
        libc::close(vm);
    }
    None
}

/// The line of QEMU's stderr that says the accelerator failed, if any.
pub fn failure_line(qemu_stderr: &str) -> Option<&str> {
    const SIGNS: &[&str] = &["KVM internal error", "emulation failure", "failed to set MSR", "kvm_", "kvm.c"];
    qemu_stderr.lines().map(str::trim).find(|l| SIGNS.iter().any(|s| l.contains(s)))
}

/// Boot `boot` under `accel` with an init that powers off at once, and report how it went.
/// `Ok(took)` when QEMU exited cleanly within [`PROBE_DEADLINE`].
pub async fn probe_boot(
    qemu: &Path,
    boot: &BootImage,
    accel: Accel,
    cache: &Cache,
) -> std::result::Result<Duration, String> {
    let initramfs =
        crate::initramfs::build_poweroff(cache, crate::initramfs::AGENT).map_err(|e| e.to_string())?;
    let dir = tempfile::Builder::new()
        .prefix("vmtest-probe-")
        .tempdir()
        .map_err(|e| format!("cannot make a temporary dir for the probe: {e}"))?;
    let cmd = QemuCommand {
        qemu: qemu.to_owned(),
        accel,
        kernel: boot.clone(),
        initramfs,
        cpus: 1,
        memory_mib: 256,
        root: Root::None,
        agent_socket: dir.path().join("agent.sock"),
        console_socket: dir.path().join("console.sock"),
        kernel_args: vec![vmtest_core::protocol::POWEROFF_MARKER.into()],
        nics: Vec::new(),
        ssh: None,
        gdb: None,
        dump: None,
    };
    let mut child = KillOnDrop(
        std::process::Command::new(qemu)
            .args(cmd.args())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", qemu.display()))?,
    );
    let stderr = spawn_reader(child.0.stderr.take());
    let console = ConsoleCounter::attach(cmd.console_socket.clone());
    let started = Instant::now();
    let outcome = loop {
        let said = String::from_utf8_lossy(&stderr.lock().unwrap()).into_owned();
        if let Some(line) = failure_line(&said) {
            break Err(format!("QEMU said: {line}"));
        }
        match child.0.try_wait() {
            Ok(Some(status)) if status.success() => break Ok(started.elapsed()),
            Ok(Some(status)) => {
                std::thread::sleep(Duration::from_millis(20));
                let said = String::from_utf8_lossy(&stderr.lock().unwrap()).into_owned();
                let line = failure_line(&said).or_else(|| said.lines().next()).unwrap_or("no message");
                break Err(format!("QEMU ended with {status}: {}", line.trim()));
            }
            Ok(None) => {}
            Err(e) => break Err(format!("cannot wait for QEMU: {e}")),
        }
        if started.elapsed() > PROBE_DEADLINE {
            let printed = console.bytes();
            break Err(if printed == 0 {
                format!(
                    "the kernel printed nothing and did not reach its init within {}s (the guest hangs)",
                    PROBE_DEADLINE.as_secs()
                )
            } else {
                format!(
                    "the kernel printed {printed} bytes but did not reach its init and power off within {}s",
                    PROBE_DEADLINE.as_secs()
                )
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    outcome
}

/// The probe's QEMU, ended however the probe ends (also when the run is interrupted).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The kernel as named in evidence: its release (the extracted image's file name is the
/// release plus a cache key).
fn kernel_name(boot: &BootImage) -> String {
    let name = boot.path.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let release = match name.rsplit_once('-') {
        Some((release, key)) if key.len() == 24 && key.bytes().all(|b| b.is_ascii_hexdigit()) => release,
        _ => &name,
    };
    format!("kernel {release}")
}

fn spawn_reader(pipe: Option<std::process::ChildStderr>) -> std::sync::Arc<std::sync::Mutex<Vec<u8>>> {
    let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    if let Some(mut pipe) = pipe {
        let sink = buf.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
    }
    buf
}

/// Counts what the guest prints on its serial console (evidence for a hang).
struct ConsoleCounter(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl ConsoleCounter {
    fn attach(socket: PathBuf) -> Self {
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = count.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + PROBE_DEADLINE;
            let mut stream = loop {
                match std::os::unix::net::UnixStream::connect(&socket) {
                    Ok(s) => break s,
                    Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                    Err(_) => return,
                }
            };
            let mut chunk = [0u8; 4096];
            while let Ok(n) = stream.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                seen.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            }
        });
        ConsoleCounter(count)
    }

    fn bytes(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Where the verdict for this host boot, QEMU and kernel is kept.
fn verdict_path(qemu: &Path, boot: &BootImage, cache: &Cache) -> Result<PathBuf> {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let qemu_id = file_identity(qemu).unwrap_or_default();
    let kernel_id = file_identity(&boot.path).unwrap_or_default();
    let key = digest([boot_id.trim().as_bytes(), qemu_id.as_bytes(), kernel_id.as_bytes()]);
    Ok(cache.dir("probe")?.join(format!("kvm-{key}.json")))
}

/// The cached verdict, if this host boot, QEMU and kernel have one.
pub fn cached_verdict(qemu: &Path, boot: &BootImage, cache: &Cache) -> Option<Verdict> {
    let path = verdict_path(qemu, boot, cache).ok()?;
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// The verdict on KVM for running `boot` with `qemu`: cached, or probed now (one probe at a
/// time per cache, so concurrent first runs wait for one answer).
pub async fn verdict(qemu: &Path, boot: &BootImage, cache: &Cache) -> Result<Verdict> {
    if let Some(v) = cached_verdict(qemu, boot, cache) {
        return Ok(v);
    }
    let lock = {
        let cache = cache.clone();
        tokio::task::spawn_blocking(move || cache.lock("probe/.kvm.lock"))
            .await
            .map_err(|e| Error::infra(format!("probe lock: {e}")))??
    };
    if let Some(v) = cached_verdict(qemu, boot, cache) {
        return Ok(v);
    }
    let started = Instant::now();
    let (usable, evidence) = match kvm_device_problem() {
        Some(problem) => (false, problem),
        None => match probe_boot(qemu, boot, Accel::Kvm, cache).await {
            Ok(took) => (
                true,
                format!("{} booted to its init under KVM in {:.2}s", kernel_name(boot), took.as_secs_f64()),
            ),
            Err(why) => (false, format!("{} under KVM: {why}", kernel_name(boot))),
        },
    };
    tracing::debug!("KVM verdict after {:?}: usable={usable}: {evidence}", started.elapsed());
    let v = save(qemu, boot, cache, usable, evidence)?;
    drop(lock);
    Ok(v)
}

fn save(qemu: &Path, boot: &BootImage, cache: &Cache, usable: bool, evidence: String) -> Result<Verdict> {
    let decided_unix =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let v = Verdict { usable, evidence, decided_unix };
    Cache::write_atomic(&verdict_path(qemu, boot, cache)?, &serde_json::to_vec(&v).expect("serializes"))?;
    Ok(v)
}

/// A run found KVM failing although the verdict said it works: correct the verdict, so the
/// next run goes straight to TCG.
pub fn record_failure(qemu: &Path, boot: &BootImage, cache: &Cache, evidence: &str) {
    let evidence = format!("{} failed under KVM in a run: {evidence}", kernel_name(boot));
    if let Err(e) = save(qemu, boot, cache, false, evidence) {
        tracing::debug!("cannot record the KVM failure: {e}");
    }
}

/// The error a KVM failure during a run becomes: the accelerator, not the guest, is at fault.
#[derive(Debug, thiserror::Error)]
#[error("KVM failed on this host: {0}")]
pub struct KvmFailed(pub String);

/// What failed, when `err` is a [`KvmFailed`].
pub fn kvm_failure(err: &Error) -> Option<&str> {
    std::error::Error::source(err).and_then(|s| s.downcast_ref::<KvmFailed>()).map(|k| k.0.as_str())
}

/// Whether `err` is a [`KvmFailed`].
pub fn is_kvm_failure(err: &Error) -> bool {
    kvm_failure(err).is_some()
}

/// `err` as the `--accel kvm` error: one line, exit 69.
pub fn forced_kvm_error(err: &Error) -> Error {
    Error::preflight(format!(
        "--accel kvm: {}; use --accel auto (falls back to TCG) or --accel tcg",
        err.message()
    ))
    .with_detail(err.detail().unwrap_or_default().to_owned())
}

/// Pick the accelerator for `choice` and `boot`. The second value is a one-line notice for
/// the user when falling back to TCG, given once per host boot and verdict (later runs log
/// it at info level, shown with -v).
pub async fn choose(
    choice: AccelChoice,
    qemu: &Path,
    boot: &BootImage,
    cache: &Cache,
) -> Result<(Accel, Option<String>)> {
    match choice {
        AccelChoice::Tcg => Ok((Accel::Tcg, None)),
        AccelChoice::Kvm => {
            let v = verdict(qemu, boot, cache).await?;
            if v.usable {
                Ok((Accel::Kvm, None))
            } else {
                Err(Error::preflight(format!(
                    "--accel kvm: KVM does not work on this host: {}; use --accel auto (falls back to TCG) or --accel tcg",
                    v.evidence
                )))
            }
        }
        AccelChoice::Auto => {
            let v = verdict(qemu, boot, cache).await?;
            if v.usable {
                return Ok((Accel::Kvm, None));
            }
            let notice = format!("using TCG (software emulation, slower): no usable KVM: {}", v.evidence);
            Ok((Accel::Tcg, first_notice(qemu, boot, cache, &v).then_some(notice)))
        }
    }
}

/// True the first time this verdict is shown on this host (a marker beside the verdict).
fn first_notice(qemu: &Path, boot: &BootImage, cache: &Cache, v: &Verdict) -> bool {
    let Ok(path) = verdict_path(qemu, boot, cache) else { return true };
    let marker = path.with_extension(format!("noticed-{}", v.decided_unix));
    std::fs::OpenOptions::new().write(true).create_new(true).open(marker).is_ok()
}
