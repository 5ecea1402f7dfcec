//! `cargo xtask bench --snapshots`: what image snapshots and test checkpoints save, under
//! the accelerator of the run (TCG here and in CI).
//!
//! - `vmtest run --image web -- true`: cold (`--no-snapshot`) against restored.
//! - examples/vm-tests/web-image.toml (seeds/003's nginx test on image nodes): the first run
//!   (no snapshot yet: each round starts with the saved guests removed) against the second.
//!
//! Everything runs in a cache of its own that links the shared cache's images (build the
//! CI image first: `vmtest image build examples/images/web.toml`), so that the shared
//! cache's snapshots neither help nor go. Samples are interleaved.

use crate::{median, root, sample, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub fn bench_snapshots(vmtest: &Path, runs: usize) -> Result<()> {
    let cache = crate::tempfile_dir("snapshots")?;
    let result = link_images(vmtest, &cache).and_then(|kernel| {
        image_run(vmtest, &cache, &kernel, runs)?;
        test_file(vmtest, &cache, &kernel, "examples/vm-tests/web-image.toml", runs)
    });
    let _ = std::fs::remove_dir_all(&cache);
    result
}

/// Link the shared cache's images into `cache`; the default kernel (for kernel-mode nodes).
fn link_images(vmtest: &Path, cache: &Path) -> Result<PathBuf> {
    let out = Command::new(vmtest).args(["kernel", "list"]).output().map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let kernel = text
        .lines()
        .find_map(|l| l.strip_prefix("default: "))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(PathBuf::from)
        .ok_or(format!("no default kernel (`vmtest kernel fetch` first): {text}"))?;
    let list = Command::new(vmtest).args(["image", "list"]).output().map_err(|e| e.to_string())?;
    if !String::from_utf8_lossy(&list.stdout).lines().any(|l| l.starts_with("web\t")) {
        return Err("no `web` image: run `vmtest image build examples/images/web.toml` first".into());
    }
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let shared = env("VMTEST_CACHE_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("vmtest")))
        .or_else(|| env("HOME").map(|h| h.join(".cache/vmtest")))
        .ok_or("no HOME")?;
    std::os::unix::fs::symlink(shared.join("images"), cache.join("images")).map_err(|e| e.to_string())?;
    Ok(kernel)
}

fn vmtest_in(vmtest: &Path, cache: &Path, kernel: &Path) -> Command {
    let mut c = Command::new(vmtest);
    c.env("VMTEST_CACHE_DIR", cache).env("VMTEST_KERNEL", kernel).env("VMTEST_LOG", "error");
    c
}

/// Remove the saved guests (snapshots, checkpoints) of `cache`: the next run is a first run.
fn forget_saved(cache: &Path) {
    for dir in ["snapshots", "checkpoints"] {
        let _ = std::fs::remove_dir_all(cache.join(dir));
    }
}

fn report(what: &str, a_name: &str, a: &mut [Duration], b_name: &str, b: &mut [Duration]) {
    let (a, b) = (median(a), median(b));
    eprintln!("    {a_name}: median {:.2}s", a.as_secs_f64());
    eprintln!("    {b_name}: median {:.2}s", b.as_secs_f64());
    eprintln!("    {what}: {:.2}", b.as_secs_f64() / a.as_secs_f64());
}

fn image_run(vmtest: &Path, cache: &Path, kernel: &Path, runs: usize) -> Result<()> {
    eprintln!("\n==> `vmtest run --image web -- true`: cold vs restored ({runs} runs each)");
    let run = |snapshot: bool| {
        let mut c = vmtest_in(vmtest, cache, kernel);
        c.args(["run", "--image", "web", "--boot-timeout", "300s"]);
        if !snapshot {
            c.arg("--no-snapshot");
        }
        c.args(["--", "true"]);
        c
    };
    // Warm-up: the initramfs, the image's kernel, the snapshot.
    sample(&mut run(true))?;
    let (mut cold, mut restored) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        cold.push(sample(&mut run(false))?.wall);
        restored.push(sample(&mut run(true))?.wall);
    }
    report("ratio (restored / cold)", "cold (--no-snapshot)", &mut cold, "restored", &mut restored);
    Ok(())
}

fn test_file(vmtest: &Path, cache: &Path, kernel: &Path, file: &str, runs: usize) -> Result<()> {
    eprintln!("\n==> `vmtest test {file}`: first run vs second run ({runs} runs each)");
    let run = || {
        let mut c = vmtest_in(vmtest, cache, kernel);
        c.arg("test").arg(root().join(file));
        c
    };
    sample(&mut run())?;
    let (mut first, mut second) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        forget_saved(cache);
        first.push(sample(&mut run())?.wall);
        second.push(sample(&mut run())?.wall);
    }
    report("ratio (second / first)", "first run (saves)", &mut first, "second run (restores)", &mut second);
    Ok(())
}
