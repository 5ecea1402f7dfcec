//! Checkpoints of test files (`checkpoint = "NAME"` on a step): where their saved guests
//! live, between runs and within one.
//!
//! A stored checkpoint is `<store>/<key>/`, one directory per node ([`crate::Vm::save`]) and a
//! `manifest.json`. It is written under a temporary name and renamed into place only once
//! every node saved and the manifest is written, so a `<key>` dir without a manifest (or
//! with one that does not match) is damage: it is removed, never used.

mod key;

pub use key::{key, material};

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The file inside a checkpoint dir that says it is whole.
pub const MANIFEST: &str = "manifest.json";

/// Temporary checkpoint dirs in the store are `.new-<pid>-<key>`.
const PENDING_PREFIX: &str = ".new-";

/// What a stored checkpoint is, for people and for the check that it is whole.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// The test file that made it (any file with the same key may use it).
    pub file: PathBuf,
    pub checkpoint: String,
    /// The nodes saved, one directory each, sorted.
    pub nodes: Vec<String>,
    pub created_unix: u64,
    pub vmtest_version: String,
}

impl Manifest {
    pub fn new(file: &Path, checkpoint: &str, nodes: &[&str]) -> Manifest {
        let mut nodes: Vec<String> = nodes.iter().map(|n| n.to_string()).collect();
        nodes.sort();
        Manifest {
            file: file.to_owned(),
            checkpoint: checkpoint.to_owned(),
            nodes,
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            vmtest_version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }
}

/// A backend's checkpoint store ([`crate::Hypervisor::checkpoint_store`]).
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    pub fn new(root: impl Into<PathBuf>) -> Store {
        Store { root: root.into() }
    }

    /// Where the checkpoint of `key` is (or would be).
    pub fn dir(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// The whole checkpoint of `key` for exactly `nodes`, if there is one. A dir that is not
    /// whole (no manifest, another node set, a node's dir missing) is removed. Temporary
    /// dirs of dead runners are removed on the way.
    pub fn find(&self, key: &str, nodes: &[&str]) -> Option<PathBuf> {
        self.remove_dead_pending();
        let dir = self.dir(key);
        if !dir.exists() {
            return None;
        }
        match whole(&dir, nodes) {
            Ok(()) => Some(dir),
            Err(why) => {
                tracing::warn!("checkpoint {} is not whole ({why}); removed", dir.display());
                discard(&dir);
                None
            }
        }
    }

    /// A new checkpoint of `key` to save into; [`Store::commit`] puts it in place.
    pub fn begin(&self, key: &str) -> Result<Pending> {
        self.remove_dead_pending();
        let dir = self.root.join(format!("{PENDING_PREFIX}{}-{key}", std::process::id()));
        discard(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| {
            Error::io(format!("cannot create checkpoint dir {}", dir.display()), e)
                .with_hint("check that the backend's checkpoint store is writable")
        })?;
        Ok(Pending { dir, stored: false })
    }

    /// A checkpoint for one run only (`--no-snapshot`), never stored: it goes away with its
    /// handle, or with the next look-up once its runner is dead. It is here rather than in
    /// the run's state dir, which is often a tmpfs (`$XDG_RUNTIME_DIR`), too small for
    /// guests' memory.
    pub fn scratch(&self) -> Result<Pending> {
        self.begin(&format!("run-{}", crate::random::hex(4)))
    }

    /// Write the manifest into `pending` and rename it to `<store>/<key>`. When that fails
    /// (another run stored the same key first), `pending` stays as it was, usable by this run.
    pub fn commit(&self, pending: &mut Pending, key: &str, manifest: &Manifest) -> Result<PathBuf> {
        let target = self.dir(key);
        write_manifest(&pending.dir, manifest)?;
        std::fs::rename(&pending.dir, &target)
            .map_err(|e| Error::io(format!("cannot store checkpoint {}", target.display()), e))?;
        pending.stored = true;
        Ok(target)
    }

    fn remove_dead_pending(&self) {
        crate::state::remove_abandoned(&self.root, PENDING_PREFIX);
    }
}

/// Remove a checkpoint dir (damaged, stale, or temporary).
pub fn discard(dir: &Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("cannot remove checkpoint {}: {e}", dir.display()),
    }
}

/// `Ok` when `dir` holds a manifest for exactly `nodes` and a dir for each.
fn whole(dir: &Path, nodes: &[&str]) -> std::result::Result<(), String> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read(&path).map_err(|e| format!("no readable {MANIFEST}: {e}"))?;
    let m: Manifest = serde_json::from_slice(&text).map_err(|e| format!("bad {MANIFEST}: {e}"))?;
    let mut want: Vec<&str> = nodes.to_vec();
    want.sort();
    if m.nodes != want {
        return Err(format!("it saved nodes {:?}, not {:?}", m.nodes, want));
    }
    match want.iter().find(|n| !dir.join(n).is_dir()) {
        Some(n) => Err(format!("node `{n}` has no saved state")),
        None => Ok(()),
    }
}

fn write_manifest(dir: &Path, m: &Manifest) -> Result<()> {
    let path = dir.join(MANIFEST);
    let text = serde_json::to_vec_pretty(m).expect("a manifest serializes");
    std::fs::write(&path, text).map_err(|e| Error::io(format!("cannot write {}", path.display()), e))
}

/// A checkpoint being saved, or one this run keeps for itself: its dir goes away with it
/// (unless [`Store::commit`] stored it).
#[derive(Debug)]
pub struct Pending {
    dir: PathBuf,
    /// Renamed into the store: no longer ours to remove.
    stored: bool,
}

impl Pending {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The empty dir node `node` is saved into.
    pub fn node_dir(&self, node: &str) -> Result<PathBuf> {
        let d = self.dir.join(node);
        std::fs::create_dir(&d).map_err(|e| Error::io(format!("cannot create {}", d.display()), e))?;
        Ok(d)
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.stored {
            discard(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests;
