//! `vmtest run --backend multipass` end to end: the real binary against the fake `multipass`
//! (backend-multipass/tests/fake/multipass) on both release lines, checking exit codes,
//! messages, retries, and that nothing of the user's is deleted.

#[path = "../../backend-multipass/tests/support/fake.rs"]
mod fake;

use fake::{assert_deletes_are_safe, Fake};
use std::io::Write;
use std::process::{Command, Output, Stdio};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../backend-multipass/tests/fake/multipass");

struct Env {
    fake: Fake,
    state: tempfile::TempDir,
}

fn env(version: &str) -> Env {
    let fake = Fake::new(SCRIPT, version);
    fake.user_instance("users-own");
    fake.clear_calls();
    Env { fake, state: tempfile::tempdir().unwrap() }
}

impl Env {
    fn vmtest(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmtest"));
        cmd.args(args)
            .env("VMTEST_MULTIPASS", &self.fake.exe)
            .env("VMTEST_STATE_DIR", self.state.path())
            .env("VMTEST_MULTIPASS_STORAGE", self.fake.path())
            .env_remove("VMTEST_BACKEND")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
        let mut child = cmd.spawn().unwrap();
        if let Some(data) = stdin {
            child.stdin.take().unwrap().write_all(data).unwrap();
        }
        child.wait_with_output().unwrap()
    }

    fn run(&self, command: &[&str]) -> Output {
        let mut args = vec!["run", "--backend", "multipass", "--"];
        args.extend_from_slice(command);
        self.vmtest(&args, None)
    }

    /// Nothing of vmtest's is left: no vmt- instance, no run dir; the user's instance stays.
    fn assert_clean(&self) {
        assert_deletes_are_safe(&self.fake);
        assert_eq!(self.fake.instances(), vec![("users-own".to_owned(), "Running".to_owned())]);
        // The state dir may hold the lock slots (`locks/`); no run dir may be left.
        let runs: Vec<_> = std::fs::read_dir(self.state.path())
            .map(|d| d.flatten().map(|e| e.file_name()).filter(|n| n != "locks").collect())
            .unwrap_or_default();
        assert!(runs.is_empty(), "run dirs left: {runs:?}");
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn run_returns_the_guest_status_and_streams_output() {
    for v in ["1.16", "main"] {
        let e = env(v);
        let o = e.run(&["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 7"]);
        assert_eq!(o.status.code(), Some(7), "{v}: {}", stderr(&o));
        assert_eq!(String::from_utf8_lossy(&o.stdout), "to-stdout\n");
        assert!(
            stderr(&o).contains("to-stderr\n") && !stderr(&o).contains("__VMTEST_EXIT"),
            "{}",
            stderr(&o)
        );
        assert_eq!(e.fake.calls_of("launch").len(), 1);
        assert_eq!(e.fake.calls_of("delete").len(), 1);
        e.assert_clean();
    }
}

#[test]
fn statuses_multipass_would_mangle_come_through() {
    // 1.16 loops forever on 4 and uses 2 for its own failures; main uses 255 for its own.
    for (v, code) in [("1.16", 4), ("1.16", 2), ("main", 255), ("main", 4)] {
        let e = env(v);
        let o = e.run(&["sh", "-c", &format!("exit {code}")]);
        assert_eq!(o.status.code(), Some(code), "{v}: {}", stderr(&o));
        e.assert_clean();
    }
}

#[test]
fn backend_chosen_through_vmtest_backend_and_stdin_passed() {
    let e = env("main");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmtest"));
    cmd.args(["run", "--", "sh", "-c", "tr a-z A-Z"])
        .env("VMTEST_BACKEND", "multipass")
        .env("VMTEST_MULTIPASS", &e.fake.exe)
        .env("VMTEST_STATE_DIR", e.state.path())
        .env("VMTEST_MULTIPASS_STORAGE", e.fake.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child.stdin.take().unwrap().write_all(b"piped in\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "PIPED IN\n");
    e.assert_clean();
}

#[test]
fn daemon_down_exits_69_and_says_how_to_start_it() {
    let mut e = env("1.16");
    e.fake.set("FAKE_MULTIPASS_DAEMON", "down");
    let o = e.run(&["true"]);
    assert_eq!(o.status.code(), Some(69), "{}", stderr(&o));
    assert!(stderr(&o).contains("multipassd is not running"), "{}", stderr(&o));
    assert!(stderr(&o).contains("snap"), "{}", stderr(&o));
    assert!(e.fake.calls_of("launch").is_empty());
}

#[test]
fn missing_multipass_exits_69() {
    let e = env("1.16");
    let o = Command::new(env!("CARGO_BIN_EXE_vmtest"))
        .args(["run", "--backend", "multipass", "--", "true"])
        .env("VMTEST_MULTIPASS", e.state.path().join("no/multipass"))
        .env("VMTEST_STATE_DIR", e.state.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(69), "{}", stderr(&o));
    assert!(stderr(&o).contains("snap install multipass"), "{}", stderr(&o));
}

#[test]
fn launch_error_rows_give_the_documented_exit_codes() {
    // (version, FAKE_MULTIPASS_LAUNCH_FAIL, vmtest exit code, launches, text in the message)
    let rows = [
        (
            "1.16",
            "client-timeout,client-timeout,client-timeout",
            75,
            3,
            "Timed out waiting for instance launch.",
        ),
        (
            "main",
            "response-timeout,response-timeout,response-timeout",
            75,
            3,
            "timed out waiting for response",
        ),
        ("main", "unreachable,unreachable,unreachable", 75, 3, "Remote \"\" is unknown or unreachable."),
        ("1.16", "unreachable,ok", 0, 2, ""),
        ("1.16", "init-timeout,ok", 0, 2, ""),
        ("main", "daemon-restart,ok", 0, 2, ""),
        ("main", "kvm", 69, 1, "KVM support is not enabled"),
        ("1.16", "disk-host", 69, 1, "Available disk"),
        ("1.16", "disk-request", 64, 1, "Requested disk"),
        ("main", "qemu-memory", 71, 1, "Instance shutdown during start"),
        ("main", "being-prepared", 75, 1, "is being prepared"),
    ];
    for (v, modes, code, launches, said) in rows {
        let mut e = env(v);
        e.fake.set("FAKE_MULTIPASS_LAUNCH_FAIL", modes);
        let o = e.run(&["true"]);
        assert_eq!(o.status.code(), Some(code), "{v} {modes}: {}", stderr(&o));
        assert!(stderr(&o).contains(said), "{v} {modes}: {}", stderr(&o));
        assert_eq!(e.fake.calls_of("launch").len(), launches, "{v} {modes}");
        if code != 0 {
            let first = stderr(&o).lines().find(|l| l.starts_with("vmtest: error: ")).map(str::to_owned);
            assert!(first.is_some_and(|l| l.contains("; ")), "one line with a fix: {}", stderr(&o));
        }
        e.assert_clean();
    }
}

#[test]
fn bad_sizes_and_kernels_are_usage_errors() {
    let e = env("main");
    let o = e.vmtest(&["run", "--backend", "multipass", "--memory", "256M", "--", "true"], None);
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    assert!(stderr(&o).contains("Invalid memory size value supplied: 256M."), "{}", stderr(&o));
    let o = e.vmtest(&["run", "--backend", "multipass", "--kernel", "/boot/vmlinuz", "--", "true"], None);
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    assert!(stderr(&o).contains("boots images, not kernels"), "{}", stderr(&o));
    e.assert_clean();
}

#[test]
fn a_command_past_its_timeout_exits_124() {
    let e = env("1.16");
    let o = e.vmtest(&["run", "--backend", "multipass", "--timeout", "1s", "--", "sleep", "30"], None);
    assert_eq!(o.status.code(), Some(124), "{}", stderr(&o));
    assert!(stderr(&o).contains("timed out after"), "{}", stderr(&o));
    e.assert_clean();
}

#[test]
fn the_vm_gets_the_requested_shape() {
    let e = env("main");
    let o = e.vmtest(&["run", "--backend", "multipass", "--cpus", "2", "--memory", "1G", "--", "true"], None);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let l = e.fake.calls_of("launch").pop().unwrap();
    assert!(
        l.windows(2).any(|w| w == ["--cpus", "2"]) && l.windows(2).any(|w| w == ["--memory", "1024M"]),
        "{l:?}"
    );
    e.assert_clean();
}

#[test]
fn keep_then_exec_then_destroy() {
    let e = env("main");
    // The fake's "guest" is this host: keep what the command writes out of the source tree.
    let scratch = tempfile::tempdir().unwrap();
    let marker = scratch.path().join("marker");
    let script = format!("echo kept > {}; exit 4", marker.display());
    let o = e.vmtest(&["run", "--backend", "multipass", "--keep", "--", "sh", "-c", &script], None);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert_eq!(e.fake.calls_of("delete").len(), 0, "a kept VM is not deleted");
    let list = e.vmtest(&["list", "--json"], None);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(rows.len(), 1, "{}", String::from_utf8_lossy(&list.stdout));
    let name = rows[0]["name"].as_str().unwrap().to_owned();
    assert!(stderr(&o).contains(&format!("vmtest exec {name} -- CMD")), "{}", stderr(&o));

    let x = e.vmtest(&["exec", &name, "--", "cat", marker.to_str().unwrap()], None);
    assert_eq!(x.status.code(), Some(0), "{}", stderr(&x));
    assert_eq!(String::from_utf8_lossy(&x.stdout), "kept\n");
    assert_eq!(e.fake.calls_of("delete").len(), 0, "exec on a kept VM deletes nothing");

    let d = e.vmtest(&["destroy", &name], None);
    assert!(d.status.success(), "{}", stderr(&d));
    let deletes = e.fake.calls_of("delete");
    assert_eq!(deletes.len(), 1, "one delete --purge NAME: {deletes:?}");
    e.assert_clean();
}

#[test]
fn cleanup_after_kill_9_deletes_only_the_orphan_by_name() {
    let e = env("1.16");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmtest"))
        // The fake's "guest" is this host: the command says its pid, so the test can end it.
        .args(["run", "--backend", "multipass", "--", "sh", "-c", "echo started $$; exec sleep 60"])
        .env("VMTEST_MULTIPASS", &e.fake.exe)
        .env("VMTEST_STATE_DIR", e.state.path())
        .env("VMTEST_MULTIPASS_STORAGE", e.fake.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line)
        .unwrap();
    let guest_pid: i32 = line.trim().strip_prefix("started ").unwrap().parse().unwrap();
    child.kill().unwrap(); // SIGKILL: no teardown runs
    child.wait().unwrap();
    assert_eq!(e.fake.calls_of("delete").len(), 0);
    let dry = e.vmtest(&["cleanup", "--list-only"], None);
    assert!(
        String::from_utf8_lossy(&dry.stdout).contains("orphan"),
        "{}",
        String::from_utf8_lossy(&dry.stdout)
    );
    assert_eq!(e.fake.calls_of("delete").len(), 0, "--list-only deletes nothing");
    let c = e.vmtest(&["cleanup", "--force"], None);
    assert!(c.status.success(), "{}", stderr(&c));
    let deletes = e.fake.calls_of("delete");
    assert_eq!(deletes.len(), 1, "{deletes:?}");
    assert!(
        deletes[0].iter().any(|a| a.starts_with("vmt-")) && deletes[0].contains(&"--purge".to_owned()),
        "{deletes:?}"
    );
    e.assert_clean();
    // SAFETY: ending the fake guest's command, whose pid it printed.
    unsafe { libc_kill(guest_pid, 9) };
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// A two-node test file on the multipass backend, its files and output in `dir`.
fn two_node_file(dir: &std::path::Path, backend_line: &str, last_step: &str) -> std::path::PathBuf {
    std::fs::write(dir.join("index.html"), "hello from the host\n").unwrap();
    // The fake's guests run on this host, so guest paths live in the test's temp dir.
    let srv = dir.join("srv");
    let text = format!(
        r#"[test]
name = "mp-pair"
{backend_line}

[defaults]
image = "24.04"
memory = "1G"

[nodes.server]
files = [{{ src = "index.html", dst = "{srv}/index.html" }}]

[nodes.client]
cpus = 2

[[step]]
subtest = "files"
on = "server"
succeed = "cat {srv}/index.html"
expect_stdout = "hello from the host"

[[step]]
subtest = "everywhere"
on = "*"
succeed = "echo up"

[[step]]
subtest = "statuses"
{last_step}
"#,
        srv = srv.display()
    );
    let path = dir.join("pair.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_test_file_runs_its_nodes_as_multipass_instances() {
    for v in ["1.16", "main"] {
        let e = env(v);
        let dir = tempfile::tempdir().unwrap();
        // `fail` on status 4: 1.16's client would re-run it forever (#3771) without the sentinel.
        let file =
            two_node_file(dir.path(), r#"backend = "multipass""#, "on = \"client\"\nfail = \"exit 4\"");
        let junit = dir.path().join("junit.xml");
        let o = e.vmtest(&["test", file.to_str().unwrap(), "--junit", junit.to_str().unwrap()], None);
        assert_eq!(o.status.code(), Some(0), "{v}: {}", stderr(&o));
        assert!(stderr(&o).contains("mp-pair: PASSED (3 case(s)"), "{v}: {}", stderr(&o));
        let launches = e.fake.calls_of("launch");
        assert_eq!(launches.len(), 2, "one instance per node: {launches:?}");
        for l in &launches {
            assert_eq!(l[1], "24.04", "the node's image: {l:?}");
            assert!(l.windows(2).any(|w| w == ["--memory", "1024M"]), "{l:?}");
        }
        assert!(launches.iter().any(|l| l.windows(2).any(|w| w == ["--cpus", "2"])), "{launches:?}");
        let report = std::fs::read_to_string(&junit).unwrap();
        for case in ["files", "everywhere", "statuses"] {
            assert!(report.contains(&format!("name=\"{case}\"")), "{report}");
        }
        assert!(!report.contains("<failure"), "{report}");
        assert_eq!(e.fake.calls_of("delete").len(), 2, "{v}: one delete --purge per node");
        e.assert_clean();
    }
}

#[test]
fn a_failing_step_on_a_multipass_node_names_it_and_tears_down() {
    let e = env("main");
    let dir = tempfile::tempdir().unwrap();
    let file = two_node_file(
        dir.path(),
        "",
        "on = \"client\"\nsucceed = \"echo out-text; echo err-text >&2; exit 3\"",
    );
    let o = e.vmtest(&["test", "--backend", "multipass", file.to_str().unwrap()], None);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("pair.toml:29: succeed `echo out-text; echo err-text >&2; exit 3` on client"),
        "{err}"
    );
    assert!(err.contains("out-text") && err.contains("err-text") && err.contains("status 3"), "{err}");
    assert_eq!(e.fake.calls_of("launch").len(), 2);
    e.assert_clean();
}

#[test]
fn network_faults_on_multipass_are_refused_before_anything_launches() {
    let e = env("1.16");
    let dir = tempfile::tempdir().unwrap();
    let file =
        two_node_file(dir.path(), r#"backend = "multipass""#, "partition = [[\"client\"], [\"server\"]]");
    let o = e.vmtest(&["test", file.to_str().unwrap()], None);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(64), "{err}");
    assert!(err.contains("pair.toml:28: partition"), "{err}");
    assert!(err.contains("the multipass backend has no private networks"), "{err}");
    assert!(err.contains("nothing was booted"), "{err}");
    assert!(e.fake.calls_of("launch").is_empty(), "{:?}", e.fake.calls());
    e.assert_clean();
}
