//! Tests that prove they run inside a vmtest VM. They fail on the host: run them through the
//! cargo runner, as `cargo xtask ci` does:
//!
//! CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="vmtest run --" cargo test -p in-vm-example

use std::io::{Read, Seek, SeekFrom, Write};

#[test]
fn kernel_command_line_carries_the_vmtest_boot_marker() {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap();
    assert!(cmdline.split_whitespace().any(|w| w == "vmtest.agent=1"), "not in a vmtest VM: {cmdline}");
}

#[test]
fn cpu_reports_the_hypervisor_flag() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags")).unwrap_or_default();
    assert!(flags.split_whitespace().any(|f| f == "hypervisor"), "no hypervisor flag: {flags}");
}

#[test]
fn runs_in_the_package_directory_like_cargo_test() {
    assert_eq!(std::env::current_dir().unwrap(), std::path::Path::new(env!("CARGO_MANIFEST_DIR")));
}

#[test]
fn unlinked_temp_files_work() {
    // danobi/vmtest#83: tempfile() failed when /tmp was shared with the host over 9p.
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(b"hello").unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "hello");
    assert_eq!(f.metadata().unwrap().len(), 5);
}

#[test]
fn the_host_filesystem_is_writable_but_only_in_the_guest() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("written-inside-the-vm");
    std::fs::write(&path, "guest").unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "guest");
}

/// Expected to fail: `cargo xtask ci` runs it with `--ignored` and checks that the failure
/// and its message come back through the runner.
#[test]
#[ignore = "fails on purpose; run by cargo xtask ci to check failures pass through the runner"]
fn expected_failure() {
    panic!("this failure came from inside the VM (expected)");
}
