//! Turning the command flags shared by `run` and `exec` into an `ExecRequest`.

use crate::cli::CommandArgs;
use std::ffi::OsString;
use std::time::Duration;
use vmtest_core::environment::EnvRules;
use vmtest_core::exec::{ExecRequest, GuestUser, OutputMode, StdinSource};
use vmtest_core::spec;
use vmtest_core::{Error, Result};

/// A request that runs `argv` as if on the host: cwd, environment, user, live stdio.
pub fn exec_request(args: &CommandArgs, argv: &[OsString]) -> Result<ExecRequest> {
    let mut rules = EnvRules { clear: args.clear_env, unset: args.unset_env.clone(), ..Default::default() };
    for e in &args.env {
        rules.add_env_arg(e);
    }
    let timeout = args.timeout.as_deref().map(spec::parse_duration).transpose()?;
    exec_request_with(args, &rules, timeout, argv)
}

/// The same with environment rules and a timeout decided elsewhere (the config file).
pub fn exec_request_with(
    args: &CommandArgs,
    rules: &EnvRules,
    timeout: Option<Duration>,
    argv: &[OsString],
) -> Result<ExecRequest> {
    let cwd = match &args.cwd {
        Some(c) => c.clone(),
        None => std::env::current_dir().map_err(|e| {
            Error::usage(format!(
                "cannot read the current directory: {e}; cd to an existing directory or pass --cwd DIR"
            ))
        })?,
    };
    Ok(ExecRequest {
        argv: argv.to_vec(),
        cwd: Some(cwd),
        env: rules.apply(std::env::vars_os()),
        stdin: StdinSource::Reader(Box::new(std::io::stdin())),
        // Through the terminal lock, so progress never splits the command's lines.
        output: OutputMode::Stream(Box::new(crate::ui::Sink)),
        timeout,
        user: if args.root { GuestUser::ROOT } else { GuestUser::current() },
    })
}
