//! Test harness: a per-test fake host (state dir, device root, wrappers that run
//! `tests/fake/fake.py` as each tool with this test's env), and a backend pointed at it.
#![allow(dead_code)]

use backend_bhyve::config::{Config, Flavor, ShareMode};
use backend_bhyve::host::{HostCommand, Privilege};
use backend_bhyve::BhyveBackend;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const TOOLS: &[&str] = &[
    "zfs",
    "bhyve",
    "bhyveload",
    "bhyvectl",
    "ifconfig",
    "dladm",
    "kldstat",
    "pfexec",
    "sudo",
    "doas",
    "dd",
];

pub struct FakeHost {
    pub dir: tempfile::TempDir,
    pub flavor: Flavor,
}

pub fn fake_py() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake/fake.py")
}

impl FakeHost {
    /// A fake host of `flavor`; `env` is extra env for every tool (failure injection).
    pub fn new(flavor: Flavor, env: &[(&str, &str)]) -> FakeHost {
        let dir = tempfile::Builder::new().prefix("bh").tempdir_in("/tmp").unwrap();
        let fh = FakeHost { dir, flavor };
        std::fs::create_dir_all(fh.state().join("dev")).unwrap();
        std::fs::write(fh.state().join("dev/vmmctl"), b"").unwrap();
        std::fs::write(fh.bootrom(), b"uefi").unwrap();
        std::fs::create_dir_all(fh.bin()).unwrap();
        fh.set_env(env);
        fh
    }

    /// Rewrite the tool wrappers with this env.
    pub fn set_env(&self, env: &[(&str, &str)]) {
        let flavor = match self.flavor {
            Flavor::FreeBsd => "freebsd",
            Flavor::Illumos => "illumos",
        };
        let mut vars = format!("FAKE_BHYVE_STATE='{}' FAKE_BHYVE_FLAVOR={flavor}", self.state().display());
        for (k, v) in env {
            vars.push_str(&format!(" {k}='{v}'"));
        }
        for t in TOOLS {
            let p = self.bin().join(t);
            let _ = std::fs::remove_file(&p);
            std::fs::write(
                &p,
                format!("#!/bin/sh\n{vars} FAKE_TOOL={t} exec '{}' \"$@\"\n", fake_py().display()),
            )
            .unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("s")
    }
    pub fn bin(&self) -> PathBuf {
        self.dir.path().join("bin")
    }
    pub fn dev(&self) -> PathBuf {
        self.state().join("dev")
    }
    pub fn bootrom(&self) -> PathBuf {
        self.dir.path().join("BHYVE_UEFI.fd")
    }
    pub fn bay(&self) -> PathBuf {
        self.dir.path().join("bay")
    }

    pub fn config(&self, privilege: Privilege) -> Config {
        Config {
            flavor: Some(self.flavor),
            pool: "tank".into(),
            image: "img1".into(),
            host: HostCommand::new(privilege, vec![self.bin()]),
            devroot: self.dev(),
            user: "root".into(),
            password: None,
            nic: None,
            share: ShareMode::Serial,
            bootrom: Some(self.bootrom().display().to_string()),
            disk_bytes: 8 << 20,
            bay: self.bay().display().to_string(),
            copy_program: true,
            retry_pause: Duration::from_millis(10),
            retries: 5,
            stop_grace: Duration::from_secs(5),
        }
    }

    pub fn backend(&self, cfg: Config) -> BhyveBackend {
        BhyveBackend::with_config(cfg)
    }

    /// Every command the fakes saw, as argv lists (tool name first).
    pub fn commands(&self) -> Vec<Vec<String>> {
        std::fs::read_to_string(self.state().join("commands.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    pub fn clear_commands(&self) {
        let _ = std::fs::remove_file(self.state().join("commands.log"));
    }

    /// The datasets the fake zfs holds.
    pub fn datasets(&self) -> Vec<String> {
        let s: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.state().join("state.json")).unwrap()).unwrap();
        let mut v: Vec<String> = s["datasets"].as_object().unwrap().keys().cloned().collect();
        v.sort();
        v
    }

    pub fn vmm(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.dev().join("vmm"))
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Run a fake tool directly (test setup).
    pub fn tool(&self, tool: &str, args: &[&str]) -> std::process::Output {
        std::process::Command::new(self.bin().join(tool)).args(args).output().unwrap()
    }

    /// Import a small raw image as `tank/vmtest/img/<name>@base`.
    pub async fn import(&self, backend: &BhyveBackend, name: &str) {
        let raw = self.dir.path().join(format!("{name}.raw"));
        std::fs::write(&raw, vec![7u8; 3 << 20]).unwrap();
        backend.import_image(&raw, name, false).await.unwrap();
    }
}

/// Does `cmds` hold `want` (a command as tool + args) in this order as a subsequence?
pub fn in_order(cmds: &[Vec<String>], want: &[&[&str]]) -> bool {
    let mut i = 0;
    for c in cmds {
        if i < want.len() && c.iter().map(String::as_str).eq(want[i].iter().copied()) {
            i += 1;
        }
    }
    i == want.len()
}
