//! Kernel modules the guest needs, with their dependencies, in load order.
//!
//! Stock distro kernels build virtio, 9p and overlayfs as modules. Dependencies come from
//! `modules.dep` when the tree has one (an installed kernel) and from each module's own
//! `.modinfo` `depends=` otherwise (a freshly unpacked package, where depmod never ran).
//! Compressed modules (`.ko.xz`, `.ko.zst`, `.ko.gz`) are decompressed for the initramfs.

use crate::cache::{digest, file_identity, Cache};
use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use vmtest_core::{Error, Result};

/// One module ready for the initramfs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    pub name: String,
    pub path: PathBuf,
}

/// The module tree of one kernel.
pub struct ModuleTree {
    dir: PathBuf,
    /// Normalized name (`-` as `_`) to path.
    files: BTreeMap<String, PathBuf>,
    builtin: HashSet<String>,
    /// From modules.dep, when present.
    deps: Option<BTreeMap<String, Vec<String>>>,
}

/// `9p-foo.ko.xz` -> `9p_foo`.
pub fn module_name(file: &str) -> Option<String> {
    let base = file
        .strip_suffix(".xz")
        .or_else(|| file.strip_suffix(".zst"))
        .or_else(|| file.strip_suffix(".gz"))
        .unwrap_or(file);
    base.strip_suffix(".ko").map(|n| n.replace('-', "_"))
}

impl ModuleTree {
    pub fn open(dir: &Path) -> Result<ModuleTree> {
        let mut files = BTreeMap::new();
        walk(&dir.join("kernel"), &mut |p| {
            if let Some(name) = p.file_name().and_then(|n| n.to_str()).and_then(module_name) {
                files.insert(name, p.to_owned());
            }
        });
        let builtin = std::fs::read_to_string(dir.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.rsplit('/').next().and_then(module_name))
            .collect();
        let deps = std::fs::read_to_string(dir.join("modules.dep")).ok().map(|text| {
            text.lines()
                .filter_map(|line| {
                    let (m, rest) = line.split_once(':')?;
                    let name = module_name(m.rsplit('/').next()?)?;
                    let deps =
                        rest.split_whitespace().filter_map(|d| module_name(d.rsplit('/').next()?)).collect();
                    Some((name, deps))
                })
                .collect()
        });
        Ok(ModuleTree { dir: dir.to_owned(), files, builtin, deps })
    }

    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(name)
    }

    /// The modules `wanted` needs, dependencies first; built-in ones are skipped. A wanted
    /// module that is neither built in nor present is an error naming it.
    pub fn resolve(&self, wanted: &[&str]) -> Result<Vec<Module>> {
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        for w in wanted {
            self.visit(w, &mut seen, &mut order, &mut Vec::new())?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        seen: &mut HashSet<String>,
        order: &mut Vec<Module>,
        stack: &mut Vec<String>,
    ) -> Result<()> {
        let name = name.replace('-', "_");
        if seen.contains(&name) || self.is_builtin(&name) || stack.contains(&name) {
            return Ok(());
        }
        let path = self.files.get(&name).ok_or_else(|| {
            Error::preflight(format!(
                "kernel modules in {} lack `{name}` (neither built in nor a module); \
                 use a distro kernel (`vmtest kernel fetch`) or one built with it",
                self.dir.display()
            ))
        })?;
        stack.push(name.clone());
        for dep in self.dependencies(&name, path)? {
            self.visit(&dep, seen, order, stack)?;
        }
        stack.pop();
        seen.insert(name.clone());
        order.push(Module { name, path: path.clone() });
        Ok(())
    }

    fn dependencies(&self, name: &str, path: &Path) -> Result<Vec<String>> {
        if let Some(deps) = self.deps.as_ref().and_then(|d| d.get(name)) {
            return Ok(deps.clone());
        }
        let bytes = read_module(path)?;
        Ok(modinfo(&bytes, "depends")
            .map(|d| d.split(',').filter(|s| !s.is_empty()).map(|s| s.replace('-', "_")).collect())
            .unwrap_or_default())
    }
}

/// [`ModuleTree::resolve`], remembered in the cache: opening a tree walks thousands of
/// files, which is worth doing once per kernel, not once per run. The answer is keyed by the
/// tree's path and modification time and the wanted names, and recomputed when a file it
/// names has gone.
pub fn resolve_cached(cache: &Cache, dir: &Path, wanted: &[&str]) -> Result<Vec<Module>> {
    let dir_id = file_identity(dir).map_err(|e| Error::io(format!("cannot stat {}", dir.display()), e))?;
    let key = digest([dir_id.as_bytes(), wanted.join(",").as_bytes()]);
    let path = cache.dir("modules")?.join(format!("{key}.txt"));
    if let Ok(text) = std::fs::read_to_string(&path) {
        let known: Vec<Module> = text
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(name, p)| Module { name: name.to_owned(), path: PathBuf::from(p) })
            .collect();
        if known.iter().all(|m| m.path.is_file()) {
            return Ok(known);
        }
    }
    let resolved = ModuleTree::open(dir)?.resolve(wanted)?;
    let text: String = resolved.iter().map(|m| format!("{} {}\n", m.name, m.path.display())).collect();
    Cache::write_atomic(&path, text.as_bytes())?;
    Ok(resolved)
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => walk(&p, f),
            Ok(_) => f(&p),
            Err(_) => {}
        }
    }
}

/// A module's bytes, decompressed.
pub fn read_module(path: &Path) -> Result<Vec<u8>> {
    let raw =
        std::fs::read(path).map_err(|e| Error::io(format!("cannot read module {}", path.display()), e))?;
    let name = path.to_string_lossy();
    let mut out = Vec::new();
    let res = if name.ends_with(".xz") {
        xz2::read::XzDecoder::new(&raw[..]).read_to_end(&mut out)
    } else if name.ends_with(".zst") {
        zstd::stream::read::Decoder::new(&raw[..]).and_then(|mut d| d.read_to_end(&mut out))
    } else if name.ends_with(".gz") {
        flate2::read::GzDecoder::new(&raw[..]).read_to_end(&mut out)
    } else {
        return Ok(raw);
    };
    res.map_err(|e| Error::io(format!("cannot decompress module {}", path.display()), e))?;
    Ok(out)
}

/// The module minus its appended signature, when it has one. Verifying an RSA signature per
/// module is a large share of module loading under TCG; a kernel that does not enforce
/// signatures loads an unsigned module all the same (it only notes a taint).
pub fn strip_signature(mut module: Vec<u8>) -> Vec<u8> {
    const MARKER: &[u8] = b"~Module signature appended~\n";
    // struct module_signature: 12 bytes before the marker, ending in a big-endian sig_len.
    if !module.ends_with(MARKER) || module.len() < MARKER.len() + 12 {
        return module;
    }
    let info_end = module.len() - MARKER.len();
    let len_bytes: [u8; 4] = module[info_end - 4..info_end].try_into().unwrap();
    let sig_len = u32::from_be_bytes(len_bytes) as usize;
    match info_end.checked_sub(12 + sig_len) {
        Some(end) => {
            module.truncate(end);
            module
        }
        None => module,
    }
}

/// A `key=value` field from a module's `.modinfo` section.
pub fn modinfo(elf: &[u8], key: &str) -> Option<String> {
    use object::{Object, ObjectSection};
    let file = object::File::parse(elf).ok()?;
    let data = file.section_by_name(".modinfo")?.data().ok()?;
    let prefix = format!("{key}=");
    data.split(|b| *b == 0).find_map(|field| {
        field.strip_prefix(prefix.as_bytes()).map(|v| String::from_utf8_lossy(v).into_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appended_signatures_are_stripped_exactly() {
        let body = b"\x7fELF module body".to_vec();
        let mut signed = body.clone();
        signed.extend_from_slice(&[0xAA; 300]); // the signature
        signed.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0]);
        signed.extend_from_slice(&300u32.to_be_bytes());
        signed.extend_from_slice(b"~Module signature appended~\n");
        assert_eq!(strip_signature(signed), body);
        assert_eq!(strip_signature(body.clone()), body, "an unsigned module is left alone");
    }

    #[test]
    fn resolutions_are_cached_and_redone_when_a_module_goes() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("tree");
        let m = d.join("kernel/fs/a.ko");
        std::fs::create_dir_all(m.parent().unwrap()).unwrap();
        std::fs::write(&m, b"").unwrap();
        std::fs::write(d.join("modules.dep"), "kernel/fs/a.ko:\n").unwrap();
        let cache = Cache::at(tmp.path().join("cache"));
        let first = resolve_cached(&cache, &d, &["a"]).unwrap();
        assert_eq!(first, vec![Module { name: "a".into(), path: m.clone() }]);
        assert_eq!(resolve_cached(&cache, &d, &["a"]).unwrap(), first);
        // The module moved: the cached answer is stale and must not be used.
        let moved = d.join("kernel/fs/b");
        std::fs::create_dir_all(&moved).unwrap();
        std::fs::rename(&m, moved.join("a.ko")).unwrap();
        std::fs::write(d.join("modules.dep"), "kernel/fs/b/a.ko:\n").unwrap();
        assert_eq!(resolve_cached(&cache, &d, &["a"]).unwrap()[0].path, moved.join("a.ko"));
    }

    #[test]
    fn names_are_normalized() {
        assert_eq!(module_name("9pnet_virtio.ko").as_deref(), Some("9pnet_virtio"));
        assert_eq!(module_name("virtio-rng.ko.zst").as_deref(), Some("virtio_rng"));
        assert_eq!(module_name("modules.dep"), None);
    }

    #[test]
    fn modules_dep_orders_dependencies_first_and_skips_builtins() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        for m in ["fs/9p/9p.ko", "net/9p/9pnet.ko", "fs/netfs/netfs.ko", "fs/fscache/fscache.ko"] {
            let p = d.join("kernel").join(m);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"").unwrap();
        }
        std::fs::write(
            d.join("modules.dep"),
            "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko\n\
             kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko\nkernel/net/9p/9pnet.ko:\nkernel/fs/netfs/netfs.ko:\n",
        )
        .unwrap();
        std::fs::write(d.join("modules.builtin"), "kernel/fs/overlayfs/overlay.ko\n").unwrap();
        let tree = ModuleTree::open(d).unwrap();
        let names: Vec<String> =
            tree.resolve(&["9p", "overlay"]).unwrap().into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["9pnet", "netfs", "fscache", "9p"]);
        let err = tree.resolve(&["virtio_console"]).unwrap_err();
        assert!(err.message().contains("lack `virtio_console`"), "{err}");
    }
}
