//! Finding a guest kernel and making it fast to boot.
//!
//! Order: `--kernel`, `$VMTEST_KERNEL`, the newest readable `/boot/vmlinuz-*`, the newest kernel
//! in the cache (filled by `vmtest kernel fetch`). Distro bzImages are compressed and spend
//! seconds decompressing themselves under TCG, so the ELF `vmlinux` inside is extracted once,
//! cached, and booted directly through its PVH entry point.

use crate::cache::{digest, file_identity, Cache};
use std::io::Read;
use std::path::{Path, PathBuf};
use vmtest_core::{Error, Result};

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
    /// Its build configuration (`config-<release>` beside it or in /boot), when found.
    pub config: Option<PathBuf>,
}

impl Kernel {
    /// Describe a kernel image found at `image`.
    pub(crate) fn from_image(image: &Path, origin: &'static str) -> Result<Kernel> {
        let bytes = read_head(image).map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
                "; it is readable only by root: copy it somewhere readable or run `vmtest kernel fetch`"
            } else {
                ""
            };
            Error::usage(format!("cannot read kernel {} (from {origin}): {e}{hint}", image.display()))
        })?;
        let release = release_of(&bytes, image).ok_or_else(|| {
            Error::usage(format!(
                "{} (from {origin}) is not a Linux kernel image (no bzImage header, no ELF version string)",
                image.display()
            ))
        })?;
        let modules = modules_dir_for(image, &release);
        let config = [
            image.with_file_name(format!("config-{release}")),
            PathBuf::from(format!("/boot/config-{release}")),
        ]
        .into_iter()
        .find(|p| p.is_file());
        Ok(Kernel { image: image.to_owned(), release, modules, origin, config })
    }

    /// True only when the kernel's config is known and does not force module signatures,
    /// so unsigned modules load.
    pub(crate) fn accepts_unsigned_modules(&self) -> bool {
        let Some(config) = self.config.as_ref().and_then(|c| std::fs::read_to_string(c).ok()) else {
            return false;
        };
        !config.lines().any(|l| l.trim() == "CONFIG_MODULE_SIG_FORCE=y")
    }
}

/// The first 2 MiB of a bzImage (its header and version string are near the start), or a
/// whole ELF vmlinux (its version string may be anywhere).
fn read_head(image: &Path) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    std::fs::File::open(image)?.take(2 << 20).read_to_end(&mut head)?;
    if head.starts_with(b"\x7fELF") {
        return std::fs::read(image);
    }
    Ok(head)
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

/// Kernels fetched into the cache, newest first.
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
    found.sort_by(|a, b| version_cmp(&b.release, &a.release));
    found
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

/// The kernel release string of a bzImage (header field) or an ELF vmlinux ("Linux version").
pub(crate) fn release_of(bytes: &[u8], path: &Path) -> Option<String> {
    if bytes.len() > 0x210 && &bytes[0x202..0x206] == b"HdrS" {
        let off = u16::from_le_bytes([bytes[0x20e], bytes[0x20f]]) as usize + 0x200;
        let s = bytes.get(off..off + 256)?;
        let end = s.iter().position(|b| *b == b' ' || *b == 0)?;
        return Some(String::from_utf8_lossy(&s[..end]).into_owned());
    }
    if bytes.starts_with(b"\x7fELF") {
        let needle = b"Linux version ";
        let at = bytes.windows(needle.len()).position(|w| w == needle)? + needle.len();
        let s = &bytes[at..(at + 128).min(bytes.len())];
        let end = s.iter().position(|b| *b == b' ')?;
        return Some(String::from_utf8_lossy(&s[..end]).into_owned());
    }
    // Last resort: the file name, vmlinuz-<release>.
    let name = path.file_name()?.to_string_lossy();
    name.strip_prefix("vmlinuz-").or_else(|| name.strip_prefix("vmlinux-")).map(str::to_owned)
}

/// The modules of a kernel: beside an unpacked package (`root/boot/vmlinuz-R` has
/// `root/lib/modules/R`), else the host's `/lib/modules/R`.
fn modules_dir_for(image: &Path, release: &str) -> Option<PathBuf> {
    let beside = image.parent()?.parent().map(|root| root.join("lib/modules").join(release));
    beside
        .into_iter()
        .chain([PathBuf::from("/lib/modules").join(release)])
        .find(|d| d.join("kernel").is_dir() || d.join("modules.builtin").is_file())
}

/// What QEMU should boot: the cached ELF vmlinux when the kernel has a PVH entry point,
/// else the image itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BootImage {
    pub path: PathBuf,
    /// True for an uncompressed ELF with a PVH note (fast boot; works with microvm).
    pub pvh: bool,
}

/// A file with `kernel`'s debug symbols, for gdb: the `vmlinux` of its build tree
/// (`arch/x86/boot/bzImage` -> `vmlinux`), or Debian's `-dbg` package's
/// `/usr/lib/debug/boot/vmlinux-<release>`.
pub(crate) fn debug_symbols(kernel: &Kernel) -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(tree) =
        kernel.image.ancestors().nth(4).filter(|_| kernel.image.ends_with("arch/x86/boot/bzImage"))
    {
        candidates.push(tree.join("vmlinux"));
    }
    if let Some(dir) = kernel.image.parent() {
        candidates.push(dir.join(format!("vmlinux-{}", kernel.release)));
    }
    candidates.push(PathBuf::from(format!("/usr/lib/debug/boot/vmlinux-{}", kernel.release)));
    candidates.push(PathBuf::from(format!("/usr/lib/debug/vmlinux-{}", kernel.release)));
    candidates.into_iter().find(|p| p.is_file() && *p != kernel.image)
}

/// Extract (once) and return the fastest bootable form of `kernel`.
pub(crate) fn boot_image(kernel: &Kernel, cache: &Cache) -> Result<BootImage> {
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
    let elf = if bytes.starts_with(b"\x7fELF") { Some(bytes) } else { extract_vmlinux(&bytes) };
    match elf.filter(|e| has_pvh_note(e)) {
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

/// Find the compressed payload of a bzImage and decompress it to the ELF vmlinux.
pub(crate) fn extract_vmlinux(bz: &[u8]) -> Option<Vec<u8>> {
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
pub(crate) fn has_pvh_note(elf: &[u8]) -> bool {
    use object::read::elf::{ElfFile64, FileHeader, ProgramHeader};
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
    let Ok(file) = ElfFile64::<object::Endianness>::parse(elf) else { return false };
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

    #[test]
    fn release_comes_from_the_bzimage_header() {
        let mut img = vec![0u8; 0x400];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x20e..0x210].copy_from_slice(&0x100u16.to_le_bytes());
        let version = b"6.1.0-56-amd64 (debian-kernel@lists.debian.org) #1 SMP";
        img[0x300..0x300 + version.len()].copy_from_slice(version);
        assert_eq!(release_of(&img, Path::new("x")).as_deref(), Some("6.1.0-56-amd64"));
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("notakernel");
        std::fs::write(&p, b"hello").unwrap();
        let e = Kernel::from_image(&p, "--kernel").unwrap_err();
        assert!(e.message().contains("is not a Linux kernel image"), "{e}");
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
