//! SIGINT, SIGTERM and SIGHUP become a cancellation that the run loop answers with teardown.

use tokio::signal::unix::{signal, Signal, SignalKind};

/// The termination signals, watched from the moment this is made (so one that arrives
/// during start-up is not lost to the default action, which would skip teardown).
pub struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl Signals {
    pub fn watch() -> std::io::Result<Signals> {
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Resolves with the name of the first signal that arrives.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
}

/// A cancellation that the first of these signals triggers, for the library's run loops.
pub fn cancellation() -> vmtest_core::Result<vmtest_core::cancel::Cancel> {
    let mut signals =
        Signals::watch().map_err(|e| vmtest_core::Error::infra(format!("cannot watch signals: {e}")))?;
    let (handle, cancel) = vmtest_core::cancel::cancellation();
    tokio::spawn(async move { handle.cancel(signals.recv().await) });
    Ok(cancel)
}
