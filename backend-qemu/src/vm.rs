//! One running QEMU guest: the process, its console, its agent connection.

use crate::accel::{Accel, KvmFailed};
use crate::agent_client::{AgentClient, AgentError, ControlReceiver};
use crate::cache::Cache;
use crate::cache_usage;
use crate::command::{QemuCommand, Start};
use crate::dump::Dump;
use crate::health::{self, Trouble};
use crate::qmp::Qmp;
use crate::saved::{self, SavedGuest};
use async_trait::async_trait;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tokio::sync::watch;
use vmtest_core::console::{Console, ConsoleLog};
use vmtest_core::exec::{ExecOutput, ExecRequest};
use vmtest_core::protocol::{GuestMessage, GuestSetup, HostMessage, PROTOCOL_VERSION};
use vmtest_core::state::{ProcessId, RunDir, VmRecord};
use vmtest_core::{Capabilities, Error, Result, Vm};

/// How a boot went wrong, turned into one line plus the console tail.
fn boot_failure(what: String, console: &ConsoleLog, qemu_stderr: &str) -> Error {
    let tail = console.tail(40);
    // A panic's call trace can be longer than the tail shown, so look further back for its
    // first line.
    let recent = console.tail(400);
    let panic_line = recent.lines().find(|l| l.contains("Kernel panic") || l.contains("not syncing"));
    let message = match panic_line {
        Some(line) => format!("the guest kernel panicked: {}", line.trim()),
        None => what,
    };
    let mut detail = String::new();
    if !qemu_stderr.trim().is_empty() {
        detail.push_str("QEMU said:\n");
        detail.push_str(qemu_stderr.trim_end());
        detail.push('\n');
    }
    if !tail.is_empty() {
        detail.push_str("console (last lines):\n");
        detail.push_str(&tail);
    }
    Error::boot(message).with_detail(detail)
}

/// A QEMU guest that booted and whose agent is ready.
pub struct QemuVm {
    name: String,
    pid: u32,
    agent: AgentClient,
    console: ConsoleLog,
    stderr: Arc<Mutex<Vec<u8>>>,
    exited: watch::Receiver<Option<std::process::ExitStatus>>,
    /// Under KVM or for a dump: what the health watcher saw (see [`crate::health`]).
    trouble: Option<watch::Receiver<Option<Trouble>>>,
    /// Where the guest's memory went when its kernel panicked, or why it went nowhere.
    dump_note: Arc<Mutex<Option<String>>>,
    detached: AtomicBool,
    timings: Vec<(&'static str, Duration)>,
    /// A guest that can be saved: its disk overlay, what the overlay is backed by, and the
    /// QMP socket to save it through.
    saveable: Option<Saveable>,
}

/// What saving a running guest needs.
#[derive(Clone, Debug)]
pub struct Saveable {
    pub overlay: PathBuf,
    pub backing: PathBuf,
    pub qmp: PathBuf,
    /// The cache whose saved guests (snapshots, checkpoints) are kept within their bound
    /// once this one is saved.
    pub cache: Cache,
}

/// How a guest comes up.
pub enum BootMode {
    /// Boot the kernel, wait for the agent, send the setup.
    Cold(GuestSetup),
    /// Boot the guest whose state a snapshot saves, with a QMP socket to save it through.
    /// Without a setup it stops at "agent ready" (a kernel-mode snapshot: before the 9p
    /// root is mounted); with one, it is set up first (an image snapshot: neutral values,
    /// replaced at each restore).
    SnapshotSource { setup: Option<GuestSetup> },
    /// Resume a saved state (`incoming` is QEMU's `-incoming` URI), then send the setup.
    Restore { incoming: String, setup: GuestSetup },
}

impl BootMode {
    fn start(&self) -> Start<'_> {
        match self {
            BootMode::Cold(_) => Start::Boot,
            BootMode::SnapshotSource { .. } => Start::SnapshotSource,
            BootMode::Restore { incoming, .. } => Start::Restore { incoming },
        }
    }
}

impl QemuVm {
    /// Start QEMU, connect to its console and agent, and prepare the guest.
    pub async fn boot(
        cmd: &QemuCommand,
        record: &mut VmRecord,
        run: &RunDir,
        mode: BootMode,
        boot_timeout: Duration,
        die_with_parent: bool,
    ) -> Result<QemuVm> {
        let t0 = Instant::now();
        let args = cmd.argv(mode.start());
        tracing::debug!("starting {}", crate::command::display(&cmd.qemu, &args));
        let mut child = spawn(cmd, &args, die_with_parent)?;
        let pid = child.id().unwrap_or(0);
        record.processes = ProcessId::of(pid).into_iter().collect();
        run.write_record(record)?;
        let stderr = collect(child.stderr.take());
        let (exit_tx, exited) = watch::channel(None);
        tokio::spawn(async move {
            let status = child.wait().await.ok();
            let _ = exit_tx
                .send(Some(status.unwrap_or_else(|| std::os::unix::process::ExitStatusExt::from_raw(0))));
        });
        let dump_note = Arc::new(Mutex::new(match &cmd.dump {
            Some(Dump::Refused(why)) => Some(why.clone()),
            _ => None,
        }));
        let dump = cmd.dump.as_ref().and_then(Dump::path).map(|path| health::DumpWatch {
            path: path.to_owned(),
            memory_bytes: cmd.memory_mib << 20,
            console_log: console_log_path(&cmd.console_socket),
            note: dump_note.clone(),
            scanned: 0,
        });
        let trouble =
            cmd.watch_qmp().map(|qmp| health::watch(pid, stderr.clone(), Some(qmp), exited.clone(), dump));

        let sockets = (&cmd.agent_socket, &cmd.console_socket);
        let connected =
            QemuVm::connect(&record.name, pid, sockets.0, sockets.1, stderr.clone(), exited, trouble).await;
        let Ok((mut vm, mut control)) = connected else {
            kill_pid(pid);
            // Give the stderr reader a moment to collect QEMU's last words.
            tokio::time::sleep(Duration::from_millis(50)).await;
            return Err(start_failure(cmd, String::from_utf8_lossy(&stderr.lock().unwrap()).into_owned()));
        };
        vm.dump_note = dump_note;
        let setup = match mode {
            BootMode::Restore { setup, .. } => {
                // The restored agent said hello before its state was saved: go straight on.
                vm.timings.push(("restore", t0.elapsed()));
                return vm.send_setup(setup, &mut control).await;
            }
            BootMode::Cold(setup) => Some(setup),
            BootMode::SnapshotSource { setup } => setup,
        };
        vm.wait_for_agent(cmd, &mut control, boot_timeout).await?;
        vm.timings.push(("boot", t0.elapsed()));
        match setup {
            Some(setup) => vm.send_setup(setup, &mut control).await,
            None => Ok(vm),
        }
    }

    /// Wait for the agent's hello, or QEMU's exit, or trouble, or the deadline. A guest that
    /// shows no agent within KVM_BOOT_DEADLINE under KVM has a broken KVM under it (a working
    /// one boots in about a second), not a slow boot.
    async fn wait_for_agent(
        &self,
        cmd: &QemuCommand,
        control: &mut ControlReceiver,
        boot_timeout: Duration,
    ) -> Result<()> {
        // A guest held for gdb waits for a person at a debugger: no deadline of ours applies.
        let held = cmd.held_for_gdb();
        let boot_timeout = if held { boot_timeout.max(Duration::from_secs(24 * 3600)) } else { boot_timeout };
        let deadline = match cmd.accel {
            Accel::Kvm if !held => boot_timeout.min(KVM_BOOT_DEADLINE),
            _ => boot_timeout,
        };
        let hello = match self.or_trouble(tokio::time::timeout(deadline, control.recv())).await {
            Ok(hello) => hello,
            Err(t) => return Err(self.trouble_error(t).await),
        };
        let hello = match hello {
            Ok(Some(GuestMessage::Hello(h))) => h,
            Ok(_) => {
                self.wait_exit(Duration::from_secs(2)).await;
                if let Some(t) = self.seen_trouble() {
                    return Err(self.trouble_error(t).await);
                }
                return Err(self.early_exit_error());
            }
            Err(_) if cmd.accel == Accel::Kvm && deadline < boot_timeout => {
                self.kill_now().await;
                let what = format!(
                    "the guest did not reach vmtest-agent within {}s under KVM",
                    KVM_BOOT_DEADLINE.as_secs()
                );
                return Err(self.trouble_error(Trouble::Accelerator(what)).await);
            }
            Err(_) => {
                self.kill_now().await;
                return Err(self.failure(format!(
                    "the guest did not reach vmtest-agent within {}; raise --boot-timeout, or check the console below",
                    vmtest_core::spec::format_duration(boot_timeout)
                )));
            }
        };
        if hello.protocol != PROTOCOL_VERSION {
            self.kill_now().await;
            return Err(Error::infra(format!(
                "vmtest-agent {} speaks protocol {}, this vmtest speaks {PROTOCOL_VERSION}; rebuild vmtest",
                hello.agent_version, hello.protocol
            )));
        }
        tracing::debug!(
            "agent ready at {} ms of guest uptime: init at {} ms, modules took {} ms (kernel {})",
            hello.uptime_ms,
            hello.init_ms,
            hello.modules_ms,
            hello.kernel_release
        );
        Ok(())
    }

    /// Send the setup (root switch, clock, network) and wait for the agent to finish it.
    async fn send_setup(mut self, setup: GuestSetup, control: &mut ControlReceiver) -> Result<QemuVm> {
        let t1 = Instant::now();
        if self.agent.send(&HostMessage::Setup(setup)).is_err() {
            if let Some(t) = self.seen_trouble() {
                return Err(self.trouble_error(t).await);
            }
            return Err(self.failure("the guest went away during setup".into()));
        }
        let done = match self.or_trouble(tokio::time::timeout(Duration::from_secs(60), control.recv())).await
        {
            Ok(done) => done,
            Err(t) => return Err(self.trouble_error(t).await),
        };
        match done {
            Ok(Some(GuestMessage::SetupDone { error: None })) => {}
            Ok(Some(GuestMessage::SetupDone { error: Some(e) })) => {
                self.kill_now().await;
                return Err(self.failure(format!("guest setup failed: {e}")));
            }
            _ => {
                self.kill_now().await;
                return Err(
                    self.failure("the guest did not finish setup (mounting the host root) within 60s".into())
                );
            }
        }
        self.timings.push(("setup", t1.elapsed()));
        Ok(self)
    }

    /// Connect to a running QEMU's console and agent sockets. `Err(())`: QEMU exited or the
    /// sockets never appeared.
    async fn connect(
        name: &str,
        pid: u32,
        agent_socket: &Path,
        console_socket: &Path,
        stderr: Arc<Mutex<Vec<u8>>>,
        exited: watch::Receiver<Option<std::process::ExitStatus>>,
        trouble: Option<watch::Receiver<Option<Trouble>>>,
    ) -> std::result::Result<(QemuVm, ControlReceiver), ()> {
        let connect = async {
            let console = connect_socket(console_socket, &exited).await?;
            let agent = connect_socket(agent_socket, &exited).await?;
            Ok::<_, ()>((console, agent))
        };
        let (console_stream, agent_stream) =
            tokio::time::timeout(Duration::from_secs(30), connect).await.map_err(|_| ())??;
        let (con_r, con_w) = console_stream.into_split();
        let console = ConsoleLog::spawn(con_r, Some(Box::new(con_w)), &console_log_path(console_socket))
            .map_err(|_| ())?;
        let (agent_r, agent_w) = agent_stream.into_split();
        let (agent, control) = AgentClient::start(agent_r, agent_w);
        let vm = QemuVm {
            name: name.to_owned(),
            pid,
            agent,
            console,
            stderr,
            exited,
            trouble,
            dump_note: Arc::default(),
            detached: AtomicBool::new(false),
            timings: Vec::new(),
            saveable: None,
        };
        Ok((vm, control))
    }

    /// Reach a kept VM from its record. The handle is detached: dropping it leaves QEMU up.
    pub async fn attach(record: &VmRecord) -> Result<QemuVm> {
        let gone = || {
            Error::usage(format!(
                "{} is not running any more; `vmtest destroy {}` cleans up",
                record.name, record.name
            ))
        };
        let process = *record.processes.first().ok_or_else(gone)?;
        if !process.is_alive() {
            return Err(gone());
        }
        let path = |key: &str| record.backend_data.get(key).and_then(|v| v.as_str()).map(PathBuf::from);
        let (Some(agent_socket), Some(console_socket)) = (path("agent_socket"), path("console_socket"))
        else {
            return Err(Error::infra(format!("the record of {} lacks its socket paths", record.name)));
        };
        // Not our child: watch the pid instead of waiting on it.
        let (exit_tx, exited) = watch::channel(None);
        tokio::spawn(async move {
            while process.is_alive() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let _ = exit_tx.send(Some(std::os::unix::process::ExitStatusExt::from_raw(0)));
        });
        let (vm, _control) = QemuVm::connect(
            &record.name,
            process.pid,
            &agent_socket,
            &console_socket,
            Arc::default(),
            exited,
            None,
        )
        .await
        .map_err(|()| {
            Error::infra(format!("cannot connect to {}: its sockets do not answer", record.name))
        })?;
        vm.detach();
        Ok(vm)
    }

    /// Make the guest saveable through `how` ([`QemuVm::save`]).
    pub fn set_saveable(&mut self, how: Saveable) {
        self.saveable = Some(how);
    }

    /// Save the running guest into `dir` ([`SavedGuest`]: its state, a copy of its disk
    /// overlay taken while it is paused, the seal) and let it go on.
    pub async fn save(&self, dir: &Path) -> Result<()> {
        let Some(how) = self.saveable.clone() else {
            return Err(Error::usage(format!(
                "{} cannot be saved: it runs on the host's root over 9p, which QEMU cannot migrate",
                self.name
            )));
        };
        let saved = SavedGuest::at(dir);
        let mut qmp = Qmp::connect(&how.qmp).await?;
        let t0 = Instant::now();
        let result = async {
            saved::migrate_to_file(&mut qmp, &saved.state()).await?;
            // Paused, its disk flushed and released: the copy matches the memory just saved.
            let (from, to) = (how.overlay.clone(), saved.disk());
            tokio::task::spawn_blocking(move || std::fs::copy(&from, &to))
                .await
                .map_err(|e| Error::infra(format!("copying the disk: {e}")))?
                .map_err(|e| Error::io(format!("cannot copy {}", how.overlay.display()), e))?;
            Ok::<(), Error>(())
        }
        .await;
        // The guest goes on whether or not the save worked.
        let resumed = qmp.execute("cont", serde_json::json!({})).await;
        result?;
        resumed
            .map_err(|e| Error::infra(format!("{} did not continue after being saved: {e}", self.name)))?;
        let backing = how.backing.clone();
        let sealed = saved.clone();
        let cache = how.cache.clone();
        tokio::task::spawn_blocking(move || {
            sealed.seal(Some(&backing))?;
            // Saved guests cannot fill a disk unnoticed (this one, not yet stored, stays).
            cache_usage::bound_snapshots(&cache, sealed.dir());
            Ok::<(), Error>(())
        })
        .await
        .map_err(|e| Error::infra(format!("sealing: {e}")))??;
        tracing::debug!("saved {} in {:?} to {}", self.name, t0.elapsed(), dir.display());
        Ok(())
    }

    /// The error for a guest that failed, with the dump's line when its kernel panicked.
    fn failure(&self, what: String) -> Error {
        let err = boot_failure(what, &self.console, &self.qemu_said());
        let note = self.dump_note.lock().unwrap().clone();
        match note {
            Some(note) if err.message().starts_with("the guest kernel panicked") => {
                let mut detail = err.detail().unwrap_or_default().to_owned();
                if !detail.is_empty() && !detail.ends_with('\n') {
                    detail.push('\n');
                }
                detail.push_str(&note);
                detail.push('\n');
                err.with_detail(detail)
            }
            _ => err,
        }
    }

    fn qemu_said(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// QEMU exited before the agent came up. A kernel panic is the guest's failure (71);
    /// QEMU failing by itself (an error, a signal, no panic in sight) is the backend's (69).
    fn early_exit_error(&self) -> Error {
        let err =
            self.failure(format!("the guest stopped before vmtest-agent came up ({})", self.exit_text()));
        let qemu_failed = matches!(*self.exited.borrow(), Some(s) if !s.success());
        if err.message().starts_with("the guest kernel panicked") || !qemu_failed {
            return err;
        }
        let said = self.qemu_said();
        let first = said.lines().next().unwrap_or("no message").trim().to_owned();
        Error::preflight(format!(
            "QEMU ended before the guest booted ({}): {first}; check the QEMU installation (`vmtest doctor`)",
            self.exit_text()
        ))
        .with_detail(err.detail().unwrap_or_default().to_owned())
    }

    /// Wait for `fut`, unless the health watcher reports trouble first.
    async fn or_trouble<F: std::future::Future>(&self, fut: F) -> std::result::Result<F::Output, Trouble> {
        let Some(rx) = &self.trouble else { return Ok(fut.await) };
        let mut rx = rx.clone();
        tokio::pin!(fut);
        let seen = tokio::select! {
            out = &mut fut => return Ok(out),
            seen = rx.wait_for(|t| t.is_some()) => seen.ok().and_then(|t| t.clone()),
        };
        match seen {
            Some(t) => Err(t),
            // The watcher ended without trouble (QEMU exited): the future tells the rest.
            None => Ok(fut.await),
        }
    }

    fn seen_trouble(&self) -> Option<Trouble> {
        self.trouble.as_ref().and_then(|rx| rx.borrow().clone())
    }

    /// The error for trouble the health watcher saw (QEMU is ended first).
    async fn trouble_error(&self, trouble: Trouble) -> Error {
        self.kill_now().await;
        self.console.wait_closed(Duration::from_millis(500)).await;
        match trouble {
            Trouble::Accelerator(what) => {
                kvm_error(what, self.failure(String::new()).detail().unwrap_or_default().to_owned())
            }
            Trouble::GuestPanicked => {
                self.failure("the guest kernel panicked (QEMU reports guest-panicked)".into())
            }
        }
    }

    fn exit_text(&self) -> String {
        match *self.exited.borrow() {
            Some(s) => format!("QEMU {s}"),
            None => "QEMU still running".into(),
        }
    }

    fn has_exited(&self) -> bool {
        self.exited.borrow().is_some()
    }

    async fn wait_exit(&self, limit: Duration) -> bool {
        let mut rx = self.exited.clone();
        let done = tokio::time::timeout(limit, rx.wait_for(|s| s.is_some())).await.is_ok();
        done
    }

    async fn kill_now(&self) {
        if !self.has_exited() {
            kill_pid(self.pid);
            self.wait_exit(Duration::from_secs(5)).await;
        }
    }

    /// An error for a command that lost its VM.
    async fn lost(&self, req_display: &str) -> Error {
        if self.wait_exit(Duration::from_secs(2)).await {
            self.console.wait_closed(Duration::from_secs(1)).await;
        }
        if let Some(t) = self.seen_trouble() {
            return self.trouble_error(t).await;
        }
        let what = format!("the VM stopped while `{req_display}` was running ({})", self.exit_text());
        self.failure(what)
    }

    /// Record a launch phase that happened outside `boot` (e.g. making a snapshot first).
    pub fn add_timing(&mut self, phase: &'static str, took: Duration) {
        self.timings.insert(0, (phase, took));
    }

    /// Record a launch phase that came after `boot` (e.g. waiting for sshd).
    pub fn add_timing_last(&mut self, phase: &'static str, took: Duration) {
        self.timings.push((phase, took));
    }

    pub fn console_log(&self) -> &ConsoleLog {
        &self.console
    }
}

async fn connect_socket(
    path: &Path,
    exited: &watch::Receiver<Option<std::process::ExitStatus>>,
) -> std::result::Result<UnixStream, ()> {
    loop {
        if let Ok(s) = UnixStream::connect(path).await {
            return Ok(s);
        }
        if exited.borrow().is_some() {
            return Err(());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Start QEMU with `args`, in its own process group (a terminal's Ctrl-C reaches vmtest,
/// which tears down) and, when `die_with_parent`, killed when vmtest dies.
fn spawn(
    cmd: &QemuCommand,
    args: &[std::ffi::OsString],
    die_with_parent: bool,
) -> Result<tokio::process::Child> {
    let mut c = tokio::process::Command::new(&cmd.qemu);
    c.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: setpgid and prctl are async-signal-safe.
    unsafe {
        c.pre_exec(move || {
            libc::setpgid(0, 0);
            if die_with_parent {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            }
            Ok(())
        });
    }
    c.spawn().map_err(|e| {
        Error::preflight(format!(
            "cannot start {}: {e}; install QEMU (apt-get install qemu-system-x86), or leave \
             VMTEST_QEMU unset and vmtest fetches the distro's QEMU",
            cmd.qemu.display()
        ))
    })
}

/// What QEMU writes on `pipe`, collected as it comes.
fn collect(pipe: Option<tokio::process::ChildStderr>) -> Arc<Mutex<Vec<u8>>> {
    let stderr = Arc::new(Mutex::new(Vec::new()));
    if let Some(mut pipe) = pipe {
        let sink = stderr.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
    }
    stderr
}

/// The error for a QEMU that exited before its sockets came up, from what it `said`.
fn start_failure(cmd: &QemuCommand, said: String) -> Error {
    if let Some(line) = crate::accel::failure_line(&said) {
        return kvm_error(line.to_owned(), said.clone());
    }
    let first = said.lines().next().unwrap_or("it exited without a message").to_owned();
    if said.contains("temporarily unavailable") {
        return Error::transient(format!("QEMU did not start: {first}"));
    }
    // QEMU itself cannot run here (bad binary, options, firmware): the backend is unusable,
    // not the guest.
    Error::preflight(format!(
        "QEMU ({}) could not start: {first}; check the QEMU installation (`vmtest doctor`)",
        cmd.qemu.display()
    ))
    .with_detail(said)
}

/// Under KVM, the longest a cold boot or restore may take to reach the agent before KVM is
/// taken to be broken. A working KVM needs about a second; a KVM that hangs real kernels is
/// normally caught by the verdict's probe (see [`crate::accel`]), so this only backs up a
/// wrong verdict, and is generous so that a busy host with a working KVM never trips it.
const KVM_BOOT_DEADLINE: Duration = Duration::from_secs(30);

/// The error for an accelerator failure: exit 69, with [`KvmFailed`] as its source so the
/// backend can fall back to TCG.
fn kvm_error(what: String, detail: String) -> Error {
    let failed = KvmFailed(what);
    Error::preflight(failed.to_string()).with_detail(detail).with_source(failed)
}

fn kill_pid(pid: u32) {
    if pid > 0 {
        // SAFETY: signalling a child we started, by pid.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}

#[async_trait]
impl Vm for QemuVm {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            network: true,
            snapshots: false,
            concurrent_exec: true,
            console: true,
            host_root: true,
        }
    }

    async fn exec(&self, req: ExecRequest) -> Result<ExecOutput> {
        let shown = req.display_argv();
        let timeout = req.timeout;
        match self.agent.exec(req).await {
            Ok(out) => Ok(out),
            Err(AgentError::TimedOut) => Err(Error::timeout(
                &format!("`{shown}` in {}", self.name),
                timeout.unwrap_or_default(),
                "raise --timeout, or find out why it hangs (--keep leaves the VM up to look)",
            )),
            Err(AgentError::Disconnected) => Err(self.lost(&shown).await),
            Err(AgentError::Refused(e)) => Err(Error::infra(e)),
        }
    }

    async fn copy_in(&self, host: &Path, guest: &Path) -> Result<()> {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::PermissionsExt;
        let data =
            std::fs::read(host).map_err(|e| Error::usage(format!("cannot read {}: {e}", host.display())))?;
        let mode = std::fs::metadata(host).map(|m| m.permissions().mode() & 0o7777).unwrap_or(0o644);
        self.agent.write_file(guest.as_os_str().as_bytes(), mode, &data).await.map_err(|e| match e {
            AgentError::Refused(why) => {
                Error::infra(format!("cannot write {} in {}: {why}", guest.display(), self.name))
            }
            _ => Error::infra(format!("lost {} while copying {} in", self.name, host.display())),
        })
    }

    async fn copy_out(&self, guest: &Path, host: &Path) -> Result<()> {
        use std::os::unix::ffi::OsStrExt;
        let data = self.agent.read_file(guest.as_os_str().as_bytes()).await.map_err(|e| match e {
            AgentError::Refused(why) => {
                Error::infra(format!("cannot read {} in {}: {why}", guest.display(), self.name))
            }
            _ => Error::infra(format!("lost {} while copying {} out", self.name, guest.display())),
        })?;
        std::fs::write(host, data).map_err(|e| Error::io(format!("cannot write {}", host.display()), e))
    }

    fn console(&self) -> Result<Box<dyn Console>> {
        Ok(Box::new(self.console.handle()))
    }

    async fn shutdown(&self) -> Result<()> {
        if self.has_exited() {
            return Ok(());
        }
        let _ = self.agent.send(&HostMessage::Shutdown);
        if !self.wait_exit(Duration::from_secs(5)).await {
            tracing::debug!("{} did not power off in 5s; killing QEMU", self.name);
            self.kill_now().await;
        }
        Ok(())
    }

    async fn kill(&self) -> Result<()> {
        self.kill_now().await;
        Ok(())
    }

    fn detach(&self) {
        self.detached.store(true, Ordering::SeqCst);
    }

    async fn prepare_interactive_console(&self) -> Result<()> {
        // Kernel mode runs no getty: put a root shell on the serial port, as its session's
        // controlling terminal (so Ctrl-C works), unless one is already there.
        // The exec returns only once the shell is up: ending it earlier can take the
        // half-started shell down with it.
        let script = "m=/run/vmtest-serial-shell; [ -e $m ] && exit 0; \
            setsid -f -c sh -c 'touch /run/vmtest-serial-shell; sh -i; rm -f /run/vmtest-serial-shell' \
                </dev/ttyS0 >/dev/ttyS0 2>&1; \
            i=0; while [ ! -e $m ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done; sleep 0.2; [ -e $m ]";
        let mut req = ExecRequest::shell(script);
        req.timeout = Some(Duration::from_secs(30));
        let out = self.exec(req).await?;
        if !out.status.success() {
            return Err(Error::infra(format!(
                "cannot start a shell on the serial console: {}",
                out.stderr_lossy().trim()
            )));
        }
        Ok(())
    }

    fn boot_timings(&self) -> Vec<(&'static str, Duration)> {
        self.timings.clone()
    }

    fn kernel_log(&self) -> Option<Box<dyn Console>> {
        Some(Box::new(self.console.handle()))
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        if !self.detached.load(Ordering::SeqCst) && !self.has_exited() {
            kill_pid(self.pid);
        }
    }
}

/// The console log next to a VM's console socket.
fn console_log_path(console_socket: &Path) -> PathBuf {
    console_socket.parent().unwrap_or(Path::new("/")).join("console.log")
}

/// The per-VM socket paths inside its directory.
pub fn socket_paths(vm_dir: &Path) -> (PathBuf, PathBuf) {
    (vm_dir.join("agent.sock"), vm_dir.join("console.sock"))
}
