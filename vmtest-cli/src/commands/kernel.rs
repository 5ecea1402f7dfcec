//! `vmtest kernel fetch | list`.

use crate::cli::KernelCommand;
use backend_qemu::{cache::Cache, fetch, kernel};
use vmtest_core::Result;

pub async fn kernel(cmd: KernelCommand) -> Result<i32> {
    let cache = Cache::from_env();
    match cmd {
        KernelCommand::Fetch { package, if_missing } => {
            if if_missing {
                if let Some(k) = kernel::locate(None, &cache)? {
                    println!("{} {} (from {}; nothing fetched)", k.release, k.image.display(), k.origin);
                    return Ok(0);
                }
            }
            let k = tokio::task::spawn_blocking(move || fetch::fetch(&cache, package.as_deref()))
                .await
                .map_err(|e| vmtest_core::Error::infra(e.to_string()))??;
            println!("{} {}", k.release, k.image.display());
        }
        KernelCommand::List => {
            match kernel::locate(None, &cache)? {
                Some(k) => println!("default: {} {} (from {})", k.release, k.image.display(), k.origin),
                None => println!("default: none (the first run fetches one; or run `vmtest kernel fetch`)"),
            }
            for k in kernel::cached_kernels(&cache) {
                println!("cached:  {} {}", k.release, k.image.display());
            }
        }
    }
    Ok(0)
}
