//! `vmtest doctor`: every pre-flight check, each with its fix.

use backend_qemu::{QemuBackend, QemuOptions};
use vmtest_core::{CheckStatus, Hypervisor, Result};

pub async fn doctor() -> Result<i32> {
    let backend = QemuBackend::new(QemuOptions::default());
    let pf = backend.preflight().await;
    println!("backend {}:", backend.name());
    for c in &pf.checks {
        let mark = match c.status {
            CheckStatus::Ok => "ok  ",
            CheckStatus::Warn => "warn",
            CheckStatus::Fail => "FAIL",
        };
        println!("  [{mark}] {}: {}", c.name, c.detail);
        if let (Some(fix), true) = (&c.fix, c.status != CheckStatus::Ok) {
            println!("         fix: {fix}");
        }
    }
    Ok(if pf.passed() { 0 } else { vmtest_core::error::exit_codes::PREFLIGHT })
}
