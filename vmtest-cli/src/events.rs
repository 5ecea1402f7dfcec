//! The machine-readable event stream: one JSON object per line (schema: docs/events.md).

use crate::ui;
use serde_json::{json, Map, Value};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use vmtest_core::events::{CheckpointEvent, Event, FileRef, Reporter, StepResult};
use vmtest_core::junit::CaseStatus;
use vmtest_core::protocol::ExitStatus;
use vmtest_core::testrun::Verdict;
use vmtest_core::Error;

/// Bumped when a field changes meaning or goes away (new fields and events do not bump it).
pub const SCHEMA_VERSION: u32 = 1;

/// Set once `run_finished` or `test_finished` (which carry the error) is on stderr: the
/// stream has ended.
static RUN_FINISHED_ON_STDERR: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the JSON stream on stderr has already ended.
pub fn stream_finished() -> bool {
    RUN_FINISHED_ON_STDERR.load(std::sync::atomic::Ordering::Relaxed)
}

enum Dest {
    /// Whole lines on stderr, through the shared terminal lock.
    Stderr,
    File(Arc<Mutex<std::fs::File>>),
}

/// Writes events as JSON lines.
pub struct JsonEvents {
    dest: Dest,
    start: Instant,
    /// Fields every event of this emitter carries (e.g. the `kernel` of a matrix run).
    extra: Map<String, Value>,
}

impl JsonEvents {
    pub fn stderr(start: Instant) -> Self {
        JsonEvents { dest: Dest::Stderr, start, extra: Map::new() }
    }

    pub fn file(path: &std::path::Path, start: Instant) -> vmtest_core::Result<Self> {
        // Appended to, so that many runs (a cargo runner's test binaries) share one file;
        // each event is one write, so lines of concurrent runs do not mix.
        let f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| {
            Error::usage(format!(
                "cannot create the events file {}: {e}; check that its directory exists",
                path.display()
            ))
        })?;
        Ok(JsonEvents { dest: Dest::File(Arc::new(Mutex::new(f))), start, extra: Map::new() })
    }

    /// The same stream, with `key: value` added to every event.
    pub fn with_field(&self, key: &str, value: Value) -> JsonEvents {
        let dest = match &self.dest {
            Dest::Stderr => Dest::Stderr,
            Dest::File(f) => Dest::File(f.clone()),
        };
        let mut extra = self.extra.clone();
        extra.insert(key.to_owned(), value);
        JsonEvents { dest, start: self.start, extra }
    }

    /// Emit one event of `kind` with these extra fields.
    pub fn emit(&self, kind: &str, fields: Value) {
        // `type`, `time` and `elapsed` first (easy to grep and to read), then the rest.
        let head = json!({
            "type": kind,
            "time": ui::rfc3339(SystemTime::now()),
            "elapsed": secs(self.start.elapsed()),
            "pid": std::process::id(),
        });
        let mut line = String::from("{");
        for k in ["type", "time", "elapsed", "pid"] {
            let v = &head[k];
            line.push_str(&format!("{}:{v},", Value::from(k)));
        }
        let mut all = self.extra.clone();
        if let Value::Object(f) = fields {
            all.extend(f);
        }
        for (k, v) in all.iter().filter(|(k, _)| !["type", "time", "elapsed", "pid"].contains(&k.as_str())) {
            line.push_str(&format!("{}:{v},", Value::from(k.as_str())));
        }
        line.pop();
        line.push('}');
        match &self.dest {
            Dest::Stderr => {
                ui::line(&line);
                if kind == "run_finished" || kind == "test_finished" {
                    RUN_FINISHED_ON_STDERR.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
            Dest::File(f) => {
                let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
                line.push('\n');
                let _ = f.write_all(line.as_bytes()).and_then(|_| f.flush());
            }
        }
    }
}

/// The JSON streams a command writes: on stderr with `--message-format json`, and to
/// `--events-file`.
pub fn sinks(json: bool, events_file: Option<&std::path::Path>) -> vmtest_core::Result<Vec<JsonEvents>> {
    let start = Instant::now();
    let mut sinks = Vec::new();
    if json {
        sinks.push(JsonEvents::stderr(start));
    }
    if let Some(path) = events_file {
        sinks.push(JsonEvents::file(path, start)?);
    }
    Ok(sinks)
}

/// The last event of a command (`run_finished`, `test_finished`): its exit code and error.
pub fn finish(sinks: &[JsonEvents], kind: &str, result: &vmtest_core::Result<i32>) {
    let (code, error) = match result {
        Ok(code) => (*code, None),
        Err(e) => (crate::exit_codes::of(e), Some(error_json(e))),
    };
    for j in sinks {
        j.emit(kind, json!({"exit_code": code, "error": error}));
    }
}

/// One log record as a `log` event line (see docs/events.md).
pub fn log_line(level: &str, target: &str, message: &str) -> String {
    let v = json!({
        "type": "log",
        "time": ui::rfc3339(SystemTime::now()),
        "elapsed": secs(ui::process_start().elapsed()),
        "pid": std::process::id(),
        "level": level.to_lowercase(),
        "target": target,
        "message": message,
    });
    ordered_line(&v, &["type", "time", "elapsed", "pid", "level", "target", "message"])
}

/// An `error` event line: the error that ended the command.
pub fn error_line(e: &Error) -> String {
    let mut v = error_json(e);
    v["type"] = json!("error");
    v["time"] = json!(ui::rfc3339(SystemTime::now()));
    v["elapsed"] = secs(ui::process_start().elapsed());
    v["pid"] = json!(std::process::id());
    ordered_line(&v, &["type", "time", "elapsed", "pid", "kind", "message", "hint", "detail", "exit_code"])
}

/// `v`'s fields as one JSON line in the order of `keys` (type and time first read best).
fn ordered_line(v: &Value, keys: &[&str]) -> String {
    let fields: Vec<String> = keys.iter().map(|k| format!("{}:{}", Value::from(*k), v[*k])).collect();
    format!("{{{}}}", fields.join(","))
}

fn secs(d: Duration) -> Value {
    json!((d.as_secs_f64() * 1000.0).round() / 1000.0)
}

/// `fields` plus the test file's name and path.
fn with_file(file: &FileRef<'_>, fields: Value) -> Value {
    let mut all = Map::new();
    all.insert("file".into(), json!(file.name));
    all.insert("path".into(), json!(file.path.display().to_string()));
    if let Value::Object(f) = fields {
        all.extend(f);
    }
    Value::Object(all)
}

/// One JUnit case: its name, how it ended and its time.
fn case_json(c: &vmtest_core::junit::Case) -> Value {
    let (status, message) = match &c.status {
        CaseStatus::Passed => ("passed", None),
        CaseStatus::Failed { message, .. } => ("failed", Some(message.as_str())),
        CaseStatus::Skipped { reason } => ("skipped", Some(reason.as_str())),
    };
    json!({"name": c.name, "status": status, "message": message, "time_secs": secs(c.time)})
}

pub fn status_json(s: ExitStatus) -> Value {
    match s {
        ExitStatus::Code(c) => json!({"code": c, "signal": null}),
        ExitStatus::Signal(n) => json!({"code": null, "signal": n}),
    }
}

pub fn error_json(e: &Error) -> Value {
    json!({
        "kind": format!("{:?}", e.kind()).to_lowercase(),
        "message": e.message(),
        "hint": e.hint(),
        "detail": e.detail(),
        "exit_code": crate::exit_codes::of(e),
    })
}

impl Reporter for JsonEvents {
    fn event(&self, event: &Event<'_>) {
        match event {
            Event::WaitingForSlots { needed, max, holders } => self.emit(
                "waiting_for_slots",
                json!({"needed": needed, "max": max, "holders": holders.iter().map(|h| h.to_string()).collect::<Vec<_>>()}),
            ),
            Event::Booting { name, backend, attempt } => {
                self.emit("booting", json!({"vm": name, "backend": backend, "attempt": attempt}))
            }
            Event::Ready { name, boot } => self.emit("ready", json!({"vm": name, "boot_secs": secs(*boot)})),
            Event::ExecStarted { name, argv } => self.emit(
                "exec_started",
                json!({"vm": name, "argv": argv.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>()}),
            ),
            Event::ExecFinished { name, status, error, duration } => self.emit(
                "exec_finished",
                json!({
                    "vm": name,
                    "status": status.map(status_json),
                    "exit_code": status.map(|s| s.shell_code()),
                    "error": error.map(error_json),
                    "duration_secs": secs(*duration),
                }),
            ),
            Event::TearingDown { name, kill } => {
                self.emit("tearing_down", json!({"vm": name, "action": if *kill { "kill" } else { "shutdown" }}))
            }
            Event::Kept { name } => self.emit("kept", json!({"vm": name})),
            Event::KernelReport { name, report } => self.emit(
                "kernel_report",
                json!({"vm": name, "kind": report.kind, "title": report.title, "text": report.text}),
            ),
            Event::Finished { name, timings } => {
                let t: Map<String, Value> = timings.phases.iter().map(|(p, d)| (p.clone(), secs(*d))).collect();
                self.emit("finished", json!({"vm": name, "timings": t}))
            }
            Event::FileStarted { file, backend, nodes } => {
                self.emit("file_started", with_file(file, json!({"backend": backend, "nodes": nodes})))
            }
            Event::FileNotice { file, message } => {
                self.emit("file_notice", with_file(file, json!({"message": message})))
            }
            Event::NodesUp { file, duration } => {
                self.emit("nodes_up", with_file(file, json!({"duration_secs": secs(*duration)})))
            }
            Event::StepFinished { file, step, duration, result } => {
                let (outcome, output, error) = match result {
                    StepResult::Passed { output } => ("passed", Some(*output), None),
                    StepResult::Failed { error } => ("failed", None, Some(error_json(error))),
                };
                self.emit(
                    "step_finished",
                    with_file(
                        file,
                        json!({
                            "line": step.line,
                            "step": step.description,
                            "case": step.case,
                            "result": outcome,
                            "output": output,
                            "error": error,
                            "duration_secs": secs(*duration),
                        }),
                    ),
                )
            }
            Event::Checkpoint { file, checkpoint, what, dir, duration } => {
                let (action, subtest, stored, reason) = match what {
                    CheckpointEvent::Saved { stored } => ("saved", None, Some(*stored), None),
                    CheckpointEvent::Restored { subtest } => ("restored", *subtest, None, None),
                    CheckpointEvent::Discarded { reason } => ("discarded", None, None, Some(*reason)),
                };
                self.emit(
                    "checkpoint",
                    with_file(
                        file,
                        json!({
                            "checkpoint": checkpoint,
                            "action": action,
                            "subtest": subtest,
                            "stored": stored,
                            "reason": reason,
                            "dir": dir.display().to_string(),
                            "duration_secs": secs(*duration),
                        }),
                    ),
                )
            }
            Event::StepRestored { file, step, checkpoint } => self.emit(
                "step_restored",
                with_file(
                    file,
                    json!({
                        "line": step.line,
                        "step": step.description,
                        "case": step.case,
                        "checkpoint": checkpoint,
                    }),
                ),
            ),
            Event::FileFinished { file, outcome } => {
                let (verdict, error) = match &outcome.verdict {
                    Verdict::Passed => ("passed", None),
                    Verdict::Failed(e) => ("failed", Some(error_json(e))),
                    Verdict::Error(e) => ("error", Some(error_json(e))),
                };
                let cases: Vec<Value> = outcome.suite.cases.iter().map(case_json).collect();
                self.emit(
                    "file_finished",
                    with_file(
                        file,
                        json!({
                            "verdict": verdict,
                            "error": error,
                            "duration_secs": secs(outcome.suite.time),
                            "cases": cases,
                            "kept": outcome.kept,
                        }),
                    ),
                )
            }
        }
    }
}
