//! The run loop's checkpoints, against the fake hypervisor: what boots, what is restored,
//! what is saved, and what each subtest sees.

use super::fake::FakeHv;
use super::*;
use crate::events::{CheckpointEvent, StepResult};
use crate::junit::CaseStatus;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Two image nodes; setup steps, a checkpoint, a main-line step after it, and two subtests
/// that start from it: one writes a file, the other looks for that write and for the
/// main line's.
const FILE: &str = r#"[defaults]
image = "web"
[nodes.server]
files = [{ src = "index.html", dst = "/index.html" }]
[nodes.client]
[[step]]
on = "server"
succeed = "echo running > service"
[[step]]
on = "client"
succeed = "echo configured > conf"
checkpoint = "ready"
[[step]]
on = "server"
succeed = "test -e service && cat index.html && echo later > after"
expect_stdout = "hello"
[[step]]
subtest = "writer"
from = "ready"
on = "server"
succeed = "test -e service && echo mine > shared && sleep 0.2"
[[step]]
subtest = "reader"
from = "ready"
on = "server"
succeed = "sleep 0.1; test ! -e shared && test ! -e after && test -e service"
[[step]]
subtest = "reader"
from = "ready"
on = "client"
succeed = "cat conf"
expect_stdout = "configured"
"#;

/// The events a test looks at, one line each.
#[derive(Default)]
struct Recorder(Mutex<Vec<String>>);

impl Reporter for Recorder {
    fn event(&self, event: &Event<'_>) {
        let line = match event {
            Event::Checkpoint { what: CheckpointEvent::Saved { stored }, .. } => {
                format!("saved stored={stored}")
            }
            Event::Checkpoint { what: CheckpointEvent::Restored { subtest }, .. } => {
                format!("restored {}", subtest.unwrap_or("(file)"))
            }
            Event::Checkpoint { what: CheckpointEvent::Discarded { reason }, .. } => {
                format!("discarded: {reason}")
            }
            Event::StepRestored { step, .. } => format!("step {} restored", step.line),
            Event::StepFinished { step, result: StepResult::Passed { .. }, .. } => {
                format!("step {} passed", step.line)
            }
            Event::StepFinished { step, result: StepResult::Failed { error }, .. } => {
                format!("step {} failed: {}", step.line, error.headline())
            }
            _ => return,
        };
        self.0.lock().unwrap().push(line);
    }
}

impl Recorder {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

struct Bench {
    tmp: tempfile::TempDir,
    hv: Arc<FakeHv>,
    events: Recorder,
}

impl Bench {
    fn new() -> Bench {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("index.html"), "hello").unwrap();
        let hv = Arc::new(FakeHv::new(Some(tmp.path().join("store"))));
        Bench { tmp, hv, events: Recorder::default() }
    }

    fn store(&self) -> PathBuf {
        self.tmp.path().join("store")
    }

    /// The stored checkpoints (their key dirs).
    fn stored(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(self.store())
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    async fn run(&self, text: &str, store_checkpoints: bool, filter: Option<&str>) -> FileOutcome {
        self.run_until(text, store_checkpoints, filter, std::future::pending()).await
    }

    async fn run_until(
        &self,
        text: &str,
        store_checkpoints: bool,
        filter: Option<&str>,
        cancel: impl Future<Output = CancelReason>,
    ) -> FileOutcome {
        self.hv.clear_log();
        let path = self.tmp.path().join("t.toml");
        let file = crate::testfile::parse(&path, text).unwrap();
        let cfg = RunConfig {
            filter: filter.map(str::to_owned),
            keep: false,
            slots: Some(SlotPool::new(self.tmp.path().join("locks"), 4, std::time::Duration::from_secs(20))),
            reporter: &self.events,
            accel: AccelChoice::Auto,
            kernel_reports: KernelReports::Ignore,
            keep_network: None,
            store_checkpoints,
        };
        let state = StateDir::at(self.tmp.path().join("state"));
        let out = run_file(self.hv.clone(), &state, &file, &cfg, cancel).await;
        assert!(state.runs().is_empty(), "every run dir is gone after the file: {:?}", state.runs());
        out
    }
}

fn passed(out: &FileOutcome) {
    assert!(matches!(out.verdict, Verdict::Passed), "{:?}\n{:#?}", out.verdict, out.suite.cases);
}

fn case<'a>(out: &'a FileOutcome, name: &str) -> &'a crate::junit::Case {
    out.suite.cases.iter().find(|c| c.name == name).unwrap()
}

/// The run ids of the VMs in these log lines (`restore vmt-<run>-<node>`).
fn runs_of(lines: &[String]) -> Vec<String> {
    let mut runs: Vec<String> = lines.iter().map(|l| l.split('-').nth(1).unwrap().to_owned()).collect();
    runs.sort();
    runs.dedup();
    runs
}

#[tokio::test]
async fn a_second_run_starts_from_the_stored_checkpoint() {
    let b = Bench::new();
    let first = b.run(FILE, true, None).await;
    passed(&first);
    assert_eq!(b.hv.logged("boot").len(), 2, "cold: both nodes boot");
    assert_eq!(b.hv.logged("save").len(), 2);
    let ev = b.events.take();
    assert_eq!(ev.iter().filter(|e| *e == "saved stored=true").count(), 1, "{ev:#?}");
    assert!(ev.contains(&"step 8 passed".into()) && ev.contains(&"step 11 passed".into()), "{ev:#?}");
    assert_eq!(b.stored().len(), 1);
    assert!(b.stored()[0].join("manifest.json").is_file());

    let second = b.run(FILE, true, None).await;
    passed(&second);
    assert!(b.hv.logged("boot").is_empty(), "nothing boots: {:?}", b.hv.log.lock().unwrap());
    assert!(b.hv.logged("save").is_empty());
    // The file's own nodes, then one copy of both for each of the two subtests.
    assert_eq!(b.hv.logged("restore").len(), 6);
    let ev = b.events.take();
    for want in ["step 8 restored", "step 11 restored", "restored (file)", "step 15 passed"] {
        assert!(ev.contains(&want.to_owned()), "{want}: {ev:#?}");
    }
    assert!(!ev.iter().any(|e| e.starts_with("step 8 passed") || e.starts_with("saved")), "{ev:#?}");
    let setup = case(&second, SETUP_CASE);
    assert_eq!(setup.status, CaseStatus::Passed);
    assert!(setup
        .log
        .contains(":11: succeed `echo configured > conf` on client: restored from checkpoint `ready`"));
    assert_eq!(b.stored().len(), 1, "the same checkpoint was used");
}

#[tokio::test]
async fn the_key_follows_what_comes_before_the_checkpoint() {
    let b = Bench::new();
    passed(&b.run(FILE, true, None).await);
    // A later step changed: the checkpoint still serves.
    passed(&b.run(&FILE.replace("echo later", "echo Later"), true, None).await);
    assert!(b.hv.logged("boot").is_empty());
    // An earlier step changed: a cold run makes a second checkpoint.
    passed(&b.run(&FILE.replace("echo running", "echo Running"), true, None).await);
    assert_eq!(b.hv.logged("boot").len(), 2);
    assert_eq!(b.stored().len(), 2);
    // A file a node gets changed.
    std::fs::write(b.tmp.path().join("index.html"), "hello again").unwrap();
    passed(&b.run(FILE, true, None).await);
    assert_eq!(b.hv.logged("boot").len(), 2);
    // The backend's state identity changed (another image or QEMU).
    *b.hv.identity.lock().unwrap() = "fake-2".into();
    passed(&b.run(FILE, true, None).await);
    assert_eq!(b.hv.logged("boot").len(), 2);
    assert_eq!(b.stored().len(), 4);
}

#[tokio::test]
async fn a_checkpoint_that_does_not_restore_is_discarded_and_made_again() {
    let b = Bench::new();
    passed(&b.run(FILE, true, None).await);
    let stored = b.stored()[0].clone();
    let state = stored.join("server/state");
    std::fs::OpenOptions::new().write(true).open(&state).unwrap().set_len(3).unwrap();
    b.events.take();

    let out = b.run(FILE, true, None).await;
    passed(&out);
    let ev = b.events.take();
    let discarded: Vec<&String> = ev.iter().filter(|e| e.starts_with("discarded")).collect();
    assert_eq!(discarded.len(), 1, "{ev:#?}");
    assert!(discarded[0].contains("holds no whole saved state"), "{discarded:?}");
    assert_eq!(b.hv.logged("boot").len(), 2, "cold after the discard");
    assert!(
        ev.contains(&"saved stored=true".to_owned()) && ev.contains(&"step 8 passed".to_owned()),
        "{ev:#?}"
    );
    assert_eq!(b.stored(), vec![stored.clone()], "made again under the same key");
    assert_eq!(std::fs::read_to_string(&state).unwrap().len(), "fake saved state v1\n".len());

    // A checkpoint dir without its manifest is not used either.
    std::fs::remove_file(stored.join("manifest.json")).unwrap();
    passed(&b.run(FILE, true, None).await);
    assert_eq!(b.hv.logged("boot").len(), 2);
}

#[tokio::test]
async fn from_subtests_run_on_copies_of_their_own() {
    let b = Bench::new();
    let out = b.run(FILE, true, None).await;
    passed(&out);
    // Each subtest restored both nodes into a cluster of its own (a run id each), and the
    // fake refuses a restore whose NICs differ from the saved ones.
    let restores = b.hv.logged("restore");
    assert_eq!(restores.len(), 4, "{restores:?}");
    assert_eq!(runs_of(&restores).len(), 2, "{restores:?}");
    let ev = b.events.take();
    assert!(ev.contains(&"restored writer".into()) && ev.contains(&"restored reader".into()), "{ev:#?}");
    // The reader passed: it saw neither the writer's file nor the main line's.
    for name in ["writer", "reader"] {
        assert_eq!(case(&out, name).status, CaseStatus::Passed, "{name}");
    }

    // Only the filtered subtest gets a copy.
    let out = b.run(FILE, true, Some("read")).await;
    passed(&out);
    assert_eq!(runs_of(&b.hv.logged("restore")).len(), 2, "the file's nodes and the reader's copy");
    assert!(matches!(case(&out, "writer").status, CaseStatus::Skipped { .. }));
}

#[tokio::test]
async fn the_filter_never_skips_the_steps_that_make_the_checkpoint() {
    let b = Bench::new();
    let text = FILE.replace(
        "on = \"client\"\nsucceed = \"echo configured",
        "subtest = \"setup\"\non = \"client\"\nsucceed = \"echo configured",
    );
    let out = b.run(&text, true, Some("reader")).await;
    passed(&out);
    assert_eq!(case(&out, "setup").status, CaseStatus::Passed);
    assert!(case(&out, "setup").log.contains("echo configured > conf` on client: ok"));
    assert!(matches!(case(&out, "writer").status, CaseStatus::Skipped { .. }));
    assert_eq!(b.hv.logged("save").len(), 2);
}

#[tokio::test]
async fn a_failing_copy_fails_its_subtest_only() {
    let b = Bench::new();
    let text = FILE.replace("test ! -e shared", "test -e shared");
    let out = b.run(&text, true, None).await;
    assert!(matches!(out.verdict, Verdict::Failed(_)), "{:?}", out.verdict);
    assert!(matches!(case(&out, "reader").status, CaseStatus::Failed { .. }));
    assert_eq!(case(&out, "writer").status, CaseStatus::Passed);
    assert_eq!(case(&out, SETUP_CASE).status, CaseStatus::Passed);
}

#[tokio::test]
async fn no_snapshot_makes_the_checkpoint_for_this_run_only() {
    let b = Bench::new();
    for _ in 0..2 {
        passed(&b.run(FILE, false, None).await);
        assert_eq!(b.hv.logged("boot").len(), 2, "every run is cold");
        assert_eq!(b.hv.logged("restore").len(), 4, "the subtests still start from it");
        assert!(b.events.take().contains(&"saved stored=false".to_owned()));
    }
    assert!(b.stored().is_empty(), "nothing stored");
}

#[tokio::test]
async fn a_failure_before_the_checkpoint_saves_nothing_and_skips_the_copies() {
    let b = Bench::new();
    let out = b.run(&FILE.replace("echo configured > conf", "false"), true, None).await;
    assert!(matches!(out.verdict, Verdict::Failed(_)), "{:?}", out.verdict);
    assert!(b.hv.logged("save").is_empty() && b.hv.logged("restore").is_empty());
    assert!(b.stored().is_empty());
    for name in ["writer", "reader"] {
        assert!(matches!(case(&out, name).status, CaseStatus::Skipped { .. }), "{name}");
    }
}

#[tokio::test]
async fn a_backend_that_cannot_save_refuses_the_file_before_booting() {
    let b = Bench { hv: Arc::new(FakeHv::new(None)), ..Bench::new() };
    let out = b.run(FILE, true, None).await;
    let Verdict::Error(e) = &out.verdict else { panic!("{:?}", out.verdict) };
    assert!(e.message().ends_with(
        "t.toml:12: checkpoint `ready`: the fake backend cannot save guests; use the qemu backend, or remove \
         `checkpoint` and `from`"
    ), "{e}");
    assert!(b.hv.log.lock().unwrap().is_empty(), "nothing booted");
}

/// A signal once every one of `files` exists.
async fn signal_when(files: Vec<PathBuf>) -> CancelReason {
    while !files.iter().all(|f| f.exists()) {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    "SIGINT"
}

#[tokio::test]
async fn a_signal_stops_the_subtests_running_on_copies() {
    let b = Bench::new();
    // Each subtest says on the host that it runs, then waits.
    let mark = |name: &str| b.tmp.path().join(format!("{name}-runs"));
    let text = FILE
        .replace("sleep 0.2", &format!("touch {} && sleep 30", mark("writer").display()))
        .replace("sleep 0.1;", &format!("touch {} && sleep 30;", mark("reader").display()));
    let t = std::time::Instant::now();
    let out = b.run_until(&text, true, None, signal_when(vec![mark("writer"), mark("reader")])).await;
    assert!(t.elapsed() < std::time::Duration::from_secs(20), "stopped at once: {:?}", t.elapsed());
    let Verdict::Error(e) = &out.verdict else { panic!("{:?}", out.verdict) };
    assert_eq!(e.kind(), ErrorKind::Interrupted, "{e}");
    for name in ["writer", "reader"] {
        assert!(
            matches!(case(&out, name).status, CaseStatus::Failed { .. }),
            "{name}: {:?}",
            out.suite.cases
        );
    }
}

#[tokio::test]
async fn the_files_timeout_stops_a_step() {
    let b = Bench::new();
    let text = "[test]\ntimeout = \"1s\"\n[nodes.a]\n[[step]]\non = \"a\"\nsucceed = \"sleep 30\"\n";
    let out = b.run(text, true, None).await;
    let Verdict::Error(e) = &out.verdict else { panic!("{:?}", out.verdict) };
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(e.message().contains("test `t` timed out after 1.00s"), "{e}");
    assert!(matches!(case(&out, SETUP_CASE).status, CaseStatus::Failed { .. }));
}

#[test]
fn the_store_is_where_the_backend_says() {
    let hv = FakeHv::new(Some(PathBuf::from("/x")));
    assert_eq!(hv.checkpoint_store().as_deref(), Some(Path::new("/x")));
}
