//! The multipass backend of vmtest. Not implemented yet (see its issue): every operation says so.

use async_trait::async_trait;
use vmtest_core::spec::VmSpec;
use vmtest_core::state::{RunDir, VmRecord};
use vmtest_core::{Check, Error, Hypervisor, Preflight, Result, Vm};

pub struct MultipassBackend;

impl MultipassBackend {
    /// The backend configured from the environment.
    pub fn from_env() -> Self {
        MultipassBackend
    }
}

#[async_trait]
impl Hypervisor for MultipassBackend {
    fn name(&self) -> &'static str {
        "multipass"
    }

    async fn preflight(&self) -> Preflight {
        let mut pf = Preflight::default();
        pf.push(Check::fail("multipass", "the multipass backend is not implemented yet", "use --backend qemu"));
        pf
    }

    async fn launch(&self, _spec: &VmSpec, _dir: &RunDir) -> Result<Box<dyn Vm>> {
        Err(Error::preflight("the multipass backend is not implemented yet; use --backend qemu"))
    }

    async fn destroy_record(&self, _record: &VmRecord) -> Result<()> {
        Ok(())
    }
}
