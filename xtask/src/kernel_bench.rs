//! `cargo xtask bench --kernel-dev`: what the kernel-developer features cost.
//!
//! - A three-kernel matrix in one call against the same three kernels run one after another
//!   (three copies of the default kernel's package tree, so each is a kernel of its own to
//!   vmtest: its own KVM verdict, initramfs and snapshot, made once in a warm-up).
//! - Watching the kernel log: a command that makes the guest kernel print 2000 lines, with
//!   `--kernel-warnings report` (watched) against `ignore` (not watched).
//!
//! Samples are interleaved, so drift of a busy machine hits both sides alike.

use crate::{median, sample, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub fn bench_kernel_dev(vmtest: &Path, runs: usize) -> Result<()> {
    let dir = crate::tempfile_dir("kernel-dev")?;
    let result = kernels(vmtest, &dir).and_then(|k| {
        matrix(vmtest, &k, runs)?;
        kernel_log(vmtest, runs)
    });
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Three copies of the default kernel's package tree in `dir`; the kernels in them.
fn kernels(vmtest: &Path, dir: &Path) -> Result<Vec<PathBuf>> {
    let kernel = crate::default_kernel(vmtest)?;
    let root = kernel.ancestors().nth(2).ok_or("the kernel is not in a package tree")?;
    let inside = kernel.strip_prefix(root).map_err(|e| e.to_string())?;
    let mut copies = Vec::new();
    for name in ["k1", "k2", "k3"] {
        let to = dir.join(name);
        let ok = Command::new("cp").arg("-a").arg(root).arg(&to).status().map_err(|e| e.to_string())?;
        if !ok.success() {
            return Err(format!("cannot copy {}", root.display()));
        }
        copies.push(to.join(inside));
    }
    Ok(copies)
}

fn run_cmd(vmtest: &Path, kernels: &[PathBuf], extra: &[&str], command: &[&str]) -> Command {
    let mut cmd = Command::new(vmtest);
    cmd.arg("run");
    for k in kernels {
        cmd.arg("--kernel").arg(k);
    }
    cmd.args(extra).arg("--").args(command);
    cmd
}

fn matrix(vmtest: &Path, kernels: &[PathBuf], runs: usize) -> Result<()> {
    eprintln!("\n==> kernel matrix of `true`: 3 kernels in one call vs one after another ({runs} runs each)");
    // Warm-up: each kernel's verdict, initramfs and snapshot.
    sample(&mut run_cmd(vmtest, kernels, &[], &["true"]))?;
    let (mut together, mut apart) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        together.push(sample(&mut run_cmd(vmtest, kernels, &[], &["true"]))?.wall);
        let mut sum = Duration::ZERO;
        for k in kernels {
            sum += sample(&mut run_cmd(vmtest, std::slice::from_ref(k), &[], &["true"]))?.wall;
        }
        apart.push(sum);
    }
    let (t, a) = (median(&mut together), median(&mut apart));
    eprintln!("    one call, 3 kernels:      median {:.2}s", t.as_secs_f64());
    eprintln!("    3 calls one after another: median {:.2}s", a.as_secs_f64());
    eprintln!("    ratio (matrix / sequential): {:.2}", t.as_secs_f64() / a.as_secs_f64());
    Ok(())
}

fn kernel_log(vmtest: &Path, runs: usize) -> Result<()> {
    let noisy = "echo on > /proc/sys/kernel/printk_devkmsg; \
                 i=0; while [ $i -lt 2000 ]; do echo \"<6>vmtest noise line $i\" > /dev/kmsg; i=$((i+1)); done";
    eprintln!(
        "\n==> a command that makes the kernel print 2000 lines: log watched vs not ({runs} runs each)"
    );
    let cmd = |mode: &str| run_cmd(vmtest, &[], &["--root", "--kernel-warnings", mode], &["sh", "-c", noisy]);
    sample(&mut cmd("report"))?;
    let (mut watched, mut ignored) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        watched.push(sample(&mut cmd("report"))?.wall);
        ignored.push(sample(&mut cmd("ignore"))?.wall);
    }
    let (w, i) = (median(&mut watched), median(&mut ignored));
    eprintln!("    --kernel-warnings report (watched): median {:.3}s", w.as_secs_f64());
    eprintln!("    --kernel-warnings ignore:           median {:.3}s", i.as_secs_f64());
    eprintln!("    ratio (watched / not): {:.3}", w.as_secs_f64() / i.as_secs_f64());
    Ok(())
}
