//! The CLI's user experience, through the real binary: vmtest.toml discovery and precedence,
//! `vmtest config`, progress lines, the JSON event stream (from real VM runs), completions
//! and the man page.

mod common;

use common::{error_line, stderr, stdout, Vmtest};
use serde_json::Value;
use std::path::Path;

/// A project dir with a vmtest.toml
/// and a subdirectory to run from, as cargo runs a test binary from a package dir.
fn project(toml: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    std::fs::write(dir.path().join("vmtest.toml"), toml).unwrap();
    let sub = dir.path().join("crates/pkg");
    std::fs::create_dir_all(&sub).unwrap();
    (dir, sub)
}

fn config_json(vt: &Vmtest, cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Value {
    let mut c = vt.cmd();
    c.current_dir(cwd).arg("config").arg("--json").args(args);
    for v in ["VMTEST_CONFIG", "VMTEST_TARGET", "VMTEST_MAX_VMS", "VMTEST_KERNEL"] {
        c.env_remove(v);
    }
    c.envs(env.iter().copied());
    let out = c.output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn setting<'a>(v: &'a Value, key: &str) -> (&'a Value, &'a str) {
    let s = &v["settings"][key];
    (&s["value"], s["source"].as_str().unwrap())
}

const TOML: &str = r#"
# Defaults for every run in this project.
cpus = 2
memory = "640M"
timeout = "5m"
backend = "qemu"
default-target = "small"

[env]
set = { FROM_FILE = "top" }
unset = ["DROP_ME"]

[target.small]
memory = "320M"

[target.big]
cpus = 3
env = { set = { FROM_FILE = "big" } }
"#;

#[test]
fn config_is_found_walking_up_and_layers_with_provenance() {
    let vt = Vmtest::new();
    let (dir, sub) = project(TOML);
    let file = dir.path().join("vmtest.toml");
    let file = file.to_str().unwrap();

    // default-target applies; the file's top level fills the rest; defaults name themselves.
    let v = config_json(&vt, &sub, &[], &[]);
    assert_eq!(v["config_file"], file);
    assert_eq!(v["target"]["value"], "small");
    assert_eq!(setting(&v, "cpus"), (&Value::from(2), file));
    assert_eq!(setting(&v, "memory"), (&Value::from("320M"), format!("{file} [target.small]").as_str()));
    assert_eq!(setting(&v, "accel"), (&Value::from("auto"), "default"));
    assert_eq!(setting(&v, "timeout"), (&Value::from("5m"), file));

    // --target beats $VMTEST_TARGET beats default-target; env vars beat the file; flags win.
    let v = config_json(&vt, &sub, &["--target", "big"], &[("VMTEST_TARGET", "small")]);
    assert_eq!(v["target"]["source"], "--target");
    assert_eq!(setting(&v, "cpus"), (&Value::from(3), format!("{file} [target.big]").as_str()));
    assert_eq!(setting(&v, "memory"), (&Value::from("640M"), file));
    let v = config_json(
        &vt,
        &sub,
        &["--cpus", "4"],
        &[("VMTEST_BACKEND", "multipass"), ("VMTEST_TARGET", "big")],
    );
    assert_eq!(v["target"]["source"], "env VMTEST_TARGET");
    assert_eq!(setting(&v, "cpus"), (&Value::from(4), "--cpus"));
    assert_eq!(setting(&v, "backend"), (&Value::from("multipass"), "env VMTEST_BACKEND"));

    // Env rules: the file's, then the target's, then the flags', each with its source.
    let v = config_json(&vt, &sub, &["-t", "big", "-e", "FROM_FLAG=1"], &[]);
    let rules: Vec<(String, String)> = v["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (format!("{} {} {}", r["rule"], r["name"], r["value"]), r["source"].as_str().unwrap().to_owned())
        })
        .collect();
    let expected = vec![
        (r#""unset" "DROP_ME" null"#.to_owned(), file.to_owned()),
        (r#""set" "FROM_FILE" "top""#.to_owned(), file.to_owned()),
        (r#""set" "FROM_FILE" "big""#.to_owned(), format!("{file} [target.big]")),
        (r#""set" "FROM_FLAG" "1""#.to_owned(), "--env".to_owned()),
    ];
    assert_eq!(rules, expected);

    // --config none / $VMTEST_CONFIG=none: built-in defaults only.
    let v = config_json(&vt, &sub, &[], &[("VMTEST_CONFIG", "none")]);
    assert_eq!(v["config_file"], Value::Null);
    assert_eq!(setting(&v, "cpus"), (&Value::from(1), "default"));
}

#[test]
fn config_text_output_is_annotated_toml() {
    let vt = Vmtest::new();
    let (dir, sub) = project(TOML);
    let out = vt
        .cmd()
        .current_dir(&sub)
        .env_remove("VMTEST_TARGET")
        .args(["config", "--memory", "1G"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let file = dir.path().join("vmtest.toml");
    assert!(
        text.starts_with(&format!(
            "# config file: {}\n# target: small (from {})\n",
            file.display(),
            file.display()
        )),
        "{text}"
    );
    let line = |key: &str| {
        text.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("{key}: {text}")).to_owned()
    };
    assert!(line("memory = \"1G\"").ends_with("# --memory"), "{text}");
    assert!(line("cpus = 2").ends_with(&format!("# {}", file.display())), "{text}");
    assert!(line("# kernel is not set").ends_with("# default"), "{text}");
    assert!(line("set.FROM_FILE = \"top\"").contains("vmtest.toml"), "{text}");
    // Valid TOML once the provenance comments are gone.
    let parsed: toml::Table = toml::from_str(&text).unwrap();
    assert_eq!(parsed["cpus"].as_integer(), Some(2));
}

#[test]
fn config_mistakes_are_one_line_usage_errors() {
    let vt = Vmtest::new();
    let cases: &[(&str, &[&str], &str)] = &[
        ("cpus = 2\ncpu = 3\n", &["config"], "vmtest.toml:2:1: unknown field `cpu`, expected one of"),
        ("memory = \"lots\"\n", &["config"], "bad memory size `lots`"),
        ("[target.a]\n", &["config", "--target", "b"], "no target `b` (from --target) in"),
        (
            "cpus = 2\n",
            &["config", "--config", "missing.toml"],
            "missing.toml (from --config) does not exist",
        ),
        ("memory = \"lots\"\n", &["run", "--", "true"], "(set by "),
    ];
    for (toml, args, want) in cases {
        let (_dir, sub) = project(toml);
        let out = vt.cmd().current_dir(&sub).env_remove("VMTEST_TARGET").args(*args).output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{toml}: {}", stderr(&out));
        let line = error_line(&out);
        assert!(line.contains(want), "{toml}: want {want:?} in {line:?}");
        assert_eq!(stderr(&out).lines().count(), 1, "not one line: {}", stderr(&out));
    }
    // With no vmtest.toml anywhere above, --target says what to do.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let out = vt.cmd().current_dir(dir.path()).args(["config", "--target", "x"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(
        error_line(&out).contains("create one with a [target.x] table, or pass --config PATH"),
        "{}",
        stderr(&out)
    );
}

/// One real VM run as a cargo runner would do it (no TTY, CI=true): the config file decides
/// cpus, memory and env; stdout is exactly the command's; stderr has timestamped phase lines;
/// the events file has the JSON stream.
#[test]
fn real_run_uses_the_config_and_reports_in_ci_lines_and_json_events() {
    let vt = Vmtest::new();
    let (dir, sub) = project(TOML);
    let events = dir.path().join("events.jsonl");
    let out = vt
        .cmd()
        .current_dir(&sub)
        .env("CI", "true")
        .env("DROP_ME", "x")
        .env_remove("VMTEST_TARGET")
        .args(["run", "--target", "big", "--events-file", events.to_str().unwrap(), "--"])
        .args(["sh", "-c", "echo $(nproc) $FROM_FILE ${DROP_ME:-dropped} $(pwd); echo to-err >&2; exit 3"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("3 big dropped {}\n", sub.canonicalize().unwrap().display()));
    let err = stderr(&out);
    assert!(err.contains("to-err\n"), "{err}");
    // Timestamped phase lines, in order, each a whole line.
    // (A first run on this host also says, once, which accelerator it uses: not a phase.)
    let phases: Vec<&str> =
        err.lines().filter(|l| l.contains(" vmtest: ") && !l.contains(" vmtest: warning: ")).collect();
    let want = [
        "vmtest: booting vmt-",
        "ready after",
        "vmtest: running: sh -c",
        "command exit status 3 after",
        "done (launch",
    ];
    assert_eq!(phases.len(), want.len(), "{err}");
    for (line, w) in phases.iter().zip(want) {
        let (ts, rest) = line.split_once(' ').unwrap();
        assert!(
            ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
            "timestamp {ts:?} in {line:?}"
        );
        assert!(rest.contains(w), "{w:?} not in {line:?}");
    }

    let text = std::fs::read_to_string(&events).unwrap();
    let evs: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(text.lines().all(|l| l.starts_with("{\"type\":\"")), "type first: {text}");
    let kinds: Vec<&str> = evs.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "run_started",
            "booting",
            "ready",
            "exec_started",
            "exec_finished",
            "tearing_down",
            "finished",
            "run_finished"
        ]
    );
    for e in &evs {
        assert!(e["time"].as_str().unwrap().ends_with('Z'));
        assert!(e["elapsed"].as_f64().unwrap() >= 0.0);
        assert_eq!(e["pid"], evs[0]["pid"]);
    }
    assert_eq!(evs[0]["schema_version"], 1);
    assert_eq!(evs[0]["target"], "big");
    assert_eq!(evs[1]["backend"], "qemu");
    assert_eq!(evs[1]["attempt"], 1);
    let vm = evs[1]["vm"].as_str().unwrap();
    assert!(vm.starts_with("vmt-") && evs[6]["vm"] == vm);
    assert!(evs[2]["boot_secs"].as_f64().unwrap() > 0.0);
    assert_eq!(evs[3]["argv"][0], "sh");
    assert_eq!(evs[4]["status"], serde_json::json!({"code": 3, "signal": null}));
    assert_eq!(evs[4]["exit_code"], 3);
    assert_eq!(evs[5]["action"], "shutdown");
    for phase in ["launch", "command", "teardown"] {
        assert!(evs[6]["timings"][phase].as_f64().is_some(), "{phase}: {}", evs[6]);
    }
    assert_eq!(evs[7]["exit_code"], 3);
    assert_eq!(evs[7]["error"], Value::Null);
    vt.assert_clean();
}

/// `--message-format json`: events on stderr, whole lines even when the command's stderr
/// ends without a newline; a timeout is an `exec_finished` with an error, then exit 124.
#[test]
fn json_on_stderr_stays_line_aligned_and_reports_errors() {
    let vt = Vmtest::new();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let out = vt
        .cmd()
        .current_dir(dir.path())
        .args(["run", "--message-format", "json", "--timeout", "3s", "--", "sh", "-c"])
        .arg("printf out; printf partial >&2; sleep 30")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(124), "{}", stderr(&out));
    assert_eq!(stdout(&out), "out");
    let err = stderr(&out);
    assert!(err.contains("partial\n{\"type\":\"exec_finished\""), "{err}");
    let evs: Vec<Value> = err.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).collect();
    let fin = evs.iter().find(|e| e["type"] == "exec_finished").unwrap();
    assert_eq!(fin["status"], Value::Null);
    assert_eq!(fin["error"]["kind"], "timeout");
    assert_eq!(fin["error"]["exit_code"], 124);
    let last = evs.last().unwrap();
    assert_eq!(last["type"], "run_finished");
    assert_eq!(last["exit_code"], 124);
    assert!(last["error"]["message"].as_str().unwrap().contains("3"), "{last}");
    // No human progress in JSON mode: every vmtest line is either an event or the error.
    assert!(!err.contains(" vmtest: booting"), "{err}");
    vt.assert_clean();
}

/// On a terminal: a status line that is erased before the command's output, and the
/// command's lines arrive whole.
#[test]
fn tty_status_line_never_splits_the_commands_output() {
    let vt = Vmtest::new();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let log = dir.path().join("typescript");
    let bin = env!("CARGO_BIN_EXE_vmtest");
    let inner = format!("{bin} run -- sh -c 'echo first-line; sleep 1; echo second-line'");
    let out = std::process::Command::new("script")
        .current_dir(dir.path())
        .env("VMTEST_STATE_DIR", vt.state.path())
        .env_remove("CI")
        .env_remove("VMTEST_BACKEND")
        .args(["-qec", &inner, log.to_str().unwrap()])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let screen = String::from_utf8_lossy(&std::fs::read(&log).unwrap()).into_owned();
    assert!(out.status.success(), "{screen}");
    assert!(screen.contains("Booting vmt-"), "no status line: {screen:?}");
    assert!(screen.contains("\r\x1b[2K"), "status line never erased: {screen:?}");
    // The command's lines are intact: each preceded by an erase (or a line start), never by
    // status text.
    for want in ["first-line\r\n", "second-line\r\n"] {
        let at = screen.find(want).unwrap_or_else(|| panic!("{want:?} not in {screen:?}"));
        let before = &screen[..at];
        assert!(before.ends_with("\r\x1b[2K") || before.ends_with('\n'), "{want:?} follows {before:?}");
    }
    // No timestamped CI lines on a terminal.
    assert!(!screen.contains("Z vmtest: booting"), "{screen:?}");
    vt.assert_clean();
}

#[test]
fn completions_and_man_page_come_from_the_cli_definition() {
    let vt = Vmtest::new();
    for shell in ["bash", "zsh", "fish"] {
        let out = vt.cmd().args(["completions", shell]).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{shell}: {}", stderr(&out));
        let text = stdout(&out);
        for word in ["run", "config", "doctor", "cleanup", "message-format", "target"] {
            assert!(text.contains(word), "{shell} completions lack {word}");
        }
    }
    let out = vt.cmd().args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64), "a usage error exits 64: {}", stderr(&out));

    let out = vt.cmd().arg("man").output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let roff = stdout(&out);
    assert!(roff.contains(".TH vmtest 1"), "{roff}");
    assert!(roff.contains("vmtest\\-run(1)") || roff.contains("vmtest-run"), "{roff}");

    let dir = tempfile::tempdir().unwrap();
    let out = vt.cmd().args(["man", "--out-dir"]).arg(dir.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    for page in ["vmtest.1", "vmtest-run.1", "vmtest-config.1"] {
        assert!(dir.path().join(page).is_file(), "{page} missing");
    }
    // It renders: man(1) formats it without errors, with the options in it.
    let rendered = std::process::Command::new("man")
        .env("MANWIDTH", "100")
        .env("LC_ALL", "C")
        .arg("-l")
        .arg(dir.path().join("vmtest-run.1"))
        .output();
    if let Ok(r) = rendered {
        if r.status.success() {
            // Drop overstrike formatting (`X\bX` bold, `_\bX` underline).
            let mut text = String::new();
            for c in String::from_utf8_lossy(&r.stdout).chars() {
                if c == '\u{8}' {
                    text.pop();
                } else {
                    text.push(c);
                }
            }
            assert!(text.contains("boot-timeout") && text.contains("message-format"), "{text}");
        }
    }
}

#[test]
fn clap_usage_errors_exit_64_and_help_and_version_exit_0() {
    let vt = Vmtest::new();
    for args in
        [&["run"][..], &["run", "--no-such-flag", "--", "true"], &[], &["frobnicate"], &["list", "extra"]]
    {
        let out = vt.cmd().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("Usage:"), "{args:?} says how to use it: {}", stderr(&out));
    }
    for args in [&["--help"][..], &["run", "--help"], &["--version"], &["help", "run"]] {
        let out = vt.cmd().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert!(!stdout(&out).is_empty(), "{args:?} prints on stdout");
    }
}

/// cargo nextest lists every test binary (`BIN --list --format terse`) through the runner
/// before it runs anything: the host answers that, without a VM, unless told otherwise.
#[test]
fn a_test_listing_is_answered_on_the_host_without_a_vm() {
    let vt = Vmtest::new();
    let me = std::env::current_exe().unwrap();
    let me = me.to_str().unwrap();
    let t0 = std::time::Instant::now();
    let out = vt.run(&[], &[me, "--list", "--format", "terse"]);
    let took = t0.elapsed();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("a_test_listing_is_answered_on_the_host_without_a_vm: test"),
        "{}",
        stdout(&out)
    );
    assert!(!stderr(&out).contains("booting"), "no VM for a listing: {}", stderr(&out));
    assert!(took < std::time::Duration::from_secs(5), "took {took:?}");

    // In a VM when asked: the same list, from the guest.
    let out = vt
        .cmd()
        .env("VMTEST_LIST_IN_VM", "1")
        .args(["run", "--", me, "--list", "--format", "terse"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("booting"), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("a_test_listing_is_answered_on_the_host_without_a_vm: test"),
        "{}",
        stdout(&out)
    );
    // Running a test (no --list) still boots.
    vt.assert_clean();
}

#[test]
fn cache_list_shows_entries_and_gc_prunes_only_what_vmtest_remakes() {
    let vt = Vmtest::new();
    let cache = tempfile::tempdir().unwrap();
    let put = |rel: &str, bytes: usize| {
        let p = cache.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, vec![0u8; bytes]).unwrap();
    };
    put("snapshots/a.state", 4096);
    put("vmlinux/6.1.0-57-amd64-0123", 2048);
    put("kernels/6.1.0-57-amd64/boot/vmlinuz-6.1.0-57-amd64", 1024);
    let cmd = |args: &[&str]| vt.cmd().env("VMTEST_CACHE_DIR", cache.path()).args(args).output().unwrap();

    let out = cmd(&["cache", "list", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let entries: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let kinds: Vec<(&str, u64, bool)> = entries
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (e["kind"].as_str().unwrap(), e["bytes"].as_u64().unwrap(), e["regenerable"].as_bool().unwrap())
        })
        .collect();
    assert_eq!(kinds, [("snapshot", 4096, true), ("boot-image", 2048, true), ("kernel", 1024, false)]);

    let out = cmd(&["cache", "gc"]);
    assert_eq!(out.status.code(), Some(64), "gc says what to prune: {}", stderr(&out));
    let out = cmd(&["cache", "gc", "--max-size", "0", "--kind", "snapshot"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("removed 1 entries"), "{}", stdout(&out));
    assert!(!cache.path().join("snapshots/a.state").exists());
    assert!(cache.path().join("vmlinux/6.1.0-57-amd64-0123").exists(), "only the kind asked for");
    let out = cmd(&["cache", "gc", "--max-size", "0"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!cache.path().join("vmlinux/6.1.0-57-amd64-0123").exists());
    assert!(
        cache.path().join("kernels/6.1.0-57-amd64/boot/vmlinuz-6.1.0-57-amd64").exists(),
        "a fetched kernel stays"
    );
}
