//! What the cache holds, how big it is, when each entry was last used, and pruning what
//! vmtest can make again (snapshots, extracted kernels, initramfs images, module lists).
//! Fetched kernels and QEMU, and built images, are only listed: they cost downloads or
//! minutes to make again, and `vmtest image rm`/`gc` own images.

use crate::cache::Cache;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// One entry of the cache.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Entry {
    /// `snapshot`, `boot-image`, `initramfs`, `module-list`, `kernel`, `qemu`, `image`,
    /// `apt-lists`, `kvm-verdict`.
    pub kind: &'static str,
    /// The file or directory.
    pub path: PathBuf,
    /// Its size on disk.
    pub bytes: u64,
    /// When it was last used (snapshots are touched at each restore) or made.
    #[serde(serialize_with = "unix_secs")]
    pub last_used: SystemTime,
    /// Whether vmtest makes it again on demand, so pruning only costs time.
    pub regenerable: bool,
}

fn unix_secs<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0))
}

/// The cache's subdirectories: each child is one entry of this kind.
const KINDS: &[(&str, &str, bool)] = &[
    ("snapshots", "snapshot", true),
    ("checkpoints", "checkpoint", true),
    ("vmlinux", "boot-image", true),
    ("initramfs", "initramfs", true),
    ("modules", "module-list", true),
    ("probe", "kvm-verdict", true),
    ("kernels", "kernel", false),
    ("qemu", "qemu", false),
    ("images", "image", false),
    ("apt", "apt-lists", false),
];

/// The kinds vmtest makes again on demand, which `prune` may remove.
pub fn prunable_kinds() -> Vec<&'static str> {
    KINDS.iter().filter(|(_, _, regenerable)| *regenerable).map(|(_, kind, _)| *kind).collect()
}

/// Every entry, kind by kind: snapshots, boot images, initramfs, module lists, KVM verdicts
/// (what vmtest makes again on demand), then kernels, QEMU, images and apt lists; temporary
/// files of work in progress (names starting with `.`) are left out.
pub fn entries(cache: &Cache) -> Vec<Entry> {
    entries_of(cache, |_| true)
}

/// The entries of the kinds `wanted` says yes to.
fn entries_of(cache: &Cache, wanted: impl Fn(&str) -> bool) -> Vec<Entry> {
    let mut all = Vec::new();
    for (dir, kind, regenerable) in KINDS.iter().filter(|(_, kind, _)| wanted(kind)) {
        let Ok(children) = std::fs::read_dir(cache.root().join(dir)) else { continue };
        for child in children.flatten() {
            let name = child.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name.ends_with(".lock") {
                continue;
            }
            let path = child.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
            // The image store's index files are not images.
            if *kind == "image" && !meta.is_dir() {
                continue;
            }
            all.push(Entry {
                kind,
                bytes: size_of(&path),
                last_used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                path,
                regenerable: *regenerable,
            });
        }
    }
    all
}

/// Bytes under `path` (files counted once; symlinks not followed).
fn size_of(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else { return 0 };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(path).into_iter().flatten().flatten().map(|e| size_of(&e.path())).sum()
}

/// What to prune.
#[derive(Clone, Copy, Debug, Default)]
pub struct Prune {
    /// Remove regenerable entries, least recently used first, until the regenerable part of
    /// the cache is at most this big.
    pub max_bytes: Option<u64>,
    /// Remove regenerable entries not used for this long.
    pub older_than: Option<Duration>,
    /// Only say what would go.
    pub dry_run: bool,
}

/// Prune the regenerable entries of `kinds` (all regenerable kinds when empty) as `how`
/// says; returns what was (or, in a dry run, would be) removed.
pub fn prune(cache: &Cache, kinds: &[&str], how: Prune) -> Vec<Entry> {
    let mut candidates: Vec<Entry> = entries(cache)
        .into_iter()
        .filter(|e| e.regenerable && (kinds.is_empty() || kinds.contains(&e.kind)))
        .collect();
    candidates.sort_by_key(|e| e.last_used);
    let now = SystemTime::now();
    let mut total: u64 = candidates.iter().map(|e| e.bytes).sum();
    let mut removed = Vec::new();
    for e in candidates {
        let stale =
            how.older_than.is_some_and(|age| now.duration_since(e.last_used).unwrap_or_default() > age);
        let over = how.max_bytes.is_some_and(|max| total > max);
        if !stale && !over {
            continue;
        }
        if !how.dry_run {
            let gone = if e.path.is_dir() {
                std::fs::remove_dir_all(&e.path)
            } else {
                std::fs::remove_file(&e.path)
            };
            if let Err(err) = gone {
                tracing::warn!("cannot remove {}: {err}", e.path.display());
                continue;
            }
        }
        total -= e.bytes;
        removed.push(e);
    }
    removed
}

/// The bound on snapshots: `$VMTEST_CACHE_SNAPSHOTS_MAX` (e.g. `8G`), default 4 GiB, so a
/// CI machine that tries many VM shapes cannot fill its disk with them unnoticed.
pub fn snapshot_bound() -> u64 {
    std::env::var("VMTEST_CACHE_SNAPSHOTS_MAX").ok().and_then(|v| parse_size(&v)).unwrap_or(4 << 30)
}

/// A size in bytes: a bare number, or with a binary suffix K, M, G, T (`512M`, `2G`, `0`).
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let shift = match unit.trim().to_ascii_uppercase().trim_end_matches('B').trim_end_matches('I') {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return None,
    };
    n.checked_mul(1 << shift)
}

/// Keep the saved guests (snapshots and checkpoints) within [`snapshot_bound`], least
/// recently used first; the one just made (`keep`) stays.
pub(crate) fn bound_snapshots(cache: &Cache, keep: &Path) {
    let bound = snapshot_bound();
    let mut snapshots = entries_of(cache, |kind| kind == "snapshot" || kind == "checkpoint");
    let mut total: u64 = snapshots.iter().map(|e| e.bytes).sum();
    if total <= bound {
        return;
    }
    snapshots.sort_by_key(|e| e.last_used);
    for e in snapshots.iter().filter(|e| e.path != keep) {
        if total <= bound {
            break;
        }
        let removed =
            if e.path.is_dir() { std::fs::remove_dir_all(&e.path) } else { std::fs::remove_file(&e.path) };
        if removed.is_ok() {
            total -= e.bytes;
            tracing::info!(
                "removed the least recently used {} {} ({} MiB) to stay under {} MiB of snapshots \
                 and checkpoints ($VMTEST_CACHE_SNAPSHOTS_MAX)",
                e.kind,
                e.path.display(),
                e.bytes >> 20,
                bound >> 20
            );
        }
    }
}

/// Mark a snapshot (a file or a directory) as used now (the cache's "last used" is its
/// modification time).
pub(crate) fn touch(path: &Path) {
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &Path, bytes: usize, age: Duration) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, vec![0u8; bytes]).unwrap();
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_modified(SystemTime::now() - age).unwrap();
    }

    #[test]
    fn entries_are_listed_by_kind_with_size_and_regenerable_ones_pruned_oldest_first() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::at(tmp.path());
        let day = Duration::from_secs(86_400);
        file(&tmp.path().join("snapshots/old.state"), 3000, 3 * day);
        file(&tmp.path().join("snapshots/new.state"), 2000, Duration::ZERO);
        file(&tmp.path().join("vmlinux/6.1-abc"), 1000, 2 * day);
        file(&tmp.path().join("kernels/6.1/boot/vmlinuz-6.1"), 5000, 10 * day);
        file(&tmp.path().join("snapshots/.tmp-123"), 10, Duration::ZERO);
        let all = entries(&cache);
        assert_eq!(all.len(), 4, "work in progress is not an entry: {all:?}");
        let kernel = all.iter().find(|e| e.kind == "kernel").unwrap();
        assert_eq!((kernel.bytes, kernel.regenerable), (5000, false));

        // Down to 2500 bytes of regenerable entries: the oldest go first, the kernel stays.
        let dry = prune(&cache, &[], Prune { max_bytes: Some(2500), dry_run: true, ..Prune::default() });
        assert_eq!(
            dry.iter().map(|e| e.path.file_name().unwrap().to_str().unwrap()).collect::<Vec<_>>(),
            ["old.state", "6.1-abc"]
        );
        assert!(tmp.path().join("snapshots/old.state").exists(), "a dry run removes nothing");
        let gone = prune(&cache, &[], Prune { max_bytes: Some(2500), ..Prune::default() });
        assert_eq!(gone.len(), 2);
        assert!(!tmp.path().join("snapshots/old.state").exists());
        assert!(tmp.path().join("snapshots/new.state").exists());
        assert!(tmp.path().join("kernels/6.1/boot/vmlinuz-6.1").exists(), "fetched kernels are never pruned");

        // By age, and only the kinds asked for.
        file(&tmp.path().join("initramfs/x.cpio"), 10, 5 * day);
        let gone = prune(&cache, &["snapshot"], Prune { older_than: Some(day), ..Prune::default() });
        assert!(gone.is_empty(), "the remaining snapshot is fresh");
        let gone = prune(&cache, &[], Prune { older_than: Some(day), ..Prune::default() });
        assert_eq!(gone.iter().map(|e| e.kind).collect::<Vec<_>>(), ["initramfs"]);
    }

    #[test]
    fn snapshots_and_checkpoints_are_bounded_least_recently_used_first_and_the_new_one_stays() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::at(tmp.path());
        let day = Duration::from_secs(86_400);
        // A saved guest is a directory; its last use is the directory's time.
        let saved = |path: PathBuf, age: Duration| {
            file(&path.join("state"), 3 << 20, age);
            let when = SystemTime::now() - age;
            std::fs::File::open(&path).unwrap().set_modified(when).unwrap();
            path
        };
        let a = saved(tmp.path().join("snapshots/a"), 2 * day);
        let b = saved(tmp.path().join("snapshots/b"), day);
        let c = saved(tmp.path().join("snapshots/c"), 3 * day);
        let d = saved(tmp.path().join("checkpoints/d"), 4 * day);
        touch(&c); // used just now: the most recent
        std::env::set_var("VMTEST_CACHE_SNAPSHOTS_MAX", "7M");
        bound_snapshots(&cache, &b);
        std::env::remove_var("VMTEST_CACHE_SNAPSHOTS_MAX");
        assert!(!d.exists(), "the least recently used goes, a checkpoint as well as a snapshot");
        assert!(!a.exists(), "then the next");
        assert!(b.exists(), "the one just made stays");
        assert!(c.exists(), "a recently restored one stays");
    }
}
