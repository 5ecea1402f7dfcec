//! Finding a guest kernel and making it fast to boot.
//!
//! Order: `--kernel`, `$VMTEST_KERNEL`, the newest readable `/boot/vmlinuz-*`, the newest kernel
//! in the cache (filled by `vmtest kernel fetch`). Distro bzImages are compressed and spend
//! seconds decompressing themselves under TCG, so the ELF `vmlinux` inside is extracted once,
//! cached, and booted directly through its PVH entry point.
//!
//! A kernel from a build tree (`<tree>/arch/x86/boot/bzImage`, or `<tree>/vmlinux`) brings
//! its tree: its `.config`, its `include/config/kernel.release`, the `vmlinux` of the same
//! build (booted in place instead of an extracted copy), and the modules installed at
//! `<tree>/.vmtest-modules` (`make modules_install INSTALL_MOD_PATH=.vmtest-modules`).

use crate::cache::{digest, file_identity, Cache};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use vmtest_core::{Error, Result};

/// Where a build tree's modules are looked for by default: the `INSTALL_MOD_PATH` of
/// `make modules_install INSTALL_MOD_PATH=.vmtest-modules`, inside the tree.
pub const TREE_MODULES: &str = ".vmtest-modules";

const ELF_MAGIC: &[u8] = b"\x7fELF";

/// A kernel image and what belongs with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kernel {
    /// The image as found (bzImage or ELF).
    pub image: PathBuf,
    /// `uname -r` of the kernel, e.g. `6.1.0-56-amd64`.
    pub release: String,
    /// `.../lib/modules/<release>`, when there is one.
    pub modules: Option<PathBuf>,
    /// Where it came from, for messages: `--kernel`, `$VMTEST_KERNEL`, `/boot`, `cache`.
    pub origin: &'static str,
    /// Its build configuration (the tree's `.config`, or `config-<release>` beside it or in
    /// /boot), when found.
    pub config: Option<PathBuf>,
    /// The build tree the image belongs to, when it is `<tree>/arch/x86/boot/bzImage` or
    /// `<tree>/vmlinux` of a tree with a `.config` or `include/config/kernel.release`.
    pub tree: Option<PathBuf>,
}

impl Kernel {
    /// Describe a kernel image found at `image`.
    pub(crate) fn from_image(image: &Path, origin: &'static str) -> Result<Kernel> {
        let head = read_head(image).map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
                "; it is readable only by root: copy it somewhere readable or run `vmtest kernel fetch`"
            } else {
                ""
            };
            Error::usage(format!("cannot read kernel {} (from {origin}): {e}{hint}", image.display()))
        })?;
        let not_a_kernel = || {
            Error::usage(format!(
                "{} (from {origin}) is not a Linux kernel image (no bzImage header, no ELF version string)",
                image.display()
            ))
        };
        // Only a bzImage or an ELF boots; a name like `vmlinuz-*` says nothing of the content.
        let is_bzimage = head.len() > 0x206 && &head[0x202..0x206] == b"HdrS";
        if !is_bzimage && !head.starts_with(ELF_MAGIC) {
            return Err(not_a_kernel());
        }
        let tree = build_tree(image);
        let elf_release = || banner_release(elf_banners(image).first()?);
        let release = bzimage_version(&head)
            .map(|v| v.split(' ').next().unwrap_or_default().to_owned())
            .or_else(|| head.starts_with(ELF_MAGIC).then(elf_release).flatten())
            .or_else(|| tree.as_deref().and_then(tree_release))
            .or_else(|| release_from_name(image))
            .filter(|r| !r.is_empty())
            .ok_or_else(not_a_kernel)?;
        let mut k = Kernel { image: image.to_owned(), release, modules: None, origin, config: None, tree };
        k.modules = k.module_candidates().into_iter().find(|d| is_module_dir(d));
        k.config = k.config_candidates().into_iter().find(|p| p.is_file());
        Ok(k)
    }

    /// Where this kernel's config is looked for, in order: its build tree's `.config`,
    /// `config-<release>` beside it (an unpacked package's `boot/`), `/boot/config-<release>`.
    pub fn config_candidates(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self.tree.iter().map(|t| t.join(".config")).collect();
        files.push(self.image.with_file_name(format!("config-{}", self.release)));
        files.push(PathBuf::from(format!("/boot/config-{}", self.release)));
        files
    }

    /// True only when the kernel's config is known and does not force module signatures,
    /// so unsigned modules load.
    pub(crate) fn accepts_unsigned_modules(&self) -> bool {
        self.kconfig().is_some_and(|c| c.get("CONFIG_MODULE_SIG_FORCE") != Some("y"))
    }

    /// Its build configuration, when [`Kernel::config`] names a readable one.
    pub fn kconfig(&self) -> Option<KernelConfig> {
        let path = self.config.as_ref()?;
        Some(KernelConfig::parse(&std::fs::read_to_string(path).ok()?, path))
    }

    /// Where this kernel's modules are looked for when none are given, in order: beside an
    /// unpacked package (`root/boot/vmlinuz-R` has `root/lib/modules/R`), in its build
    /// tree's [`TREE_MODULES`], then the host's `/lib/modules/R` (where `make
    /// modules_install` puts them without `INSTALL_MOD_PATH`).
    pub fn module_candidates(&self) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        let package_root = self.image.parent().filter(|p| self.tree.is_none() && p.ends_with("boot"));
        if let Some(root) = package_root.and_then(Path::parent) {
            dirs.push(root.join("lib/modules").join(&self.release));
        }
        if let Some(tree) = &self.tree {
            dirs.push(tree.join(TREE_MODULES).join("lib/modules").join(&self.release));
        }
        dirs.push(PathBuf::from("/lib/modules").join(&self.release));
        dirs
    }

    /// Use the modules at `dir`: either an `INSTALL_MOD_PATH` (holding
    /// `lib/modules/<release>`) or a `lib/modules/<release>` directory itself. Modules built
    /// for another release are refused: the kernel would not load them.
    pub fn with_modules(mut self, dir: &Path) -> Result<Kernel> {
        let what =
            format!("modules {} for kernel {} ({})", dir.display(), self.image.display(), self.release);
        if !dir.is_dir() {
            return Err(Error::usage(format!(
                "{what}: not a directory; give the INSTALL_MOD_PATH of `make modules_install` or its \
                 lib/modules/<release>"
            )));
        }
        let installed = dir.join("lib/modules").join(&self.release);
        let tree = if is_module_dir(&installed) {
            installed
        } else if is_module_dir(dir) {
            dir.to_owned()
        } else {
            let others: Vec<String> = std::fs::read_dir(dir.join("lib/modules"))
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| is_module_dir(&e.path()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            return Err(Error::usage(if others.is_empty() {
                format!(
                    "{what}: no kernel modules there (neither lib/modules/{} nor a module tree with \
                     modules.order, modules.dep or kernel/); run `make modules_install INSTALL_MOD_PATH={}` \
                     in the kernel's tree",
                    self.release,
                    dir.display()
                )
            } else {
                format!(
                    "{what}: it holds modules for {}, not for {}; install this kernel's modules there \
                     (`make modules_install INSTALL_MOD_PATH={}`)",
                    others.join(", "),
                    self.release,
                    dir.display()
                )
            }));
        };
        if let Some((module, built_for)) = module_release(&tree).filter(|(_, r)| *r != self.release) {
            return Err(Error::usage(format!(
                "{what}: they were built for {built_for} (vermagic of {}), not for {}; give the modules \
                 of the same build",
                module.display(),
                self.release
            )));
        }
        self.modules = Some(tree);
        Ok(self)
    }
}

/// A kernel build configuration (`.config` syntax).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelConfig {
    /// The file it came from, for messages.
    pub source: PathBuf,
    values: HashMap<String, String>,
}

impl KernelConfig {
    /// Read a `.config` (`CONFIG_X=y|m|value` lines; `# CONFIG_X is not set` means unset).
    pub fn parse(text: &str, source: &Path) -> KernelConfig {
        let values = text
            .lines()
            .filter_map(|l| l.trim().split_once('='))
            .filter(|(k, _)| k.starts_with("CONFIG_"))
            .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
            .collect();
        KernelConfig { source: source.to_owned(), values }
    }

    /// `CONFIG_X`'s value (`y`, `m`, a string or number); `None` when it is not set.
    pub fn get(&self, option: &str) -> Option<&str> {
        self.values.get(option).map(String::as_str)
    }
}

/// The first 2 MiB of an image: a bzImage's header and version string are near the start.
fn read_head(image: &Path) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    std::fs::File::open(image)?.take(2 << 20).read_to_end(&mut head)?;
    Ok(head)
}

/// The build tree of `image`: `<tree>/arch/<arch>/boot/bzImage`, or `<tree>/vmlinux`, of a
/// directory that has a `.config` or an `include/config/kernel.release`.
fn build_tree(image: &Path) -> Option<PathBuf> {
    let name = image.file_name()?.to_str()?;
    let tree = match name {
        "vmlinux" => image.parent()?,
        _ if image.parent()?.ends_with("boot") && image.ancestors().nth(3)?.ends_with("arch") => {
            image.ancestors().nth(4)?
        }
        _ => return None,
    };
    let tree = if tree.as_os_str().is_empty() { Path::new(".") } else { tree };
    (tree.join(".config").is_file() || tree.join("include/config/kernel.release").is_file())
        .then(|| tree.to_owned())
}

/// `include/config/kernel.release` of a build tree.
fn tree_release(tree: &Path) -> Option<String> {
    let text = std::fs::read_to_string(tree.join("include/config/kernel.release")).ok()?;
    Some(text.trim().to_owned()).filter(|r| !r.is_empty() && !r.contains(char::is_whitespace))
}

/// `vmlinuz-<release>` or `vmlinux-<release>`.
fn release_from_name(image: &Path) -> Option<String> {
    let name = image.file_name()?.to_string_lossy();
    name.strip_prefix("vmlinuz-").or_else(|| name.strip_prefix("vmlinux-")).map(str::to_owned)
}

/// The version string of a bzImage (`6.1.0-56-amd64 (builder@host) #1 SMP ...`), from the
/// field its setup header points at.
pub fn bzimage_version(bytes: &[u8]) -> Option<String> {
    if bytes.len() <= 0x210 || &bytes[0x202..0x206] != b"HdrS" {
        return None;
    }
    let off = u16::from_le_bytes([bytes[0x20e], bytes[0x20f]]) as usize + 0x200;
    let s = bytes.get(off..(off + 512).min(bytes.len()))?;
    let end = s.iter().position(|b| *b == 0)?;
    Some(String::from_utf8_lossy(&s[..end]).into_owned())
}

/// The `Linux version ...` banners (`linux_banner`) in an ELF vmlinux's `.rodata`, read
/// from the file without loading it whole (a vmlinux with debug info is hundreds of MB).
fn elf_banners(path: &Path) -> Vec<String> {
    use object::{Object, ObjectSection};
    let Ok(file) = std::fs::File::open(path) else { return Vec::new() };
    let data = object::ReadCache::new(file);
    let Ok(elf) = object::File::parse(&data) else { return Vec::new() };
    let Some(rodata) = elf.section_by_name(".rodata").and_then(|s| s.data().ok()) else { return Vec::new() };
    const NEEDLE: &[u8] = b"Linux version ";
    let mut found = Vec::new();
    let mut at = 0;
    while let Some(i) = rodata[at..].windows(NEEDLE.len()).position(|w| w == NEEDLE) {
        let start = at + i;
        let end =
            rodata[start..].iter().position(|b| *b == 0 || *b == b'\n').map_or(rodata.len(), |e| start + e);
        found.push(String::from_utf8_lossy(&rodata[start..end]).into_owned());
        at = end;
    }
    found
}

/// `6.1.0-56-amd64` of `Linux version 6.1.0-56-amd64 (...) ...`.
fn banner_release(banner: &str) -> Option<String> {
    banner.strip_prefix("Linux version ")?.split(' ').next().map(str::to_owned)
}

/// True when a bzImage's version string and an ELF banner name the same build: the same
/// release and builder, and the same `#N` and date (`UTS_VERSION`).
fn same_build(bzimage_version: &str, banner: &str) -> bool {
    let (Some((who, uts)), Some(rest)) =
        (bzimage_version.split_once(") "), banner.strip_prefix("Linux version "))
    else {
        return false;
    };
    rest.starts_with(&format!("{who}) ")) && rest.trim_end().ends_with(uts.trim_end())
}

/// Find a kernel without fetching one. `Ok(None)`: nothing found anywhere.
pub fn locate(explicit: Option<&Path>, cache: &Cache) -> Result<Option<Kernel>> {
    if let Some(path) = explicit {
        return Kernel::from_image(path, "--kernel").map(Some);
    }
    if let Some(path) = std::env::var_os("VMTEST_KERNEL").filter(|v| !v.is_empty()) {
        return Kernel::from_image(Path::new(&path), "$VMTEST_KERNEL").map(Some);
    }
    for candidate in newest_first(Path::new("/boot")) {
        if std::fs::File::open(&candidate).is_ok() {
            return Kernel::from_image(&candidate, "/boot").map(Some);
        }
    }
    Ok(cached_kernels(cache).into_iter().next())
}

/// Kernels fetched into the cache, the default first: newest version first and, of one
/// version, the plain flavour (`-amd64`) before the others (`-cloud-amd64`, `-rt-amd64`),
/// so fetching another flavour to try it does not change what every run boots.
pub fn cached_kernels(cache: &Cache) -> Vec<Kernel> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(cache.root().join("kernels")) else { return found };
    for e in entries.flatten() {
        for image in newest_first(&e.path().join("boot")) {
            if let Ok(k) = Kernel::from_image(&image, "cache") {
                found.push(k);
            }
        }
    }
    found.sort_by(|a, b| default_first(&a.release, &b.release));
    found
}

/// Newest version first; of one version, the release with the fewest words (the plain
/// flavour) first.
fn default_first(a: &str, b: &str) -> std::cmp::Ordering {
    let numbers = |s: &str| -> (Vec<u64>, usize) {
        let words: Vec<&str> = s.split(['.', '-', '+', '_']).collect();
        let n = words.iter().take_while(|w| w.parse::<u64>().is_ok()).count();
        (words[..n].iter().map(|w| w.parse().unwrap_or(0)).collect(), words.len() - n)
    };
    let ((va, wa), (vb, wb)) = (numbers(a), numbers(b));
    vb.cmp(&va).then(wa.cmp(&wb)).then_with(|| version_cmp(b, a))
}

/// `vmlinuz-*` files in `dir`, newest version first.
fn newest_first(dir: &Path) -> Vec<PathBuf> {
    let mut images: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let version = name.strip_prefix("vmlinuz-")?.to_owned();
            Some((version, e.path()))
        })
        .collect();
    images.sort_by(|a, b| version_cmp(&b.0, &a.0));
    images.into_iter().map(|(_, p)| p).collect()
}

/// Compare kernel versions numerically where they are numbers (6.10 > 6.9).
pub(crate) fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let parts = |s: &str| -> Vec<(u64, String)> {
        s.split(['.', '-', '+', '_']).map(|p| (p.parse().unwrap_or(0), p.to_owned())).collect()
    };
    parts(a).cmp(&parts(b))
}

/// Does `dir` look like a `lib/modules/<release>` tree?
fn is_module_dir(dir: &Path) -> bool {
    dir.join("kernel").is_dir()
        || ["modules.builtin", "modules.order", "modules.dep"].iter().any(|f| dir.join(f).is_file())
}

/// The release a module tree was built for: the `vermagic` of its first module (from
/// `modules.order` or `modules.dep`), with that module's path.
fn module_release(tree: &Path) -> Option<(PathBuf, String)> {
    let first = ["modules.order", "modules.dep"].iter().find_map(|index| {
        let text = std::fs::read_to_string(tree.join(index)).ok()?;
        let line = text.lines().find(|l| !l.trim().is_empty())?;
        Some(line.split(':').next()?.trim().to_owned())
    })?;
    // modules.order names `kernel/x.ko` (or, from a build tree, `x.o` / `x.ko`); the
    // installed file may be compressed.
    let base = tree.join(first.strip_suffix(".o").map(|b| format!("{b}.ko")).unwrap_or(first));
    let path = ["", ".xz", ".zst", ".gz"]
        .iter()
        .map(|ext| PathBuf::from(format!("{}{ext}", base.display())))
        .find(|p| p.is_file())?;
    let bytes = crate::modules::read_module(&path).ok()?;
    let vermagic = crate::modules::modinfo(&bytes, "vermagic")?;
    Some((path, vermagic.split(' ').next()?.to_owned()))
}

/// What QEMU should boot: an ELF vmlinux with a PVH entry point when there is one (the
/// image itself, its build tree's `vmlinux`, or one extracted into the cache), else the
/// image itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BootImage {
    pub path: PathBuf,
    /// True for an uncompressed ELF with a PVH note whose kernel drives virtio-mmio: it boots
    /// fastest, on microvm. False: the `pc` machine with virtio-pci, which boots a bzImage or
    /// (a kernel without virtio-mmio) a PVH ELF.
    pub pvh: bool,
}

/// A file with `kernel`'s debug symbols, for gdb: the `vmlinux` of its build tree (the image
/// itself when it is that `vmlinux`), or Debian's `-dbg` package's
/// `/usr/lib/debug/boot/vmlinux-<release>`.
pub(crate) fn debug_symbols(kernel: &Kernel) -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(tree) = &kernel.tree {
        candidates.push(tree.join("vmlinux"));
    }
    if let Some(dir) = kernel.image.parent() {
        candidates.push(dir.join(format!("vmlinux-{}", kernel.release)));
    }
    candidates.push(PathBuf::from(format!("/usr/lib/debug/boot/vmlinux-{}", kernel.release)));
    candidates.push(PathBuf::from(format!("/usr/lib/debug/vmlinux-{}", kernel.release)));
    candidates.into_iter().find(|p| p.is_file())
}

/// Return the fastest bootable form of `kernel`, extracting it (once) when needed.
///
/// An ELF vmlinux boots in place (QEMU loads only its segments; a build tree's, with debug
/// info, is too large to copy at every rebuild), and so does the `vmlinux` of a bzImage's
/// build tree when it is the same build. QEMU boots an ELF only through its PVH entry point
/// (`CONFIG_PVH`): one without is refused here, before any boot. A kernel whose config has
/// no virtio-mmio (`CONFIG_VIRTIO_MMIO`, which microvm's devices need) boots on `pc`.
pub(crate) fn boot_image(kernel: &Kernel, cache: &Cache) -> Result<BootImage> {
    let head = read_head(&kernel.image)
        .map_err(|e| Error::io(format!("cannot read {}", kernel.image.display()), e))?;
    let mmio = kernel.kconfig().map_or(true, |c| c.get("CONFIG_VIRTIO_MMIO").is_some());
    if head.starts_with(ELF_MAGIC) {
        if elf_has_pvh(&kernel.image) {
            return Ok(BootImage { path: kernel.image.clone(), pvh: mmio });
        }
        return Err(Error::usage(format!(
            "kernel {} is an ELF vmlinux without a PVH entry point, and QEMU boots an uncompressed kernel \
             only through one; enable CONFIG_PVH (=y) and rebuild, or pass the bzImage (arch/x86/boot/bzImage)",
            kernel.image.display()
        )));
    }
    if !mmio {
        return Ok(BootImage { path: kernel.image.clone(), pvh: false });
    }
    if let Some(vmlinux) = same_build_vmlinux(kernel, &head) {
        return Ok(BootImage { path: vmlinux, pvh: true });
    }
    let id = file_identity(&kernel.image)
        .map_err(|e| Error::io(format!("cannot stat {}", kernel.image.display()), e))?;
    let dir = cache.dir("vmlinux")?;
    let key = digest([id.as_bytes()]);
    let elf_path = dir.join(format!("{}-{key}", kernel.release));
    let no_pvh_marker = dir.join(format!("{}-{key}.no-pvh", kernel.release));
    if elf_path.is_file() {
        return Ok(BootImage { path: elf_path, pvh: true });
    }
    if no_pvh_marker.is_file() {
        return Ok(BootImage { path: kernel.image.clone(), pvh: false });
    }
    let bytes = std::fs::read(&kernel.image)
        .map_err(|e| Error::io(format!("cannot read {}", kernel.image.display()), e))?;
    match extract_vmlinux(&bytes).filter(|e| has_pvh_note(&e[..])) {
        Some(elf) => {
            Cache::write_atomic(&elf_path, &elf)?;
            Ok(BootImage { path: elf_path, pvh: true })
        }
        None => {
            tracing::info!(
                "{} has no PVH entry point; booting the compressed image (slower)",
                kernel.image.display()
            );
            Cache::write_atomic(&no_pvh_marker, b"")?;
            Ok(BootImage { path: kernel.image.clone(), pvh: false })
        }
    }
}

/// The `vmlinux` of a bzImage's build tree, when it is the same build and boots through PVH.
fn same_build_vmlinux(kernel: &Kernel, head: &[u8]) -> Option<PathBuf> {
    let vmlinux = kernel.tree.as_ref()?.join("vmlinux");
    let version = bzimage_version(head)?;
    (elf_banners(&vmlinux).iter().any(|b| same_build(&version, b)) && elf_has_pvh(&vmlinux))
        .then_some(vmlinux)
}

/// [`has_pvh_note`] of an ELF file, reading only its headers and notes.
fn elf_has_pvh(path: &Path) -> bool {
    std::fs::File::open(path).is_ok_and(|f| has_pvh_note(&object::ReadCache::new(f)))
}

/// Find the compressed payload of a bzImage and decompress it to the ELF vmlinux.
pub fn extract_vmlinux(bz: &[u8]) -> Option<Vec<u8>> {
    const XZ: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0x00];
    const ZSTD: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
    const GZIP: &[u8] = &[0x1f, 0x8b, 0x08];
    let find = |magic: &[u8]| bz.windows(magic.len()).position(|w| w == magic);
    type Decoder = fn(&[u8]) -> Option<Vec<u8>>;
    let candidates: [(Option<usize>, Decoder); 3] = [
        (find(XZ), xz_single_stream),
        (find(ZSTD), |d| {
            let mut out = Vec::new();
            let mut dec = zstd::stream::read::Decoder::new(d).ok()?.single_frame();
            dec.read_to_end(&mut out).ok().map(|_| out)
        }),
        (find(GZIP), |d| {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(d).read_to_end(&mut out).ok().map(|_| out)
        }),
    ];
    candidates
        .iter()
        .filter_map(|(at, dec)| at.map(|a| (a, dec)))
        .filter_map(|(at, dec)| dec(&bz[at..]))
        .find(|out| out.starts_with(b"\x7fELF"))
}

/// Decode one XZ stream and ignore whatever follows it (a bzImage has trailing data, which
/// the `read` adapters treat as an error).
fn xz_single_stream(data: &[u8]) -> Option<Vec<u8>> {
    use xz2::stream::{Action, Status, Stream};
    let mut stream = Stream::new_stream_decoder(u64::MAX, 0).ok()?;
    let mut out = Vec::with_capacity(data.len() * 4);
    loop {
        if out.capacity() - out.len() < (1 << 20) {
            out.reserve(out.capacity().max(1 << 20));
        }
        let input = &data[(stream.total_in() as usize).min(data.len())..];
        let action = if input.is_empty() { Action::Finish } else { Action::Run };
        let before = (stream.total_in(), stream.total_out());
        match stream.process_vec(input, &mut out, action).ok()? {
            Status::StreamEnd => return Some(out),
            _ if (stream.total_in(), stream.total_out()) == before && input.is_empty() => return None,
            _ => {}
        }
    }
}

/// True when the ELF carries `XEN_ELFNOTE_PHYS32_ENTRY`, which QEMU needs to boot it directly.
pub fn has_pvh_note<'a, R: object::ReadRef<'a>>(elf: R) -> bool {
    use object::read::elf::{ElfFile64, FileHeader, ProgramHeader};
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
    let Ok(file) = ElfFile64::<object::Endianness, R>::parse(elf) else { return false };
    let endian = file.endian();
    let Ok(headers) = file.elf_header().program_headers(endian, elf) else { return false };
    for ph in headers {
        if let Ok(Some(mut notes)) = ph.notes(endian, elf) {
            while let Ok(Some(note)) = notes.next() {
                if note.name() == b"Xen" && note.n_type(endian) == XEN_ELFNOTE_PHYS32_ENTRY {
                    return true;
                }
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        use std::cmp::Ordering::*;
        assert_eq!(version_cmp("6.10.0-1-amd64", "6.9.0-3-amd64"), Greater);
        assert_eq!(version_cmp("6.1.0-56-amd64", "6.1.0-9-amd64"), Greater);
        assert_eq!(version_cmp("6.1.0-9-amd64", "6.1.0-9-amd64"), Equal);
    }

    /// A bzImage as far as vmtest reads one: the setup header's magic and version string.
    fn fake_bzimage(version: &str) -> Vec<u8> {
        let mut img = vec![0u8; 0x400];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x20e..0x210].copy_from_slice(&0x100u16.to_le_bytes());
        img[0x300..0x300 + version.len()].copy_from_slice(version.as_bytes());
        img
    }

    #[test]
    fn release_comes_from_the_bzimage_header() {
        let img = fake_bzimage("6.1.0-56-amd64 (debian-kernel@lists.debian.org) #1 SMP");
        assert_eq!(
            bzimage_version(&img).as_deref(),
            Some("6.1.0-56-amd64 (debian-kernel@lists.debian.org) #1 SMP")
        );
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("bz");
        std::fs::write(&p, img).unwrap();
        assert_eq!(Kernel::from_image(&p, "--kernel").unwrap().release, "6.1.0-56-amd64");
    }

    /// `<tmp>/linux`: a build tree with a bzImage of release 6.9.0-rc1+, a `.config`, its
    /// `kernel.release` and a `vmlinux` that is an ELF without a banner or a PVH note.
    fn fake_tree(tmp: &Path) -> PathBuf {
        let tree = tmp.join("linux");
        let bz = tree.join("arch/x86/boot/bzImage");
        std::fs::create_dir_all(bz.parent().unwrap()).unwrap();
        std::fs::create_dir_all(tree.join("include/config")).unwrap();
        std::fs::write(
            &bz,
            fake_bzimage("6.9.0-rc1+ (dev@box) #3 SMP PREEMPT_DYNAMIC Mon Jan  1 10:00:00 UTC 2024"),
        )
        .unwrap();
        std::fs::write(tree.join(".config"), "CONFIG_9P_FS=y\n").unwrap();
        std::fs::write(tree.join("include/config/kernel.release"), "6.9.0-rc1+\n").unwrap();
        std::fs::write(tree.join("vmlinux"), crate::modules::tests::fake_module(&[])).unwrap();
        tree
    }

    /// A module tree for `release` at `dir` whose one module says it was built for `built_for`.
    fn fake_modules(dir: &Path, built_for: &str) {
        let m = dir.join("kernel/drivers/net/dummy.ko");
        std::fs::create_dir_all(m.parent().unwrap()).unwrap();
        std::fs::write(
            &m,
            crate::modules::tests::fake_module(&[&format!("vermagic={built_for} SMP mod_unload")]),
        )
        .unwrap();
        std::fs::write(dir.join("modules.order"), "kernel/drivers/net/dummy.ko\n").unwrap();
    }

    #[test]
    fn a_build_tree_gives_the_release_config_and_modules() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = fake_tree(tmp.path());
        let installed = tree.join(".vmtest-modules/lib/modules/6.9.0-rc1+");
        fake_modules(&installed, "6.9.0-rc1+");
        let k = Kernel::from_image(&tree.join("arch/x86/boot/bzImage"), "--kernel").unwrap();
        assert_eq!(k.release, "6.9.0-rc1+");
        assert_eq!(k.tree.as_deref(), Some(tree.as_path()));
        assert_eq!(k.config, Some(tree.join(".config")));
        assert_eq!(k.modules.as_deref(), Some(installed.as_path()));
        assert_eq!(k.kconfig().unwrap().get("CONFIG_9P_FS"), Some("y"));
        // The vmlinux at the tree's root has no banner here: its release is the tree's.
        let elf = Kernel::from_image(&tree.join("vmlinux"), "--kernel").unwrap();
        assert_eq!((elf.release.as_str(), elf.tree.as_deref()), ("6.9.0-rc1+", Some(tree.as_path())));
        // Without .config or kernel.release it is just a file called vmlinux.
        std::fs::remove_file(tree.join(".config")).unwrap();
        std::fs::remove_file(tree.join("include/config/kernel.release")).unwrap();
        assert!(Kernel::from_image(&tree.join("vmlinux"), "--kernel").is_err());
    }

    #[test]
    fn an_elf_without_a_pvh_note_is_refused_before_boot() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = fake_tree(tmp.path());
        let k = Kernel::from_image(&tree.join("vmlinux"), "--kernel").unwrap();
        let e = boot_image(&k, &Cache::at(tmp.path().join("cache"))).unwrap_err();
        assert_eq!(e.kind(), vmtest_core::ErrorKind::Usage);
        assert!(
            e.message().contains("without a PVH entry point") && e.message().contains("CONFIG_PVH"),
            "{e}"
        );
    }

    #[test]
    fn modules_come_from_an_install_root_or_the_release_dir_of_the_same_build() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = fake_tree(tmp.path());
        let k = Kernel::from_image(&tree.join("arch/x86/boot/bzImage"), "--kernel").unwrap();
        assert_eq!(k.modules, None);
        let root = tmp.path().join("mods");
        let release_dir = root.join("lib/modules/6.9.0-rc1+");
        fake_modules(&release_dir, "6.9.0-rc1+");
        assert_eq!(k.clone().with_modules(&root).unwrap().modules, Some(release_dir.clone()));
        assert_eq!(k.clone().with_modules(&release_dir).unwrap().modules, Some(release_dir.clone()));
        // Another release's modules, or none, or no directory: refused with what is there.
        std::fs::rename(&release_dir, root.join("lib/modules/6.8.0")).unwrap();
        let e = k.clone().with_modules(&root).unwrap_err();
        assert!(e.message().contains("it holds modules for 6.8.0, not for 6.9.0-rc1+"), "{e}");
        let e = k.clone().with_modules(tmp.path()).unwrap_err();
        assert!(e.message().contains("no kernel modules there"), "{e}");
        let e = k.clone().with_modules(&tmp.path().join("nope")).unwrap_err();
        assert!(e.message().contains("not a directory"), "{e}");
        // The right directory name, the wrong build: the modules' vermagic tells.
        let wrong = tmp.path().join("other/lib/modules/6.9.0-rc1+");
        fake_modules(&wrong, "6.8.0");
        let e = k.with_modules(&wrong).unwrap_err();
        assert_eq!(e.kind(), vmtest_core::ErrorKind::Usage);
        assert!(e.message().contains("built for 6.8.0 (vermagic of"), "{e}");
    }

    #[test]
    fn a_bzimage_and_a_banner_of_one_build_match() {
        let bz = "6.1.0-57-amd64 (debian-kernel@lists.debian.org) #1 SMP PREEMPT_DYNAMIC Debian 6.1.192-3 (2026-11-26)";
        let banner =
            "Linux version 6.1.0-57-amd64 (debian-kernel@lists.debian.org) (gcc-12 (Debian 12.2.0-14) \
                      12.2.0, GNU ld 2.40) #1 SMP PREEMPT_DYNAMIC Debian 6.1.192-3 (2026-11-26)";
        assert!(same_build(bz, banner));
        // init/version.c's weak banner lacks the build number; another build has another.
        assert!(!same_build(bz, &banner.replace("#1 SMP", "# SMP")));
        assert!(!same_build(bz, &banner.replace("#1 SMP", "#2 SMP")));
        assert!(!same_build(bz, &banner.replace("6.1.0-57", "6.1.0-56")));
        assert_eq!(banner_release(banner).as_deref(), Some("6.1.0-57-amd64"));
    }

    #[test]
    fn config_values_and_unset_options() {
        let c = KernelConfig::parse(
            "CONFIG_A=y\nCONFIG_B=m\n# CONFIG_C is not set\nCONFIG_D=\"x\"\n",
            Path::new(".config"),
        );
        assert_eq!((c.get("CONFIG_A"), c.get("CONFIG_B"), c.get("CONFIG_C")), (Some("y"), Some("m"), None));
        assert_eq!(c.get("CONFIG_D"), Some("x"));
    }

    #[test]
    fn the_plain_flavour_of_the_newest_version_is_the_default() {
        let mut releases =
            vec!["6.1.0-56-amd64", "6.1.0-57-cloud-amd64", "6.1.0-57-amd64", "6.1.0-57-rt-amd64"];
        releases.sort_by(|a, b| default_first(a, b));
        assert_eq!(
            releases,
            ["6.1.0-57-amd64", "6.1.0-57-rt-amd64", "6.1.0-57-cloud-amd64", "6.1.0-56-amd64"]
        );
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("notakernel");
        std::fs::write(&p, b"hello").unwrap();
        let e = Kernel::from_image(&p, "--kernel").unwrap_err();
        assert!(e.message().contains("is not a Linux kernel image"), "{e}");
        // A kernel's name does not make a file a kernel.
        let named = tmp.path().join("vmlinuz-6.1.0-57-amd64");
        std::fs::write(&named, b"hello").unwrap();
        assert!(Kernel::from_image(&named, "--kernel").is_err());
        let missing = Kernel::from_image(&tmp.path().join("nope"), "--kernel").unwrap_err();
        assert!(missing.message().contains("cannot read kernel"), "{missing}");
        assert_eq!(missing.kind(), vmtest_core::ErrorKind::Usage);
    }

    #[test]
    fn xz_payload_is_found_after_a_header() {
        let elf = b"\x7fELF pretend kernel".repeat(100);
        let mut packed = Vec::new();
        xz2::read::XzEncoder::new(&elf[..], 1).read_to_end(&mut packed).unwrap();
        let mut bz = vec![0x55u8; 5000];
        bz.extend_from_slice(&packed);
        bz.extend_from_slice(&[0u8; 300]); // trailing data after the stream
        assert_eq!(extract_vmlinux(&bz).unwrap(), elf);
    }
}
