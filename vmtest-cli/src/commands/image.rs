//! `vmtest image build | list | rm | gc | import`: base images. QEMU builds its own from a spec
//! (debootstrap into a content-addressed cache); bhyve imports raw images.

use crate::cli::ImageCommand;
#[cfg(target_os = "linux")]
use backend_qemu::cache::Cache;
#[cfg(target_os = "linux")]
use backend_qemu::image_build::{ImageStore, LoadedSpec};
#[cfg(target_os = "linux")]
use std::time::Instant;
use vmtest_core::Result;

pub async fn image(cmd: ImageCommand) -> Result<i32> {
    let all = super::backends::registry().build(&vmtest_core::registry::BackendSettings::default());
    match cmd {
        ImageCommand::Import { backend, file, name, force } => {
            if !file.is_file() {
                return Err(vmtest_core::Error::usage(format!("{} is not a file", file.display())));
            }
            let at = all.named(&backend)?.import_image(&file, &name, force).await?;
            println!("imported {name}: {at}");
        }
        #[cfg(target_os = "linux")]
        ImageCommand::List { backend } if backend == "qemu" => {
            let store = ImageStore::new(&Cache::from_env())?;
            for img in store.list() {
                println!(
                    "{}\t{}\t{}\tkernel {}\t{:.0} MiB\tbuilt in {:.0}s\t{}",
                    img.info.name,
                    img.info.key,
                    img.info.release,
                    img.info.kernel_release,
                    img.info.qcow2_bytes as f64 / (1 << 20) as f64,
                    img.info.build_secs,
                    img.base().display()
                );
            }
        }
        #[cfg(not(target_os = "linux"))]
        ImageCommand::List { backend } if backend == "qemu" => {
            return Err(super::backends::qemu_unavailable());
        }
        ImageCommand::List { backend } => {
            for name in all.named(&backend)?.list_images().await? {
                println!("{name}");
            }
        }
        #[cfg(target_os = "linux")]
        ImageCommand::Build { spec } => {
            let loaded = LoadedSpec::from_file(&spec)?;
            let store = ImageStore::new(&Cache::from_env())?;
            let t0 = Instant::now();
            let name = loaded.spec.name.clone();
            let (img, hit) = tokio::task::spawn_blocking(move || {
                store.build(&loaded, &|line| eprintln!("[image {name}] {line}"))
            })
            .await
            .map_err(|e| vmtest_core::Error::infra(format!("image build: {e}")))??;
            let what = if hit { "cached" } else { "built" };
            println!(
                "{} {what} in {:.1}s: {} ({:.0} MiB, kernel {})",
                img.info.name,
                t0.elapsed().as_secs_f64(),
                img.base().display(),
                img.info.qcow2_bytes as f64 / (1 << 20) as f64,
                img.info.kernel_release
            );
        }
        #[cfg(target_os = "linux")]
        ImageCommand::Rm { name } => {
            ImageStore::new(&Cache::from_env())?.remove(&name)?;
            println!("removed {name}");
        }
        #[cfg(target_os = "linux")]
        ImageCommand::Gc => {
            for p in ImageStore::new(&Cache::from_env())?.gc()? {
                println!("removed {}", p.display());
            }
        }
        #[cfg(not(target_os = "linux"))]
        ImageCommand::Build { .. } | ImageCommand::Rm { .. } | ImageCommand::Gc => {
            return Err(super::backends::qemu_unavailable())
        }
    }
    Ok(0)
}
