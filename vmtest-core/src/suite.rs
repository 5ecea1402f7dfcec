//! A suite of test files: load and check them all before anything boots, choose each file's
//! backend, size the VM slots, then run the files in order (what `vmtest test` does).

use crate::cancel::Cancel;
use crate::error::{Error, ErrorKind, Result};
use crate::events::Reporter;
use crate::hypervisor::Hypervisor;
use crate::lock::{self, SlotPool};
use crate::machine::NetworkKeeper;
use crate::registry::{BackendSettings, Registry};
use crate::runner::KernelReports;
use crate::spec::AccelChoice;
use crate::state::StateDir;
use crate::testfile::{self, TestFile};
use crate::testrun::{self, FileOutcome, RunConfig, Verdict};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

/// Which backend each file runs on.
#[derive(Clone, Debug, Default)]
pub struct BackendRequest {
    /// Wins over the files' own `backend` (`--backend`).
    pub forced: Option<String>,
    /// For files that name none (`vmtest.toml`, `$VMTEST_BACKEND`, or the program's default).
    pub fallback: String,
}

impl BackendRequest {
    fn for_file(&self, file: &TestFile) -> String {
        self.forced.clone().or_else(|| file.backend.clone()).unwrap_or_else(|| self.fallback.clone())
    }
}

/// How to run a suite.
pub struct SuiteOptions<'a> {
    pub backend: BackendRequest,
    /// What every backend is made with.
    pub settings: BackendSettings,
    pub accel: AccelChoice,
    /// What a guest kernel's bug report during a step does.
    pub kernel_reports: KernelReports,
    /// Run only subtests whose name contains this (an error if none does).
    pub filter: Option<String>,
    /// On failure, leave the machines running.
    pub keep: bool,
    /// VMs at once across every vmtest process; `None`: what memory and cores allow, and at
    /// least the largest file's node count.
    pub max_vms: Option<usize>,
    /// Starts a process that serves a kept run's private network (see [`RunConfig`]).
    pub keep_network: Option<&'a NetworkKeeper>,
}

/// How a suite ended.
#[derive(Debug)]
pub struct SuiteOutcome {
    /// Each file that ran, in order.
    pub files: Vec<FileOutcome>,
    /// Why the suite stopped before its end, or the first file that could not run.
    pub error: Option<Error>,
}

impl SuiteOutcome {
    /// True when a step of some file failed.
    pub fn failed(&self) -> bool {
        self.files.iter().any(|f| matches!(f.verdict, Verdict::Failed(_)))
    }
}

/// Load every file, reporting every problem of every file at once: one usage error whose
/// detail lists them, with file and line.
pub fn load(paths: &[PathBuf]) -> Result<Vec<TestFile>> {
    let mut files = Vec::new();
    let mut problems = Vec::new();
    for path in paths {
        match testfile::load(path) {
            Ok(f) => files.push(f),
            Err(e) => problems.extend(problem_lines(&e)),
        }
    }
    if problems.is_empty() {
        return Ok(files);
    }
    let summary = format!("{} of {} test file(s) invalid", paths.len() - files.len(), paths.len());
    Err(refusal(summary, problems))
}

/// The `k`-th of `n` shares of `files` (1-based), for sharding a suite over CI jobs.
pub fn partition(files: Vec<TestFile>, k: usize, n: usize) -> Vec<TestFile> {
    files.into_iter().enumerate().filter(|(i, _)| i % n == k - 1).map(|(_, f)| f).collect()
}

/// Run `files` in order on their backends. Errors before anything boots (a filter that
/// matches nothing, a backend that cannot run, a file asking for what its backend cannot do)
/// are returned as errors; after that, the outcome says how each file went.
pub async fn run(
    registry: &Registry,
    state: &StateDir,
    files: &[TestFile],
    opts: SuiteOptions<'_>,
    reporter: &dyn Reporter,
    cancel: &Cancel,
) -> Result<SuiteOutcome> {
    if let Some(f) = &opts.filter {
        if !files.iter().any(|t| t.subtests().iter().any(|s| s.contains(f.as_str()))) {
            return Err(Error::usage(format!("--filter `{f}` matches no subtest of the given files")));
        }
    }
    check_backend_names(registry, files)?;
    let backends = choose_backends(registry, files, &opts).await?;
    let max_vms = max_vms(files, opts.max_vms)?;
    let cfg = RunConfig {
        filter: opts.filter.clone(),
        keep: opts.keep,
        slots: Some(SlotPool::from_env(state.path(), max_vms)?),
        reporter,
        accel: opts.accel,
        kernel_reports: opts.kernel_reports,
        keep_network: opts.keep_network,
        // One switch for both: `--no-snapshot` boots every VM and reuses no checkpoint.
        store_checkpoints: opts.settings.snapshots,
    };
    let mut outcome = SuiteOutcome { files: Vec::new(), error: None };
    for (file, backend) in files.iter().zip(backends) {
        let out = testrun::run_file(backend, state, file, &cfg, cancel.cancelled()).await;
        let stop = matches!(&out.verdict, Verdict::Error(e) if e.kind() == ErrorKind::Interrupted);
        if let (Verdict::Error(e), None) = (&out.verdict, &outcome.error) {
            outcome.error = Some(Error::new(e.kind(), format!("test run stopped: {}", e.headline())));
        }
        outcome.files.push(out);
        if stop {
            break;
        }
    }
    Ok(outcome)
}

/// Every file names a backend this program has (or `auto`), with the line when it does not.
pub fn check_backend_names(registry: &Registry, files: &[TestFile]) -> Result<()> {
    let known = registry.choices();
    let problems: Vec<String> = files
        .iter()
        .filter_map(|f| f.check_backend_names(&known).err())
        .flat_map(|e| problem_lines(&e))
        .collect();
    match problems.is_empty() {
        true => Ok(()),
        false => Err(refusal("the test files name backends this vmtest does not have".into(), problems)),
    }
}

/// Each file's backend, chosen (its preflight passed) once per name, and every file checked
/// against what its backend can do, before anything boots.
async fn choose_backends(
    registry: &Registry,
    files: &[TestFile],
    opts: &SuiteOptions<'_>,
) -> Result<Vec<Arc<dyn Hypervisor>>> {
    let mut chosen: BTreeMap<String, Arc<dyn Hypervisor>> = BTreeMap::new();
    let mut backends = Vec::new();
    let mut problems = Vec::new();
    for file in files {
        let name = opts.backend.for_file(file);
        let hv = match chosen.get(&name) {
            Some(hv) => hv.clone(),
            None => {
                let hv: Arc<dyn Hypervisor> = Arc::from(registry.choose(&name, &opts.settings).await?);
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
        return Err(refusal("the test files ask for what their backend cannot do".into(), problems));
    }
    Ok(backends)
}

fn max_vms(files: &[TestFile], asked: Option<usize>) -> Result<usize> {
    let most_nodes = files.iter().map(|f| f.nodes.len()).max().unwrap_or(1);
    let max_memory = files.iter().flat_map(|f| &f.nodes).map(|n| n.memory_mib).max().unwrap_or(512);
    match asked {
        Some(0) => Err(Error::usage("--max-vms must be at least 1")),
        Some(n) => Ok(n),
        None => Ok(lock::default_max_vms(max_memory).max(most_nodes)),
    }
}

/// An error as a list of problems shows it: the message, then its detail indented.
fn problem_lines(e: &Error) -> Vec<String> {
    let detail = e.detail().unwrap_or_default().lines().map(|l| format!("  {l}"));
    std::iter::once(e.headline()).chain(detail).collect()
}

/// The usage error that ends a suite before anything boots, listing every problem.
fn refusal(summary: String, problems: Vec<String>) -> Error {
    Error::usage(format!("{summary}; nothing was booted")).with_detail(problems.join("\n"))
}
