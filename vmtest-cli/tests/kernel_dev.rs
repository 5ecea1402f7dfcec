//! For kernel developers, tested for real. The guest kernel's bug reports: as root in the guest, a WARNING report
//! is written into /dev/kmsg (the kernel prints it on its console like one of its own), and
//! vmtest must show it with its title and trace, emit it as an event, and fail the run only
//! when asked to. An ordinary kernel message is not a report. And the gdb stub: a real gdb
//! attaches to a guest held at its first instruction, reads the program counter, and lets
//! it go; the command then runs as usual. And memory dumps: a guest that panics during a
//! run with `--failure-logs` leaves an ELF core there that gdb opens; without, nothing.

mod common;

use common::*;

/// A shell script that writes the lines of a WARNING report into the kernel's log.
fn write_warning() -> String {
    let report = [
        "------------[ cut here ]------------",
        "WARNING: CPU: 0 PID: 1 at drivers/vmtest/probe.c:42 vmtest_probe+0x10/0x20",
        "Modules linked in: 9p",
        "CPU: 0 PID: 1 Comm: sh Not tainted 6.1.0 #1",
        "Call Trace:",
        " <TASK>",
        " do_one_initcall+0x5b/0x300",
        " </TASK>",
        "---[ end trace 0000000000000000 ]---",
    ];
    // Lifted rate limit: /dev/kmsg takes only 10 lines per 5 s from user space otherwise.
    let mut script = String::from("echo on > /proc/sys/kernel/printk_devkmsg; ");
    for line in report {
        script.push_str(&format!("printf '<4>%s\\n' '{line}' > /dev/kmsg; "));
    }
    script.push_str("echo done");
    script
}

#[test]
fn a_warning_is_reported_with_its_trace_and_the_status_stays_the_commands() {
    let vt = Vmtest::new();
    let out = vt.run(&["--root"], &["sh", "-c", &write_warning()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "done\n");
    let err = stderr(&out);
    assert!(err.contains("reported: WARNING in vmtest_probe"), "{err}");
    assert!(
        err.contains("  | do_one_initcall+0x5b/0x300") || err.contains("  |  do_one_initcall+0x5b/0x300"),
        "{err}"
    );
    assert!(err.contains("---[ end trace 0000000000000000 ]---"), "{err}");
    vt.assert_clean();
}

#[test]
fn a_warning_fails_the_run_with_70_when_asked_and_is_a_json_event() {
    let vt = Vmtest::new();
    let out = vt.run(
        &["--root", "--kernel-warnings", "fail", "--message-format", "json"],
        &["sh", "-c", &write_warning()],
    );
    assert_eq!(out.status.code(), Some(70), "{}", stderr(&out));
    let events: Vec<serde_json::Value> =
        stderr(&out).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let report = events.iter().find(|e| e["type"] == "kernel_report").expect("a kernel_report event");
    assert_eq!(report["title"], "WARNING in vmtest_probe");
    assert_eq!(report["kind"], "warning");
    assert!(report["text"].as_str().unwrap().contains("do_one_initcall"), "{report}");
    let last = events.last().unwrap();
    assert_eq!(last["type"], "run_finished");
    assert_eq!(last["exit_code"], 70);
    assert!(last["error"]["message"].as_str().unwrap().contains("WARNING in vmtest_probe"), "{last}");
    vt.assert_clean();
}

#[test]
fn ordinary_kernel_messages_and_ignore_mode_report_nothing() {
    let vt = Vmtest::new();
    let ordinary = "echo on > /proc/sys/kernel/printk_devkmsg; \
                    printf '<4>%s\\n' 'virtio_net virtio1 eth0: renamed from eth1' > /dev/kmsg; \
                    printf '<3>%s\\n' 'EXT4-fs (vda): warning: mounting fs with errors' > /dev/kmsg; echo done";
    let out = vt.run(&["--root", "--kernel-warnings", "fail"], &["sh", "-c", ordinary]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!stderr(&out).contains("reported:"), "{}", stderr(&out));

    let out = vt.run(&["--root", "--kernel-warnings", "ignore"], &["sh", "-c", &write_warning()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!stderr(&out).contains("reported:"), "{}", stderr(&out));
    vt.assert_clean();
}

#[test]
fn gdb_attaches_to_a_held_guest_and_the_command_still_runs() {
    use std::io::{BufRead, BufReader};
    let Some(gdb) =
        ["/usr/bin/gdb", "/usr/local/bin/gdb"].into_iter().find(|p| std::path::Path::new(p).exists())
    else {
        panic!("this test needs gdb (apt-get install gdb)");
    };
    let vt = Vmtest::new();
    let mut child = vt
        .cmd()
        .args(["run", "--gdb-wait", "--", "echo", "ran after gdb"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut notice = String::new();
    while !notice.contains("gdb stub on 127.0.0.1:") {
        notice.clear();
        assert!(err.read_line(&mut notice).unwrap() > 0, "vmtest ended before printing the gdb command");
    }
    assert!(notice.contains("gdb -ex 'target remote 127.0.0.1:"), "{notice}");
    let port = notice
        .split("127.0.0.1:")
        .nth(1)
        .unwrap()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .to_owned();
    let out = std::process::Command::new(gdb)
        .args(["-batch", "-nx", "-ex", "set architecture i386:x86-64"])
        .args(["-ex", &format!("target remote 127.0.0.1:{port}"), "-ex", "p/x $pc", "-ex", "detach"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("$1 = 0x"),
        "gdb read the program counter: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = child.wait().unwrap();
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut stdout).unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(stdout, "ran after gdb\n");
    vt.assert_clean();
}

/// As root in the guest: crash the kernel through sysrq.
const CRASH: &str = "echo 1 > /proc/sys/kernel/sysrq; echo c > /proc/sysrq-trigger; sleep 60";

#[test]
fn a_panic_with_failure_logs_leaves_a_memory_dump_that_gdb_opens() {
    // Twice: the first run makes the dumpable guests' snapshot, the second is restored from it.
    for _ in 0..2 {
        panic_leaves_a_dump();
    }
}

fn panic_leaves_a_dump() {
    let vt = Vmtest::new();
    let logs = tempfile::tempdir().unwrap();
    let out = vt.run(&["--root", "--failure-logs", logs.path().to_str().unwrap()], &["sh", "-c", CRASH]);
    assert_eq!(out.status.code(), Some(71), "{}", stderr(&out));
    assert!(error_line(&out).contains("the guest kernel panicked"), "{}", stderr(&out));
    let kept: Vec<_> = std::fs::read_dir(logs.path()).unwrap().flatten().map(|e| e.path()).collect();
    let dump = kept
        .iter()
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("vmcore-"))
        .unwrap_or_else(|| panic!("no dump among {kept:?}: {}", stderr(&out)));
    assert!(stderr(&out).contains(&format!("guest memory dump (512 MiB, ELF core): {}", dump.display())));
    // About the guest's memory (512M by default), no more.
    let size = std::fs::metadata(dump).unwrap().len();
    assert!((512 << 20..=(512 << 20) + (16 << 20)).contains(&size), "{size}");
    let file = std::process::Command::new("file").arg(dump).output().expect("file(1) (apt-get install file)");
    let said = stdout(&file);
    assert!(said.contains("ELF 64-bit LSB core file, x86-64"), "{said}");
    // gdb opens it, with the guest's CPU in the kernel when it panicked.
    let gdb = std::process::Command::new("gdb")
        .args(["-batch", "-nx", "-ex", "set architecture i386:x86-64", "-ex", "info registers rip"])
        .args(["-core", &dump.to_string_lossy()])
        .output()
        .expect("gdb (apt-get install gdb)");
    let said = stdout(&gdb);
    assert!(said.contains("rip            0xffffffff"), "{said}{}", String::from_utf8_lossy(&gdb.stderr));
    vt.assert_clean();
}

#[test]
fn a_panic_without_failure_logs_or_over_the_bound_leaves_no_dump() {
    let vt = Vmtest::new();
    let cwd = tempfile::tempdir().unwrap();
    let out =
        vt.cmd().current_dir(cwd.path()).args(["run", "--root", "--", "sh", "-c", CRASH]).output().unwrap();
    assert_eq!(out.status.code(), Some(71), "{}", stderr(&out));
    assert!(!stderr(&out).contains("memory dump"), "{}", stderr(&out));
    assert_eq!(std::fs::read_dir(cwd.path()).unwrap().count(), 0);
    vt.assert_clean();
    // Over $VMTEST_DUMP_MAX: the logs are kept, the dump refused, and the run says why.
    let logs = tempfile::tempdir().unwrap();
    let out = vt
        .cmd()
        .env("VMTEST_DUMP_MAX", "256M")
        .args(["run", "--root", "--failure-logs", logs.path().to_str().unwrap(), "--", "sh", "-c", CRASH])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(71), "{}", stderr(&out));
    assert!(
        stderr(&out)
            .contains("no memory dump: the guest's 512 MiB of memory exceed $VMTEST_DUMP_MAX (256 MiB)"),
        "{}",
        stderr(&out)
    );
    let kept: Vec<_> = std::fs::read_dir(logs.path()).unwrap().flatten().map(|e| e.path()).collect();
    assert!(kept.iter().all(|p| !p.to_string_lossy().contains("vmcore")), "{kept:?}");
    vt.assert_clean();
}

/// A test file whose first subtest makes the kernel print a WARNING report.
fn warning_test_file(dir: &std::path::Path) -> std::path::PathBuf {
    let file = dir.join("warns.toml");
    let text = format!(
        "[test]\nname = \"warns\"\n\n[nodes.a]\n\n[[step]]\nsubtest = \"warns\"\non = \"a\"\nsucceed = '''{}'''\n\n\
         [[step]]\nsubtest = \"after\"\non = \"a\"\nsucceed = \"true\"\n",
        write_warning()
    );
    std::fs::write(&file, text).unwrap();
    file
}

#[test]
fn a_test_file_reports_a_warning_in_its_junit_case_and_fails_on_it_when_asked() {
    let vt = Vmtest::new();
    let dir = tempfile::tempdir().unwrap();
    let file = warning_test_file(dir.path());
    let junit = dir.path().join("junit.xml");
    let out = vt.cmd().arg("test").arg(&file).arg("--junit").arg(&junit).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("reported: WARNING in vmtest_probe"), "{}", stderr(&out));
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(xml.contains("failures=\"0\""), "{xml}");
    let warns = xml.split("<testcase name=\"after\"").next().unwrap();
    assert!(warns.contains("kernel report on a: WARNING in vmtest_probe"), "{xml}");
    assert!(warns.contains("do_one_initcall+0x5b/0x300"), "{xml}");

    let out = vt
        .cmd()
        .arg("test")
        .arg(&file)
        .args(["--kernel-warnings", "fail", "--junit"])
        .arg(&junit)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(xml.contains("tests=\"2\" failures=\"1\" errors=\"0\" skipped=\"1\""), "{xml}");
    assert!(
        xml.contains("the guest kernel reported 1 bug(s) during the step: WARNING in vmtest_probe"),
        "{xml}"
    );
    vt.assert_clean();
}

/// The kernel vmtest uses by default (`vmtest kernel list`), with its package's tree.
fn default_kernel(vt: &Vmtest) -> std::path::PathBuf {
    let out = vt.cmd().args(["kernel", "list"]).output().unwrap();
    let text = stdout(&out);
    let line = text.lines().find(|l| l.starts_with("default: ")).expect("a default kernel");
    std::path::PathBuf::from(line.split_whitespace().nth(2).unwrap())
}

#[test]
fn a_kernel_matrix_runs_once_per_kernel_labelled_and_fails_with_the_first_failing_kernel() {
    let vt = Vmtest::new();
    let kernel = default_kernel(&vt);
    // Two copies of the kernel's package tree (a kernel finds its modules beside it), and a
    // file that is no kernel.
    let root = kernel.parent().and_then(|b| b.parent()).unwrap();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut kernels = Vec::new();
    for copy in ["a", "b"] {
        let to = dir.path().join(copy);
        let ok = std::process::Command::new("sh")
            .args(["-c", "cp -al \"$0\" \"$1\" 2>/dev/null || cp -a \"$0\" \"$1\""])
            .arg(root)
            .arg(&to)
            .status()
            .unwrap();
        assert!(ok.success());
        kernels.push(to.join(kernel.strip_prefix(root).unwrap()));
    }
    let bad = dir.path().join("vmlinuz-bad");
    std::fs::write(&bad, "not a kernel").unwrap();
    kernels.push(bad);
    let events = dir.path().join("events.jsonl");
    let mut cmd = vt.cmd();
    cmd.arg("run").arg("--events-file").arg(&events);
    for k in &kernels {
        cmd.arg("--kernel").arg(k);
    }
    let out = cmd.args(["--", "sh", "-c", "echo hello; uname -r"]).output().unwrap();
    let err = stderr(&out);
    // The first failing kernel (the third) decides the status: it is no kernel (64).
    assert_eq!(out.status.code(), Some(64), "{err}");
    let text = stdout(&out);
    for k in &kernels[..2] {
        assert!(text.contains(&format!("[{}] hello\n", k.display())), "{text}");
    }
    assert_eq!(text.lines().count(), 4, "{text}");
    assert!(err.contains("vmtest: kernel matrix: 2 of 3 passed"), "{err}");
    assert!(err.contains(&format!("ERROR  {}  exit 64", kernels[2].display())), "{err}");
    assert!(err.contains("is not a Linux kernel image"), "{err}");
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&events).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let finished: Vec<(String, i64)> = lines
        .iter()
        .filter(|e| e["type"] == "kernel_finished")
        .map(|e| (e["kernel"].as_str().unwrap().to_owned(), e["exit_code"].as_i64().unwrap()))
        .collect();
    assert_eq!(finished.len(), 3, "{finished:?}");
    for (k, code) in [(&kernels[0], 0), (&kernels[1], 0), (&kernels[2], 64)] {
        assert!(finished.contains(&(k.display().to_string(), code)), "{finished:?}");
    }
    // Every VM event says which kernel it belongs to.
    assert!(lines.iter().filter(|e| e["type"] == "exec_finished").all(|e| e["kernel"].is_string()));
    vt.assert_clean();
}
