//! The one event stream of vmtest: what a command run and a test-file run tell their user
//! while they go. The terminal and CI lines, the JSON stream (docs/events.md) and the JUnit
//! report are all [`Reporter`]s of these events.

use crate::error::Error;
use crate::kernel_report::KernelReport;
use crate::lock::Holder;
use crate::protocol::ExitStatus;
use crate::runner::Timings;
use crate::testrun::FileOutcome;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

/// Something a run tells its user about.
#[derive(Debug)]
pub enum Event<'a> {
    /// All slots are busy; the run waits (said once per wait).
    WaitingForSlots { needed: usize, max: usize, holders: &'a [Holder] },
    /// The VM was left running on purpose; [`kept_hint`] says how to reach it.
    Kept { name: &'a str },
    /// A launch attempt of VM `name` on `backend` starts (attempt 1, then retries).
    Booting { name: &'a str, backend: &'a str, attempt: u32 },
    /// The VM is up and its agent answers; `boot` is the time since the first attempt began.
    Ready { name: &'a str, boot: Duration },
    /// The command starts in the VM.
    ExecStarted { name: &'a str, argv: &'a [std::ffi::OsString] },
    /// The command ended: with a status, or with an error (timeout, lost connection...).
    ExecFinished { name: &'a str, status: Option<ExitStatus>, error: Option<&'a Error>, duration: Duration },
    /// Teardown starts: a clean shutdown, or a kill after an interruption.
    TearingDown { name: &'a str, kill: bool },
    /// The guest kernel printed a bug report while the command ran.
    KernelReport { name: &'a str, report: &'a KernelReport },
    /// The run is over (the VM is gone, or kept); all phase timings.
    Finished { name: &'a str, timings: &'a Timings },

    /// A test file starts: its nodes are about to boot.
    FileStarted { file: &'a FileRef<'a>, backend: &'a str, nodes: &'a [&'a str] },
    /// Something the user should know about a test file that is not an error.
    FileNotice { file: &'a FileRef<'a>, message: &'a str },
    /// Every node of the file is up.
    NodesUp { file: &'a FileRef<'a>, duration: Duration },
    /// A step ran: passed (with what it printed) or failed (with why).
    StepFinished { file: &'a FileRef<'a>, step: &'a StepRef<'a>, duration: Duration, result: StepResult<'a> },
    /// The file's checkpoint was saved, restored (for the file's own nodes, or for a copy
    /// that a `from` subtest runs on), or discarded. `dir` is where it is.
    Checkpoint {
        file: &'a FileRef<'a>,
        checkpoint: &'a str,
        what: CheckpointEvent<'a>,
        dir: &'a Path,
        duration: Duration,
    },
    /// A step did not run: its effect came with the restored checkpoint.
    StepRestored { file: &'a FileRef<'a>, step: &'a StepRef<'a>, checkpoint: &'a str },
    /// The test file is over: its verdict, its JUnit cases, the machines it kept.
    FileFinished { file: &'a FileRef<'a>, outcome: &'a FileOutcome },
}

/// What happened to a test file's checkpoint.
#[derive(Clone, Copy, Debug)]
pub enum CheckpointEvent<'a> {
    /// Every node was saved: into the backend's store (`stored`), or for this run only.
    Saved { stored: bool },
    /// Nodes were started from it: the file's own (`subtest` is `None`), or a copy for
    /// that `from` subtest.
    Restored { subtest: Option<&'a str> },
    /// The stored checkpoint did not restore: it was removed, and the file runs cold.
    Discarded { reason: &'a str },
}

/// The test file an event is about.
#[derive(Clone, Copy, Debug)]
pub struct FileRef<'a> {
    /// The `name` in its `[test]` table.
    pub name: &'a str,
    pub path: &'a Path,
}

/// The step an event is about.
#[derive(Clone, Copy, Debug)]
pub struct StepRef<'a> {
    /// Its line in the file.
    pub line: usize,
    /// `web.toml:23: succeed `curl ...` on client`.
    pub description: &'a str,
    /// The JUnit case it belongs to (its subtest, or the setup case).
    pub case: &'a str,
}

/// How a step ended.
#[derive(Clone, Copy, Debug)]
pub enum StepResult<'a> {
    /// What the step printed (may be empty).
    Passed { output: &'a str },
    /// The error says which command, on which node, and its output.
    Failed { error: &'a Error },
}

/// Receives [`Event`]s (the CLI prints them; a library user may log them).
pub trait Reporter: Sync {
    fn event(&self, event: &Event<'_>);
}

/// A reporter that ignores everything.
pub struct Silent;

impl Reporter for Silent {
    fn event(&self, _: &Event<'_>) {}
}

/// Several reporters, each given every event in order.
pub struct Fanout<'a>(pub Vec<&'a dyn Reporter>);

impl Reporter for Fanout<'_> {
    fn event(&self, event: &Event<'_>) {
        for r in &self.0 {
            r.event(event);
        }
    }
}

/// Collects the JUnit suites of finished test files, for [`crate::junit::render`].
#[derive(Default)]
pub struct JunitCollector {
    suites: Mutex<Vec<crate::junit::Suite>>,
}

impl JunitCollector {
    /// The report of every file finished so far.
    pub fn render(&self) -> String {
        crate::junit::render(&self.suites.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Reporter for JunitCollector {
    fn event(&self, event: &Event<'_>) {
        if let Event::FileFinished { outcome, .. } = event {
            self.suites.lock().unwrap_or_else(|p| p.into_inner()).push(outcome.suite.clone());
        }
    }
}

/// How to reach a VM that was kept running: one line per command, indented.
pub fn kept_hint(name: &str) -> String {
    format!(
        "  vmtest exec {name} -- CMD    # run a command in it\n  \
         vmtest console {name}        # serial console (Ctrl-] to leave)\n  \
         vmtest destroy {name}        # tear it down"
    )
}
