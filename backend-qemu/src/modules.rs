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

/// The index files modprobe reads: `modules.dep`, `modules.alias`, `modules.devname`.
pub const INDEX_FILES: [&str; 3] = ["modules.dep", "modules.alias", "modules.devname"];

/// Make sure the module tree at `dir` has its index, so the guest can load any of its
/// modules on demand. A tree from a distro package was never passed through depmod: the
/// host's `depmod` writes the index when there is one (with the binary forms the host's
/// modprobe needs), else vmtest writes the text forms from each module's `.modinfo`, which
/// is what the agent's own loader reads. Only a tree inside the cache is written to: the
/// host's own trees are the host's business (and an installed one has its index).
///
/// A failure is only a warning: the guest then boots without on-demand modules.
pub fn ensure_index(cache: &Cache, dir: &Path, release: &str) {
    let depmod = crate::find_executable(Path::new("depmod"));
    // With kmod on the host, its modprobe needs depmod's binary index too.
    let done = if depmod.is_some() { "modules.dep.bin" } else { "modules.dep" };
    if dir.join(done).is_file() || !dir.starts_with(cache.root()) {
        return;
    }
    if let Err(e) = write_index(dir, release, depmod.as_deref()) {
        tracing::warn!("no module index for {}: {e}; the guest cannot load modules on demand", dir.display());
    }
}

fn write_index(dir: &Path, release: &str, depmod: Option<&Path>) -> Result<()> {
    // `<root>/lib/modules/<release>`: depmod takes the root.
    let root = dir.parent().and_then(Path::parent).and_then(Path::parent);
    if let (Some(depmod), Some(root)) = (depmod, root) {
        let status = std::process::Command::new(depmod).arg("-b").arg(root).arg(release).status();
        if matches!(status, Ok(s) if s.success()) && dir.join("modules.dep.bin").is_file() {
            return Ok(());
        }
        tracing::warn!(
            "{} -b {} {release} failed; writing the module index itself",
            depmod.display(),
            root.display()
        );
    }
    write_text_index(dir)
}

/// Write the text index of the tree at `dir` from its modules' `.modinfo`.
fn write_text_index(dir: &Path) -> Result<()> {
    let index = build_index(dir)?;
    // modules.dep last: its presence says the index is complete.
    for (name, text) in
        [("modules.alias", &index.alias), ("modules.devname", &index.devname), ("modules.dep", &index.dep)]
    {
        Cache::write_atomic(&dir.join(name), text.as_bytes())?;
    }
    Ok(())
}

/// The text index of a module tree, in depmod's formats.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Index {
    /// `kernel/path/m.ko: kernel/path/dep.ko ...`
    pub dep: String,
    /// `alias PATTERN module`
    pub alias: String,
    /// `module devname cMAJ:MIN` (or `b`): the static nodes of autoloadable modules.
    pub devname: String,
}

/// Read every module's `.modinfo` (its `depends=` and `alias=` fields).
pub fn build_index(dir: &Path) -> Result<Index> {
    let mut files = Vec::new();
    walk(&dir.join("kernel"), &mut |p| {
        if p.file_name().and_then(|n| n.to_str()).and_then(module_name).is_some() {
            files.push(p.to_owned());
        }
    });
    files.sort();
    let rel = |p: &Path| p.strip_prefix(dir).unwrap_or(p).display().to_string();
    let by_name: BTreeMap<String, String> =
        files.iter().filter_map(|p| Some((module_name(p.file_name()?.to_str()?)?, rel(p)))).collect();
    let mut index = Index::default();
    for path in &files {
        let Some(name) = path.file_name().and_then(|n| n.to_str()).and_then(module_name) else { continue };
        let bytes = read_module(path)?;
        let fields = modinfo_all(&bytes);
        let depends: Vec<&str> = fields
            .iter()
            .filter(|(k, _)| k == "depends")
            .flat_map(|(_, v)| v.split(','))
            .filter(|d| !d.is_empty())
            .filter_map(|d| by_name.get(&d.replace('-', "_")).map(String::as_str))
            .collect();
        index.dep.push_str(&format!("{}: {}\n", rel(path), depends.join(" ")));
        let (mut devname, mut node) = (None, None);
        for (k, v) in &fields {
            if k != "alias" {
                continue;
            }
            index.alias.push_str(&format!("alias {v} {name}\n"));
            if let Some(d) = v.strip_prefix("devname:") {
                devname = Some(d.to_owned());
            }
            for (prefix, kind) in [("char-major-", 'c'), ("block-major-", 'b')] {
                if let Some((major, minor)) = v.strip_prefix(prefix).and_then(|n| n.split_once('-')) {
                    if major.parse::<u32>().is_ok() && minor.parse::<u32>().is_ok() {
                        node = Some(format!("{kind}{major}:{minor}"));
                    }
                }
            }
        }
        if let (Some(d), Some(n)) = (devname, node) {
            index.devname.push_str(&format!("{name} {d} {n}\n"));
        }
    }
    Ok(index)
}

/// Every `key=value` field of a module's `.modinfo` section.
fn modinfo_all(elf: &[u8]) -> Vec<(String, String)> {
    use object::{Object, ObjectSection};
    let Ok(file) = object::File::parse(elf) else { return Vec::new() };
    let Some(data) = file.section_by_name(".modinfo").and_then(|s| s.data().ok()) else { return Vec::new() };
    data.split(|b| *b == 0)
        .filter_map(|f| {
            let f = String::from_utf8_lossy(f);
            let (k, v) = f.split_once('=')?;
            Some((k.to_owned(), v.to_owned()))
        })
        .collect()
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
pub(crate) mod tests {
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

    /// A relocatable ELF with only a `.modinfo` section holding `fields`.
    pub(crate) fn fake_module(fields: &[&str]) -> Vec<u8> {
        let mut modinfo: Vec<u8> = fields.iter().flat_map(|f| f.bytes().chain([0])).collect();
        modinfo.resize(modinfo.len().next_multiple_of(8), 0);
        // Padded to 24 bytes, so the section headers after it are 8-byte aligned.
        let shstrtab = b"\0.modinfo\0.shstrtab\0\0\0\0\0";
        let shoff = 64 + modinfo.len() + shstrtab.len();
        let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
        elf.resize(16, 0);
        for (v, len) in [(1u64, 2), (62, 2), (1, 4), (0, 8), (0, 8), (shoff as u64, 8), (0, 4)] {
            elf.extend_from_slice(&v.to_le_bytes()[..len]);
        }
        for v in [64u16, 0, 0, 64, 3, 2] {
            elf.extend_from_slice(&v.to_le_bytes());
        }
        elf.extend_from_slice(&modinfo);
        elf.extend_from_slice(shstrtab);
        let section = |name: u32, kind: u32, offset: usize, size: usize| {
            let mut h = Vec::new();
            h.extend_from_slice(&name.to_le_bytes());
            h.extend_from_slice(&kind.to_le_bytes());
            for v in [0u64, 0, offset as u64, size as u64] {
                h.extend_from_slice(&v.to_le_bytes());
            }
            h.extend_from_slice(&[0u8; 8]);
            h.extend_from_slice(&1u64.to_le_bytes());
            h.extend_from_slice(&0u64.to_le_bytes());
            h
        };
        elf.extend_from_slice(&[0u8; 64]);
        elf.extend(section(1, 1, 64, modinfo.len()));
        elf.extend(section(10, 3, 64 + modinfo.len(), shstrtab.len()));
        elf
    }

    #[test]
    fn the_index_lists_dependencies_aliases_and_static_nodes() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let put = |path: &str, fields: &[&str]| {
            let p = d.join("kernel").join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, fake_module(fields)).unwrap();
        };
        put("drivers/net/tun.ko", &["alias=devname:net/tun", "alias=char-major-10-200", "depends="]);
        put("fs/fuse/cuse.ko", &["alias=char-major-10-203", "depends=fuse"]);
        put(
            "fs/fuse/fuse.ko",
            &["alias=fs-fuse", "alias=devname:fuse", "alias=char-major-10-229", "depends="],
        );
        let index = build_index(d).unwrap();
        assert_eq!(
            index.dep,
            "kernel/drivers/net/tun.ko: \nkernel/fs/fuse/cuse.ko: kernel/fs/fuse/fuse.ko\nkernel/fs/fuse/fuse.ko: \n"
        );
        assert!(index.alias.contains("alias char-major-10-200 tun\n"), "{}", index.alias);
        assert!(index.alias.contains("alias fs-fuse fuse\n"), "{}", index.alias);
        // Only a module with both a device name and a number gets a static node.
        assert_eq!(index.devname, "tun net/tun c10:200\nfuse fuse c10:229\n");
        // The tree now resolves through the index it was given.
        write_text_index(d).unwrap();
        let names: Vec<String> =
            ModuleTree::open(d).unwrap().resolve(&["cuse"]).unwrap().into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["fuse", "cuse"]);
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
