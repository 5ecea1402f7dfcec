//! Running one command inside a VM: the request, where its output goes, and the result.

use crate::protocol::{ExitStatus, Stream};
use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// Which user the command runs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestUser {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl GuestUser {
    pub const ROOT: GuestUser = GuestUser { uid: 0, gid: 0, groups: Vec::new() };

    /// The user running this process, with its supplementary groups.
    pub fn current() -> GuestUser {
        // SAFETY: getuid/getgid cannot fail; getgroups writes at most `n` entries.
        unsafe {
            let n = libc::getgroups(0, std::ptr::null_mut());
            let mut groups = vec![0 as libc::gid_t; n.max(0) as usize];
            let got = libc::getgroups(n, groups.as_mut_ptr());
            groups.truncate(got.max(0) as usize);
            GuestUser { uid: libc::getuid(), gid: libc::getgid(), groups }
        }
    }
}

/// Where a command's stdin comes from.
pub enum StdinSource {
    /// `/dev/null`.
    Null,
    /// These bytes, then end of file.
    Bytes(Vec<u8>),
    /// Everything read from this reader until its end.
    Reader(Box<dyn std::io::Read + Send>),
}

/// Receives output as the guest produces it.
pub trait OutputSink: Send {
    fn write(&mut self, stream: Stream, data: &[u8]);
}

/// Writes stdout and stderr to this process's own stdout and stderr as they arrive.
pub struct StdioSink;

impl OutputSink for StdioSink {
    fn write(&mut self, stream: Stream, data: &[u8]) {
        // A closed pipe on our side must not kill the run; the command's status still matters.
        let _ = match stream {
            Stream::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(data).and_then(|_| out.flush())
            }
            Stream::Stderr => std::io::stderr().lock().write_all(data),
        };
    }
}

/// What to do with the output.
pub enum OutputMode {
    /// Keep it in [`ExecOutput::stdout`] / [`ExecOutput::stderr`].
    Capture,
    /// Hand it to a sink as it arrives; nothing is kept.
    Stream(Box<dyn OutputSink>),
}

/// One command to run in a VM.
pub struct ExecRequest {
    /// Passed exactly: never joined into a string or re-split.
    pub argv: Vec<OsString>,
    pub cwd: Option<PathBuf>,
    /// The complete environment of the command.
    pub env: Vec<(OsString, OsString)>,
    pub stdin: StdinSource,
    pub output: OutputMode,
    /// Host-side deadline; the command's process group is killed when it passes.
    pub timeout: Option<Duration>,
    pub user: GuestUser,
}

impl ExecRequest {
    /// A request that captures output, runs as root in `/` with a minimal `PATH`.
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        ExecRequest {
            argv: argv.into_iter().map(Into::into).collect(),
            cwd: None,
            env: vec![("PATH".into(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into())],
            stdin: StdinSource::Null,
            output: OutputMode::Capture,
            timeout: None,
            user: GuestUser::ROOT,
        }
    }

    /// Run `sh -c SCRIPT`.
    pub fn shell(script: &str) -> Self {
        Self::new(["sh", "-c", script])
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    pub fn stdin_bytes(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.stdin = StdinSource::Bytes(data.into());
        self
    }

    /// The argv as one line for messages (lossy, quoted where needed).
    pub fn display_argv(&self) -> String {
        display_argv(&self.argv)
    }
}

/// Render an argv for a human, shell-quoting the words that need it.
pub fn display_argv(argv: &[OsString]) -> String {
    argv.iter()
        .map(|a| {
            let s = a.to_string_lossy();
            if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c)) {
                s.into_owned()
            } else {
                format!("'{}'", s.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// How a command ended, with what it printed when output was captured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecOutput {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub duration: Duration,
}

impl ExecOutput {
    pub fn stdout_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_display_quotes_only_what_needs_it() {
        let argv: Vec<OsString> = vec!["echo".into(), "a b".into(), "it's".into(), "".into(), "x=1".into()];
        assert_eq!(display_argv(&argv), r"echo 'a b' 'it'\''s' '' x=1");
    }

    #[test]
    fn current_user_matches_libc() {
        let u = GuestUser::current();
        assert_eq!(u.uid, unsafe { libc::getuid() });
    }
}
