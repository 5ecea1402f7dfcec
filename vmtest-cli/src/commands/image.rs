//! `vmtest image import | list`: base images of backends with an image store.

use crate::cli::ImageCommand;
use backend_qemu::QemuOptions;
use vmtest_core::Result;

pub async fn image(cmd: ImageCommand) -> Result<i32> {
    let all = super::backends::all(QemuOptions::default());
    match cmd {
        ImageCommand::Import { backend, file, name, force } => {
            if !file.is_file() {
                return Err(vmtest_core::Error::usage(format!("{} is not a file", file.display())));
            }
            let at = super::backends::named(&all, &backend)?.import_image(&file, &name, force).await?;
            println!("imported {name}: {at}");
        }
        ImageCommand::List { backend } => {
            for name in super::backends::named(&all, &backend)?.list_images().await? {
                println!("{name}");
            }
        }
    }
    Ok(0)
}
