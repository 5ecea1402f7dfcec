//! The Multipass backend of vmtest: Canonical Multipass driven through its CLI, exactly as
//! reference/multipass.md describes the 1.16 and main release lines.
//!
//! Configuration (environment, read by [`MultipassBackend::from_env`]):
//! - `VMTEST_MULTIPASS`: the `multipass` executable (default: `multipass` on `PATH`, then
//!   `/snap/bin/multipass`).
//! - `VMTEST_MULTIPASS_IMAGE`: image to launch when the spec names none (default: Multipass's
//!   latest LTS).
//! - `VMTEST_MULTIPASS_DISK`: `--disk` size (default `10G`).
//! - `VMTEST_MULTIPASS_CLOUD_INIT`: a cloud-init YAML file, streamed with `--cloud-init -`.
//! - `VMTEST_MULTIPASS_LAUNCH_TIMEOUT`: `--timeout` of `launch` (default 600 s, as Multipass's
//!   own CI: a first launch downloads the image and waits for cloud-init).
//! - `VMTEST_MULTIPASS_STORAGE`: where Multipass keeps its images, for the free-disk check
//!   (default: `$MULTIPASS_STORAGE`, else the snap's `/var/snap/multipass/common`, or macOS's
//!   `/var/root/Library/Application Support/multipassd`).
//! - `VMTEST_MULTIPASS_CONFINED`: `1` when the client cannot see host paths outside `/home`
//!   (the snap), `0` when it can; default: `1` for the snap's client (see [`cli::is_snap`]).

pub mod cli;
pub mod script;
mod vm;

use async_trait::async_trait;
use cli::{LaunchFailure, Multipass};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use vmtest_core::spec::{BootSpec, VmSpec};
use vmtest_core::state::{ProcessId, RunDir, StateDir, VmRecord};
use vmtest_core::{Check, Error, ErrorKind, Hypervisor, Preflight, Result, Vm};

pub use vm::MultipassVm;

/// Every instance vmtest creates has a name with this prefix; nothing else is ever deleted.
pub const NAME_PREFIX: &str = "vmt-";

/// Below this much free space on Multipass's storage, pre-flight warns (as seeds/004 did).
pub const MIN_FREE_DISK: u64 = 10 * 1024 * 1024 * 1024;

/// How long past its own `--timeout` a `launch` client may run before it is killed.
const LAUNCH_GRACE: Duration = Duration::from_secs(60);

/// `launch --timeout` unless VMTEST_MULTIPASS_LAUNCH_TIMEOUT says otherwise. Not the boot
/// timeout: a first launch downloads a 0.5-1 GB image and waits for cloud-init, and
/// Multipass's own CI allows 600 s for it.
pub const DEFAULT_LAUNCH_TIMEOUT: Duration = Duration::from_secs(600);

/// The backend's settings.
#[derive(Clone, Debug, Default)]
pub struct MultipassOptions {
    pub multipass: Option<PathBuf>,
    pub image: Option<String>,
    pub disk: Option<String>,
    pub cloud_init: Option<PathBuf>,
    pub launch_timeout: Option<Duration>,
    pub storage: Option<PathBuf>,
    pub confined: Option<bool>,
    /// How long past its own `--timeout` a `launch` client may run before it is killed
    /// (default 60 s).
    pub launch_grace: Option<Duration>,
    /// A setting that could not be read, reported by pre-flight and launch.
    pub config_error: Option<String>,
}

impl MultipassOptions {
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        let text = |k: &str| var(k).map(|v| v.to_string_lossy().into_owned());
        let mut o = MultipassOptions {
            multipass: var("VMTEST_MULTIPASS").map(PathBuf::from),
            image: text("VMTEST_MULTIPASS_IMAGE"),
            disk: text("VMTEST_MULTIPASS_DISK"),
            cloud_init: var("VMTEST_MULTIPASS_CLOUD_INIT").map(PathBuf::from),
            storage: var("VMTEST_MULTIPASS_STORAGE").or_else(|| var("MULTIPASS_STORAGE")).map(PathBuf::from),
            ..Default::default()
        };
        if let Some(t) = text("VMTEST_MULTIPASS_LAUNCH_TIMEOUT") {
            match vmtest_core::spec::parse_duration(&t) {
                Ok(d) if d >= Duration::from_secs(1) => o.launch_timeout = Some(d),
                _ => {
                    o.config_error = Some(format!(
                        "VMTEST_MULTIPASS_LAUNCH_TIMEOUT={t} is not a duration of at least 1s; write e.g. 600 or 10m"
                    ))
                }
            }
        }
        match text("VMTEST_MULTIPASS_CONFINED").as_deref() {
            None => {}
            Some("1") => o.confined = Some(true),
            Some("0") => o.confined = Some(false),
            Some(other) => o.config_error = Some(format!("VMTEST_MULTIPASS_CONFINED={other}: write 1 or 0")),
        }
        o
    }
}

/// Canonical Multipass, through its CLI.
pub struct MultipassBackend {
    opts: MultipassOptions,
    preflight_passed: AtomicBool,
    /// Names this process launched: "already exists" for one of them is our own leftover.
    launched: Mutex<HashSet<String>>,
}

impl MultipassBackend {
    /// The backend configured from the environment (see the crate docs).
    pub fn from_env() -> Self {
        Self::new(MultipassOptions::from_env())
    }

    pub fn new(opts: MultipassOptions) -> Self {
        MultipassBackend {
            opts,
            preflight_passed: AtomicBool::new(false),
            launched: Mutex::new(HashSet::new()),
        }
    }

    fn multipass(&self) -> Result<Multipass> {
        Multipass::locate(self.opts.multipass.clone()).map_err(|why| {
            Error::preflight(format!(
                "{why}; install Multipass (`sudo snap install multipass`) or set VMTEST_MULTIPASS to its path"
            ))
        })
    }

    fn confined(&self, mp: &Multipass) -> bool {
        self.opts.confined.unwrap_or_else(|| cli::is_snap(&mp.exe))
    }

    fn storage_dir(&self) -> PathBuf {
        if let Some(s) = &self.opts.storage {
            return s.clone();
        }
        if cfg!(target_os = "macos") {
            PathBuf::from("/var/root/Library/Application Support/multipassd")
        } else {
            PathBuf::from("/var/snap/multipass/common")
        }
    }

    /// All instances as `list --format json` shows them (Deleted ones included).
    pub async fn list_instances(&self) -> Result<Vec<cli::ListEntry>> {
        let mp = self.multipass()?;
        let out = mp.run(&["list", "--format", "json"], None, cli::CONTROL_DEADLINE).await?;
        if !out.ok() {
            return Err(cli::daemon_error(&out, "multipass list").unwrap_or_else(|| {
                Error::infra(format!("`multipass list --format json` failed ({})", out.stderr_line()))
            }));
        }
        cli::parse_list(&out.stdout)
    }

    async fn ensure_preflight(&self) -> Result<()> {
        if self.preflight_passed.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.preflight().await.into_result()?;
        self.preflight_passed.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// `delete --purge NAME` for one name (never several, never a bare `purge`). A missing
    /// instance is not an error.
    pub async fn delete_instance(&self, name: &str) -> Result<()> {
        if !name.starts_with(NAME_PREFIX) {
            return Err(Error::usage(format!(
                "refusing to delete multipass instance `{name}`: vmtest only deletes instances named {NAME_PREFIX}*"
            )));
        }
        let mp = self.multipass()?;
        delete_purge(&mp, name).await
    }
}

pub(crate) async fn delete_purge(mp: &Multipass, name: &str) -> Result<()> {
    let out = mp.run(&["delete", "--purge", name], None, cli::CONTROL_DEADLINE).await?;
    if out.ok() || cli::says_does_not_exist(&out) {
        tracing::debug!("deleted multipass instance {name}");
        return Ok(());
    }
    Err(cli::daemon_error(&out, &format!("deleting multipass instance {name}")).unwrap_or_else(|| {
        Error::infra(format!(
            "`multipass delete --purge {name}` failed ({}); delete it by hand once the daemon is healthy",
            out.stderr_line()
        ))
    }))
}

/// Free bytes on the filesystem holding `path` (or its nearest existing ancestor).
fn free_bytes(path: &std::path::Path) -> std::io::Result<(PathBuf, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let mut p = path.to_path_buf();
    while !p.exists() {
        if !p.pop() {
            return Err(std::io::Error::from(std::io::ErrorKind::NotFound));
        }
    }
    let c = std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: statvfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((p, st.f_bavail as u64 * st.f_frsize as u64))
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1024.0 * 1024.0 * 1024.0))
}

/// A record rebuilt from an instance name `vmt-<run>-<node>`; the owner is unknown (pid 0),
/// so only the state dir's record can say whether its run is still alive.
pub fn record_from_instance(entry: &cli::ListEntry) -> Option<VmRecord> {
    let rest = entry.name.strip_prefix(NAME_PREFIX)?;
    let (run, node) = rest.split_once('-').unwrap_or((rest, ""));
    Some(VmRecord {
        name: entry.name.clone(),
        node: node.to_owned(),
        run_id: run.to_owned(),
        backend: "multipass".into(),
        owner: ProcessId { pid: 0, start_time: 0 },
        owner_command: String::new(),
        created_unix: 0,
        processes: Vec::new(),
        paths: Vec::new(),
        kept: false,
        backend_data: serde_json::json!({ "instance": entry.name, "state": entry.state }),
    })
}

/// What the orphan sweep should do with one `vmt-` instance or one record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SweepAction {
    /// Its run's owner is dead and it was not kept: `delete --purge` it.
    Destroy,
    /// Its owner still runs.
    OwnerAlive(ProcessId),
    /// Left up on purpose (`--keep`): only destroyed by name.
    Kept,
    /// A `vmt-` instance with no record in this state dir (a lost state dir after a reboot,
    /// or a run using another state dir): destroy only when the user asks (`--force`).
    Unrecorded,
    /// A record whose instance no longer exists: forget the record.
    Gone,
}

/// One decision of the sweep.
#[derive(Clone, Debug)]
pub struct SweepItem {
    pub record: VmRecord,
    pub action: SweepAction,
}

/// Decide the sweep from the `vmt-` instances ([`Hypervisor::list_owned`]) and the state
/// dir's multipass records.
pub fn plan_sweep(owned: &[VmRecord], records: &[VmRecord]) -> Vec<SweepItem> {
    let mut plan = Vec::new();
    for inst in owned {
        let action = match records.iter().find(|r| r.name == inst.name) {
            None => SweepAction::Unrecorded,
            Some(r) if r.kept => SweepAction::Kept,
            Some(r) if r.owner.is_alive() => SweepAction::OwnerAlive(r.owner),
            Some(_) => SweepAction::Destroy,
        };
        let record = records.iter().find(|r| r.name == inst.name).cloned().unwrap_or_else(|| inst.clone());
        plan.push(SweepItem { record, action });
    }
    for r in records.iter().filter(|r| r.backend == "multipass") {
        if !owned.iter().any(|i| i.name == r.name) {
            plan.push(SweepItem { record: r.clone(), action: SweepAction::Gone });
        }
    }
    plan
}

fn kind_error(kind: ErrorKind, msg: String) -> Error {
    Error::new(kind, msg)
}

#[async_trait]
impl Hypervisor for MultipassBackend {
    fn name(&self) -> &'static str {
        "multipass"
    }

    async fn preflight(&self) -> Preflight {
        let mut pf = Preflight::default();
        if let Some(e) = &self.opts.config_error {
            pf.push(Check::fail("multipass settings", e.clone(), "fix or unset the variable"));
        }
        let mp = match self.multipass() {
            Ok(mp) => {
                pf.push(Check::ok("multipass", mp.exe.display().to_string()));
                mp
            }
            Err(e) => {
                pf.push(Check::fail(
                    "multipass",
                    e.message().split("; ").next().unwrap_or_default().to_owned(),
                    "install Multipass (`sudo snap install multipass`) or set VMTEST_MULTIPASS to its path",
                ));
                return pf;
            }
        };
        // version exits 0 even without a daemon: only the `multipassd` key says it is up.
        let version = match mp.run(&["version", "--format", "json"], None, cli::CONTROL_DEADLINE).await {
            Ok(out) if out.ok() => cli::parse_version(&out.stdout),
            Ok(out) => Err(Error::preflight(format!("`multipass version` failed ({})", out.stderr_line()))),
            Err(e) => Err(e),
        };
        let daemon_fix = if cfg!(target_os = "macos") {
            "start it: `sudo launchctl kickstart -k system/com.canonical.multipassd`"
        } else {
            "start it: `sudo snap start multipass` (or `sudo snap restart multipass`)"
        };
        match version {
            Err(e) => {
                pf.push(Check::fail("multipass daemon", e.message().to_owned(), daemon_fix));
                return pf;
            }
            Ok(v) => match &v.multipassd {
                None => {
                    // The client reaches no daemon; `list` says why (down, access, auth).
                    match self.list_instances().await {
                        Err(e) if e.kind() == ErrorKind::Preflight => {
                            let mut parts = e.message().splitn(2, "; ");
                            let detail = parts.next().unwrap_or_default().to_owned();
                            pf.push(Check::fail(
                                "multipass daemon",
                                detail,
                                parts.next().unwrap_or(daemon_fix),
                            ));
                        }
                        _ => pf.push(Check::fail(
                            "multipass daemon",
                            format!(
                                "multipassd is not running (`multipass version` shows only the client {})",
                                v.multipass
                            ),
                            daemon_fix,
                        )),
                    }
                    return pf;
                }
                Some(d) if *d != v.multipass => pf.push(Check::warn(
                    "multipass daemon",
                    format!("client {} and daemon {d} differ", v.multipass),
                    "update Multipass so client and daemon match (`sudo snap refresh multipass`)",
                )),
                Some(d) => pf.push(Check::ok("multipass daemon", format!("multipassd {d}"))),
            },
        }
        // The daemon answers `version`; `list` proves it serves requests.
        let instances = match self.list_instances().await {
            Ok(l) => l,
            Err(e) => {
                pf.push(Check::fail("multipass daemon", e.message().to_owned(), daemon_fix));
                return pf;
            }
        };
        let storage = self.storage_dir();
        match free_bytes(&storage) {
            Ok((p, free)) if free < MIN_FREE_DISK => pf.push(Check::warn(
                "multipass storage",
                format!("{} free on {} (Multipass's storage)", gib(free), p.display()),
                format!(
                    "free at least {} there; set VMTEST_MULTIPASS_STORAGE if it lives elsewhere",
                    gib(MIN_FREE_DISK)
                ),
            )),
            Ok((p, free)) => {
                pf.push(Check::ok("multipass storage", format!("{} free on {}", gib(free), p.display())))
            }
            Err(e) => pf.push(Check::warn(
                "multipass storage",
                format!("cannot read free space of {}: {e}", storage.display()),
                "set VMTEST_MULTIPASS_STORAGE to Multipass's storage directory",
            )),
        }
        let leftovers: Vec<String> = instances
            .iter()
            .filter(|i| i.name.starts_with(NAME_PREFIX))
            .map(|i| format!("{} ({})", i.name, i.state))
            .collect();
        if leftovers.is_empty() {
            pf.push(Check::ok("multipass leftovers", "no vmt- instances"));
        } else {
            pf.push(Check::warn(
                "multipass leftovers",
                format!("{} vmt- instance(s): {}", leftovers.len(), leftovers.join(", ")),
                "`vmtest cleanup` deletes those whose runs are gone",
            ));
        }
        pf
    }

    async fn launch(&self, spec: &VmSpec, run: &RunDir) -> Result<Box<dyn Vm>> {
        if let Some(e) = &self.opts.config_error {
            return Err(Error::usage(e.clone()));
        }
        let image = match &spec.boot {
            BootSpec::Image { name } => Some(name.clone()),
            BootSpec::Kernel { kernel: Some(k), .. } => {
                return Err(Error::usage(format!(
                    "the multipass backend boots images, not kernels (--kernel {}); drop --kernel or use --backend qemu",
                    k.display()
                )))
            }
            BootSpec::Kernel { kernel: None, modules: Some(m) } => {
                return Err(Error::usage(format!(
                    "the multipass backend boots images, which bring their own modules (--modules {}); drop \
                     --modules or use --backend qemu",
                    m.display()
                )))
            }
            BootSpec::Kernel { kernel: None, modules: None } => self.opts.image.clone(),
        };
        if !spec.name.starts_with(NAME_PREFIX) {
            return Err(Error::usage(format!("VM name `{}` does not start with {NAME_PREFIX}", spec.name)));
        }
        let cloud_init = match &self.opts.cloud_init {
            Some(p) => Some(std::fs::read(p).map_err(|e| {
                Error::usage(format!("cannot read VMTEST_MULTIPASS_CLOUD_INIT={}: {e}", p.display()))
            })?),
            None => None,
        };
        self.ensure_preflight().await?;
        let mp = self.multipass()?;
        let timeout = self.opts.launch_timeout.unwrap_or(DEFAULT_LAUNCH_TIMEOUT);
        let timeout_secs = timeout.as_secs_f64().ceil().max(1.0) as u64;
        let name = spec.name.clone();

        // The record goes first: a runner killed mid-launch leaves it for the sweep.
        let mut record = VmRecord::new(&name, &spec.node, run.id(), "multipass");
        record.backend_data = serde_json::json!({ "instance": name, "multipass": mp.exe });
        run.write_record(&record)?;

        let cpus = spec.cpus.max(1).to_string();
        let memory = format!("{}M", spec.memory_mib);
        let disk = self.opts.disk.clone().unwrap_or_else(|| "10G".into());
        let timeout_arg = timeout_secs.to_string();
        let mut args: Vec<&str> = vec!["launch"];
        if let Some(img) = &image {
            args.push(img);
        }
        args.extend(["--name", &name, "--cpus", &cpus, "--memory", &memory, "--disk", &disk]);
        args.extend(["--timeout", &timeout_arg]);
        if cloud_init.is_some() {
            args.extend(["--cloud-init", "-"]);
        }
        let ours_before = self.launched.lock().unwrap().contains(&name);
        self.launched.lock().unwrap().insert(name.clone());
        let started = std::time::Instant::now();
        tracing::info!("launching multipass instance {name} ({})", args.join(" "));
        let deadline = Duration::from_secs(timeout_secs) + self.opts.launch_grace.unwrap_or(LAUNCH_GRACE);
        let out = match mp.run(&args, cloud_init.as_deref(), deadline).await {
            Ok(out) => out,
            Err(e) => {
                self.cleanup_attempt(&mp, run, &spec.node, &name).await;
                return Err(e);
            }
        };
        if !out.ok() {
            let img = image.as_deref().unwrap_or("");
            let msg = cli::launch_message(&out, &name, img, timeout_secs);
            let detail = String::from_utf8_lossy(&out.stderr).into_owned();
            return Err(match cli::classify_launch(&out) {
                LaunchFailure::NameTaken if !ours_before => {
                    // Not ours: leave it alone, and make sure no cleanup finds it in our records.
                    run.remove_record(&spec.node);
                    Error::infra(msg)
                }
                LaunchFailure::NameTaken | LaunchFailure::Transient => {
                    self.cleanup_attempt(&mp, run, &spec.node, &name).await;
                    Error::transient(msg)
                }
                LaunchFailure::Final(kind) => {
                    self.cleanup_attempt(&mp, run, &spec.node, &name).await;
                    kind_error(kind, msg)
                }
            }
            .with_detail(detail));
        }
        let launch_time = started.elapsed();
        // Don't parse the spinner: ask `info` (reference §1).
        let info = mp.run(&["info", &name, "--format", "json"], None, cli::CONTROL_DEADLINE).await?;
        let state = if info.ok() {
            cli::parse_info_state(&info.stdout, &name)?
        } else {
            format!("unknown ({})", info.stderr_line())
        };
        if state != "Running" {
            self.cleanup_attempt(&mp, run, &spec.node, &name).await;
            return Err(Error::boot(format!(
                "multipass launched {name} but `multipass info` reports it {state}; see `multipass launch` \
                 logs (`journalctl -u snap.multipass*`) and retry"
            )));
        }
        let confined = self.confined(&mp);
        Ok(Box::new(MultipassVm::new(name, spec.node.clone(), mp, run.clone(), confined, launch_time)))
    }

    async fn list_owned(&self) -> Result<Vec<VmRecord>> {
        Ok(self.list_instances().await?.iter().filter_map(record_from_instance).collect())
    }

    async fn attach(&self, record: &VmRecord) -> Result<Box<dyn Vm>> {
        let name = instance_name(record);
        let run =
            StateDir::from_env().runs().into_iter().find(|r| r.id() == record.run_id).ok_or_else(|| {
                Error::usage(format!("the run dir of {} is gone; `vmtest cleanup` tidies up", record.name))
            })?;
        let mp = self.multipass()?;
        let confined = self.confined(&mp);
        let vm = MultipassVm::new(name, record.node.clone(), mp, run, confined, Duration::ZERO);
        // A handle on a kept VM: dropping it must leave the instance alone.
        vm.detach();
        Ok(Box::new(vm))
    }

    async fn destroy_record(&self, record: &VmRecord) -> Result<()> {
        self.delete_instance(&instance_name(record)).await
    }
}

/// The Multipass instance a record names.
fn instance_name(record: &VmRecord) -> String {
    record.backend_data.get("instance").and_then(|v| v.as_str()).unwrap_or(&record.name).to_owned()
}

impl MultipassBackend {
    /// After a failed attempt: `delete --purge NAME`, and forget the record once it is gone
    /// (a record kept means the runner's cleanup will try again).
    async fn cleanup_attempt(&self, mp: &Multipass, run: &RunDir, node: &str, name: &str) {
        match delete_purge(mp, name).await {
            Ok(()) => run.remove_record(node),
            Err(e) => tracing::warn!("cleanup of {name} after a failed launch: {e}"),
        }
    }
}
