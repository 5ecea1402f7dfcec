//! Kernel modules the guest needs, with their dependencies, in load order.
//!
//! Stock distro kernels build virtio, 9p and overlayfs as modules. Dependencies come from
//! `modules.dep` when the tree has one (an installed kernel) and from each module's own
//! `.modinfo` `depends=` otherwise (a freshly unpacked package, where depmod never ran).
//! Compressed modules (`.ko.xz`, `.ko.zst`, `.ko.gz`) are decompressed for the initramfs.

use crate::cache::{digest, file_identity, Cache};
use crate::kernel::{Kernel, KernelConfig};
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

    /// The names in `wanted` that are neither built in nor a module of this tree.
    pub fn missing(&self, wanted: &[&str]) -> Vec<String> {
        wanted
            .iter()
            .map(|w| w.replace('-', "_"))
            .filter(|w| !self.is_builtin(w) && !self.files.contains_key(w))
            .collect()
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

/// The kernel option of each module a guest may need (see [`for_guest`]).
pub const OPTIONS: &[(&str, &str)] = &[
    ("virtio_pci", "CONFIG_VIRTIO_PCI"),
    ("virtio_mmio", "CONFIG_VIRTIO_MMIO"),
    ("virtio_console", "CONFIG_VIRTIO_CONSOLE"),
    ("9pnet", "CONFIG_NET_9P"),
    ("9pnet_virtio", "CONFIG_NET_9P_VIRTIO"),
    ("9p", "CONFIG_9P_FS"),
    ("overlay", "CONFIG_OVERLAY_FS"),
    ("virtio_net", "CONFIG_VIRTIO_NET"),
];

/// Options no module makes up for: the kernel unpacks the initramfs and mounts devtmpfs,
/// and the agent puts a tmpfs under the overlay, before any module is loaded.
const BUILT_IN_ONLY: &[&str] = &["CONFIG_BLK_DEV_INITRD", "CONFIG_DEVTMPFS", "CONFIG_TMPFS"];

/// The option behind `module`, or the module's name when vmtest does not know one.
fn option_of(module: &str) -> String {
    OPTIONS.iter().find(|(m, _)| *m == module).map_or_else(|| format!("`{module}`"), |(_, o)| o.to_string())
}

/// What the guest loads from its initramfs, once the kernel is known to have the rest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestModules {
    pub modules: Vec<Module>,
    /// Set when nothing said which drivers the kernel has (no config, no module tree): what
    /// was looked for, to explain a boot that fails.
    pub unchecked: Option<String>,
}

/// Why a kernel lacks an option.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Why {
    /// Not set in its config.
    NotSet,
    /// Set, but not `=y`, where only built in will do.
    NotBuiltIn,
    /// `=m`, and no module tree was found.
    NoTree,
    /// Neither built in nor in the module tree at this path.
    NotInTree(PathBuf),
}

/// Check that `kernel` has the drivers in `wanted` (module names), built in or as modules,
/// and return the modules to load. A kernel that lacks some is refused before it boots, with
/// one line naming every missing `CONFIG_` option and what was checked: its config (the build
/// tree's `.config`, `config-<release>`) when there is one, its module tree's
/// `modules.builtin` and module files otherwise.
pub fn for_guest(cache: &Cache, kernel: &Kernel, wanted: &[&str]) -> Result<GuestModules> {
    // 9p and its transport need the 9P core, which a config may lack too.
    let mut names: Vec<&str> = Vec::new();
    for w in wanted {
        if matches!(*w, "9p" | "9pnet_virtio") && !names.contains(&"9pnet") {
            names.push("9pnet");
        }
        names.push(w);
    }
    let config = kernel.kconfig();
    let mut lacking: Vec<(String, Why)> = Vec::new();
    let modular: Vec<&str> = match &config {
        Some(c) => {
            for option in BUILT_IN_ONLY {
                if c.get(option) != Some("y") {
                    lacking.push((option.to_string(), Why::NotBuiltIn));
                }
            }
            names
                .into_iter()
                .filter(|m| match c.get(&option_of(m)) {
                    Some("y") => false,
                    Some("m") => true,
                    _ => {
                        lacking.push((option_of(m), Why::NotSet));
                        false
                    }
                })
                .collect()
        }
        None => names,
    };
    let mut out = GuestModules::default();
    match &kernel.modules {
        _ if modular.is_empty() => {}
        Some(dir) => {
            ensure_index(cache, dir, &kernel.release);
            if !dir.join("modules.dep").is_file() {
                tracing::warn!(
                    "{} has no modules.dep (depmod never ran there): the guest cannot load its other modules \
                     on demand; `make modules_install` runs depmod, or run `depmod -b ROOT {}`",
                    dir.display(),
                    kernel.release
                );
            }
            match resolve_cached(cache, dir, &modular) {
                Ok(m) => out.modules = m,
                Err(e) => {
                    let missing = ModuleTree::open(dir)?.missing(&modular);
                    if missing.is_empty() {
                        return Err(e);
                    }
                    lacking.extend(missing.iter().map(|m| (option_of(m), Why::NotInTree(dir.clone()))));
                }
            }
        }
        None if config.is_some() => lacking.extend(modular.iter().map(|m| (option_of(m), Why::NoTree))),
        None => {
            let options: Vec<String> = modular.iter().map(|m| option_of(m)).collect();
            out.unchecked = Some(format!(
                "vmtest could not check that kernel {} has {} before booting it: no config (looked for {}), \
                 and no module tree (looked for {})",
                kernel.image.display(),
                options.join(", "),
                paths(&kernel.config_candidates()),
                paths(&kernel.module_candidates())
            ));
        }
    }
    if lacking.is_empty() {
        Ok(out)
    } else {
        Err(lacking_error(kernel, config.as_ref(), &lacking))
    }
}

/// `a, b, c`, for messages.
fn paths(paths: &[PathBuf]) -> String {
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}

/// The one-line refusal: every missing option, why, and the fix.
fn lacking_error(kernel: &Kernel, config: Option<&KernelConfig>, lacking: &[(String, Why)]) -> Error {
    let source = config.map(|c| c.source.display().to_string()).unwrap_or_default();
    let mut groups: Vec<(&Why, Vec<&str>)> = Vec::new();
    for (option, why) in lacking {
        match groups.iter_mut().find(|(w, _)| *w == why) {
            Some((_, options)) if !options.contains(&option.as_str()) => options.push(option),
            Some(_) => {}
            None => groups.push((why, vec![option])),
        }
    }
    let mut parts = Vec::new();
    let mut fixes = Vec::new();
    for (why, options) in &groups {
        let them = if options.len() == 1 { "it" } else { "them" };
        let (reason, fix) = match why {
            Why::NotSet => (
                format!("neither built in nor a module: not set in {source}"),
                format!("enable {them} (=y or =m) and rebuild"),
            ),
            Why::NotBuiltIn => (
                format!("needed built in: not =y in {source}"),
                format!("set {them} to =y and rebuild"),
            ),
            Why::NoTree => (
                format!(
                    "=m in {source}, and no module tree was found: none given with --modules, none in {}",
                    paths(&kernel.module_candidates())
                ),
                format!(
                    "install the modules (`make modules_install INSTALL_MOD_PATH=DIR`) and pass --modules DIR, \
                     or build {them} in (=y)"
                ),
            ),
            Why::NotInTree(dir) if config.is_some() => (
                format!("=m in {source}, but not among the modules in {}", dir.display()),
                "install the modules of this build (`make modules_install`) or pass them with --modules DIR"
                    .to_owned(),
            ),
            Why::NotInTree(dir) => (
                format!("neither built in nor in its modules: checked {}", dir.display()),
                format!("enable {them} (=y or =m) and rebuild"),
            ),
        };
        parts.push(format!("{} ({reason})", options.join(", ")));
        fixes.push(fix);
    }
    Error::usage(format!(
        "kernel {} lacks {}; {}",
        kernel.image.display(),
        parts.join(", "),
        fixes.join("; ")
    ))
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

/// Make sure the module tree at `dir` has its index, so the guest can load any of its
/// modules on demand. A tree from a distro package was never passed through depmod: the
/// host's `depmod` writes the index when there is one (with the binary forms the host's
/// modprobe needs), else vmtest writes the text forms from each module's `.modinfo`, which
/// is what the agent's own loader reads. Only a tree inside the cache is written to: the
/// host's own trees are the host's business (and an installed one has its index).
///
/// A failure is only a warning: the guest then boots without on-demand modules.
pub fn ensure_index(cache: &Cache, dir: &Path, release: &str) {
    let depmod = crate::host::find_executable(Path::new("depmod"));
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

    /// A kernel at `<dir>/bzImage` (release 6.9.0) with `config` as its `.config` when given,
    /// and `modules` as its module tree.
    fn kernel(dir: &Path, config: Option<&str>, modules: Option<PathBuf>) -> Kernel {
        let config = config.map(|text| {
            let p = dir.join("config-6.9.0");
            std::fs::write(&p, text).unwrap();
            p
        });
        Kernel {
            image: dir.join("bzImage"),
            release: "6.9.0".into(),
            modules,
            origin: "--kernel",
            config,
            tree: None,
        }
    }

    /// A module tree with these modules (no dependencies) and these built in.
    fn tree(dir: &Path, modules: &[&str], builtin: &[&str]) -> PathBuf {
        let d = dir.join("lib/modules/6.9.0");
        std::fs::create_dir_all(d.join("kernel")).unwrap();
        let mut dep = String::new();
        for m in modules {
            std::fs::write(d.join(format!("kernel/{m}.ko")), b"").unwrap();
            dep.push_str(&format!("kernel/{m}.ko:\n"));
        }
        std::fs::write(d.join("modules.dep"), dep).unwrap();
        let builtin: String = builtin.iter().map(|b| format!("kernel/{b}.ko\n")).collect();
        std::fs::write(d.join("modules.builtin"), builtin).unwrap();
        d
    }

    const GUEST: &[&str] = &["virtio_mmio", "virtio_console", "9pnet_virtio", "9p", "overlay"];
    const ALL_Y: &str = "CONFIG_BLK_DEV_INITRD=y\nCONFIG_DEVTMPFS=y\nCONFIG_TMPFS=y\nCONFIG_VIRTIO_MMIO=y\n\
                         CONFIG_VIRTIO_CONSOLE=y\nCONFIG_NET_9P=y\nCONFIG_NET_9P_VIRTIO=y\nCONFIG_9P_FS=y\n\
                         CONFIG_OVERLAY_FS=y\n";

    #[test]
    fn a_config_with_everything_built_in_needs_no_modules() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::at(tmp.path().join("cache"));
        let got = for_guest(&cache, &kernel(tmp.path(), Some(ALL_Y), None), GUEST).unwrap();
        assert_eq!(got, GuestModules::default());
    }

    #[test]
    fn modular_drivers_come_from_the_tree_and_missing_ones_are_named_by_option() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::at(tmp.path().join("cache"));
        let config = ALL_Y
            .replace("CONFIG_9P_FS=y", "CONFIG_9P_FS=m")
            .replace("CONFIG_OVERLAY_FS=y", "CONFIG_OVERLAY_FS=m");
        let dir = tree(tmp.path(), &["9p", "overlay"], &[]);
        let got = for_guest(&cache, &kernel(tmp.path(), Some(&config), Some(dir.clone())), GUEST).unwrap();
        let names: Vec<&str> = got.modules.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["9p", "overlay"]);
        // The same kernel without its module tree.
        let e = for_guest(&cache, &kernel(tmp.path(), Some(&config), None), GUEST).unwrap_err();
        assert_eq!(e.kind(), vmtest_core::ErrorKind::Usage);
        let m = e.message();
        assert!(m.starts_with("kernel "), "{m}");
        assert!(m.contains("lacks CONFIG_9P_FS, CONFIG_OVERLAY_FS (=m in "), "{m}");
        assert!(
            m.contains("no module tree was found: none given with --modules, none in /lib/modules/6.9.0"),
            "{m}"
        );
        assert!(m.contains("pass --modules DIR"), "{m}");
        assert!(!m.contains('\n'), "one line: {m}");
        // A module the tree does not have.
        std::fs::remove_file(dir.join("kernel/overlay.ko")).unwrap();
        std::fs::write(dir.join("modules.dep"), "kernel/9p.ko:\n").unwrap();
        let e = for_guest(&cache, &kernel(tmp.path(), Some(&config), Some(dir.clone())), GUEST).unwrap_err();
        assert!(
            e.message().contains(&format!(
                "lacks CONFIG_OVERLAY_FS (=m in {}",
                tmp.path().join("config-6.9.0").display()
            )),
            "{e}"
        );
        assert!(e.message().contains(&format!("but not among the modules in {}", dir.display())), "{e}");
    }

    #[test]
    fn options_not_set_are_named_with_the_config_that_says_so() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::at(tmp.path().join("cache"));
        let config = ALL_Y
            .replace("CONFIG_NET_9P=y", "# CONFIG_NET_9P is not set")
            .replace("CONFIG_NET_9P_VIRTIO=y\n", "")
            .replace("CONFIG_9P_FS=y\n", "")
            .replace("CONFIG_DEVTMPFS=y", "CONFIG_DEVTMPFS=m");
        let e = for_guest(&cache, &kernel(tmp.path(), Some(&config), None), GUEST).unwrap_err();
        let source = tmp.path().join("config-6.9.0");
        assert_eq!(
            e.message(),
            format!(
                "kernel {} lacks CONFIG_DEVTMPFS (needed built in: not =y in {src}), CONFIG_NET_9P, \
                 CONFIG_NET_9P_VIRTIO, CONFIG_9P_FS (neither built in nor a module: not set in {src}); set it to \
                 =y and rebuild; enable them (=y or =m) and rebuild",
                tmp.path().join("bzImage").display(),
                src = source.display()
            )
        );
    }

    #[test]
    fn without_a_config_the_tree_says_what_is_built_in() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::at(tmp.path().join("cache"));
        let dir =
            tree(tmp.path(), &["9pnet", "9pnet_virtio", "9p"], &["virtio_mmio", "virtio_console", "overlay"]);
        let got = for_guest(&cache, &kernel(tmp.path(), None, Some(dir.clone())), GUEST).unwrap();
        let names: Vec<&str> = got.modules.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["9pnet", "9pnet_virtio", "9p"]);
        let dir = tree(&tmp.path().join("b"), &["9pnet", "9p"], &["virtio_mmio", "virtio_console"]);
        let e = for_guest(&cache, &kernel(tmp.path(), None, Some(dir.clone())), GUEST).unwrap_err();
        assert_eq!(
            e.message().split(" lacks ").nth(1).unwrap(),
            format!(
                "CONFIG_NET_9P_VIRTIO, CONFIG_OVERLAY_FS (neither built in nor in its modules: checked {}); enable \
                 them (=y or =m) and rebuild",
                dir.display()
            )
        );
        // Nothing to check with: booted as it is, and a failed boot says what was looked for.
        let got = for_guest(&cache, &kernel(tmp.path(), None, None), GUEST).unwrap();
        assert!(got.modules.is_empty());
        let why = got.unchecked.unwrap();
        assert!(why.contains("could not check that kernel") && why.contains("CONFIG_OVERLAY_FS"), "{why}");
        assert!(why.contains("no config (looked for") && why.contains("/boot/config-6.9.0"), "{why}");
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
