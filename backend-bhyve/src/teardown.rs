//! Teardown in the reference's order, every step idempotent and every error collected; the
//! orphan sweep.

use crate::config::{Config, Flavor};
use crate::host::HostCommand;
use crate::{dev_path, BhyveData, ConsoleKind, HOST_TIMEOUT};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use vmtest_core::state::{ProcessId, StateDir, VmRecord};
use vmtest_core::{Error, Result};

/// True while the process lives. Uses the start time where `/proc` has one; elsewhere (or for
/// a process of another user) `kill(pid, 0)`.
pub fn alive(p: &ProcessId) -> bool {
    if p.pid == 0 {
        return false;
    }
    if std::path::Path::new("/proc/self/stat").exists() {
        return p.is_alive() && !is_zombie(p.pid);
    }
    // SAFETY: signal 0 only checks for existence.
    let r = unsafe { libc::kill(p.pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
        .unwrap_or(false)
}

/// Run `op` until it succeeds or says something other than "busy".
fn retry_busy<F>(data: &BhyveData, what: &str, mut op: F) -> std::result::Result<(), String>
where
    F: FnMut() -> Result<crate::host::CmdOutput>,
{
    let mut tries = 0;
    loop {
        tries += 1;
        let out = op().map_err(|e| e.message().to_owned())?;
        if out.success() {
            return Ok(());
        }
        let msg = out.message();
        let busy = msg.contains("busy");
        if !busy || tries >= data.retries.max(1) {
            return Err(format!("{what}: {msg}"));
        }
        tracing::debug!("{what}: {msg}; retrying");
        std::thread::sleep(Duration::from_millis(data.retry_pause_ms));
    }
}

/// Destroy one VM: ask bhyve to stop (TERM: the guest's power button), after the grace
/// `bhyvectl --destroy` (which makes bhyve exit), check that the kernel VM is gone, then wait
/// for the recorded process; then the tap or VNIC, `zfs destroy -r` of the clone, the console
/// socket. Parts already gone are fine.
///
/// The recorded pid may be the privilege prefix's: `sudo` forks and stays the parent of bhyve,
/// and a killed sudo leaves bhyve running. So the process is killed only as a last resort,
/// after the VM is destroyed; sudo (which relays TERM to bhyve) exits when bhyve does.
pub fn destroy(name: &str, data: &BhyveData) -> Result<()> {
    let h = &data.host;
    let mut problems: Vec<String> = Vec::new();
    let wait_gone = |pid: &ProcessId, within: Duration| {
        let deadline = Instant::now() + within;
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        !alive(pid)
    };

    // 1. Ask: bhyve turns TERM into an ACPI power-button press.
    let pid = data.pid.filter(alive);
    if let Some(pid) = pid {
        let p = pid.pid.to_string();
        if let Err(e) = h.run("kill", &["-TERM", &p], HOST_TIMEOUT) {
            problems.push(format!("kill -TERM {p}: {}", e.message()));
        }
        wait_gone(&pid, Duration::from_millis(data.stop_grace_ms));
    }

    // 2. The kernel VM outlives the process until bhyvectl destroys it; destroying it makes a
    //    running bhyve exit. Then the VM's device must be gone.
    destroy_vmm(h, &data.vm, &mut problems);
    let vmm = dev_path(&data.devroot, &format!("/dev/vmm/{}", data.vm));
    let deadline = Instant::now() + Duration::from_secs(5);
    while vmm.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if vmm.exists() {
        problems.push(format!(
            "the kernel VM {} is still there after `bhyvectl --vm={} --destroy` ({})",
            data.vm,
            data.vm,
            vmm.display()
        ));
    }

    // 3. The process (bhyve, or the sudo waiting for it) ends with the VM.
    if let Some(pid) = pid {
        if !wait_gone(&pid, Duration::from_secs(10)) {
            let p = pid.pid.to_string();
            let _ = h.run("kill", &["-KILL", &p], HOST_TIMEOUT);
            if !wait_gone(&pid, Duration::from_secs(5)) {
                problems.push(format!("bhyve (pid {p}) survived its VM's destruction and SIGKILL"));
            } else {
                tracing::warn!(
                    "pid {p} (bhyve, or the privilege prefix running it) outlived its destroyed VM {} and was \
                     killed",
                    data.vm
                );
            }
        }
    }

    // 4. Links.
    if let Some(tap) = &data.tap {
        match h.run("ifconfig", &[tap, "destroy"], HOST_TIMEOUT) {
            Ok(o) if o.success() || o.message().contains("does not exist") => {}
            Ok(o) => problems.push(format!("ifconfig {tap} destroy: {}", o.message())),
            Err(e) => problems.push(e.message().to_owned()),
        }
    }
    if let Some(vnic) = &data.vnic {
        let r = retry_busy(data, &format!("dladm delete-vnic {vnic}"), || {
            let o = h.run("dladm", &["delete-vnic", vnic], HOST_TIMEOUT)?;
            // Gone already: fine.
            Ok(if o.message().contains("not found") || o.message().contains("invalid link") {
                crate::host::CmdOutput { code: Some(0), ..o }
            } else {
                o
            })
        });
        if let Err(e) = r {
            problems.push(e);
        }
    }

    // 5. The clone, then its run parent if it is empty now.
    let r = retry_busy(data, &format!("zfs destroy -r {}", data.dataset), || {
        let o = h.run("zfs", &["destroy", "-r", &data.dataset], HOST_TIMEOUT)?;
        Ok(if o.message().contains("dataset does not exist") {
            crate::host::CmdOutput { code: Some(0), ..o }
        } else {
            o
        })
    });
    if let Err(e) = r {
        problems.push(e);
    } else if let Some((parent, _)) = data.dataset.rsplit_once('/') {
        if parent.starts_with(&format!("{}/vmtest/run/", data.pool)) {
            // Fails harmlessly ("filesystem has children") while other VMs of the run live.
            let _ = h.run("zfs", &["destroy", parent], HOST_TIMEOUT);
        }
    }

    // 6. The console socket.
    if let ConsoleKind::Socket { path } = &data.console {
        let _ = std::fs::remove_file(path);
    }

    if problems.is_empty() {
        tracing::debug!("destroyed {name}");
        Ok(())
    } else {
        Err(Error::infra(format!(
            "teardown of {name} left {} problem(s): {}; run `vmtest cleanup` to try again",
            problems.len(),
            problems.join("; ")
        )))
    }
}

fn destroy_vmm(h: &HostCommand, vm: &str, problems: &mut Vec<String>) {
    let arg = format!("--vm={vm}");
    match h.run("bhyvectl", &[&arg, "--destroy"], HOST_TIMEOUT) {
        Ok(o) if o.success() || vmm_gone(&o.message()) => {}
        Ok(o) => problems.push(format!("bhyvectl --vm={vm} --destroy: {}", o.message())),
        Err(e) => problems.push(e.message().to_owned()),
    }
}

/// bhyvectl's "no such VM" on FreeBSD (`could not be opened`) and illumos (`is not created`).
pub fn vmm_gone(msg: &str) -> bool {
    msg.contains("could not be opened") || msg.contains("is not created")
}

/// What a sweep found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// VMs (by name) that were destroyed, or would be with `list_only`.
    pub destroyed: Vec<String>,
    /// Links (taps, VNICs) removed.
    pub links: Vec<String>,
    /// Live or kept VMs left alone.
    pub skipped: Vec<String>,
    /// Steps that failed.
    pub errors: Vec<String>,
}

/// The records in the state dir, by run id, for deciding who is alive.
fn records_by_run(state: &StateDir) -> HashMap<String, Vec<VmRecord>> {
    let mut m: HashMap<String, Vec<VmRecord>> = HashMap::new();
    for (_, rec) in state.records() {
        if rec.backend == "bhyve" {
            m.entry(rec.run_id.clone()).or_default().push(rec);
        }
    }
    m
}

fn run_of(name: &str) -> Option<&str> {
    name.strip_prefix("vmt-")?.split('-').next()
}

/// A record rebuilt from what the host shows, for a VM with no record on disk.
fn rebuilt(cfg: &Config, flavor: Flavor, vm: &str, run: &str, dataset: Option<String>) -> VmRecord {
    let node = vm.strip_prefix(&format!("vmt-{run}-")).unwrap_or(vm).to_owned();
    let mut rec = VmRecord::new(vm, &node, run, "bhyve");
    rec.owner = ProcessId { pid: 0, start_time: 0 };
    rec.owner_command = String::new();
    let data = BhyveData {
        flavor,
        pool: cfg.pool.clone(),
        image: String::new(),
        dataset: dataset.unwrap_or_else(|| format!("{}/{vm}", cfg.run_dataset(run))),
        vm: vm.to_owned(),
        host: cfg.host.clone(),
        devroot: cfg.devroot.clone(),
        console: ConsoleKind::Nmdm { a: String::new(), b: String::new() },
        tap: None,
        vnic: None,
        pid: None,
        share: None,
        stop_grace_ms: cfg.stop_grace.as_millis() as u64,
        retries: cfg.retries,
        retry_pause_ms: cfg.retry_pause.as_millis() as u64,
    };
    rec.backend_data = serde_json::to_value(data).expect("serializes");
    rec
}

/// VMs vmtest created on this host: `vmtest:owner` clones and `/dev/vmm/vmt-*`, each with
/// its on-disk record when there is one (so its real owner decides), else a rebuilt record.
pub fn list_owned(cfg: &Config, state: &StateDir) -> Result<Vec<VmRecord>> {
    let flavor = cfg.flavor()?;
    let records = records_by_run(state);
    let mut out: Vec<VmRecord> = Vec::new();
    let known =
        |name: &str| -> Option<VmRecord> { records.values().flatten().find(|r| r.name == name).cloned() };
    let root = format!("{}/vmtest/run", cfg.pool);
    let listed = cfg.host.run(
        "zfs",
        &["list", "-H", "-o", "name,vmtest:owner", "-t", "volume", "-r", &root],
        HOST_TIMEOUT,
    )?;
    if listed.success() {
        for line in listed.stdout.lines() {
            let mut cols = line.split('\t');
            let (Some(ds), Some(owner)) = (cols.next(), cols.next()) else { continue };
            if owner == "-" || ds.contains("/vmtest/img/") || ds.contains('@') {
                continue;
            }
            let vm = ds.rsplit('/').next().unwrap_or(ds);
            out.push(known(vm).unwrap_or_else(|| rebuilt(cfg, flavor, vm, owner, Some(ds.to_owned()))));
        }
    } else if !listed.message().contains("dataset does not exist") {
        return Err(Error::infra(format!("`zfs list -r {root}` failed: {}", listed.message())));
    }
    if let Ok(entries) = std::fs::read_dir(dev_path(&cfg.devroot, "/dev/vmm")) {
        for e in entries.flatten() {
            let vm = e.file_name().to_string_lossy().into_owned();
            if !vm.starts_with("vmt-") || out.iter().any(|r| r.name == vm) {
                continue;
            }
            let Some(run) = run_of(&vm) else { continue };
            out.push(known(&vm).unwrap_or_else(|| rebuilt(cfg, flavor, &vm, run, None)));
        }
    }
    Ok(out)
}

pub fn sweep(cfg: &Config, state: &StateDir, list_only: bool) -> Result<SweepReport> {
    let flavor = cfg.flavor()?;
    let mut report = SweepReport::default();
    let records = records_by_run(state);
    let run_alive = |run: &str| records.get(run).is_some_and(|rs| rs.iter().any(|r| !r.is_orphan_alive()));

    for rec in list_owned(cfg, state)? {
        let live = rec.kept || (rec.owner.pid != 0 && alive(&rec.owner)) || run_alive(&rec.run_id);
        if live {
            report.skipped.push(rec.name.clone());
            continue;
        }
        report.destroyed.push(rec.name.clone());
        if list_only {
            continue;
        }
        let data = match crate::BhyveData::from_record(&rec) {
            Ok(d) => d,
            Err(e) => {
                report.errors.push(e.message().to_owned());
                continue;
            }
        };
        if let Err(e) = destroy(&rec.name, &data) {
            report.errors.push(e.message().to_owned());
        }
        // Forget its record and run dir, if any.
        for (dir, r) in state.records() {
            if r.name == rec.name {
                dir.remove_record(&r.node);
                if state.records().iter().all(|(d, _)| d.id() != dir.id()) {
                    let _ = dir.remove();
                }
            }
        }
    }

    // Empty run parents of dead runs.
    let root = format!("{}/vmtest/run", cfg.pool);
    if let Ok(o) =
        cfg.host.run("zfs", &["list", "-H", "-o", "name", "-t", "filesystem", "-r", &root], HOST_TIMEOUT)
    {
        for ds in o.stdout.lines().filter(|d| *d != root) {
            let run = ds.rsplit('/').next().unwrap_or(ds);
            if !run_alive(run) && !list_only {
                let _ = cfg.host.run("zfs", &["destroy", ds], HOST_TIMEOUT);
            }
        }
    }

    // Links of dead runs.
    let link_run =
        |desc: &str| desc.strip_prefix("vmtest:").and_then(|r| r.split(':').next()).map(str::to_owned);
    match flavor {
        Flavor::FreeBsd => {
            if let Ok(o) = cfg.host.run("ifconfig", &["-g", "tap"], HOST_TIMEOUT) {
                for tap in o.stdout.split_whitespace() {
                    let Ok(info) = cfg.host.run("ifconfig", &[tap], HOST_TIMEOUT) else { continue };
                    let desc = info.stdout.lines().find_map(|l| l.trim().strip_prefix("description: "));
                    let Some(run) = desc.and_then(link_run) else { continue };
                    if run_alive(&run) {
                        continue;
                    }
                    report.links.push(tap.to_owned());
                    if !list_only {
                        match cfg.host.run("ifconfig", &[tap, "destroy"], HOST_TIMEOUT) {
                            Ok(o) if o.success() || o.message().contains("does not exist") => {}
                            Ok(o) => report.errors.push(format!("ifconfig {tap} destroy: {}", o.message())),
                            Err(e) => report.errors.push(e.message().to_owned()),
                        }
                    }
                }
            }
        }
        Flavor::Illumos => {
            if let Ok(o) = cfg.host.run("dladm", &["show-vnic", "-p", "-o", "link"], HOST_TIMEOUT) {
                for vnic in o.stdout.lines().map(str::trim).filter(|l| l.starts_with("vmt")) {
                    let run = vnic_run(vnic);
                    if run.as_deref().is_some_and(run_alive) {
                        continue;
                    }
                    report.links.push(vnic.to_owned());
                    if list_only {
                        continue;
                    }
                    let fake = rebuilt(cfg, flavor, "vmt-x-x", "x", None);
                    let data = crate::BhyveData::from_record(&fake).expect("rebuilt records parse");
                    if let Err(e) = retry_busy(&data, &format!("dladm delete-vnic {vnic}"), || {
                        cfg.host.run("dladm", &["delete-vnic", vnic], HOST_TIMEOUT)
                    }) {
                        report.errors.push(e);
                    }
                }
            }
        }
    }

    // Stale console sockets of dead runs.
    if !list_only {
        for (dir, rec) in state.records() {
            if rec.backend == "bhyve" && rec.is_orphan() {
                if let Ok(d) = crate::BhyveData::from_record(&rec) {
                    if let ConsoleKind::Socket { path } = d.console {
                        let _ = std::fs::remove_file(path);
                    }
                }
                let _ = dir;
            }
        }
    }
    Ok(report)
}

/// The VNIC name of a VM: `vmt<run>` + the node's letters and digits + `0` (illumos link names
/// must end in a digit).
pub fn vnic_name(run: &str, node: &str) -> String {
    let clean: String = node.chars().filter(|c| c.is_ascii_alphanumeric()).take(12).collect();
    format!("vmt{run}{clean}0")
}

/// The run id in a VNIC name (run ids are 8 hex digits).
fn vnic_run(vnic: &str) -> Option<String> {
    let rest = vnic.strip_prefix("vmt")?;
    (rest.len() >= 9 && rest.is_char_boundary(8)).then(|| rest[..8].to_owned())
}

trait OrphanExt {
    fn is_orphan_alive(&self) -> bool;
}

impl OrphanExt for VmRecord {
    /// True when the record is an orphan (its owner gone and not kept), by [`alive`].
    fn is_orphan_alive(&self) -> bool {
        !self.kept && !alive(&self.owner)
    }
}
