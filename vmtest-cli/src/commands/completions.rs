//! `vmtest completions SHELL` and `vmtest man`: generated from the clap definition, so they
//! never drift from the real flags.

use crate::cli::{Cli, CompletionShell};
use clap::CommandFactory;
use std::path::Path;
use vmtest_core::{Error, Result};

pub fn completions(shell: CompletionShell) -> Result<i32> {
    use clap_complete::Shell;
    let shell = match shell {
        CompletionShell::Bash => Shell::Bash,
        CompletionShell::Zsh => Shell::Zsh,
        CompletionShell::Fish => Shell::Fish,
        CompletionShell::Elvish => Shell::Elvish,
        CompletionShell::PowerShell => Shell::PowerShell,
    };
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "vmtest", &mut std::io::stdout());
    Ok(0)
}

pub fn man(out_dir: Option<&Path>) -> Result<i32> {
    let cmd = Cli::command();
    match out_dir {
        None => {
            clap_mangen::Man::new(cmd)
                .render(&mut std::io::stdout())
                .map_err(|e| Error::infra(format!("cannot write the man page: {e}")))?;
        }
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| {
                Error::usage(format!("cannot create {}: {e}; pick a writable directory", dir.display()))
            })?;
            clap_mangen::generate_to(cmd, dir).map_err(|e| {
                Error::usage(format!(
                    "cannot write man pages into {}: {e}; pick a writable directory",
                    dir.display()
                ))
            })?;
            println!("wrote man pages into {} (try: man -l {}/vmtest.1)", dir.display(), dir.display());
        }
    }
    Ok(0)
}
