//! Snapshot/restore (QEMU): guests restored from the state saved at "agent ready" are fresh
//! (own randomness, the host's clock, the right cwd), snapshots are made once per shape and
//! replaced when the shape changes, and `--no-snapshot` boots.

mod common;

use common::{stderr, stdout, Vmtest};

fn timings(out: &std::process::Output) -> String {
    stderr(out).lines().find(|l| l.starts_with("vmtest: timings:")).unwrap_or_default().to_owned()
}

#[test]
fn a_new_shape_makes_one_snapshot_then_restores_it() {
    let vt = Vmtest::new();
    // A shape no other test uses: its own snapshot.
    let shape = ["--timings", "--memory", "424M", "--kernel-args", "vmtest.test=shape1"];
    let first = vt.run(&shape, &["true"]);
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    let t = timings(&first);
    assert!(t.contains("snapshot ") && t.contains("restore "), "first run makes and restores: {t}");
    let second = vt.run(&shape, &["true"]);
    assert_eq!(second.status.code(), Some(0), "{}", stderr(&second));
    let t = timings(&second);
    assert!(
        !t.contains("snapshot ") && t.contains("restore ") && !t.contains("boot "),
        "then restores only: {t}"
    );
    // Another kernel command line is another shape: a new snapshot.
    let other = vt.run(&["--timings", "--memory", "424M", "--kernel-args", "vmtest.test=shape2"], &["true"]);
    assert!(timings(&other).contains("snapshot "), "{}", timings(&other));
    let cold = vt.run(&["--timings", "--no-snapshot", "--memory", "424M"], &["true"]);
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
