//! `vmtest doctor`: every backend's pre-flight checks, each with its fix, plus what the
//! state dir holds. Fails when the chosen backend cannot run.

use vmtest_core::registry::BackendSettings;
use vmtest_core::state::StateDir;
use vmtest_core::sweep::{self, Reason, Scope};
use vmtest_core::{CheckStatus, Result};

pub async fn doctor(backend: &str) -> Result<i32> {
    // Doctor may take the seconds a KVM probe costs: that is the answer it is asked for.
    let registry = super::backends::registry();
    let all = registry.build(&BackendSettings { prove_acceleration: true, ..BackendSettings::default() });
    let mut usable = Vec::new();
    for b in all.refs() {
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
    let found = sweep::find(&state, &all.refs(), Scope { all: true, query_backends: false }).await;
    let orphans = found.iter().filter(|f| f.reason == Reason::OwnerDead).count();
    let kept = found.iter().filter(|f| f.reason == Reason::Kept).count();
    println!("state dir {}: {} VM(s): {orphans} orphaned, {kept} kept", state.path().display(), found.len());
    if orphans > 0 {
        println!("         fix: `vmtest cleanup` destroys the orphans");
    }
    let chosen = if backend == "auto" {
        registry.names().into_iter().find(|n| usable.contains(n))
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
            Ok(crate::exit_codes::PREFLIGHT)
        }
    }
}
