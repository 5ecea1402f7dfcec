//! `vmtest test` against real QEMU guests: the examples in examples/vm-tests (real HTTP
//! between two VMs over the in-process switch), bad files, failing steps, --keep, SIGINT.

mod common;

use common::{kill, stderr, stdout, Vmtest};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/vm-tests")
}

#[test]
fn the_examples_pass_and_write_one_junit_case_per_subtest() {
    let vt = Vmtest::new();
    let junit = vt.state.path().join("../junit-examples.xml");
    let out = vt
        .cmd()
        .arg("test")
        .arg(examples().join("client-server.toml"))
        .arg(examples().join("partition.toml"))
        .arg("--junit")
        .arg(&junit)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("client-server: PASSED"), "{}", stderr(&out));
    assert!(stderr(&out).contains("partition: PASSED"), "{}", stderr(&out));
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(xml.contains("tests=\"9\" failures=\"0\" errors=\"0\" skipped=\"0\""), "{xml}");
    assert!(xml.contains("<testcase name=\"client fetches the page by name\""), "{xml}");
    assert!(xml.contains("hello from the vmtest server"), "{xml}");
    assert!(xml.contains("<testcase name=\"partitioned\""), "{xml}");
    let _ = std::fs::remove_file(&junit);
    vt.assert_clean();
}

#[test]
fn bad_files_get_every_problem_with_its_line_and_nothing_boots() {
    let vt = Vmtest::new();
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        r#"[test]
timeout = "soon"

[nodes.web]
image = "images/debian.qcow2"

[nodes.db]
files = [{ src = "nope.sql", dst = "/srv/nope.sql" }]

[[step]]
on = "wbe"
succeed = "true"

[[step]]
on = "db"
wait_until_succeds = "true"

[[step]]
partition = [["web"], ["ghost"]]
"#,
    )
    .unwrap();
    let good = examples().join("client-server.toml");
    let out = vt.cmd().arg("test").arg(&good).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    let err = stderr(&out);
    let b = bad.display().to_string();
    for want in [
        format!("{b}:2: `timeout`: bad duration `soon`"),
        format!("{b}:5: node `web`: `image` must name a built image"),
        format!("{b}:8: file `nope.sql` does not exist"),
        format!("{b}:11: unknown node `wbe`"),
        format!(
            "{b}:16: unknown action or key `wait_until_succeds` in step; did you mean `wait_until_succeeds`?"
        ),
        format!("{b}:19: unknown node `ghost`"),
    ] {
        assert!(err.contains(&want), "missing {want:?} in:\n{err}");
    }
    assert!(err.contains("1 of 2 test file(s) invalid; nothing was booted"), "{err}");
    vt.assert_clean();

    // --check validates without booting; --partition picks a share of the files.
    let out = vt
        .cmd()
        .args(["test", "--check", "--partition", "2/2"])
        .arg(examples().join("client-server.toml"))
        .arg(examples().join("partition.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("partition.toml: ok (2 node(s), 14 step(s), 5 subtest(s))"),
        "{}",
        stdout(&out)
    );
    assert!(!stdout(&out).contains("client-server"), "{}", stdout(&out));
    let out = vt.cmd().args(["test", "--partition", "3/2"]).arg(&good).output().unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
}

const FAILING: &str = r#"[test]
name = "failing"

[nodes.alpha]
[nodes.beta]

[[step]]
subtest = "excluded"
on = "alpha"
succeed = "false"

[[step]]
subtest = "target-ping"
on = "beta"
succeed = "getent hosts alpha"

[[step]]
subtest = "target-fails"
on = "beta"
succeed = "echo visible-out; echo visible-err >&2; exit 3"

[[step]]
subtest = "target-after"
on = "*"
succeed = "true"
"#;

#[test]
fn a_failing_step_stops_the_test_naming_step_node_status_and_output() {
    let vt = Vmtest::new();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("failing.toml");
    std::fs::write(&file, FAILING).unwrap();
    let junit = dir.path().join("junit.xml");
    let out =
        vt.cmd().arg("test").arg(&file).args(["--filter", "target", "--junit"]).arg(&junit).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    let want = format!("FAILED {}:20: succeed `echo visible-out; echo visible-err >&2; exit 3` on beta: machine `beta`: `echo visible-out; echo visible-err >&2; exit 3` failed (exit status 3)", file.display());
    assert!(err.contains(&want), "missing {want:?} in:\n{err}");
    assert!(err.contains("stdout:\n") && err.contains("visible-out") && err.contains("visible-err"), "{err}");
    assert!(err.contains("failing: FAILED"), "{err}");
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(xml.contains("tests=\"4\" failures=\"1\" errors=\"0\" skipped=\"2\""), "{xml}");
    assert!(xml.contains("<skipped message=\"filtered out by --filter target\"/>"), "{xml}");
    assert!(xml.contains("<skipped message=\"an earlier step failed\"/>"), "{xml}");
    vt.assert_clean();
}

#[test]
fn keep_leaves_the_machines_up_with_the_commands_to_reach_them() {
    let vt = Vmtest::new();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("failing.toml");
    std::fs::write(&file, FAILING).unwrap();
    let out = vt.cmd().arg("test").arg(&file).arg("--keep").output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    let names: Vec<String> = err
        .lines()
        .filter_map(|l| l.trim().strip_prefix("vmtest destroy "))
        .map(|l| l.split_whitespace().next().unwrap().to_owned())
        .collect();
    assert_eq!(names.len(), 2, "{err}");
    let beta = names.iter().find(|n| n.ends_with("-beta")).unwrap();
    let o = vt.cmd().args(["exec", beta, "--cwd", "/", "--", "hostname"]).output().unwrap();
    // The private network outlived `vmtest test`: beta still fetches a page from alpha.
    let alpha = names.iter().find(|n| n.ends_with("-alpha")).unwrap();
    let serve = "cd / && setsid /usr/bin/python3 -m http.server 8080 </dev/null >/dev/null 2>&1 &";
    let served = vt.cmd().args(["exec", alpha, "--", "sh", "-c", serve]).output().unwrap();
    let fetch = "for i in $(seq 30); do curl -fsS --max-time 5 -o /dev/null http://alpha:8080/ && echo reached && exit; \
                 sleep 1; done; exit 1";
    let ping = vt.cmd().args(["exec", beta, "--", "sh", "-c", fetch]).output().unwrap();
    let state = vt.state.path().to_string_lossy().into_owned();
    let keepers = common::pids_with(&["network-keeper", &state]);
    // Destroy before asserting, so a failed assertion leaves no VM behind.
    for n in &names {
        let d = vt.cmd().args(["destroy", n]).output().unwrap();
        assert_eq!(d.status.code(), Some(0), "{}", stderr(&d));
    }
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "beta\n");
    assert_eq!(served.status.code(), Some(0), "{}", stderr(&served));
    assert_eq!(keepers.len(), 1, "one network keeper for the kept run");
    assert_eq!(stdout(&ping), "reached\n", "{}", stderr(&ping));
    // The keeper ends by itself once the last machine is destroyed.
    common::wait_until(10, "the network keeper to end with its machines", || {
        common::pids_with(&["network-keeper", &state]).is_empty()
    });
    vt.assert_clean();
}

#[test]
fn sigint_during_a_test_tears_everything_down() {
    let vt = Vmtest::new();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("slow.toml");
    std::fs::write(
        &file,
        "[nodes.a]\n[nodes.b]\n[[step]]\non = \"*\"\nsucceed = \"sleep 600\"\ntimeout = \"15m\"\n",
    )
    .unwrap();
    let mut child = vt.cmd().arg("test").arg(&file).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("all nodes up") {
            break;
        }
    }
    assert!(seen.contains("all nodes up"), "{seen}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    unsafe { kill(child.id() as i32, 2) };
    let rest: Vec<String> = lines.map_while(|l| l.ok()).collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{seen}{}", rest.join("\n"));
    vt.assert_clean();
}

/// The JSON lines of `text` (every line must be one), as values.
fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| {
            assert!(l.starts_with("{\"type\":\""), "not an event line: {l}");
            serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))
        })
        .collect()
}

#[test]
fn test_events_in_json_name_files_steps_and_cases_and_match_the_events_file() {
    let vt = Vmtest::new();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("failing.toml");
    std::fs::write(&file, FAILING).unwrap();
    let events_file = dir.path().join("events.jsonl");
    let out = vt
        .cmd()
        .arg("test")
        .arg(&file)
        .args(["--filter", "target", "--message-format", "json", "--events-file"])
        .arg(&events_file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let events = json_lines(&stderr(&out));
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "test_started",
            "file_started",
            "nodes_up",
            "step_finished",
            "step_finished",
            "file_finished",
            "test_finished"
        ],
        "{}",
        stderr(&out)
    );
    assert_eq!(events[0]["schema_version"], 1);
    assert_eq!(events[1]["file"], "failing");
    assert_eq!(events[1]["nodes"], serde_json::json!(["alpha", "beta"]));
    let (passed, failed) = (&events[3], &events[4]);
    assert_eq!((passed["result"].as_str(), passed["case"].as_str()), (Some("passed"), Some("target-ping")));
    assert!(passed["output"].as_str().unwrap().contains("alpha"), "{passed}");
    assert_eq!((failed["result"].as_str(), failed["line"].as_u64()), (Some("failed"), Some(20)));
    assert!(failed["error"]["detail"].as_str().unwrap().contains("visible-err"), "{failed}");
    let finished = &events[5];
    assert_eq!(finished["verdict"], "failed");
    let statuses: Vec<&str> =
        finished["cases"].as_array().unwrap().iter().map(|c| c["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["skipped", "passed", "failed", "skipped"]);
    assert_eq!(events[6]["exit_code"], 1);
    // The file holds the same events, in the same order.
    let from_file = json_lines(&std::fs::read_to_string(&events_file).unwrap());
    let file_types: Vec<&str> = from_file.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(file_types, types);
    vt.assert_clean();
}

#[test]
fn an_invalid_file_in_json_mode_ends_the_stream_with_the_usage_error() {
    let vt = Vmtest::new();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[test]\nname = \"bad\"\ntimeout = \"soon\"\n").unwrap();
    let out = vt.cmd().arg("test").arg(&file).args(["--message-format", "json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    let events = json_lines(&stderr(&out));
    let last = events.last().unwrap();
    assert_eq!(last["type"], "test_finished");
    assert_eq!(last["exit_code"], 64);
    assert_eq!(last["error"]["kind"], "usage");
    assert!(
        last["error"]["detail"].as_str().unwrap().contains(":3: `timeout`: bad duration `soon`"),
        "{last}"
    );
}
