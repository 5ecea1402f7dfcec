//! QEMU image mode through the real binary and real guests: `vmtest image build` of the CI
//! image (examples/images/web.toml; minutes once, then a cache hit), `vmtest run --image` with
//! each exec transport (agent, SSH, serial console), and the nginx-style test file
//! (examples/vm-tests/web-image.toml: two image nodes and a kernel-mode node on one network).
//!
//! Building needs root (debootstrap); without root these tests say so and pass vacuously.

mod common;

use common::{stderr, stdout, Vmtest};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// Build (or find) the CI image once per test process.
fn web_image() -> bool {
    static BUILT: OnceLock<bool> = OnceLock::new();
    *BUILT.get_or_init(|| {
        if !is_root() {
            eprintln!("not root: image build (debootstrap) skipped, image tests pass vacuously");
            return false;
        }
        let vt = Vmtest::new();
        let spec = repo().join("examples/images/web.toml");
        let out = vt.cmd().args(["image", "build"]).arg(&spec).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}\n{}", stdout(&out), stderr(&out));
        // The second build of the same spec is a cache hit, and instant.
        let t0 = Instant::now();
        let out = vt.cmd().args(["image", "build"]).arg(&spec).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert!(stdout(&out).starts_with("web cached in"), "{}", stdout(&out));
        assert!(t0.elapsed().as_secs_f64() < 5.0, "a cache hit took {:?}", t0.elapsed());
        let list = vt.cmd().args(["image", "list"]).output().unwrap();
        assert!(stdout(&list).lines().any(|l| l.starts_with("web\t")), "{}", stdout(&list));
        true
    })
}

fn run_in_image(via: &str) {
    if !web_image() {
        return;
    }
    let vt = Vmtest::new();
    let out = vt
        .cmd()
        .env("VMTEST_EXEC", via)
        .args(["run", "--image", "web", "--boot-timeout", "300s", "--"])
        .args(["sh", "-c", "grep VERSION_CODENAME /etc/os-release; echo to-stderr >&2; hostname; exit 7"])
        .output()
        .unwrap();
    let (o, e) = (stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(7), "exec over {via}\nstdout: {o}\nstderr: {e}");
    assert!(o.contains("VERSION_CODENAME=bookworm"), "exec over {via}: {o}\n{e}");
    assert!(!o.contains("to-stderr") && e.contains("to-stderr"), "exec over {via}: streams mixed\n{o}\n{e}");
    vt.assert_clean();
}

#[test]
fn run_image_exec_over_the_agent() {
    run_in_image("agent");
}

#[test]
fn run_image_exec_over_ssh() {
    run_in_image("ssh");
}

#[test]
fn run_image_exec_over_the_serial_console() {
    run_in_image("serial");
}

#[test]
fn the_nginx_image_example_passes() {
    if !web_image() {
        return;
    }
    let vt = Vmtest::new();
    let out = vt.cmd().arg("test").arg(repo().join("examples/vm-tests/web-image.toml")).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}\n{}", stdout(&out), stderr(&out));
    assert!(stderr(&out).contains("web-image: PASSED"), "{}", stderr(&out));
    vt.assert_clean();
}

#[test]
fn an_unknown_image_is_a_usage_error_naming_the_fix() {
    let vt = Vmtest::new();
    let out = vt.cmd().args(["run", "--image", "no-such-image-xyz", "--", "true"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("vmtest image build"), "{}", stderr(&out));
    vt.assert_clean();
}
