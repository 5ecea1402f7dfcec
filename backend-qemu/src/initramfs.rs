//! The generated initramfs: `vmtest-agent` as `/init`, the modules the guest needs, and the
//! few directories and device nodes init expects. An uncompressed newc cpio archive (the
//! kernel unpacks it fastest), cached under its content hash.

use crate::cache::{digest, file_identity, Cache};
use crate::modules::{read_module, strip_signature, Module};
use std::path::PathBuf;
use vmtest_core::{Error, Result};

/// The static agent binary, built by build.rs: every initramfs's `/init`.
pub const AGENT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/vmtest-agent"));

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

/// Writer of a newc ("070701") cpio archive.
#[derive(Default)]
pub struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            if mode & S_IFDIR != 0 { 2 } else { 1 },
            0, // mtime: fixed, so the archive is reproducible
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }

    pub fn dir(&mut self, name: &str) {
        self.entry(name, S_IFDIR | 0o755, (0, 0), &[]);
    }

    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, S_IFREG | mode, (0, 0), data);
    }

    pub fn char_device(&mut self, name: &str, mode: u32, major: u32, minor: u32) {
        self.entry(name, S_IFCHR | mode, (major, minor), &[]);
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        // Pad to 512 bytes like cpio(1) does.
        while self.buf.len() % 512 != 0 {
            self.buf.push(0);
        }
        self.buf
    }
}

/// Build (or find in the cache) the initramfs for this agent and these modules.
/// `strip_signatures` only where the kernel does not enforce module signatures.
///
/// The cache key is the agent's content and the modules' file identities (path, size,
/// mtime, inode), so a cache hit reads no module.
pub fn build(cache: &Cache, agent: &[u8], modules: &[Module], strip_signatures: bool) -> Result<PathBuf> {
    // LAYOUT names what this function puts beside the agent and the modules.
    const LAYOUT: &[u8] = b"layout 2: /dev/null";
    let mut key = vec![LAYOUT.to_vec(), agent.to_vec(), vec![strip_signatures as u8]];
    for m in modules {
        let id = file_identity(&m.path)
            .map_err(|e| Error::io(format!("cannot stat module {}", m.path.display()), e))?;
        key.push(m.name.clone().into_bytes());
        key.push(id.into_bytes());
    }
    let path = cache.dir("initramfs")?.join(format!("{}.cpio", digest(key.iter().map(Vec::as_slice))));
    if path.is_file() {
        return Ok(path);
    }
    let mut loaded = Vec::with_capacity(modules.len());
    for m in modules {
        let bytes = read_module(&m.path)?;
        loaded.push((m.name.clone(), if strip_signatures { strip_signature(bytes) } else { bytes }));
    }
    let mut cpio = Cpio::default();
    for d in ["dev", "proc", "sys", "mnt", "lib", "lib/modules", "lib/modules/vmtest"] {
        cpio.dir(d);
    }
    // Init's stdio: the kernel opens /dev/console before anything is mounted.
    cpio.char_device("dev/console", 0o600, 5, 1);
    // The kernel starts its module helper (the agent, linked as /sbin/modprobe at setup)
    // with no descriptors open, and Rust's runtime opens /dev/null for them or aborts; /dev
    // itself moves to the new root.
    cpio.char_device("dev/null", 0o666, 1, 3);
    cpio.file("init", 0o755, agent);
    let mut order = String::new();
    for (name, bytes) in &loaded {
        let file = format!("{name}.ko");
        cpio.file(&format!("lib/modules/vmtest/{file}"), 0o644, bytes);
        order.push_str(&file);
        order.push('\n');
    }
    cpio.file("lib/modules/vmtest/order", 0o644, order.as_bytes());
    Cache::write_atomic(&path, &cpio.finish())?;
    Ok(path)
}

/// An initramfs whose init powers off at once: the raw boot floor the benchmark compares to.
pub fn build_poweroff(cache: &Cache, agent: &[u8]) -> Result<PathBuf> {
    build(cache, agent, &[], false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_newc_and_aligned() {
        let mut c = Cpio::default();
        c.dir("dev");
        c.file("init", 0o755, b"#!x");
        let out = c.finish();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 512, 0);
        // The second header starts 4-byte aligned after "dev\0" + padding.
        let second = out.windows(6).skip(1).position(|w| w == b"070701").unwrap() + 1;
        assert_eq!(second % 4, 0);
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("TRAILER!!!"));
        assert!(text.contains("init"));
        // mode of "init" is a regular file with 0755.
        assert!(text.contains(&format!("{:08x}", S_IFREG | 0o755)));
    }

    #[test]
    fn builds_are_cached_by_agent_and_module_identity() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::at(tmp.path().join("cache"));
        let module = Module { name: "m".into(), path: tmp.path().join("m.ko") };
        std::fs::write(&module.path, b"module v1").unwrap();
        let mods = std::slice::from_ref(&module);
        let a = build(&cache, b"agent-1", mods, false).unwrap();
        assert_eq!(a, build(&cache, b"agent-1", mods, false).unwrap());
        assert_ne!(a, build(&cache, b"agent-2", mods, false).unwrap());
        // A rebuilt module (new size and mtime) is a new initramfs holding the new bytes.
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(&module.path, b"module v2!").unwrap();
        let b = build(&cache, b"agent-1", mods, false).unwrap();
        assert_ne!(a, b);
        let cpio = std::fs::read(&b).unwrap();
        assert!(cpio.windows(10).any(|w| w == b"module v2!"));
    }
}
