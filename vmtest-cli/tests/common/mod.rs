//! Helpers for tests that run the real `vmtest` binary against real QEMU guests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A `vmtest` invocation with its own state dir, so leftovers are visible per test.
pub struct Vmtest {
    pub state: tempfile::TempDir,
}

impl Vmtest {
    pub fn new() -> Self {
        Vmtest { state: tempfile::tempdir().unwrap() }
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vmtest"));
        c.env("VMTEST_STATE_DIR", self.state.path()).env_remove("VMTEST_BACKEND").stdin(Stdio::null());
        c
    }

    /// `vmtest run ARGS -- COMMAND`, output captured.
    pub fn run(&self, args: &[&str], command: &[&str]) -> Output {
        self.cmd().arg("run").args(args).arg("--").args(command).output().unwrap()
    }

    /// Assert nothing of this test's runs is left: no run dir, no socket, no QEMU using the
    /// state dir, no slot lock held (the slot files themselves stay, by design).
    pub fn assert_clean(&self) {
        let left: Vec<PathBuf> = std::fs::read_dir(self.state.path())
            .map(|d| d.flatten().map(|e| e.path()).filter(|p| !p.ends_with("locks")).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "state dir not empty: {left:?}");
        assert_eq!(qemu_pids_using(self.state.path()), Vec::<u32>::new(), "QEMU still running");
        for slot in std::fs::read_dir(self.state.path().join("locks")).into_iter().flatten().flatten() {
            let f = std::fs::File::open(slot.path()).unwrap();
            let free = unsafe { flock(std::os::fd::AsRawFd::as_raw_fd(&f), 2 | 4) } == 0; // LOCK_EX|LOCK_NB
            assert!(free, "{} is still locked", slot.path().display());
        }
    }
}

extern "C" {
    fn flock(fd: i32, op: i32) -> i32;
    pub fn kill(pid: i32, sig: i32) -> i32;
}

/// Wait until `cond` holds, up to `secs`; panic with `what` otherwise.
pub fn wait_until(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The kernel `vmtest kernel list` calls the default (in the shared cache).
pub fn default_kernel(vt: &Vmtest) -> PathBuf {
    let list = vt.cmd().args(["kernel", "list"]).output().unwrap();
    let default = stdout(&list).lines().find(|l| l.starts_with("default: ")).unwrap_or_default().to_owned();
    PathBuf::from(default.split_whitespace().nth(2).expect("a default kernel"))
}

/// Pids of QEMU processes whose command line mentions `dir`.
pub fn qemu_pids_using(dir: &Path) -> Vec<u32> {
    pids_with(&["qemu-system", &dir.to_string_lossy()])
}

/// Processes whose command line contains every one of `words`.
pub fn pids_with(words: &[&str]) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if words.iter().all(|w| cmdline.contains(w)) {
            pids.push(pid);
        }
    }
    pids
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The `vmtest: error:` line of a failed run.
pub fn error_line(o: &Output) -> String {
    stderr(o).lines().find(|l| l.starts_with("vmtest: error:")).unwrap_or("").to_owned()
}

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

extern "C" {
    fn geteuid() -> u32;
}

/// The shared cache, as vmtest finds it.
pub fn shared_cache() -> PathBuf {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    env("VMTEST_CACHE_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("vmtest")))
        .unwrap_or_else(|| env("HOME").expect("HOME").join(".cache/vmtest"))
}

/// A cache of its own that sees the shared cache's images, with the CI image
/// (examples/images/web.toml) built: no snapshot or checkpoint of another test or an earlier
/// run is found, and this test's go with it. `None` when not root: building needs
/// debootstrap, and the caller says so and passes vacuously, as images.rs does.
pub fn private_image_cache(vt: &Vmtest) -> Option<tempfile::TempDir> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { geteuid() } != 0 {
        eprintln!("not root: image build (debootstrap) skipped, this image test passes vacuously");
        return None;
    }
    let build =
        vt.cmd().args(["image", "build"]).arg(repo().join("examples/images/web.toml")).output().unwrap();
    assert_eq!(build.status.code(), Some(0), "{}", stderr(&build));
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(shared_cache().join("images"), dir.path().join("images")).unwrap();
    Some(dir)
}
