//! A guest saved to disk, as one directory: its memory and device state (`state`, QEMU's
//! migration stream), for an image guest its disk as it was then (`disk.qcow2`, a qcow2
//! layer over the disk it ran on), and a seal (`seal.json`) with each file's size and CRC32
//! and the identity of the disk layer's backing file.
//!
//! Snapshots ([`crate::snapshot`]) and test checkpoints ([`vmtest_core::Vm::save`]) are both
//! saved guests. Nothing is restored before its seal is checked: a truncated or corrupted
//! file, a missing seal, or a backing image that was rebuilt or removed makes the saved
//! guest unusable, and the caller makes a new one instead of restoring memory that does
//! not match its disk.

use crate::qmp::Qmp;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vmtest_core::{Error, Result};

/// The files of one saved guest, in its directory.
#[derive(Clone, Debug)]
pub(crate) struct SavedGuest {
    dir: PathBuf,
}

/// What the seal records of one file.
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
struct FileSeal {
    bytes: u64,
    crc32: u32,
}

/// `seal.json`.
#[derive(Serialize, Deserialize, Debug)]
struct Seal {
    vmtest: String,
    state: FileSeal,
    /// The disk layer (image guests).
    disk: Option<FileSeal>,
    /// The disk layer's backing file and its identity when the guest was saved.
    backing: Option<(PathBuf, String)>,
}

const STATE: &str = "state";
const DISK: &str = "disk.qcow2";
const SEAL: &str = "seal.json";

impl SavedGuest {
    /// The saved guest in `dir` (which may not exist yet).
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        SavedGuest { dir: dir.into() }
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The migration stream.
    pub fn state(&self) -> PathBuf {
        self.dir.join(STATE)
    }

    /// The disk layer (present for image guests).
    pub fn disk(&self) -> PathBuf {
        self.dir.join(DISK)
    }

    /// Whether a seal is there (the saved guest was completed; not yet whether it is intact).
    pub fn is_sealed(&self) -> bool {
        self.dir.join(SEAL).is_file()
    }

    /// The `-incoming` argument that loads the state.
    pub fn incoming_uri(&self) -> String {
        format!("exec:cat {}", shell_quote(&self.state().to_string_lossy()))
    }

    /// Record the sizes and checksums of what is in the directory, and the disk layer's
    /// backing file (`backing`): the last step of saving.
    pub fn seal(&self, backing: Option<&Path>) -> Result<()> {
        let disk = self.disk();
        let seal = Seal {
            vmtest: env!("CARGO_PKG_VERSION").to_owned(),
            state: file_seal(&self.state())?,
            disk: if disk.is_file() { Some(file_seal(&disk)?) } else { None },
            backing: match backing {
                Some(b) => Some((b.to_owned(), identity(b)?)),
                None => None,
            },
        };
        let text = serde_json::to_vec_pretty(&seal).expect("a seal serializes");
        crate::cache::Cache::write_atomic(&self.dir.join(SEAL), &text)
    }

    /// Check the directory against its seal. `Err` says what does not match; such a saved
    /// guest must not be restored.
    pub fn verify(&self) -> Result<()> {
        let bad = |why: String| {
            Error::infra(format!("the saved guest in {} is unusable: {why}", self.dir.display()))
        };
        let text = std::fs::read(self.dir.join(SEAL)).map_err(|e| bad(format!("no seal ({e})")))?;
        let seal: Seal = serde_json::from_slice(&text).map_err(|e| bad(format!("bad seal ({e})")))?;
        if seal.vmtest != env!("CARGO_PKG_VERSION") {
            return Err(bad(format!("saved by vmtest {}", seal.vmtest)));
        }
        let state = file_seal(&self.state()).map_err(|e| bad(e.to_string()))?;
        if state != seal.state {
            return Err(bad(format!(
                "{STATE} changed since it was saved ({})",
                differs(&seal.state, &state)
            )));
        }
        if let Some(want) = &seal.disk {
            let disk = file_seal(&self.disk()).map_err(|e| bad(e.to_string()))?;
            if &disk != want {
                return Err(bad(format!("{DISK} changed since it was saved ({})", differs(want, &disk))));
            }
        }
        if let Some((backing, id)) = &seal.backing {
            match identity(backing) {
                Ok(now) if &now == id => {}
                Ok(_) => return Err(bad(format!("its base {} was rebuilt", backing.display()))),
                Err(_) => return Err(bad(format!("its base {} is gone", backing.display()))),
            }
        }
        Ok(())
    }

    /// [`SavedGuest::verify`], off the async threads (it reads every byte).
    pub async fn check(&self) -> Result<()> {
        let saved = self.clone();
        tokio::task::spawn_blocking(move || saved.verify())
            .await
            .map_err(|e| Error::infra(format!("checking {}: {e}", self.dir.display())))?
    }

    /// Remove the directory (a saved guest found unusable).
    pub fn remove(&self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("cannot remove {}: {e}", self.dir.display());
            }
        }
    }
}

/// The identity a seal keeps of a backing file: size and modification time (not the path's
/// inode: a cache restored elsewhere keeps a valid base).
fn identity(path: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).map_err(|e| Error::io(format!("cannot stat {}", path.display()), e))?;
    Ok(format!("{}:{}:{}", m.len(), m.mtime(), m.mtime_nsec()))
}

fn differs(want: &FileSeal, got: &FileSeal) -> String {
    if want.bytes != got.bytes {
        format!("{} bytes, sealed with {}", got.bytes, want.bytes)
    } else {
        "its checksum differs".to_owned()
    }
}

/// Size and CRC32 of a file.
fn file_seal(path: &Path) -> Result<FileSeal> {
    let cannot = |e| Error::io(format!("cannot read {}", path.display()), e);
    let mut f = std::fs::File::open(path).map_err(cannot)?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(cannot)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(FileSeal { bytes, crc32: hasher.finalize() })
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Save the guest behind `qmp` into `dest` (its migration stream, to a temporary name
/// renamed when QEMU reports the migration completed). The guest is left paused with its
/// disk flushed and released ("postmigrate"): the caller copies the disk, then continues
/// the guest (`cont`) or ends it.
pub(crate) async fn migrate_to_file(qmp: &mut Qmp, dest: &Path) -> Result<()> {
    let tmp = dest.with_extension(format!("tmp-{}", std::process::id()));
    let result = migrate(qmp, &tmp).await.and_then(|()| {
        std::fs::rename(&tmp, dest)
            .map_err(|e| Error::io(format!("cannot move the saved state to {}", dest.display()), e))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

async fn migrate(qmp: &mut Qmp, tmp: &Path) -> Result<()> {
    let uri = format!("exec:cat > {}", shell_quote(&tmp.to_string_lossy()));
    qmp.execute("migrate", json!({ "uri": uri })).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = qmp.execute("query-migrate", json!({})).await?;
        match status.get("status").and_then(|s| s.as_str()) {
            Some("completed") => return Ok(()),
            Some("failed") | Some("cancelled") => {
                let why = status.get("error-desc").and_then(|d| d.as_str()).unwrap_or("no reason given");
                return Err(Error::infra(format!("saving the VM state failed: {why}")));
            }
            _ if Instant::now() > deadline => return Err(Error::infra("saving the VM state took over 120s")),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved_with(state: &[u8], disk: Option<&[u8]>) -> (tempfile::TempDir, SavedGuest) {
        let tmp = tempfile::tempdir().unwrap();
        let saved = SavedGuest::at(tmp.path().join("g"));
        std::fs::create_dir_all(saved.dir()).unwrap();
        std::fs::write(saved.state(), state).unwrap();
        if let Some(d) = disk {
            std::fs::write(saved.disk(), d).unwrap();
        }
        (tmp, saved)
    }

    #[test]
    fn a_sealed_guest_verifies_until_a_file_changes() {
        let (_tmp, saved) = saved_with(b"memory pages", Some(b"qcow2 layer"));
        assert!(saved.verify().is_err(), "no seal, not usable");
        saved.seal(None).unwrap();
        saved.verify().unwrap();
        std::fs::write(saved.state(), b"memory pagez").unwrap();
        let e = saved.verify().unwrap_err().to_string();
        assert!(e.contains("state changed since it was saved (its checksum differs)"), "{e}");
        std::fs::write(saved.state(), b"memory pages").unwrap();
        saved.verify().unwrap();
        std::fs::write(saved.disk(), b"qcow2").unwrap();
        let e = saved.verify().unwrap_err().to_string();
        assert!(e.contains("disk.qcow2 changed since it was saved (5 bytes, sealed with 11)"), "{e}");
    }

    #[test]
    fn a_rebuilt_or_missing_base_makes_it_unusable() {
        let (tmp, saved) = saved_with(b"m", Some(b"d"));
        let base = tmp.path().join("base.qcow2");
        std::fs::write(&base, b"base 1").unwrap();
        saved.seal(Some(&base)).unwrap();
        saved.verify().unwrap();
        std::fs::write(&base, b"base 22").unwrap();
        assert!(saved.verify().unwrap_err().to_string().contains("was rebuilt"));
        std::fs::remove_file(&base).unwrap();
        assert!(saved.verify().unwrap_err().to_string().contains("is gone"));
    }

    #[test]
    fn incoming_paths_are_quoted() {
        let saved = SavedGuest::at("/c/it's");
        assert_eq!(saved.incoming_uri(), r"exec:cat '/c/it'\''s/state'");
    }
}
