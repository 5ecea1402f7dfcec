//! The guest kernel's module loader: what the kernel runs (as `/sbin/modprobe` of the
//! initramfs) when something needs a module, and the static device nodes that make opening
//! `/dev/net/tun` or `/dev/fuse` load theirs.
//!
//! The kernel starts its module helper in init's root, which is the initramfs: PID 1 never
//! enters the host root the agent switches to. So setup links the initramfs's
//! `/sbin/modprobe` to the agent, and mounts the guest kernel's module tree at
//! `/lib/modules/<release>` there as well as in the guest's root. It reads the text index (`modules.dep`, `modules.alias`,
//! `modules.builtin`), loads dependencies first, and needs no kmod in the guest or on the host.

use crate::sys;
use std::collections::HashSet;
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};

/// `modprobe [-q] [--] NAME...` as the kernel calls it. Exits 0 when every name loaded.
pub fn main(args: Vec<OsString>) -> ! {
    let mut quiet = false;
    let mut names = Vec::new();
    let mut options_done = false;
    for a in args.iter().skip(1) {
        let a = a.to_string_lossy().into_owned();
        match a.as_str() {
            "--" if !options_done => options_done = true,
            s if !options_done && s.starts_with('-') => quiet |= s == "-q",
            _ => names.push(a),
        }
    }
    let tree = Path::new("/lib/modules").join(sys::kernel_release());
    let mut status = 0;
    for name in &names {
        if let Err(e) = load(&tree, name) {
            if !quiet {
                eprintln!("modprobe: {name}: {e}");
            }
            status = 1;
        }
    }
    std::process::exit(status)
}

/// Load the module `name` (or every module with an alias matching it), dependencies first.
pub fn load(tree: &Path, name: &str) -> io::Result<()> {
    // Module names treat `-` and `_` alike; aliases (`rtnl-link-veth`) match as written.
    let module = name.replace('-', "_");
    let builtin = std::fs::read_to_string(tree.join("modules.builtin")).unwrap_or_default();
    if builtin.lines().filter_map(module_name).any(|m| m == module) {
        return Ok(());
    }
    let dep = std::fs::read_to_string(tree.join("modules.dep"))?;
    let deps = parse_dep(&dep);
    let mut targets: Vec<String> = Vec::new();
    if deps.iter().any(|(m, _, _)| *m == module) {
        targets.push(module);
    } else {
        let aliases = std::fs::read_to_string(tree.join("modules.alias")).unwrap_or_default();
        for line in aliases.lines() {
            let mut words = line.split_whitespace();
            if let (Some("alias"), Some(pattern), Some(module)) = (words.next(), words.next(), words.next()) {
                let module = module.replace('-', "_");
                if glob(pattern.as_bytes(), name.as_bytes()) && !targets.contains(&module) {
                    targets.push(module);
                }
            }
        }
    }
    if targets.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no module or alias `{name}` in {}", tree.display()),
        ));
    }
    let mut done = HashSet::new();
    for t in &targets {
        insert(tree, &deps, t, &mut done)?;
    }
    Ok(())
}

/// (name, path relative to the tree, dependency paths) per line of `modules.dep`.
fn parse_dep(text: &str) -> Vec<(String, &str, Vec<&str>)> {
    text.lines()
        .filter_map(|line| {
            let (path, rest) = line.split_once(':')?;
            Some((module_name(path)?, path.trim(), rest.split_whitespace().collect()))
        })
        .collect()
}

fn insert(
    tree: &Path,
    deps: &[(String, &str, Vec<&str>)],
    name: &str,
    done: &mut HashSet<String>,
) -> io::Result<()> {
    if !done.insert(name.to_owned()) {
        return Ok(());
    }
    let Some((_, path, needs)) = deps.iter().find(|(m, _, _)| m == name) else {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("{name} is not in modules.dep")));
    };
    for need in needs {
        if let Some(dep) = module_name(need) {
            insert(tree, deps, &dep, done)?;
        }
    }
    let file = tree.join(path);
    sys::load_module(&file).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", file.display())))
}

/// `kernel/fs/fuse/fuse.ko.xz` -> `fuse`.
fn module_name(path: &str) -> Option<String> {
    let file = path.trim().rsplit('/').next()?;
    let base = [".xz", ".zst", ".gz"].iter().find_map(|s| file.strip_suffix(s)).unwrap_or(file);
    base.strip_suffix(".ko").map(|n| n.replace('-', "_"))
}

/// fnmatch(3) without flags: `*`, `?` and `[...]` (with ranges and `!`/`^`), as module
/// aliases use them.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.first() {
        None => text.is_empty(),
        Some(b'*') => (0..=text.len()).any(|i| glob(&pattern[1..], &text[i..])),
        Some(b'?') => !text.is_empty() && glob(&pattern[1..], &text[1..]),
        Some(b'[') => {
            let Some(&c) = text.first() else { return false };
            let Some(close) = pattern.iter().skip(2).position(|b| *b == b']').map(|p| p + 2) else {
                return pattern[0] == c && glob(&pattern[1..], &text[1..]);
            };
            let mut set = &pattern[1..close];
            let negate = matches!(set.first(), Some(b'!' | b'^'));
            if negate {
                set = &set[1..];
            }
            let mut hit = false;
            let mut i = 0;
            while i < set.len() {
                if i + 2 < set.len() && set[i + 1] == b'-' {
                    hit |= set[i] <= c && c <= set[i + 2];
                    i += 3;
                } else {
                    hit |= set[i] == c;
                    i += 1;
                }
            }
            hit != negate && glob(&pattern[close + 1..], &text[1..])
        }
        Some(&p) => text.first() == Some(&p) && glob(&pattern[1..], &text[1..]),
    }
}

/// Create the device nodes `modules.devname` lists (kmod's static-nodes, as systemd does at
/// boot), so that opening one makes the kernel load its module. Permissions as systemd's
/// static-nodes-permissions and udev's defaults give them.
pub fn static_nodes(tree: &Path, dev: &Path) {
    let Ok(text) = std::fs::read_to_string(tree.join("modules.devname")) else { return };
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let mut words = line.split_whitespace();
        let (Some(_module), Some(name), Some(node)) = (words.next(), words.next(), words.next()) else {
            continue;
        };
        let kind = match node.as_bytes().first() {
            Some(b'c') => libc::S_IFCHR,
            Some(b'b') => libc::S_IFBLK,
            _ => continue,
        };
        let Some((major, minor)) = node[1..].split_once(':') else { continue };
        let (Ok(major), Ok(minor)) = (major.parse::<u32>(), minor.parse::<u32>()) else { continue };
        let mode = match name {
            "fuse" | "net/tun" | "kvm" | "vhost-net" | "vhost-vsock" => 0o666,
            "loop-control" => 0o660,
            _ => 0o600,
        };
        let path: PathBuf = dev.join(name);
        if path.exists() {
            continue;
        }
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        // chmod after mknod: the mode given to mknod is cut by the agent's umask.
        let made = sys::mknod(&path, kind, major, minor).and_then(|()| {
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode))
        });
        if let Err(e) = made {
            eprintln!("vmtest-agent: cannot create {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_match_as_fnmatch_does() {
        assert!(glob(b"char-major-10-200", b"char-major-10-200"));
        assert!(glob(b"rtnl-link-veth", b"rtnl-link-veth"));
        assert!(glob(b"pci:v00001AF4d*sv*sd*bc*sc*i*", b"pci:v00001AF4d00001000sv1sd2bc3sc4i5"));
        assert!(!glob(b"pci:v00001AF4d*", b"pci:v00008086d1"));
        assert!(glob(b"acpi*:PNP0C0[0-9A]:*", b"acpi:PNP0C0A:x"));
        assert!(!glob(b"x[!0-9]", b"x5"));
        assert!(glob(b"x?z", b"xyz") && !glob(b"x?z", b"xz"));
    }

    #[test]
    fn dependencies_come_from_modules_dep_and_names_are_normalized() {
        let deps =
            parse_dep("kernel/drivers/net/veth.ko:\nkernel/fs/fuse/cuse.ko.xz: kernel/fs/fuse/fuse.ko.xz\n");
        assert_eq!(deps[0], ("veth".into(), "kernel/drivers/net/veth.ko", vec![]));
        assert_eq!(deps[1].2, vec!["kernel/fs/fuse/fuse.ko.xz"]);
        assert_eq!(module_name("kernel/net/9p/9pnet-virtio.ko.zst").as_deref(), Some("9pnet_virtio"));
    }

    #[test]
    fn unknown_names_are_not_found_and_builtins_need_nothing() {
        let tmp = std::env::temp_dir().join(format!("vmtest-modprobe-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::write(tmp.join("modules.dep"), "kernel/a.ko:\n").unwrap();
        std::fs::write(tmp.join("modules.builtin"), "kernel/fs/ext4/ext4.ko\n").unwrap();
        assert!(load(&tmp, "ext4").is_ok());
        std::fs::write(tmp.join("modules.alias"), "alias fs-b a\nalias rtnl-link-x_y a\n").unwrap();
        // Aliases match as written: `-` and `_` are only alike in module names.
        assert_eq!(load(&tmp, "rtnl-link-x-y").unwrap_err().kind(), io::ErrorKind::NotFound);
        assert_eq!(load(&tmp, "nothing").unwrap_err().kind(), io::ErrorKind::NotFound);
        // An alias resolves to its module, whose file is then loaded (and is missing here).
        let err = load(&tmp, "fs-b").unwrap_err();
        assert!(err.to_string().contains("kernel/a.ko"), "{err}");
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
