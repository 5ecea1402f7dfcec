//! Errors: each says what failed, why, and what to do, and belongs to one [`ErrorKind`] that
//! decides whether it is retried and which exit code the CLI returns.

use std::time::Duration;

/// The class of a failure. Only [`ErrorKind::Transient`] is ever retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The user asked for something invalid: a bad flag, config or path.
    Usage,
    /// The host cannot run the VM: hypervisor, kernel or tool missing or unusable.
    Preflight,
    /// The VM did not come up: guest panic, agent never ready, hypervisor died during boot.
    Boot,
    /// Something between host and guest broke and trying again may help.
    Transient,
    /// Something between host and guest broke and trying again will not help.
    Infrastructure,
    /// A deadline passed (boot, command, lock).
    Timeout,
    /// Interrupted by a signal.
    Interrupted,
    /// The test itself failed: a step's command failed or its output did not match.
    TestFailed,
    /// The guest kernel printed a bug report (WARNING, BUG, KASAN...) during the command,
    /// and the run was asked to fail on those (`--kernel-warnings fail`).
    KernelReport,
}

impl ErrorKind {
    /// The documented exit code the CLI returns for this kind. These stay clear of the
    /// statuses test runners use (0, 1, 101) and of shell signal codes (128 + N).
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::Usage => exit_codes::USAGE,
            ErrorKind::Preflight => exit_codes::PREFLIGHT,
            ErrorKind::Boot => exit_codes::BOOT,
            ErrorKind::Transient | ErrorKind::Infrastructure => exit_codes::INFRASTRUCTURE,
            ErrorKind::Timeout => exit_codes::TIMEOUT,
            ErrorKind::Interrupted => exit_codes::INTERRUPTED,
            ErrorKind::TestFailed => exit_codes::TEST_FAILED,
            ErrorKind::KernelReport => exit_codes::KERNEL_REPORT,
        }
    }
}

/// Exit codes of the `vmtest` binary when the command itself did not decide the status.
pub mod exit_codes {
    /// Bad command line, config or path (EX_USAGE).
    pub const USAGE: i32 = 64;
    /// The backend cannot run here: hypervisor, kernel or tool missing (EX_UNAVAILABLE).
    pub const PREFLIGHT: i32 = 69;
    /// The VM failed to boot: kernel panic, agent never came up (EX_OSERR).
    pub const BOOT: i32 = 71;
    /// Host/guest plumbing failed after retries (EX_TEMPFAIL).
    pub const INFRASTRUCTURE: i32 = 75;
    /// The command, the boot or a lock wait ran past its deadline (as timeout(1)).
    pub const TIMEOUT: i32 = 124;
    /// Interrupted by SIGINT, SIGTERM or SIGHUP; the VM was torn down.
    pub const INTERRUPTED: i32 = 130;
    /// A test (`vmtest test`, a Machine API check) failed, as test runners report it.
    pub const TEST_FAILED: i32 = 1;
    /// The guest kernel reported a bug during the command (`--kernel-warnings fail`)
    /// (EX_SOFTWARE).
    pub const KERNEL_REPORT: i32 = 70;
}

/// A vmtest error: a one-line message that names what failed and how to fix it, an optional
/// detail block (a console tail, a hypervisor's stderr) and a kind.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    detail: Option<String>,
    /// What caused it, kept for callers that need to tell causes apart (and for `source()`).
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error { kind, message: message.into(), detail: None, source: None }
    }

    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Usage, message)
    }

    pub fn preflight(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Preflight, message)
    }

    pub fn boot(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Boot, message)
    }

    pub fn transient(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Transient, message)
    }

    pub fn infra(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Infrastructure, message)
    }

    pub fn timeout(what: &str, after: Duration, fix: &str) -> Self {
        Self::new(
            ErrorKind::Timeout,
            format!("{what} timed out after {}; {fix}", crate::spec::format_duration(after)),
        )
    }

    pub fn interrupted(signal: &str) -> Self {
        Self::new(ErrorKind::Interrupted, format!("interrupted by {signal}; the VM was torn down"))
    }

    /// An I/O error while doing `what`, as an infrastructure error (the I/O error is kept
    /// as its source).
    pub fn io(what: impl std::fmt::Display, err: std::io::Error) -> Self {
        Self::infra(format!("{what}: {err}")).with_source(err)
    }

    /// Keep `source` as the cause of this error.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Attach a multi-line detail, shown under the one-line message.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        let detail = detail.into();
        if !detail.trim().is_empty() {
            self.detail = Some(detail);
        }
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn detail(&self) -> Option<&str> {
        self.detail.as_deref()
    }

    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }

    pub fn exit_code(&self) -> i32 {
        self.kind.exit_code()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_distinct_and_avoid_test_runner_codes() {
        let kinds = [
            ErrorKind::Usage,
            ErrorKind::Preflight,
            ErrorKind::Boot,
            ErrorKind::Infrastructure,
            ErrorKind::Timeout,
            ErrorKind::Interrupted,
            ErrorKind::KernelReport,
        ];
        let codes: std::collections::HashSet<i32> = kinds.iter().map(|k| k.exit_code()).collect();
        assert_eq!(codes.len(), kinds.len());
        for c in codes {
            assert!(![0, 1, 2, 101].contains(&c), "{c} collides with a test runner status");
        }
    }

    #[test]
    fn a_failed_test_exits_1_like_test_runners() {
        assert_eq!(ErrorKind::TestFailed.exit_code(), 1);
    }

    #[test]
    fn only_transient_errors_are_transient() {
        assert!(Error::transient("x").is_transient());
        assert!(!Error::infra("x").is_transient());
        assert!(!Error::boot("x").is_transient());
    }
}
