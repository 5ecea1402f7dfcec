//! `vmtest run` against real QEMU guests: every test boots a VM with a real kernel.

mod common;

use common::{error_line, kill, stderr, stdout, Vmtest};
use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

#[test]
fn exit_status_and_separate_streams_pass_through() {
    let vt = Vmtest::new();
    let out = vt.run(&[], &["sh", "-c", "echo to-out; echo to-err >&2; exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert_eq!(stdout(&out), "to-out\n");
    assert!(stderr(&out).contains("to-err\n"), "{}", stderr(&out));
    vt.assert_clean();
}

#[test]
fn signal_death_is_128_plus_n() {
    let vt = Vmtest::new();
    let out = vt.run(&[], &["sh", "-c", "kill -9 $$"]);
    assert_eq!(out.status.code(), Some(137), "{}", stderr(&out));
    vt.assert_clean();
}

#[test]
fn argv_is_passed_exactly_and_stdin_is_forwarded() {
    let vt = Vmtest::new();
    let mut child = vt
        .cmd()
        .args([
            "run",
            "--",
            "sh",
            "-c",
            r#"printf '[%s]' "$@"; tr a-z A-Z"#,
            "sh",
            "a b",
            "",
            "it's",
            "$HOME",
            "*",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"from stdin\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "[a b][][it's][$HOME][*]FROM STDIN\n");
    vt.assert_clean();
}

#[test]
fn runs_in_the_host_cwd_with_the_host_environment_and_user() {
    let vt = Vmtest::new();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let out = vt
        .cmd()
        .current_dir(dir.path())
        .env("VMTEST_PROBE_VAR", "from-host")
        .env("SSH_AUTH_SOCK", "/nonexistent/agent")
        .args(["run", "--env", "ADDED=1", "--", "sh", "-c"])
        .arg("pwd; echo $VMTEST_PROBE_VAR $ADDED ${SSH_AUTH_SOCK:-unset}; id -u; hostname")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let uid = unsafe { libc_getuid() };
    let expected =
        format!("{}\nfrom-host 1 unset\n{uid}\nvm\n", dir.path().canonicalize().unwrap().display());
    assert_eq!(stdout(&out), expected);
    vt.assert_clean();
}

extern "C" {
    #[link_name = "getuid"]
    fn libc_getuid() -> u32;
}

#[test]
fn guest_writes_never_reach_the_host_and_unlinked_temp_files_work() {
    let vt = Vmtest::new();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let victim = dir.path().join("keep.txt");
    std::fs::write(&victim, "original").unwrap();
    let script = format!(
        "echo changed > {v} && cat {v} && rm -f /etc/hostname && touch /usr/vmtest-was-here /tmp/vmtest-was-here && \
         python3 -c 'import tempfile; f = tempfile.TemporaryFile(); f.write(b\"ok\"); f.seek(0); print(f.read().decode())'",
        v = victim.display()
    );
    let out = vt.run(&[], &["sh", "-c", &script]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "changed\nok\n");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "original");
    assert!(!std::path::Path::new("/usr/vmtest-was-here").exists());
    assert!(!std::path::Path::new("/tmp/vmtest-was-here").exists());
    vt.assert_clean();
}

#[test]
fn output_streams_live_while_the_command_runs() {
    let vt = Vmtest::new();
    let mut child = vt
        .cmd()
        .args(["run", "--", "sh", "-c", "echo first; sleep 4; echo second"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "first");
    let first_at = Instant::now();
    assert_eq!(lines.next().unwrap().unwrap(), "second");
    assert!(first_at.elapsed() >= Duration::from_secs(3), "`first` arrived only at the end");
    assert!(child.wait().unwrap().success());
    vt.assert_clean();
}

#[test]
fn command_timeout_kills_it_and_exits_124() {
    let vt = Vmtest::new();
    let started = Instant::now();
    let out = vt.run(&["--timeout", "2s"], &["sleep", "600"]);
    assert_eq!(out.status.code(), Some(124), "{}", stderr(&out));
    assert!(error_line(&out).contains("`sleep 600` in vmt-"), "{}", stderr(&out));
    assert!(error_line(&out).contains("timed out after 2.00s; raise --timeout"), "{}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(120));
    vt.assert_clean();
}

#[test]
fn missing_command_is_127_and_a_missing_cwd_126_and_host_tmp_is_visible() {
    let vt = Vmtest::new();
    let out = vt.run(&[], &["no-such-command-anywhere"]);
    assert_eq!(out.status.code(), Some(127));
    assert!(
        stderr(&out).contains("command not found in the guest: no-such-command-anywhere"),
        "{}",
        stderr(&out)
    );
    // A working directory the guest does not have is explained.
    let out = vt.run(&["--cwd", "/nonexistent/dir"], &["true"]);
    assert_eq!(out.status.code(), Some(126), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("working directory /nonexistent/dir does not exist in the guest"),
        "{}",
        stderr(&out)
    );
    // The host's /tmp is visible (copy-on-write): a checkout or temp dir there works.
    let tmp = tempfile::tempdir_in("/tmp").unwrap();
    std::fs::write(tmp.path().join("host-file"), "from the host").unwrap();
    let out = vt.cmd().current_dir(tmp.path()).args(["run", "--", "cat", "host-file"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "from the host");
    vt.assert_clean();
}

#[test]
fn guest_panic_during_a_command_is_a_guest_failure_with_the_console_tail() {
    let vt = Vmtest::new();
    let logs = tempfile::tempdir().unwrap();
    let keep_logs = ["--root", "--failure-logs", logs.path().to_str().unwrap()];
    let out = vt.run(&keep_logs, &["sh", "-c", "echo c > /proc/sysrq-trigger; sleep 60"]);
    assert_eq!(out.status.code(), Some(71), "{}", stderr(&out));
    let err = error_line(&out);
    assert!(err.contains("the guest kernel panicked"), "{}", stderr(&out));
    assert!(stderr(&out).contains("console (last lines):"), "{}", stderr(&out));
    // The failed run's console log was kept for CI to upload.
    let kept: Vec<_> = std::fs::read_dir(logs.path()).unwrap().flatten().map(|e| e.path()).collect();
    let console =
        kept.iter().find(|p| p.to_string_lossy().ends_with("console.log")).expect("console log kept");
    assert!(std::fs::read_to_string(console).unwrap().contains("Kernel panic"), "{kept:?}");
    // A run that succeeds keeps nothing.
    let ok_logs = tempfile::tempdir().unwrap();
    let ok = vt.run(&["--failure-logs", ok_logs.path().to_str().unwrap()], &["true"]);
    assert_eq!(ok.status.code(), Some(0), "{}", stderr(&ok));
    assert_eq!(std::fs::read_dir(ok_logs.path()).unwrap().count(), 0);
    vt.assert_clean();
}

#[test]
fn boot_panic_fails_fast_with_exit_71() {
    let vt = Vmtest::new();
    let started = Instant::now();
    // No usable init: the kernel panics at boot.
    let out = vt.run(&["--kernel-args", "rdinit=/nonexistent root=/dev/nonexistent"], &["true"]);
    assert_eq!(out.status.code(), Some(71), "{}", stderr(&out));
    assert!(error_line(&out).contains("the guest kernel panicked"), "{}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(60), "a panic must not wait for the boot timeout");
    vt.assert_clean();
}

#[test]
fn boot_timeout_is_explained() {
    let vt = Vmtest::new();
    // A cold boot (no snapshot to restore) cannot reach the agent in 20ms, on any machine.
    let out = vt.run(&["--no-snapshot", "--boot-timeout", "20ms"], &["true"]);
    assert_eq!(out.status.code(), Some(71), "{}", stderr(&out));
    assert!(
        error_line(&out).contains("did not reach vmtest-agent within 20ms; raise --boot-timeout"),
        "{}",
        stderr(&out)
    );
    vt.assert_clean();
}

#[test]
fn bad_input_is_a_usage_error() {
    let vt = Vmtest::new();
    let cases: &[(&[&str], &str)] = &[
        (&["--kernel", "/nonexistent/vmlinuz"], "cannot read kernel /nonexistent/vmlinuz (from --kernel)"),
        (&["--memory", "lots"], "bad memory size `lots`"),
        (&["--timeout", "5 minutes"], "bad duration `5 minutes`"),
        (&["--accel", "hvf"], "unknown accelerator `hvf`"),
        (&["--backend", "vbox"], "unknown backend `vbox`"),
    ];
    for (args, msg) in cases {
        let out = vt.run(args, &["true"]);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
        assert!(error_line(&out).contains(msg), "{args:?}: {}", stderr(&out));
    }
    vt.assert_clean();
}

#[test]
fn missing_qemu_is_a_preflight_error_with_the_install_hint() {
    let vt = Vmtest::new();
    let out = vt
        .cmd()
        .env("VMTEST_QEMU", "/nonexistent/qemu")
        .args(["run", "--backend", "qemu", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    assert!(error_line(&out).contains("apt-get install qemu-system-x86"), "{}", stderr(&out));
    vt.assert_clean();
}

#[test]
fn timings_name_every_phase() {
    let vt = Vmtest::new();
    let out = vt.run(&["--timings"], &["true"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let line =
        stderr(&out).lines().find(|l| l.starts_with("vmtest: timings:")).unwrap_or_default().to_owned();
    for phase in ["setup ", "launch ", "command ", "teardown "] {
        assert!(line.contains(phase), "{phase} missing from {line}");
    }
    assert!(line.contains("boot ") || line.contains("restore "), "neither boot nor restore in {line}");
    let cold = vt.run(&["--timings", "--no-snapshot"], &["true"]);
    assert_eq!(cold.status.code(), Some(0), "{}", stderr(&cold));
    let line =
        stderr(&cold).lines().find(|l| l.starts_with("vmtest: timings:")).unwrap_or_default().to_owned();
    assert!(line.contains("boot ") && !line.contains("restore "), "--no-snapshot boots: {line}");
    vt.assert_clean();
}

#[test]
fn sigint_during_the_command_tears_everything_down() {
    let vt = Vmtest::new();
    let mut child = vt
        .cmd()
        .args(["run", "--", "sh", "-c", "echo running; sleep 600"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "running");
    unsafe { kill(child.id() as i32, 2) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(error_line(&out).contains("interrupted by SIGINT"), "{}", stderr(&out));
    vt.assert_clean();
}

#[test]
fn sigterm_during_boot_tears_everything_down() {
    let vt = Vmtest::new();
    // A cold boot (seconds under TCG) so the signal lands in it; `sleep` so that even a
    // very fast boot cannot finish the run before the signal does.
    let child =
        vt.cmd().args(["run", "--no-snapshot", "--", "sleep", "600"]).stderr(Stdio::piped()).spawn().unwrap();
    // Wait until QEMU is up, then interrupt the boot.
    let deadline = Instant::now() + Duration::from_secs(30);
    while common::qemu_pids_using(vt.state.path()).is_empty() {
        assert!(Instant::now() < deadline, "QEMU never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    unsafe { kill(child.id() as i32, 15) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(error_line(&out).contains("interrupted by SIGTERM"), "{}", stderr(&out));
    vt.assert_clean();
}

/// As a non-root user, the command runs as that user inside the VM, with the host's
/// permissions (root can switch to `nobody` to check it; the current uid is checked above).
#[test]
fn a_non_root_user_runs_as_itself_in_the_guest() {
    if unsafe { libc_getuid() } != 0 {
        return; // only root can become another user here; runs_in_the_host_cwd... checks our uid
    }
    let vt = Vmtest::new();
    let image = common::default_kernel(&vt);
    // Give `nobody` a kernel it can read: the kernel tree linked into a world-readable place.
    let home = tempfile::tempdir().unwrap();
    std::fs::set_permissions(home.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let tree = image.parent().unwrap().parent().unwrap();
    let copy = home.path().join("kernel");
    let linked = std::process::Command::new("cp").arg("-al").arg(tree).arg(&copy).status().unwrap();
    assert!(linked.success());
    std::process::Command::new("chmod").args(["-R", "a+rX"]).arg(&copy).status().unwrap();
    let kernel = copy.join("boot").join(image.file_name().unwrap());
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "env"])
        .arg(format!("HOME={}", home.path().display()))
        .arg(format!("VMTEST_STATE_DIR={}/state", home.path().display()))
        .arg(format!("VMTEST_CACHE_DIR={}/cache", home.path().display()))
        .arg(format!("VMTEST_KERNEL={}", kernel.display()))
        .arg(env!("CARGO_BIN_EXE_vmtest"))
        .args([
            "run",
            "--",
            "sh",
            "-c",
            "id -u; cat /etc/shadow >/dev/null 2>&1 || echo denied; touch /tmp/mine && echo wrote",
        ])
        .current_dir("/")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "65534\ndenied\nwrote\n");
    let left: Vec<_> =
        std::fs::read_dir(home.path().join("state")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.iter().all(|n| n == "locks"), "{left:?}");
}
