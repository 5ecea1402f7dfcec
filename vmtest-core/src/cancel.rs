//! Cancelling a run from outside (a signal, a UI): the run loop answers with teardown.

use crate::runner::CancelReason;
use tokio::sync::watch;

/// Resolves [`Cancel::cancelled`] for every clone of its [`Cancel`].
pub struct CancelHandle(watch::Sender<Option<CancelReason>>);

/// What a run watches; cheap to clone, one per concurrent run.
#[derive(Clone)]
pub struct Cancel(watch::Receiver<Option<CancelReason>>);

/// A handle and the [`Cancel`] it resolves.
pub fn cancellation() -> (CancelHandle, Cancel) {
    let (tx, rx) = watch::channel(None);
    (CancelHandle(tx), Cancel(rx))
}

impl CancelHandle {
    /// Cancel every run watching this, for `reason` (e.g. "SIGINT"). The first reason stays.
    pub fn cancel(&self, reason: CancelReason) {
        self.0.send_if_modified(|r| r.is_none() && r.replace(reason).is_none());
    }
}

impl Cancel {
    /// A cancellation that never comes.
    pub fn never() -> Cancel {
        // With its handle gone, `cancelled` waits forever.
        cancellation().1
    }

    /// The reason, once cancelled; pending until then.
    pub async fn cancelled(&self) -> CancelReason {
        let mut rx = self.0.clone();
        loop {
            if let Some(reason) = *rx.borrow_and_update() {
                return reason;
            }
            if rx.changed().await.is_err() {
                // No handle left: nothing can cancel any more.
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_clone_sees_the_first_reason() {
        let (handle, cancel) = cancellation();
        let other = cancel.clone();
        let waiter = tokio::spawn(async move { other.cancelled().await });
        handle.cancel("SIGTERM");
        handle.cancel("SIGINT");
        assert_eq!(waiter.await.unwrap(), "SIGTERM");
        assert_eq!(cancel.cancelled().await, "SIGTERM");
    }

    #[tokio::test]
    async fn without_a_handle_it_never_resolves() {
        let (handle, cancel) = cancellation();
        drop(handle);
        let r = tokio::time::timeout(std::time::Duration::from_millis(20), cancel.cancelled()).await;
        assert!(r.is_err());
    }
}
