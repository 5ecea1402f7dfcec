//! How run events reach people: a live status line on a terminal, timestamped lines in CI,
//! and the notices (slot waits, kept VMs) in both.

use crate::events::JsonEvents;
use crate::ui::{self, Verbosity};
use std::time::SystemTime;
use vmtest_core::events::{kept_hint, CheckpointEvent, Event, Fanout, FileRef, Reporter, StepResult};
use vmtest_core::exec::display_argv;
use vmtest_core::spec::format_duration;
use vmtest_core::testrun::Verdict;
use vmtest_core::Error;

/// Human progress on stderr.
pub struct Human {
    /// A status line on a terminal (else timestamped lines).
    pub live: bool,
    pub verbosity: Verbosity,
}

impl Human {
    pub fn new() -> Self {
        let live = ui::live_status_wanted();
        if live {
            ui::enable_live_status();
        }
        Human { live, verbosity: ui::verbosity() }
    }

    /// A phase line: timestamped in CI; on a terminal only with -v (the status line shows it).
    fn phase(&self, msg: String) {
        if self.verbosity == Verbosity::Quiet {
            return;
        }
        if !self.live {
            ui::line(&format!("{} vmtest: {msg}", ui::rfc3339(SystemTime::now())));
        } else if self.verbosity >= Verbosity::Verbose {
            ui::line(&format!("vmtest: {msg}"));
        }
    }

    fn status(&self, text: Option<String>) {
        if self.live && self.verbosity > Verbosity::Quiet {
            ui::set_status(text);
        }
    }
}

impl Reporter for Human {
    fn event(&self, event: &Event<'_>) {
        match event {
            Event::WaitingForSlots { needed, max, holders } => {
                let who: Vec<String> = holders.iter().map(|h| h.to_string()).collect();
                ui::line(&format!(
                    "vmtest: waiting for {needed} of {max} VM slot(s), held by: {}",
                    if who.is_empty() { "processes that are exiting".to_owned() } else { who.join("; ") }
                ));
                self.status(Some(format!("Waiting for a VM slot ({needed} of {max})")));
            }
            Event::Booting { name, backend, attempt } => {
                let again = if *attempt > 1 { format!(", attempt {attempt}") } else { String::new() };
                self.phase(format!("booting {name} ({backend}{again})"));
                self.status(Some(format!("Booting {name} ({backend}{again})")));
            }
            Event::Ready { name, boot } => {
                self.phase(format!("{name} ready after {}", ui::format_secs(*boot)));
            }
            Event::ExecStarted { name, argv } => {
                let cmd = display_argv(argv);
                self.phase(format!("running: {cmd}"));
                self.status(Some(format!("Running in {name}: {cmd}")));
            }
            Event::ExecFinished { status, error, duration, .. } => {
                let how = match (status, error) {
                    (Some(s), _) => s.to_string(),
                    (None, Some(e)) => format!("failed: {}", e.headline()),
                    (None, None) => "ended".to_owned(),
                };
                self.phase(format!("command {how} after {}", ui::format_secs(*duration)));
                self.status(None);
            }
            Event::TearingDown { name, kill } => {
                self.status(Some(format!("Tearing down {name}{}", if *kill { " (kill)" } else { "" })));
            }
            Event::Kept { name } => {
                self.status(None);
                ui::line(&format!("vmtest: the VM is kept running: {name}\n{}", kept_hint(name)));
            }
            Event::KernelReport { name, report } => {
                self.status(None);
                let mut text = format!("vmtest: the guest kernel of {name} reported: {}", report.title);
                for line in report.text.lines() {
                    text.push_str("\n  | ");
                    text.push_str(line);
                }
                ui::line(&text);
            }
            Event::Finished { name, timings } => {
                self.status(None);
                let parts: Vec<String> = ["launch", "command", "teardown"]
                    .iter()
                    .filter_map(|p| timings.get(p).map(|d| format!("{p} {}", ui::format_secs(d))))
                    .collect();
                self.phase(format!("{name} done ({})", parts.join(", ")));
            }
            Event::FileStarted { file, nodes, .. } => {
                file_line(file, &format!("booting {} node(s): {}", nodes.len(), nodes.join(", ")));
            }
            Event::FileNotice { file, message } => file_line(file, message),
            Event::NodesUp { file, duration } => {
                file_line(file, &format!("all nodes up in {}", format_duration(*duration)));
            }
            Event::StepFinished { file, step, duration, result: StepResult::Passed { .. } } => {
                file_line(file, &format!("{}: ok ({})", step.description, format_duration(*duration)));
            }
            Event::StepFinished { file, step, result: StepResult::Failed { error }, .. } => {
                file_line(file, &format!("FAILED {}: {}", step.description, error.headline()));
                for l in error.detail().unwrap_or_default().lines() {
                    file_line(file, &format!("    {l}"));
                }
            }
            Event::Checkpoint { file, checkpoint, what, dir, duration } => {
                file_line(file, &checkpoint_line(checkpoint, what, dir, *duration));
            }
            Event::StepRestored { file, step, checkpoint } => {
                file_line(file, &format!("{}: restored from checkpoint `{checkpoint}`", step.description));
            }
            Event::FileFinished { file, outcome } => {
                self.status(None);
                let secs = format_duration(outcome.suite.time);
                let cases = outcome.suite.cases.len();
                match &outcome.verdict {
                    Verdict::Passed => {
                        ui::line(&format!("vmtest: {}: PASSED ({cases} case(s), {secs})", file.name))
                    }
                    Verdict::Failed(_) => ui::line(&format!("vmtest: {}: FAILED ({secs})", file.name)),
                    Verdict::Error(e) => ui::line(&error_lines(&format!("{}: ERROR", file.name), e, &secs)),
                }
                if !outcome.kept.is_empty() {
                    ui::line(&format!(
                        "vmtest: the machines of {} are kept running (their private network too, without faults)",
                        file.name
                    ));
                }
            }
        }
    }
}

/// The reporters of one command: its JSON streams, then the human progress when asked.
pub fn fanout<'a>(json: &'a [JsonEvents], human: Option<&'a Human>) -> Fanout<'a> {
    let mut all: Vec<&dyn Reporter> = json.iter().map(|j| j as &dyn Reporter).collect();
    all.extend(human.map(|h| h as &dyn Reporter));
    Fanout(all)
}

/// What happened to a checkpoint, in one line.
fn checkpoint_line(
    name: &str,
    what: &CheckpointEvent<'_>,
    dir: &std::path::Path,
    d: std::time::Duration,
) -> String {
    let took = format_duration(d);
    match what {
        CheckpointEvent::Saved { stored: true } => {
            format!("checkpoint `{name}` saved in {took} ({})", dir.display())
        }
        CheckpointEvent::Saved { stored: false } => {
            format!("checkpoint `{name}` saved in {took}, for this run only")
        }
        CheckpointEvent::Restored { subtest: None } => {
            format!("restored checkpoint `{name}` in {took} ({})", dir.display())
        }
        CheckpointEvent::Restored { subtest: Some(s) } => {
            format!("subtest `{s}`: restored its copy of checkpoint `{name}` in {took}")
        }
        CheckpointEvent::Discarded { reason } => {
            format!("checkpoint `{name}` discarded ({reason}); running the file cold")
        }
    }
}

/// A progress line of a test file: `vmtest: [name] text`.
fn file_line(file: &FileRef<'_>, text: &str) {
    ui::line(&format!("vmtest: [{}] {text}", file.name));
}

/// `vmtest: WHAT: headline (secs)` and the error's detail, indented.
fn error_lines(what: &str, e: &Error, secs: &str) -> String {
    let mut text = format!("vmtest: {what}: {} ({secs})", e.headline());
    for l in e.detail().unwrap_or_default().lines() {
        text.push_str(&format!("\n  {l}"));
    }
    text
}
