//! The guest kernel's bug reports, caught for real: as root in the guest, a WARNING report
//! is written into /dev/kmsg (the kernel prints it on its console like one of its own), and
//! vmtest must show it with its title and trace, emit it as an event, and fail the run only
//! when asked to. An ordinary kernel message is not a report.

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
