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
