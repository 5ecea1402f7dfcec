//! Test handle on the fake `multipass` (tests/fake/multipass): a per-test state dir and a
//! per-test launcher script carrying the fake's settings, so tests running in parallel
//! threads never share environment variables. Shared with vmtest-cli/tests/multipass.rs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub struct Fake {
    pub dir: tempfile::TempDir,
    pub state: PathBuf,
    /// The launcher: what VMTEST_MULTIPASS points at.
    pub exe: PathBuf,
    script: PathBuf,
    settings: Vec<(String, String)>,
}

impl Fake {
    /// `script` is the path of tests/fake/multipass; `version` is "1.16" or "main".
    pub fn new(script: &str, version: &str) -> Fake {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("mp-state");
        std::fs::create_dir(&state).unwrap();
        let mut f = Fake {
            exe: dir.path().join("multipass"),
            state,
            dir,
            script: PathBuf::from(script),
            settings: vec![("FAKE_MULTIPASS_VERSION".into(), version.into())],
        };
        f.write_launcher();
        f
    }

    fn write_launcher(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        let q = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
        let mut text = String::from("#!/bin/sh\n");
        text.push_str(&format!("export FAKE_MULTIPASS_STATE={}\n", q(&self.state.to_string_lossy())));
        for (k, v) in &self.settings {
            text.push_str(&format!("export {k}={}\n", q(v)));
        }
        text.push_str(&format!("exec {} \"$@\"\n", q(&self.script.to_string_lossy())));
        let tmp = self.dir.path().join(".multipass.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&tmp, &self.exe).unwrap();
    }

    /// The snap's layout, as snapd makes it: `snap/bin/multipass` is a symlink to
    /// `usr/bin/snap`, which runs the confined app its argv[0] names. Returns the symlink (what
    /// `PATH` finds as `multipass` on a snap host).
    pub fn snap(&self) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let snap = self.dir.path().join("usr/bin/snap");
        let link = self.dir.path().join("snap/bin/multipass");
        std::fs::create_dir_all(snap.parent().unwrap()).unwrap();
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        let q = |p: &Path| format!("'{}'", p.to_string_lossy().replace('\'', r"'\''"));
        let text = format!(
            "#!/bin/sh\ncase \"${{0##*/}}\" in\n  multipass) FAKE_MULTIPASS_CONFINED=1 exec {} \"$@\" ;;\nesac\n\
             echo \"fake snap: only multipass is installed\" >&2\nexit 1\n",
            q(&self.exe)
        );
        std::fs::write(&snap, text).unwrap();
        std::fs::set_permissions(&snap, std::fs::Permissions::from_mode(0o755)).unwrap();
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&snap, &link).unwrap();
        link
    }

    /// Set (or with "" clear) one FAKE_MULTIPASS_* setting for every later call.
    pub fn set(&mut self, key: &str, value: &str) {
        self.settings.retain(|(k, _)| k != key);
        if !value.is_empty() {
            self.settings.push((key.into(), value.into()));
        }
        self.write_launcher();
    }

    /// Run the fake as a user would (null stdin).
    pub fn mp(&self, args: &[&str]) -> Output {
        Command::new(&self.exe).args(args).stdin(Stdio::null()).output().unwrap()
    }

    /// Every call so far, without argv[0].
    pub fn calls(&self) -> Vec<Vec<String>> {
        let Ok(text) = std::fs::read_to_string(self.state.join("calls.jsonl")) else { return Vec::new() };
        text.lines()
            .map(|l| {
                let v: Vec<String> = serde_json::from_str(l).unwrap();
                v[1..].to_vec()
            })
            .collect()
    }

    /// The calls of one subcommand.
    pub fn calls_of(&self, cmd: &str) -> Vec<Vec<String>> {
        self.calls().into_iter().filter(|c| c.first().map(String::as_str) == Some(cmd)).collect()
    }

    pub fn clear_calls(&self) {
        let _ = std::fs::remove_file(self.state.join("calls.jsonl"));
    }

    /// (name, state) of every instance the fake daemon knows.
    pub fn instances(&self) -> Vec<(String, String)> {
        let Ok(text) = std::fs::read_to_string(self.state.join("instances.json")) else { return Vec::new() };
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| (i["name"].as_str().unwrap().to_owned(), i["state"].as_str().unwrap().to_owned()))
            .collect()
    }

    /// The fake guest's home directory of an instance.
    pub fn home(&self, name: &str) -> PathBuf {
        self.state.join("instances").join(name).join("home")
    }

    /// The user's own instance, made the way a user would.
    pub fn user_instance(&self, name: &str) {
        let out = self.mp(&["launch", "--name", name]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Asserts the backend never ran a bare `purge` nor deleted more than one name per call, nor
/// anything that does not start with `vmt-`.
pub fn assert_deletes_are_safe(fake: &Fake) {
    assert!(fake.calls_of("purge").is_empty(), "a bare purge was run: {:?}", fake.calls());
    for c in fake.calls_of("delete") {
        assert_eq!(c.len(), 3, "one name per delete: {c:?}");
        assert_eq!(c[1], "--purge", "{c:?}");
        assert!(c[2].starts_with("vmt-"), "deleted a non-vmtest instance: {c:?}");
    }
}
