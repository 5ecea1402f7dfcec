//! `vmtest kernel fetch`: the distro's own kernel package, downloaded with `apt-get download`
//! and unpacked with `dpkg-deb -x` into the cache. No root needed, nothing but the distro's
//! archive contacted. On Ubuntu, where modules live in a separate package, both are fetched.

use crate::cache::Cache;
use crate::kernel::{self, Kernel};
use std::path::Path;
use std::process::Command;
use vmtest_core::{Error, Result};

/// Metapackages that name the current kernel, tried in order (Debian, Ubuntu).
const METAPACKAGES: &[&str] = &["linux-image-amd64", "linux-image-generic", "linux-image-virtual"];

fn run(cmd: &mut Command, what: &str) -> Result<String> {
    run_tool(
        cmd,
        what,
        "`vmtest kernel fetch` needs apt-get and dpkg-deb (Debian or Ubuntu), elsewhere pass --kernel PATH",
    )
}

/// Run a packaging tool (apt, dpkg) and return its stdout. A tool that cannot run says
/// `missing_hint`; one that fails says its `E:` line (apt's error) or its first line.
pub(crate) fn run_tool(cmd: &mut Command, what: &str, missing_hint: &str) -> Result<String> {
    let out =
        cmd.output().map_err(|e| Error::preflight(format!("cannot run {what}: {e}; {missing_hint}")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let first =
            stderr.lines().find(|l| l.starts_with("E:")).or_else(|| stderr.lines().next()).unwrap_or("");
        return Err(
            Error::preflight(format!("{what} failed: {}", first.trim())).with_detail(stderr.into_owned())
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// True for a package of one kernel release (`linux-image-6.1.0-57-cloud-amd64`,
/// `linux-image-unsigned-6.8.0-31-generic`), false for a metapackage that names the current
/// one of a flavour (`linux-image-cloud-amd64`, `linux-image-generic-hwe-24.04`).
fn is_concrete(package: &str) -> bool {
    package
        .strip_prefix("linux-image-")
        .map(|rest| rest.strip_prefix("unsigned-").unwrap_or(rest))
        .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
}

/// The concrete `linux-image-<release>` package a metapackage depends on.
pub(crate) fn resolve_package(requested: Option<&str>) -> Result<String> {
    if let Some(p) = requested.filter(|p| is_concrete(p)) {
        return Ok(p.to_owned());
    }
    let metas: Vec<&str> = match requested {
        Some(p) => vec![p],
        None => METAPACKAGES.to_vec(),
    };
    for meta in &metas {
        let Ok(show) =
            run(Command::new("apt-cache").args(["show", "--no-all-versions", meta]), "apt-cache show")
        else {
            continue;
        };
        let depends = show.lines().find_map(|l| l.strip_prefix("Depends:")).unwrap_or("");
        let pkg =
            depends.split(',').map(|d| d.split_whitespace().next().unwrap_or("")).find(|d| is_concrete(d));
        if let Some(pkg) = pkg {
            return Ok(pkg.to_owned());
        }
    }
    Err(Error::preflight(format!(
        "no kernel package found (looked up {}); run `apt-get update` first, or pass --kernel PATH",
        metas.join(", ")
    )))
}

/// Download and unpack `package` (a concrete or meta package; default: the distro's current
/// kernel) into the cache. Returns the kernel, already there or newly fetched.
pub fn fetch(cache: &Cache, requested: Option<&str>) -> Result<Kernel> {
    let package = resolve_package(requested)?;
    let release = package
        .trim_start_matches("linux-image-")
        .trim_start_matches("unsigned-")
        .trim_end_matches("-unsigned")
        .to_owned();
    let kernels = cache.dir("kernels")?;
    let dest = kernels.join(&release);
    if let Some(k) = find_image(&dest) {
        return Ok(k);
    }
    let work = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(&kernels)
        .map_err(|e| Error::io(format!("cannot create a temporary dir in {}", kernels.display()), e))?;
    let mut packages = vec![package.clone()];
    let modules_pkg = format!("linux-modules-{release}");
    if run(Command::new("apt-cache").args(["show", "--no-all-versions", &modules_pkg]), "apt-cache show")
        .is_ok()
    {
        packages.push(modules_pkg);
    }
    tracing::info!("downloading {}", packages.join(" "));
    run(
        Command::new("apt-get").arg("download").args(&packages).current_dir(work.path()),
        "apt-get download",
    )?;
    let root = work.path().join("root");
    for deb in std::fs::read_dir(work.path()).into_iter().flatten().flatten() {
        if deb.path().extension().is_some_and(|e| e == "deb") {
            run(Command::new("dpkg-deb").arg("-x").arg(deb.path()).arg(&root), "dpkg-deb -x")?;
        }
    }
    make_readable(&root.join("boot"));
    if find_image(&root).is_none() {
        return Err(Error::preflight(format!(
            "{package} holds no /boot/vmlinuz-*; pass --kernel PATH instead"
        )));
    }
    match std::fs::rename(&root, &dest) {
        Ok(()) => {}
        // Another run fetched the same kernel meanwhile: use theirs.
        Err(_) if dest.exists() => {}
        Err(e) => return Err(Error::io(format!("cannot move the kernel into {}", dest.display()), e)),
    }
    find_image(&dest).ok_or_else(|| Error::infra(format!("fetched kernel missing from {}", dest.display())))
}

fn find_image(root: &Path) -> Option<Kernel> {
    let boot = root.join("boot");
    let entries = std::fs::read_dir(&boot).ok()?;
    let mut images: Vec<_> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
        .map(|e| e.path())
        .collect();
    images.sort_by(|a, b| kernel::version_cmp(&b.to_string_lossy(), &a.to_string_lossy()));
    images.into_iter().find_map(|p| Kernel::from_image(&p, "cache").ok())
}

/// Ubuntu ships vmlinuz as mode 0600; the copy in our cache is ours to read.
fn make_readable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let _ = std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o644));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flavour_metapackages_are_told_from_release_packages() {
        for concrete in ["linux-image-6.1.0-57-cloud-amd64", "linux-image-unsigned-6.8.0-31-generic"] {
            assert!(is_concrete(concrete), "{concrete}");
        }
        for meta in
            ["linux-image-cloud-amd64", "linux-image-amd64", "linux-image-generic-hwe-24.04", "linux-doc"]
        {
            assert!(!is_concrete(meta), "{meta}");
        }
    }
}
