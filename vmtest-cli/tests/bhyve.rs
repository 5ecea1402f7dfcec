//! `vmtest run --backend bhyve` end to end against the fake bhyve host tools
//! (backend-bhyve/tests/fake): status, output, the listed errors' exit codes, and no leftovers.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Host {
    dir: tempfile::TempDir,
}

fn fake_py() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../backend-bhyve/tests/fake/fake.py")
}

impl Host {
    fn new(flavor: &str) -> Host {
        let dir = tempfile::Builder::new().prefix("bhc").tempdir_in("/tmp").unwrap();
        let h = Host { dir };
        std::fs::create_dir_all(h.p("s/dev")).unwrap();
        std::fs::write(h.p("s/dev/vmmctl"), b"").unwrap();
        std::fs::write(h.p("uefi.fd"), b"").unwrap();
        std::fs::create_dir_all(h.p("bin")).unwrap();
        for t in ["zfs", "bhyve", "bhyveload", "bhyvectl", "ifconfig", "dladm", "kldstat", "pfexec", "dd"] {
            std::os::unix::fs::symlink(fake_py(), h.p("bin").join(t)).unwrap();
        }
        std::fs::write(h.p("flavor"), flavor).unwrap();
        h
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn vmtest(&self, extra_env: &[(&str, &str)], args: &[&str]) -> Output {
        let mut c = self.vmtest_command(args);
        c.stdin(std::process::Stdio::null());
        for (k, v) in extra_env {
            c.env(k, v);
        }
        c.output().unwrap()
    }

    fn zfs(&self, args: &[&str]) {
        let flavor = std::fs::read_to_string(self.p("flavor")).unwrap();
        let st = Command::new(self.p("bin/zfs"))
            .args(args)
            .env("FAKE_BHYVE_STATE", self.p("s"))
            .env("FAKE_BHYVE_FLAVOR", flavor)
            .status()
            .unwrap();
        assert!(st.success());
    }

    fn import(&self) {
        self.zfs(&["create", "-p", "-V", "1048576", "tank/vmtest/img/img1"]);
        self.zfs(&["snapshot", "tank/vmtest/img/img1@base"]);
    }

    fn leftovers(&self) -> (Vec<String>, usize) {
        let s: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.p("s/state.json")).unwrap()).unwrap();
        let run: Vec<String> =
            s["datasets"].as_object().unwrap().keys().filter(|k| k.contains("/run/")).cloned().collect();
        let vmm = std::fs::read_dir(self.p("s/dev/vmm")).map(|d| d.count()).unwrap_or(0);
        (run, vmm)
    }
}

#[test]
fn runs_a_command_in_a_fake_freebsd_bhyve_and_returns_its_status() {
    let h = Host::new("freebsd");
    h.import();
    let out = h.vmtest(
        &[],
        &["run", "--backend", "bhyve", "--", "sh", "-c", "echo hello from bhyve; echo e >&2; exit 3"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from bhyve\n");
    assert!(stderr.contains("e\n"), "{stderr}");
    assert_eq!(h.leftovers(), (vec![], 0));
}

#[test]
fn runs_a_host_test_binary_in_a_fake_illumos_bhyve() {
    let h = Host::new("illumos");
    h.import();
    let bin = h.p("target/debug/deps/mytest-abc");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    std::fs::write(&bin, "#!/bin/sh\necho \"ran $* in $(pwd)\"\n[ \"$2\" = good ]\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let b = bin.to_str().unwrap();
    let out = h.vmtest(&[], &["run", "--backend", "bhyve", "--", b, "--exact", "good"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("ran --exact good in "), "{text}");
    let out = h.vmtest(&[], &["run", "--backend", "bhyve", "--", b, "--exact", "bad"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(h.leftovers(), (vec![], 0));
}

#[test]
fn listed_errors_map_to_their_exit_codes() {
    let h = Host::new("freebsd");
    // No image: usage (64), with the fix.
    let out = h.vmtest(&[], &["run", "--backend", "bhyve", "--", "true"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("vmtest image import --backend bhyve FILE img1"), "{stderr}");
    h.import();
    // The VMM crashes: boot failure (71) with its stderr, fast, nothing left.
    let out = h.vmtest(
        &[("FAKE_BHYVE_CRASH", "vm_create: Cannot allocate memory")],
        &["run", "--backend", "bhyve", "--", "true"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(71), "{stderr}");
    assert!(stderr.contains("Cannot allocate memory"), "{stderr}");
    assert_eq!(h.leftovers(), (vec![], 0));
    // A command past --timeout: 124.
    let out = h.vmtest(&[], &["run", "--backend", "bhyve", "--timeout", "1s", "--", "sleep", "60"]);
    assert_eq!(out.status.code(), Some(124), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(h.leftovers(), (vec![], 0));
    // Not a bhyve host and no override: preflight (69).
    let out = h.vmtest(&[("VMTEST_BHYVE_FLAVOR", "")], &["run", "--backend", "bhyve", "--", "true"]);
    assert_eq!(out.status.code(), Some(69), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn image_import_then_a_kept_run_then_destroy() {
    let h = Host::new("freebsd");
    let raw = h.p("disk.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let out = h.vmtest(&[], &["image", "import", "--backend", "bhyve", raw.to_str().unwrap(), "img1"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let list = h.vmtest(&[], &["image", "list", "--backend", "bhyve"]);
    assert!(String::from_utf8_lossy(&list.stdout).lines().any(|l| l.contains("img1")), "{list:?}");

    // A failing run with --keep stays up until destroyed.
    let out = h.vmtest(&[], &["run", "--backend", "bhyve", "--keep", "--", "sh", "-c", "exit 2"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(h.leftovers().1, 1, "the kept VM is still in /dev/vmm");
    let rows: serde_json::Value = serde_json::from_slice(&h.vmtest(&[], &["list", "--json"]).stdout).unwrap();
    let name = rows[0]["name"].as_str().unwrap().to_owned();
    assert_eq!(rows[0]["status"], "kept");
    let out = h.vmtest(&[], &["destroy", &name]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(h.leftovers(), (vec![], 0));
    // The base image is never touched by teardown.
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(h.p("s/state.json")).unwrap()).unwrap();
    assert!(s["datasets"].as_object().unwrap().keys().any(|k| k == "tank/vmtest/img/img1"), "{s}");
}

impl Host {
    /// `vmtest` with this host's env, for a caller that wires stdin/stdout itself.
    fn vmtest_command(&self, args: &[&str]) -> Command {
        let flavor = std::fs::read_to_string(self.p("flavor")).unwrap();
        let mut c = Command::new(env!("CARGO_BIN_EXE_vmtest"));
        c.args(args)
            .env("VMTEST_STATE_DIR", self.p("state"))
            .env("VMTEST_BHYVE_FLAVOR", &flavor)
            .env("VMTEST_BHYVE_PATH", self.p("bin"))
            .env("VMTEST_BHYVE_DEVROOT", self.p("s/dev"))
            .env("VMTEST_BHYVE_POOL", "tank")
            .env("VMTEST_BHYVE_IMAGE", "img1")
            .env("VMTEST_BHYVE_BOOTROM", self.p("uefi.fd"))
            .env("VMTEST_BHYVE_BAY", self.p("bay"))
            .env("VMTEST_BHYVE_SHARE", "serial")
            .env("VMTEST_PRIV", "pfexec")
            .env("FAKE_BHYVE_STATE", self.p("s"))
            .env("FAKE_BHYVE_FLAVOR", &flavor);
        c
    }

    /// How often the fake bhyve was started.
    fn bhyve_starts(&self) -> usize {
        std::fs::read_to_string(self.p("s/commands.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("[\"bhyve\""))
            .count()
    }
}

/// Destroys a kept VM if the test ends early, so no fake bhyve outlives it.
struct KeptGuard<'a> {
    host: &'a Host,
    name: String,
}

impl Drop for KeptGuard<'_> {
    fn drop(&mut self) {
        if !self.name.is_empty() {
            let _ = self.host.vmtest(&[], &["destroy", &self.name]);
        }
    }
}

fn kept_vm_takes_exec_and_console_until_destroyed(flavor: &str) {
    use std::io::{Read, Write};
    let h = Host::new(flavor);
    h.import();
    let mark = h.p("guest-state");
    let script = format!("echo written by the failed run >{}; exit 2", mark.display());
    let out = h.vmtest(&[], &["run", "--backend", "bhyve", "--keep", "--", "sh", "-c", &script]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let rows: serde_json::Value = serde_json::from_slice(&h.vmtest(&[], &["list", "--json"]).stdout).unwrap();
    let name = rows[0]["name"].as_str().unwrap().to_owned();
    let mut guard = KeptGuard { host: &h, name: name.clone() };
    assert_eq!(rows[0]["status"], "kept");
    assert!(stderr.contains(&format!("vmtest exec {name} -- CMD")), "{stderr}");
    assert_eq!(h.bhyve_starts(), 1);

    // exec: the command's status and output, in the same VM the failed run left.
    let out = h.vmtest(&[], &["exec", &name, "--", "sh", "-c", "echo hi; exit 5"]);
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    let out = h.vmtest(&[], &["exec", &name, "--", "cat", mark.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "written by the failed run\n");
    assert_eq!(h.bhyve_starts(), 1, "exec reattached; it started no new bhyve");
    let log = std::fs::read_dir(h.p("state"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("vm/console.log"))
        .find(|p| p.exists())
        .expect("the run dir's console.log");
    let before = std::fs::metadata(&log).unwrap().len();

    // console: what is typed runs in the guest; Ctrl-] leaves, the VM keeps running.
    let mut con = h
        .vmtest_command(&["console", &name])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = con.stdin.take().unwrap();
    let mut stdout = con.stdout.take().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let reader = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    stdin.write_all(b"echo SUM=$((40+2))\n").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !String::from_utf8_lossy(&seen.lock().unwrap()).contains("SUM=42") {
        if std::time::Instant::now() > deadline || con.try_wait().unwrap().is_some() {
            let _ = con.kill();
            let out = con.wait_with_output().unwrap();
            panic!(
                "no SUM=42 on the console: {:?}\nstderr: {}",
                String::from_utf8_lossy(&seen.lock().unwrap()),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    stdin.write_all(&[0x1d]).unwrap();
    drop(stdin);
    let out = con.wait_with_output().unwrap();
    reader.join().unwrap();
    let con_err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{con_err}");
    assert!(con_err.contains("it keeps running"), "{con_err}");
    assert_eq!(h.leftovers().1, 1, "the VM is still up after the console");
    let logged = String::from_utf8_lossy(&std::fs::read(&log).unwrap()[before as usize..]).into_owned();
    assert!(logged.contains("SUM=42"), "the console is teed to console.log: {logged:?}");
    let rows: serde_json::Value = serde_json::from_slice(&h.vmtest(&[], &["list", "--json"]).stdout).unwrap();
    assert_eq!(rows[0]["status"], "kept");
    // exec works again after a person used the console.
    let out = h.vmtest(&[], &["exec", &name, "--", "sh", "-c", "echo again"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "again\n");

    // destroy: nothing left but the image.
    let out = h.vmtest(&[], &["destroy", &name]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    guard.name.clear();
    assert_eq!(h.leftovers(), (vec![], 0));
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(h.p("s/state.json")).unwrap()).unwrap();
    let ds = s["datasets"].as_object().unwrap();
    assert!(ds.contains_key("tank/vmtest/img/img1") && ds.contains_key("tank/vmtest/img/img1@base"), "{s}");
    let out = h.vmtest(&[], &["exec", &name, "--", "true"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("no VM named"), "{stderr}");
}

#[test]
fn kept_freebsd_vm_takes_exec_and_console_until_destroyed() {
    kept_vm_takes_exec_and_console_until_destroyed("freebsd");
}

#[test]
fn kept_illumos_vm_takes_exec_and_console_until_destroyed() {
    kept_vm_takes_exec_and_console_until_destroyed("illumos");
}

#[test]
fn a_test_file_runs_its_nodes_as_bhyve_vms() {
    let h = Host::new("illumos");
    h.import();
    let junit = h.p("junit.xml");
    let file = h.p("pair.toml");
    std::fs::write(
        &file,
        r#"[test]
name = "bhyve-pair"
backend = "bhyve"

[nodes.a]
[nodes.b]

[[step]]
subtest = "both"
on = "*"
succeed = "echo up"
expect_stdout = "up"

[[step]]
subtest = "status"
on = "b"
fail = "exit 3"
"#,
    )
    .unwrap();
    let out = h.vmtest(&[], &["test", file.to_str().unwrap(), "--junit", junit.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("bhyve-pair: PASSED (2 case(s)"), "{err}");
    assert_eq!(h.bhyve_starts(), 2, "one bhyve per node");
    let report = std::fs::read_to_string(&junit).unwrap();
    assert!(report.contains("name=\"both\"") && report.contains("name=\"status\""), "{report}");
    assert_eq!(h.leftovers(), (vec![], 0));
}
