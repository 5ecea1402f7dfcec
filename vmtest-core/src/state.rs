//! Where runs keep their state: one run dir per run under the state dir, one record per VM
//! holding everything teardown needs, so a later sweep can destroy what a killed runner left.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A process identified by pid and kernel start time, so a reused pid is never mistaken for it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessId {
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat` (clock ticks since boot); 0 when unknown.
    pub start_time: u64,
}

impl ProcessId {
    /// This process.
    pub fn current() -> Self {
        Self::of(std::process::id()).unwrap_or(ProcessId { pid: std::process::id(), start_time: 0 })
    }

    /// A live process by pid, or `None` when it does not exist.
    pub fn of(pid: u32) -> Option<Self> {
        process_start_time(pid).map(|start_time| ProcessId { pid, start_time })
    }

    /// True while this very process (same pid, same start time) runs. Where there is no
    /// Linux-style `/proc` (FreeBSD, illumos, macOS), the pid alone is checked.
    pub fn is_alive(&self) -> bool {
        if !has_linux_proc() {
            return pid_exists(self.pid);
        }
        match process_start_time(self.pid) {
            Some(t) => self.start_time == 0 || t == self.start_time,
            None => false,
        }
    }
}

fn has_linux_proc() -> bool {
    std::path::Path::new("/proc/self/stat").exists()
}

/// `kill(pid, 0)`: the process exists (EPERM means it exists but is not ours).
fn pid_exists(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    let ret = unsafe { libc::kill(pid as libc::pid_t, 0) };
    ret == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Start time of a process from `/proc/<pid>/stat`, `None` when it does not exist.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Remove the directories in `dir` named `<prefix><pid>-...` whose process is gone: work in
/// progress (a snapshot or checkpoint being written) that a killed run left behind, which
/// nothing else removes.
pub fn remove_abandoned(dir: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name.strip_prefix(prefix).and_then(|r| r.split('-').next()?.parse::<u32>().ok());
        if pid.is_some_and(|p| ProcessId::of(p).is_none()) {
            if let Err(err) = std::fs::remove_dir_all(e.path()) {
                tracing::warn!("cannot remove {}: {err}", e.path().display());
            }
        }
    }
}

/// The command line of a process, for "who holds this" messages.
pub fn process_command(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let words: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    (!words.is_empty()).then(|| words.join(" "))
}

/// Everything needed to find and destroy one VM later, from any process.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct VmRecord {
    /// Unique VM name, `vmt-<run>-<node>`.
    pub name: String,
    pub node: String,
    pub run_id: String,
    pub backend: String,
    /// The vmtest process that created it; the VM is an orphan once this is dead.
    pub owner: ProcessId,
    /// The owner's command line, for messages.
    pub owner_command: String,
    pub created_unix: u64,
    /// Hypervisor processes to kill (QEMU, bhyve).
    pub processes: Vec<ProcessId>,
    /// Files and sockets to remove (all inside the run dir unless the backend says otherwise).
    pub paths: Vec<PathBuf>,
    /// Left up on purpose (`--keep`): never swept while kept, only destroyed by name.
    pub kept: bool,
    /// Backend-specific teardown parameters (datasets, links, instance names).
    pub backend_data: serde_json::Value,
}

impl VmRecord {
    pub fn new(name: &str, node: &str, run_id: &str, backend: &str) -> Self {
        VmRecord {
            name: name.to_owned(),
            node: node.to_owned(),
            run_id: run_id.to_owned(),
            backend: backend.to_owned(),
            owner: ProcessId::current(),
            owner_command: process_command(std::process::id()).unwrap_or_default(),
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            processes: Vec::new(),
            paths: Vec::new(),
            kept: false,
            backend_data: serde_json::Value::Null,
        }
    }

    /// An orphan: not kept, and its owner is gone.
    pub fn is_orphan(&self) -> bool {
        !self.kept && !self.owner.is_alive()
    }
}

/// Run dirs are made under this prefix and renamed into place (see [`StateDir::create_run`]).
const STAGING_PREFIX: &str = ".new-";

/// The root of all run dirs.
#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// `$VMTEST_STATE_DIR`, else `$XDG_RUNTIME_DIR/vmtest`, else `/tmp/vmtest-<uid>`.
    pub fn from_env() -> Self {
        if let Some(dir) = std::env::var_os("VMTEST_STATE_DIR").filter(|v| !v.is_empty()) {
            return StateDir { root: PathBuf::from(dir) };
        }
        if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
            return StateDir { root: PathBuf::from(dir).join("vmtest") };
        }
        // SAFETY: getuid cannot fail.
        StateDir { root: PathBuf::from(format!("/tmp/vmtest-{}", unsafe { libc::getuid() })) }
    }

    pub fn at(root: impl Into<PathBuf>) -> Self {
        StateDir { root: root.into() }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Make a fresh run dir with a new unique run id.
    ///
    /// The dir appears under its id with its owner already recorded: it is made under a
    /// staging name that [`StateDir::runs`] never lists, the owner file is written, and only
    /// then is it renamed into place. Another run's sweep therefore never sees a run dir
    /// without an owner and mistakes it for a dead one.
    pub fn create_run(&self) -> Result<RunDir> {
        create_private_dir(&self.root)?;
        for _ in 0..16 {
            let id = new_run_id();
            let staging = RunDir { id: id.clone(), path: self.root.join(format!("{STAGING_PREFIX}{id}")) };
            match std::fs::create_dir(&staging.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(Error::io(format!("cannot create run dir {}", staging.path.display()), e))
                }
            }
            let run = RunDir { id: id.clone(), path: self.root.join(&id) };
            let placed = staging.write_owner().and_then(|()| {
                // A run dir in place always holds its owner file, so a rename onto an id
                // in use fails (the target is not empty) instead of replacing it.
                std::fs::rename(&staging.path, &run.path)
                    .map_err(|e| Error::io(format!("cannot create run dir {}", run.path.display()), e))
            });
            match placed {
                Ok(()) => return Ok(run),
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&staging.path);
                    if run.path.exists() {
                        continue;
                    }
                    return Err(e);
                }
            }
        }
        Err(Error::infra(format!("could not pick a free run id under {}", self.root.display())))
    }

    /// Staging dirs left by runners killed inside [`StateDir::create_run`]: the owner is dead,
    /// or no owner was written and the dir is older than a minute.
    pub fn dead_staging_dirs(&self) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(&self.root) else { return Vec::new() };
        entries
            .flatten()
            .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(STAGING_PREFIX)))
            .filter(|e| {
                let staging = RunDir { id: String::new(), path: e.path() };
                match staging.owner() {
                    Some(owner) => !owner.is_alive(),
                    None => e
                        .metadata()
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|age| age > std::time::Duration::from_secs(60)),
                }
            })
            .map(|e| e.path())
            .collect()
    }

    /// Every run dir, records or not.
    pub fn runs(&self) -> Vec<RunDir> {
        let Ok(entries) = std::fs::read_dir(&self.root) else { return Vec::new() };
        entries
            .flatten()
            .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
            .filter_map(|e| {
                let id = e.file_name().to_str()?.to_owned();
                (id.len() == 8 && id.bytes().all(|b| b.is_ascii_hexdigit()))
                    .then(|| RunDir { id, path: e.path() })
            })
            .collect()
    }

    /// The record of the VM called `name`.
    pub fn find(&self, name: &str) -> Option<(RunDir, VmRecord)> {
        self.records().into_iter().find(|(_, r)| r.name == name)
    }

    /// Every VM record under the state dir, with the run dir that holds it.
    pub fn records(&self) -> Vec<(RunDir, VmRecord)> {
        self.runs()
            .into_iter()
            .flat_map(|run| run.records().into_iter().map(move |r| (run.clone(), r)))
            .collect()
    }
}

/// One run's private directory: sockets, console logs, records.
#[derive(Clone, Debug)]
pub struct RunDir {
    id: String,
    path: PathBuf,
}

impl RunDir {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The unique VM name for a node of this run.
    pub fn vm_name(&self, node: &str) -> String {
        format!("vmt-{}-{node}", self.id)
    }

    fn owner_path(&self) -> PathBuf {
        self.path.join("run.json")
    }

    fn write_owner(&self) -> Result<()> {
        let owner = serde_json::to_vec(&ProcessId::current()).expect("serializes");
        std::fs::write(self.owner_path(), owner)
            .map_err(|e| Error::io(format!("cannot write {}", self.owner_path().display()), e))
    }

    /// The process that created this run, when known.
    pub fn owner(&self) -> Option<ProcessId> {
        std::fs::read(self.owner_path()).ok().and_then(|b| serde_json::from_slice(&b).ok())
    }

    /// The records in this run dir.
    pub fn records(&self) -> Vec<VmRecord> {
        let Ok(files) = std::fs::read_dir(&self.path) else { return Vec::new() };
        files
            .flatten()
            .map(|f| f.path())
            .filter(|p| {
                p.extension().is_some_and(|e| e == "json") && p.file_name().is_some_and(|n| n != "run.json")
            })
            .filter_map(|p| std::fs::read(&p).ok().and_then(|b| serde_json::from_slice(&b).ok()))
            .collect()
    }

    /// A VM's private directory inside the run dir (sockets must stay under 108 bytes).
    pub fn vm_dir(&self, node: &str) -> Result<PathBuf> {
        let p = self.path.join(node);
        match std::fs::create_dir(&p) {
            Ok(()) => Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(p),
            Err(e) => Err(Error::io(format!("cannot create {}", p.display()), e)),
        }
    }

    pub fn record_path(&self, node: &str) -> PathBuf {
        self.path.join(format!("{node}.json"))
    }

    /// Write a record atomically (write, then rename), so a reader never sees half of one.
    pub fn write_record(&self, record: &VmRecord) -> Result<()> {
        let path = self.record_path(&record.node);
        let tmp = self.path.join(format!(".{}.json.tmp", record.node));
        let data = serde_json::to_vec_pretty(record).expect("records serialize");
        std::fs::write(&tmp, data)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| Error::io(format!("cannot write VM record {}", path.display()), e))
    }

    pub fn remove_record(&self, node: &str) {
        let _ = std::fs::remove_file(self.record_path(node));
    }

    /// Remove the whole run dir. Only ever called on a dir this crate created.
    pub fn remove(&self) -> Result<()> {
        match std::fs::remove_dir_all(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("cannot remove run dir {}", self.path.display()), e)),
        }
    }
}

fn create_private_dir(path: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path) {
        Ok(()) => Ok(()),
        Err(e) => Err(Error::usage(format!(
            "cannot create state dir {}: {e}; set VMTEST_STATE_DIR to a writable directory",
            path.display()
        ))),
    }
}

/// Eight lowercase hex digits from the kernel's random source.
fn new_run_id() -> String {
    crate::random::hex(4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_fake_start_time_is_not() {
        let me = ProcessId::current();
        assert!(me.start_time > 0);
        assert!(me.is_alive());
        let impostor = ProcessId { pid: me.pid, start_time: me.start_time + 1 };
        assert!(!impostor.is_alive());
        assert!(!ProcessId { pid: u32::MAX - 1, start_time: 1 }.is_alive());
    }

    #[test]
    fn records_round_trip_and_are_found() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::at(tmp.path().join("state"));
        let run = state.create_run().unwrap();
        assert_eq!(run.id().len(), 8);
        let mut rec = VmRecord::new(&run.vm_name("a"), "a", run.id(), "qemu");
        rec.paths.push(run.path().join("a/agent.sock"));
        run.write_record(&rec).unwrap();
        let found = state.records();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].1, rec);
        assert!(!rec.is_orphan(), "our own record is not an orphan");
        run.remove().unwrap();
        assert!(state.records().is_empty());
    }

    #[test]
    fn run_ids_are_unique() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::at(tmp.path());
        let a = state.create_run().unwrap();
        let b = state.create_run().unwrap();
        assert_ne!(a.id(), b.id());
        assert_eq!(a.vm_name("web"), format!("vmt-{}-web", a.id()));
    }
}
