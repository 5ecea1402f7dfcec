//! Image mode, building: a declarative spec (TOML) -> a bootable Debian qcow2 in a
//! content-addressed cache.
//!
//! `debootstrap` fills a directory (no loop mounts: `mkfs.ext4 -d` makes the filesystem from
//! it, `qemu-img convert` makes the qcow2). The image's kernel and the few modules vmtest's
//! initramfs needs (virtio, ext4) are copied beside the qcow2, so a boot never opens the
//! image on the host. Layout under `<cache>/images/`:
//! - `<key>/base.qcow2`, `<key>/boot/vmlinuz-<rel>`, `<key>/lib/modules/<rel>/...`,
//!   `<key>/image.json` (name, spec, build time, sizes);
//! - `names/<name>`: the key the name points at (a rebuild with another spec moves the name);
//! - `.build-<pid>-*`: a build in progress (gc removes those of dead builders).
//!
//! The key is a digest of the spec (everything but its name, file contents included) and the
//! tool version, so a second build of the same spec is a cache hit.

use crate::cache::{digest, Cache};
use crate::modules::ModuleTree;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;
use vmtest_core::{Error, Result};

/// Bumped when the build recipe changes in a way that changes images.
const RECIPE: &str = "image-recipe-1";

/// Packages every image gets: a kernel to boot and systemd as its init.
pub const BASE_PACKAGES: &[&str] = &["linux-image-amd64", "systemd-sysv", "udev"];

/// Modules copied out of the image for vmtest's initramfs (both machine types).
pub(crate) const BOOT_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_pci",
    "virtio_console",
    "virtio_blk",
    "virtio_net",
    "ext4",
    "crc32c_generic",
    "overlay",
];

/// What an image holds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    /// The name tests use (`image = "NAME"`, `--image NAME`).
    pub name: String,
    /// The Debian release (debootstrap suite).
    #[serde(default = "default_release")]
    pub release: String,
    /// The Debian mirror debootstrap and apt fetch from.
    #[serde(default = "default_mirror")]
    pub mirror: String,
    /// The debootstrap variant.
    #[serde(default = "default_variant")]
    pub variant: String,
    /// Packages on top of [`BASE_PACKAGES`].
    #[serde(default)]
    pub packages: Vec<String>,
    /// The filesystem size (mkfs.ext4 syntax, e.g. `2G`).
    #[serde(default = "default_size")]
    pub size: String,
    /// Files to write into the image.
    #[serde(default)]
    pub files: Vec<ImageFile>,
    /// Shell commands run in the image (chroot) after the files are written.
    #[serde(default)]
    pub commands: Vec<String>,
}

/// A file an image spec writes into the image.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImageFile {
    /// Absolute path in the image.
    pub path: String,
    /// The content, inline.
    #[serde(default)]
    pub content: Option<String>,
    /// Or a host file, relative to the spec file.
    #[serde(default)]
    pub source: Option<PathBuf>,
    /// Octal mode, default `0644`.
    #[serde(default)]
    pub mode: Option<String>,
}

fn default_release() -> String {
    "bookworm".into()
}
fn default_mirror() -> String {
    "http://deb.debian.org/debian".into()
}
fn default_variant() -> String {
    "minbase".into()
}
fn default_size() -> String {
    "2G".into()
}

/// A parsed spec and the bytes of the files it names.
#[derive(Clone, Debug)]
pub struct LoadedSpec {
    /// The spec as written.
    pub spec: ImageSpec,
    /// `(path in image, bytes, mode)`.
    pub files: Vec<(String, Vec<u8>, u32)>,
}

impl LoadedSpec {
    /// Read the spec file at `path` (its `source` files are relative to it).
    pub fn from_file(path: &Path) -> Result<LoadedSpec> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::usage(format!("cannot read image spec {}: {e}", path.display())))?;
        LoadedSpec::parse(&text, path.parent().unwrap_or(Path::new(".")), &path.display().to_string())
    }

    /// Parse the spec `text`, reading `source` files relative to `base`; `what` names the
    /// spec in error messages.
    pub fn parse(text: &str, base: &Path, what: &str) -> Result<LoadedSpec> {
        let spec: ImageSpec =
            toml::from_str(text).map_err(|e| Error::usage(format!("{what}: bad image spec: {e}")))?;
        if spec.name.is_empty()
            || !spec.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            || spec.name.starts_with('.')
        {
            return Err(Error::usage(format!(
                "{what}: image name `{}` must be letters, digits, `-`, `_` or `.`",
                spec.name
            )));
        }
        let mut files = Vec::new();
        for f in &spec.files {
            if !f.path.starts_with('/') {
                return Err(Error::usage(format!("{what}: file path `{}` must be absolute", f.path)));
            }
            let bytes = match (&f.content, &f.source) {
                (Some(c), None) => c.clone().into_bytes(),
                (None, Some(src)) => {
                    let p = base.join(src);
                    std::fs::read(&p)
                        .map_err(|e| Error::usage(format!("{what}: cannot read {}: {e}", p.display())))?
                }
                _ => {
                    return Err(Error::usage(format!(
                        "{what}: file `{}` needs exactly one of `content` or `source`",
                        f.path
                    )))
                }
            };
            let mode = match &f.mode {
                None => 0o644,
                Some(m) => u32::from_str_radix(m.trim_start_matches("0o"), 8)
                    .map_err(|_| Error::usage(format!("{what}: bad mode `{m}` for {}", f.path)))?,
            };
            files.push((f.path.clone(), bytes, mode));
        }
        Ok(LoadedSpec { spec, files })
    }

    /// The content key: the spec without its name, the files' bytes, the tool version.
    pub fn key(&self) -> String {
        let mut s = self.spec.clone();
        s.name.clear();
        let json = serde_json::to_vec(&s).unwrap_or_default();
        let mut parts: Vec<&[u8]> = vec![RECIPE.as_bytes(), env!("CARGO_PKG_VERSION").as_bytes(), &json];
        for (_, bytes, _) in &self.files {
            parts.push(bytes);
        }
        digest(parts)
    }
}

/// A built image in the cache.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct ImageInfo {
    /// The name it was found by.
    pub name: String,
    /// The content key ([`LoadedSpec::key`]): its directory in the store.
    pub key: String,
    /// The Debian release.
    pub release: String,
    /// The release of the kernel it boots.
    pub kernel_release: String,
    /// How long the build took.
    pub build_secs: f64,
    /// Bytes of base.qcow2.
    pub qcow2_bytes: u64,
    /// When it was built (Unix seconds).
    pub built_unix: u64,
    /// The spec it was built from.
    pub spec: ImageSpec,
}

/// The image store in a cache.
pub struct ImageStore {
    root: PathBuf,
}

/// One image ready to boot.
#[derive(Clone, Debug)]
pub struct Image {
    /// Its directory in the store.
    pub dir: PathBuf,
    /// What it is and how it was built.
    pub info: ImageInfo,
}

impl Image {
    /// The base disk every guest of the image gets an overlay on.
    pub fn base(&self) -> PathBuf {
        self.dir.join("base.qcow2")
    }

    pub(crate) fn kernel_image(&self) -> PathBuf {
        self.dir.join("boot").join(format!("vmlinuz-{}", self.info.kernel_release))
    }
}

impl ImageStore {
    /// The store in `cache` (created if missing).
    pub fn new(cache: &Cache) -> Result<ImageStore> {
        let root = cache.dir("images")?;
        std::fs::create_dir_all(root.join("names"))
            .map_err(|e| Error::io(format!("cannot create {}", root.display()), e))?;
        Ok(ImageStore { root })
    }

    /// Its directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn load(&self, key: &str) -> Option<Image> {
        let dir = self.root.join(key);
        let info: ImageInfo = serde_json::from_slice(&std::fs::read(dir.join("image.json")).ok()?).ok()?;
        dir.join("base.qcow2").is_file().then_some(Image { dir, info })
    }

    /// The image a name points at.
    pub fn find(&self, name: &str) -> Result<Image> {
        let key = std::fs::read_to_string(self.root.join("names").join(name)).unwrap_or_default();
        let key = key.trim();
        if !key.is_empty() {
            if let Some(mut img) = self.load(key) {
                img.info.name = name.to_owned();
                return Ok(img);
            }
        }
        let known: Vec<String> = self.list().into_iter().map(|i| i.info.name).collect();
        Err(Error::usage(format!(
            "no image named `{name}` in {} (built: {}); build it with `vmtest image build SPEC.toml`",
            self.root.display(),
            if known.is_empty() { "none".to_owned() } else { known.join(", ") }
        )))
    }

    /// Every named image.
    pub fn list(&self) -> Vec<Image> {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.root.join("names")) else { return out };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let key = std::fs::read_to_string(e.path()).unwrap_or_default();
            if let Some(mut img) = self.load(key.trim()) {
                img.info.name = name;
                out.push(img);
            }
        }
        out.sort_by(|a, b| a.info.name.cmp(&b.info.name));
        out
    }

    /// Forget a name; its image goes at the next `gc` when no other name uses it.
    pub fn remove(&self, name: &str) -> Result<()> {
        self.find(name)?;
        let p = self.root.join("names").join(name);
        std::fs::remove_file(&p).map_err(|e| Error::io(format!("cannot remove {}", p.display()), e))?;
        self.gc().map(|_| ())
    }

    /// Remove images no name points at and builds whose builder died. Returns what went.
    pub fn gc(&self) -> Result<Vec<PathBuf>> {
        let used: std::collections::HashSet<String> = self.list().into_iter().map(|i| i.info.key).collect();
        let mut removed = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.root) else { return Ok(removed) };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            let stale = if let Some(rest) = name.strip_prefix(".build-") {
                let pid: u32 = rest.split('-').next().and_then(|p| p.parse().ok()).unwrap_or(0);
                // SAFETY: kill with signal 0 only checks for existence.
                pid == 0 || unsafe { libc::kill(pid as i32, 0) } != 0
            } else {
                name != "names" && !name.ends_with(".lock") && !used.contains(&name)
            };
            if stale && path.is_dir() {
                std::fs::remove_dir_all(&path)
                    .map_err(|e| Error::io(format!("cannot remove {}", path.display()), e))?;
                removed.push(path);
            }
        }
        Ok(removed)
    }

    /// Build the image of `spec` unless the cache has it; point its name at it.
    /// `progress` gets one line per step (and debootstrap's own lines).
    pub fn build(&self, spec: &LoadedSpec, progress: &dyn Fn(&str)) -> Result<(Image, bool)> {
        let key = spec.key();
        let lock = lock_file(&self.root.join(format!("{key}.lock")))?;
        let hit = self.load(&key);
        let result = match hit {
            Some(img) => Ok((img, true)),
            None => self.build_new(spec, &key, progress).map(|img| (img, false)),
        };
        drop(lock);
        let (img, hit) = result?;
        Cache::write_atomic(&self.root.join("names").join(&spec.spec.name), key.as_bytes())?;
        let mut img = img;
        img.info.name = spec.spec.name.clone();
        Ok((img, hit))
    }

    fn build_new(&self, loaded: &LoadedSpec, key: &str, progress: &dyn Fn(&str)) -> Result<Image> {
        let spec = &loaded.spec;
        let t0 = Instant::now();
        for tool in ["debootstrap", "mkfs.ext4", "qemu-img"] {
            if crate::host::find_executable(Path::new(tool)).is_none()
                && !Path::new("/usr/sbin").join(tool).is_file()
            {
                return Err(Error::preflight(format!(
                    "`{tool}` is needed to build images; apt-get install debootstrap e2fsprogs qemu-utils"
                )));
            }
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(Error::preflight(
                "building an image runs debootstrap, which needs root; run `vmtest image build` as root (CI does)",
            ));
        }
        let work = self.root.join(format!(".build-{}-{key}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        let rootfs = work.join("rootfs");
        std::fs::create_dir_all(&rootfs)
            .map_err(|e| Error::io(format!("cannot create {}", work.display()), e))?;
        let cleanup = Cleanup(work.clone());

        let mut packages: Vec<String> = BASE_PACKAGES.iter().map(|s| s.to_string()).collect();
        packages.extend(spec.packages.iter().cloned());
        progress(&format!(
            "debootstrap {} ({} variant) with {}",
            spec.release,
            spec.variant,
            packages.join(",")
        ));
        let mut cmd = Command::new("debootstrap");
        cmd.arg(format!("--variant={}", spec.variant))
            .arg(format!("--include={}", packages.join(",")))
            .arg(&spec.release)
            .arg(&rootfs)
            .arg(&spec.mirror)
            .env("DEBIAN_FRONTEND", "noninteractive");
        run_streamed(cmd, "debootstrap", progress)?;

        progress("configuring the image");
        configure(&rootfs)?;
        for (path, bytes, mode) in &loaded.files {
            let dest = rootfs.join(path.trim_start_matches('/'));
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| Error::io(format!("cannot create {}", parent.display()), e))?;
            }
            std::fs::write(&dest, bytes)
                .map_err(|e| Error::io(format!("cannot write {}", dest.display()), e))?;
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(*mode));
        }
        for c in &spec.commands {
            progress(&format!("running in the image: {c}"));
            let mut cmd = Command::new("chroot");
            cmd.arg(&rootfs).args(["/bin/sh", "-ec", c]).env("DEBIAN_FRONTEND", "noninteractive");
            run_streamed(cmd, "image command", progress)?;
        }
        // No apt lists or package cache in the image: smaller, and nothing to go stale.
        for d in ["var/cache/apt/archives", "var/lib/apt/lists"] {
            clear_dir_files(&rootfs.join(d));
        }

        progress("copying the kernel and boot modules out");
        let kernel_release = copy_kernel(&rootfs, &work)?;

        progress(&format!("making the ext4 filesystem ({})", spec.size));
        let raw = work.join("root.raw");
        let mut mkfs = Command::new("mkfs.ext4");
        mkfs.args(["-q", "-F", "-L", "vmtest-root", "-E", "lazy_itable_init=1,lazy_journal_init=1", "-d"])
            .arg(&rootfs)
            .arg(&raw)
            .arg(&spec.size);
        run_streamed(mkfs, "mkfs.ext4", progress)?;
        let _ = std::fs::remove_dir_all(&rootfs);
        progress("converting to qcow2");
        let mut conv = Command::new("qemu-img");
        conv.args(["convert", "-O", "qcow2"]).arg(&raw).arg(work.join("base.qcow2"));
        run_streamed(conv, "qemu-img convert", progress)?;
        let _ = std::fs::remove_file(&raw);
        // The base is never written: read-only on disk as well.
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(work.join("base.qcow2"), std::fs::Permissions::from_mode(0o444));

        let qcow2_bytes = std::fs::metadata(work.join("base.qcow2")).map(|m| m.len()).unwrap_or(0);
        let info = ImageInfo {
            name: spec.name.clone(),
            key: key.to_owned(),
            release: spec.release.clone(),
            kernel_release,
            build_secs: t0.elapsed().as_secs_f64(),
            qcow2_bytes,
            built_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            spec: spec.clone(),
        };
        let json = serde_json::to_vec_pretty(&info).unwrap_or_default();
        Cache::write_atomic(&work.join("image.json"), &json)?;
        let dest = self.root.join(key);
        let _ = std::fs::remove_dir_all(&dest);
        std::fs::rename(&work, &dest)
            .map_err(|e| Error::io(format!("cannot move the build to {}", dest.display()), e))?;
        std::mem::forget(cleanup);
        progress(&format!(
            "built {} in {:.0}s: {} ({:.0} MiB)",
            spec.name,
            info.build_secs,
            dest.join("base.qcow2").display(),
            qcow2_bytes as f64 / (1 << 20) as f64
        ));
        Ok(Image { dir: dest, info })
    }
}

/// Removes a failed build's directory.
struct Cleanup(PathBuf);
impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An exclusive lock held while the returned file is open.
fn lock_file(path: &Path) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
    // SAFETY: a valid fd.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(Error::io(format!("cannot lock {}", path.display()), std::io::Error::last_os_error()));
    }
    Ok(f)
}

/// Run a command, passing each output line to `progress`; on failure, the last lines.
fn run_streamed(mut cmd: Command, what: &str, progress: &dyn Fn(&str)) -> Result<()> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| Error::preflight(format!("cannot run {what}: {e}")))?;
    let stderr = child.stderr.take();
    let err_lines = std::thread::spawn(move || {
        stderr
            .map(|s| BufReader::new(s).lines().map_while(|l| l.ok()).collect::<Vec<_>>())
            .unwrap_or_default()
    });
    let mut tail: Vec<String> = Vec::new();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
            progress(&format!("  {what}: {line}"));
            tail.push(line);
            if tail.len() > 30 {
                tail.remove(0);
            }
        }
    }
    let status = child.wait().map_err(|e| Error::infra(format!("{what}: {e}")))?;
    let errs = err_lines.join().unwrap_or_default();
    if !status.success() {
        let mut detail = tail.join("\n");
        detail.push('\n');
        detail.push_str(&errs.join("\n"));
        return Err(Error::infra(format!("{what} failed ({status})")).with_detail(detail));
    }
    Ok(())
}

/// What every image needs to boot under vmtest: no fstab entries to wait for, a hostname,
/// a root that can log in on the serial console (autologin is set up at boot, per VM).
fn configure(rootfs: &Path) -> Result<()> {
    let write = |rel: &str, content: &str| -> Result<()> {
        let p = rootfs.join(rel);
        if let Some(parent) = p.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        std::fs::write(&p, content).map_err(|e| Error::io(format!("cannot write {}", p.display()), e))
    };
    write("etc/fstab", "# the root is mounted by vmtest's initramfs\n")?;
    write("etc/hostname", "vmtest\n")?;
    // Units that only cost boot time in a throwaway test VM.
    for unit in [
        "apt-daily.timer",
        "apt-daily-upgrade.timer",
        "man-db.timer",
        "dpkg-db-backup.timer",
        "e2scrub_all.timer",
        "fstrim.timer",
        "systemd-timesyncd.service",
    ] {
        let link = rootfs.join("etc/systemd/system").join(unit);
        let _ = std::fs::remove_file(&link);
        let _ = std::os::unix::fs::symlink("/dev/null", &link);
    }
    Ok(())
}

fn clear_dir_files(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_file()).unwrap_or(false) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Copy the image's newest kernel, its config and the boot modules into `work`. Returns the
/// kernel release.
fn copy_kernel(rootfs: &Path, work: &Path) -> Result<String> {
    let boot = rootfs.join("boot");
    let mut kernels: Vec<String> = std::fs::read_dir(&boot)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().strip_prefix("vmlinuz-").map(str::to_owned))
        .collect();
    kernels.sort_by(|a, b| crate::kernel::version_cmp(b, a));
    let release = kernels.into_iter().next().ok_or_else(|| {
        Error::usage("the image has no /boot/vmlinuz-*: keep linux-image-amd64 in it".to_owned())
    })?;
    let copy = |from: &Path, to: &Path| -> Result<()> {
        if let Some(parent) = to.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        std::fs::copy(from, to)
            .map(|_| ())
            .map_err(|e| Error::io(format!("cannot copy {}", from.display()), e))
    };
    for f in [format!("vmlinuz-{release}"), format!("config-{release}")] {
        if boot.join(&f).is_file() {
            copy(&boot.join(&f), &work.join("boot").join(&f))?;
        }
    }
    let mods = rootfs.join("lib/modules").join(&release);
    let tree = ModuleTree::open(&mods)?;
    let wanted: Vec<&str> = BOOT_MODULES.iter().copied().filter(|m| !tree.is_builtin(m)).collect();
    let dest = work.join("lib/modules").join(&release);
    for m in tree.resolve(&wanted)? {
        let rel = m.path.strip_prefix(&mods).unwrap_or(&m.path);
        copy(&m.path, &dest.join(rel))?;
    }
    for f in ["modules.dep", "modules.builtin", "modules.order"] {
        if mods.join(f).is_file() {
            copy(&mods.join(f), &dest.join(f))?;
        }
    }
    Ok(release)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ignores_the_name_and_follows_content() {
        let a = LoadedSpec::parse("name = \"a\"\npackages = [\"curl\"]\n", Path::new("."), "t").unwrap();
        let b = LoadedSpec::parse("name = \"b\"\npackages = [\"curl\"]\n", Path::new("."), "t").unwrap();
        let c = LoadedSpec::parse("name = \"a\"\npackages = [\"wget\"]\n", Path::new("."), "t").unwrap();
        assert_eq!(a.key(), b.key());
        assert_ne!(a.key(), c.key());
        let f1 = LoadedSpec::parse(
            "name = \"a\"\n[[files]]\npath = \"/x\"\ncontent = \"1\"\nmode = \"0755\"\n",
            Path::new("."),
            "t",
        )
        .unwrap();
        let f2 = LoadedSpec::parse(
            "name = \"a\"\n[[files]]\npath = \"/x\"\ncontent = \"2\"\n",
            Path::new("."),
            "t",
        )
        .unwrap();
        assert_ne!(f1.key(), f2.key());
        assert_eq!(f1.files[0].2, 0o755);
        assert_eq!(a.spec.release, "bookworm");
    }

    #[test]
    fn bad_specs_are_usage_errors() {
        for bad in [
            "name = \"../x\"\n",
            "name = \"a\"\nbogus = 1\n",
            "name = \"a\"\n[[files]]\npath = \"rel\"\ncontent = \"\"\n",
            "name = \"a\"\n[[files]]\npath = \"/x\"\n",
        ] {
            let e = LoadedSpec::parse(bad, Path::new("."), "t").unwrap_err();
            assert_eq!(e.kind(), vmtest_core::ErrorKind::Usage, "{bad}");
        }
    }

    #[test]
    fn store_lists_removes_and_collects() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::new(&Cache::at(tmp.path())).unwrap();
        let spec = LoadedSpec::parse("name = \"web\"\n", Path::new("."), "t").unwrap();
        let key = spec.key();
        let dir = store.root().join(&key);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("base.qcow2"), b"q").unwrap();
        let info = ImageInfo {
            name: "web".into(),
            key: key.clone(),
            release: "bookworm".into(),
            kernel_release: "6.1.0-1-amd64".into(),
            build_secs: 1.0,
            qcow2_bytes: 1,
            built_unix: 0,
            spec: spec.spec.clone(),
        };
        std::fs::write(dir.join("image.json"), serde_json::to_vec(&info).unwrap()).unwrap();
        // Built but unnamed: gc removes it. Named: a build of the same spec is a hit.
        std::fs::write(store.root().join("names/web"), &key).unwrap();
        let (img, hit) = store.build(&spec, &|_| {}).unwrap();
        assert!(hit);
        assert_eq!(img.info.name, "web");
        assert_eq!(store.list().len(), 1);
        std::fs::create_dir_all(store.root().join(".build-0-dead")).unwrap();
        let gone = store.gc().unwrap();
        assert_eq!(gone.len(), 1, "{gone:?}");
        assert!(dir.is_dir());
        store.remove("web").unwrap();
        assert!(!dir.exists());
        assert!(store.find("web").unwrap_err().message().contains("vmtest image build"));
    }
}
