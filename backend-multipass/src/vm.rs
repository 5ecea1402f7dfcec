//! One Multipass instance: exec with the status sentinel, transfer, delete.

use crate::cli::{self, code, Multipass};
use crate::script::{self, SentinelFilter, Wrapper};
use async_trait::async_trait;
use std::ffi::OsString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmtest_core::console::Console;
use vmtest_core::exec::{ExecOutput, ExecRequest, GuestUser, OutputMode, StdinSource};
use vmtest_core::protocol::{ExitStatus, Stream};
use vmtest_core::state::RunDir;
use vmtest_core::{Capabilities, Error, Result, Vm};

/// The guest's default user (`ubuntu`), who runs commands that do not ask for root.
const GUEST_USER: GuestUser = GuestUser { uid: 1000, gid: 1000, groups: Vec::new() };

/// Where `copy_in` stages a file, relative to the default user's home.
const STAGE_PREFIX: &str = ".vmtest-stage-";

/// Moves a staged file (`$1`, relative to the default user's home, where `exec` starts) to
/// its place (`$2`), making its parents, and sets its mode (`$3`).
const PLACE_STAGED: &str = r#"mkdir -p -- "$(dirname -- "$2")" && mv -f -- "$1" "$2" && chmod "$3" "$2""#;

/// After the client exits, how long to wait for pipes a guest background process may hold.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

pub struct MultipassVm {
    name: String,
    node: String,
    mp: Multipass,
    run: RunDir,
    confined: bool,
    detached: AtomicBool,
    down: AtomicBool,
    launch_time: Duration,
}

fn nonce() -> String {
    vmtest_core::random::hex(8)
}

/// A pipe whose read end becomes the client's stdin; a thread copies `reader` into it.
fn stdin_pipe(mut reader: Box<dyn std::io::Read + Send>) -> Result<Stdio> {
    let (read, write) =
        cloexec_pipe().map_err(|e| Error::io("cannot create a pipe for the command's stdin", e))?;
    std::thread::spawn(move || {
        let mut w = std::fs::File::from(write);
        // The command may stop reading early; that is not an error of ours.
        let _ = std::io::copy(&mut reader, &mut w);
    });
    Ok(Stdio::from(read))
}

/// A pipe with close-on-exec on both ends: `pipe2` where the OS has it; macOS has none, so
/// there `pipe` then `fcntl` (a child forked in between would keep a copy of the ends).
fn cloexec_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    #[cfg(not(target_vendor = "apple"))]
    // SAFETY: pipe2 fills both fds on success.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    #[cfg(target_vendor = "apple")]
    // SAFETY: pipe fills both fds on success.
    let r = unsafe { libc::pipe(fds.as_mut_ptr()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just created; each is owned exactly once.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    #[cfg(target_vendor = "apple")]
    for fd in [&read, &write] {
        use std::os::fd::AsRawFd;
        // SAFETY: fcntl on an fd we own.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok((read, write))
}

impl MultipassVm {
    pub(crate) fn new(
        name: String,
        node: String,
        mp: Multipass,
        run: RunDir,
        confined: bool,
        launch_time: Duration,
    ) -> Self {
        MultipassVm {
            name,
            node,
            mp,
            run,
            confined,
            detached: AtomicBool::new(false),
            down: AtomicBool::new(false),
            launch_time,
        }
    }

    /// Can the (snap-confined) client open this host path itself? Under the snap it cannot see
    /// hidden paths or anything outside `/home` (reference §1, mount).
    fn client_sees(&self, host: &Path) -> bool {
        if !self.confined {
            return true;
        }
        host.is_absolute()
            && host.starts_with("/home")
            && !host.components().any(|c| c.as_os_str().to_string_lossy().starts_with('.'))
    }

    fn guest_arg(&self, guest: &Path) -> String {
        format!("{}:{}", self.name, guest.to_string_lossy())
    }

    /// Run a helper command as the default user and insist on status 0.
    async fn helper(&self, argv: &[&str], stdin: StdinSource, what: &str) -> Result<ExecOutput> {
        let mut req = ExecRequest::new(argv.iter().copied());
        req.user = GUEST_USER;
        req.stdin = stdin;
        let out = self.exec(req).await?;
        if !out.status.success() {
            return Err(Error::infra(format!(
                "{what} in {} failed ({}: {}); check the path and its permissions in the guest",
                self.name,
                out.status,
                out.stderr_lossy().trim()
            )));
        }
        Ok(out)
    }

    /// Move a staged file to `guest`: as the default user where it may (its parents stay its
    /// own), else as root (a root-owned directory). The staged file never stays behind.
    async fn place_staged(&self, staged: &str, guest: &str, mode: &str, what: &str) -> Result<()> {
        let argv = ["sh", "-c", PLACE_STAGED, "sh", staged, guest, mode];
        let mut said = String::new();
        for user in [GUEST_USER, GuestUser::ROOT] {
            let mut req = ExecRequest::new(argv);
            req.user = user;
            let out = self.exec(req).await?;
            if out.status.success() {
                return Ok(());
            }
            said = format!("{}: {}", out.status, out.stderr_lossy().trim());
        }
        let mut rm = ExecRequest::new(["rm", "-f", "--", staged]);
        rm.user = GuestUser::ROOT;
        let _ = self.exec(rm).await;
        Err(Error::infra(format!(
            "{what} in {} failed, as the default user and through sudo ({said}); check the path in the guest",
            self.name
        )))
    }

    async fn transfer(&self, args: &[&str], stdin: Stdio, stdout: Stdio, what: &str) -> Result<()> {
        let mut cmd = self.mp.command(args.iter().copied());
        cmd.stdin(stdin).stdout(stdout);
        let child = cmd.spawn().map_err(|e| self.mp.spawn_error(e))?;
        let out = tokio::time::timeout(cli::CONTROL_DEADLINE * 10, child.wait_with_output())
            .await
            .map_err(|_| {
                Error::timeout(what, cli::CONTROL_DEADLINE * 10, "check the instance with `multipass info`")
            })?
            .map_err(|e| Error::infra(format!("{what}: {e}")))?;
        let out = cli::Output { code: out.status.code(), stdout: out.stdout, stderr: out.stderr };
        if out.ok() {
            return Ok(());
        }
        Err(cli::daemon_error(&out, what).unwrap_or_else(|| {
            Error::infra(format!(
                "{what} failed (`multipass {}`: {}); check that the paths exist (parents included) and are \
                 writable",
                args.join(" "),
                out.stderr_line()
            ))
        }))
    }

    async fn kill_guest_group(&self, nonce: &str) {
        let kill = script::kill_script(nonce);
        let args = ["exec", "-n", self.name.as_str(), "--", "sudo", "-n", "sh", "-c", kill.as_str()];
        match self.mp.run(&args, None, Duration::from_secs(30)).await {
            Ok(out) if out.ok() => {}
            Ok(out) => {
                tracing::warn!("could not kill the timed-out command in {}: {}", self.name, out.stderr_line())
            }
            Err(e) => tracing::warn!("could not kill the timed-out command in {}: {e}", self.name),
        }
    }

    async fn delete(&self) -> Result<()> {
        crate::delete_purge(&self.mp, &self.name).await?;
        self.down.store(true, Ordering::SeqCst);
        self.run.remove_record(&self.node);
        Ok(())
    }
}

#[async_trait]
impl Vm for MultipassVm {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Capabilities {
        // Each exec is its own client call, so several can run at once; the rest Multipass
        // cannot do through its CLI (snapshots need a stopped instance, there is no console).
        Capabilities {
            network: false,
            snapshots: false,
            concurrent_exec: true,
            console: false,
            host_root: false,
        }
    }

    async fn exec(&self, req: ExecRequest) -> Result<ExecOutput> {
        let started = Instant::now();
        let nonce = nonce();
        let wrapper = Wrapper {
            argv: &req.argv,
            env: &req.env,
            cwd: req.cwd.as_deref(),
            root: req.user.uid == 0,
            nonce: &nonce,
        };
        let script = wrapper.script();
        let args: Vec<OsString> =
            ["exec", "-n", &self.name, "--", "sh", "-c", &script].iter().map(OsString::from).collect();
        let mut cmd = self.mp.command(args);
        let mut bytes = None;
        match req.stdin {
            StdinSource::Null => {}
            StdinSource::Bytes(b) => {
                cmd.stdin(Stdio::piped());
                bytes = Some(b);
            }
            StdinSource::Reader(r) => {
                cmd.stdin(stdin_pipe(r)?);
            }
        }
        tracing::debug!(
            "exec in {}: {}",
            self.name,
            req.argv.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
        );
        let mut child = cmd.spawn().map_err(|e| self.mp.spawn_error(e))?;
        if let (Some(b), Some(mut pipe)) = (bytes, child.stdin.take()) {
            tokio::spawn(async move {
                let _ = pipe.write_all(&b).await;
            });
        }
        let mut out_pipe = child.stdout.take().expect("stdout is piped");
        let mut err_pipe = child.stderr.take().expect("stderr is piped");
        let mut mode = req.output;
        let mut filter = SentinelFilter::new(&nonce);
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let mut emit = |stream: Stream, data: &[u8]| {
            if data.is_empty() {
                return;
            }
            match &mut mode {
                OutputMode::Capture => match stream {
                    Stream::Stdout => stdout.extend_from_slice(data),
                    Stream::Stderr => stderr.extend_from_slice(data),
                },
                OutputMode::Stream(sink) => sink.write(stream, data),
            }
        };
        let deadline = req.timeout.map(|t| tokio::time::Instant::now() + t);
        let sleep_until = |d: Option<tokio::time::Instant>| async move {
            match d {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let (mut out_open, mut err_open) = (true, true);
        let mut status = None;
        let mut drain_until: Option<tokio::time::Instant> = None;
        let (mut obuf, mut ebuf) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
        while out_open || err_open || status.is_none() {
            tokio::select! {
                r = out_pipe.read(&mut obuf), if out_open => match r {
                    Ok(0) | Err(_) => out_open = false,
                    Ok(n) => emit(Stream::Stdout, &obuf[..n]),
                },
                r = err_pipe.read(&mut ebuf), if err_open => match r {
                    Ok(0) | Err(_) => err_open = false,
                    Ok(n) => { let pass = filter.feed(&ebuf[..n]); emit(Stream::Stderr, &pass) }
                },
                s = child.wait(), if status.is_none() => {
                    status = Some(s.map_err(|e| Error::infra(format!("waiting for `multipass exec`: {e}")))?);
                    drain_until = Some(tokio::time::Instant::now() + DRAIN_GRACE);
                },
                _ = sleep_until(drain_until), if drain_until.is_some() => break,
                _ = sleep_until(deadline), if deadline.is_some() => {
                    let _ = child.kill().await;
                    self.kill_guest_group(&nonce).await;
                    let t = req.timeout.unwrap_or_default();
                    return Err(Error::timeout(
                        &format!("command `{}` in {}", vmtest_core::exec::display_argv(&req.argv), self.name),
                        t,
                        "the command and its process group were killed; raise --timeout if it needs longer",
                    ));
                },
            }
        }
        let tail = filter.finish();
        emit(Stream::Stderr, &tail);
        let client = status.expect("the loop ends after the client exits");
        let duration = started.elapsed();
        if let Some(s) = filter.status() {
            return Ok(ExecOutput { status: ExitStatus::Code(s), stdout, stderr, duration });
        }
        // No marker: the wrapper never finished. The client's code is Multipass's, not the
        // command's (1.16: 2 for SSH failures; main: 255), unless the wrapper itself was killed.
        let said = String::from_utf8_lossy(if stderr.is_empty() { &tail } else { &stderr }).into_owned();
        let o = cli::Output { code: client.code(), stdout: Vec::new(), stderr: said.clone().into_bytes() };
        if let Some(sig) = o.code.filter(|c| (129..=192).contains(c)) {
            if said.contains("Process terminated by signal") {
                return Ok(ExecOutput { status: ExitStatus::Signal(sig - 128), stdout, stderr, duration });
            }
        }
        if let Some(e) = cli::daemon_error(&o, &format!("exec in {}", self.name)) {
            return Err(Error::infra(e.headline()));
        }
        let what = match o.code {
            Some(code::COMMAND_FAIL) if said.contains("does not exist") || said.contains("is deleted") => {
                format!(
                    "multipass instance {} is gone ({}); something deleted it during the run",
                    self.name,
                    o.stderr_line()
                )
            }
            Some(code::COMMAND_LINE_ERROR) => format!(
                "multipass rejected the exec command line ({}); this is a vmtest bug, please report it",
                o.stderr_line()
            ),
            Some(c) => format!(
                "`multipass exec {}` ended with status {c} before the command reported its own ({}); the SSH \
                 connection to the guest failed: check `multipass info {}` and retry",
                self.name,
                o.stderr_line(),
                self.name
            ),
            None => {
                format!("`multipass exec {}` was killed by a signal before the command finished", self.name)
            }
        };
        Err(Error::infra(what).with_detail(said))
    }

    async fn copy_in(&self, host: &Path, guest: &Path) -> Result<()> {
        let host = std::path::absolute(host)
            .map_err(|e| Error::usage(format!("bad host path {}: {e}", host.display())))?;
        let meta = std::fs::metadata(&host)
            .map_err(|e| Error::usage(format!("cannot copy {} into {}: {e}", host.display(), self.name)))?;
        let what = format!("copying {} to {}:{}", host.display(), self.name, guest.display());
        let g = guest.to_string_lossy().into_owned();
        if meta.is_dir() {
            // A directory goes as a tar stream through exec: no snap confinement in the way.
            let mut tar = std::process::Command::new("tar")
                .arg("-C")
                .arg(&host)
                .args(["-cf", "-", "."])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .spawn()
                .map_err(|e| Error::infra(format!("{what}: cannot run tar on the host: {e}")))?;
            let pipe = tar.stdout.take().expect("piped");
            let unpack = r#"mkdir -p -- "$1" && tar -C "$1" -xf -"#;
            let r = self
                .helper(&["sh", "-c", unpack, "sh", &g], StdinSource::Reader(Box::new(pipe)), &what)
                .await;
            let st = tar.wait().map_err(|e| Error::infra(format!("{what}: {e}")))?;
            r?;
            if !st.success() {
                return Err(Error::infra(format!("{what}: host tar failed ({st})")));
            }
            return Ok(());
        }
        // `transfer` writes over SFTP as the default user, who cannot write a root-owned path:
        // stage the file in its home, then move it there, with sudo where the user may not.
        let staged = format!("{STAGE_PREFIX}{}", nonce());
        let dest = format!("{}:{staged}", self.name);
        if self.client_sees(&host) {
            let src = host.to_string_lossy().into_owned();
            self.transfer(&["transfer", &src, &dest], Stdio::null(), Stdio::null(), &what).await?;
        } else {
            // The snap cannot open this path: stream it through stdin.
            let f = std::fs::File::open(&host).map_err(|e| Error::usage(format!("{what}: {e}")))?;
            self.transfer(&["transfer", "-", &dest], Stdio::from(f), Stdio::null(), &what).await?;
        }
        // SFTP does not carry the mode over a stream: set it, so binaries stay executable.
        use std::os::unix::fs::PermissionsExt;
        let mode = format!("{:o}", meta.permissions().mode() & 0o7777);
        self.place_staged(&staged, &g, &mode, &what).await
    }

    async fn copy_out(&self, guest: &Path, host: &Path) -> Result<()> {
        let host: PathBuf = std::path::absolute(host)
            .map_err(|e| Error::usage(format!("bad host path {}: {e}", host.display())))?;
        let what = format!("copying {}:{} to {}", self.name, guest.display(), host.display());
        let g = guest.to_string_lossy().into_owned();
        let mut probe = ExecRequest::new(["test", "-d", g.as_str()]);
        probe.user = GUEST_USER;
        if self.exec(probe).await?.status.success() {
            let out = self.helper(&["tar", "-C", &g, "-cf", "-", "."], StdinSource::Null, &what).await?;
            std::fs::create_dir_all(&host).map_err(|e| Error::io(&what, e))?;
            let mut tar = std::process::Command::new("tar")
                .arg("-C")
                .arg(&host)
                .args(["-xf", "-"])
                .stdin(Stdio::piped())
                .spawn()
                .map_err(|e| Error::infra(format!("{what}: cannot run tar on the host: {e}")))?;
            use std::io::Write;
            let _ = tar.stdin.take().expect("piped").write_all(&out.stdout);
            let st = tar.wait().map_err(|e| Error::io(&what, e))?;
            if !st.success() {
                return Err(Error::infra(format!("{what}: host tar failed ({st})")));
            }
            return Ok(());
        }
        let src = self.guest_arg(guest);
        if self.client_sees(&host) {
            let dst = host.to_string_lossy().into_owned();
            self.transfer(&["transfer", &src, &dst], Stdio::null(), Stdio::null(), &what).await
        } else {
            let f = std::fs::File::create(&host).map_err(|e| Error::usage(format!("{what}: {e}")))?;
            let r = self.transfer(&["transfer", &src, "-"], Stdio::null(), Stdio::from(f), &what).await;
            if r.is_err() {
                let _ = std::fs::remove_file(&host);
            }
            r
        }
    }

    fn console(&self) -> Result<Box<dyn Console>> {
        Err(Error::usage(format!(
            "the multipass backend has no serial console for {}; use exec (or `multipass shell {}`), or \
             --backend qemu for console tests",
            self.name, self.name
        )))
    }

    async fn shutdown(&self) -> Result<()> {
        // `delete --purge` powers off and frees everything at once: no `stop` first.
        self.delete().await
    }

    async fn kill(&self) -> Result<()> {
        self.delete().await
    }

    fn detach(&self) {
        self.detached.store(true, Ordering::SeqCst);
    }

    fn boot_timings(&self) -> Vec<(&'static str, Duration)> {
        vec![("multipass-launch", self.launch_time)]
    }
}

impl Drop for MultipassVm {
    fn drop(&mut self) {
        if self.detached.load(Ordering::SeqCst) || self.down.load(Ordering::SeqCst) {
            return;
        }
        // Dropped without shutdown (a panic, a cancelled task): delete it now.
        let r = std::process::Command::new(&self.mp.exe)
            .args(["delete", "--purge", &self.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if r.is_ok_and(|s| s.success()) {
            self.run.remove_record(&self.node);
        }
    }
}
