//! `vmtest qemu fetch | which`.

use crate::cli::QemuCommand;
use backend_qemu::{cache::Cache, qemu_fetch, QemuBackend, QemuOptions};
use vmtest_core::{Error, Result};

pub async fn qemu(cmd: QemuCommand) -> Result<i32> {
    let backend = QemuBackend::new(QemuOptions::default());
    match cmd {
        QemuCommand::Fetch { if_missing } => {
            if if_missing {
                if let Some((path, origin)) = backend.locate_qemu()? {
                    println!("{} ({origin}; nothing fetched)", path.display());
                    return Ok(0);
                }
            }
            let cache = Cache::from_env();
            let fetched = tokio::task::spawn_blocking(move || qemu_fetch::fetch(&cache))
                .await
                .map_err(|e| Error::infra(e.to_string()))??;
            println!("{} ({} {})", fetched.binary.display(), qemu_fetch::PACKAGE, fetched.version);
        }
        QemuCommand::Which => match backend.locate_qemu()? {
            Some((path, origin)) => println!("{} ({origin})", path.display()),
            None => {
                println!("none yet (the first run fetches the distro's QEMU; or run `vmtest qemu fetch`)")
            }
        },
    }
    Ok(0)
}
