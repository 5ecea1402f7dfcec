//! Retrying launches: only transient errors, with backoff, cleaning up between attempts.

use crate::error::Result;
use std::future::Future;
use std::time::Duration;

/// How often and how patiently to retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts, at least 1.
    pub attempts: u32,
    /// Wait before the second attempt; doubles after each failure.
    pub backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { attempts: 3, backoff: Duration::from_secs(1) }
    }
}

impl RetryPolicy {
    /// Run `attempt` until it succeeds, fails permanently, or attempts run out. `cleanup`
    /// runs after every failed attempt, before the next one, to remove what it left.
    pub async fn run<T, F, Fut, C, CFut>(&self, mut attempt: F, mut cleanup: C) -> Result<T>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T>>,
        C: FnMut() -> CFut,
        CFut: Future<Output = ()>,
    {
        let mut wait = self.backoff;
        let attempts = self.attempts.max(1);
        for n in 1..=attempts {
            match attempt(n).await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    cleanup().await;
                    if !e.is_transient() || n == attempts {
                        return Err(e);
                    }
                    tracing::warn!("attempt {n}/{attempts} failed: {e}; retrying in {wait:?}");
                    tokio::time::sleep(wait).await;
                    wait = wait.saturating_mul(2);
                }
            }
        }
        unreachable!("the loop returns on its last attempt")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;
    use std::cell::Cell;

    #[tokio::test]
    async fn transient_errors_are_retried_with_cleanup_between() {
        let tries = Cell::new(0);
        let cleanups = Cell::new(0);
        let policy = RetryPolicy { attempts: 3, backoff: Duration::from_millis(1) };
        let out = policy
            .run(
                |n| {
                    tries.set(n);
                    async move {
                        if n < 3 {
                            Err(Error::transient("flaky"))
                        } else {
                            Ok(n)
                        }
                    }
                },
                || {
                    cleanups.set(cleanups.get() + 1);
                    async {}
                },
            )
            .await
            .unwrap();
        assert_eq!(out, 3);
        assert_eq!(cleanups.get(), 2);
    }

    #[tokio::test]
    async fn permanent_errors_fail_at_once() {
        let tries = Cell::new(0);
        let policy = RetryPolicy { attempts: 5, backoff: Duration::from_millis(1) };
        let err = policy
            .run(
                |_| {
                    tries.set(tries.get() + 1);
                    async { Err::<(), _>(Error::boot("kernel panic")) }
                },
                || async {},
            )
            .await
            .unwrap_err();
        assert_eq!(tries.get(), 1);
        assert_eq!(err.kind(), crate::ErrorKind::Boot);
    }

    #[tokio::test]
    async fn transient_errors_stop_after_the_last_attempt() {
        let tries = Cell::new(0);
        let policy = RetryPolicy { attempts: 2, backoff: Duration::from_millis(1) };
        let err = policy
            .run(
                |_| {
                    tries.set(tries.get() + 1);
                    async { Err::<(), _>(Error::transient("still flaky")) }
                },
                || async {},
            )
            .await
            .unwrap_err();
        assert_eq!(tries.get(), 2);
        assert!(err.is_transient());
    }
}
