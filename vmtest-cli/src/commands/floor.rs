//! `vmtest floor-command` (hidden): the raw boot floor's QEMU argv, for the benchmark.

use crate::cli::FloorArgs;
use backend_qemu::{QemuBackend, QemuOptions};
use vmtest_core::spec::{self, BootSpec, VmSpec};
use vmtest_core::{Error, Result};

pub async fn floor_command(args: FloorArgs) -> Result<i32> {
    let mut spec = VmSpec::new("floor", "floor");
    spec.cpus = args.cpus;
    spec.memory_mib = spec::parse_memory_mib(&args.memory)?;
    spec.accel = args.accel.parse()?;
    spec.boot = BootSpec::Kernel { kernel: args.kernel, modules: None };
    let backend = QemuBackend::new(QemuOptions::default());
    if !args.dir.is_dir() {
        return Err(Error::usage(format!("--dir {} is not a directory", args.dir.display())));
    }
    let (qemu, argv) = backend.floor_command(&spec, &args.dir).await?;
    let mut all = vec![qemu.to_string_lossy().into_owned()];
    all.extend(argv.iter().map(|a| a.to_string_lossy().into_owned()));
    println!("{}", serde_json::to_string(&all).expect("strings serialize"));
    Ok(0)
}
