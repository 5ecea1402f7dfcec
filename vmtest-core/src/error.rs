//! Errors: each says what failed, why, and what to do, and belongs to one [`ErrorKind`] that
//! decides whether it is retried (and, in a program, which exit code it returns).

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

/// A vmtest error: a one-line message that names what failed, the fix (a hint, when it is
/// not part of the message), an optional detail block (a console tail, a hypervisor's
/// stderr) and a kind.
#[derive(Debug, thiserror::Error)]
#[error("{}", self.headline())]
pub struct Error {
    kind: ErrorKind,
    message: String,
    hint: Option<String>,
    detail: Option<String>,
    /// What caused it, kept for callers that need to tell causes apart (and for `source()`).
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error { kind, message: message.into(), hint: None, detail: None, source: None }
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
            format!("{what} timed out after {}", crate::spec::format_duration(after)),
        )
        .with_hint(fix)
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

    /// Put what was being done in front of the message: `{what}: {message}`.
    pub fn context(mut self, what: impl std::fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }

    /// Say how to fix it (shown after the message, on the same line).
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
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

    /// How to fix it, when the message does not say.
    pub fn hint(&self) -> Option<&str> {
        self.hint.as_deref()
    }

    /// The message and the hint on one line, as a user reads them.
    pub fn headline(&self) -> String {
        match &self.hint {
            Some(h) => format!("{}; {h}", self.message),
            None => self.message.clone(),
        }
    }

    pub fn detail(&self) -> Option<&str> {
        self.detail.as_deref()
    }

    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_headline_joins_message_and_hint() {
        let e = Error::timeout("boot", Duration::from_secs(3), "raise --boot-timeout");
        assert_eq!(e.message(), "boot timed out after 3.00s");
        assert_eq!(e.hint(), Some("raise --boot-timeout"));
        assert_eq!(e.headline(), "boot timed out after 3.00s; raise --boot-timeout");
        assert_eq!(e.to_string(), e.headline());
    }

    #[test]
    fn only_transient_errors_are_transient() {
        assert!(Error::transient("x").is_transient());
        assert!(!Error::infra("x").is_transient());
        assert!(!Error::boot("x").is_transient());
    }
}
