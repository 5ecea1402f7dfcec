//! Watching a running QEMU under KVM for trouble the guest cannot report: an accelerator
//! failure (QEMU prints "KVM internal error" and pauses the guest, which would otherwise
//! wait out the boot timeout) or a panicked guest. Both are seen on QEMU's stderr or in its
//! QMP run state; the watcher then ends QEMU, so every wait on the guest ends within a
//! fraction of a second, and says why. A guest to be dumped on a panic (see [`crate::dump`])
//! is watched under any accelerator: its panic leaves QEMU paused, to be dumped here first.

use crate::qmp::Qmp;
use serde_json::json;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// What went wrong, as seen from outside the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trouble {
    /// The accelerator failed; the text is QEMU's line or run state.
    Accelerator(String),
    /// QEMU reports the guest panicked.
    GuestPanicked,
}

/// How often the watcher looks.
const PERIOD: Duration = Duration::from_millis(100);

/// How long a stopped guest's console may lag behind its last words.
const CONSOLE_LAG: Duration = Duration::from_secs(2);

/// A guest whose panic is dumped: into `path`, its `memory_bytes` of memory. Its panic shows
/// in `console_log`; the line saying where the dump went (or why there is none) goes into
/// `note`.
pub struct DumpWatch {
    pub path: PathBuf,
    pub memory_bytes: u64,
    pub console_log: PathBuf,
    pub note: Arc<Mutex<Option<String>>>,
}

/// Watch QEMU `pid` through its stderr (as collected so far in `stderr`) and, when given,
/// its QMP socket, until it exits. On trouble, QEMU is killed and the trouble published;
/// a panic of a guest in `dump` is dumped first.
pub fn watch(
    pid: u32,
    stderr: Arc<Mutex<Vec<u8>>>,
    qmp_socket: Option<PathBuf>,
    mut exited: watch::Receiver<Option<std::process::ExitStatus>>,
    dump: Option<DumpWatch>,
) -> watch::Receiver<Option<Trouble>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let mut qmp: Option<Qmp> = None;
        loop {
            if exited.borrow().is_some() {
                // QEMU may have printed its last words as it died.
                if let Some(t) = stderr_trouble(&stderr) {
                    let _ = tx.send(Some(t));
                }
                return;
            }
            let mut trouble = stderr_trouble(&stderr);
            if trouble.is_none() {
                if let Some(path) = &qmp_socket {
                    if qmp.is_none() {
                        qmp = Qmp::connect(path).await.ok();
                    }
                    if let Some(q) = qmp.as_mut() {
                        match q.execute("query-status", json!({})).await {
                            Ok(status) => {
                                let state = status["status"].as_str().unwrap_or("");
                                trouble = match &dump {
                                    Some(d) => dumped_trouble(q, d, state).await,
                                    None => None,
                                }
                                .or_else(|| run_state_trouble(state));
                            }
                            Err(_) => qmp = None,
                        }
                    }
                }
            }
            if let Some(t) = trouble {
                tracing::debug!("QEMU {pid}: {t:?}; ending it");
                // Published first, so whoever sees QEMU gone finds the reason.
                let _ = tx.send(Some(t));
                // SAFETY: signalling the QEMU this VM started, by pid.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                return;
            }
            let _ = tokio::time::timeout(PERIOD, exited.changed()).await;
        }
    });
    rx
}

fn stderr_trouble(stderr: &Mutex<Vec<u8>>) -> Option<Trouble> {
    let said = String::from_utf8_lossy(&stderr.lock().unwrap()).into_owned();
    crate::accel::failure_line(&said).map(|l| Trouble::Accelerator(l.to_owned()))
}

/// For a guest to be dumped, in run `state`: a panic (QEMU's own report, or the stop that a
/// panic's reboot becomes under `-no-shutdown`) is dumped and is trouble. Any other stop is
/// a guest that powered off: QEMU is told to quit, as it would have without `-no-shutdown`.
async fn dumped_trouble(qmp: &mut Qmp, d: &DumpWatch, state: &str) -> Option<Trouble> {
    let panicked = match state {
        "guest-panicked" => true,
        "shutdown" => console_shows_panic(&d.console_log).await,
        _ => return None,
    };
    if !panicked {
        let _ = qmp.execute("quit", json!({})).await;
        return None;
    }
    let note = crate::dump::take(qmp, &d.path, d.memory_bytes).await;
    tracing::debug!("{note}");
    *d.note.lock().unwrap() = Some(note);
    Some(Trouble::GuestPanicked)
}

/// Whether the console of a stopped guest ends in a kernel panic rather than a power-off,
/// waiting out the console's lag for either.
async fn console_shows_panic(log: &std::path::Path) -> bool {
    let deadline = tokio::time::Instant::now() + CONSOLE_LAG;
    loop {
        let text = std::fs::read(log).unwrap_or_default();
        let tail = String::from_utf8_lossy(&text[text.len().saturating_sub(64 << 10)..]).into_owned();
        match last_words(&tail) {
            Some(panicked) => return panicked,
            None if tokio::time::Instant::now() >= deadline => return false,
            None => tokio::time::sleep(PERIOD).await,
        }
    }
}

/// From a stopped guest's console: `Some(true)` for a kernel panic, `Some(false)` for a
/// power-off or reboot the kernel announced, `None` when it says neither (yet).
fn last_words(console: &str) -> Option<bool> {
    if console.contains("Kernel panic - not syncing") {
        Some(true)
    } else if console.contains("reboot: ") {
        Some(false)
    } else {
        None
    }
}

/// QMP `query-status` run states that mean the guest will not go on by itself.
fn run_state_trouble(status: &str) -> Option<Trouble> {
    match status {
        "internal-error" => Some(Trouble::Accelerator("QEMU's run state is internal-error".into())),
        "guest-panicked" => Some(Trouble::GuestPanicked),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_states_that_stop_a_guest_for_good_are_trouble() {
        assert!(matches!(run_state_trouble("internal-error"), Some(Trouble::Accelerator(_))));
        assert_eq!(run_state_trouble("guest-panicked"), Some(Trouble::GuestPanicked));
        for fine in ["running", "paused", "inmigrate", "postmigrate", "finish-migrate", "prelaunch"] {
            assert_eq!(run_state_trouble(fine), None, "{fine}");
        }
    }

    #[test]
    fn a_stopped_guests_console_tells_a_panic_from_a_power_off() {
        let panic = "sysrq: Trigger a crash\nKernel panic - not syncing: sysrq triggered crash\n";
        assert_eq!(last_words(panic), Some(true));
        assert_eq!(last_words("[    2.1] reboot: Power down\n"), Some(false));
        assert_eq!(last_words("[    2.1] reboot: Restarting system\n"), Some(false));
        assert_eq!(last_words("vmtest-agent ready\n"), None);
    }

    #[test]
    fn kvm_failures_on_stderr_are_recognized() {
        let said = "qemu-system-x86_64: warning: host doesn't support requested feature\n\
                    KVM internal error. Suberror: 1\nemulation failure\nRAX=0000";
        assert_eq!(crate::accel::failure_line(said), Some("KVM internal error. Suberror: 1"));
        let msr = "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69\n";
        assert_eq!(
            crate::accel::failure_line(msr),
            Some("qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69")
        );
        assert_eq!(crate::accel::failure_line("qemu-system-x86_64: -serial: bad option\n"), None);
    }
}
