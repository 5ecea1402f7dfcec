//! The Machine API: named VMs of a multi-VM test, driven from Rust tests and by `vmtest test`.
//!
//! What the NixOS test driver's `Machine` does (start, shutdown, crash, reboot, execute,
//! succeed, fail, the `wait_*` family, copies, block/unblock, systemd helpers), with
//! host-side deadlines on every wait, backoff while polling, and failure messages that name
//! the machine, the command, its status, stdout and stderr.
//!
//! A [`Cluster`] boots several machines at once on private networks (see
//! [`crate::network`]), each node reachable from the others by name.

use crate::console::Console;
use crate::error::{Error, ErrorKind, Result};
use crate::exec::{ExecOutput, ExecRequest};
use crate::hypervisor::{Hypervisor, Vm};
use crate::kernel_log::KernelLog;
use crate::kernel_report::KernelReport;
use crate::lock::{SlotPool, Slots};
use crate::network::{Switch, SwitchBuilder};
use crate::protocol::HostsEntry;
use crate::runner::Reporter;
use crate::spec::{format_duration, VmSpec};
use crate::state::{RunDir, StateDir};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

/// The default deadline of a wait (NixOS uses 900 s; VMs here boot in seconds).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(120);

/// First and longest pause between two polls of a wait.
const POLL_FIRST: Duration = Duration::from_millis(100);
const POLL_MAX: Duration = Duration::from_secs(2);

/// Run futures concurrently on the current task, results in order.
pub async fn join_all<F: Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut futs: Vec<Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => *o = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|o| o.expect("every future finished")).collect()
}

/// One node of a test: a VM that can be started, stopped and restarted.
pub struct Machine {
    node: String,
    hv: Arc<dyn Hypervisor>,
    spec: VmSpec,
    run: RunDir,
    vm: tokio::sync::RwLock<Option<Box<dyn Vm>>>,
    console: tokio::sync::Mutex<Option<Box<dyn Console>>>,
    net: Option<Arc<Switch>>,
    /// Files copied in by [`Cluster::boot_all`]: (host path, guest path).
    pub files: Vec<(PathBuf, PathBuf)>,
    /// Deadline of commands and waits that are not given one.
    pub default_timeout: Duration,
    /// Watch the guest kernel's log for bug reports from each boot on.
    pub watch_kernel_log: bool,
    kernel_log: tokio::sync::Mutex<Option<KernelLog>>,
    /// It was launched once: a later start (a reboot) boots, never resumes.
    launched: std::sync::atomic::AtomicBool,
}

fn shown(out: &[u8]) -> String {
    let s = String::from_utf8_lossy(out);
    let s = s.trim_end();
    if s.is_empty() {
        "(empty)".into()
    } else {
        s.to_owned()
    }
}

/// The detail block of a failed command: status, stdout, stderr.
pub fn output_detail(out: &ExecOutput) -> String {
    format!("{}\nstdout:\n{}\nstderr:\n{}", out.status, shown(&out.stdout), shown(&out.stderr))
}

impl Machine {
    /// A machine of `spec` whose VM lives in `run`; nothing starts until [`Machine::start`].
    /// `spec.name` is replaced by the run's unique name for the node.
    pub fn new(hv: Arc<dyn Hypervisor>, mut spec: VmSpec, run: RunDir, net: Option<Arc<Switch>>) -> Machine {
        spec.name = run.vm_name(&spec.node);
        Machine {
            node: spec.node.clone(),
            hv,
            spec,
            run,
            vm: tokio::sync::RwLock::new(None),
            console: tokio::sync::Mutex::new(None),
            net,
            files: Vec::new(),
            default_timeout: DEFAULT_WAIT,
            watch_kernel_log: true,
            kernel_log: tokio::sync::Mutex::new(None),
            launched: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The node name (also the guest hostname).
    pub fn name(&self) -> &str {
        &self.node
    }

    /// The VM's unique name (`vmt-<run>-<node>`), for `vmtest exec` and friends.
    pub fn vm_name(&self) -> &str {
        &self.spec.name
    }

    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }

    /// Boot the VM and wait until commands can run in it. A no-op when it is up.
    pub async fn start(&self) -> Result<()> {
        let mut vm = self.vm.write().await;
        if vm.is_some() {
            return Ok(());
        }
        for nic in &self.spec.nics {
            // A socket left by an earlier boot of this node would make the bind fail.
            let _ = std::fs::remove_file(&nic.guest_socket);
        }
        let spec = self.spec_for_start();
        let started = self.hv.launch(&spec, &self.run).await.map_err(|e| self.context(e))?;
        self.launched.store(true, std::sync::atomic::Ordering::Relaxed);
        if !self.spec.nics.is_empty() && !started.capabilities().network {
            let _ = started.kill().await;
            return Err(Error::usage(format!(
                "{}: the {} backend cannot attach VMs to private networks",
                self.node,
                self.hv.name()
            )));
        }
        *self.console.lock().await = started.console().ok();
        if self.watch_kernel_log {
            *self.kernel_log.lock().await = started.kernel_log().map(KernelLog::watch);
        }
        *vm = Some(started);
        Ok(())
    }

    /// The spec of the next launch: a guest restored once ([`VmSpec::resume`]) boots when it
    /// starts again, as a reboot should, instead of going back to the saved state.
    fn spec_for_start(&self) -> VmSpec {
        let mut spec = self.spec.clone();
        if self.launched.load(std::sync::atomic::Ordering::Relaxed) {
            spec.resume = None;
        }
        spec
    }

    /// Save the running guest into `dir` (an existing, empty dir); it keeps running. See
    /// [`Vm::save`].
    pub async fn save(&self, dir: &Path) -> Result<()> {
        let vm = self.vm.read().await;
        let vm = vm.as_ref().ok_or_else(|| {
            Error::usage(format!(
                "machine `{}` is not running, so it cannot be saved; start it again before the checkpoint",
                self.node
            ))
        })?;
        vm.save(dir).await.map_err(|e| self.context(e))
    }

    /// The guest kernel's bug reports printed since the last call (none when its log is not
    /// watched, or the backend cannot show it).
    pub async fn take_kernel_reports(&self) -> Vec<KernelReport> {
        match &*self.kernel_log.lock().await {
            Some(log) => log.take_reports().await,
            None => Vec::new(),
        }
    }

    fn context(&self, e: Error) -> Error {
        let detail = e.detail().map(str::to_owned);
        let e2 = Error::new(e.kind(), format!("machine `{}`: {}", self.node, e.headline()));
        match detail {
            Some(d) => e2.with_detail(d),
            None => e2,
        }
    }

    /// True while the VM runs.
    pub async fn is_up(&self) -> bool {
        self.vm.read().await.is_some()
    }

    /// Power the guest off cleanly (killing it if it does not stop in time).
    pub async fn shutdown(&self) -> Result<()> {
        let mut vm = self.vm.write().await;
        if let Some(v) = vm.take() {
            *self.console.lock().await = None;
            v.shutdown().await.map_err(|e| self.context(e))?;
        }
        Ok(())
    }

    /// Stop the VM at once, as a power cut.
    pub async fn crash(&self) -> Result<()> {
        let mut vm = self.vm.write().await;
        if let Some(v) = vm.take() {
            *self.console.lock().await = None;
            v.kill().await.map_err(|e| self.context(e))?;
        }
        Ok(())
    }

    /// Shut down and boot again. Kernel-mode guests keep their writes in memory, so a reboot
    /// starts from the host's root again.
    pub async fn reboot(&self) -> Result<()> {
        self.shutdown().await?;
        self.start().await
    }

    /// Leave the VM running after this handle is gone (`--keep`).
    pub async fn detach(&self) {
        if let Some(v) = self.vm.read().await.as_ref() {
            v.detach();
        }
        let path = self.run.record_path(&self.node);
        if let Some(mut rec) =
            std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<crate::state::VmRecord>(&b).ok())
        {
            rec.kept = true;
            let _ = self.run.write_record(&rec);
        }
    }

    /// Run a request as given. `Err` only when it could not run or its deadline passed.
    pub async fn exec(&self, req: ExecRequest) -> Result<ExecOutput> {
        let vm = self.vm.read().await;
        let vm = vm
            .as_ref()
            .ok_or_else(|| Error::usage(format!("machine `{}` is not running; start it first", self.node)))?;
        vm.exec(req).await.map_err(|e| self.context(e))
    }

    /// Run `sh -c CMD` with the default deadline; any status is an `Ok`.
    pub async fn execute(&self, cmd: &str) -> Result<ExecOutput> {
        self.execute_within(cmd, self.default_timeout).await
    }

    pub async fn execute_within(&self, cmd: &str, timeout: Duration) -> Result<ExecOutput> {
        self.exec(ExecRequest::shell(cmd).timeout(timeout)).await
    }

    /// A failure of `cmd` on this machine, with its output.
    pub fn command_failed(&self, cmd: &str, why: &str, out: &ExecOutput) -> Error {
        Error::new(ErrorKind::TestFailed, format!("machine `{}`: `{cmd}` {why} ({})", self.node, out.status))
            .with_detail(output_detail(out))
    }

    /// Run `cmd`; it must succeed. Returns its stdout.
    pub async fn succeed(&self, cmd: &str) -> Result<String> {
        let out = self.execute(cmd).await?;
        if !out.status.success() {
            return Err(self.command_failed(cmd, "failed", &out));
        }
        Ok(out.stdout_lossy())
    }

    /// Run `cmd`; it must fail. Returns its output.
    pub async fn fail(&self, cmd: &str) -> Result<ExecOutput> {
        let out = self.execute(cmd).await?;
        if out.status.success() {
            return Err(self.command_failed(cmd, "succeeded but was expected to fail", &out));
        }
        Ok(out)
    }

    /// Poll `probe` with backoff until it yields `Some`, or fail when `timeout` passes. The
    /// probe gets the time left; `describe` says what was awaited, with the last output seen.
    pub async fn poll<T, F, Fut>(&self, what: &str, timeout: Duration, mut probe: F) -> Result<T>
    where
        F: FnMut(Duration) -> Fut,
        Fut: Future<Output = Result<std::result::Result<T, Option<ExecOutput>>>>,
    {
        let deadline = Instant::now() + timeout;
        let mut pause = POLL_FIRST;
        let mut last: Option<ExecOutput> = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match probe(left.max(Duration::from_millis(500))).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(out)) => last = out.or(last),
                // A probe that hangs past its own deadline is one more "not yet".
                Err(e) if e.kind() == ErrorKind::Timeout => {}
                Err(e) => return Err(e),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let mut e = Error::new(
                    ErrorKind::Timeout,
                    format!("machine `{}`: {what} timed out after {}", self.node, format_duration(timeout)),
                );
                if let Some(out) = &last {
                    e = e.with_detail(format!("last attempt: {}", output_detail(out)));
                }
                return Err(e);
            }
            tokio::time::sleep(pause.min(left)).await;
            pause = (pause * 2).min(POLL_MAX);
        }
    }

    /// Retry `cmd` until it succeeds; returns its stdout.
    pub async fn wait_until_succeeds(&self, cmd: &str, timeout: Duration) -> Result<String> {
        self.wait_until_succeeds_matching(cmd, None, timeout).await
    }

    /// Retry `cmd` until it succeeds and, when given, its stdout matches `expect`.
    pub async fn wait_until_succeeds_matching(
        &self,
        cmd: &str,
        expect: Option<&regex::Regex>,
        timeout: Duration,
    ) -> Result<String> {
        let what = match expect {
            Some(re) => format!("waiting for `{cmd}` to succeed with stdout matching `{re}`"),
            None => format!("waiting for `{cmd}` to succeed"),
        };
        self.poll(&what, timeout, |left| async move {
            let out = self.execute_within(cmd, left).await?;
            let matched = expect.map(|re| re.is_match(&out.stdout_lossy())).unwrap_or(true);
            Ok(if out.status.success() && matched { Ok(out.stdout_lossy()) } else { Err(Some(out)) })
        })
        .await
    }

    /// Retry `cmd` until it fails; returns its output.
    pub async fn wait_until_fails(&self, cmd: &str, timeout: Duration) -> Result<ExecOutput> {
        self.poll(&format!("waiting for `{cmd}` to fail"), timeout, |left| async move {
            let out = self.execute_within(cmd, left).await?;
            Ok(if out.status.success() { Err(Some(out)) } else { Ok(out) })
        })
        .await
    }

    async fn wait_for_check(&self, what: &str, check: &str, timeout: Duration) -> Result<()> {
        self.poll(what, timeout, |left| async move {
            let out = self.execute_within(check, left.min(Duration::from_secs(30))).await?;
            Ok(if out.status.success() { Ok(()) } else { Err(Some(out)) })
        })
        .await
    }

    /// Wait until `path` exists in the guest.
    pub async fn wait_for_file(&self, path: &str, timeout: Duration) -> Result<()> {
        let check = format!("test -e {}", quote(path));
        self.wait_for_check(&format!("waiting for file {path}"), &check, timeout).await
    }

    /// Wait until `path` is a unix socket that accepts connections... as far as `test -S`
    /// tells (a bound socket file).
    pub async fn wait_for_unix_socket(&self, path: &str, timeout: Duration) -> Result<()> {
        let check = format!("test -S {}", quote(path));
        self.wait_for_check(&format!("waiting for unix socket {path}"), &check, timeout).await
    }

    /// Wait until something listens on TCP `port` in the guest (any address).
    pub async fn wait_for_open_port(&self, port: u16, timeout: Duration) -> Result<()> {
        self.wait_for_check(&format!("waiting for TCP port {port} to open"), &listening(port), timeout).await
    }

    /// Wait until nothing listens on TCP `port` in the guest.
    pub async fn wait_for_closed_port(&self, port: u16, timeout: Duration) -> Result<()> {
        let check = format!("! {{ {}; }}", listening(port));
        self.wait_for_check(&format!("waiting for TCP port {port} to close"), &check, timeout).await
    }

    /// Wait until the serial console prints something matching `pattern`, looking only at
    /// output after the previous match (or after boot).
    pub async fn wait_for_console(&self, pattern: &str, timeout: Duration) -> Result<String> {
        let re = regex::bytes::Regex::new(pattern)
            .map_err(|e| Error::usage(format!("bad console regex `{pattern}`: {e}")))?;
        let mut con = self.console.lock().await;
        let con = con.as_mut().ok_or_else(|| {
            Error::usage(format!("machine `{}` is not running (or has no console)", self.node))
        })?;
        con.wait_for(&re, timeout).await.map_err(|e| self.context(e))
    }

    /// Copy a host file into the guest.
    pub async fn copy_to(&self, host: &Path, guest: &Path) -> Result<()> {
        let vm = self.vm.read().await;
        let vm =
            vm.as_ref().ok_or_else(|| Error::usage(format!("machine `{}` is not running", self.node)))?;
        vm.copy_in(host, guest).await.map_err(|e| self.context(e))
    }

    /// Copy a guest file into `host_dir` (created); returns the host path.
    pub async fn copy_from(&self, guest: &Path, host_dir: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(host_dir)
            .map_err(|e| Error::io(format!("cannot create {}", host_dir.display()), e))?;
        let name = guest.file_name().ok_or_else(|| {
            Error::usage(format!("`{}` names no file to copy from `{}`", guest.display(), self.node))
        })?;
        let target = host_dir.join(name);
        let vm = self.vm.read().await;
        let vm =
            vm.as_ref().ok_or_else(|| Error::usage(format!("machine `{}` is not running", self.node)))?;
        vm.copy_out(guest, &target).await.map_err(|e| self.context(e))?;
        Ok(target)
    }

    fn switch(&self) -> Result<&Switch> {
        self.net
            .as_deref()
            .ok_or_else(|| Error::usage(format!("machine `{}` is on no private network", self.node)))
    }

    /// Cut all of this machine's network links (its NICs stay up).
    pub fn block(&self) -> Result<()> {
        self.switch()?.block(&self.node)
    }

    pub fn unblock(&self) -> Result<()> {
        self.switch()?.unblock(&self.node)
    }

    /// Fails unless the guest runs systemd as its init.
    async fn require_systemd(&self) -> Result<()> {
        let out = self.execute_within("test -d /run/systemd/system", Duration::from_secs(30)).await?;
        if !out.status.success() {
            return Err(Error::usage(format!(
                "machine `{}` does not run systemd (kernel-mode guests run vmtest-agent as init); \
                 systemd helpers need an image-mode guest",
                self.node
            )));
        }
        Ok(())
    }

    /// `systemctl ARGS`; any status is an `Ok`.
    pub async fn systemctl(&self, args: &str) -> Result<ExecOutput> {
        self.require_systemd().await?;
        self.execute(&format!("systemctl {args}")).await
    }

    /// Wait until `unit` is active; fail at once when it failed.
    pub async fn wait_for_unit(&self, unit: &str, timeout: Duration) -> Result<()> {
        self.require_systemd().await?;
        let cmd = format!("systemctl show --property=ActiveState --value {}", quote(unit));
        let cmd = cmd.as_str();
        self.poll(&format!("waiting for unit {unit}"), timeout, |left| async move {
            let out = self.execute_within(cmd, left.min(Duration::from_secs(30))).await?;
            match out.stdout_lossy().trim() {
                "active" => Ok(Ok(())),
                "failed" => Err(self.command_failed(cmd, &format!("says unit {unit} failed"), &out)),
                _ => Ok(Err(Some(out))),
            }
        })
        .await
    }

    /// `systemctl start UNIT`, which must succeed.
    pub async fn start_unit(&self, unit: &str) -> Result<()> {
        let out = self.systemctl(&format!("start {}", quote(unit))).await?;
        if !out.status.success() {
            return Err(self.command_failed(&format!("systemctl start {unit}"), "failed", &out));
        }
        Ok(())
    }

    /// Kill the VM now, for teardown after a signal.
    pub async fn kill(&self) {
        if let Some(v) = self.vm.write().await.take() {
            let _ = v.kill().await;
        }
    }
}

/// Quote a word for `sh`.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A shell check that something listens on TCP `port` (IPv4 or IPv6), from /proc/net/tcp:
/// no `nc` or `ss` needed in the guest.
fn listening(port: u16) -> String {
    format!("grep -Eqi '^ *[0-9]+: [0-9A-F]+:{port:04X} [0-9A-F]+:0000 0A ' /proc/net/tcp /proc/net/tcp6")
}

/// The shape of one node of a [`Cluster`].
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub spec: VmSpec,
    /// Private networks (1..=254) the node has a NIC on.
    pub networks: Vec<u8>,
    /// Files copied in after boot: (host path, guest path).
    pub files: Vec<(PathBuf, PathBuf)>,
    /// Watch the guest kernel's log for bug reports ([`Machine::take_kernel_reports`]).
    pub watch_kernel_log: bool,
}

impl NodeConfig {
    /// A node with `vmtest run`'s defaults on network 1.
    pub fn new(name: &str) -> Self {
        NodeConfig {
            spec: VmSpec::new("", name),
            networks: vec![1],
            files: Vec::new(),
            watch_kernel_log: true,
        }
    }
}

/// Starts a process that serves a kept run's private network, given the run dir
/// ([`Cluster::keep`]).
pub type NetworkKeeper = dyn Fn(&Path) -> Result<()> + Sync;

/// Several machines of one run, on private networks, torn down together.
pub struct Cluster {
    run: RunDir,
    machines: Vec<Machine>,
    switch: Option<Arc<Switch>>,
    _slots: Option<Slots>,
    finished: bool,
}

impl Cluster {
    /// Make a run dir, take slots for every node at once (all or nothing), start the switch,
    /// boot every node in parallel and copy their files in. On any failure, everything
    /// started so far is torn down before the error returns.
    pub async fn start(
        hv: Arc<dyn Hypervisor>,
        state: &StateDir,
        nodes: Vec<NodeConfig>,
        slots: Option<&SlotPool>,
        reporter: &dyn Reporter,
    ) -> Result<Cluster> {
        let cluster = Cluster::create(hv, state, nodes, slots, reporter).await?;
        match cluster.boot_all(true).await {
            Ok(()) => Ok(cluster),
            Err(e) => {
                cluster.teardown(true).await;
                Err(e)
            }
        }
    }

    /// [`Cluster::start`] without booting: machines are started by [`Machine::start`] or
    /// [`Cluster::boot_all`].
    pub async fn create(
        hv: Arc<dyn Hypervisor>,
        state: &StateDir,
        mut nodes: Vec<NodeConfig>,
        slots: Option<&SlotPool>,
        reporter: &dyn Reporter,
    ) -> Result<Cluster> {
        let mut names: Vec<&str> = nodes.iter().map(|n| n.spec.node.as_str()).collect();
        names.sort();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::usage(format!("two nodes are called `{}`", w[0])));
        }
        if nodes.len() > 254 {
            return Err(Error::usage("at most 254 nodes fit on a network"));
        }
        if !hv.private_networks() {
            if let Some(n) = nodes.iter().find(|n| !n.networks.is_empty()) {
                return Err(Error::usage(format!(
                    "node `{}` joins network {}, but the {} backend has no private networks; \
                     use the qemu backend, or give the node no networks",
                    n.spec.node,
                    n.networks[0],
                    hv.name()
                )));
            }
        }
        let slots = match slots {
            Some(pool) => Some(crate::runner::take_slots(pool, nodes.len(), reporter).await?),
            None => None,
        };
        let run = state.create_run()?;
        // Node numbers follow the sorted names, as in NixOS tests.
        nodes.sort_by(|a, b| a.spec.node.cmp(&b.spec.node));
        let mut builder = SwitchBuilder::new(run.path().join("net"));
        let mut hosts = Vec::new();
        let mut any_net = false;
        for (i, n) in nodes.iter_mut().enumerate() {
            let index = (i + 1) as u8;
            n.spec.nics.clear();
            for &net in &n.networks {
                if net == 0 || net == 255 {
                    let _ = run.remove();
                    return Err(Error::usage(format!(
                        "network {net} of `{}` is not in 1..=254",
                        n.spec.node
                    )));
                }
                let nic = builder.port(&n.spec.node, index, net);
                if n.spec.nics.is_empty() {
                    let a = nic.address;
                    hosts.push(HostsEntry {
                        address: format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3]),
                        names: vec![n.spec.node.clone()],
                    });
                }
                n.spec.nics.push(nic);
                any_net = true;
            }
        }
        let switch = if any_net {
            match builder.start() {
                Ok(s) => Some(Arc::new(s)),
                Err(e) => {
                    let _ = run.remove();
                    return Err(e);
                }
            }
        } else {
            None
        };
        let machines = nodes
            .into_iter()
            .map(|mut n| {
                if !n.spec.nics.is_empty() {
                    n.spec.hosts = hosts.clone();
                }
                let mut m = Machine::new(hv.clone(), n.spec, run.clone(), switch.clone());
                m.files = n.files;
                m.watch_kernel_log = n.watch_kernel_log;
                m
            })
            .collect();
        Ok(Cluster { run, machines, switch, _slots: slots, finished: false })
    }

    /// Boot every machine that is not up, in parallel; with `copy_files`, copy each node's
    /// files in once it is up.
    pub async fn boot_all(&self, copy_files: bool) -> Result<()> {
        let results = join_all(
            self.machines
                .iter()
                .map(|m| async move {
                    m.start().await?;
                    if copy_files {
                        for (host, guest) in &m.files {
                            if let Some(dir) = guest.parent() {
                                m.succeed(&format!("mkdir -p {}", quote(&dir.to_string_lossy()))).await?;
                            }
                            m.copy_to(host, guest).await?;
                        }
                    }
                    Ok::<(), Error>(())
                })
                .collect(),
        )
        .await;
        results.into_iter().collect::<Result<Vec<()>>>().map(|_| ())
    }

    pub fn run_dir(&self) -> &RunDir {
        &self.run
    }

    pub fn machines(&self) -> &[Machine] {
        &self.machines
    }

    /// The machine called `node`.
    pub fn machine(&self, node: &str) -> Result<&Machine> {
        self.machines.iter().find(|m| m.node == node).ok_or_else(|| {
            let names: Vec<&str> = self.machines.iter().map(|m| m.node.as_str()).collect();
            Error::usage(format!("no machine `{node}` (machines: {})", names.join(", ")))
        })
    }

    /// The private network switch (partition, heal, loss, delay).
    pub fn network(&self) -> Result<&Switch> {
        self.switch.as_deref().ok_or_else(|| Error::usage("this test has no private network"))
    }

    /// Shut every machine down (in parallel) and remove the run dir.
    pub async fn shutdown(mut self) -> Result<()> {
        self.teardown(false).await;
        self.finished = true;
        self.run.remove()
    }

    /// Kill every machine at once (after a signal) and remove the run dir.
    pub async fn kill(mut self) {
        self.teardown(true).await;
        self.finished = true;
    }

    async fn teardown(&self, kill: bool) {
        join_all(
            self.machines
                .iter()
                .map(|m| async move {
                    if kill {
                        m.kill().await;
                    } else if let Err(e) = m.shutdown().await {
                        tracing::warn!("{e}");
                        m.kill().await;
                    }
                })
                .collect(),
        )
        .await;
        // Whatever the records still describe (a launch that died half-way).
        for rec in self.run.records() {
            if let Some(m) = self.machines.first() {
                if let Err(e) = m.hv.destroy_record(&rec).await {
                    tracing::warn!("cleanup of {}: {e}", rec.name);
                }
            }
            self.run.remove_record(&rec.node);
        }
        let _ = self.run.remove();
    }

    /// Leave every machine running (`--keep`); returns their VM names. Exec, console and
    /// destroy keep working on them.
    ///
    /// With a private network, `keep_network` is called with the run dir once the switch's
    /// plan is saved: it should start a process that serves it (e.g. with
    /// [`crate::network::serve_while`]) while the kept machines live. Without one the
    /// network stops with this process.
    pub async fn keep(mut self, keep_network: Option<&NetworkKeeper>) -> Vec<String> {
        for m in &self.machines {
            m.detach().await;
        }
        if let (Some(sw), Some(start)) = (&self.switch, keep_network) {
            if let Err(e) = sw.save_plan().and_then(|_| start(self.run.path())) {
                tracing::warn!("the private network stops with this process: {e}");
            }
        }
        self.finished = true;
        self.machines.iter().map(|m| m.spec.name.clone()).collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.finished {
            // The VMs die with their handles (a backend's Vm kills on drop); the dir goes too.
            let _ = self.run.remove();
        }
    }
}
