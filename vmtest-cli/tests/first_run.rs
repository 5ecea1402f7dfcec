//! The first run on a new host, for real: KVM proven on the run's own kernel (and corrected
//! when a run finds it failing), QEMU fetched when none is installed, machine output that
//! stays JSON, and QEMU failures reported as what they are.
//!
//! "Broken KVM" here is this host's own KVM, driven by real QEMU: `kvm_hang_qemu` asks for
//! the CPU model under which the machines this project runs on start a tiny guest under KVM
//! but hang a real kernel (`-cpu host,-arch-capabilities`). On a host whose KVM works, the
//! same tests check that KVM is then used instead.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A test's own cache, sharing the default kernel (no fetch) but no verdict, snapshot or
/// QEMU with other tests.
struct FreshCache {
    dir: tempfile::TempDir,
    kernel: PathBuf,
}

impl FreshCache {
    fn new(vt: &Vmtest) -> Self {
        FreshCache { dir: tempfile::tempdir().unwrap(), kernel: default_kernel(vt) }
    }

    fn cmd(&self, vt: &Vmtest) -> std::process::Command {
        let mut c = vt.cmd();
        c.env("VMTEST_CACHE_DIR", self.dir.path())
            .env("VMTEST_KERNEL", &self.kernel)
            .env_remove("VMTEST_QEMU");
        c
    }

    /// The cached KVM verdicts (one per host boot, QEMU and kernel).
    fn verdicts(&self) -> Vec<(PathBuf, serde_json::Value)> {
        let probe = self.dir.path().join("probe");
        std::fs::read_dir(probe)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name().unwrap().to_string_lossy().starts_with("kvm-")
                    && p.extension().is_some_and(|e| e == "json")
            })
            .map(|p| {
                let v = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
                (p, v)
            })
            .collect()
    }
}

/// Real QEMU with the CPU model that makes this host's KVM hang a real kernel.
fn kvm_hang_qemu(dir: &Path) -> PathBuf {
    let qemu = which("qemu-system-x86_64").expect("QEMU on PATH for this test");
    let path = dir.join("qemu-kvm-hang");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = kvm ] && exec {q} \"$@\" -cpu host,-arch-capabilities; done\nexec {q} \"$@\"\n",
            q = qemu.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(name)).find(|p| p.is_file())
}

#[test]
fn auto_never_waits_out_a_broken_kvm_and_forced_kvm_fails_fast() {
    let vt = Vmtest::new();
    let cache = FreshCache::new(&vt);
    let qemu = kvm_hang_qemu(cache.dir.path());
    let t0 = Instant::now();
    let out = cache.cmd(&vt).env("VMTEST_QEMU", &qemu).args(["run", "--", "echo", "ran"]).output().unwrap();
    let first = t0.elapsed();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "ran\n");
    let verdicts = cache.verdicts();
    assert_eq!(verdicts.len(), 1, "one verdict for this host, QEMU and kernel");
    let verdict = &verdicts[0].1;
    let evidence = verdict["evidence"].as_str().unwrap().to_owned();
    eprintln!("first run {first:?}; verdict: {verdict}");
    // Probe (<= 5 s) plus a TCG boot that also makes the snapshot: far from the 120 s boot timeout.
    assert!(first < Duration::from_secs(60), "first run took {first:?}");

    let t0 = Instant::now();
    let forced = cache
        .cmd(&vt)
        .env("VMTEST_QEMU", &qemu)
        .args(["run", "--accel", "kvm", "--", "true"])
        .output()
        .unwrap();
    let took = t0.elapsed();
    if verdict["usable"] == true {
        assert_eq!(forced.status.code(), Some(0), "KVM works here: {}", stderr(&forced));
    } else {
        assert_eq!(forced.status.code(), Some(69), "{}", stderr(&forced));
        let line = error_line(&forced);
        assert!(line.contains("--accel kvm: KVM does not work on this host"), "{line}");
        assert!(line.contains(&evidence), "the error carries the evidence: {line}");
        assert!(took < Duration::from_secs(5), "a known-broken KVM is refused at once, took {took:?}");
        let notice_lines = stderr(&out).lines().filter(|l| l.contains("using TCG")).count();
        assert_eq!(notice_lines, 1, "the fallback is said once: {}", stderr(&out));
        let again = cache.cmd(&vt).env("VMTEST_QEMU", &qemu).args(["run", "--", "true"]).output().unwrap();
        assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
        assert!(!stderr(&again).contains("using TCG"), "said once per host and verdict: {}", stderr(&again));
        let verbose =
            cache.cmd(&vt).env("VMTEST_QEMU", &qemu).args(["run", "-v", "--", "true"]).output().unwrap();
        assert!(stderr(&verbose).contains("using TCG"), "-v says it: {}", stderr(&verbose));
    }
    let doctor = cache.cmd(&vt).env("VMTEST_QEMU", &qemu).arg("doctor").output().unwrap();
    assert!(stdout(&doctor).contains(&evidence), "doctor shows the verdict's evidence: {}", stdout(&doctor));
    vt.assert_clean();
}

#[test]
fn a_run_that_finds_kvm_failing_falls_back_to_tcg_and_corrects_the_verdict() {
    let vt = Vmtest::new();
    let cache = FreshCache::new(&vt);
    let qemu = kvm_hang_qemu(cache.dir.path());
    let doctor = cache.cmd(&vt).env("VMTEST_QEMU", &qemu).arg("doctor").output().unwrap();
    let verdicts = cache.verdicts();
    assert_eq!(verdicts.len(), 1, "doctor proves KVM: {}", stdout(&doctor));
    let (path, probed) = &verdicts[0];
    // The verdict is wrong from here on (as if the host's KVM broke after it was made).
    let mut wrong = probed.clone();
    wrong["usable"] = true.into();
    wrong["evidence"] = "a verdict that no longer holds".into();
    std::fs::write(path, serde_json::to_vec(&wrong).unwrap()).unwrap();

    let t0 = Instant::now();
    let out = cache
        .cmd(&vt)
        .env("VMTEST_QEMU", &qemu)
        .args(["run", "--no-snapshot", "--", "echo", "still ran"])
        .output()
        .unwrap();
    let took = t0.elapsed();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "still ran\n");
    let after: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    if probed["usable"] == false {
        // KVM really is broken here: the run noticed, went on under TCG and said so.
        assert!(stderr(&out).contains("KVM failed on this host"), "{}", stderr(&out));
        assert!(stderr(&out).contains("retrying under TCG"), "{}", stderr(&out));
        // The 30 s agent deadline under KVM plus a cold TCG boot, well short of the 120 s boot timeout.
        assert!(took < Duration::from_secs(100), "took {took:?}, not a boot timeout");
        assert_eq!(after["usable"], false, "the verdict is corrected: {after}");
        assert!(after["evidence"].as_str().unwrap().contains("failed under KVM in a run"), "{after}");
        let next = cache
            .cmd(&vt)
            .env("VMTEST_QEMU", &qemu)
            .args(["run", "--no-snapshot", "--", "true"])
            .output()
            .unwrap();
        assert_eq!(next.status.code(), Some(0), "{}", stderr(&next));
        assert!(
            !stderr(&next).contains("retrying under TCG"),
            "the next run goes straight to TCG: {}",
            stderr(&next)
        );
    } else {
        assert_eq!(after["usable"], true, "KVM works here, and the run used it");
    }
    vt.assert_clean();
}

#[test]
fn json_mode_writes_only_json_on_stderr_besides_the_commands_own() {
    let vt = Vmtest::new();
    let cache = FreshCache::new(&vt);
    // A fresh cache: the first-run notices (acceleration verdict, snapshot) all happen here;
    // -v adds the info-level logs.
    let out = cache
        .cmd(&vt)
        .args([
            "run",
            "-v",
            "--message-format",
            "json",
            "--",
            "sh",
            "-c",
            "echo to-stdout; echo command-stderr >&2",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "to-stdout\n");
    let mut types = Vec::new();
    for line in stderr(&out).lines() {
        if line == "command-stderr" {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}\n{}", stderr(&out)));
        types.push(v["type"].as_str().unwrap().to_owned());
        if v["type"] == "log" {
            for field in ["level", "target", "message", "time"] {
                assert!(v[field].is_string(), "log event without {field}: {line}");
            }
        }
    }
    assert!(types.iter().any(|t| t == "log"), "vmtest's logs are events: {types:?}");
    assert_eq!(types.first().map(String::as_str), Some("run_started"));
    assert_eq!(types.last().map(String::as_str), Some("run_finished"));

    // An error ends the stream as JSON too.
    let bad = cache
        .cmd(&vt)
        .args(["run", "--message-format", "json", "--memory", "lots", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(64));
    for line in stderr(&bad).lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
    }
    vt.assert_clean();
}

#[test]
fn a_qemu_that_cannot_start_is_a_backend_that_cannot_run() {
    let vt = Vmtest::new();
    let cache = FreshCache::new(&vt);
    let out = cache
        .cmd(&vt)
        .env("VMTEST_QEMU", "/bin/false")
        .args(["run", "--accel", "tcg", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    assert!(error_line(&out).contains("QEMU (/bin/false) could not start"), "{}", stderr(&out));

    // A QEMU that starts and then refuses its command line says why.
    let picky = cache.dir.path().join("qemu-picky");
    let qemu = which("qemu-system-x86_64").unwrap();
    std::fs::write(&picky, format!("#!/bin/sh\nexec {} \"$@\" -no-such-option\n", qemu.display())).unwrap();
    std::fs::set_permissions(&picky, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = cache
        .cmd(&vt)
        .env("VMTEST_QEMU", &picky)
        .args(["run", "--accel", "tcg", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    assert!(error_line(&out).contains("-no-such-option"), "QEMU's own words: {}", stderr(&out));
    vt.assert_clean();
}

#[test]
fn no_backend_lists_each_backend_once_with_one_reason() {
    let vt = Vmtest::new();
    let out = vt
        .cmd()
        .env("VMTEST_QEMU", "/nonexistent/qemu")
        .env("VMTEST_MULTIPASS", "/nonexistent/multipass")
        .env_remove("VMTEST_BHYVE_FLAVOR")
        .args(["run", "--backend", "auto", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    let line = error_line(&out);
    assert!(line.contains("no backend can run here"), "{line}");
    for backend in ["qemu", "bhyve", "multipass"] {
        assert_eq!(line.matches(&format!("{backend}: ")).count(), 1, "{backend} once: {line}");
    }
    assert!(!line.contains("qemu: qemu:"), "{line}");
}

/// The README's main job on a host with no QEMU installed: vmtest fetches the distro's.
/// No system QEMU is visible: `PATH` holds only the tools the fetch and the command need,
/// and as root the system's QEMU files are masked in a mount namespace of this test's own.
#[test]
fn with_no_qemu_installed_the_distros_is_fetched_and_runs_the_command() {
    let vt = Vmtest::new();
    let cache = FreshCache::new(&vt);
    let bin = tempfile::tempdir().unwrap();
    for tool in
        ["apt-get", "apt-cache", "apt-config", "dpkg", "dpkg-deb", "dpkg-query", "tar", "sh", "uname", "cat"]
    {
        let real = which(tool).unwrap_or_else(|| panic!("{tool} on PATH"));
        std::os::unix::fs::symlink(real, bin.path().join(tool)).unwrap();
    }
    let vmtest = env!("CARGO_BIN_EXE_vmtest");
    let (unshare, mount) = (which("unshare"), which("mount"));
    let masked = unsafe { geteuid() } == 0 && unshare.is_some() && mount.is_some();
    let mut cmd = if masked {
        // Hide every place a system QEMU and its firmware and modules could be found.
        let script = "for p in /usr/bin/qemu-system-x86_64 /usr/share/qemu /usr/share/seabios \
                      /usr/lib/ipxe/qemu /usr/lib/x86_64-linux-gnu/qemu; do \
                        if [ -d \"$p\" ]; then $MOUNT -t tmpfs none \"$p\"; \
                        elif [ -e \"$p\" ]; then $MOUNT --bind /dev/null \"$p\"; fi; done; \
                      exec \"$0\" \"$@\"";
        let mut c = std::process::Command::new(unshare.unwrap());
        c.env("MOUNT", mount.unwrap()).args([
            "--mount",
            "--propagation",
            "private",
            "/bin/sh",
            "-c",
            script,
            vmtest,
        ]);
        c
    } else {
        std::process::Command::new(vmtest)
    };
    cmd.env("VMTEST_STATE_DIR", vt.state.path())
        .env("VMTEST_CACHE_DIR", cache.dir.path())
        .env("VMTEST_KERNEL", &cache.kernel)
        .env_remove("VMTEST_QEMU")
        .env_remove("VMTEST_BACKEND")
        .env("PATH", bin.path())
        .stdin(std::process::Stdio::null());
    let t0 = Instant::now();
    let out = cmd.args(["run", "--", "uname", "-a"]).output().unwrap();
    eprintln!("first run with the QEMU fetch: {:?} (masked system QEMU: {masked})", t0.elapsed());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("Linux vm "), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("no QEMU found; fetching the distro's qemu-system-x86"),
        "{}",
        stderr(&out)
    );
    let fetched: Vec<PathBuf> = std::fs::read_dir(cache.dir.path().join("qemu"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("qemu-system-x86_64"))
        .filter(|p| p.is_file())
        .collect();
    assert_eq!(fetched.len(), 1, "one QEMU in the cache");
    let which_out = cache.cmd(&vt).env("PATH", bin.path()).args(["qemu", "which"]).output().unwrap();
    assert!(stdout(&which_out).contains("fetched into the cache"), "{}", stdout(&which_out));
    vt.assert_clean();
}

/// A host without package lists (a fresh container, say): vmtest does not need root to
/// refresh them, it keeps a private copy in its cache.
#[test]
fn missing_host_package_lists_are_refreshed_privately_for_the_qemu_fetch() {
    let vt = Vmtest::new();
    let cache = FreshCache::new(&vt);
    let empty_lists = tempfile::tempdir().unwrap();
    let apt_config = cache.dir.path().join("apt.conf");
    std::fs::write(&apt_config, format!("Dir::State::Lists \"{}\";\n", empty_lists.path().display()))
        .unwrap();
    let out = cache.cmd(&vt).env("APT_CONFIG", &apt_config).args(["-v", "qemu", "fetch"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("refreshing a private copy of the package lists"), "{}", stderr(&out));
    let lists = std::fs::read_dir(cache.dir.path().join("apt/lists")).unwrap().flatten();
    assert!(
        lists.into_iter().any(|e| e.file_name().to_string_lossy().contains("_Packages")),
        "private lists"
    );
    assert_eq!(std::fs::read_dir(empty_lists.path()).unwrap().count(), 0, "the host's lists are not touched");
    let fetched = PathBuf::from(stdout(&out).split_whitespace().next().unwrap());
    let version = std::process::Command::new(&fetched).arg("--version").output().unwrap();
    assert!(stdout(&version).starts_with("QEMU emulator version"), "{}", stdout(&version));
    // Asked again, it is there already.
    let again = cache.cmd(&vt).args(["qemu", "fetch", "--if-missing"]).output().unwrap();
    assert!(
        stdout(&again).contains("nothing fetched") || stdout(&again).contains("on PATH"),
        "{}",
        stdout(&again)
    );
}

extern "C" {
    fn geteuid() -> u32;
}
