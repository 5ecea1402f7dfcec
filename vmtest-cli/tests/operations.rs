//! Never leak, never collide: slots, the orphan sweep, cleanup, keep/exec/console/destroy,
//! against real QEMU guests.

mod common;

use common::{error_line, kill, qemu_pids_using, stderr, stdout, wait_until, Vmtest};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// Start `vmtest run ARGS -- sh -c SCRIPT` and wait for the line `ready` from the guest.
fn start_running(vt: &Vmtest, args: &[&str], script: &str) -> Child {
    let mut child = vt
        .cmd()
        .arg("run")
        .args(args)
        .args(["--", "sh", "-c", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready", "the guest command did not start");
    child
}

fn json_list(vt: &Vmtest) -> Vec<serde_json::Value> {
    let out = vt.cmd().args(["list", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn kill_9_of_the_runner_then_cleanup_leaves_nothing() {
    let vt = Vmtest::new();
    // --keep turns off QEMU's parent-death signal, so QEMU outlives the killed runner and
    // only the sweep can remove it.
    let mut child = start_running(&vt, &["--keep"], "echo ready; sleep 600");
    let qemu = qemu_pids_using(vt.state.path());
    assert_eq!(qemu.len(), 1);
    unsafe { kill(child.id() as i32, 9) };
    child.wait().unwrap();
    assert_eq!(qemu_pids_using(vt.state.path()), qemu, "QEMU survives its runner's SIGKILL");
    let listed = json_list(&vt);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["status"], "orphan");

    let dry = vt.cmd().args(["cleanup", "--list-only"]).output().unwrap();
    assert!(dry.status.success(), "{}", stderr(&dry));
    assert!(stdout(&dry).contains("orphan (its vmtest process is gone)"), "{}", stdout(&dry));
    assert_eq!(qemu_pids_using(vt.state.path()), qemu, "--list-only destroys nothing");

    let out = vt.cmd().args(["cleanup"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("destroyed vmt-"), "{}", stdout(&out));
    vt.assert_clean();
}

#[test]
fn the_next_run_sweeps_orphans_but_not_live_or_kept_vms() {
    let vt = Vmtest::new();
    let mut orphan_maker = start_running(&vt, &["--keep"], "echo ready; sleep 600");
    unsafe { kill(orphan_maker.id() as i32, 9) };
    orphan_maker.wait().unwrap();
    // A kept VM (its run finished) must survive the sweep.
    let kept = vt.run(&["--keep=always"], &["true"]);
    assert!(kept.status.success(), "{}", stderr(&kept));
    let before = json_list(&vt);
    assert_eq!(before.len(), 1, "the run itself swept the orphan: {before:?}");
    assert_eq!(before[0]["status"], "kept");
    // A live run is not swept by another run either.
    let mut live = start_running(&vt, &[], "echo ready; sleep 600");
    let other = vt.run(&[], &["true"]);
    assert!(other.status.success(), "{}", stderr(&other));
    let statuses: Vec<String> =
        json_list(&vt).iter().map(|v| v["status"].as_str().unwrap().to_owned()).collect();
    assert!(
        statuses.contains(&"running".to_owned()) && statuses.contains(&"kept".to_owned()),
        "{statuses:?}"
    );
    unsafe { kill(live.id() as i32, 2) };
    assert_eq!(live.wait().unwrap().code(), Some(130));
    let name = before[0]["name"].as_str().unwrap().to_owned();
    let out = vt.cmd().args(["destroy", &name]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    vt.assert_clean();
}

#[test]
fn max_vms_2_never_runs_more_than_2_qemus_and_all_8_runs_succeed() {
    let vt = Vmtest::new();
    let children: Vec<Child> = (0..8)
        .map(|i| {
            vt.cmd()
                .args(["run", "--max-vms", "2", "--", "sh", "-c", &format!("sleep 1; echo run-{i}")])
                .env("VMTEST_LOCK_TIMEOUT", "600s")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (dir, done) = (vt.state.path().to_owned(), done.clone());
        std::thread::spawn(move || {
            let (mut max, mut samples) = (0, 0);
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                max = max.max(qemu_pids_using(&dir).len());
                samples += 1;
                std::thread::sleep(Duration::from_millis(25));
            }
            (max, samples)
        })
    };
    for (i, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "run {i}: {}", stderr(&out));
        assert_eq!(stdout(&out), format!("run-{i}\n"));
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let (max, samples) = sampler.join().unwrap();
    assert!(samples > 50, "too few samples ({samples}) to mean anything");
    assert_eq!(max, 2, "at most 2 QEMU at once, and the slots were used");
    vt.assert_clean();
}

#[test]
fn a_slot_whose_holder_was_sigkilled_is_free_at_once() {
    let vt = Vmtest::new();
    let mut holder = start_running(&vt, &["--max-vms", "1"], "echo ready; sleep 600");
    unsafe { kill(holder.id() as i32, 9) };
    holder.wait().unwrap();
    let started = Instant::now();
    let out = vt
        .cmd()
        .env("VMTEST_LOCK_TIMEOUT", "60s")
        .args(["run", "--max-vms", "1", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!stderr(&out).contains("waiting for"), "it waited: {}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(60));
    vt.assert_clean();
}

#[test]
fn lock_timeout_names_the_holder_and_the_wait_is_announced_once() {
    let vt = Vmtest::new();
    let mut holder = start_running(&vt, &["--max-vms", "1"], "echo ready; sleep 600");
    let out = vt
        .cmd()
        .env("VMTEST_LOCK_TIMEOUT", "2s")
        .args(["run", "--max-vms", "1", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(124), "{}", stderr(&out));
    let who = format!("pid {}", holder.id());
    assert!(
        error_line(&out).contains("timed out after 2.00s waiting for 1 of 1 VM slot(s)"),
        "{}",
        stderr(&out)
    );
    assert!(error_line(&out).contains(&who), "holder not named: {}", stderr(&out));
    assert!(
        error_line(&out).contains("run --max-vms 1 -- sh -c"),
        "holder's command not named: {}",
        stderr(&out)
    );
    let waits = stderr(&out).lines().filter(|l| l.starts_with("vmtest: waiting for")).count();
    assert_eq!(waits, 1, "{}", stderr(&out));
    unsafe { kill(holder.id() as i32, 2) };
    assert_eq!(holder.wait().unwrap().code(), Some(130));
    vt.assert_clean();
}

#[test]
fn sigint_during_boot_tears_everything_down() {
    let vt = Vmtest::new();
    // A cold boot (seconds under TCG) so the signal lands in it; `sleep` so that even a
    // very fast boot cannot finish the run before the signal does.
    let child =
        vt.cmd().args(["run", "--no-snapshot", "--", "sleep", "600"]).stderr(Stdio::piped()).spawn().unwrap();
    wait_until(30, "QEMU to start", || !qemu_pids_using(vt.state.path()).is_empty());
    unsafe { kill(child.id() as i32, 2) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    vt.assert_clean();
}

#[test]
fn keep_then_exec_console_and_destroy() {
    let vt = Vmtest::new();
    let out = vt.run(&["--keep"], &["sh", "-c", "echo state > /root/left-behind; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let listed = json_list(&vt);
    assert_eq!(listed.len(), 1);
    let name = listed[0]["name"].as_str().unwrap().to_owned();
    assert_eq!(listed[0]["status"], "kept");
    for hint in [
        format!("vmtest console {name}"),
        format!("vmtest exec {name} -- CMD"),
        format!("vmtest destroy {name}"),
    ] {
        assert!(stderr(&out).contains(&hint), "missing `{hint}` in: {}", stderr(&out));
    }
    assert!(!qemu_pids_using(vt.state.path()).is_empty(), "the kept VM is running");

    // exec sees the state the failed run left, and passes statuses through.
    let exec = vt.cmd().args(["exec", &name, "--", "cat", "/root/left-behind"]).output().unwrap();
    assert_eq!(exec.status.code(), Some(0), "{}", stderr(&exec));
    assert_eq!(stdout(&exec), "state\n");
    let exec = vt.cmd().args(["exec", &name, "--", "sh", "-c", "exit 5"]).output().unwrap();
    assert_eq!(exec.status.code(), Some(5), "{}", stderr(&exec));

    // console: a shell on the serial port, Ctrl-] leaves without stopping the VM.
    let mut console =
        vt.cmd().args(["console", &name]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut stdin = console.stdin.take().unwrap();
    let reader = std::thread::spawn({
        let stdout = console.stdout.take().unwrap();
        move || {
            let mut all = String::new();
            for line in BufReader::new(stdout).lines() {
                all.push_str(&line.unwrap());
                all.push('\n');
            }
            all
        }
    });
    std::thread::sleep(Duration::from_secs(3));
    stdin.write_all(b"echo SUM=$((40+2))\n").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    stdin.write_all(&[0x1d]).unwrap();
    assert!(console.wait().unwrap().success());
    let screen = reader.join().unwrap();
    assert!(screen.contains("SUM=42"), "console output: {screen}");
    assert!(!qemu_pids_using(vt.state.path()).is_empty(), "leaving the console keeps the VM");

    let out = vt.cmd().args(["destroy", &name]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let again = vt.cmd().args(["exec", &name, "--", "true"]).output().unwrap();
    assert_eq!(again.status.code(), Some(64));
    assert!(error_line(&again).contains(&format!("no VM named `{name}`")), "{}", stderr(&again));
    vt.assert_clean();
}

#[test]
fn doctor_reports_every_backend_and_fails_for_an_unusable_one() {
    let vt = Vmtest::new();
    let out = vt.cmd().args(["doctor"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let text = stdout(&out);
    for line in [
        "backend qemu:",
        "backend bhyve:",
        "backend multipass:",
        "vmtest will use: qemu",
        "[ok  ] qemu:",
        "] disk:",
        "] kernel:",
        "] acceleration:",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    let out = vt
        .cmd()
        .args(["doctor", "--backend", "multipass"])
        .env("VMTEST_MULTIPASS", "/nonexistent")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "{}", stdout(&out));
}
