//! Watching a guest kernel's log for bug reports while commands run: a background reader
//! of the VM's kernel console that keeps what arrived, and hands out the reports found in it.

use crate::console::Console;
use crate::error::{Error, ErrorKind};
use crate::kernel_report::{self, KernelReport};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The error of a run that fails on the kernel's bug reports (`--kernel-warnings fail`):
/// `during` says what ran (e.g. "the command").
pub fn failure(reports: &[KernelReport], during: &str) -> Error {
    let titles: Vec<&str> = reports.iter().map(|r| r.title.as_str()).collect();
    Error::new(
        ErrorKind::KernelReport,
        format!("the guest kernel reported {} bug(s) during {during}: {}", reports.len(), titles.join("; ")),
    )
    .with_hint("see the report(s) above (--kernel-warnings report shows them without failing)")
    .with_detail(reports.iter().map(|r| r.text.as_str()).collect::<Vec<_>>().join("\n"))
}

/// At most this much unread log is kept (a noisy guest cannot exhaust memory).
const MAX_BYTES: usize = 16 << 20;
/// How long the console must stay quiet before what a command caused is taken to be all
/// there (the kernel writes its console synchronously; this covers the host reading it).
const SETTLE: Duration = Duration::from_millis(30);
/// The longest a caller waits for the console to settle.
const SETTLE_MAX: Duration = Duration::from_millis(500);

#[derive(Default)]
struct Unread {
    text: Vec<u8>,
    last_arrival: Option<Instant>,
}

/// The kernel log of one VM, read in the background from when it was made.
pub struct KernelLog {
    unread: Arc<Mutex<Unread>>,
    reader: tokio::task::JoinHandle<()>,
}

impl KernelLog {
    /// Start reading `console` (from [`crate::Vm::kernel_log`]).
    pub fn watch(mut console: Box<dyn Console>) -> KernelLog {
        let unread = Arc::new(Mutex::new(Unread::default()));
        let sink = unread.clone();
        let reader = tokio::spawn(async move {
            while let Some(chunk) = console.read().await {
                let mut u = sink.lock().unwrap_or_else(|p| p.into_inner());
                let room = MAX_BYTES.saturating_sub(u.text.len());
                u.text.extend_from_slice(&chunk[..chunk.len().min(room)]);
                u.last_arrival = Some(Instant::now());
            }
        });
        KernelLog { unread, reader }
    }

    /// The reports in what arrived since the last call, once the console has been quiet
    /// for a moment (so a report printed as the command ended is whole).
    pub async fn take_reports(&self) -> Vec<KernelReport> {
        let waited = Instant::now();
        loop {
            let quiet = {
                let u = self.unread.lock().unwrap_or_else(|p| p.into_inner());
                !matches!(u.last_arrival, Some(t) if t.elapsed() < SETTLE)
            };
            if quiet || waited.elapsed() >= SETTLE_MAX || self.reader.is_finished() {
                break;
            }
            tokio::time::sleep(SETTLE / 3).await;
        }
        let text = std::mem::take(&mut self.unread.lock().unwrap_or_else(|p| p.into_inner()).text);
        kernel_report::find(&String::from_utf8_lossy(&text))
    }
}

impl Drop for KernelLog {
    fn drop(&mut self) {
        self.reader.abort();
    }
}
