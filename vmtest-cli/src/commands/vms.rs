//! `vmtest list | exec | console | destroy`: operations on VMs by name.

use crate::cli::ExecArgs;
use std::io::Write;
use vmtest_core::registry::{BackendSettings, Backends};
use vmtest_core::state::{RunDir, StateDir, VmRecord};
use vmtest_core::sweep::{self, Found, Reason};
use vmtest_core::{Error, Result};

/// Every backend, made so that nothing they touch dies with this process.
fn backends() -> Backends {
    super::backends::registry()
        .build(&BackendSettings { die_with_parent: false, ..BackendSettings::default() })
}

fn find(state: &StateDir, name: &str) -> Result<(RunDir, VmRecord)> {
    state
        .find(name)
        .ok_or_else(|| Error::usage(format!("no VM named `{name}`; `vmtest list` shows the VMs there are")))
}

/// What a record's VM is doing now.
fn status(r: &VmRecord) -> &'static str {
    let up = r.processes.iter().any(|p| p.is_alive()) || r.processes.is_empty();
    match (r.kept, r.owner.is_alive(), up) {
        (_, _, false) => "stopped",
        (true, _, true) => "kept",
        (false, true, true) => "running",
        (false, false, true) => "orphan",
    }
}

pub async fn list(json: bool) -> Result<i32> {
    let state = StateDir::from_env();
    let mut records: Vec<(RunDir, VmRecord)> = state.records();
    records.sort_by_key(|(_, r)| r.created_unix);
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    if json {
        let rows: Vec<serde_json::Value> = records
            .iter()
            .map(|(run, r)| {
                serde_json::json!({
                    "name": r.name, "backend": r.backend, "node": r.node, "run": r.run_id,
                    "status": status(r), "owner_pid": r.owner.pid, "owner_command": r.owner_command,
                    "created_unix": r.created_unix, "run_dir": run.path(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows).expect("json"));
        return Ok(0);
    }
    if records.is_empty() {
        println!("no VMs");
        return Ok(0);
    }
    println!("{:<28} {:<10} {:<8} {:>8} {:>7}  OWNER", "NAME", "BACKEND", "STATUS", "AGE", "PID");
    for (_, r) in &records {
        let age = vmtest_core::spec::format_duration(std::time::Duration::from_secs(
            now.saturating_sub(r.created_unix),
        ));
        println!(
            "{:<28} {:<10} {:<8} {:>8} {:>7}  {}",
            r.name,
            r.backend,
            status(r),
            age,
            r.owner.pid,
            r.owner_command
        );
    }
    Ok(0)
}

pub async fn exec(args: ExecArgs) -> Result<i32> {
    let state = StateDir::from_env();
    let (_, record) = find(&state, &args.name)?;
    let all = backends();
    let vm = all.named(&record.backend)?.attach(&record).await?;
    let req = super::request::exec_request(&args.command_args, &args.command)?;
    let out = vm.exec(req).await?;
    Ok(out.status.shell_code())
}

pub async fn destroy(name: &str) -> Result<i32> {
    let state = StateDir::from_env();
    let (run, record) = find(&state, name)?;
    let all = backends();
    let found = Found { record, run: Some(run), reason: Reason::Kept };
    sweep::destroy(&found, &all.refs()).await?;
    eprintln!("vmtest: destroyed {name}");
    Ok(0)
}

pub async fn console(name: &str) -> Result<i32> {
    let state = StateDir::from_env();
    let (_, record) = find(&state, name)?;
    let all = backends();
    let vm = all.named(&record.backend)?.attach(&record).await?;
    vm.prepare_interactive_console().await?;
    let mut con = vm.console()?;
    eprintln!("vmtest: connected to {name}'s serial console; Ctrl-] leaves");
    let _raw = RawTerminal::enable();
    // Keystrokes go through a channel: reading stdin blocks, so it gets its own thread.
    let (keys_tx, mut keys) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 256];
        let mut stdin = std::io::stdin();
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 || keys_tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    // Nudge the shell so a prompt shows.
    con.send(b"\n").await?;
    loop {
        tokio::select! {
            out = con.read() => match out {
                Some(bytes) => {
                    let mut stdout = std::io::stdout().lock();
                    let _ = stdout.write_all(&bytes).and_then(|_| stdout.flush());
                }
                None => {
                    eprintln!("\r\nvmtest: the console closed");
                    return Ok(0);
                }
            },
            key = keys.recv() => match key {
                Some(bytes) => {
                    if let Some(i) = bytes.iter().position(|b| *b == 0x1d) {
                        con.send(&bytes[..i]).await?;
                        eprintln!("\r\nvmtest: left the console of {name} (it keeps running)");
                        return Ok(0);
                    }
                    con.send(&bytes).await?;
                }
                None => return Ok(0),
            },
        }
    }
}

/// Puts a terminal stdin in raw mode for the console, and restores it on drop.
struct RawTerminal(Option<libc::termios>);

impl RawTerminal {
    fn enable() -> RawTerminal {
        // SAFETY: termios calls on fd 0 with a zeroed, then filled, struct.
        unsafe {
            if libc::isatty(0) != 1 {
                return RawTerminal(None);
            }
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut saved) != 0 {
                return RawTerminal(None);
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            libc::tcsetattr(0, libc::TCSANOW, &raw);
            RawTerminal(Some(saved))
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            // SAFETY: restoring the attributes read in `enable`.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, saved) };
        }
    }
}
