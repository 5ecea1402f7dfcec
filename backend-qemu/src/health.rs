//! Watching a running QEMU under KVM for trouble the guest cannot report: an accelerator
//! failure (QEMU prints "KVM internal error" and pauses the guest, which would otherwise
//! wait out the boot timeout) or a panicked guest. Both are seen on QEMU's stderr or in its
//! QMP run state; the watcher then ends QEMU, so every wait on the guest ends within a
//! fraction of a second, and says why.

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

/// Watch QEMU `pid` through its stderr (as collected so far in `stderr`) and, when given,
/// its QMP socket, until it exits. On trouble, QEMU is killed and the trouble published.
pub fn watch(
    pid: u32,
    stderr: Arc<Mutex<Vec<u8>>>,
    qmp_socket: Option<PathBuf>,
    mut exited: watch::Receiver<Option<std::process::ExitStatus>>,
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
                                trouble = run_state_trouble(status["status"].as_str().unwrap_or(""))
                            }
                            Err(_) => qmp = None,
                        }
                    }
                }
            }
            if let Some(t) = trouble {
                tracing::debug!("QEMU {pid}: {t:?}; ending it");
                // SAFETY: signalling the QEMU this VM started, by pid.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                let _ = tx.send(Some(t));
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
