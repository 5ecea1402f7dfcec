//! The bhyve backend of vmtest: FreeBSD and illumos flavors, falcon-style ZFS images.
//!
//! Images are zvols `<pool>/vmtest/img/<image>` with a `@base` snapshot; every VM runs on a
//! `zfs clone` at `<pool>/vmtest/run/<run>/<vm>` tagged `vmtest:owner=<run>`. Commands run over
//! the serial console with [`vmtest_core::shell::ShellSession`]. Every host tool goes through
//! [`host::HostCommand`]. Every teardown parameter is written to the VM record before the
//! first host change (falcon #107), so `destroy_record` never consults the environment.
//!
//! Environment:
//! - `VMTEST_BHYVE_FLAVOR=freebsd|illumos`: override host detection (`uname -s`).
//! - `VMTEST_BHYVE_POOL`: ZFS pool (default `zroot` on FreeBSD, `rpool` on illumos).
//! - `VMTEST_BHYVE_IMAGE`: image for `vmtest run` (default `freebsd-14` / `helios-2.0`).
//! - `VMTEST_PRIV=pfexec|sudo|doas|none`: privilege prefix (default none as root, else pfexec
//!   on illumos, sudo on FreeBSD).
//! - `VMTEST_BHYVE_PATH`: PATH-like list searched first for every host tool (tests: the fakes).
//! - `VMTEST_BHYVE_DEVROOT`: where `/dev` is for files vmtest opens itself (default `/dev`).
//! - `VMTEST_BHYVE_USER` / `VMTEST_BHYVE_PASSWORD`: console login (default root, no password).
//! - `VMTEST_BHYVE_NIC`: FreeBSD bridge for a tap, or illumos link for a VNIC; unset: no NIC.
//! - `VMTEST_BHYVE_SHARE=p9kp|serial`: copy-in through a virtio-9p share (`p9kp pull`, default
//!   on illumos) or base64 over the console (default on FreeBSD).
//! - `VMTEST_BHYVE_BOOTROM`: UEFI firmware path (default: the first that exists of
//!   [`config::Flavor::bootrom_candidates`]), or `none` on FreeBSD: guests are loaded with
//!   `bhyveload` (illumos bhyve boots only with firmware).
//! - `VMTEST_BHYVE_DISK`: each VM's disk size; the clone grows to it (default 20G, as falcon).
//! - `VMTEST_BHYVE_BAY`: guest dir for copied-in programs (default `/opt/cargo-bay`).
//! - `VMTEST_BHYVE_COPY_PROGRAM=0`: do not copy a host program named by path into the guest.
//! - `VMTEST_BHYVE_RETRIES`, `VMTEST_BHYVE_RETRY_MS`: busy dataset/link retries (30 × 1000 ms).
//! - `VMTEST_BHYVE_STOP_GRACE_MS`: from SIGTERM (the guest's power button) to
//!   `bhyvectl --destroy` (10000).

pub mod config;
pub mod host;
pub mod teardown;
pub mod tty;
pub mod vm;

use crate::config::{Config, Flavor};
use crate::host::HostCommand;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vmtest_core::spec::{BootSpec, VmSpec};
use vmtest_core::state::{ProcessId, RunDir, StateDir, VmRecord};
use vmtest_core::{Check, Error, Hypervisor, Preflight, Result, Vm};

/// Deadline for one zfs/bhyvectl/ifconfig/dladm call.
pub const HOST_TIMEOUT: Duration = Duration::from_secs(120);

/// How the console is reached.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum ConsoleKind {
    /// FreeBSD: bhyve opens `a`, we open `b` (`/dev/nmdm-<vm>.1A` / `.1B`).
    Nmdm { a: String, b: String },
    /// illumos: bhyve listens on this unix socket and drops output while no client is connected.
    Socket { path: PathBuf },
}

/// Everything teardown needs, written into the record before anything is created.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct BhyveData {
    pub flavor: Flavor,
    pub pool: String,
    pub image: String,
    /// The clone: `<pool>/vmtest/run/<run>/<vm>`.
    pub dataset: String,
    /// The kernel VM name (`/dev/vmm/<vm>`).
    pub vm: String,
    pub host: HostCommand,
    pub devroot: PathBuf,
    pub console: ConsoleKind,
    /// FreeBSD tap, once created.
    pub tap: Option<String>,
    /// illumos VNIC name, set before `dladm create-vnic` runs.
    pub vnic: Option<String>,
    /// The bhyve process (as started, possibly through the privilege prefix).
    pub pid: Option<ProcessId>,
    /// Host dir shared over virtio-9p.
    pub share: Option<PathBuf>,
    pub stop_grace_ms: u64,
    pub retries: u32,
    pub retry_pause_ms: u64,
}

impl BhyveData {
    pub fn from_record(rec: &VmRecord) -> Result<BhyveData> {
        serde_json::from_value(rec.backend_data.clone()).map_err(|e| {
            Error::infra(format!(
                "the record of {} has no usable bhyve data ({e}); destroy it by hand: `bhyvectl --vm={} --destroy` \
                 and `zfs destroy -r <pool>/vmtest/run/{}`",
                rec.name, rec.name, rec.run_id
            ))
        })
    }
}

pub struct BhyveBackend {
    cfg: std::result::Result<Config, Error>,
}

impl BhyveBackend {
    /// The backend configured from the environment (see the crate docs).
    pub fn from_env() -> Self {
        BhyveBackend { cfg: Config::from_env() }
    }

    pub fn with_config(cfg: Config) -> Self {
        BhyveBackend { cfg: Ok(cfg) }
    }

    pub fn config(&self) -> Result<&Config> {
        self.cfg.as_ref().map_err(|e| Error::new(e.kind(), e.headline()))
    }

    fn dev(&self, path: &str) -> Result<PathBuf> {
        Ok(dev_path(&self.config()?.devroot, path))
    }

    /// Import a raw disk image as `<pool>/vmtest/img/<name>@base` (`vmtest image import
    /// --backend bhyve FILE NAME`). With `force`, an existing image is replaced (it must have
    /// no clones). A failed import leaves nothing behind.
    pub async fn import_image(&self, file: &Path, name: &str, force: bool) -> Result<String> {
        let cfg = self.config()?.clone();
        let file = file.to_owned();
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || import_image(&cfg, &file, &name, force))
            .await
            .map_err(|e| Error::infra(format!("image import panicked: {e}")))?
    }

    /// The imported images (names under `<pool>/vmtest/img` that have `@base`).
    pub async fn list_images(&self) -> Result<Vec<String>> {
        let cfg = self.config()?.clone();
        tokio::task::spawn_blocking(move || {
            let root = format!("{}/vmtest/img", cfg.pool);
            let out = cfg.host.run(
                "zfs",
                &["list", "-H", "-o", "name", "-t", "snapshot", "-r", &root],
                HOST_TIMEOUT,
            )?;
            if !out.success() {
                return if out.message().contains("dataset does not exist") {
                    Ok(Vec::new())
                } else {
                    Err(Error::infra(format!("`zfs list` of {root} failed: {}", out.message())))
                };
            }
            Ok(out
                .stdout
                .lines()
                .filter_map(|l| l.strip_suffix("@base"))
                .filter_map(|l| l.strip_prefix(&format!("{root}/")))
                .map(str::to_owned)
                .collect())
        })
        .await
        .map_err(|e| Error::infra(format!("listing images panicked: {e}")))?
    }

    /// The orphan sweep (`vmtest cleanup`): destroy what vmtest left on this host whose owner
    /// is dead: records in `state` whose owner died, `/dev/vmm/vmt-*` VMs and
    /// `vmtest:owner` clones of runs with no live record, and `vmtest` taps/VNICs. Never
    /// touches `img/` or `@base`. With `list_only`, reports without destroying.
    pub async fn sweep(&self, state: &StateDir, list_only: bool) -> Result<teardown::SweepReport> {
        let cfg = self.config()?.clone();
        cfg.flavor()?;
        let state = state.clone();
        tokio::task::spawn_blocking(move || teardown::sweep(&cfg, &state, list_only))
            .await
            .map_err(|e| Error::infra(format!("the sweep panicked: {e}")))?
    }
}

/// Map an absolute `/dev/...` path under the configured device root.
pub fn dev_path(devroot: &Path, path: &str) -> PathBuf {
    match path.strip_prefix("/dev/") {
        Some(rest) => devroot.join(rest),
        None => PathBuf::from(path),
    }
}

/// Wait until a device node exists (a fresh zvol is not there at once).
pub fn wait_for_device(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if path.exists() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn valid_image_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

fn import_image(cfg: &Config, file: &Path, name: &str, force: bool) -> Result<String> {
    let flavor = cfg.flavor()?;
    if !valid_image_name(name) {
        return Err(Error::usage(format!(
            "bad image name `{name}`; use letters, digits, `.`, `_` and `-`, starting with a letter or digit"
        )));
    }
    let meta = std::fs::metadata(file)
        .map_err(|e| Error::usage(format!("cannot read image file {}: {e}", file.display())))?;
    if !meta.is_file() || meta.len() == 0 {
        return Err(Error::usage(format!(
            "{} is not a raw disk image (empty or not a file)",
            file.display()
        )));
    }
    let img = cfg.image_dataset(name);
    let base = format!("{img}@base");
    let h = &cfg.host;
    let exists = h.run("zfs", &["list", "-H", "-o", "name", &img], HOST_TIMEOUT)?;
    if exists.success() {
        if !force {
            return Err(Error::usage(format!(
                "image `{name}` already exists ({img}); pass --force to replace it"
            )));
        }
        let out = h.run("zfs", &["destroy", "-r", &img], HOST_TIMEOUT)?;
        if !out.success() {
            let msg = out.message();
            return Err(if msg.contains("dependent clones") {
                Error::usage(format!(
                    "cannot replace image `{name}`: VMs still run on it ({}); destroy them first (`vmtest cleanup`)",
                    msg.lines().next().unwrap_or_default()
                ))
            } else {
                Error::infra(format!("`zfs destroy -r {img}` failed: {msg}"))
            });
        }
    }
    // Round up to whole MiB: a multiple of any volblocksize.
    let size = meta.len().div_ceil(1 << 20) * (1 << 20);
    let size_s = size.to_string();
    let mut args = vec!["create", "-p", "-V", &size_s];
    args.extend_from_slice(flavor.zvol_options());
    args.push(&img);
    h.check("zfs", &args, HOST_TIMEOUT)?;
    let finish = || -> Result<()> {
        let dev = flavor.zvol_path(&img);
        if !wait_for_device(&dev_path(&cfg.devroot, &dev), Duration::from_secs(30)) {
            return Err(Error::transient(format!("zvol device {dev} did not appear within 30s; try again")));
        }
        let iff = format!("if={}", file.display());
        let of = format!("of={dev}");
        h.check("dd", &[&iff, &of, "bs=1024k"], Duration::from_secs(3600))?;
        h.check("zfs", &["snapshot", &base], HOST_TIMEOUT)?;
        Ok(())
    };
    if let Err(e) = finish() {
        let _ = h.run("zfs", &["destroy", "-r", &img], HOST_TIMEOUT);
        return Err(e);
    }
    tracing::info!("imported {} as {base}", file.display());
    Ok(base)
}

#[async_trait]
impl Hypervisor for BhyveBackend {
    fn name(&self) -> &'static str {
        "bhyve"
    }

    async fn import_image(&self, file: &Path, name: &str, force: bool) -> Result<String> {
        BhyveBackend::import_image(self, file, name, force).await
    }

    async fn list_images(&self) -> Result<Vec<String>> {
        BhyveBackend::list_images(self).await
    }

    async fn preflight(&self) -> Preflight {
        let mut pf = Preflight::default();
        let cfg = match self.config() {
            Ok(c) => c.clone(),
            Err(e) => {
                pf.push(Check::fail("bhyve config", e.message(), "fix the VMTEST_BHYVE_* variables"));
                return pf;
            }
        };
        tokio::task::spawn_blocking(move || preflight(&cfg)).await.unwrap_or(pf)
    }

    async fn launch(&self, spec: &VmSpec, dir: &RunDir) -> Result<Box<dyn Vm>> {
        let cfg = self.config()?.clone();
        let flavor = cfg.flavor()?;
        let image = match &spec.boot {
            BootSpec::Image { name } => name.clone(),
            BootSpec::Kernel { kernel: None, modules: None } => cfg.image.clone(),
            BootSpec::Kernel { kernel: None, modules: Some(m) } => {
                return Err(Error::usage(format!(
                    "bhyve boots ZFS images, which bring their own modules ({}); drop --modules",
                    m.display()
                )))
            }
            BootSpec::Kernel { kernel: Some(k), .. } => {
                return Err(Error::usage(format!(
                    "bhyve boots ZFS images, not kernels ({}); drop --kernel and set VMTEST_BHYVE_IMAGE",
                    k.display()
                )))
            }
        };
        if spec.name.len() > 31 {
            return Err(Error::usage(format!(
                "VM name `{}` is longer than bhyve's 31 characters; use a shorter node name",
                spec.name
            )));
        }
        let _ = self.dev("/dev")?;
        if let Some(rom) = &cfg.bootrom {
            if !Path::new(rom).is_file() {
                return Err(Error::preflight(format!(
                    "bhyve cannot boot {}: no UEFI firmware at {rom}; {}",
                    spec.name,
                    flavor.bootrom_fix()
                )));
            }
        }
        vm::BhyveVm::launch(cfg, flavor, image, spec.clone(), dir.clone())
            .await
            .map(|v| Box::new(v) as Box<dyn Vm>)
    }

    async fn list_owned(&self) -> Result<Vec<VmRecord>> {
        let cfg = self.config()?.clone();
        cfg.flavor()?;
        tokio::task::spawn_blocking(move || teardown::list_owned(&cfg, &StateDir::from_env()))
            .await
            .map_err(|e| Error::infra(format!("listing VMs panicked: {e}")))?
    }

    async fn attach(&self, record: &VmRecord) -> Result<Box<dyn Vm>> {
        // The record has every host parameter; the login and the copy settings come from here.
        let mut cfg = self.config()?.clone();
        let data = BhyveData::from_record(record)?;
        cfg.flavor = Some(data.flavor);
        cfg.pool = data.pool.clone();
        cfg.host = data.host.clone();
        cfg.devroot = data.devroot.clone();
        vm::BhyveVm::attach(cfg, record).await.map(|v| Box::new(v) as Box<dyn Vm>)
    }

    async fn destroy_record(&self, record: &VmRecord) -> Result<()> {
        let data = BhyveData::from_record(record)?;
        let name = record.name.clone();
        tokio::task::spawn_blocking(move || teardown::destroy(&name, &data))
            .await
            .map_err(|e| Error::infra(format!("teardown panicked: {e}")))?
    }
}

fn preflight(cfg: &Config) -> Preflight {
    let mut pf = Preflight::default();
    let flavor = match cfg.flavor() {
        Ok(f) => {
            pf.push(Check::ok("host", format!("{} bhyve", f.name())));
            f
        }
        Err(e) => {
            pf.push(Check::fail("host", e.message(), "use --backend qemu"));
            return pf;
        }
    };
    for tool in ["zfs", "bhyve", "bhyvectl"] {
        match cfg.host.resolve(tool) {
            Some(p) => pf.push(Check::ok(tool, p.display().to_string())),
            None => {
                pf.push(Check::fail(tool, "not found on PATH", "bhyve and zfs ship with the OS; check PATH"))
            }
        }
    }
    if let Some(p) = cfg.host.privilege.program() {
        match cfg.host.resolve(p) {
            Some(_) => pf.push(Check::ok("privilege", format!("host commands run through {p}"))),
            None => pf.push(Check::fail(
                "privilege",
                format!("{p} not found"),
                "set VMTEST_PRIV to one of pfexec, sudo, doas, none",
            )),
        }
    }
    pf.push(vmm_check(cfg, flavor));
    if flavor == Flavor::FreeBsd {
        pf.push(nmdm_check(cfg));
    }
    if pf.passed() {
        match cfg.host.run("zfs", &["list", "-H", "-o", "name", &cfg.pool], HOST_TIMEOUT) {
            Ok(o) if o.success() => pf.push(Check::ok("pool", cfg.pool.clone())),
            Ok(o) => pf.push(Check::fail(
                "pool",
                o.message(),
                "set VMTEST_BHYVE_POOL to an existing pool (`zpool list`)",
            )),
            Err(e) => pf.push(Check::fail("pool", e.message(), "check zfs and VMTEST_PRIV")),
        }
        let base = format!("{}@base", cfg.image_dataset(&cfg.image));
        match cfg.host.run("zfs", &["list", "-H", "-o", "name", &base], HOST_TIMEOUT) {
            Ok(o) if o.success() => pf.push(Check::ok("image", base)),
            _ => pf.push(Check::warn(
                "image",
                format!("image `{}` is not imported ({base} is missing)", cfg.image),
                format!("run `vmtest image import --backend bhyve FILE {}`", cfg.image),
            )),
        }
    }
    pf.push(bootrom_check(cfg, flavor));
    pf
}

/// Is the FreeBSD kernel module `name` loaded? (`kldstat -q -m NAME` exits 0 when it is.)
fn kld_loaded(cfg: &Config, name: &str) -> bool {
    cfg.host.resolve("kldstat").is_some()
        && cfg.host.run("kldstat", &["-q", "-m", name], HOST_TIMEOUT).is_ok_and(|o| o.success())
}

/// The vmm driver. FreeBSD 15 has `/dev/vmmctl`; 14 has no such node and `/dev/vmm/` only
/// while a VM exists, so there `kldstat` tells. illumos has `/dev/vmmctl`.
fn vmm_check(cfg: &Config, flavor: Flavor) -> Check {
    let vmmctl = dev_path(&cfg.devroot, "/dev/vmmctl");
    let loaded = vmmctl.exists() || (flavor == Flavor::FreeBsd && kld_loaded(cfg, "vmm"));
    if loaded {
        return Check::ok("vmm", "the vmm driver is loaded");
    }
    match flavor {
        Flavor::FreeBsd => Check::fail(
            "vmm",
            "the vmm module is not loaded (`kldstat -q -m vmm` fails)",
            "run `kldload vmm` (and add vmm_load=\"YES\" to /boot/loader.conf)",
        ),
        Flavor::Illumos => Check::fail(
            "vmm",
            "/dev/vmmctl does not exist",
            "this host has no bhyve vmm driver; install it (pkg install system/bhyve)",
        ),
    }
}

/// FreeBSD's console is an nmdm pair: the module must be loaded, and its nodes are root's.
fn nmdm_check(cfg: &Config) -> Check {
    if !kld_loaded(cfg, "nmdm") {
        return Check::fail(
            "nmdm",
            "the nmdm module is not loaded (`kldstat -q -m nmdm` fails): bhyve cannot make the console",
            "run `kldload nmdm` (and add nmdm_load=\"YES\" to /boot/loader.conf)",
        );
    }
    match cfg.host.privilege.program() {
        Some(p) => Check::ok("nmdm", format!("loaded; the console (root-only) is opened through {p}")),
        None => Check::ok("nmdm", "loaded"),
    }
}

/// The UEFI firmware: without it (and without bhyveload) bhyve cannot boot anything.
fn bootrom_check(cfg: &Config, flavor: Flavor) -> Check {
    match &cfg.bootrom {
        Some(rom) if Path::new(rom).is_file() => Check::ok("bootrom", rom.clone()),
        Some(rom) => Check::fail(
            "bootrom",
            format!("no UEFI firmware at {rom} (looked for {})", flavor.bootrom_candidates().join(", ")),
            flavor.bootrom_fix(),
        ),
        None => match cfg.host.resolve("bhyveload") {
            Some(p) => Check::ok("bootrom", format!("none: FreeBSD guests are loaded with {}", p.display())),
            None => Check::fail(
                "bootrom",
                "VMTEST_BHYVE_BOOTROM=none but bhyveload is not on PATH",
                "bhyveload ships with FreeBSD; check PATH, or name the UEFI firmware in VMTEST_BHYVE_BOOTROM",
            ),
        },
    }
}
