//! `cargo xtask bench --snapshots`: what image snapshots and test checkpoints save, under
//! the accelerator of the run (TCG here and in CI).
//!
//! - `vmtest run --image web -- true`: cold (`--no-snapshot`) against restored.
//! - examples/vm-tests/web-image.toml (seeds/003's nginx test on image nodes) and a
//!   three-node file with a checkpoint: the first run (no snapshot or checkpoint yet: each
//!   round starts with the saved guests removed) against the second.
//! - Four subtests from one checkpoint (`from`: a copy of the nodes each) against the same
//!   four one after another on the file's own nodes, both from a stored checkpoint.
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
        test_file(vmtest, &cache, &kernel, &root().join("examples/vm-tests/web-image.toml"), runs)?;
        let three = cache.join("three-nodes.toml");
        write(&three, &three_nodes(""))?;
        test_file(vmtest, &cache, &kernel, &three, runs)?;
        subtests(vmtest, &cache, &kernel, runs)
    });
    let _ = std::fs::remove_dir_all(&cache);
    result
}

/// Link the shared cache's images into `cache`; the default kernel (for kernel-mode nodes).
fn link_images(vmtest: &Path, cache: &Path) -> Result<PathBuf> {
    let kernel = crate::default_kernel(vmtest)?;
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

fn test_file(vmtest: &Path, cache: &Path, kernel: &Path, file: &Path, runs: usize) -> Result<()> {
    let name = file.file_name().unwrap_or_default().to_string_lossy();
    eprintln!("\n==> `vmtest test {name}`: first run vs second run ({runs} runs each)");
    let run = || {
        let mut c = vmtest_in(vmtest, cache, kernel);
        c.arg("test").arg(file);
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

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Three image nodes: a server whose nginx the clients reach, set up and checkpointed, then
/// `after` (steps or subtests).
fn three_nodes(after: &str) -> String {
    let mut text = String::from(
        r#"[test]
name = "three-nodes"
timeout = "15m"
step_timeout = "180s"

[defaults]
image = "web"
memory = "512M"
boot_timeout = "300s"

[nodes.server]
[nodes.client1]
[nodes.client2]

[[step]]
on = "server"
wait_for_unit = "nginx.service"

[[step]]
on = "server"
succeed = "echo set-up > /var/www/html/index.html; sync"

[[step]]
on = "client1"
wait_until_succeeds = "curl -fsS --max-time 5 http://server/"
expect_stdout = "set-up"

[[step]]
on = "client2"
wait_until_succeeds = "curl -fsS --max-time 5 http://server/"
expect_stdout = "set-up"
checkpoint = "ready"

[[step]]
on = "client1"
succeed = "curl -fsS --max-time 5 http://server/"
"#,
    );
    text.push_str(after);
    text
}

/// Four subtests that each change the server's page and read it from a client.
fn four_subtests(from: bool) -> String {
    let mut text = String::new();
    for i in 1..=4 {
        let from = if from { "from = \"ready\"\n" } else { "" };
        text.push_str(&format!(
            "\n[[step]]\nsubtest = \"change {i}\"\n{from}on = \"server\"\nsucceed = \"echo page-{i} > /var/www/html/index.html\"\n\
             \n[[step]]\nsubtest = \"change {i}\"\n{from}on = \"client{}\"\nsucceed = \"curl -fsS --max-time 5 http://server/\"\nexpect_stdout = \"page-{i}\"\n",
            1 + i % 2
        ));
    }
    text
}

fn subtests(vmtest: &Path, cache: &Path, kernel: &Path, runs: usize) -> Result<()> {
    eprintln!(
        "\n==> four subtests: each from the checkpoint (a copy each) vs one after another on one set of nodes ({runs} runs each)"
    );
    let (copies, in_line) = (cache.join("four-from.toml"), cache.join("four-in-line.toml"));
    write(&copies, &three_nodes(&four_subtests(true)))?;
    write(&in_line, &three_nodes(&four_subtests(false)))?;
    let run = |file: &Path, max_vms: Option<&str>| {
        let mut c = vmtest_in(vmtest, cache, kernel);
        c.arg("test").arg(file);
        if let Some(n) = max_vms {
            c.args(["--max-vms", n]);
        }
        c
    };
    // Warm-up: the checkpoint (one for both: the files agree up to it).
    sample(&mut run(&copies, None))?;
    let (mut apart, mut wide, mut together) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        apart.push(sample(&mut run(&copies, None))?.wall);
        wide.push(sample(&mut run(&copies, Some("12")))?.wall);
        together.push(sample(&mut run(&in_line, None))?.wall);
    }
    let line = "one after another, one set of nodes";
    let copies = "each from the checkpoint, default --max-vms";
    report("ratio (copies / in line)", line, &mut together, copies, &mut apart);
    let (wide, together) = (median(&mut wide), median(&mut together));
    eprintln!(
        "    each from the checkpoint, --max-vms 12 (4 copies at once): median {:.2}s",
        wide.as_secs_f64()
    );
    eprintln!("    ratio (4 at once / in line): {:.2}", wide.as_secs_f64() / together.as_secs_f64());
    Ok(())
}
