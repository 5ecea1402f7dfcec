//! QEMU from the distro's own packages, for hosts without one: `qemu-system-x86` and the
//! libraries it needs that the host lacks, downloaded with `apt-get download` and unpacked
//! with `dpkg-deb -x` into the cache, without root. A small wrapper in the cache runs the
//! unpacked binary with its library path, module dir and firmware dirs, so every part of
//! vmtest (and a user, through `VMTEST_QEMU`) runs it like any other QEMU.
//!
//! When the host's package lists are missing or stale (no root to refresh them), a private
//! apt state in the cache is refreshed instead (`apt-get update` with `Dir::State` set).

use crate::cache::Cache;
use std::path::{Path, PathBuf};
use std::process::Command;
use vmtest_core::{Error, Result};

/// The package that holds `qemu-system-x86_64`.
pub const PACKAGE: &str = "qemu-system-x86";
/// The name of the wrapper in a fetched QEMU's directory.
pub const BINARY: &str = "qemu-system-x86_64";
/// Where Debian's QEMU keeps its loadable modules (TCG itself is one) and firmware.
const LIB_DIRS: &[&str] = &["usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu"];
const MODULE_DIR: &str = "usr/lib/x86_64-linux-gnu/qemu";
const FIRMWARE_DIRS: &[&str] = &["usr/share/qemu", "usr/share/seabios", "usr/lib/ipxe/qemu"];

/// A QEMU unpacked in the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchedQemu {
    /// The wrapper to run.
    pub binary: PathBuf,
    /// The package version it came from.
    pub version: String,
}

/// The newest QEMU already fetched into `cache`, if any.
pub(crate) fn cached(cache: &Cache) -> Option<FetchedQemu> {
    let dir = cache.root().join("qemu");
    let mut found: Vec<FetchedQemu> = std::fs::read_dir(&dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.to_owned();
            let binary = e.path().join(BINARY);
            (!version.starts_with('.') && binary.is_file()).then_some(FetchedQemu { binary, version })
        })
        .collect();
    found.sort_by(|a, b| crate::kernel::version_cmp(&b.version, &a.version));
    found.into_iter().next()
}

/// Fetch the distro's QEMU into the cache (or return the one already there for the
/// current package version).
pub fn fetch(cache: &Cache) -> Result<FetchedQemu> {
    let root = cache.dir("qemu")?;
    // One fetch at a time per cache: concurrent first runs wait for it and share it.
    let _lock = cache.lock("qemu/.fetch.lock")?;
    let mut apt = Apt::host();
    let version = match apt.candidate_version(PACKAGE) {
        Ok(v) => v,
        Err(_) => {
            apt = Apt::private(cache)?;
            apt.candidate_version(PACKAGE)?
        }
    };
    let dir_name = version.replace([':', '/'], "_");
    let dest = root.join(&dir_name);
    if dest.join(BINARY).is_file() {
        return Ok(FetchedQemu { binary: dest.join(BINARY), version: dir_name });
    }
    tracing::warn!("no QEMU found; fetching the distro's {PACKAGE} {version} into {} (once)", root.display());
    let work = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(&root)
        .map_err(|e| Error::io(format!("cannot create a temporary dir in {}", root.display()), e))?;
    let packages = apt.missing_closure(PACKAGE)?;
    if let Err(first) = apt.download(&packages, work.path()) {
        // Stale host lists name versions the archive no longer has: refresh privately, retry.
        if apt.is_private() {
            return Err(first);
        }
        tracing::info!("apt-get download failed ({first}); retrying with fresh package lists of our own");
        apt = Apt::private(cache)?;
        let packages = apt.missing_closure(PACKAGE)?;
        apt.download(&packages, work.path())?;
    }
    let unpacked = work.path().join("root");
    for deb in std::fs::read_dir(work.path()).into_iter().flatten().flatten() {
        if deb.path().extension().is_some_and(|e| e == "deb") {
            run(Command::new("dpkg-deb").arg("-x").arg(deb.path()).arg(&unpacked), "dpkg-deb -x")?;
        }
    }
    if !unpacked.join("usr/bin").join(BINARY).is_file() {
        return Err(Error::preflight(format!("{PACKAGE} {version} holds no /usr/bin/{BINARY}")));
    }
    relink_absolute_symlinks(&unpacked, &dest.join("root"))?;
    std::fs::write(work.path().join(BINARY), wrapper(&dest.join("root")))
        .map_err(|e| Error::io("cannot write the QEMU wrapper", e))?;
    set_executable(&work.path().join(BINARY))?;
    match std::fs::rename(work.path(), &dest) {
        Ok(()) => {
            // The temporary dir is now `dest`: keep it.
            let _ = work.keep();
        }
        Err(e) if !dest.exists() => {
            return Err(Error::io(format!("cannot move QEMU into {}", dest.display()), e));
        }
        Err(_) => {}
    }
    let fetched = FetchedQemu { binary: dest.join(BINARY), version: dir_name };
    check_runs(&fetched.binary)?;
    Ok(fetched)
}

/// The wrapper: the unpacked QEMU with its own libraries, modules and firmware. `exec`
/// keeps the pid (and the parent-death signal) of the process vmtest started.
fn wrapper(root: &Path) -> String {
    let q = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', r"'\''"));
    let libs: Vec<String> = LIB_DIRS.iter().map(|d| root.join(d).display().to_string()).collect();
    let firmware: Vec<String> = FIRMWARE_DIRS.iter().map(|d| format!("-L {}", q(&root.join(d)))).collect();
    format!(
        "#!/bin/sh\n\
         # Written by vmtest: {PACKAGE} from the distro's packages, unpacked beside this file.\n\
         LD_LIBRARY_PATH={libs}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}} \\\n\
         QEMU_MODULE_DIR={modules} \\\n\
         exec {bin} {firmware} \"$@\"\n",
        libs = q(Path::new(&libs.join(":"))),
        modules = q(&root.join(MODULE_DIR)),
        bin = q(&root.join("usr/bin").join(BINARY)),
        firmware = firmware.join(" "),
    )
}

/// `qemu --version` through the wrapper: a missing library shows here, not in a run.
fn check_runs(binary: &Path) -> Result<()> {
    let out = Command::new(binary)
        .arg("--version")
        .output()
        .map_err(|e| Error::preflight(format!("cannot run the fetched QEMU {}: {e}", binary.display())))?;
    if out.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    Err(Error::preflight(format!(
        "the fetched QEMU does not run: {}; install QEMU with your package manager instead",
        said.lines().next().unwrap_or("no message")
    ))
    .with_detail(said))
}

/// Packages point some files at absolute paths of the system they install into (firmware
/// links into /usr/share/seabios, say). Unpacked elsewhere, those must point inside `final_root`,
/// where the tree will live.
fn relink_absolute_symlinks(unpacked: &Path, final_root: &Path) -> Result<()> {
    let mut stack = vec![unpacked.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else { continue };
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_symlink() {
                let Ok(target) = std::fs::read_link(&path) else { continue };
                if let Ok(inside) = target.strip_prefix("/") {
                    let _ = std::fs::remove_file(&path);
                    std::os::unix::fs::symlink(final_root.join(inside), &path)
                        .map_err(|e| Error::io(format!("cannot relink {}", path.display()), e))?;
                }
            }
        }
    }
    Ok(())
}

fn set_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| Error::io(format!("cannot make {} executable", path.display()), e))
}

/// apt, with the host's state or a private one in the cache.
struct Apt {
    /// `-o` options for a private state; empty for the host's.
    options: Vec<String>,
}

impl Apt {
    fn host() -> Self {
        Apt { options: Vec::new() }
    }

    /// A private apt state under the cache, refreshed now: the host's sources, our own lists.
    fn private(cache: &Cache) -> Result<Self> {
        let base = cache.dir("apt")?;
        for sub in ["lists/partial", "cache/archives/partial"] {
            std::fs::create_dir_all(base.join(sub))
                .map_err(|e| Error::io(format!("cannot create {}", base.join(sub).display()), e))?;
        }
        let apt = Apt {
            options: vec![
                format!("Dir::State::Lists={}", base.join("lists").display()),
                format!("Dir::Cache={}", base.join("cache").display()),
                "Debug::NoLocking=1".into(),
                // As root apt drops to `_apt` for downloads, which cannot write into our cache.
                "APT::Sandbox::User=root".into(),
            ],
        };
        tracing::info!("refreshing a private copy of the package lists in {}", base.display());
        run(apt.command("apt-get").args(["update", "-qq"]), "apt-get update (private lists)")?;
        Ok(apt)
    }

    fn is_private(&self) -> bool {
        !self.options.is_empty()
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        for o in &self.options {
            c.arg("-o").arg(o);
        }
        c
    }

    fn candidate_version(&self, package: &str) -> Result<String> {
        let show =
            run(self.command("apt-cache").args(["show", "--no-all-versions", package]), "apt-cache show")?;
        show.lines()
            .find_map(|l| l.strip_prefix("Version:"))
            .map(|v| v.trim().to_owned())
            .ok_or_else(|| Error::preflight(format!("the package lists do not know {package}")))
    }

    /// `package` and every package it needs (recursively) that the host has not installed.
    fn missing_closure(&self, package: &str) -> Result<Vec<String>> {
        let tree = run(
            self.command("apt-cache").args([
                "depends",
                "--recurse",
                "--no-recommends",
                "--no-suggests",
                "--no-conflicts",
                "--no-breaks",
                "--no-replaces",
                "--no-enhances",
                package,
            ]),
            "apt-cache depends",
        )?;
        let mut all: Vec<String> = tree
            .lines()
            .filter(|l| !l.starts_with(' ') && !l.starts_with('<'))
            .map(|l| l.trim().trim_end_matches(":any").to_owned())
            .filter(|l| !l.is_empty())
            .collect();
        all.sort();
        all.dedup();
        let installed = installed_packages(&all);
        Ok(all.into_iter().filter(|p| part_of_qemu(p) || !installed.contains(p)).collect())
    }

    fn download(&self, packages: &[String], into: &Path) -> Result<()> {
        tracing::info!("downloading {} package(s): {}", packages.len(), packages.join(" "));
        run(self.command("apt-get").arg("download").args(packages).current_dir(into), "apt-get download")
            .map(|_| ())
    }
}

/// QEMU's own packages (its modules, data and firmware) are always fetched: QEMU loads only
/// modules of its own build, so an installed `qemu-system-common` of another version would
/// not do. Libraries are taken from the host when it has them.
fn part_of_qemu(package: &str) -> bool {
    package.starts_with("qemu-") || ["seabios", "ipxe-qemu"].contains(&package)
}

/// Which of `packages` dpkg says are installed.
fn installed_packages(packages: &[String]) -> Vec<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Package}\t${db:Status-Abbrev}\n"])
        .args(packages)
        .output();
    let Ok(out) = out else { return Vec::new() };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(_, status)| status.starts_with("ii"))
        .map(|(p, _)| p.split(':').next().unwrap_or(p).to_owned())
        .collect()
}

fn run(cmd: &mut Command, what: &str) -> Result<String> {
    crate::fetch::run_tool(
        cmd,
        what,
        "fetching QEMU needs apt-get and dpkg-deb (Debian or Ubuntu); elsewhere install QEMU with \
         your package manager or set VMTEST_QEMU",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapper_runs_the_unpacked_binary_with_its_own_libraries_and_firmware() {
        let w = wrapper(Path::new("/c/qemu/7.2/root"));
        assert!(w.starts_with("#!/bin/sh\n"));
        assert!(w.contains("LD_LIBRARY_PATH='/c/qemu/7.2/root/usr/lib/x86_64-linux-gnu:/c/qemu/7.2/root/lib/x86_64-linux-gnu'"));
        assert!(w.contains("QEMU_MODULE_DIR='/c/qemu/7.2/root/usr/lib/x86_64-linux-gnu/qemu'"));
        assert!(w.contains(
            "exec '/c/qemu/7.2/root/usr/bin/qemu-system-x86_64' -L '/c/qemu/7.2/root/usr/share/qemu'"
        ));
        assert!(w.trim_end().ends_with("\"$@\""));
    }

    #[test]
    fn absolute_links_are_pointed_inside_the_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let share = tmp.path().join("u/usr/share/qemu");
        std::fs::create_dir_all(&share).unwrap();
        std::os::unix::fs::symlink("/usr/share/seabios/bios-256k.bin", share.join("bios-256k.bin")).unwrap();
        std::os::unix::fs::symlink("qboot.rom", share.join("bios-microvm.bin")).unwrap();
        relink_absolute_symlinks(&tmp.path().join("u"), Path::new("/final")).unwrap();
        assert_eq!(
            std::fs::read_link(share.join("bios-256k.bin")).unwrap(),
            Path::new("/final/usr/share/seabios/bios-256k.bin")
        );
        assert_eq!(std::fs::read_link(share.join("bios-microvm.bin")).unwrap(), Path::new("qboot.rom"));
    }
}
