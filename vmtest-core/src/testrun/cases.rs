//! The JUnit cases of one file, filled in as its steps run (also from `from` subtests that
//! run at once, hence the lock).

use super::{FileOutcome, Verdict};
use crate::error::Error;
use crate::junit::{Case, CaseStatus, Suite};
use crate::testfile::{Step, TestFile};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The name of the JUnit case for steps outside any subtest.
pub const SETUP_CASE: &str = "(steps outside subtests)";

/// The JUnit cases of one file as the steps run.
pub(super) struct Cases {
    filter: Option<String>,
    /// Subtests with a step up to the checkpoint: they always run (they make its state).
    unfiltered: Vec<String>,
    entries: Mutex<Vec<Entry>>,
}

struct Entry {
    case: Case,
    /// A step of it ran (or was restored): it is not "never ran" when the file fails.
    ran: bool,
}

fn new_case(name: String, status: CaseStatus) -> Entry {
    Entry { case: Case { name, time: Duration::ZERO, status, log: String::new() }, ran: false }
}

impl Cases {
    pub(super) fn new(file: &TestFile, filter: Option<&str>) -> Self {
        let filter = filter.map(str::to_owned);
        let setup = file.checkpoint().map(|(k, _)| &file.steps[..=k]).unwrap_or_default();
        let unfiltered: Vec<String> = setup.iter().filter_map(|s| s.subtest.clone()).collect();
        let mut entries = Vec::new();
        if file.steps.iter().any(|s| s.subtest.is_none()) {
            entries.push(new_case(SETUP_CASE.into(), CaseStatus::Passed));
        }
        for st in file.subtests() {
            let status = match &filter {
                Some(f) if !st.contains(f.as_str()) && !unfiltered.contains(&st) => {
                    CaseStatus::Skipped { reason: format!("filtered out by --filter {f}") }
                }
                _ => CaseStatus::Passed,
            };
            entries.push(new_case(st, status));
        }
        Cases { filter, unfiltered, entries: Mutex::new(entries) }
    }

    /// The case a step belongs to.
    pub(super) fn name_of(step: &Step) -> &str {
        step.subtest.as_deref().unwrap_or(SETUP_CASE)
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn with_case(&self, name: &str, f: impl FnOnce(&mut Case)) {
        let mut entries = self.lock();
        let e = entries.iter_mut().find(|e| e.case.name == name).expect("every step has its case");
        e.ran = true;
        f(&mut e.case);
    }

    /// Whether `--filter` keeps the step (steps outside subtests, and subtests that help make
    /// the checkpoint, always run).
    pub(super) fn wants(&self, step: &Step) -> bool {
        match (&step.subtest, &self.filter) {
            (Some(st), Some(f)) => st.contains(f.as_str()) || self.unfiltered.contains(st),
            _ => true,
        }
    }

    pub(super) fn passed_step(&self, step: &Step, d: Duration, what: &str, out: &str) {
        self.with_case(Self::name_of(step), |c| {
            c.time += d;
            c.log.push_str(&format!("{what}: ok\n"));
            if !out.trim().is_empty() {
                c.log.push_str(out.trim_end());
                c.log.push('\n');
            }
        });
    }

    /// A step that did not run because its effect was restored from a checkpoint: it counts
    /// as passed, with a note in the case's log.
    pub(super) fn restored_step(&self, step: &Step, what: &str, checkpoint: &str) {
        self.with_case(Self::name_of(step), |c| {
            c.log.push_str(&format!("{what}: restored from checkpoint `{checkpoint}`\n"));
        });
    }

    pub(super) fn failed_step(&self, step: &Step, d: Duration, msg: &str, detail: &str) {
        self.with_case(Self::name_of(step), |c| c.time += d);
        self.failed_case(Self::name_of(step), msg, detail);
    }

    /// Case `name` failed outside its steps (its machines did not come up, the checkpoint
    /// made at its step could not be saved).
    pub(super) fn failed_case(&self, name: &str, msg: &str, detail: &str) {
        self.with_case(name, |c| {
            c.status = CaseStatus::Failed { message: msg.to_owned(), detail: detail.to_owned() }
        });
    }

    /// The outcome: a failure that no step owns (boot, slots, a signal) fails the first case
    /// still passing; cases that never ran after a failure are skipped.
    pub(super) fn finish(
        self,
        file: &TestFile,
        started: Instant,
        verdict: Verdict,
        kept: Vec<String>,
    ) -> FileOutcome {
        let mut entries = self.entries.into_inner().unwrap_or_else(|p| p.into_inner());
        if let Verdict::Error(e) | Verdict::Failed(e) = &verdict {
            let failed = |e: &Entry| matches!(e.case.status, CaseStatus::Failed { .. });
            if !entries.iter().any(failed) {
                blame_first(&mut entries, e);
            }
            for e in entries.iter_mut().filter(|e| !e.ran && e.case.status == CaseStatus::Passed) {
                e.case.status = CaseStatus::Skipped { reason: "an earlier step failed".into() };
            }
        }
        let suite = Suite {
            name: file.name.clone(),
            file: file.path.display().to_string(),
            time: started.elapsed(),
            cases: entries.into_iter().map(|e| e.case).collect(),
        };
        FileOutcome { verdict, suite, kept }
    }
}

/// Fail the first passing case with `e` (a setup case is added when every case is skipped).
fn blame_first(entries: &mut Vec<Entry>, e: &Error) {
    let i = match entries.iter().position(|e| e.case.status == CaseStatus::Passed) {
        Some(i) => i,
        None => {
            entries.insert(0, new_case(SETUP_CASE.into(), CaseStatus::Passed));
            0
        }
    };
    entries[i].ran = true;
    entries[i].case.status =
        CaseStatus::Failed { message: e.headline(), detail: e.detail().unwrap_or("").to_owned() };
}
