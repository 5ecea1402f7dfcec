//! `vmtest cleanup`: destroy what dead runs left behind (and, with --all, everything).

use crate::cli::CleanupArgs;
use std::io::{BufRead, IsTerminal};
use vmtest_core::registry::BackendSettings;
use vmtest_core::state::StateDir;
use vmtest_core::sweep::{self, Scope};
use vmtest_core::{Error, Result};

pub async fn cleanup(args: CleanupArgs) -> Result<i32> {
    let state = StateDir::from_env();
    let all = super::backends::registry()
        .build(&BackendSettings { die_with_parent: false, ..BackendSettings::default() });
    let backends = all.refs();
    let found = sweep::find(&state, &backends, Scope { all: args.all, query_backends: true }).await;
    if found.is_empty() {
        sweep::remove_empty_dead_runs(&state);
        println!("nothing to clean up");
        return Ok(0);
    }
    for f in &found {
        println!(
            "{:<28} {:<10} {} (owner pid {})",
            f.record.name,
            f.record.backend,
            f.reason.describe(),
            f.record.owner.pid
        );
    }
    if args.list_only {
        return Ok(0);
    }
    if !args.force && std::io::stdin().is_terminal() {
        eprint!("destroy {} VM(s)? [y/N] ", found.len());
        let mut answer = String::new();
        let _ = std::io::stdin().lock().read_line(&mut answer);
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            eprintln!("vmtest: nothing destroyed");
            return Ok(1);
        }
    }
    let mut failed = Vec::new();
    for f in &found {
        match sweep::destroy(f, &backends).await {
            Ok(()) => println!("destroyed {}", f.record.name),
            Err(e) => failed.push(format!("{}: {}", f.record.name, e.message())),
        }
    }
    sweep::remove_empty_dead_runs(&state);
    if failed.is_empty() {
        Ok(0)
    } else {
        Err(Error::infra(format!("could not destroy {} VM(s): {}", failed.len(), failed.join("; "))))
    }
}
