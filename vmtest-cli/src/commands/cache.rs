//! `vmtest cache list | gc`.

use crate::cli::CacheCommand;
use backend_qemu::cache::Cache;
use backend_qemu::cache_usage::{self, Prune};
use vmtest_core::{Error, Result};

pub fn cache(cmd: CacheCommand) -> Result<i32> {
    let cache = Cache::from_env();
    match cmd {
        CacheCommand::List { json } => {
            let entries = cache_usage::entries(&cache);
            if json {
                println!("{}", serde_json::to_string_pretty(&entries).expect("serializes"));
                return Ok(0);
            }
            println!("{:<12} {:>9}  {:<17} {:<11} path", "kind", "size", "last used", "on demand");
            for e in &entries {
                println!(
                    "{:<12} {:>9}  {:<17} {:<11} {}",
                    e.kind,
                    human_size(e.bytes),
                    &crate::ui::rfc3339(e.last_used)[..16],
                    if e.regenerable { "remade" } else { "kept" },
                    e.path.display()
                );
            }
            let total: u64 = entries.iter().map(|e| e.bytes).sum();
            let remade: u64 = entries.iter().filter(|e| e.regenerable).map(|e| e.bytes).sum();
            println!(
                "{} in {} ({} of it made again on demand: `vmtest cache gc` prunes that; snapshots and \
                 checkpoints are kept under {} by themselves, $VMTEST_CACHE_SNAPSHOTS_MAX)",
                human_size(total),
                cache.root().display(),
                human_size(remade),
                human_size(cache_usage::snapshot_bound())
            );
        }
        CacheCommand::Gc { max_size, older_than, kinds, dry_run } => {
            let max_bytes = match &max_size {
                Some(s) => Some(cache_usage::parse_size(s).ok_or_else(|| {
                    Error::usage(format!("bad size `{s}` for --max-size; write e.g. 2G, 500M or 0"))
                })?),
                None => None,
            };
            let older_than = older_than.as_deref().map(vmtest_core::spec::parse_duration).transpose()?;
            if max_bytes.is_none() && older_than.is_none() {
                return Err(Error::usage(
                    "say what to prune: --max-size SIZE (e.g. 2G; 0 for all of it) and/or --older-than DUR (e.g. 7d)",
                ));
            }
            let prunable = cache_usage::prunable_kinds();
            if let Some(bad) = kinds.iter().find(|k| !prunable.contains(&k.as_str())) {
                return Err(Error::usage(format!(
                    "--kind {bad}: not a kind vmtest prunes; use one of {}",
                    prunable.join(", ")
                )));
            }
            let kinds: Vec<&str> = kinds.iter().map(String::as_str).collect();
            let removed = cache_usage::prune(&cache, &kinds, Prune { max_bytes, older_than, dry_run });
            let verb = if dry_run { "would remove" } else { "removed" };
            for e in &removed {
                println!("{verb} {} {} ({})", e.kind, e.path.display(), human_size(e.bytes));
            }
            let freed: u64 = removed.iter().map(|e| e.bytes).sum();
            println!("{verb} {} entries, {}", removed.len(), human_size(freed));
        }
    }
    Ok(0)
}

fn human_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}
