//! `HostCommand`: the one way this backend runs a host tool (zfs, bhyve, bhyvectl, ifconfig,
//! dladm, dd, kill). It adds the privilege prefix, resolves programs through an override path
//! first (so tests point every tool at the fakes), logs each command line, and returns what
//! the tool printed and its status.

use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vmtest_core::{Error, Result};

/// How mutating host commands gain privilege.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Privilege {
    Pfexec,
    Sudo,
    Doas,
    None,
}

impl Privilege {
    pub fn parse(s: &str) -> Result<Privilege> {
        match s {
            "pfexec" => Ok(Privilege::Pfexec),
            "sudo" => Ok(Privilege::Sudo),
            "doas" => Ok(Privilege::Doas),
            "none" | "" => Ok(Privilege::None),
            other => Err(Error::usage(format!(
                "VMTEST_PRIV=`{other}` is not known; use one of pfexec, sudo, doas, none"
            ))),
        }
    }

    pub fn program(self) -> Option<&'static str> {
        match self {
            Privilege::Pfexec => Some("pfexec"),
            // -n: never prompt; a missing sudoers rule fails at once instead of hanging.
            Privilege::Sudo => Some("sudo"),
            Privilege::Doas => Some("doas"),
            Privilege::None => None,
        }
    }

    fn extra_args(self) -> &'static [&'static str] {
        match self {
            Privilege::Sudo | Privilege::Doas => &["-n"],
            _ => &[],
        }
    }
}

/// What a host command printed and how it ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CmdOutput {
    /// The exit code; `None` when killed by a signal or the deadline.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// stderr, else stdout, trimmed: the tool's own message (illumos bhyvectl uses stdout).
    pub fn message(&self) -> String {
        let e = self.stderr.trim();
        if e.is_empty() {
            self.stdout.trim().to_owned()
        } else {
            e.to_owned()
        }
    }
}

/// Runs host tools with a privilege prefix and an override search path.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostCommand {
    pub privilege: Privilege,
    /// Directories searched before `PATH` (`VMTEST_BHYVE_PATH`).
    pub path_override: Vec<PathBuf>,
}

impl HostCommand {
    pub fn new(privilege: Privilege, path_override: Vec<PathBuf>) -> Self {
        HostCommand { privilege, path_override }
    }

    /// The full path of `program`, looked up in the override path, then in `PATH`.
    pub fn resolve(&self, program: &str) -> Option<PathBuf> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        self.path_override
            .iter()
            .cloned()
            .chain(std::env::split_paths(&path))
            .map(|d| d.join(program))
            .find(|p| is_executable(p))
    }

    /// The argv to run `program args` with privilege (`priv`) or without.
    pub fn argv(&self, program: &str, args: &[String], privileged: bool) -> Result<Vec<OsString>> {
        let tool = self.resolve(program).ok_or_else(|| {
            Error::preflight(format!(
                "cannot find `{program}` on PATH; install it (bhyve and zfs ship with FreeBSD and illumos) \
                 or point VMTEST_BHYVE_PATH at it"
            ))
        })?;
        let mut argv = Vec::new();
        if privileged {
            if let Some(p) = self.privilege.program() {
                let prefix = self.resolve(p).ok_or_else(|| {
                    Error::preflight(format!(
                        "cannot find `{p}` for VMTEST_PRIV={p}; install it, or set VMTEST_PRIV to one of \
                         pfexec, sudo, doas, none"
                    ))
                })?;
                argv.push(prefix.into_os_string());
                argv.extend(self.privilege.extra_args().iter().map(OsString::from));
            }
        }
        argv.push(tool.into_os_string());
        argv.extend(args.iter().map(OsString::from));
        Ok(argv)
    }

    /// Run a tool to completion (at most `timeout`), with privilege.
    pub fn run(&self, program: &str, args: &[&str], timeout: Duration) -> Result<CmdOutput> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let argv = self.argv(program, &args, true)?;
        tracing::debug!("host: {}", vmtest_core::exec::display_argv(&argv));
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                Error::preflight(format!(
                    "cannot run `{program}`: {e}; check VMTEST_BHYVE_PATH and VMTEST_PRIV"
                ))
            })?;
        let out_pipe = child.stdout.take();
        let err_pipe = child.stderr.take();
        let reader = |p: Option<std::process::ChildStdout>| {
            std::thread::spawn(move || {
                let mut s = Vec::new();
                if let Some(mut p) = p {
                    let _ = std::io::Read::read_to_end(&mut p, &mut s);
                }
                s
            })
        };
        let out_t = reader(out_pipe);
        let err_t = std::thread::spawn(move || {
            let mut s = Vec::new();
            if let Some(mut p) = err_pipe {
                let _ = std::io::Read::read_to_end(&mut p, &mut s);
            }
            s
        });
        let deadline = Instant::now() + timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break Some(st),
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(Error::io(format!("waiting for `{program}`"), e)),
            }
        };
        let stdout = String::from_utf8_lossy(&out_t.join().unwrap_or_default()).into_owned();
        let stderr = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
        let Some(status) = status else {
            return Err(Error::timeout(
                &format!("host command `{}`", vmtest_core::exec::display_argv(&argv)),
                timeout,
                "check the host (a hung zfs or bhyvectl needs an administrator)",
            ));
        };
        let out = CmdOutput { code: status.code(), stdout, stderr };
        tracing::debug!("host: `{program}` -> {:?}: {}", out.code, out.message());
        Ok(out)
    }

    /// Run and require success; the error names the command and quotes the tool.
    pub fn check(&self, program: &str, args: &[&str], timeout: Duration) -> Result<CmdOutput> {
        let out = self.run(program, args, timeout)?;
        if out.success() {
            Ok(out)
        } else {
            Err(Error::infra(format!("`{program} {}` failed: {}", args.join(" "), out.message())))
        }
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}
