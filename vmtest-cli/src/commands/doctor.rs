//! `vmtest doctor`: every backend's pre-flight checks, each with its fix, plus what the
//! state dir holds. Fails when the chosen backend cannot run.

use super::backends::QemuOptions;
use vmtest_core::state::StateDir;
use vmtest_core::sweep::{self, Reason, Scope};
use vmtest_core::{backend_choice, CheckStatus, Result};

pub async fn doctor(backend: &str) -> Result<i32> {
    // Doctor may take the seconds a KVM probe costs: that is the answer it is asked for.
    let all = super::backends::all(QemuOptions { prove_kvm: true, ..QemuOptions::default() });
    let mut usable = Vec::new();
    for b in &all {
        let pf = b.preflight().await;
        println!("backend {}:", b.name());
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
        if pf.passed() {
            usable.push(b.name());
        }
    }
    let state = StateDir::from_env();
    let found =
        sweep::find(&state, &super::backends::refs(&all), Scope { all: true, query_backends: false }).await;
    let orphans = found.iter().filter(|f| f.reason == Reason::OwnerDead).count();
    let kept = found.iter().filter(|f| f.reason == Reason::Kept).count();
    println!("state dir {}: {} VM(s): {orphans} orphaned, {kept} kept", state.path().display(), found.len());
    if orphans > 0 {
        println!("         fix: `vmtest cleanup` destroys the orphans");
    }
    let chosen = if backend == "auto" {
        backend_choice::auto_order().iter().find(|n| usable.contains(n)).copied()
    } else {
        usable.iter().find(|n| **n == backend).copied()
    };
    match chosen {
        Some(name) => {
            println!("vmtest will use: {name}");
            Ok(0)
        }
        None => {
            println!("vmtest cannot run with --backend {backend} here; see the FAIL lines above");
            Ok(vmtest_core::error::exit_codes::PREFLIGHT)
        }
    }
}
