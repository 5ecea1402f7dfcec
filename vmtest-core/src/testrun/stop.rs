//! Stopping a test file: a signal or the file's `timeout` ends whatever runs for it, in every
//! cluster at once (the `from` subtests run in parallel), and each part reports where it was.

use crate::error::Error;
use crate::runner::CancelReason;
use crate::testfile::TestFile;
use std::future::Future;
use tokio::sync::watch;

/// Why the file stops early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum StopReason {
    Signal(CancelReason),
    Deadline,
}

impl StopReason {
    pub(super) fn error(self, file: &TestFile) -> Error {
        match self {
            StopReason::Signal(s) => Error::interrupted(s),
            StopReason::Deadline => Error::timeout(
                &format!("test `{}`", file.name),
                file.timeout,
                "raise `timeout` in [test], or find the step that hangs",
            ),
        }
    }
}

/// Tells every part of a file's run that it must stop.
#[derive(Clone)]
pub(super) struct Stop {
    rx: watch::Receiver<Option<StopReason>>,
}

impl Stop {
    /// `fut`'s output, or why the file stops, whichever comes first (`fut` is then dropped,
    /// which stops what it was doing).
    pub(super) async fn guard<T>(&self, fut: impl Future<Output = T>) -> Result<T, StopReason> {
        let mut rx = self.rx.clone();
        let stopped = async move {
            match rx.wait_for(Option::is_some).await {
                Ok(why) => why.expect("waited for a reason"),
                // The sender lives as long as the run: never stop for its absence.
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            out = fut => Ok(out),
            why = stopped => Err(why),
        }
    }
}

/// Run `body` with a [`Stop`] that fires when `cancel` resolves or `deadline` passes. The body
/// keeps running after that (to tear down and report); it sees the stop through its guards.
pub(super) async fn until_stopped<C, Fut>(
    cancel: C,
    deadline: tokio::time::Instant,
    body: impl FnOnce(Stop) -> Fut,
) -> Fut::Output
where
    C: Future<Output = CancelReason>,
    Fut: Future,
{
    let (tx, rx) = watch::channel(None);
    let watcher = async move {
        let why = tokio::select! {
            s = cancel => StopReason::Signal(s),
            _ = tokio::time::sleep_until(deadline) => StopReason::Deadline,
        };
        let _ = tx.send(Some(why));
        // Keep the sender: the guards wait on it.
        std::future::pending::<std::convert::Infallible>().await
    };
    let body = body(Stop { rx });
    tokio::pin!(body, watcher);
    tokio::select! {
        out = &mut body => out,
        never = &mut watcher => match never {},
    }
}
