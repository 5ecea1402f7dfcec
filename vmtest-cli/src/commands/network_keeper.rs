//! `vmtest network-keeper RUN_DIR` (hidden): a kept multi-VM test's private network, served
//! by a process of its own so the kept machines stay connected after `vmtest test` exits.
//! It ends by itself once the run's last machine is destroyed or its hypervisor is gone.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use vmtest_core::state::StateDir;
use vmtest_core::{network, Error, Result};

/// Serve the network of the run at `run_dir` while the run has machines.
pub async fn serve(run_dir: &Path) -> Result<i32> {
    let state = StateDir::at(run_dir.parent().unwrap_or(Path::new("/")));
    let run = state
        .runs()
        .into_iter()
        .find(|r| r.path() == run_dir)
        .ok_or_else(|| Error::usage(format!("{} is not a vmtest run dir", run_dir.display())))?;
    // Needed while a machine of the run is recorded and its hypervisor process lives.
    let needed =
        || run.path().is_dir() && run.records().iter().any(|r| r.processes.iter().any(|p| p.is_alive()));
    network::serve_while(&run_dir.join("net"), needed).await?;
    Ok(0)
}

/// Start `vmtest network-keeper RUN_DIR` in a session of its own (a Ctrl-C at the terminal
/// that ran the test does not reach it), logging to `net/keeper.log` in the run dir.
pub fn spawn(run_dir: &Path) -> Result<()> {
    let exe =
        std::env::current_exe().map_err(|e| Error::infra(format!("cannot find the vmtest binary: {e}")))?;
    let log_path = run_dir.join("net/keeper.log");
    let log = std::fs::File::create(&log_path)
        .map_err(|e| Error::io(format!("cannot create {}", log_path.display()), e))?;
    let mut cmd = Command::new(exe);
    cmd.arg("network-keeper").arg(run_dir).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| Error::infra(format!("cannot start the network keeper: {e}")))?;
    tracing::info!("the kept network is served by pid {}", child.id());
    Ok(())
}
