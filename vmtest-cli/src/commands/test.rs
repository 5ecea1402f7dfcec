//! `vmtest test FILE...`: declarative multi-VM tests.
//!
//! Exit codes: 0 all passed; 1 a step failed; 64 a file is invalid (nothing booted);
//! 69/71/75 the machines could not be run; 124 a test ran past its `timeout`; 130 interrupted.

use super::backends::QemuOptions;
use crate::cli::TestArgs;
use crate::signals::Signals;
use std::collections::BTreeMap;
use std::sync::Arc;
use vmtest_core::junit;
use vmtest_core::lock::{self, SlotPool};
use vmtest_core::runner::{Event, Reporter};
use vmtest_core::state::StateDir;
use vmtest_core::testfile::{self, TestFile};
use vmtest_core::testrun::{self, RunConfig, Verdict};
use vmtest_core::{sweep, Error, ErrorKind, Hypervisor, Result};

/// Says when a test waits for VM slots; the rest is the test's own log.
struct SlotNotices;

impl Reporter for SlotNotices {
    fn event(&self, event: &Event<'_>) {
        if let Event::WaitingForSlots { needed, max, holders } = event {
            let who: Vec<String> = holders.iter().map(|h| h.to_string()).collect();
            eprintln!(
                "vmtest: waiting for {needed} of {max} VM slot(s), held by: {}",
                if who.is_empty() { "processes that are exiting".to_owned() } else { who.join("; ") }
            );
        }
    }
}

/// An error as `vmtest test` lists it among others: the message, then its detail indented.
fn problem_lines(e: &Error) -> Vec<String> {
    let detail = e.detail().unwrap_or_default().lines().map(|l| format!("  {l}"));
    std::iter::once(e.message().to_owned()).chain(detail).collect()
}

/// Print every problem, then the usage error that ends the command before anything boots.
fn refuse(problems: &[String], summary: String) -> Error {
    for p in problems {
        eprintln!("{p}");
    }
    Error::usage(format!("{summary}; nothing was booted"))
}

/// The backend a file runs on: `--backend`, else the file's [test] `backend`, else
/// `$VMTEST_BACKEND`, else qemu (the one with private networks).
fn backend_name(flag: Option<&str>, file: &TestFile) -> String {
    flag.map(str::to_owned)
        .or_else(|| file.backend.clone())
        .or_else(|| std::env::var("VMTEST_BACKEND").ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| "qemu".to_owned())
}

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
    let mut signals = Signals::watch().map_err(|e| Error::infra(format!("cannot watch signals: {e}")))?;
    let partition = args.partition.as_deref().map(parse_partition).transpose()?;
    let accel = args.accel.parse()?;

    // Check every file before anything boots, and report every problem of every file.
    let mut files: Vec<TestFile> = Vec::new();
    let mut problems: Vec<String> = Vec::new();
    for path in &args.files {
        let checked = testfile::load(path)
            .and_then(|f| f.check_backend_names(&["qemu", "bhyve", "multipass", "auto"]).map(|()| f));
        match checked {
            Ok(f) => files.push(f),
            Err(e) => problems.extend(problem_lines(&e)),
        }
    }
    if !problems.is_empty() {
        let invalid = args.files.len() - files.len();
        return Err(refuse(&problems, format!("{invalid} of {} test file(s) invalid", args.files.len())));
    }
    if let Some((k, n)) = partition {
        files = files.into_iter().enumerate().filter(|(i, _)| i % n == k - 1).map(|(_, f)| f).collect();
        eprintln!("vmtest: partition {k}/{n}: {} test file(s)", files.len());
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
    if let Some(f) = &args.filter {
        if !files.iter().any(|t| t.subtests().iter().any(|s| s.contains(f.as_str()))) {
            return Err(Error::usage(format!("--filter `{f}` matches no subtest of the given files")));
        }
    }

    let qemu = QemuOptions { die_with_parent: !args.keep, ..QemuOptions::default() };
    let state = StateDir::from_env();
    sweep::sweep_orphans(&state, &super::backends::refs(&super::backends::all(qemu.clone()))).await;
    // Each file's backend, chosen (and its pre-flight passed) once per name, and every file
    // checked against what its backend can do before anything boots.
    let mut chosen: BTreeMap<String, Arc<dyn Hypervisor>> = BTreeMap::new();
    let mut backends: Vec<Arc<dyn Hypervisor>> = Vec::new();
    for file in &files {
        let name = backend_name(args.backend.as_deref(), file);
        let hv = match chosen.get(&name) {
            Some(hv) => hv.clone(),
            None => {
                let hv: Arc<dyn Hypervisor> =
                    Arc::from(super::backends::choose(&name, super::backends::all(qemu.clone())).await?);
                chosen.insert(name, hv.clone());
                hv
            }
        };
        if let Err(e) = file.check_backend(testrun::backend_traits(hv.as_ref())) {
            problems.extend(problem_lines(&e));
        }
        backends.push(hv);
    }
    if !problems.is_empty() {
        return Err(refuse(&problems, "the test files ask for what their backend cannot do".into()));
    }
    let most_nodes = files.iter().map(|f| f.nodes.len()).max().unwrap_or(1);
    let max_memory = files.iter().flat_map(|f| &f.nodes).map(|n| n.memory_mib).max().unwrap_or(512);
    let max_vms = match args.max_vms {
        Some(0) => return Err(Error::usage("--max-vms must be at least 1")),
        Some(n) => n,
        None => lock::default_max_vms(max_memory).max(most_nodes),
    };
    let log = |line: &str| eprintln!("vmtest: {line}");
    let cfg = RunConfig {
        filter: args.filter.clone(),
        keep: args.keep,
        slots: Some(SlotPool::from_env(state.path(), max_vms)?),
        reporter: &SlotNotices,
        accel,
        log: &log,
        keep_network: Some(&super::network_keeper::spawn),
    };

    let mut suites = Vec::new();
    let mut exit = 0;
    let mut first_error: Option<Error> = None;
    for (file, backend) in files.iter().zip(backends) {
        let out = testrun::run_file(backend, &state, file, &cfg, signals.recv()).await;
        let cases = out.suite.cases.len();
        let secs = vmtest_core::spec::format_duration(out.suite.time);
        match &out.verdict {
            Verdict::Passed => eprintln!("vmtest: {}: PASSED ({cases} case(s), {secs})", file.name),
            Verdict::Failed(_) => {
                eprintln!("vmtest: {}: FAILED ({secs})", file.name);
                exit = exit.max(1);
            }
            Verdict::Error(e) => {
                eprintln!("vmtest: {}: ERROR: {} ({secs})", file.name, e.message());
                if let Some(d) = e.detail() {
                    for l in d.lines() {
                        eprintln!("  {l}");
                    }
                }
            }
        }
        if !out.kept.is_empty() {
            eprintln!(
                "vmtest: the machines of {} are kept running (their private network too, without faults):",
                file.name
            );
            for name in &out.kept {
                eprintln!("  vmtest exec {name} -- CMD    # run a command in it");
                eprintln!("  vmtest console {name}        # serial console (Ctrl-] to leave)");
                eprintln!("  vmtest destroy {name}        # tear it down");
            }
        }
        suites.push(out.suite);
        if let Verdict::Error(e) = out.verdict {
            let stop = e.kind() == ErrorKind::Interrupted;
            if first_error.is_none() {
                first_error = Some(e);
            }
            if stop {
                break;
            }
        }
    }
    if let Some(path) = &args.junit {
        std::fs::write(path, junit::render(&suites))
            .map_err(|e| Error::usage(format!("cannot write JUnit report {}: {e}", path.display())))?;
    }
    if let Some(e) = first_error {
        // The test's own failures were printed as they happened; this one says why it stopped.
        return Err(Error::new(e.kind(), format!("test run stopped: {}", e.message())));
    }
    Ok(exit)
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
