//! The cache: extracted kernels, fetched kernel packages, initramfs images, probe results.
//! Every file is written to a temporary name and renamed, so concurrent runs never see a
//! half-written entry and a crash never leaves one.

use std::path::{Path, PathBuf};
use vmtest_core::{Error, Result};

/// A cache directory (created on demand, entry by entry).
#[derive(Clone, Debug)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// `$VMTEST_CACHE_DIR`, else `$XDG_CACHE_HOME/vmtest`, else `~/.cache/vmtest`.
    pub fn from_env() -> Self {
        let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let root = env("VMTEST_CACHE_DIR")
            .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("vmtest")))
            .or_else(|| env("HOME").map(|h| h.join(".cache/vmtest")))
            .unwrap_or_else(|| std::env::temp_dir().join("vmtest-cache"));
        Cache { root }
    }

    /// The cache at `root`.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Cache { root: root.into() }
    }

    /// Its directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A subdirectory, created on demand.
    pub(crate) fn dir(&self, name: &str) -> Result<PathBuf> {
        let d = self.root.join(name);
        std::fs::create_dir_all(&d).map_err(|e| {
            Error::usage(format!(
                "cannot create cache dir {}: {e}; set VMTEST_CACHE_DIR to a writable directory",
                d.display()
            ))
        })?;
        Ok(d)
    }

    /// An exclusive lock on the cache file `name`, held until the returned file is dropped
    /// (the kernel drops it when the process dies). Used where concurrent first runs would
    /// otherwise all do the same slow work: fetching QEMU, probing KVM.
    pub(crate) fn lock(&self, name: &str) -> Result<std::fs::File> {
        use std::os::fd::AsRawFd;
        let path = self.root.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::io(format!("cannot create cache dir {}", parent.display()), e))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("cannot open lock file {}", path.display()), e))?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(Error::io(
                format!("cannot lock {}", path.display()),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(file)
    }

    /// Write `data` to `path` atomically.
    pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut tmp = tempfile::NamedTempFile::new_in(dir)
            .map_err(|e| Error::io(format!("cannot write to cache dir {}", dir.display()), e))?;
        std::io::Write::write_all(&mut tmp, data)
            .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))?;
        tmp.persist(path).map_err(|e| Error::io(format!("cannot write {}", path.display()), e.error))?;
        Ok(())
    }
}

/// Hex SHA-256 of some parts, for content-addressed names.
pub(crate) fn digest<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().iter().take(12).map(|b| format!("{b:02x}")).collect()
}

/// A cheap identity of a file: path, size, modification time, inode.
pub(crate) fn file_identity(path: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok(format!("{}:{}:{}:{}:{}", path.display(), m.len(), m.mtime(), m.mtime_nsec(), m.ino()))
}
