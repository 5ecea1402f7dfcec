//! The backends a program offers, filled in by that program (the core knows none by name),
//! and choosing one by name or automatically. The `vmtest` binary registers QEMU, bhyve and
//! Multipass in its OS's `auto` order; `examples/embed` registers QEMU alone:
//! `Registry::new().register("qemu", |s| Box::new(QemuBackend::new(s.into())))`.

use crate::error::{Error, Result};
use crate::hypervisor::Hypervisor;

/// What a command asks of the backends it may use; each takes what applies to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSettings {
    /// Stop the hypervisor when this process dies. Off when a VM may be kept after the run.
    pub die_with_parent: bool,
    /// Extra guest kernel command-line words (backends that boot kernels).
    pub kernel_args: Vec<String>,
    /// Start guests from snapshots where the backend can.
    pub snapshots: bool,
    /// Prove hardware acceleration by a probe boot when no verdict is known (`vmtest doctor`);
    /// otherwise a backend only reports what it knows, since `auto` runs every preflight.
    pub prove_acceleration: bool,
    /// Expose a gdb stub for the guest kernel.
    pub gdb: Option<GdbStub>,
    /// Where a guest's memory is dumped when its kernel panics (`--failure-logs`), for
    /// backends that can; `None`: no dumps, and the guest's machine is as without them.
    pub dump_dir: Option<std::path::PathBuf>,
}

impl Default for BackendSettings {
    fn default() -> Self {
        BackendSettings {
            die_with_parent: true,
            kernel_args: Vec::new(),
            snapshots: true,
            prove_acceleration: false,
            gdb: None,
            dump_dir: None,
        }
    }
}

/// A gdb stub on loopback for the guest kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GdbStub {
    /// The port; 0 picks a free one.
    pub port: u16,
    /// Hold the guest before its first instruction until gdb continues it.
    pub wait: bool,
}

/// Makes a backend for the settings of one command.
pub type Factory = dyn Fn(&BackendSettings) -> Box<dyn Hypervisor> + Send + Sync;

/// The backends a program offers, in its `auto` order (the first whose preflight passes wins).
#[derive(Default)]
pub struct Registry {
    entries: Vec<(&'static str, Box<Factory>)>,
}

impl Registry {
    pub fn new() -> Self {
        Registry::default()
    }

    /// Add a backend after those registered so far. `name` is what `--backend` and files say.
    pub fn register(
        mut self,
        name: &'static str,
        factory: impl Fn(&BackendSettings) -> Box<dyn Hypervisor> + Send + Sync + 'static,
    ) -> Self {
        self.entries.push((name, Box::new(factory)));
        self
    }

    /// The registered names, in `auto` order.
    pub fn names(&self) -> Vec<&'static str> {
        self.entries.iter().map(|(n, _)| *n).collect()
    }

    /// Every backend, made for `settings`.
    pub fn build(&self, settings: &BackendSettings) -> Backends {
        Backends(self.entries.iter().map(|(_, make)| make(settings)).collect())
    }

    /// The names a user may ask for: the backends and `auto`.
    pub fn choices(&self) -> Vec<&'static str> {
        let mut all = self.names();
        all.push("auto");
        all
    }

    /// The backend for `requested` (a name or `auto`), made for `settings`. A named backend
    /// is used as is (its own errors say what is missing); `auto` runs each preflight and
    /// takes the first that passes.
    pub async fn choose(&self, requested: &str, settings: &BackendSettings) -> Result<Box<dyn Hypervisor>> {
        if requested == "auto" {
            return self.build(settings).first_usable().await;
        }
        let (_, make) = self.entries.iter().find(|(n, _)| *n == requested).ok_or_else(|| {
            Error::usage(format!("unknown backend `{requested}`; use one of {}", self.choices().join(", ")))
        })?;
        Ok(make(settings))
    }
}

/// Backends made for one command.
pub struct Backends(Vec<Box<dyn Hypervisor>>);

impl Backends {
    /// All of them, borrowed (for sweeps over every backend's VMs).
    pub fn refs(&self) -> Vec<&dyn Hypervisor> {
        self.0.iter().map(|b| b.as_ref()).collect()
    }

    /// The backend that made a VM, by the name in its record.
    pub fn named(&self, name: &str) -> Result<&dyn Hypervisor> {
        self.0
            .iter()
            .find(|b| b.name() == name)
            .map(|b| b.as_ref())
            .ok_or_else(|| Error::usage(format!("backend `{name}` is not part of this vmtest")))
    }

    /// The first whose preflight passes; else every backend's reason in one line.
    pub async fn first_usable(self) -> Result<Box<dyn Hypervisor>> {
        let mut reasons = Vec::new();
        for c in self.0 {
            let pf = c.preflight().await;
            match pf.first_failure() {
                None => return Ok(c),
                // One reason per backend, without the fix: `vmtest doctor` shows the fixes.
                Some(check) if check.name == c.name() => {
                    reasons.push(format!("{}: {}", c.name(), check.detail))
                }
                Some(check) => reasons.push(format!("{}: {}: {}", c.name(), check.name, check.detail)),
            }
        }
        Err(Error::preflight(format!(
            "no backend can run here ({}); run `vmtest doctor` for the fixes",
            reasons.join("; ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::{Check, Preflight, Vm};
    use crate::spec::VmSpec;
    use crate::state::{RunDir, VmRecord};

    /// A backend whose preflight passes or fails as told.
    struct Fake(&'static str, bool);

    #[async_trait::async_trait]
    impl Hypervisor for Fake {
        fn name(&self) -> &'static str {
            self.0
        }
        async fn preflight(&self) -> Preflight {
            let mut pf = Preflight::default();
            pf.push(if self.1 {
                Check::ok(self.0, "fine")
            } else {
                Check::fail(self.0, "absent", "install it")
            });
            pf
        }
        async fn launch(&self, _: &VmSpec, _: &RunDir) -> Result<Box<dyn Vm>> {
            Err(Error::boot("a fake boots nothing"))
        }
        async fn destroy_record(&self, _: &VmRecord) -> Result<()> {
            Ok(())
        }
    }

    fn registry() -> Registry {
        Registry::new().register("first", |_| Box::new(Fake("first", false))).register("second", |s| {
            // The settings reach the factory.
            Box::new(Fake("second", s.snapshots))
        })
    }

    #[tokio::test]
    async fn auto_takes_the_first_usable_in_registration_order() {
        let r = registry();
        assert_eq!(r.names(), ["first", "second"]);
        assert_eq!(r.choose("auto", &BackendSettings::default()).await.unwrap().name(), "second");
        let none = BackendSettings { snapshots: false, ..BackendSettings::default() };
        let e = r.choose("auto", &none).await.err().unwrap();
        assert_eq!(
            e.message(),
            "no backend can run here (first: absent; second: absent); run `vmtest doctor` for the fixes"
        );
    }

    #[tokio::test]
    async fn a_name_is_taken_as_is_and_an_unknown_one_lists_the_choices() {
        let r = registry();
        assert_eq!(r.choose("first", &BackendSettings::default()).await.unwrap().name(), "first");
        let e = r.choose("vbox", &BackendSettings::default()).await.err().unwrap();
        assert_eq!(e.message(), "unknown backend `vbox`; use one of first, second, auto");
        assert_eq!(r.build(&BackendSettings::default()).named("second").unwrap().name(), "second");
        assert!(r.build(&BackendSettings::default()).named("third").is_err());
    }
}
