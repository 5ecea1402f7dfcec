//! Image-mode snapshots through the real binary and real guests of the CI image
//! (examples/images/web.toml): the first run of a shape saves the guest once its systemd is
//! up, later runs restore it; the services the image started before the snapshot serve in
//! every restored guest; every transport works after a restore; each restored guest gets its
//! own identity; a changed shape or a damaged snapshot is never used.
//!
//! Each test has a cache of its own (the shared cache's images linked in), so that neither
//! snapshots of earlier runs nor other tests' snapshots are found. Building the image needs
//! root (debootstrap); without root these tests say so and pass vacuously, as images.rs does.

mod common;

use common::{private_image_cache, stderr, stdout, Vmtest};
use std::path::{Path, PathBuf};
use std::process::Output;

fn run(vt: &Vmtest, cache: &Path, via: &str, args: &[&str], command: &str) -> Output {
    vt.cmd()
        .env("VMTEST_CACHE_DIR", cache)
        .env("VMTEST_EXEC", via)
        .args(["run", "--timings", "--image", "web", "--boot-timeout", "300s"])
        .args(args)
        .args(["--", "sh", "-c", command])
        .output()
        .unwrap()
}

fn timings(out: &Output) -> String {
    stderr(out).lines().find(|l| l.starts_with("vmtest: timings:")).unwrap_or_default().to_owned()
}

fn ok(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(0), "stdout: {}\nstderr: {}", stdout(out), stderr(out));
    stdout(out)
}

fn snapshots(cache: &Path) -> Vec<PathBuf> {
    let mut all: Vec<PathBuf> = std::fs::read_dir(cache.join("snapshots"))
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    all.sort();
    all
}

/// What proves nginx was started before the snapshot: its main pid and start time (guest
/// monotonic clock), the same in every guest restored from one snapshot.
const NGINX: &str = "systemctl show -p MainPID -p ExecMainStartTimestampMonotonic nginx; \
                     curl -fsS --max-time 10 http://127.0.0.1/; hostname; cat /etc/machine-id";

#[test]
fn a_restored_image_guest_serves_from_the_service_started_before_the_snapshot() {
    let vt = Vmtest::new();
    let Some(cache) = private_image_cache(&vt) else { return };
    let first = run(&vt, cache.path(), "agent", &[], NGINX);
    let first_out = ok(&first);
    let t = timings(&first);
    assert!(t.contains("snapshot ") && t.contains("restore "), "the first run saves, then restores: {t}");
    assert_eq!(snapshots(cache.path()).len(), 1);
    let second = run(&vt, cache.path(), "agent", &[], NGINX);
    let second_out = ok(&second);
    let t = timings(&second);
    assert!(t.contains("restore ") && !t.contains("snapshot ") && !t.contains("boot "), "restored only: {t}");
    let lines = |s: &str| s.lines().map(str::to_owned).collect::<Vec<_>>();
    let (a, b) = (lines(&first_out), lines(&second_out));
    assert!(a[0].starts_with("MainPID=") && a[0] != "MainPID=0", "nginx runs: {first_out}");
    assert_eq!(a[..2], b[..2], "the same nginx process, started before the snapshot, serves both");
    assert_eq!(a[2], "hello from the vmtest web image");
    assert_eq!(b[2], "hello from the vmtest web image");
    assert_eq!(b[3], "vm", "the run's hostname, not the snapshot's");
    assert_ne!(a[4], b[4], "each restored guest gets its own machine-id");
    vt.assert_clean();
}

#[test]
fn every_transport_works_after_a_restore() {
    let vt = Vmtest::new();
    let Some(cache) = private_image_cache(&vt) else { return };
    for via in ["agent", "ssh", "serial"] {
        for round in ["saves", "restores"] {
            let out = run(&vt, cache.path(), via, &[], "echo via-$((6*7)); echo err >&2; exit 3");
            assert_eq!(out.status.code(), Some(3), "{via} {round}: {}", stderr(&out));
            assert!(stdout(&out).contains("via-42"), "{via} {round}: {}", stdout(&out));
            assert!(!stdout(&out).contains("err") && stderr(&out).contains("err"), "{via} {round}");
            let t = timings(&out);
            assert!(t.contains("restore "), "{via} {round}: {t}\n{}", stderr(&out));
            // The serial console needs no other device: it restores the agent's snapshot.
            let makes = round == "saves" && via != "serial";
            assert_eq!(t.contains("snapshot "), makes, "{via} {round}: {t}");
        }
    }
    // SSH adds a NIC (another machine, another snapshot); agent and serial share one.
    assert_eq!(snapshots(cache.path()).len(), 2);
    vt.assert_clean();
}

#[test]
fn a_changed_shape_or_a_damaged_snapshot_is_never_restored() {
    let vt = Vmtest::new();
    let Some(cache) = private_image_cache(&vt) else { return };
    ok(&run(&vt, cache.path(), "agent", &["--memory", "448M"], "true"));
    let [made] = &snapshots(cache.path())[..] else { panic!("one snapshot") };
    // Another memory size is another machine: a new snapshot, the old one untouched.
    let other = run(&vt, cache.path(), "agent", &["--memory", "480M"], "true");
    ok(&other);
    assert!(timings(&other).contains("snapshot "), "{}", timings(&other));
    assert_eq!(snapshots(cache.path()).len(), 2);
    // Truncated, then corrupted in the middle: detected by the seal, dropped and made again.
    let state = made.join("state");
    for damage in ["truncated", "corrupted"] {
        let len = std::fs::metadata(&state).unwrap().len();
        match damage {
            "truncated" => {
                std::fs::OpenOptions::new().write(true).open(&state).unwrap().set_len(len / 2).unwrap()
            }
            _ => {
                use std::os::unix::fs::FileExt;
                let f = std::fs::OpenOptions::new().write(true).open(&state).unwrap();
                let mut byte = [0u8; 1];
                std::fs::File::open(&state).unwrap().read_exact_at(&mut byte, len / 3).unwrap();
                f.write_all_at(&[byte[0] ^ 0x5a], len / 3).unwrap();
            }
        }
        let out = run(&vt, cache.path(), "agent", &["--memory", "448M", "-v"], "true");
        ok(&out);
        assert!(
            stderr(&out).contains("is unusable: state changed since it was saved"),
            "{damage}: {}",
            stderr(&out)
        );
        assert!(timings(&out).contains("snapshot "), "{damage}: made again: {}", timings(&out));
        assert!(made.join("seal.json").is_file());
    }
    // --no-snapshot boots cold.
    let cold = run(&vt, cache.path(), "agent", &["--memory", "448M", "--no-snapshot"], "true");
    ok(&cold);
    let t = timings(&cold);
    assert!(t.contains("boot ") && !t.contains("restore "), "{t}");
    vt.assert_clean();
}
