//! Contract tests: the backend against the fake `multipass` (tests/fake/multipass), on both
//! release lines, through the same run loop the CLI uses (`vmtest_core::runner::run_command`).

#[path = "support/fake.rs"]
mod fake;

use backend_multipass::{plan_sweep, MultipassBackend, MultipassOptions, SweepAction};
use fake::{assert_deletes_are_safe, Fake};
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::Path;
use std::time::Duration;
use vmtest_core::exec::{ExecRequest, GuestUser, StdinSource};
use vmtest_core::retry::RetryPolicy;
use vmtest_core::runner::{run_command, RunOptions};
use vmtest_core::spec::{BootSpec, VmSpec};
use vmtest_core::state::{ProcessId, StateDir, VmRecord};
use vmtest_core::{CheckStatus, ErrorKind, ExitStatus, Hypervisor, Vm};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fake/multipass");
const VERSIONS: [&str; 2] = ["1.16", "main"];

fn fake(version: &str) -> Fake {
    Fake::new(SCRIPT, version)
}

fn options(f: &Fake) -> MultipassOptions {
    MultipassOptions {
        multipass: Some(f.exe.clone()),
        storage: Some(f.path().to_path_buf()),
        launch_grace: Some(Duration::from_secs(2)),
        ..Default::default()
    }
}

fn backend(f: &Fake) -> MultipassBackend {
    MultipassBackend::new(options(f))
}

fn spec() -> VmSpec {
    let mut s = VmSpec::new("", "vm");
    s.boot_timeout = Duration::from_secs(30);
    s
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy { attempts: 3, backoff: Duration::from_millis(1) }
}

/// What `vmtest run` passes, with fast retries.
fn run_opts() -> RunOptions<'static> {
    RunOptions { retry: fast_retry(), ..Default::default() }
}

fn never() -> std::future::Pending<&'static str> {
    std::future::pending()
}

/// Launch one VM in a fresh run dir of `state`.
async fn launched(f: &Fake, state: &StateDir) -> (MultipassBackend, Box<dyn Vm>, vmtest_core::state::RunDir) {
    let b = backend(f);
    let run = state.create_run().unwrap();
    let mut s = spec();
    s.name = run.vm_name("vm");
    let vm = b.launch(&s, &run).await.unwrap_or_else(|e| panic!("launch: {e} {:?}", e.detail()));
    (b, vm, run)
}

fn sh(script: &str) -> ExecRequest {
    let mut r = ExecRequest::shell(script);
    r.user = GuestUser { uid: 1000, gid: 1000, groups: vec![] };
    r
}

#[tokio::test]
async fn preflight_reads_the_daemon_from_version_json_and_lists_leftovers_by_exact_prefix() {
    for v in VERSIONS {
        let f = fake(v);
        f.user_instance("vmt-deadbeef-old");
        f.user_instance("vmtx-1");
        f.user_instance("test-vmt-1");
        assert!(f.mp(&["delete", "vmt-deadbeef-old"]).status.success());
        let pf = backend(&f).preflight().await;
        assert!(pf.passed(), "{v}: {pf:?}");
        let left = pf.checks.iter().find(|c| c.name == "multipass leftovers").unwrap();
        assert_eq!(left.status, CheckStatus::Warn);
        assert_eq!(left.detail, "1 vmt- instance(s): vmt-deadbeef-old (Deleted)", "{v}");
        let disk = pf.checks.iter().find(|c| c.name == "multipass storage").unwrap();
        assert!(
            disk.detail.contains(&f.path().display().to_string()),
            "checks the storage dir: {}",
            disk.detail
        );
        assert!(f.calls_of("list").iter().all(|c| c == &["list", "--format", "json"]));
    }
}

#[tokio::test]
async fn preflight_fails_when_version_has_no_multipassd_even_though_it_exits_0() {
    for v in VERSIONS {
        let mut f = fake(v);
        f.set("FAKE_MULTIPASS_DAEMON", "down");
        assert!(f.mp(&["version", "--format", "json"]).status.success(), "version exits 0 without a daemon");
        let err = backend(&f).preflight().await.into_result().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Preflight);
        assert!(err.message().contains("multipassd is not running"), "{err}");
        assert!(err.message().contains("snap"), "says how to fix: {err}");
    }
}

#[tokio::test]
async fn preflight_reports_socket_access_and_authentication() {
    for (mode, want) in
        [("denied", "may not use the multipass socket"), ("unauthenticated", "multipass authenticate")]
    {
        let mut f = fake("main");
        f.set("FAKE_MULTIPASS_DAEMON", mode);
        let err = backend(&f).preflight().await.into_result().unwrap_err();
        assert!(err.message().contains(want), "{mode}: {err}");
    }
}

#[tokio::test]
async fn preflight_fails_without_multipass() {
    let tmp = tempfile::tempdir().unwrap();
    let b = MultipassBackend::new(MultipassOptions {
        multipass: Some(tmp.path().join("nope/multipass")),
        ..Default::default()
    });
    let err = b.preflight().await.into_result().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Preflight);
    assert!(err.message().contains("snap install multipass"), "{err}");
}

#[tokio::test]
async fn a_run_launches_execs_and_deletes_with_the_documented_calls() {
    for v in VERSIONS {
        let f = fake(v);
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::at(tmp.path());
        f.user_instance("users-own");
        f.clear_calls();
        let out =
            run_command(&backend(&f), &state, spec(), sh("exit 33"), run_opts(), never()).await.unwrap();
        assert_eq!(out.status, ExitStatus::Code(33), "{v}");
        let launches = f.calls_of("launch");
        assert_eq!(launches.len(), 1);
        let l = &launches[0];
        let name = l[l.iter().position(|a| a == "--name").unwrap() + 1].clone();
        assert!(name.starts_with("vmt-") && name.ends_with("-vm"), "{name}");
        for pair in [["--cpus", "1"], ["--memory", "512M"], ["--disk", "10G"], ["--timeout", "600"]] {
            assert!(l.windows(2).any(|w| w == pair), "{pair:?} in {l:?}");
        }
        let execs = f.calls_of("exec");
        assert_eq!(&execs[0][..5], ["exec", "-n", name.as_str(), "--", "sh"]);
        assert_eq!(f.calls_of("delete"), vec![vec!["delete".to_owned(), "--purge".into(), name.clone()]]);
        assert_deletes_are_safe(&f);
        assert_eq!(f.instances(), vec![("users-own".to_owned(), "Running".to_owned())]);
        assert!(state.records().is_empty());
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "run dir removed");
    }
}

#[tokio::test]
async fn exec_recovers_the_true_status_where_multipass_would_loop_or_collide() {
    for v in VERSIONS {
        let f = fake(v);
        let tmp = tempfile::tempdir().unwrap();
        let (_b, vm, _run) = launched(&f, &StateDir::at(tmp.path())).await;
        for code in [0, 1, 2, 4, 5, 33, 255] {
            let out = tokio::time::timeout(Duration::from_secs(20), vm.exec(sh(&format!("exit {code}"))))
                .await
                .unwrap_or_else(|_| panic!("{v}: exit {code} hung"))
                .unwrap();
            assert_eq!(out.status, ExitStatus::Code(code), "{v}");
        }
        assert!(!f.state.join("retry-loops").exists(), "{v}: the 1.16 exit-4 loop was hit");
        let out = vm.exec(sh("echo out; printf 'err no newline' >&2")).await.unwrap();
        assert_eq!(out.stdout_lossy(), "out\n");
        assert_eq!(out.stderr_lossy(), "err no newline", "the sentinel is stripped");
        vm.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn the_fake_reproduces_the_raw_exit_4_loop_of_1_16_and_not_main() {
    let f = fake("main");
    f.user_instance("u");
    assert_eq!(f.mp(&["exec", "-n", "u", "--", "sh", "-c", "exit 4"]).status.code(), Some(4));
    let f = fake("1.16");
    f.user_instance("u");
    let mut child = std::process::Command::new(&f.exe)
        .args(["exec", "-n", "u", "--", "sh", "-c", "exit 4"])
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let loops = f.state.join("retry-loops");
    let mut n = 0;
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(50));
        n = std::fs::read_to_string(&loops).map(|s| s.lines().count()).unwrap_or(0);
        if n >= 3 {
            break;
        }
    }
    assert!(child.try_wait().unwrap().is_none(), "1.16 keeps re-running a guest exit 4");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(n >= 3, "re-ran {n} times");
}

#[tokio::test]
async fn exec_failures_on_multipass_side_are_errors_not_statuses() {
    for (v, code) in [("1.16", 2), ("main", 255)] {
        let mut f = fake(v);
        let tmp = tempfile::tempdir().unwrap();
        let (_b, vm, _run) = launched(&f, &StateDir::at(tmp.path())).await;
        f.set("FAKE_MULTIPASS_EXEC_FAIL", "ssh");
        let err = vm.exec(sh("true")).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Infrastructure, "{v}");
        assert!(
            err.message().contains(&format!("status {code}")) && err.message().contains("exec failed"),
            "{err}"
        );
        f.set("FAKE_MULTIPASS_EXEC_FAIL", "");
        vm.shutdown().await.unwrap();
        // The instance is gone: exec says so.
        let err = vm.exec(sh("true")).await.unwrap_err();
        assert!(err.message().contains("is gone") && err.message().contains("does not exist"), "{err}");
    }
}

#[tokio::test]
async fn exec_passes_argv_env_cwd_and_stdin_exactly() {
    for v in VERSIONS {
        let f = fake(v);
        let tmp = tempfile::tempdir().unwrap();
        let (_b, vm, _run) = launched(&f, &StateDir::at(tmp.path())).await;
        let weird = OsString::from_vec(b"bytes \xff 'q' \"d\" $x `y`\n".to_vec());
        let mut req = ExecRequest::new([
            OsString::from("sh"),
            "-c".into(),
            "printf '%s|' \"$@\"; printf '%s|' \"$V\" \"$(pwd)\"; cat".into(),
            "zero".into(),
            weird.clone(),
            "".into(),
        ]);
        req.env = vec![("V".into(), "v a l".into()), ("PATH".into(), "/usr/bin:/bin".into())];
        req.cwd = Some(tmp.path().to_path_buf());
        req.stdin = StdinSource::Bytes(b"from stdin".to_vec());
        let out = vm.exec(req).await.unwrap();
        let mut want = weird.into_vec();
        want.extend_from_slice(format!("||v a l|{}|from stdin", tmp.path().display()).as_bytes());
        assert_eq!(String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&want), "{v}");
        assert_eq!(out.status, ExitStatus::Code(0));
        // A null stdin is an immediate end of file, not the runner's stdin.
        let out = vm.exec(sh("cat; echo done")).await.unwrap();
        assert_eq!(out.stdout_lossy(), "done\n");
        // A cwd the guest lacks falls back to the home directory.
        let mut req = sh("pwd");
        req.cwd = Some("/nonexistent/host/dir".into());
        let out = vm.exec(req).await.unwrap();
        assert_eq!(Path::new(out.stdout_lossy().trim()), f.home(vm.name()));
        vm.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn exec_deadline_kills_the_guest_command_group() {
    let f = fake("main");
    let tmp = tempfile::tempdir().unwrap();
    let (_b, vm, _run) = launched(&f, &StateDir::at(tmp.path())).await;
    let flag = tmp.path().join("survived");
    let req = sh(&format!("(sleep 2; touch {}) & sleep 2; touch {}", flag.display(), flag.display()))
        .timeout(Duration::from_millis(700));
    let started = std::time::Instant::now();
    let err = vm.exec(req).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(err.message().contains("timed out after"), "{err}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!flag.exists(), "the guest command (and its background child) kept running");
    vm.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_root_command_past_its_deadline_is_killed_although_sudo_sets_home_to_root() {
    let f = fake("1.16");
    let tmp = tempfile::tempdir().unwrap();
    let (_b, vm, _run) = launched(&f, &StateDir::at(tmp.path())).await;
    let flag = tmp.path().join("survived");
    let mut req =
        ExecRequest::shell(&format!("sleep 2; touch {}", flag.display())).timeout(Duration::from_millis(700));
    req.user = GuestUser::ROOT;
    let err = vm.exec(req).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!flag.exists(), "the root command outlived its deadline");
    vm.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_fake_sudo_stays_the_parent_and_sets_home_to_root() {
    let sudo = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fake/guest-bin/sudo");
    let out = std::process::Command::new(sudo)
        .args(["-n", "--", "sh", "-c", "echo $HOME; ps -o ppid= -p $$"])
        .env("HOME", "/home/ubuntu")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("/root"), "{text}");
    let ppid: u32 = lines.next().unwrap().trim().parse().unwrap();
    assert_ne!(ppid, std::process::id(), "sudo exec'd the command instead of staying its parent");
}

#[tokio::test]
async fn root_commands_go_through_sudo() {
    let f = fake("1.16");
    let tmp = tempfile::tempdir().unwrap();
    let (_b, vm, _run) = launched(&f, &StateDir::at(tmp.path())).await;
    let mut req = ExecRequest::shell("exit 3");
    req.user = GuestUser::ROOT;
    assert_eq!(vm.exec(req).await.unwrap().status, ExitStatus::Code(3));
    let script = f.calls_of("exec").last().unwrap().last().unwrap().clone();
    assert!(script.contains("sudo -n -- setsid"), "{script}");
    vm.shutdown().await.unwrap();
}

#[tokio::test]
async fn copy_in_and_out_use_transfer_and_stream_where_the_snap_cannot_see() {
    for confined in [false, true] {
        let f = fake("main");
        let tmp = tempfile::tempdir().unwrap();
        let mut opts = options(&f);
        opts.confined = Some(confined);
        let b = MultipassBackend::new(opts);
        let run = StateDir::at(tmp.path().join("state")).create_run().unwrap();
        let mut s = spec();
        s.name = run.vm_name("vm");
        let vm = b.launch(&s, &run).await.unwrap();
        let src = tmp.path().join("tool.sh");
        std::fs::write(&src, "#!/bin/sh\necho tool ran\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o755)).unwrap();
        // transfer writes as the default user: the guest path is in its home.
        let guest = f.home(vm.name()).join("guest/bin/tool.sh");
        vm.copy_in(&src, &guest).await.unwrap();
        let out = vm.exec(sh(&guest.display().to_string())).await.unwrap();
        assert_eq!(out.stdout_lossy(), "tool ran\n", "copied with its mode");
        let back = tmp.path().join("back.sh");
        vm.copy_out(&guest, &back).await.unwrap();
        assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&src).unwrap());
        let transfers = f.calls_of("transfer");
        let guest_arg = format!("{}:{}", vm.name(), guest.display());
        let staged = format!("{}:.vmtest-stage-", vm.name());
        let sent_from =
            |from: &str| transfers.iter().any(|t| t.len() == 3 && t[1] == from && t[2].starts_with(&staged));
        if confined {
            assert!(sent_from("-"), "{transfers:?}");
            assert!(
                transfers.contains(&vec!["transfer".into(), guest_arg.clone(), "-".into()]),
                "{transfers:?}"
            );
        } else {
            assert!(sent_from(&src.display().to_string()), "{transfers:?}");
        }
        assert_no_staged_files(&f, vm.name());
        // Directories go as tar streams.
        let d = tmp.path().join("tree");
        std::fs::create_dir_all(d.join("a/b")).unwrap();
        std::fs::write(d.join("a/b/f"), "deep").unwrap();
        let gd = tmp.path().join("guest/tree");
        vm.copy_in(&d, &gd).await.unwrap();
        assert_eq!(std::fs::read_to_string(gd.join("a/b/f")).unwrap(), "deep");
        let hd = tmp.path().join("tree-back");
        vm.copy_out(&gd, &hd).await.unwrap();
        assert_eq!(std::fs::read_to_string(hd.join("a/b/f")).unwrap(), "deep");
        // A missing guest file is an error that says what failed.
        let err = vm.copy_out(&tmp.path().join("guest/nope"), &tmp.path().join("x")).await.unwrap_err();
        assert!(err.message().contains("copying") && err.message().contains("No such file"), "{err}");
        vm.shutdown().await.unwrap();
    }
}

/// The staged copies in the default user's home are all moved away.
fn assert_no_staged_files(f: &Fake, name: &str) {
    let left: Vec<String> = std::fs::read_dir(f.home(name))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".vmtest-stage-"))
        .collect();
    assert!(left.is_empty(), "staged files left in the guest home: {left:?}");
}

#[tokio::test]
async fn copy_in_to_a_root_owned_directory_is_staged_and_moved_with_sudo() {
    let f = fake("1.16");
    let tmp = tempfile::tempdir().unwrap();
    let (_b, vm, _run) = launched(&f, &StateDir::at(tmp.path().join("state"))).await;
    // Outside ubuntu's home and not world-writable: root's, like /opt or /usr/local/bin.
    let root_dir = tmp.path().join("opt");
    std::fs::create_dir(&root_dir).unwrap();
    let src = tmp.path().join("tool");
    std::fs::write(&src, "#!/bin/sh\necho from opt\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o750)).unwrap();
    let guest = root_dir.join("bin/tool");
    // The fake's transfer is the default user's: straight to the root-owned path it fails.
    let direct =
        f.mp(&["transfer", "-p", &src.display().to_string(), &format!("{}:{}", vm.name(), guest.display())]);
    assert_eq!(direct.status.code(), Some(2), "{}", String::from_utf8_lossy(&direct.stderr));
    vm.copy_in(&src, &guest).await.unwrap();
    assert_eq!(std::fs::read(&guest).unwrap(), std::fs::read(&src).unwrap());
    assert_eq!(std::fs::metadata(&guest).unwrap().permissions().mode() & 0o777, 0o750);
    assert_no_staged_files(&f, vm.name());
    vm.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_snap_is_detected_through_its_symlink_to_usr_bin_snap() {
    let f = fake("1.16");
    let mut opts = options(&f);
    opts.multipass = Some(f.snap());
    assert!(opts.confined.is_none(), "detected, not configured");
    let b = MultipassBackend::new(opts);
    let tmp = tempfile::Builder::new().prefix("vmt-snap").tempdir_in("/tmp").unwrap();
    let run = StateDir::at(tmp.path().join("state")).create_run().unwrap();
    let mut s = spec();
    s.name = run.vm_name("vm");
    let vm = b.launch(&s, &run).await.unwrap();
    // A file in /tmp (or a CI workspace): the confined client cannot open it, vmtest streams it.
    let src = tmp.path().join("data");
    std::fs::write(&src, "from /tmp").unwrap();
    let guest = f.home(vm.name()).join("data");
    vm.copy_in(&src, &guest).await.unwrap();
    assert_eq!(std::fs::read_to_string(&guest).unwrap(), "from /tmp");
    let back = tmp.path().join("back");
    vm.copy_out(&guest, &back).await.unwrap();
    assert_eq!(std::fs::read_to_string(&back).unwrap(), "from /tmp");
    for t in f.calls_of("transfer") {
        assert!(!t.iter().any(|a| a.starts_with("/tmp/")), "a /tmp path was given to the snap: {t:?}");
    }
    vm.shutdown().await.unwrap();
}

#[tokio::test]
async fn launch_has_a_timeout_of_its_own_not_the_boot_timeout() {
    let f = fake("main");
    let tmp = tempfile::tempdir().unwrap();
    let timeout_of = |calls: Vec<Vec<String>>| {
        let l = calls.last().unwrap().clone();
        l[l.iter().position(|a| a == "--timeout").unwrap() + 1].clone()
    };
    // The spec's boot timeout (30 s here) is for the guest, not for a first image download.
    let (_b, vm, _run) = launched(&f, &StateDir::at(tmp.path())).await;
    assert_eq!(timeout_of(f.calls_of("launch")), "600");
    vm.shutdown().await.unwrap();
    let mut opts = options(&f);
    opts.launch_timeout = Some(Duration::from_secs(900));
    let run = StateDir::at(tmp.path()).create_run().unwrap();
    let mut s = spec();
    s.name = run.vm_name("vm");
    let vm = MultipassBackend::new(opts).launch(&s, &run).await.unwrap();
    assert_eq!(timeout_of(f.calls_of("launch")), "900");
    vm.shutdown().await.unwrap();
}

/// Runs `run_command` with the fake failing launches as `modes` says.
async fn run_with_launch_failures(
    v: &str,
    modes: &str,
    tweak: impl FnOnce(&mut MultipassOptions, &mut VmSpec),
) -> (Fake, vmtest_core::Result<vmtest_core::runner::RunOutcome>) {
    let mut f = fake(v);
    f.user_instance("users-own");
    f.mp(&["launch", "--name", "users-deleted"]);
    f.mp(&["delete", "users-deleted"]);
    f.clear_calls();
    f.set("FAKE_MULTIPASS_LAUNCH_FAIL", modes);
    let tmp = tempfile::tempdir().unwrap();
    let state = StateDir::at(tmp.path());
    let mut opts = options(&f);
    let mut s = spec();
    tweak(&mut opts, &mut s);
    let b = MultipassBackend::new(opts);
    let r = run_command(&b, &state, s, sh("exit 0"), run_opts(), never()).await;
    assert!(state.records().is_empty(), "records left: {:?}", state.records());
    (f, r)
}

fn assert_users_untouched(f: &Fake) {
    assert_deletes_are_safe(f);
    let users: Vec<_> = f.instances().into_iter().filter(|(n, _)| !n.starts_with("vmt-")).collect();
    assert_eq!(
        users,
        vec![
            ("users-own".to_owned(), "Running".to_owned()),
            ("users-deleted".to_owned(), "Deleted".to_owned())
        ]
    );
    assert!(f.instances().iter().all(|(n, _)| !n.starts_with("vmt-")), "leftover: {:?}", f.instances());
}

#[tokio::test]
async fn transient_launch_failures_are_retried_after_delete_purge() {
    let rows = [
        "client-timeout",
        "response-timeout",
        "init-timeout",
        "unreachable",
        "unreachable-release",
        "no-image",
        "daemon-restart",
    ];
    for v in VERSIONS {
        for mode in rows {
            let (f, r) = run_with_launch_failures(v, &format!("{mode},ok"), |_, _| {}).await;
            let out = r.unwrap_or_else(|e| panic!("{v} {mode}: {e}"));
            assert_eq!(out.status, ExitStatus::Code(0));
            let calls = f.calls();
            let launches: Vec<usize> = (0..calls.len()).filter(|&i| calls[i][0] == "launch").collect();
            assert_eq!(launches.len(), 2, "{v} {mode}: {calls:?}");
            let name = calls[launches[1]][calls[launches[1]].iter().position(|a| a == "--name").unwrap() + 1]
                .clone();
            let between = &calls[launches[0]..launches[1]];
            assert_eq!(
                between.iter().filter(|c| c[..] == ["delete", "--purge", name.as_str()]).count(),
                1,
                "{v} {mode}: exactly one delete --purge before the retry: {between:?}"
            );
            assert_users_untouched(&f);
        }
    }
}

#[tokio::test]
async fn transient_failures_give_up_after_the_attempts_with_a_transient_error() {
    let (f, r) =
        run_with_launch_failures("1.16", "client-timeout,client-timeout,client-timeout", |_, _| {}).await;
    let err = r.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transient);
    assert!(err.message().contains("Timed out waiting for instance launch."), "{err}");
    assert!(err.message().contains("VMTEST_MULTIPASS_LAUNCH_TIMEOUT"), "{err}");
    assert_eq!(f.calls_of("launch").len(), 3);
    assert_eq!(f.calls_of("delete").len(), 3);
    assert_users_untouched(&f);
}

#[tokio::test]
async fn permanent_launch_failures_are_not_retried_and_say_how_to_fix() {
    let rows: [(&str, ErrorKind, &str); 7] = [
        ("kvm", ErrorKind::Preflight, "KVM"),
        ("kvm-busy", ErrorKind::Preflight, "other hypervisors"),
        ("disk-host", ErrorKind::Preflight, "free disk space"),
        ("disk-request", ErrorKind::Usage, "VMTEST_MULTIPASS_DISK"),
        ("qemu-memory", ErrorKind::Boot, "lower --memory"),
        ("denied", ErrorKind::Preflight, "socket"),
        ("being-prepared", ErrorKind::Infrastructure, "left alone"),
    ];
    for v in VERSIONS {
        for (mode, kind, fix) in rows {
            let (f, r) = run_with_launch_failures(v, mode, |_, _| {}).await;
            let err = r.unwrap_err();
            assert_eq!(err.kind(), kind, "{v} {mode}: {err}");
            assert!(err.message().contains(fix), "{v} {mode}: {err}");
            assert!(!err.message().contains('\n'), "one line: {err}");
            assert_eq!(f.calls_of("launch").len(), 1, "{v} {mode}: not retried");
            assert_users_untouched(&f);
        }
    }
}

#[tokio::test]
async fn usage_errors_from_multipass_are_final() {
    // Size unparsable (exit 1), below the minimum of main (exit 2), image with two colons
    // (exit 1), unknown remote (main wording, exit 2).
    type Tweak = fn(&mut MultipassOptions, &mut VmSpec);
    let rows: [(&str, Tweak, &str); 4] = [
        ("1.16", |o, _| o.disk = Some("1CiG".into()), "is not a valid disk size"),
        ("main", |_, s| s.memory_mib = 256, "Invalid memory size value supplied: 256M."),
        ("1.16", |_, s| s.boot = BootSpec::Image { name: "a:b:c".into() }, "Invalid remote and source image"),
        ("main", |_, s| s.boot = BootSpec::Image { name: "x:noble".into() }, "Remote 'x' is not found"),
    ];
    for (v, tweak, said) in rows {
        let (f, r) = run_with_launch_failures(v, "", tweak).await;
        let err = r.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Usage, "{v}: {err}");
        assert!(err.message().contains(said), "{err}");
        assert_eq!(f.calls_of("launch").len(), 1);
        assert_users_untouched(&f);
    }
    // 1.16's minimum is lower: 256M launches there.
    let (_f, r) = run_with_launch_failures("1.16", "", |_, s| s.memory_mib = 256).await;
    assert!(r.is_ok());
}

#[tokio::test]
async fn an_image_that_cannot_be_found_is_retried_as_the_reference_says() {
    let (f, r) =
        run_with_launch_failures("main", "", |_, s| s.boot = BootSpec::Image { name: "foo".into() }).await;
    let err = r.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transient);
    assert!(err.message().contains("Unable to find an image matching \"foo\""), "{err}");
    assert!(err.message().contains("multipass find --force-update"), "{err}");
    assert_eq!(f.calls_of("launch").len(), 3);
}

#[tokio::test]
async fn a_hung_launch_client_is_killed_at_the_deadline() {
    let (f, r) = run_with_launch_failures("1.16", "hang", |o, _| {
        o.launch_timeout = Some(Duration::from_secs(1));
        o.launch_grace = Some(Duration::from_secs(1));
    })
    .await;
    let err = r.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert_eq!(f.calls_of("launch").len(), 1);
    assert_users_untouched(&f);
}

#[tokio::test]
async fn a_name_taken_by_someone_else_is_never_deleted() {
    for users_state in ["Running", "Deleted"] {
        for v in VERSIONS {
            let f = fake(v);
            let tmp = tempfile::tempdir().unwrap();
            let state = StateDir::at(tmp.path());
            let run = state.create_run().unwrap();
            let mut s = spec();
            s.name = run.vm_name("vm");
            f.user_instance(&s.name);
            if users_state == "Deleted" {
                f.mp(&["delete", &s.name]);
            }
            f.clear_calls();
            let b = backend(&f);
            // The runner's loop: retries with cleanup of the run dir's records in between.
            let r = fast_retry()
                .run(
                    |_| b.launch(&s, &run),
                    || async {
                        for (dir, rec) in state.records() {
                            if dir.id() == run.id() {
                                b.destroy_record(&rec).await.unwrap();
                            }
                        }
                    },
                )
                .await;
            let err = r.err().unwrap();
            assert_eq!(err.kind(), ErrorKind::Infrastructure, "{v}: {err}");
            assert!(err.message().contains("already exists"), "{err}");
            assert!(err.message().contains(&format!("multipass delete --purge {}", s.name)), "{err}");
            assert!(f.calls_of("delete").is_empty(), "{v}: deleted the user's instance");
            assert_eq!(f.instances(), vec![(s.name.clone(), users_state.to_owned())]);
            assert!(state.records().is_empty());
        }
    }
}

#[tokio::test]
async fn daemon_down_at_launch_is_a_preflight_error() {
    let mut f = fake("main");
    f.set("FAKE_MULTIPASS_DAEMON", "down");
    let tmp = tempfile::tempdir().unwrap();
    let r =
        run_command(&backend(&f), &StateDir::at(tmp.path()), spec(), sh("true"), run_opts(), never()).await;
    let err = r.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Preflight);
    assert!(f.calls_of("launch").is_empty());
}

#[tokio::test]
async fn kernel_boot_is_a_usage_error() {
    let f = fake("main");
    let tmp = tempfile::tempdir().unwrap();
    let mut s = spec();
    s.boot = BootSpec::Kernel { kernel: Some("/boot/vmlinuz".into()), modules: None };
    let err = run_command(&backend(&f), &StateDir::at(tmp.path()), s, sh("true"), run_opts(), never())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Usage);
    assert!(err.message().contains("--backend qemu"), "{err}");
}

#[tokio::test]
async fn cloud_init_goes_through_stdin_and_the_image_is_passed() {
    let f = fake("1.16");
    let tmp = tempfile::tempdir().unwrap();
    let ci = tmp.path().join("user-data.yaml");
    std::fs::write(&ci, "#cloud-config\npackages: [jq]\n").unwrap();
    let mut opts = options(&f);
    opts.cloud_init = Some(ci);
    opts.image = Some("jammy".into());
    opts.disk = Some("6G".into());
    let b = MultipassBackend::new(opts);
    let run = StateDir::at(tmp.path().join("s")).create_run().unwrap();
    let mut s = spec();
    s.name = run.vm_name("vm");
    s.cpus = 2;
    let vm = b.launch(&s, &run).await.unwrap();
    let l = f.calls_of("launch").pop().unwrap();
    assert_eq!(l[1], "jammy");
    assert!(l.windows(2).any(|w| w == ["--cloud-init", "-"]), "{l:?}");
    assert!(
        l.windows(2).any(|w| w == ["--disk", "6G"]) && l.windows(2).any(|w| w == ["--cpus", "2"]),
        "{l:?}"
    );
    let db: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f.state.join("instances.json")).unwrap()).unwrap();
    assert_eq!(db["instances"][0]["cloud_init"], "#cloud-config\npackages: [jq]\n");
    vm.shutdown().await.unwrap();
}

#[tokio::test]
async fn list_owned_rebuilds_records_and_the_sweep_decides_by_owner() {
    for v in VERSIONS {
        let f = fake(v);
        for n in [
            "vmt-0000dead-web",
            "vmt-0000a11e-db",
            "vmt-0000beef-kept",
            "vmt-000000ff-lost",
            "vmtx-1",
            "users",
        ] {
            f.user_instance(n);
        }
        f.mp(&["delete", "vmt-0000dead-web"]);
        f.clear_calls();
        let b = backend(&f);
        let owned = b.list_owned().await.unwrap();
        let names: Vec<&str> = owned.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["vmt-0000dead-web", "vmt-0000a11e-db", "vmt-0000beef-kept", "vmt-000000ff-lost"]);
        assert_eq!((owned[0].run_id.as_str(), owned[0].node.as_str()), ("0000dead", "web"));
        assert_eq!(owned[0].backend_data["state"], "Deleted");
        assert!(!owned[0].owner.is_alive(), "a rebuilt record has no known owner");

        let dead = ProcessId { pid: u32::MAX - 7, start_time: 1 };
        let rec = |name: &str, node: &str, run: &str, owner: ProcessId, kept: bool| {
            let mut r = VmRecord::new(name, node, run, "multipass");
            r.owner = owner;
            r.kept = kept;
            r
        };
        let records = vec![
            rec("vmt-0000dead-web", "web", "0000dead", dead, false),
            rec("vmt-0000a11e-db", "db", "0000a11e", ProcessId::current(), false),
            rec("vmt-0000beef-kept", "kept", "0000beef", dead, true),
            rec("vmt-00000000-gone", "gone", "00000000", dead, false),
        ];
        let plan = plan_sweep(&owned, &records);
        let got: Vec<(&str, &SweepAction)> =
            plan.iter().map(|i| (i.record.name.as_str(), &i.action)).collect();
        assert_eq!(
            got,
            vec![
                ("vmt-0000dead-web", &SweepAction::Destroy),
                ("vmt-0000a11e-db", &SweepAction::OwnerAlive(ProcessId::current())),
                ("vmt-0000beef-kept", &SweepAction::Kept),
                ("vmt-000000ff-lost", &SweepAction::Unrecorded),
                ("vmt-00000000-gone", &SweepAction::Gone),
            ]
        );
        for item in plan.iter().filter(|i| matches!(i.action, SweepAction::Destroy | SweepAction::Gone)) {
            b.destroy_record(&item.record).await.unwrap();
        }
        let left: Vec<String> = f.instances().into_iter().map(|(n, _)| n).collect();
        assert_eq!(left, ["vmt-0000a11e-db", "vmt-0000beef-kept", "vmt-000000ff-lost", "vmtx-1", "users"]);
        assert_deletes_are_safe(&f);
    }
}

#[tokio::test]
async fn destroy_record_refuses_foreign_names_and_reports_a_dead_daemon() {
    let mut f = fake("1.16");
    f.user_instance("users");
    let b = backend(&f);
    let err = b.destroy_record(&VmRecord::new("users", "n", "r", "multipass")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Usage);
    assert!(f.calls_of("delete").is_empty());
    b.destroy_record(&VmRecord::new("vmt-12345678-missing", "n", "r", "multipass")).await.unwrap();
    f.set("FAKE_MULTIPASS_DAEMON", "down");
    let err = b.destroy_record(&VmRecord::new("vmt-12345678-x", "x", "r", "multipass")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transient);
    assert!(err.message().contains("cannot connect to the multipass socket"), "{err}");
}

#[tokio::test]
async fn a_failed_delete_keeps_the_record_for_the_sweep() {
    let mut f = fake("main");
    let tmp = tempfile::tempdir().unwrap();
    let state = StateDir::at(tmp.path());
    let (b, vm, run) = launched(&f, &state).await;
    f.set("FAKE_MULTIPASS_DELETE_FAIL", "down");
    assert!(vm.shutdown().await.is_err());
    assert_eq!(state.records().len(), 1, "record kept when delete failed");
    f.set("FAKE_MULTIPASS_DELETE_FAIL", "");
    vm.detach();
    drop(vm);
    let (_, rec) = state.records().pop().unwrap();
    b.destroy_record(&rec).await.unwrap();
    assert!(f.instances().is_empty());
    run.remove().unwrap();
}

#[tokio::test]
async fn console_is_unsupported_and_capabilities_say_so() {
    let f = fake("1.16");
    let tmp = tempfile::tempdir().unwrap();
    let (_b, vm, _run) = launched(&f, &StateDir::at(tmp.path())).await;
    assert!(!vm.capabilities().console && vm.capabilities().concurrent_exec);
    assert!(vm.console().err().unwrap().message().contains("no serial console"));
    vm.kill().await.unwrap();
    assert!(f.instances().is_empty());
}

#[test]
fn the_fake_prints_what_the_reference_pins() {
    for v in VERSIONS {
        let f = fake(v);
        let empty: serde_json::Value =
            serde_json::from_slice(&f.mp(&["list", "--format", "json"]).stdout).unwrap();
        assert_eq!(empty, serde_json::json!({"list": []}));
        assert_eq!(String::from_utf8_lossy(&f.mp(&["list"]).stdout), "No instances found.\n");
        let out = f.mp(&["launch", "--name", "pinned"]);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(stdout.contains("\x1b[2K\x1b[0A\x1b[0E"), "spinner bytes even when piped");
        let launched = if v == "main" { "Launched: pinned in zone1\n" } else { "Launched: pinned\n" };
        assert!(stdout.ends_with(launched), "{v}: {stdout:?}");
        let list = String::from_utf8_lossy(&f.mp(&["list", "--format", "json"]).stdout).into_owned();
        let pos = |k: &str| list.find(&format!("\"{k}\"")).unwrap();
        if v == "main" {
            assert!(pos("name") < pos("state") && pos("state") < pos("ipv4") && pos("release") < pos("zone"));
        } else {
            assert!(
                pos("ipv4") < pos("name") && pos("name") < pos("release") && pos("release") < pos("state")
            );
            assert!(!list.contains("zone"));
        }
        let info: serde_json::Value =
            serde_json::from_slice(&f.mp(&["info", "pinned", "--format", "json"]).stdout).unwrap();
        assert_eq!(info["errors"], serde_json::json!([]));
        assert!(
            info["info"]["pinned"]["cpu_count"].is_string()
                && info["info"]["pinned"]["memory"]["total"].is_u64()
        );
        // One missing name: exit 2, nothing on stdout, nothing deleted.
        let out = f.mp(&["delete", "--purge", "pinned", "nope"]);
        assert_eq!(out.status.code(), Some(2));
        assert!(out.stdout.is_empty());
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            "delete failed: The following errors occurred:\ninstance \"nope\" does not exist\n"
        );
        assert_eq!(f.instances().len(), 1);
        let out = f.mp(&["frobnicate"]);
        assert_eq!(out.status.code(), Some(1));
        assert!(
            String::from_utf8_lossy(&out.stdout).starts_with("Error: Unknown command or alias 'frobnicate'")
        );
        let out = f.mp(&["exec", "pinned", "ls", "-l"]);
        assert_eq!(out.status.code(), Some(1), "inner options need --");
    }
}
