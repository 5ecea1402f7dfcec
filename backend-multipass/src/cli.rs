//! Running the `multipass` client and reading what it says: exit codes, stderr lines and JSON,
//! as reference/multipass.md §2–§3 describe them for both release lines (1.16 and main).

use serde::Deserialize;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use vmtest_core::{Error, ErrorKind, Result};

/// Exit codes of the client (`ReturnCode` in `return_codes.h`, plus the client timeout).
pub mod code {
    pub const COMMAND_LINE_ERROR: i32 = 1;
    pub const COMMAND_FAIL: i32 = 2;
    /// `Retry`: 1.16 re-runs an exec whose guest status is 4, forever.
    pub const RETRY: i32 = 4;
    /// The client's own `--timeout` elapsed.
    pub const TIMEOUT: i32 = 5;
    /// main only: Multipass's side of SSH failed.
    pub const SHELL_EXEC_FAIL: i32 = 255;
}

/// How one client call ended.
#[derive(Debug, Clone)]
pub struct Output {
    /// `None` when the client died of a signal.
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// stderr on one line, for messages (`a | b`).
    pub fn stderr_line(&self) -> String {
        let text = self.stderr_text();
        let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        if lines.is_empty() {
            format!("no message, exit {}", self.code.map_or("by signal".to_owned(), |c| c.to_string()))
        } else {
            lines.join(" | ")
        }
    }

    pub fn stderr_has(&self, needle: &str) -> bool {
        self.stderr_text().contains(needle)
    }
}

/// The `multipass` executable.
#[derive(Clone, Debug)]
pub struct Multipass {
    pub exe: PathBuf,
}

/// The deadline for control calls (list, info, delete, version): what Multipass's own CI
/// gives delete and exec.
pub const CONTROL_DEADLINE: Duration = Duration::from_secs(90);

impl Multipass {
    /// `$VMTEST_MULTIPASS`, else `multipass` on `PATH`, else the snap's `/snap/bin/multipass`.
    pub fn locate(configured: Option<PathBuf>) -> std::result::Result<Multipass, String> {
        if let Some(p) = configured {
            if p.components().count() > 1 {
                return if is_executable(&p) {
                    Ok(Multipass { exe: p })
                } else {
                    Err(format!("VMTEST_MULTIPASS={} is not an executable file", p.display()))
                };
            }
            return find_on_path(p.as_os_str())
                .map(|exe| Multipass { exe })
                .ok_or_else(|| format!("VMTEST_MULTIPASS={} was not found on PATH", p.display()));
        }
        if let Some(exe) = find_on_path("multipass".as_ref()) {
            return Ok(Multipass { exe });
        }
        for p in ["/snap/bin/multipass", "/usr/local/bin/multipass"] {
            if is_executable(Path::new(p)) {
                return Ok(Multipass { exe: p.into() });
            }
        }
        Err("`multipass` was not found on PATH".into())
    }

    /// A client command with null stdin and piped stdout/stderr, killed if dropped.
    pub fn command<I, S>(&self, args: I) -> tokio::process::Command
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.args(args.into_iter().map(Into::into))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    /// Run one client call to its end, feeding `stdin` when given (null otherwise). A client
    /// still running at `deadline` is killed and reported as a timeout.
    pub async fn run(&self, args: &[&str], stdin: Option<&[u8]>, deadline: Duration) -> Result<Output> {
        let mut cmd = self.command(args.iter().copied());
        if stdin.is_some() {
            cmd.stdin(Stdio::piped());
        }
        tracing::debug!("running {} {}", self.exe.display(), args.join(" "));
        let mut child = cmd.spawn().map_err(|e| self.spawn_error(e))?;
        if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
            let data = data.to_vec();
            tokio::spawn(async move {
                let _ = pipe.write_all(&data).await;
            });
        }
        match tokio::time::timeout(deadline, child.wait_with_output()).await {
            Ok(Ok(out)) => {
                let out = Output { code: out.status.code(), stdout: out.stdout, stderr: out.stderr };
                tracing::debug!(
                    "multipass {} -> {:?}: {}",
                    args.first().unwrap_or(&""),
                    out.code,
                    out.stderr_line()
                );
                Ok(out)
            }
            Ok(Err(e)) => {
                Err(Error::infra(format!("waiting for `multipass {}` failed: {e}", args.join(" "))))
            }
            Err(_) => Err(Error::timeout(
                &format!("`multipass {}`", args.join(" ")),
                deadline,
                "the multipass daemon is not answering; check `multipass list` and restart it \
                 (`sudo snap restart multipass`)",
            )),
        }
    }

    pub fn spawn_error(&self, e: std::io::Error) -> Error {
        Error::preflight(format!(
            "cannot run {}: {e}; install Multipass (`sudo snap install multipass`) or set VMTEST_MULTIPASS \
             to its path",
            self.exe.display()
        ))
    }
}

/// Is `exe` the snap's client? `/snap/bin/multipass` is a symlink to `/usr/bin/snap`, which
/// runs the (strictly confined) app its `argv[0]` names: resolving it ends at `snap`, not under
/// `/snap/` (snapd `wrappers/binaries.go`).
pub fn is_snap(exe: &Path) -> bool {
    let resolved = std::fs::canonicalize(exe).unwrap_or_else(|_| exe.to_path_buf());
    exe.starts_with("/snap/")
        || resolved.starts_with("/snap/")
        || resolved.file_name().is_some_and(|n| n == "snap")
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

fn find_on_path(name: &std::ffi::OsStr) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| is_executable(p))
}

/// `version --format json`: `multipassd` is missing when the daemon is down (and it still
/// exits 0, so the exit code says nothing).
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    pub multipass: String,
    pub multipassd: Option<String>,
}

/// One entry of `list --format json` (main adds `zone`, which is ignored).
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ListEntry {
    pub name: String,
    pub state: String,
}

#[derive(Deserialize)]
struct ListDoc {
    list: Vec<ListEntry>,
}

pub fn parse_version(stdout: &[u8]) -> Result<VersionInfo> {
    serde_json::from_slice(stdout).map_err(|e| {
        Error::preflight(format!(
            "`multipass version --format json` printed unreadable JSON ({e}); upgrade Multipass to 1.16 or later"
        ))
    })
}

pub fn parse_list(stdout: &[u8]) -> Result<Vec<ListEntry>> {
    serde_json::from_slice::<ListDoc>(stdout)
        .map(|d| d.list)
        .map_err(|e| Error::infra(format!("`multipass list --format json` printed unreadable JSON: {e}")))
}

/// The state of `name` from `info NAME --format json` (`{"errors": [], "info": {NAME: {...}}}`).
pub fn parse_info_state(stdout: &[u8], name: &str) -> Result<String> {
    let doc: serde_json::Value = serde_json::from_slice(stdout).map_err(|e| {
        Error::infra(format!("`multipass info {name} --format json` printed unreadable JSON: {e}"))
    })?;
    doc.get("info")
        .and_then(|i| i.get(name))
        .and_then(|i| i.get("state"))
        .and_then(|s| s.as_str())
        .map(str::to_owned)
        .ok_or_else(|| Error::infra(format!("`multipass info {name} --format json` has no state for {name}")))
}

/// True when a failed call only says the instance is not there (delete/info/exec wording).
pub fn says_does_not_exist(out: &Output) -> bool {
    out.code == Some(code::COMMAND_FAIL) && out.stderr_has("does not exist")
}

/// Daemon problems every command can hit, as one-line errors with the fix; `None` otherwise.
pub fn daemon_error(out: &Output, what: &str) -> Option<Error> {
    if out.code != Some(code::COMMAND_FAIL) {
        return None;
    }
    if out.stderr_has("cannot connect to the multipass socket") {
        return Some(Error::transient(format!(
            "{what}: the multipass daemon is not answering ({}); start it with `sudo snap restart multipass`",
            out.stderr_line()
        )));
    }
    if out.stderr_has("socket access denied") {
        return Some(Error::preflight(format!(
            "{what}: this user may not use the multipass socket ({}); add the user to the group that owns \
             the socket (or run `multipass authenticate`)",
            out.stderr_line()
        )));
    }
    if out.stderr_has("not authenticated with the Multipass service") {
        return Some(Error::preflight(format!(
            "{what}: the multipass client is not authenticated ({}); run `multipass authenticate`",
            out.stderr_line()
        )));
    }
    None
}

/// How a failed `launch` is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchFailure {
    /// Never retried; nothing of ours to delete (the name was taken before we came).
    NameTaken,
    /// Retried after `delete --purge NAME`.
    Transient,
    /// Final, with this error kind; the instance (if any) is deleted.
    Final(ErrorKind),
}

/// Decide from the exit code and stderr what a failed launch means (reference §3, §5, §6).
pub fn classify_launch(out: &Output) -> LaunchFailure {
    let has = |s: &str| out.stderr_has(s);
    match out.code {
        Some(code::COMMAND_LINE_ERROR) => LaunchFailure::Final(ErrorKind::Usage),
        Some(code::TIMEOUT) => LaunchFailure::Transient,
        Some(code::COMMAND_FAIL) => {
            if has("already exists") || has("is being prepared") {
                LaunchFailure::NameTaken
            } else if has("timed out waiting for")
                || has("is unknown or unreachable")
                || has("Unable to find an image matching")
                || has("cannot connect to the multipass socket")
            {
                LaunchFailure::Transient
            } else if has("Invalid arguments supplied")
                || has("Requested disk")
                || has("is not found. Please use `multipass find`")
            {
                LaunchFailure::Final(ErrorKind::Usage)
            } else if has("KVM support is not enabled")
                || has("Another virtual machine manager")
                || has("Available disk")
                || has("socket access denied")
                || has("not authenticated with the Multipass service")
            {
                LaunchFailure::Final(ErrorKind::Preflight)
            } else if has("Instance shutdown during start")
                || has("failed to start qemu instance")
                || has("cannot set up guest memory")
                || has("Not enough memory")
            {
                LaunchFailure::Final(ErrorKind::Boot)
            } else {
                LaunchFailure::Final(ErrorKind::Infrastructure)
            }
        }
        _ => LaunchFailure::Final(ErrorKind::Infrastructure),
    }
}

/// The one-line message (what failed, how to fix it) for a failed launch of `name`.
pub fn launch_message(out: &Output, name: &str, image: &str, attempt_timeout: u64) -> String {
    let said = out.stderr_line();
    let has = |s: &str| out.stderr_has(s);
    let fix = if out.code == Some(code::COMMAND_LINE_ERROR) {
        "multipass rejected the command line; check VMTEST_MULTIPASS_IMAGE, VMTEST_MULTIPASS_DISK and --memory"
            .to_owned()
    } else if out.code == Some(code::TIMEOUT) || has("timed out waiting for") {
        format!(
            "the instance was not ready within {attempt_timeout}s; raise VMTEST_MULTIPASS_LAUNCH_TIMEOUT \
             (default 600s), or lighten the cloud-init"
        )
    } else if has("already exists") || has("is being prepared") {
        format!(
            "another instance already uses this name and was left alone; if it is a leftover remove it \
             with `multipass delete --purge {name}` or `vmtest cleanup`"
        )
    } else if has("is unknown or unreachable") || has("Unable to find an image matching") {
        "the image manifests are not loaded yet; run `multipass find --force-update` (or `sudo snap \
         restart multipass`) and try again"
            .to_owned()
    } else if has("Invalid arguments supplied") || has("Requested disk") {
        "fix the VM size (--memory, VMTEST_MULTIPASS_DISK) or the name".to_owned()
    } else if has("is not found. Please use `multipass find`") {
        format!("image `{image}` names an unknown remote; pick one from `multipass find`")
    } else if has("KVM support is not enabled") || has("Another virtual machine manager") {
        "enable hardware virtualization (KVM) and stop other hypervisors, or use --backend qemu".to_owned()
    } else if has("Available disk") {
        "free disk space on Multipass's storage (see `vmtest doctor`)".to_owned()
    } else if has("Instance shutdown during start")
        || has("cannot set up guest memory")
        || has("Not enough memory")
    {
        "the host could not start the VM; lower --memory/--cpus or free host memory".to_owned()
    } else if let Some(e) = daemon_error(out, "") {
        return format!("multipass launch of {name} failed{}", e.message());
    } else {
        "see `multipass launch` output above; `multipass list` shows the instance state".to_owned()
    };
    format!("multipass launch of {name} failed ({said}); {fix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(code: i32, stderr: &str) -> Output {
        Output { code: Some(code), stdout: Vec::new(), stderr: stderr.as_bytes().to_vec() }
    }

    #[test]
    fn list_parses_both_release_lines_by_value() {
        let v116 =
            br#"{"list": [{"ipv4": [], "name": "vmt-1-a", "release": "Not Available", "state": "Deleted"}]}"#;
        let main =
            br#"{"list": [{"name": "vmt-1-a", "state": "Deleted", "ipv4": [], "release": "Not Available",
            "zone": {"name": "zone1", "available": true}}]}"#;
        assert_eq!(parse_list(v116).unwrap(), parse_list(main).unwrap());
        assert!(parse_list(br#"{"list": []}"#).unwrap().is_empty());
    }

    #[test]
    fn version_without_daemon_has_no_multipassd() {
        let v = parse_version(br#"{"multipass": "1.16.3"}"#).unwrap();
        assert_eq!(v.multipassd, None);
        let v = parse_version(
            br#"{"multipass": "1.16.3", "multipassd": "1.16.3", "update": {"title": "t",
            "description": "d", "url": "u"}}"#,
        )
        .unwrap();
        assert_eq!(v.multipassd.as_deref(), Some("1.16.3"));
    }

    #[test]
    fn launch_failures_are_classified_as_the_reference_says() {
        use LaunchFailure::*;
        let cases = [
            (out(5, "Timed out waiting for instance launch."), Transient),
            (
                out(2, "launch failed: The following errors occurred:\nx: timed out waiting for response"),
                Transient,
            ),
            (out(2, "launch failed: Remote \"\" is unknown or unreachable."), Transient),
            (out(2, "launch failed: Unable to find an image matching \"noble\" in remote \"\"."), Transient),
            (out(2, "launch failed: cannot connect to the multipass socket"), Transient),
            (out(2, "launch failed: instance \"x\" already exists"), NameTaken),
            (out(1, "Invalid remote and source image name supplied"), Final(ErrorKind::Usage)),
            (
                out(
                    2,
                    "launch failed: Invalid arguments supplied\nInvalid memory size value supplied: 100M.",
                ),
                Final(ErrorKind::Usage),
            ),
            (
                out(2, "launch failed: KVM support is not enabled on this machine."),
                Final(ErrorKind::Preflight),
            ),
            (out(2, "launch failed: Instance shutdown during start: boom"), Final(ErrorKind::Boot)),
            (out(2, "launch failed: something new"), Final(ErrorKind::Infrastructure)),
        ];
        for (o, want) in cases {
            assert_eq!(classify_launch(&o), want, "{}", o.stderr_text());
        }
    }
}
