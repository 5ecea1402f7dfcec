//! Kernels as developers build them, tested for real with the distro kernel the other tests
//! boot, laid out as a build tree: `arch/x86/boot/bzImage`, the `vmlinux` of the same build,
//! `include/config/kernel.release`, `.config`, and its modules installed elsewhere (as
//! `make modules_install INSTALL_MOD_PATH=DIR` would). The guest must load modules from the
//! tree it is given; a kernel that lacks a driver vmtest needs must be refused before any
//! boot, naming the missing `CONFIG_` options. And `vmtest kernel fetch` takes a flavour's
//! metapackage (Debian's cloud kernel, which has no 9p and is refused the same way).

#![cfg(target_os = "linux")]

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A build tree made of the default kernel's files, in a temporary directory.
struct Tree {
    tmp: tempfile::TempDir,
    release: String,
    /// The kernel's own module tree (`.../lib/modules/<release>`).
    modules_from: PathBuf,
}

impl Tree {
    fn new(vt: &Vmtest) -> Tree {
        let image = default_kernel(vt);
        let name = image.file_name().unwrap().to_string_lossy().into_owned();
        let release = name.strip_prefix("vmlinuz-").expect("a vmlinuz-<release> default kernel").to_owned();
        let root = image.parent().and_then(Path::parent).unwrap();
        let modules_from =
            [root.join("lib/modules").join(&release), PathBuf::from("/lib/modules").join(&release)]
                .into_iter()
                .find(|d| d.join("kernel").is_dir())
                .expect("the default kernel's modules");
        let config =
            [image.with_file_name(format!("config-{release}")), format!("/boot/config-{release}").into()]
                .into_iter()
                .find(|c| c.is_file())
                .expect("the default kernel's config");
        let tmp = tempfile::tempdir().unwrap();
        let t = Tree { tmp, release, modules_from };
        std::fs::create_dir_all(t.bzimage().parent().unwrap()).unwrap();
        std::fs::create_dir_all(t.path().join("include/config")).unwrap();
        let bz = std::fs::read(&image).unwrap();
        std::fs::write(t.bzimage(), &bz).unwrap();
        let vmlinux = backend_qemu::kernel::extract_vmlinux(&bz).expect("the vmlinux inside the bzImage");
        std::fs::write(t.vmlinux(), vmlinux).unwrap();
        std::fs::copy(config, t.path().join(".config")).unwrap();
        std::fs::write(t.path().join("include/config/kernel.release"), format!("{}\n", t.release)).unwrap();
        t
    }

    fn path(&self) -> PathBuf {
        self.tmp.path().join("linux")
    }

    fn bzimage(&self) -> PathBuf {
        self.path().join("arch/x86/boot/bzImage")
    }

    fn vmlinux(&self) -> PathBuf {
        self.path().join("vmlinux")
    }

    /// Install the kernel's modules under `root` (an INSTALL_MOD_PATH), with a marker file
    /// the guest looks for, as `make modules_install` would: files (hard links where the
    /// filesystem allows) and depmod's index.
    fn install_modules(&self, root: &Path) {
        let dest = root.join("lib/modules").join(&self.release);
        copy_tree(&self.modules_from, &dest);
        if !dest.join("modules.dep.bin").is_file() {
            let ok = std::process::Command::new("depmod").arg("-b").arg(root).arg(&self.release).status();
            assert!(ok.is_ok_and(|s| s.success()), "depmod -b {} {}", root.display(), self.release);
        }
        std::fs::write(dest.join("vmtest-marker"), "").unwrap();
    }

    /// Replace the `.config` line that starts with `option` by `with`.
    fn edit_config(&self, option: &str, with: &str) {
        let config = self.path().join(".config");
        let text = std::fs::read_to_string(&config).unwrap();
        let edited: String = text
            .lines()
            .map(|l| if l.starts_with(option) { with } else { l })
            .map(|l| format!("{l}\n"))
            .collect();
        assert_ne!(text, edited, "the config has {option}");
        std::fs::write(&config, edited).unwrap();
    }

    fn config_options(&self, value: &str) -> Vec<String> {
        std::fs::read_to_string(self.path().join(".config"))
            .unwrap()
            .lines()
            .filter_map(|l| l.strip_suffix(&format!("={value}")).map(str::to_owned))
            .collect()
    }
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dest);
        } else if std::fs::hard_link(e.path(), &dest).is_err() {
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

/// Loads a module from the tree it must (the marker proves which tree is bound) and uses it.
const USE_A_MODULE: &str = "test -e /lib/modules/$(uname -r)/vmtest-marker && modprobe dummy && \
                            ip link add d0 type dummy && cat /sys/class/net/d0/type && uname -r";

/// `vmtest run ARGS -- sh -c SCRIPT` booting a temporary tree: as root, and without a
/// snapshot (one per temporary tree would pile up in the cache).
fn run_tree(vt: &Vmtest, args: &[&str], script: &str) -> std::process::Output {
    let mut all = vec!["--root", "--no-snapshot"];
    all.extend(args);
    vt.run(&all, &["sh", "-c", script])
}

/// Boot the tree with `args`, and load and use a module.
fn assert_uses_a_module(vt: &Vmtest, tree: &Tree, args: &[&str]) {
    let out = run_tree(vt, args, USE_A_MODULE);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // 1 is ARPHRD_ETHER: the dummy device exists.
    assert_eq!(stdout(&out), format!("1\n{}\n", tree.release));
    vt.assert_clean();
}

#[test]
fn a_tree_bzimage_boots_with_the_modules_given_and_loads_them_on_demand() {
    let vt = Vmtest::new();
    let tree = Tree::new(&vt);
    let mods = tree.tmp.path().join("mods");
    tree.install_modules(&mods);
    let bzimage = tree.bzimage();
    assert_uses_a_module(
        &vt,
        &tree,
        &["--kernel", bzimage.to_str().unwrap(), "--modules", mods.to_str().unwrap()],
    );
}

#[test]
fn the_trees_vmlinux_boots_with_the_modules_installed_in_the_tree() {
    let vt = Vmtest::new();
    let tree = Tree::new(&vt);
    tree.install_modules(&tree.path().join(".vmtest-modules"));
    assert_uses_a_module(&vt, &tree, &["--kernel", tree.vmlinux().to_str().unwrap()]);
}

#[test]
fn a_pvh_kernel_without_virtio_mmio_boots_on_the_pc_machine() {
    let vt = Vmtest::new();
    let tree = Tree::new(&vt);
    let mods = tree.tmp.path().join("mods");
    tree.install_modules(&mods);
    tree.edit_config("CONFIG_VIRTIO_MMIO=", "# CONFIG_VIRTIO_MMIO is not set");
    let vmlinux = tree.vmlinux();
    let args = ["--kernel", vmlinux.to_str().unwrap(), "--modules", mods.to_str().unwrap()];
    // microvm has no PCI bus: the devices are virtio-pci ones.
    let out = run_tree(&vt, &args, "ls /sys/bus/pci/drivers/virtio-pci | grep -c :");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_ne!(stdout(&out).trim(), "0", "{}", stdout(&out));
    vt.assert_clean();
}

/// A refusal comes before anything boots: quickly, with nothing left behind.
fn assert_refused_before_boot(vt: &Vmtest, out: &std::process::Output, took: Duration) {
    assert_eq!(out.status.code(), Some(64), "{}", stderr(out));
    assert!(took < Duration::from_secs(30), "refused after {took:?}");
    assert!(!stderr(out).contains(" ready after "), "{}", stderr(out));
    vt.assert_clean();
}

#[test]
fn a_tree_without_its_modules_is_refused_before_boot_with_the_options_it_lacks() {
    let vt = Vmtest::new();
    let tree = Tree::new(&vt);
    if Path::new("/lib/modules").join(&tree.release).exists() {
        eprintln!("skipped: the host has /lib/modules/{}, which vmtest would use", tree.release);
        return;
    }
    let modular = tree.config_options("m");
    let needed = [
        "CONFIG_VIRTIO_CONSOLE",
        "CONFIG_NET_9P",
        "CONFIG_NET_9P_VIRTIO",
        "CONFIG_9P_FS",
        "CONFIG_OVERLAY_FS",
    ];
    let lacking: Vec<&str> = needed.into_iter().filter(|o| modular.iter().any(|m| m == o)).collect();
    assert!(!lacking.is_empty(), "the distro kernel builds 9p and overlayfs as modules");
    let bzimage = tree.bzimage();
    let t0 = Instant::now();
    let out = vt.run(&["--kernel", bzimage.to_str().unwrap()], &["true"]);
    assert_refused_before_boot(&vt, &out, t0.elapsed());
    let line = error_line(&out);
    assert!(line.starts_with(&format!("vmtest: error: kernel {} lacks ", bzimage.display())), "{line}");
    for option in &lacking {
        assert!(line.contains(option), "{option} missing from: {line}");
    }
    let config = tree.path().join(".config");
    assert!(line.contains(&format!("(=m in {}, and no module tree was found", config.display())), "{line}");
    assert!(line.contains(&tree.path().join(".vmtest-modules/lib/modules").display().to_string()), "{line}");
    assert!(line.contains("pass --modules DIR"), "{line}");
}

#[test]
fn a_config_without_overlayfs_is_refused_naming_it() {
    let vt = Vmtest::new();
    let tree = Tree::new(&vt);
    let mods = tree.tmp.path().join("mods");
    tree.install_modules(&mods);
    tree.edit_config("CONFIG_OVERLAY_FS=", "# CONFIG_OVERLAY_FS is not set");
    let config = tree.path().join(".config");
    let bzimage = tree.bzimage();
    let t0 = Instant::now();
    let out =
        vt.run(&["--kernel", bzimage.to_str().unwrap(), "--modules", mods.to_str().unwrap()], &["true"]);
    assert_refused_before_boot(&vt, &out, t0.elapsed());
    assert_eq!(
        error_line(&out),
        format!(
            "vmtest: error: kernel {} lacks CONFIG_OVERLAY_FS (neither built in nor a module: not set in {}); \
             enable it (=y or =m) and rebuild",
            bzimage.display(),
            config.display()
        )
    );
}

#[test]
fn modules_of_another_release_are_refused() {
    let vt = Vmtest::new();
    let tree = Tree::new(&vt);
    let mods = tree.tmp.path().join("mods");
    std::fs::create_dir_all(mods.join("lib/modules/0.0.0/kernel")).unwrap();
    let bzimage = tree.bzimage();
    let out =
        vt.run(&["--kernel", bzimage.to_str().unwrap(), "--modules", mods.to_str().unwrap()], &["true"]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(
        error_line(&out).contains(&format!("it holds modules for 0.0.0, not for {}", tree.release)),
        "{}",
        stderr(&out)
    );
    vt.assert_clean();
    // And a directory that is not there is named with where it was set.
    let out =
        vt.cmd().env("VMTEST_MODULES", "/nonexistent/mods").args(["run", "--", "true"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(
        error_line(&out).contains("/nonexistent/mods (from env VMTEST_MODULES): not a directory"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn vmtest_config_shows_the_modules_and_where_they_were_set() {
    let vt = Vmtest::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vmtest.toml"), "modules = \"linux/.vmtest-modules\"\n").unwrap();
    let out = vt.cmd().current_dir(dir.path()).args(["config", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let modules = &v["settings"]["modules"];
    let want = dir.path().join("linux/.vmtest-modules");
    assert_eq!(modules["value"], want.to_str().unwrap(), "{v}");
    assert_eq!(modules["source"], dir.path().join("vmtest.toml").to_str().unwrap(), "{v}");
}

#[test]
fn a_flavour_is_fetched_by_its_metapackage_and_a_kernel_without_9p_is_refused() {
    const META: &str = "linux-image-cloud-amd64";
    let known = std::process::Command::new("apt-cache").args(["show", "--no-all-versions", META]).output();
    if !known.is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: this distro has no {META}");
        return;
    }
    let vt = Vmtest::new();
    let cache = tempfile::tempdir().unwrap();
    let out =
        vt.cmd().env("VMTEST_CACHE_DIR", cache.path()).args(["kernel", "fetch", META]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let said = stdout(&out);
    let mut words = said.split_whitespace();
    let (release, image) = (words.next().unwrap().to_owned(), PathBuf::from(words.next().unwrap()));
    assert!(release.ends_with("-cloud-amd64"), "{said}");
    assert!(image.starts_with(cache.path()) && image.is_file(), "{said}");
    let t0 = Instant::now();
    let out = vt
        .cmd()
        .env("VMTEST_CACHE_DIR", cache.path())
        .args(["run", "--kernel", image.to_str().unwrap(), "--", "true"])
        .output()
        .unwrap();
    assert_refused_before_boot(&vt, &out, t0.elapsed());
    let line = error_line(&out);
    let config = image.with_file_name(format!("config-{release}"));
    assert!(
        line.contains(&format!(
            "lacks CONFIG_NET_9P, CONFIG_NET_9P_VIRTIO, CONFIG_9P_FS (neither built in nor a module: not set in {})",
            config.display()
        )),
        "{line}"
    );
}
