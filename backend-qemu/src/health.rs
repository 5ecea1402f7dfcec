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

/// A guest whose panic is dumped: into `path`, its `memory_bytes` of memory. Its panic shows
/// in `console_log` (read from `scanned` on); the line saying where the dump went (or why
/// there is none) goes into `note`.
pub struct DumpWatch {
    pub path: PathBuf,
    pub memory_bytes: u64,
    pub console_log: PathBuf,
    pub note: Arc<Mutex<Option<String>>>,
    pub scanned: u64,
}

/// Watch QEMU `pid` through its stderr (as collected so far in `stderr`) and, when given,
/// its QMP socket, until it exits. On trouble, QEMU is killed and the trouble published;
/// a panic of a guest in `dump` is dumped first.
pub fn watch(
    pid: u32,
    stderr: Arc<Mutex<Vec<u8>>>,
    qmp_socket: Option<PathBuf>,
    mut exited: watch::Receiver<Option<std::process::ExitStatus>>,
    mut dump: Option<DumpWatch>,
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
                                trouble = match &mut dump {
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

/// For a guest to be dumped, in run `state`: a panic (QEMU's own report, or the end of one
/// on the console of a guest that `panic=0` keeps spinning) stops the guest, is dumped and
/// is trouble.
async fn dumped_trouble(qmp: &mut Qmp, d: &mut DumpWatch, state: &str) -> Option<Trouble> {
    let panicked = match state {
        "guest-panicked" => true,
        "running" => panic_ended(&d.console_log, &mut d.scanned),
        _ => false,
    };
    if !panicked {
        return None;
    }
    let _ = qmp.execute("stop", json!({})).await;
    let note = crate::dump::take(qmp, &d.path, d.memory_bytes).await;
    tracing::debug!("{note}");
    *d.note.lock().unwrap() = Some(note);
    Some(Trouble::GuestPanicked)
}

/// The last line of a kernel panic on the console.
const PANIC_END: &[u8] = b"---[ end Kernel panic";

/// Whether the console `log` shows the end of a kernel panic, reading what came since
/// `scanned` (which moves on, keeping an overlap so a line split between reads is seen).
fn panic_ended(log: &std::path::Path, scanned: &mut u64) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(log) else { return false };
    let mut new = Vec::new();
    if f.seek(SeekFrom::Start(*scanned)).is_err() || f.read_to_end(&mut new).is_err() {
        return false;
    }
    let found = new.windows(PANIC_END.len()).any(|w| w == PANIC_END);
    *scanned += new.len().saturating_sub(PANIC_END.len()) as u64;
    found
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
    fn the_end_of_a_panic_is_found_once_written_even_across_reads() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let mut scanned = 0;
        assert!(!panic_ended(&log, &mut scanned), "no console yet");
        std::fs::write(&log, "Kernel panic - not syncing: sysrq triggered crash\n---[ end Kernel").unwrap();
        assert!(!panic_ended(&log, &mut scanned));
        let mut text = std::fs::read(&log).unwrap();
        text.extend_from_slice(b" panic - not syncing: sysrq triggered crash ]---\n");
        std::fs::write(&log, text).unwrap();
        assert!(panic_ended(&log, &mut scanned));
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
