//! Builds `vmtest-agent` as a static binary and embeds it: the initramfs needs an init that
//! runs before any guest library exists. A nested cargo build with its own target dir, so it
//! never waits on the outer build's lock. `VMTEST_AGENT_BINARY` supplies a prebuilt agent.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("vmtest-agent");
    println!("cargo:rerun-if-env-changed=VMTEST_AGENT_BINARY");
    if let Some(prebuilt) = env::var_os("VMTEST_AGENT_BINARY") {
        std::fs::copy(&prebuilt, &out).expect("copy VMTEST_AGENT_BINARY");
        return;
    }
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let workspace = manifest.parent().unwrap();
    for dir in [
        "vmtest-agent/src",
        "vmtest-agent/Cargo.toml",
        "vmtest-core/src/protocol.rs",
        "vmtest-core/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(dir).display());
    }
    let target = env::var("TARGET").unwrap();
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join("agent");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(workspace)
        .args(["build", "--release", "--package", "vmtest-agent", "--target", &target, "--target-dir"])
        .arg(&target_dir)
        // The outer build's flags and wrappers (clippy's among them) are not for this one.
        .env_remove("RUSTFLAGS")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_TARGET_DIR")
        .env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-feature=+crt-static")
        // Smaller is faster: the kernel unpacks the initramfs on every boot.
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
        .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "s")
        .status()
        .expect("run cargo to build vmtest-agent");
    assert!(status.success(), "building the static vmtest-agent failed");
    let built = target_dir.join(&target).join("release").join("vmtest-agent");
    copy(&built, &out);
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
}
