//! `cargo xtask ci | bench`: the project's own automation, in Rust.
//!
//! - `ci`: formatting, clippy, every test (unit, contract, real-VM), and the cargo-runner
//!   proof: the in-VM example passes through `vmtest run --` under `cargo test` and
//!   `cargo nextest run`, and its deliberately failing test fails through it.
//! - `cross-check`: type-checks `vmtest` (and so every crate it uses) for the other host OSes
//!   (FreeBSD, illumos, macOS) with Debian's `rustc-web`/`cargo-web`/`rust-web-src` and
//!   `-Zbuild-std`. It checks, it does not link: no cross linker or SDK is needed.
//! - `bench [--runs N]`: `vmtest run -- true` against the raw QEMU boot floor, interleaved.
//! - `bench --kernel-dev`: a three-kernel matrix against three runs in a row, and the cost
//!   of watching the guest kernel's log on a noisy command.
//! - `bench --snapshots`: image mode cold against restored, and test files' first run
//!   against their second (snapshots and checkpoints).
//! - `bench --first-run`: a new user's first run (kernel and QEMU fetched, KVM verdict,
//!   snapshot made), the KVM verdict's cost, and the time to a verdict when KVM hangs.

mod kernel_bench;
mod snapshot_bench;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

type Result<T> = std::result::Result<T, String>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("cross-check") => cross_check(&args[1..]),
        Some("bench") => bench(&args[1..]),
        _ => Err(
            "usage: cargo xtask ci | cross-check [TARGET...] | bench [--runs N] [--accel auto|kvm|tcg] [--suite | --first-run | --kernel-dev | --snapshots]"
                .into(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

/// Run a step, echoing it; fail with its name.
fn step(name: &str, cmd: &mut Command) -> Result<()> {
    eprintln!("\n==> {name}");
    let started = Instant::now();
    let status = cmd.status().map_err(|e| format!("{name}: cannot start: {e}"))?;
    eprintln!("<== {name}: {status} in {:.1}s", started.elapsed().as_secs_f64());
    if status.success() {
        Ok(())
    } else {
        Err(format!("{name} failed ({status})"))
    }
}

fn vmtest_binary(profile: &str) -> PathBuf {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"));
    target.join(profile).join("vmtest")
}

const RUNNER_VAR: &str = "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER";

fn ci() -> Result<()> {
    step("cargo fmt --check", cargo().args(["fmt", "--all", "--", "--check"]))?;
    step("cargo clippy", cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    // The library's public surface is documented, links and all.
    step("cargo doc", cargo().env("RUSTDOCFLAGS", "-D warnings").args(["doc", "--no-deps", "--workspace"]))?;
    // A CI system whose runner image lacks Debian's Rust (GitHub's Ubuntu runners) runs the
    // cross-check as a job of its own, in a Debian container (see .github/workflows/ci.yml).
    if std::env::var_os("XTASK_CROSS_CHECK_ELSEWHERE").is_some_and(|v| v == "1") {
        eprintln!("\n==> cross-check: skipped here (XTASK_CROSS_CHECK_ELSEWHERE=1: another job runs it)");
    } else {
        cross_check(&[])?;
    }
    step("build vmtest", cargo().args(["build", "-p", "vmtest-cli"]))?;
    let vmtest = vmtest_binary("debug");
    // One kernel fetch up front, instead of one per concurrently booting test.
    step(
        "vmtest kernel fetch (if none found)",
        Command::new(&vmtest).args(["kernel", "fetch", "--if-missing"]),
    )?;
    // The in-VM example passes only inside a VM: it runs below, through the runner.
    step(
        "cargo test (unit, contract and real-VM tests)",
        cargo().args(["test", "--workspace", "--exclude", "in-vm-example", "--no-fail-fast"]),
    )?;
    // A program embedding the library: a command and a test file, on QEMU.
    let example = root().join("examples/vm-tests/client-server.toml");
    step(
        "examples/embed through the library",
        cargo().args(["run", "-q", "-p", "embed-example", "--"]).arg(example),
    )?;
    cargo_runner_proof(&vmtest)
}

/// The host OSes other than Linux that `vmtest` must build for.
const CROSS_TARGETS: &[&str] =
    &["x86_64-unknown-freebsd", "x86_64-unknown-illumos", "aarch64-apple-darwin", "x86_64-apple-darwin"];

/// Debian's Rust with the standard library's source (`apt-get install rustc-web cargo-web
/// rust-web-src`): it can build `std` for any built-in target.
const CROSS_RUSTC: &str = "/usr/bin/rustc";
const CROSS_CARGO: &str = "/usr/bin/cargo";
const CROSS_STD_SRC: &str = "/usr/lib/rustlib/src/rust/library";

/// `cargo check -p vmtest-cli` for each target (all by default). A type check, not a build:
/// nothing is linked, so a Linux-only call in a backend other systems build fails here, while
/// what only a real link would find does not.
fn cross_check(targets: &[String]) -> Result<()> {
    let targets: Vec<&str> = if targets.is_empty() {
        CROSS_TARGETS.to_vec()
    } else {
        targets.iter().map(String::as_str).collect()
    };
    for (tool, path) in [("rustc", CROSS_RUSTC), ("cargo", CROSS_CARGO), ("the std source", CROSS_STD_SRC)] {
        if !Path::new(path).exists() {
            return Err(format!(
                "cross-check needs Debian's Rust with the std source ({tool} at {path} is missing); \
                 install it: `apt-get install rustc-web cargo-web rust-web-src`"
            ));
        }
    }
    for target in targets {
        let mut cmd = Command::new(CROSS_CARGO);
        cmd.current_dir(root())
            .env("RUSTC", CROSS_RUSTC)
            .env("RUSTC_BOOTSTRAP", "1")
            // The rustup toolchain's settings must not leak into Debian's cargo.
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO")
            .env_remove("RUSTC_WRAPPER")
            .env_remove("RUSTFLAGS")
            .args(["check", "-Zbuild-std=std,panic_abort", "--target", target, "-p", "vmtest-cli"])
            .args(["--target-dir", "target/cross"]);
        step(&format!("cross-check {target} (type check, no link)"), &mut cmd)?;
    }
    Ok(())
}

/// The in-VM example through the cargo runner: passes, and fails when it should.
fn cargo_runner_proof(vmtest: &Path) -> Result<()> {
    let runner = format!("{} run --", vmtest.display());
    step(
        "cargo test through the vmtest runner",
        cargo().env(RUNNER_VAR, &runner).args(["test", "-p", "in-vm-example"]),
    )?;
    step(
        "cargo nextest run through the vmtest runner",
        cargo().env(RUNNER_VAR, &runner).args(["nextest", "run", "-p", "in-vm-example", "--no-fail-fast"]),
    )?;
    eprintln!("\n==> a failing test fails through the runner");
    let out = cargo()
        .env(RUNNER_VAR, &runner)
        .args([
            "test",
            "-p",
            "in-vm-example",
            "--test",
            "in_vm",
            "--",
            "--ignored",
            "--exact",
            "expected_failure",
        ])
        .output()
        .map_err(|e| e.to_string())?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let expected_message = "this failure came from inside the VM (expected)";
    if out.status.success()
        || !text.contains(expected_message)
        || !text.contains("test result: FAILED. 0 passed; 1 failed")
    {
        return Err(format!("the expected failure did not come back through the runner:\n{text}"));
    }
    eprintln!("<== ok: status {}, message and test result came back from the VM", out.status);
    Ok(())
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn bench(args: &[String]) -> Result<()> {
    let mut runs = 9usize;
    let mut accel = "auto".to_owned();
    let mut suite = false;
    let mut first_run = false;
    let mut kernel_dev = false;
    let mut snapshots = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => runs = it.next().and_then(|n| n.parse().ok()).ok_or("--runs takes a number")?,
            "--accel" => accel = it.next().cloned().ok_or("--accel takes auto|kvm|tcg")?,
            "--suite" => suite = true,
            "--first-run" => first_run = true,
            "--kernel-dev" => kernel_dev = true,
            "--snapshots" => snapshots = true,
            other => return Err(format!("unknown bench flag {other}")),
        }
    }
    if suite {
        step("build vmtest (release)", cargo().args(["build", "--release", "-p", "vmtest-cli"]))?;
        return bench_suite(&vmtest_binary("release"), &accel);
    }
    if kernel_dev {
        step("build vmtest (release)", cargo().args(["build", "--release", "-p", "vmtest-cli"]))?;
        return kernel_bench::bench_kernel_dev(&vmtest_binary("release"), runs.clamp(3, 9));
    }
    if snapshots {
        step("build vmtest (release)", cargo().args(["build", "--release", "-p", "vmtest-cli"]))?;
        return snapshot_bench::bench_snapshots(&vmtest_binary("release"), runs.clamp(3, 9));
    }
    if first_run {
        step("build vmtest (release)", cargo().args(["build", "--release", "-p", "vmtest-cli"]))?;
        return bench_first_run(&vmtest_binary("release"), runs.clamp(3, 9));
    }
    if runs < 7 {
        return Err("use at least 7 runs: the machine is noisy".into());
    }
    step("build vmtest (release)", cargo().args(["build", "--release", "-p", "vmtest-cli"]))?;
    let vmtest = vmtest_binary("release");
    let floor_dir = std::env::temp_dir().join(format!("vmtest-bench-floor-{}", std::process::id()));
    std::fs::create_dir_all(&floor_dir).map_err(|e| e.to_string())?;
    let result = bench_runs(&vmtest, &floor_dir, runs, &accel);
    let _ = std::fs::remove_dir_all(&floor_dir);
    result
}

/// One timed sample: wall time and the peak RSS of the `vmtest` process itself (sampled
/// from /proc while it runs; QEMU is a separate process and not counted).
struct Sample {
    wall: Duration,
    peak_rss_kib: u64,
}

fn sample(cmd: &mut Command) -> Result<Sample> {
    let started = Instant::now();
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    let status = loop {
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            break st;
        }
        if let Ok(text) = std::fs::read_to_string(&status_path) {
            let hwm =
                text.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1));
            peak = peak.max(hwm.and_then(|v| v.parse().ok()).unwrap_or(0));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let wall = started.elapsed();
    if !status.success() {
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
        return Err(format!("{cmd:?} failed: {err}"));
    }
    Ok(Sample { wall, peak_rss_kib: peak })
}

fn bench_runs(vmtest: &Path, floor_dir: &Path, runs: usize, accel: &str) -> Result<()> {
    let floor_json = Command::new(vmtest)
        .args(["floor-command", "--accel", accel, "--dir"])
        .arg(floor_dir)
        .output()
        .map_err(|e| e.to_string())?;
    if !floor_json.status.success() {
        return Err(format!("floor-command: {}", String::from_utf8_lossy(&floor_json.stderr)));
    }
    let floor: Vec<String> =
        serde_json::from_slice(&floor_json.stdout).map_err(|e| format!("floor-command output: {e}"))?;
    let vmtest_cmd = |snapshot: bool| {
        let mut c = Command::new(vmtest);
        c.args(["run", "--accel", accel, "--", "true"]).env("VMTEST_LOG", "error").env("CI", "true");
        if !snapshot {
            c.env("VMTEST_NO_SNAPSHOT", "1");
        }
        c
    };
    let floor_cmd = || {
        let mut c = Command::new(&floor[0]);
        c.args(&floor[1..]);
        c
    };
    // Warm-up: caches (extracted kernel, initramfs, snapshot, KVM verdict), the page cache.
    sample(&mut vmtest_cmd(true))?;
    sample(&mut vmtest_cmd(false))?;
    sample(&mut floor_cmd())?;
    let (mut cold, mut restored, mut raw, mut rss) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let c = sample(&mut vmtest_cmd(false))?;
        let r = sample(&mut vmtest_cmd(true))?;
        let f = sample(&mut floor_cmd())?;
        eprintln!(
            "run {}/{runs}: cold {:.3}s, restored {:.3}s, floor {:.3}s, vmtest peak RSS {} KiB",
            i + 1,
            c.wall.as_secs_f64(),
            r.wall.as_secs_f64(),
            f.wall.as_secs_f64(),
            c.peak_rss_kib.max(r.peak_rss_kib)
        );
        rss.push(c.peak_rss_kib.max(r.peak_rss_kib));
        cold.push(c.wall);
        restored.push(r.wall);
        raw.push(f.wall);
    }
    let (m_cold, m_restored, m_raw) = (median(&mut cold), median(&mut restored), median(&mut raw));
    rss.sort();
    let concurrency = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).max(2);
    let (one, many) = concurrent(vmtest, accel, concurrency, runs)?;
    let secs = |d: Duration| d.as_secs_f64();
    println!("| what (release build, accel {accel}, medians of {runs}) | time | ratio to floor |");
    println!("|---|---|---|");
    println!(
        "| raw QEMU floor: same kernel, machine, accel; init powers off at once | {:.3} s | 1.000 |",
        secs(m_raw)
    );
    println!(
        "| `vmtest run --no-snapshot -- true` (cold boot) | {:.3} s | {:.3} |",
        secs(m_cold),
        secs(m_cold) / secs(m_raw)
    );
    println!(
        "| `vmtest run -- true` (restored from snapshot) | {:.3} s | {:.3} |",
        secs(m_restored),
        secs(m_restored) / secs(m_raw)
    );
    println!(
        "| {concurrency} restored runs at once, per run (wall / {concurrency}) vs one at a time | {:.3} s vs {:.3} s | {:.3} (parallel / sequential) |",
        secs(many) / concurrency as f64,
        secs(one),
        secs(many) / concurrency as f64 / secs(one)
    );
    println!(
        "| peak RSS of the `vmtest` runner process per VM (median, max) | {} KiB, {} KiB | |",
        rss[rss.len() / 2],
        rss[rss.len() - 1]
    );
    Ok(())
}

/// Median wall time of one restored run alone, and of `n` started together.
fn concurrent(vmtest: &Path, accel: &str, n: usize, runs: usize) -> Result<(Duration, Duration)> {
    let start = || {
        Command::new(vmtest)
            .args(["run", "--accel", accel, "--max-vms", &n.to_string(), "--", "true"])
            .env("VMTEST_LOG", "error")
            .env("CI", "true")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())
    };
    let rounds = runs.div_ceil(2).max(3);
    let (mut one, mut many) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        start()?.wait().map_err(|e| e.to_string())?;
        one.push(t.elapsed());
        let t = Instant::now();
        let children: Vec<_> = (0..n).map(|_| start()).collect::<Result<_>>()?;
        for mut c in children {
            if !c.wait().map_err(|e| e.to_string())?.success() {
                return Err("a concurrent run failed".into());
            }
        }
        many.push(t.elapsed());
    }
    Ok((median(&mut one), median(&mut many)))
}

/// Tests per minute for a suite of 50 trivial tests, each in its own VM (`cargo nextest run`
/// with vmtest as the runner): one at a time and on every core, cold and restored.
fn bench_suite(vmtest: &Path, accel: &str) -> Result<()> {
    const TESTS: usize = 50;
    let dir = root().join("target/bench-suite");
    std::fs::create_dir_all(dir.join("tests")).map_err(|e| e.to_string())?;
    let manifest = "[package]\nname = \"bench-suite\"\nversion = \"0.0.0\"\nedition = \"2021\"\npublish = false\n\n[workspace]\n";
    std::fs::write(dir.join("Cargo.toml"), manifest).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(dir.join("src")).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("src/lib.rs"), "").map_err(|e| e.to_string())?;
    let tests: String = (0..TESTS)
        .map(|i| format!("#[test]\nfn t{i:02}() {{ assert!(std::fs::read_to_string(\"/proc/cmdline\").unwrap().contains(\"vmtest.agent=1\")); }}\n"))
        .collect();
    std::fs::write(dir.join("tests/suite.rs"), tests).map_err(|e| e.to_string())?;
    let target = dir.join("target");
    let nextest = |jobs: usize, snapshot: bool| {
        let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        c.current_dir(&dir)
            .env("CARGO_TARGET_DIR", &target)
            .env(RUNNER_VAR, format!("{} run --accel {accel} --max-vms {jobs} --", vmtest.display()))
            .env("VMTEST_LOG", "error")
            .env("CI", "true")
            .args(["nextest", "run", "-j", &jobs.to_string()]);
        if !snapshot {
            c.env("VMTEST_NO_SNAPSHOT", "1");
        }
        c
    };
    step("build the 50-test suite", nextest(1, true).args(["--no-run"]))?;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    println!("| {TESTS} trivial tests, one VM each (cargo nextest run, runner `vmtest run --`) | wall | tests per minute |");
    println!("|---|---|---|");
    for (jobs, snapshot) in [(1, false), (cores, false), (1, true), (cores, true)] {
        let t = Instant::now();
        let out = nextest(jobs, snapshot).arg("--no-fail-fast").output().map_err(|e| e.to_string())?;
        let wall = t.elapsed();
        if !out.status.success() {
            return Err(format!("the suite failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        let how = if snapshot { "restored" } else { "cold (--no-snapshot)" };
        println!(
            "| -j {jobs}, {how} | {:.1} s | {:.1} |",
            wall.as_secs_f64(),
            TESTS as f64 * 60.0 / wall.as_secs_f64()
        );
    }
    Ok(())
}

/// A new user's first run, and what the KVM verdict costs.
///
/// 1. `vmtest run -- true` with an empty cache and (as root, in a mount namespace of its
///    own) no system QEMU visible: kernel and QEMU fetched, verdict made, snapshot saved.
///    Then the same again, everything cached.
/// 2. The verdict's cost on this host: `vmtest run -- true` with the verdict removed before
///    each run vs with it cached, interleaved.
/// 3. The time to a verdict when KVM hangs a real kernel: the same with a QEMU that asks for
///    the CPU model under which this kind of host's KVM hangs (needs a system QEMU).
fn bench_first_run(vmtest: &Path, runs: usize) -> Result<()> {
    let cache = tempfile_dir("first-run-cache")?;
    let masked = is_root() && Path::new("/usr/bin/unshare").exists();
    let run = |extra_env: &[(&str, &Path)]| {
        let mut c = if masked {
            let mut c = Command::new("/usr/bin/unshare");
            c.args(["--mount", "--propagation", "private", "/bin/sh", "-c", MASK_SYSTEM_QEMU]).arg(vmtest);
            c
        } else {
            Command::new(vmtest)
        };
        c.args(["run", "--", "true"])
            .env("VMTEST_CACHE_DIR", &cache)
            .env("VMTEST_LOG", "error")
            .env("CI", "true")
            .env_remove("VMTEST_QEMU")
            .env_remove("VMTEST_KERNEL");
        for (k, v) in extra_env {
            c.env(k, v);
        }
        c
    };
    let first = sample(&mut run(&[]))?.wall;
    let second = sample(&mut run(&[]))?.wall;
    let (mut probed, mut cached) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let _ = std::fs::remove_dir_all(cache.join("probe"));
        probed.push(sample(&mut run(&[]))?.wall);
        cached.push(sample(&mut run(&[]))?.wall);
    }
    let (probed, cached) = (median(&mut probed), median(&mut cached));
    let hang = match which("qemu-system-x86_64") {
        Some(qemu) => {
            let wrapper = cache.join("qemu-kvm-hang");
            std::fs::write(
                &wrapper,
                format!(
                    "#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = kvm ] && exec {q} \"$@\" -cpu host,-arch-capabilities; done\nexec {q} \"$@\"\n",
                    q = qemu.display()
                ),
            )
            .map_err(|e| e.to_string())?;
            std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .map_err(|e| e.to_string())?;
            let hang_run = |c: &mut Command| {
                c.env("VMTEST_QEMU", &wrapper).env("CI", "true");
            };
            let mut with_probe = Vec::new();
            let mut without = Vec::new();
            for _ in 0..runs.min(3) {
                let _ = std::fs::remove_dir_all(cache.join("probe"));
                let mut c = Command::new(vmtest);
                c.args(["run", "--", "true"]).env("VMTEST_CACHE_DIR", &cache).env("VMTEST_LOG", "error");
                hang_run(&mut c);
                with_probe.push(sample(&mut c)?.wall);
                let mut c = Command::new(vmtest);
                c.args(["run", "--", "true"]).env("VMTEST_CACHE_DIR", &cache).env("VMTEST_LOG", "error");
                hang_run(&mut c);
                without.push(sample(&mut c)?.wall);
            }
            Some((median(&mut with_probe), median(&mut without)))
        }
        None => None,
    };
    let _ = std::fs::remove_dir_all(&cache);
    let secs = |d: Duration| d.as_secs_f64();
    println!("| first run on this host (release build; medians of {runs} where repeated) | time |");
    println!("|---|---|");
    println!(
        "| `vmtest run -- true`, empty cache{}: kernel + QEMU fetched, KVM verdict, snapshot saved | {:.1} s |",
        if masked { ", no system QEMU visible" } else { " (system QEMU visible: not root)" },
        secs(first)
    );
    println!("| the same again, everything cached (restored) | {:.2} s |", secs(second));
    println!(
        "| `vmtest run -- true` with the KVM verdict made in the run vs cached: the verdict's cost here | {:.2} s vs {:.2} s: {:+.2} s |",
        secs(probed),
        secs(cached),
        secs(probed) - secs(cached)
    );
    if let Some((with_probe, without)) = hang {
        println!(
            "| KVM that hangs a real kernel: run with the verdict made vs cached (time to a verdict) | {:.2} s vs {:.2} s: {:+.2} s |",
            secs(with_probe),
            secs(without),
            secs(with_probe) - secs(without)
        );
    }
    Ok(())
}

/// For `sh -c`: hide the system's QEMU binary, firmware and modules, then run `$0 "$@"`.
const MASK_SYSTEM_QEMU: &str = "for p in /usr/bin/qemu-system-x86_64 /usr/share/qemu /usr/share/seabios \
    /usr/lib/ipxe/qemu /usr/lib/x86_64-linux-gnu/qemu; do \
    if [ -d \"$p\" ]; then mount -t tmpfs none \"$p\"; elif [ -e \"$p\" ]; then mount --bind /dev/null \"$p\"; fi; \
    done; exec \"$0\" \"$@\"";

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// The kernel `vmtest kernel list` calls the default.
fn default_kernel(vmtest: &Path) -> Result<PathBuf> {
    let out = Command::new(vmtest).args(["kernel", "list"]).output().map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("default: "))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(PathBuf::from)
        .ok_or(format!("no default kernel (`vmtest kernel fetch` first): {text}"))
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(name)).find(|p| p.is_file())
}

fn tempfile_dir(name: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("vmtest-bench-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    Ok(dir)
}
