//! The bhyve backend of vmtest. Not implemented yet (see its issue): every operation says so.

use async_trait::async_trait;
use vmtest_core::spec::VmSpec;
use vmtest_core::state::{RunDir, VmRecord};
use vmtest_core::{Check, Error, Hypervisor, Preflight, Result, Vm};

pub struct BhyveBackend;

impl BhyveBackend {
    /// The backend configured from the environment.
    pub fn from_env() -> Self {
        BhyveBackend
    }
}

#[async_trait]
impl Hypervisor for BhyveBackend {
    fn name(&self) -> &'static str {
        "bhyve"
    }

    async fn preflight(&self) -> Preflight {
        let mut pf = Preflight::default();
        pf.push(Check::fail("bhyve", "the bhyve backend is not implemented yet", "use --backend qemu"));
        pf
    }

    async fn launch(&self, _spec: &VmSpec, _dir: &RunDir) -> Result<Box<dyn Vm>> {
        Err(Error::preflight("the bhyve backend is not implemented yet; use --backend qemu"))
    }

    async fn destroy_record(&self, _record: &VmRecord) -> Result<()> {
        Ok(())
    }
}
