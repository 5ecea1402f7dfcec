//! One module per subcommand.

mod backends;
mod doctor;
mod floor;
mod kernel;
mod run;

use crate::cli::{Cli, Command};
use vmtest_core::Result;

/// Run the chosen subcommand; the value is the process exit code.
pub async fn dispatch(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Run(args) => run::run(args).await,
        Command::Kernel(cmd) => kernel::kernel(cmd).await,
        Command::Doctor => doctor::doctor().await,
        Command::FloorCommand(args) => floor::floor_command(args).await,
    }
}
