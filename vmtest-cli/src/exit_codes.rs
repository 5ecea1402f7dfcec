//! The `vmtest` binary's exit codes: the library reports error kinds; this maps them.
//! They stay clear of the statuses test runners use (0, 1, 101) and of shell signal codes
//! (128 + N), so a caller can tell vmtest's own failures from the command's.

use vmtest_core::ErrorKind;

/// Bad command line, config or path (EX_USAGE).
pub const USAGE: i32 = 64;
/// The backend cannot run here: hypervisor, kernel or tool missing (EX_UNAVAILABLE).
pub const PREFLIGHT: i32 = 69;
/// The guest kernel reported a bug during the command (`--kernel-warnings fail`) (EX_SOFTWARE).
pub const KERNEL_REPORT: i32 = 70;
/// The VM failed to boot: kernel panic, agent never came up (EX_OSERR).
pub const BOOT: i32 = 71;
/// Host/guest plumbing failed after retries (EX_TEMPFAIL).
pub const INFRASTRUCTURE: i32 = 75;
/// The command, the boot or a lock wait ran past its deadline (as timeout(1)).
pub const TIMEOUT: i32 = 124;
/// Interrupted by SIGINT, SIGTERM or SIGHUP; the VM was torn down.
pub const INTERRUPTED: i32 = 130;
/// A test (`vmtest test`) failed, as test runners report it.
pub const TEST_FAILED: i32 = 1;

/// The exit code for an error of `kind`.
pub fn for_kind(kind: ErrorKind) -> i32 {
    match kind {
        ErrorKind::Usage => USAGE,
        ErrorKind::Preflight => PREFLIGHT,
        ErrorKind::Boot => BOOT,
        ErrorKind::Transient | ErrorKind::Infrastructure => INFRASTRUCTURE,
        ErrorKind::Timeout => TIMEOUT,
        ErrorKind::Interrupted => INTERRUPTED,
        ErrorKind::TestFailed => TEST_FAILED,
        ErrorKind::KernelReport => KERNEL_REPORT,
    }
}

/// The exit code for `e`.
pub fn of(e: &vmtest_core::Error) -> i32 {
    for_kind(e.kind())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_distinct_and_avoid_test_runner_codes() {
        let kinds = [
            ErrorKind::Usage,
            ErrorKind::Preflight,
            ErrorKind::Boot,
            ErrorKind::Infrastructure,
            ErrorKind::Timeout,
            ErrorKind::Interrupted,
            ErrorKind::KernelReport,
        ];
        let codes: std::collections::HashSet<i32> = kinds.iter().map(|k| for_kind(*k)).collect();
        assert_eq!(codes.len(), kinds.len());
        for c in codes {
            assert!(![0, 1, 2, 101].contains(&c), "{c} collides with a test runner status");
        }
    }

    #[test]
    fn a_failed_test_exits_1_like_test_runners() {
        assert_eq!(for_kind(ErrorKind::TestFailed), 1);
    }
}
