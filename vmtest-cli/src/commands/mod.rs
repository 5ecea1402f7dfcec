//! One module per subcommand.

mod backends;
#[cfg(target_os = "linux")]
mod cache;
mod cleanup;
mod completions;
mod config;
mod doctor;
#[cfg(target_os = "linux")]
mod floor;
mod image;
#[cfg(target_os = "linux")]
mod kernel;
mod network_keeper;
#[cfg(target_os = "linux")]
mod qemu;
mod reporter;
mod request;
mod run;
mod test;
mod vms;

use crate::cli::{Cli, Command};
use vmtest_core::Result;

/// Run the chosen subcommand; the value is the process exit code.
pub async fn dispatch(cli: Cli) -> Result<i32> {
    if let Some(verb) = host_verb(&cli.command).filter(|_| run::in_vmtest_guest()) {
        return Err(run::host_only(verb));
    }
    match cli.command {
        Command::Run(args) => run::run(args).await,
        Command::Test(args) => test::test(args).await,
        Command::List { json } => vms::list(json).await,
        Command::Exec(args) => vms::exec(args).await,
        Command::Console { name } => vms::console(&name).await,
        Command::Destroy { name } => vms::destroy(&name).await,
        Command::Cleanup(args) => cleanup::cleanup(args).await,
        #[cfg(target_os = "linux")]
        Command::Kernel(cmd) => kernel::kernel(cmd).await,
        #[cfg(not(target_os = "linux"))]
        Command::Kernel(_) => Err(backends::qemu_unavailable()),
        #[cfg(target_os = "linux")]
        Command::Cache(cmd) => cache::cache(cmd),
        #[cfg(not(target_os = "linux"))]
        Command::Cache(_) => Err(backends::qemu_unavailable()),
        #[cfg(target_os = "linux")]
        Command::Qemu(cmd) => qemu::qemu(cmd).await,
        #[cfg(not(target_os = "linux"))]
        Command::Qemu(_) => Err(backends::qemu_unavailable()),
        Command::Image(cmd) => image::image(cmd).await,
        Command::Doctor { backend } => doctor::doctor(&backend).await,
        #[cfg(target_os = "linux")]
        Command::Floor(args) => floor::floor_command(args).await,
        #[cfg(not(target_os = "linux"))]
        Command::Floor(_) => Err(backends::qemu_unavailable()),
        Command::NetworkKeeper { run_dir } => network_keeper::serve(&run_dir).await,
        Command::Config(args) => config::config(args),
        Command::Completions { shell } => completions::completions(shell),
        Command::Man { out_dir } => completions::man(out_dir.as_deref()),
    }
}

/// The name of a verb that manages VMs or host state, which a guest cannot do. `run` has
/// its own answer in a guest; config, completions and man only print.
fn host_verb(command: &Command) -> Option<&'static str> {
    Some(match command {
        Command::Test(_) => "test",
        Command::List { .. } => "list",
        Command::Exec(_) => "exec",
        Command::Console { .. } => "console",
        Command::Destroy { .. } => "destroy",
        Command::Cleanup(_) => "cleanup",
        Command::Kernel(_) => "kernel",
        Command::Qemu(_) => "qemu",
        Command::Cache(_) => "cache",
        Command::Image(_) => "image",
        Command::Doctor { .. } => "doctor",
        Command::Floor(_) => "floor",
        Command::NetworkKeeper { .. } => "network-keeper",
        Command::Run(_) | Command::Config(_) | Command::Completions { .. } | Command::Man { .. } => {
            return None
        }
    })
}
