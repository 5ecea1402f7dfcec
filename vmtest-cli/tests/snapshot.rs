//! Snapshot/restore (QEMU): guests restored from the state saved at "agent ready" are fresh
//! (own randomness, the host's clock, the right cwd), snapshots are made once per shape and
//! replaced when the shape changes, and `--no-snapshot` boots.

mod common;

use common::{stderr, stdout, Vmtest};

fn timings(out: &std::process::Output) -> String {
    stderr(out).lines().find(|l| l.starts_with("vmtest: timings:")).unwrap_or_default().to_owned()
}

/// `vmtest run` with a cache of its own, so that no snapshot of an earlier run of this suite
/// (CI keeps its cache between runs) is found and this test's snapshots go with it. The kernel
/// is the shared cache's, so nothing is fetched.
struct PrivateCache {
    dir: tempfile::TempDir,
    kernel: std::path::PathBuf,
}

impl PrivateCache {
    fn new(vt: &Vmtest) -> PrivateCache {
        PrivateCache { dir: tempfile::tempdir().unwrap(), kernel: common::default_kernel(vt) }
    }

    fn run(&self, vt: &Vmtest, args: &[&str], command: &[&str]) -> std::process::Output {
        vt.cmd()
            .env("VMTEST_CACHE_DIR", self.dir.path())
            .env("VMTEST_KERNEL", &self.kernel)
            .arg("run")
            .args(args)
            .arg("--")
            .args(command)
            .output()
            .unwrap()
    }
}

#[test]
fn a_new_shape_makes_one_snapshot_then_restores_it() {
    let vt = Vmtest::new();
    let cache = PrivateCache::new(&vt);
    let shape = ["--timings", "--memory", "424M", "--kernel-args", "vmtest.test=shape1"];
    let first = cache.run(&vt, &shape, &["true"]);
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    let t = timings(&first);
    assert!(t.contains("snapshot ") && t.contains("restore "), "first run makes and restores: {t}");
    let second = cache.run(&vt, &shape, &["true"]);
    assert_eq!(second.status.code(), Some(0), "{}", stderr(&second));
    let t = timings(&second);
    assert!(
        !t.contains("snapshot ") && t.contains("restore ") && !t.contains("boot "),
        "then restores only: {t}"
    );
    // Another kernel command line is another shape: a new snapshot.
    let other =
        cache.run(&vt, &["--timings", "--memory", "424M", "--kernel-args", "vmtest.test=shape2"], &["true"]);
    assert!(timings(&other).contains("snapshot "), "{}", timings(&other));
    let cold = cache.run(&vt, &["--timings", "--no-snapshot", "--memory", "424M"], &["true"]);
    let t = timings(&cold);
    assert!(t.contains("boot ") && !t.contains("restore ") && !t.contains("snapshot "), "{t}");
    vt.assert_clean();
}

#[test]
fn restored_guests_get_their_own_randomness_the_host_clock_and_the_cwd() {
    let vt = Vmtest::new();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let probe = |vt: &Vmtest| {
        let out = vt
            .cmd()
            .current_dir(dir.path())
            .args(["run", "--timings", "--", "sh", "-c", "cat /proc/sys/kernel/random/uuid; date +%s; pwd"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let host_now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        let text = stdout(&out);
        let lines: Vec<&str> = text.lines().collect();
        let guest_now: i64 = lines[1].parse().unwrap();
        assert!((host_now - guest_now).abs() <= 5, "guest clock {guest_now}, host {host_now}");
        assert_eq!(lines[2], dir.path().canonicalize().unwrap().to_str().unwrap());
        (lines[0].to_owned(), timings(&out))
    };
    let (a, _) = probe(&vt);
    let (b, tb) = probe(&vt);
    let (c, tc) = probe(&vt);
    assert!(tb.contains("restore ") && tc.contains("restore "), "{tb} / {tc}");
    assert!(a != b && b != c && a != c, "restored guests repeated random numbers: {a} {b} {c}");
    vt.assert_clean();
}
