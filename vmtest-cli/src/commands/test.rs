//! `vmtest test FILE...`: declarative multi-VM tests, run by [`vmtest_core::suite`].
//!
//! Exit codes: 0 all passed; 1 a step failed; 64 a file is invalid (nothing booted);
//! 69/71/75 the machines could not be run; 124 a test ran past its `timeout`; 130 interrupted.

use crate::cli::{MessageFormat, TestArgs};
use crate::events::{self, JsonEvents};
use serde_json::json;
use vmtest_core::config::{self, blame, Source};
use vmtest_core::events::JunitCollector;
use vmtest_core::registry::BackendSettings;
use vmtest_core::state::StateDir;
use vmtest_core::suite::{self, BackendRequest, SuiteOptions};
use vmtest_core::{sweep, Error, Result};

/// `K/N` with 1 <= K <= N.
pub fn parse_partition(s: &str) -> Result<(usize, usize)> {
    let bad = || Error::usage(format!("bad --partition `{s}`; write K/N with 1 <= K <= N, e.g. 1/3"));
    let (k, n) = s.split_once('/').ok_or_else(bad)?;
    let (k, n): (usize, usize) = (k.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
    if k == 0 || n == 0 || k > n {
        return Err(bad());
    }
    Ok((k, n))
}

pub async fn test(args: TestArgs) -> Result<i32> {
    let json_sinks = events::sinks(args.message_format == MessageFormat::Json, args.events_file.as_deref())?;
    for j in &json_sinks {
        j.emit(
            "test_started",
            json!({
                "schema_version": events::SCHEMA_VERSION,
                "vmtest_version": env!("CARGO_PKG_VERSION"),
                "files": args.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
            }),
        );
    }
    let result = test_inner(&args, &json_sinks).await;
    events::finish(&json_sinks, "test_finished", &result);
    result
}

async fn test_inner(args: &TestArgs, json_sinks: &[JsonEvents]) -> Result<i32> {
    let cancel = crate::signals::cancellation()?;
    let partition = args.partition.as_deref().map(parse_partition).transpose()?;
    let registry = super::backends::registry();
    let mut files = suite::load(&args.files)?;
    suite::check_backend_names(&registry, &files)?;
    if let Some((k, n)) = partition {
        files = suite::partition(files, k, n);
        crate::ui::line(&format!("vmtest: partition {k}/{n}: {} test file(s)", files.len()));
    }
    if args.check {
        for f in &files {
            println!(
                "{}: ok ({} node(s), {} step(s), {} subtest(s))",
                f.path.display(),
                f.nodes.len(),
                f.steps.len(),
                f.subtests().len()
            );
        }
        return Ok(0);
    }
    let opts = options(args)?;
    let state = StateDir::from_env();
    sweep::sweep_orphans(&state, &registry.build(&opts.settings).refs()).await;

    let human = (args.message_format == MessageFormat::Human).then(super::reporter::Human::new);
    let junit = JunitCollector::default();
    let mut reporters = super::reporter::fanout(json_sinks, human.as_ref());
    if args.junit.is_some() {
        reporters.0.push(&junit);
    }
    let outcome = suite::run(&registry, &state, &files, opts, &reporters, &cancel).await?;
    if let Some(path) = &args.junit {
        std::fs::write(path, junit.render())
            .map_err(|e| Error::usage(format!("cannot write JUnit report {}: {e}", path.display())))?;
    }
    match outcome.error {
        Some(e) => Err(e),
        None => Ok(if outcome.failed() { crate::exit_codes::TEST_FAILED } else { 0 }),
    }
}

/// The suite's options: flags over `vmtest.toml` (and its target) over the environment
/// over defaults, as `vmtest run` resolves them.
fn options(args: &TestArgs) -> Result<SuiteOptions<'static>> {
    let cwd = std::env::current_dir().map_err(|e| {
        Error::usage(format!("cannot read the current directory: {e}; cd to an existing directory"))
    })?;
    let flags = config::Flags {
        config: args.config.clone(),
        target: args.target.clone(),
        backend: args.backend.clone(),
        accel: args.accel.clone(),
        max_vms: args.max_vms,
        kernel_warnings: args.kernel_warnings.map(Into::into),
        ..config::Flags::default()
    };
    let eff = config::resolve(&flags, &config::process_env, &cwd)?;
    // A flag names the backend of every file; otherwise a file's own `backend` wins over
    // the config's and the environment's, and files that name none use qemu (the backend
    // with private networks) unless those say otherwise.
    let backend = match &eff.backend.source {
        Source::Flag(_) => {
            BackendRequest { forced: Some(eff.backend.value.clone()), fallback: String::new() }
        }
        Source::Default => {
            BackendRequest { forced: None, fallback: super::backends::FILE_DEFAULT.to_owned() }
        }
        _ => BackendRequest { forced: None, fallback: eff.backend.value.clone() },
    };
    Ok(SuiteOptions {
        backend,
        settings: BackendSettings {
            die_with_parent: !args.keep,
            snapshots: !args.no_snapshot,
            ..BackendSettings::default()
        },
        accel: blame(eff.accel.value.parse(), &eff.accel.source)?,
        kernel_reports: eff.kernel_warnings.value,
        filter: args.filter.clone(),
        keep: args.keep,
        max_vms: eff.max_vms.value,
        keep_network: Some(&super::network_keeper::spawn),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_parse() {
        assert_eq!(parse_partition("2/3").unwrap(), (2, 3));
        for bad in ["0/3", "4/3", "1", "a/b", "1/0"] {
            assert!(parse_partition(bad).is_err(), "{bad}");
        }
    }
}
