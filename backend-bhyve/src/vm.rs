//! One bhyve guest: the clone, the bhyve process (watched), the console, the serial shell.

use crate::config::{Config, Flavor, ShareMode};
use crate::teardown::{self, vnic_name};
use crate::{dev_path, wait_for_device, BhyveData, ConsoleKind, HOST_TIMEOUT};
use async_trait::async_trait;
use regex::bytes::Regex;
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use vmtest_core::console::{Console, ConsoleLog};
use vmtest_core::exec::{ExecOutput, ExecRequest};
use vmtest_core::shell::{self, Login, ShellOptions, ShellSession};
use vmtest_core::spec::{format_duration, VmSpec};
use vmtest_core::state::{ProcessId, RunDir, StateDir, VmRecord};
use vmtest_core::{Capabilities, Error, ErrorKind, Result, Vm};

/// What bhyve's exit status means (both flavors).
pub fn exit_meaning(code: i32) -> &'static str {
    match code {
        0 => "the guest rebooted",
        1 => "the guest powered off",
        2 => "the guest halted",
        3 => "triple fault",
        4 => "bhyve error",
        _ => "killed",
    }
}

/// The exit status of a bhyve that is not our child (an attached VM): unknown.
const EXIT_UNKNOWN: i32 = -1;

/// "bhyve exited with status N (meaning)", or just "bhyve exited" when the status is unknown.
fn bhyve_exit(code: i32) -> String {
    if code == EXIT_UNKNOWN {
        "bhyve exited".to_owned()
    } else {
        format!("bhyve exited with status {code} ({})", exit_meaning(code))
    }
}

/// How long logging in again on a kept VM's console may take.
const RELOGIN_TIMEOUT: Duration = Duration::from_secs(120);

/// Host directories whose programs are assumed to exist in the guest too.
const SYSTEM_DIRS: &[&str] = &["/bin/", "/sbin/", "/usr/", "/lib/", "/lib64/", "/etc/", "/opt/", "/nix/"];

pub struct BhyveVm {
    name: String,
    cfg: Config,
    data: BhyveData,
    run: RunDir,
    node: String,
    vm_dir: PathBuf,
    console: ConsoleLog,
    /// Closes our end of the console when this handle goes (even while handles live on).
    gate: Arc<Gate>,
    /// The serial shell; `None` until an attached VM first needs one.
    shell: tokio::sync::Mutex<Option<ShellSession>>,
    network: bool,
    exited: watch::Receiver<Option<i32>>,
    detached: AtomicBool,
    torn_down: Arc<AtomicBool>,
    timings: Vec<(&'static str, Duration)>,
}

/// The open/closed state shared by a [`Gated`] reader and its VM handle.
#[derive(Default)]
pub struct Gate {
    closed: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Gate {
    /// End the reader: the console log's pump sees end of stream and lets go of the console.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        if let Some(w) = self.waker.lock().unwrap().take() {
            w.wake();
        }
    }
}

/// A console reader that ends when its [`Gate`] closes, so dropping a VM handle gives the
/// console back (the nmdm B side, or illumos bhyve's single console client slot).
pub struct Gated<R> {
    inner: R,
    gate: Arc<Gate>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Gated<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.gate.closed.load(Ordering::SeqCst) {
            return Poll::Ready(Ok(()));
        }
        *self.gate.waker.lock().unwrap() = Some(cx.waker().clone());
        if self.gate.closed.load(Ordering::SeqCst) {
            return Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

/// Open the console (FreeBSD: the nmdm B side, raw, itself as root or else through the
/// privilege prefix, as nmdm nodes are root's; illumos: bhyve's console socket) and tee it to
/// `log_path` (appended).
async fn open_console(data: &BhyveData, log_path: &Path, gate: &Arc<Gate>) -> std::io::Result<ConsoleLog> {
    type R = Box<dyn AsyncRead + Send + Unpin>;
    type W = Box<dyn AsyncWrite + Send + Unpin>;
    let (r, w): (R, W) = match &data.console {
        ConsoleKind::Socket { path } => {
            let (r, w) = tokio::net::UnixStream::connect(path).await?.into_split();
            (Box::new(r), Box::new(w))
        }
        ConsoleKind::Nmdm { b, .. } if data.host.privilege.program().is_some() => {
            let (r, w) = crate::tty::open_privileged(&data.host, &dev_path(&data.devroot, b)).await?;
            (Box::new(r), Box::new(w))
        }
        ConsoleKind::Nmdm { b, .. } => {
            let (r, w) = crate::tty::open_raw(&dev_path(&data.devroot, b))?;
            (Box::new(r), Box::new(w))
        }
    };
    ConsoleLog::spawn(Gated { inner: r, gate: gate.clone() }, Some(w), log_path)
        .map_err(|e| std::io::Error::other(e.message().to_owned()))
}

/// A shell on the console of a guest that is already up, set up by an earlier vmtest: resume
/// the prepared shell, or log in again when the console shows a login prompt.
pub async fn reattach_shell(console: &ConsoleLog, login: &Login, name: &str) -> Result<ShellSession> {
    let closed = |e: Error| {
        Error::infra(format!(
            "the serial console of {name} closed ({}); another client may hold it (a `vmtest console`?)",
            e.message()
        ))
        .with_detail(console.tail(20))
    };
    // A CR: a getty prints a fresh `login:`, a prepared shell (no prompt, no echo) prints
    // nothing, an interactive one its prompt. From the start: on FreeBSD a prompt printed
    // while nobody read the nmdm is waiting there already.
    let what = Regex::new(r"ogin: *$|[#$%>] *$").unwrap();
    let mut probe = console.handle_from_start();
    probe.send(b"\r").await?;
    let seen = match probe.wait_for(&what, Duration::from_secs(1)).await {
        Ok(s) => s,
        Err(e) if e.kind() == ErrorKind::Timeout => String::new(),
        Err(e) => return Err(closed(e)),
    };
    if seen.contains("ogin") {
        tracing::debug!("{name}: the console shows a login prompt; logging in again");
        let mut h = console.handle();
        h.send(b"\r").await?;
        let opts = ShellOptions {
            login: Some(login.clone()),
            exec_sh: true,
            ready_timeout: RELOGIN_TIMEOUT,
            nudge_every: Duration::from_secs(1),
        };
        return ShellSession::start(Box::new(h), opts).await;
    }
    match ShellSession::resume(Box::new(console.handle()), Duration::from_secs(5)).await {
        Ok(s) => return Ok(s),
        Err(e) if e.kind() == ErrorKind::Timeout => {}
        Err(e) => return Err(closed(e)),
    }
    // Something holds the shell (a command, or a here-document a killed vmtest left open):
    // interrupt it once, end any here-document, and try again.
    tracing::debug!("{name}: the shell does not answer; sending Ctrl-C");
    let mut h = console.handle();
    h.send(b"\x03").await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.send(b"\nVMT_EOF\n").await?;
    ShellSession::resume(Box::new(h), Duration::from_secs(10)).await.map_err(|e| {
        if e.kind() == ErrorKind::Timeout {
            Error::infra(format!(
                "the serial console of {name} shows neither a shell nor a login prompt; look at it with \
                 `vmtest console {name}`"
            ))
            .with_detail(console.tail(30))
        } else {
            closed(e)
        }
    })
}

/// Where a record's run dir is: next to its VM dir, else under the state dir.
fn run_dir_of(record: &VmRecord) -> Option<RunDir> {
    let near = record.paths.first().and_then(|p| p.parent()?.parent().map(StateDir::at));
    near.into_iter()
        .chain([StateDir::from_env()])
        .find_map(|s| s.runs().into_iter().find(|r| r.id() == record.run_id))
}

async fn wait_exit(rx: &mut watch::Receiver<Option<i32>>) -> i32 {
    loop {
        if let Some(c) = *rx.borrow_and_update() {
            return c;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

fn read_lossy(p: &Path) -> String {
    std::fs::read(p).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
}

impl BhyveVm {
    pub(crate) async fn launch(
        cfg: Config,
        flavor: Flavor,
        image: String,
        spec: VmSpec,
        run: RunDir,
    ) -> Result<BhyveVm> {
        let vm = spec.name.clone();
        let vm_dir = run.vm_dir(&spec.node)?;
        let console = match flavor {
            Flavor::FreeBsd => {
                ConsoleKind::Nmdm { a: format!("/dev/nmdm-{vm}.1A"), b: format!("/dev/nmdm-{vm}.1B") }
            }
            Flavor::Illumos => ConsoleKind::Socket { path: vm_dir.join("console.sock") },
        };
        let share = (cfg.share == ShareMode::P9kp).then(|| vm_dir.join("share"));
        let mut data = BhyveData {
            flavor,
            pool: cfg.pool.clone(),
            image: image.clone(),
            dataset: format!("{}/{vm}", cfg.run_dataset(run.id())),
            vm: vm.clone(),
            host: cfg.host.clone(),
            devroot: cfg.devroot.clone(),
            console,
            tap: None,
            vnic: (flavor == Flavor::Illumos && cfg.nic.is_some()).then(|| vnic_name(run.id(), &spec.node)),
            pid: None,
            share: share.clone(),
            stop_grace_ms: cfg.stop_grace.as_millis() as u64,
            retries: cfg.retries,
            retry_pause_ms: cfg.retry_pause.as_millis() as u64,
        };
        let mut record = VmRecord::new(&vm, &spec.node, run.id(), "bhyve");
        record.paths.push(vm_dir.clone());
        record.backend_data = serde_json::to_value(&data).expect("serializes");
        run.write_record(&record)?;

        match Self::boot(&cfg, &mut data, &mut record, &spec, &run, &vm_dir, share).await {
            Ok(v) => Ok(v),
            Err(e) => {
                let d = data.clone();
                let name = vm.clone();
                let r = tokio::task::spawn_blocking(move || teardown::destroy(&name, &d)).await;
                match r {
                    Ok(Ok(())) => run.remove_record(&spec.node),
                    Ok(Err(t)) => tracing::warn!("{t}"),
                    Err(_) => {}
                }
                Err(e)
            }
        }
    }

    async fn boot(
        cfg: &Config,
        data: &mut BhyveData,
        record: &mut VmRecord,
        spec: &VmSpec,
        run: &RunDir,
        vm_dir: &Path,
        share: Option<PathBuf>,
    ) -> Result<BhyveVm> {
        let t0 = Instant::now();
        // Host preparation: clone, device, stale VM, links.
        {
            let cfg = cfg.clone();
            let mut d = data.clone();
            let run_id = run.id().to_owned();
            let memory_mib = spec.memory_mib;
            *data =
                tokio::task::spawn_blocking(move || prepare(&cfg, &mut d, &run_id, memory_mib).map(|_| d))
                    .await
                    .map_err(|e| Error::infra(format!("launch panicked: {e}")))??;
            record.backend_data = serde_json::to_value(&*data).expect("serializes");
            run.write_record(record)?;
        }
        if let Some(s) = &share {
            std::fs::create_dir_all(s).map_err(|e| Error::io(format!("cannot create {}", s.display()), e))?;
        }
        let t_clone = t0.elapsed();

        // bhyve itself.
        let args = bhyve_args(cfg, data, spec, share.as_deref());
        let argv = cfg.host.argv("bhyve", &args, true)?;
        tracing::debug!("starting {}", vmtest_core::exec::display_argv(&argv));
        let err_path = vm_dir.join("bhyve.err");
        let out_file = std::fs::File::create(vm_dir.join("bhyve.out"))
            .map_err(|e| Error::io("cannot create bhyve.out", e))?;
        let err_file =
            std::fs::File::create(&err_path).map_err(|e| Error::io("cannot create bhyve.err", e))?;
        let mut cmd = std::process::Command::new(&argv[0]);
        cmd.args(&argv[1..]).stdin(std::process::Stdio::null()).stdout(out_file).stderr(err_file);
        // SAFETY: setpgid is async-signal-safe. Its own group: a terminal's Ctrl-C reaches vmtest,
        // which tears down in order.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::setpgid(0, 0);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::preflight(format!("cannot start bhyve: {e}; check VMTEST_PRIV and PATH")))?;
        let pid = child.id();
        data.pid = Some(ProcessId::of(pid).unwrap_or(ProcessId { pid, start_time: 0 }));
        record.processes = data.pid.into_iter().collect();
        record.backend_data = serde_json::to_value(&*data).expect("serializes");
        run.write_record(record)?;
        let (tx, mut exited) = watch::channel(None);
        std::thread::spawn(move || {
            let code = child.wait().ok().map(|s| {
                use std::os::unix::process::ExitStatusExt;
                s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
            });
            let _ = tx.send(Some(code.unwrap_or(255)));
        });

        let boot_failure = |code: i32, console: Option<&ConsoleLog>| {
            let said = read_lossy(&err_path);
            let first = said.lines().find(|l| !l.trim().is_empty()).unwrap_or("no message on stderr").trim();
            let mut detail = format!("bhyve said:\n{}", said.trim_end());
            if let Some(c) = console {
                detail.push_str(&format!("\nconsole (last lines):\n{}", c.tail(30)));
            }
            Error::boot(format!(
                "bhyve exited with status {code} ({}) before {} was ready: {first}",
                exit_meaning(code),
                spec.name
            ))
            .with_detail(detail)
        };

        // The console: connect at once (illumos drops output while no client is connected).
        let log_path = vm_dir.join("console.log");
        let gate = Arc::new(Gate::default());
        let connect = async {
            loop {
                match open_console(data, &log_path, &gate).await {
                    Ok(log) => return log,
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        };
        let console = tokio::select! {
            c = tokio::time::timeout(Duration::from_secs(30), connect) => c.map_err(|_| {
                Error::boot(format!("the console of {} did not appear within 30s", spec.name))
                    .with_detail(read_lossy(&err_path))
            })?,
            code = wait_exit(&mut exited) => return Err(boot_failure(code, None)),
        };

        // Log in and get a shell.
        let opts = ShellOptions {
            login: Some(cfg.login()),
            exec_sh: true,
            ready_timeout: spec.boot_timeout,
            ..ShellOptions::default()
        };
        let start = ShellSession::start(Box::new(console.handle_from_start()), opts);
        let mut shell = tokio::select! {
            s = start => s.map_err(|e| match e.kind() {
                ErrorKind::Timeout => Error::boot(format!(
                    "{} gave no shell on its serial console within {}; check the image's getty and the \
                     login (VMTEST_BHYVE_USER, VMTEST_BHYVE_PASSWORD)",
                    spec.name,
                    format_duration(spec.boot_timeout)
                ))
                .with_detail(console.tail(30)),
                _ => e,
            })?,
            code = wait_exit(&mut exited) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                return Err(boot_failure(code, Some(&console)));
            }
        };
        // Every clone carries the image's hostname: name the guest after its node, as falcon does.
        let mut script = b"hostname ".to_vec();
        script.extend_from_slice(&shell::sh_quote(spec.node.as_bytes()));
        script.push(b'\n');
        let out = shell.run(&script, None, None).await?;
        if out.status != 0 {
            tracing::warn!(
                "could not set the hostname of {} to {}: {}",
                spec.name,
                spec.node,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let timings = vec![("clone", t_clone), ("boot", t0.elapsed() - t_clone)];
        tracing::info!("{} is up ({} flavor, image {})", spec.name, data.flavor.name(), data.image);
        Ok(BhyveVm {
            name: spec.name.clone(),
            cfg: cfg.clone(),
            data: data.clone(),
            run: run.clone(),
            node: spec.node.clone(),
            vm_dir: vm_dir.to_owned(),
            console,
            gate,
            shell: tokio::sync::Mutex::new(Some(shell)),
            network: cfg.nic.is_some(),
            exited,
            detached: AtomicBool::new(false),
            torn_down: Arc::new(AtomicBool::new(false)),
            timings,
        })
    }

    /// Reach a VM that outlived its runner (`--keep`) from its record: reconnect to its
    /// console (teed to the run dir's `console.log`) and watch its bhyve. The serial shell is
    /// taken over on first use. The handle is detached: dropping it leaves the VM running.
    pub(crate) async fn attach(cfg: Config, record: &VmRecord) -> Result<BhyveVm> {
        let data = BhyveData::from_record(record)?;
        let name = record.name.clone();
        // A serial console has one reader: a second one would steal the runner's output.
        if !record.kept && record.owner.is_alive() {
            return Err(Error::usage(format!(
                "{name} is in use by vmtest pid {} ({}); its console has room for one client: wait for it, \
                 or run it with --keep",
                record.owner.pid, record.owner_command
            )));
        }
        let gone = |why: String| {
            Error::usage(format!("{name} is not running any more ({why}); `vmtest destroy {name}` cleans up"))
        };
        let pid = data
            .pid
            .or_else(|| record.processes.first().copied())
            .ok_or_else(|| gone("its bhyve was never started".into()))?;
        if !teardown::alive(&pid) {
            return Err(gone(format!("bhyve, pid {}, has exited", pid.pid)));
        }
        let vmm = dev_path(&data.devroot, &format!("/dev/vmm/{}", data.vm));
        if vmm.parent().is_some_and(Path::is_dir) && !vmm.exists() {
            return Err(gone(format!("the kernel VM {} is destroyed", data.vm)));
        }
        let run = run_dir_of(record).ok_or_else(|| {
            Error::infra(format!(
                "the run dir {} of {name} is gone; `vmtest destroy {name}` cleans up",
                record.run_id
            ))
        })?;
        let vm_dir = run.vm_dir(&record.node)?;
        let log_path = vm_dir.join("console.log");

        // illumos bhyve takes one console client and closes any other at once; the previous
        // vmtest's may not be noticed gone yet. Retry for a moment before calling it taken.
        let deadline = Instant::now() + Duration::from_secs(3);
        let (console, gate) = loop {
            let gate = Arc::new(Gate::default());
            let log = open_console(&data, &log_path, &gate).await.map_err(|e| {
                let where_ = match &data.console {
                    ConsoleKind::Nmdm { b, .. } => b.clone(),
                    ConsoleKind::Socket { path } => path.display().to_string(),
                };
                if !teardown::alive(&pid) {
                    gone(format!("bhyve, pid {}, has exited", pid.pid))
                } else {
                    Error::infra(format!("cannot open the console of {name} ({where_}): {e}"))
                }
            })?;
            if matches!(data.console, ConsoleKind::Nmdm { .. }) {
                break (log, gate);
            }
            let mut h = log.handle();
            // bhyve closes a second client at once; give a loaded host time to do it.
            match tokio::time::timeout(Duration::from_millis(500), h.read()).await {
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(None) => {
                    return Err(Error::infra(format!(
                        "bhyve closed the console connection of {name} at once: another client holds it \
                         (a `vmtest console {name}`, or `nc -U`); leave that first"
                    )))
                }
                _ => break (log, gate),
            }
        };

        // Not our child: watch its pid.
        let (tx, exited) = watch::channel(None);
        tokio::spawn(async move {
            while teardown::alive(&pid) {
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let _ = tx.send(Some(EXIT_UNKNOWN));
        });
        tracing::debug!("attached to {name} ({} flavor)", data.flavor.name());
        Ok(BhyveVm {
            name: name.clone(),
            network: data.tap.is_some() || data.vnic.is_some(),
            cfg,
            data,
            run,
            node: record.node.clone(),
            vm_dir,
            console,
            gate,
            shell: tokio::sync::Mutex::new(None),
            exited,
            detached: AtomicBool::new(true),
            torn_down: Arc::new(AtomicBool::new(false)),
            timings: Vec::new(),
        })
    }

    /// The serial shell, taking it over first on an attached VM.
    async fn shell<'a>(&self, slot: &'a mut Option<ShellSession>) -> Result<&'a mut ShellSession> {
        if slot.is_none() {
            let mut exited = self.exited.clone();
            let login = self.cfg.login();
            let s = tokio::select! {
                s = reattach_shell(&self.console, &login, &self.name) => s?,
                code = wait_exit(&mut exited) => {
                    return Err(Error::infra(format!("{} is gone: {}", self.name, bhyve_exit(code))))
                }
            };
            *slot = Some(s);
        }
        Ok(slot.as_mut().expect("just set"))
    }

    /// The recorded teardown parameters.
    pub fn data(&self) -> &BhyveData {
        &self.data
    }

    pub fn console_log(&self) -> &ConsoleLog {
        &self.console
    }

    fn vm_gone(&self) -> Option<i32> {
        *self.exited.borrow()
    }

    async fn copy_in_locked(&self, shell: &mut ShellSession, host: &Path, guest: &[u8]) -> Result<()> {
        let data = std::fs::read(host)
            .map_err(|e| Error::usage(format!("cannot read {} to copy it in: {e}", host.display())))?;
        let mode = std::fs::metadata(host)
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
            .unwrap_or(0o644);
        match &self.data.share {
            Some(share) => self.copy_via_9p(shell, share, host, &data, guest, mode).await,
            None => shell.write_file(guest, &data, mode, None).await,
        }
    }

    /// Stage the file in the 9p share, `p9kp pull` it in the guest, move it, check it.
    async fn copy_via_9p(
        &self,
        shell: &mut ShellSession,
        share: &Path,
        host: &Path,
        data: &[u8],
        guest: &[u8],
        mode: u32,
    ) -> Result<()> {
        // The share holds exactly the one file being copied: `p9kp pull` copies it all.
        let _ = std::fs::remove_dir_all(share);
        std::fs::create_dir_all(share)
            .map_err(|e| Error::io(format!("cannot create {}", share.display()), e))?;
        let staged = share.join("f");
        std::fs::write(&staged, data)
            .map_err(|e| Error::io(format!("cannot stage {}", host.display()), e))?;
        let g = shell::sh_quote(guest);
        let mut script =
            b"set -e\nt=$(mktemp -d)\ncd \"$t\"\np9kp pull\nmkdir -p -- \"$(dirname -- ".to_vec();
        script.extend_from_slice(&g);
        script.extend_from_slice(b")\"\nmv -f \"$t/f\" ");
        script.extend_from_slice(&g);
        script.extend_from_slice(format!("\nchmod {mode:o} ").as_bytes());
        script.extend_from_slice(&g);
        script.extend_from_slice(b"\ncd /\nrm -rf \"$t\"\ncksum <");
        script.extend_from_slice(&g);
        script.push(b'\n');
        let out = shell.run(&script, None, None).await?;
        let _ = std::fs::remove_file(&staged);
        let shown = String::from_utf8_lossy(guest).into_owned();
        if out.status != 0 {
            return Err(Error::infra(format!(
                "copy of {} to {shown} through the 9p share failed (status {}): {}; set VMTEST_BHYVE_SHARE=serial \
                 if the image has no p9kp",
                host.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let want = format!("{} {}", shell::cksum(data), data.len());
        let got =
            String::from_utf8_lossy(&out.stdout).split_whitespace().take(2).collect::<Vec<_>>().join(" ");
        if got != want {
            return Err(Error::transient(format!(
                "copy of {} to {shown} arrived damaged (cksum `{got}`, expected `{want}`); try again",
                host.display()
            )));
        }
        Ok(())
    }

    fn teardown_job(&self, grace_ms: u64) -> impl FnOnce() -> Result<()> + Send + 'static {
        let torn_down = self.torn_down.clone();
        let mut d = self.data.clone();
        d.stop_grace_ms = grace_ms;
        let name = self.name.clone();
        let run = self.run.clone();
        let node = self.node.clone();
        move || {
            if torn_down.swap(true, Ordering::SeqCst) {
                return Ok(());
            }
            let r = teardown::destroy(&name, &d);
            if r.is_ok() {
                run.remove_record(&node);
            }
            r
        }
    }

    async fn teardown(&self, grace_ms: u64) -> Result<()> {
        if self.torn_down.load(Ordering::SeqCst) {
            return Ok(());
        }
        // The steps block on host tools; keep them off the async workers.
        tokio::task::spawn_blocking(self.teardown_job(grace_ms))
            .await
            .map_err(|e| Error::infra(format!("teardown panicked: {e}")))?
    }
}

/// Everything between "image exists" and "start bhyve": clone (sized), device, stale VM, NIC,
/// and the loader of a FreeBSD guest without firmware.
fn prepare(cfg: &Config, data: &mut BhyveData, run_id: &str, memory_mib: u64) -> Result<()> {
    let h = &cfg.host;
    let flavor = data.flavor;
    let base = format!("{}@base", cfg.image_dataset(&data.image));
    let out = h.run("zfs", &["list", "-H", "-o", "name", &base], HOST_TIMEOUT)?;
    if !out.success() {
        return Err(if out.message().contains("dataset does not exist") {
            Error::usage(format!(
                "bhyve image `{}` is not imported (zfs: {}); run `vmtest image import --backend bhyve FILE {}`",
                data.image,
                out.message(),
                data.image
            ))
        } else {
            Error::infra(format!("`zfs list {base}` failed: {}", out.message()))
        });
    }
    let owner = format!("vmtest:owner={run_id}");
    let mut args = vec!["clone", "-p", "-o", &owner];
    if flavor == Flavor::FreeBsd {
        args.extend_from_slice(flavor.zvol_options());
    }
    args.push(&base);
    args.push(&data.dataset);
    let out = h.run("zfs", &args, HOST_TIMEOUT)?;
    if !out.success() {
        let msg = out.message();
        return Err(if msg.contains("dataset already exists") || msg.contains("busy") {
            Error::transient(format!(
                "`zfs clone` to {} failed: {msg} (a leftover; it is swept first)",
                data.dataset
            ))
        } else {
            Error::infra(format!("`zfs clone {base} {}` failed: {msg}", data.dataset))
        });
    }
    size_clone(cfg, &data.dataset)?;
    let dev = flavor.zvol_path(&data.dataset);
    if !wait_for_device(&dev_path(&data.devroot, &dev), Duration::from_secs(30)) {
        return Err(Error::transient(format!("the zvol device {dev} did not appear within 30s; try again")));
    }
    // A VM of the same name left in the kernel would make bhyve reuse it.
    let arg = format!("--vm={}", data.vm);
    let _ = h.run("bhyvectl", &[&arg, "--destroy"], HOST_TIMEOUT)?;
    if let Some(link) = &cfg.nic {
        match flavor {
            Flavor::FreeBsd if link != "slirp" => {
                let out = h.check("ifconfig", &["tap", "create"], HOST_TIMEOUT)?;
                let tap = out
                    .stdout
                    .split_whitespace()
                    .find(|w| {
                        w.starts_with("tap") && w[3..].chars().all(|c| c.is_ascii_digit()) && w.len() > 3
                    })
                    .ok_or_else(|| {
                        Error::infra(format!("`ifconfig tap create` printed no tap name: {}", out.stdout))
                    })?
                    .to_owned();
                data.tap = Some(tap.clone());
                let desc = format!("vmtest:{run_id}:{}", data.vm);
                h.check("ifconfig", &[&tap, "description", &desc], HOST_TIMEOUT)?;
                h.check("ifconfig", &[link, "addm", &tap], HOST_TIMEOUT)?;
                // A created tap is down (unless net.link.tap.up_on_open=1): no traffic at all.
                h.check("ifconfig", &[&tap, "up"], HOST_TIMEOUT)?;
            }
            Flavor::FreeBsd => {}
            Flavor::Illumos => {
                let vnic = data.vnic.clone().expect("set with the NIC");
                let out = h.run("dladm", &["create-vnic", "-t", "-l", link, &vnic], HOST_TIMEOUT)?;
                if !out.success() {
                    let msg = out.message();
                    return Err(if msg.contains("busy") || msg.contains("already exists") {
                        Error::transient(format!("`dladm create-vnic {vnic}` failed: {msg}"))
                    } else {
                        Error::infra(format!(
                            "`dladm create-vnic -t -l {link} {vnic}` failed: {msg}; check VMTEST_BHYVE_NIC"
                        ))
                    });
                }
            }
        }
    }
    if cfg.bootrom.is_none() {
        bhyveload(cfg, data, memory_mib)?;
    }
    Ok(())
}

/// The clone starts as the image's copy: grow it to the configured disk size (never shrink:
/// that would cut the image's filesystem), and skip sync writes, as falcon does for test VMs.
fn size_clone(cfg: &Config, dataset: &str) -> Result<()> {
    let h = &cfg.host;
    let out = h.check("zfs", &["get", "-Hp", "-o", "value", "volsize", dataset], HOST_TIMEOUT)?;
    let now: u64 = out.stdout.trim().parse().map_err(|_| {
        Error::infra(format!("`zfs get volsize {dataset}` printed `{}`, not a size", out.stdout.trim()))
    })?;
    if cfg.disk_bytes > now {
        let size = format!("volsize={}", cfg.disk_bytes);
        h.check("zfs", &["set", &size, dataset], HOST_TIMEOUT)?;
    }
    h.check("zfs", &["set", "sync=disabled", dataset], HOST_TIMEOUT)?;
    Ok(())
}

/// FreeBSD without firmware: `bhyveload` loads the guest's kernel into the VM first (bhyve
/// alone exits 4, "virtual machine cannot be booted").
fn bhyveload(cfg: &Config, data: &BhyveData, memory_mib: u64) -> Result<()> {
    let mem = format!("{memory_mib}M");
    let disk = data.flavor.zvol_path(&data.dataset);
    let out = cfg.host.run(
        "bhyveload",
        &["-c", "stdio", "-m", &mem, "-d", &disk, "-e", "autoboot_delay=0", &data.vm],
        HOST_TIMEOUT,
    )?;
    if !out.success() {
        return Err(Error::boot(format!(
            "`bhyveload` could not load {} from {disk} (status {:?}): {}; is it a FreeBSD image? Other guests \
             need UEFI firmware (VMTEST_BHYVE_BOOTROM)",
            data.vm,
            out.code,
            out.message().lines().last().unwrap_or_default()
        ))
        .with_detail(format!("{}{}", out.stdout, out.stderr)));
    }
    Ok(())
}

/// The bhyve command line (reference (b)).
pub fn bhyve_args(cfg: &Config, data: &BhyveData, spec: &VmSpec, share: Option<&Path>) -> Vec<String> {
    let mut a: Vec<String> = vec!["-H".into()];
    if data.flavor == Flavor::FreeBsd {
        a.push("-P".into());
    }
    a.extend([
        "-c".into(),
        spec.cpus.to_string(),
        "-m".into(),
        format!("{}M", spec.memory_mib),
        "-s".into(),
        "0,hostbridge".into(),
        "-s".into(),
        "1,lpc".into(),
        "-s".into(),
        format!("2,virtio-blk,{}", data.flavor.zvol_path(&data.dataset)),
    ]);
    match (data.flavor, &cfg.nic) {
        (Flavor::FreeBsd, Some(n)) if n == "slirp" => {
            a.extend(["-s".into(), "3,virtio-net,slirp".into()]);
        }
        (Flavor::FreeBsd, Some(_)) => {
            if let Some(tap) = &data.tap {
                a.extend(["-s".into(), format!("3,virtio-net,{tap}")]);
            }
        }
        (Flavor::Illumos, Some(_)) => {
            if let Some(vnic) = &data.vnic {
                a.extend(["-s".into(), format!("3,virtio-net-viona,vnic={vnic}")]);
            }
        }
        (_, None) => {}
    }
    if let Some(s) = share {
        a.extend(["-s".into(), format!("4,virtio-9p,vmtest={},ro", s.display())]);
    }
    let con = match &data.console {
        ConsoleKind::Nmdm { a, .. } => format!("com1,{a}"),
        ConsoleKind::Socket { path } => format!("com1,socket,{}", path.display()),
    };
    a.extend(["-l".into(), con]);
    if let Some(rom) = &cfg.bootrom {
        a.extend(["-l".into(), format!("bootrom,{rom}")]);
    }
    a.push(data.vm.clone());
    a
}

/// How to reach a kept VM, for the CLI to print.
pub fn keep_instructions(record: &VmRecord) -> String {
    let Ok(d) = BhyveData::from_record(record) else { return String::new() };
    let prefix = d.host.privilege.program().map(|p| format!("{p} ")).unwrap_or_default();
    let console = match &d.console {
        ConsoleKind::Nmdm { b, .. } => format!("{prefix}cu -l {b}"),
        ConsoleKind::Socket { path } => format!("{prefix}nc -U {}", path.display()),
    };
    format!(
        "VM {} is still running (dataset {}).\n  console: {console}\n  exec:    vmtest exec {} -- CMD\n  destroy: \
         vmtest destroy {}",
        record.name, d.dataset, record.name, record.name
    )
}

#[async_trait]
impl Vm for BhyveVm {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            network: self.network,
            snapshots: false,
            concurrent_exec: false,
            console: true,
            host_root: false,
        }
    }

    async fn exec(&self, mut req: ExecRequest) -> Result<ExecOutput> {
        if let Some(code) = self.vm_gone() {
            return Err(Error::infra(format!("{} is gone: {}", self.name, bhyve_exit(code))));
        }
        let mut slot = self.shell.lock().await;
        let shell = self.shell(&mut slot).await?;
        let mut fallback = b"/".to_vec();
        if let Some(prog) = req.argv.first().map(PathBuf::from) {
            let s = prog.to_string_lossy().into_owned();
            let host_file =
                s.contains('/') && prog.is_file() && !SYSTEM_DIRS.iter().any(|d| s.starts_with(d));
            if self.cfg.copy_program && host_file {
                let base = prog.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let guest = format!("{}/{base}", self.cfg.bay);
                tracing::debug!("copying {} into the guest at {guest}", prog.display());
                let prog = if prog.is_absolute() {
                    prog
                } else {
                    std::env::current_dir().unwrap_or_default().join(prog)
                };
                self.copy_in_locked(shell, &prog, guest.as_bytes()).await?;
                req.argv[0] = OsString::from(guest);
                fallback = self.cfg.bay.as_bytes().to_vec();
            }
        }
        let script = shell::command_script(&req, Some(&fallback));
        let mut exited = self.exited.clone();
        tokio::select! {
            r = shell.exec_script(req, &script) => r,
            code = wait_exit(&mut exited) => Err(Error::infra(format!(
                "{} while the command ran in {}",
                bhyve_exit(code),
                self.name
            )).with_detail(self.console.tail(30))),
        }
    }

    async fn copy_in(&self, host: &Path, guest: &Path) -> Result<()> {
        let mut slot = self.shell.lock().await;
        let shell = self.shell(&mut slot).await?;
        self.copy_in_locked(shell, host, guest.as_os_str().as_bytes()).await
    }

    async fn copy_out(&self, guest: &Path, host: &Path) -> Result<()> {
        let mut slot = self.shell.lock().await;
        let data = self.shell(&mut slot).await?.read_file(guest.as_os_str().as_bytes(), None).await?;
        std::fs::write(host, data).map_err(|e| Error::io(format!("cannot write {}", host.display()), e))
    }

    fn console(&self) -> Result<Box<dyn Console>> {
        Ok(Box::new(self.console.handle()))
    }

    async fn shutdown(&self) -> Result<()> {
        self.teardown(self.data.stop_grace_ms).await
    }

    async fn kill(&self) -> Result<()> {
        self.teardown(0).await
    }

    fn detach(&self) {
        self.detached.store(true, Ordering::SeqCst);
        tracing::info!("keeping {} (run dir {})", self.name, self.vm_dir.display());
    }

    /// A shell a person can use: taken over (or logged in again) like for `exec`, then with
    /// echo and a prompt. The next `exec` prepares it again.
    async fn prepare_interactive_console(&self) -> Result<()> {
        let mut slot = self.shell.lock().await;
        self.shell(&mut slot).await?;
        *slot = None;
        let nonce = format!("{:x}{:x}", std::process::id(), now_nanos() & 0xffff_ffff);
        let prompt = if self.cfg.user == "root" { "# " } else { "$ " };
        let mut h = self.console.handle();
        h.send(
            format!("stty echo 2>/dev/null; PS1='{prompt}'; export PS1; printf '==%s %s==\\n' VMI {nonce}\n")
                .as_bytes(),
        )
        .await?;
        let marker = Regex::new(&format!("==VMI {nonce}==")).unwrap();
        h.wait_for(&marker, Duration::from_secs(10)).await.map(|_| ())
    }

    fn boot_timings(&self) -> Vec<(&'static str, Duration)> {
        self.timings.clone()
    }
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

impl Drop for BhyveVm {
    fn drop(&mut self) {
        self.gate.close();
        if self.detached.load(Ordering::SeqCst) || self.torn_down.load(Ordering::SeqCst) {
            return;
        }
        let job = self.teardown_job(0);
        let _ = std::thread::spawn(move || {
            if let Err(e) = job() {
                tracing::warn!("{e}");
            }
        })
        .join();
    }
}
