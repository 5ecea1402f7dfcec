//! Checkpoints in test files, through the real binary and real guests of the CI image
//! (examples/images/web.toml): a second run of an unchanged file starts from its checkpoint
//! (the state of the first run, not a replay), a change before the checkpoint makes a new
//! one while a change after it does not, `from` subtests each get their own copy, and a
//! damaged checkpoint is discarded and made again. The JSON events say what happened.
//!
//! Each test has a cache of its own (the shared cache's images linked in). Building the image
//! needs root (debootstrap); without root the VM tests say so and pass vacuously, as
//! images.rs does.

mod common;

use common::{private_image_cache, stderr, stdout, Vmtest};
use serde_json::Value;
use std::path::Path;
use std::process::Output;

/// `vmtest test FILE --message-format json` in `cache`: the output and its events.
fn test(vt: &Vmtest, cache: &Path, file: &Path) -> (Output, Vec<Value>) {
    let out = vt
        .cmd()
        .env("VMTEST_CACHE_DIR", cache)
        .arg("test")
        .arg(file)
        .args(["--message-format", "json"])
        .output()
        .unwrap();
    // JSON events are on stderr (stdout is the commands'); see docs/events.md.
    let events = stderr(&out).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    (out, events)
}

fn of<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == kind).collect()
}

/// The `checkpoint` events' actions, in order, with the subtest of each copy.
fn actions(events: &[Value]) -> Vec<String> {
    of(events, "checkpoint")
        .iter()
        .map(|e| match e["subtest"].as_str() {
            Some(s) => format!("{} {s}", e["action"].as_str().unwrap()),
            None => e["action"].as_str().unwrap().to_owned(),
        })
        .collect()
}

fn passed(out: &Output) {
    assert_eq!(out.status.code(), Some(0), "stdout: {}\nstderr: {}", stdout(out), stderr(out));
}

/// The output of the step that ran `cmd` (a `step_finished` event).
fn step_output(events: &[Value], cmd: &str) -> String {
    let step = of(events, "step_finished")
        .into_iter()
        .find(|e| e["step"].as_str().is_some_and(|s| s.contains(cmd)))
        .unwrap_or_else(|| panic!("no step ran `{cmd}`: {events:?}"));
    step["output"].as_str().unwrap_or_default().to_owned()
}

/// A two-node file on the web image: setup writes a value that differs on every run into
/// the server's disk and memory (`setup`), the checkpoint follows, then `after`.
fn two_nodes(setup: &str, after: &str) -> String {
    format!(
        r#"[test]
name = "ckpt"
timeout = "10m"
step_timeout = "120s"

[defaults]
image = "web"
memory = "512M"
boot_timeout = "300s"

[nodes.server]
[nodes.client]

[[step]]
on = "server"
succeed = "{setup}"

[[step]]
on = "client"
wait_until_succeeds = "curl -fsS --max-time 5 http://server/"
checkpoint = "ready"
{after}"#
    )
}

const SETUP: &str = "cat /proc/sys/kernel/random/uuid > /root/made-at-setup; sync";

#[test]
fn a_second_run_starts_from_the_checkpoint_until_a_step_before_it_changes() {
    let vt = Vmtest::new();
    let Some(cache) = private_image_cache(&vt) else { return };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ckpt.toml");
    let show = "\n[[step]]\non = \"server\"\nsucceed = \"cat /root/made-at-setup\"\n";
    std::fs::write(&file, two_nodes(SETUP, show)).unwrap();

    let (first, events) = test(&vt, cache.path(), &file);
    passed(&first);
    assert_eq!(actions(&events), ["saved"]);
    assert!(of(&events, "step_restored").is_empty());
    let made = step_output(&events, "cat /root/made-at-setup");

    let (second, events) = test(&vt, cache.path(), &file);
    passed(&second);
    assert_eq!(actions(&events), ["restored"]);
    assert_eq!(of(&events, "step_restored").len(), 2, "both setup steps came with the checkpoint");
    assert_eq!(step_output(&events, "cat /root/made-at-setup"), made, "the first run's state, not a replay");

    // A change after the checkpoint keeps it.
    let show_twice = format!("{show}\n[[step]]\non = \"client\"\nsucceed = \"hostname\"\n");
    std::fs::write(&file, two_nodes(SETUP, &show_twice)).unwrap();
    let (third, events) = test(&vt, cache.path(), &file);
    passed(&third);
    assert_eq!(actions(&events), ["restored"]);
    assert_eq!(step_output(&events, "hostname").trim(), "client", "a restored node keeps its name");

    // A change before it makes a new one: the setup runs again.
    std::fs::write(&file, two_nodes(&format!("{SETUP}; true"), show)).unwrap();
    let (fourth, events) = test(&vt, cache.path(), &file);
    passed(&fourth);
    assert_eq!(actions(&events), ["saved"]);
    assert_ne!(step_output(&events, "cat /root/made-at-setup"), made, "a stale checkpoint was used");
    vt.assert_clean();
}

#[test]
fn subtests_from_one_checkpoint_do_not_see_each_others_writes() {
    let vt = Vmtest::new();
    let Some(cache) = private_image_cache(&vt) else { return };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("from.toml");
    let mut after = String::from("\n[[step]]\non = \"server\"\nsucceed = \"touch /root/main-line\"\n");
    for (me, other) in [("a", "b"), ("b", "a")] {
        after.push_str(&format!(
            r#"
[[step]]
subtest = "copy {me}"
from = "ready"
on = "server"
succeed = "touch /root/copy-{me}; sync; test ! -e /root/copy-{other} && test ! -e /root/main-line && test -s /root/made-at-setup"

[[step]]
subtest = "copy {me}"
from = "ready"
on = "client"
succeed = "curl -fsS --max-time 5 http://server/"
expect_stdout = "hello from the vmtest web image"
"#
        ));
    }
    std::fs::write(&file, two_nodes(SETUP, &after)).unwrap();
    for run in ["saved", "restored"] {
        let (out, events) = test(&vt, cache.path(), &file);
        passed(&out);
        let mut got = actions(&events);
        got.sort();
        let mut want = vec![run.to_owned(), "restored copy a".to_owned(), "restored copy b".to_owned()];
        want.sort();
        assert_eq!(got, want, "{run} run");
    }
    vt.assert_clean();
}

#[test]
fn a_damaged_checkpoint_is_discarded_and_made_again() {
    let vt = Vmtest::new();
    let Some(cache) = private_image_cache(&vt) else { return };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("damaged.toml");
    std::fs::write(&file, two_nodes(SETUP, "")).unwrap();
    let (first, events) = test(&vt, cache.path(), &file);
    passed(&first);
    let saved = of(&events, "checkpoint")[0]["dir"].as_str().unwrap().to_owned();
    let state = Path::new(&saved).join("server/state");
    let len = std::fs::metadata(&state).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&state).unwrap().set_len(len - 4096).unwrap();

    let (second, events) = test(&vt, cache.path(), &file);
    passed(&second);
    assert_eq!(actions(&events), ["discarded", "saved"], "{}", stderr(&second));
    let why = of(&events, "checkpoint")[0]["reason"].as_str().unwrap().to_owned();
    assert!(why.contains("unusable: state changed since it was saved"), "{why}");
    let (third, events) = test(&vt, cache.path(), &file);
    passed(&third);
    assert_eq!(actions(&events), ["restored"], "the new checkpoint is whole");
    vt.assert_clean();
}

#[test]
fn a_checkpoint_with_a_kernel_mode_node_is_refused_before_anything_boots() {
    let vt = Vmtest::new();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mixed.toml");
    // The server boots the image; the client, with no image, boots the host's root.
    let text = two_nodes("true", "")
        .replace("[defaults]\nimage = \"web\"\n", "[defaults]\n")
        .replace("[nodes.server]\n", "[nodes.server]\nimage = \"web\"\n");
    let line = 1 + text.lines().position(|l| l.starts_with("checkpoint =")).unwrap();
    std::fs::write(&file, text).unwrap();
    let out = vt.cmd().arg("test").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    let err = stderr(&out);
    let at = format!("{}:{line}:", file.display());
    assert!(err.contains(&at) && err.contains("client") && err.contains("9p"), "{err}");
    assert!(common::qemu_pids_using(vt.state.path()).is_empty());
    vt.assert_clean();
}
