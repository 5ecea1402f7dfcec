//! A hypervisor for the run loop's tests (never built outside them): a guest is a directory,
//! its commands run there on the host with `sh`, saving copies the directory, and a restore
//! refuses a saved state that is damaged or made for other NICs, as a real one would.

use crate::console::Console;
use crate::error::{Error, Result};
use crate::exec::{ExecOutput, ExecRequest};
use crate::hypervisor::{Capabilities, Hypervisor, Preflight, Vm};
use crate::protocol::ExitStatus;
use crate::spec::VmSpec;
use crate::state::{RunDir, VmRecord};
use async_trait::async_trait;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a whole saved state holds in its `state` file.
const STATE: &str = "fake saved state v1\n";

pub(super) struct FakeHv {
    pub store: Option<PathBuf>,
    /// What [`Hypervisor::state_identity`] says (a test changes it as a new image would).
    pub identity: Mutex<String>,
    /// What happened, in order: `boot VM`, `restore VM`, `save VM` (VM names are
    /// `vmt-<run>-<node>`).
    pub log: Arc<Mutex<Vec<String>>>,
}

impl FakeHv {
    pub fn new(store: Option<PathBuf>) -> FakeHv {
        FakeHv { store, identity: Mutex::new("fake-1".into()), log: Arc::default() }
    }

    /// The log entries that start with `what` (`boot`, `restore`, `save`).
    pub fn logged(&self, what: &str) -> Vec<String> {
        let log = self.log.lock().unwrap();
        log.iter().filter(|l| l.starts_with(&format!("{what} "))).cloned().collect()
    }

    pub fn clear_log(&self) {
        self.log.lock().unwrap().clear();
    }
}

#[async_trait]
impl Hypervisor for FakeHv {
    fn name(&self) -> &'static str {
        "fake"
    }

    async fn preflight(&self) -> Preflight {
        Preflight::default()
    }

    fn private_networks(&self) -> bool {
        true
    }

    async fn launch(&self, spec: &VmSpec, dir: &RunDir) -> Result<Box<dyn Vm>> {
        let root = dir.vm_dir(&spec.node)?.join("root");
        std::fs::create_dir_all(&root).map_err(|e| Error::io("fake: root", e))?;
        let nics = format!("{:?}", spec.nics.iter().map(|n| (n.mac, n.address)).collect::<Vec<_>>());
        match &spec.resume {
            Some(saved) => {
                restore(saved, &root, &nics)?;
                self.log.lock().unwrap().push(format!("restore {}", spec.name));
            }
            None => {
                write(&root.join("hostname"), &spec.node)?;
                write(&root.join(".nics"), &nics)?;
                self.log.lock().unwrap().push(format!("boot {}", spec.name));
            }
        }
        Ok(Box::new(FakeVm { name: spec.name.clone(), root, log: self.log.clone() }))
    }

    async fn destroy_record(&self, _: &VmRecord) -> Result<()> {
        Ok(())
    }

    fn checkpoint_store(&self) -> Option<PathBuf> {
        self.store.clone()
    }

    async fn state_identity(&self, spec: &VmSpec) -> Result<String> {
        Ok(format!("{} {:?}", self.identity.lock().unwrap(), spec.boot))
    }
}

/// Fill `root` from the state saved in `saved`, which must be whole and made for `nics`.
fn restore(saved: &Path, root: &Path, nics: &str) -> Result<()> {
    if std::fs::read_to_string(saved.join("state")).ok().as_deref() != Some(STATE) {
        return Err(Error::boot(format!("fake: {} holds no whole saved state", saved.display())));
    }
    copy_dir(&saved.join("root"), root)?;
    if std::fs::read_to_string(root.join(".nics")).ok().as_deref() != Some(nics) {
        return Err(Error::boot(format!("fake: the state in {} was saved with other NICs", saved.display())));
    }
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::io(format!("fake: {}", path.display()), e))
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    let io = |e| Error::io(format!("fake: copy {}", from.display()), e);
    std::fs::create_dir_all(to).map_err(io)?;
    for e in std::fs::read_dir(from).map_err(io)? {
        let p = e.map_err(io)?.path();
        let target = to.join(p.file_name().expect("a dir entry has a name"));
        if p.is_dir() {
            copy_dir(&p, &target)?;
        } else {
            std::fs::copy(&p, &target).map_err(io)?;
        }
    }
    Ok(())
}

struct FakeVm {
    name: String,
    root: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
}

impl FakeVm {
    fn guest(&self, path: &Path) -> PathBuf {
        self.root.join(path.strip_prefix("/").unwrap_or(path))
    }
}

#[async_trait]
impl Vm for FakeVm {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { network: true, snapshots: true, ..Capabilities::default() }
    }

    async fn exec(&self, req: ExecRequest) -> Result<ExecOutput> {
        let out = tokio::process::Command::new(&req.argv[0])
            .args(&req.argv[1..])
            .current_dir(&self.root)
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| Error::io("fake: exec", e))?;
        let status = ExitStatus::Code(out.status.code().unwrap_or(-1));
        Ok(ExecOutput { status, stdout: out.stdout, stderr: out.stderr, duration: Duration::ZERO })
    }

    async fn copy_in(&self, host: &Path, guest: &Path) -> Result<()> {
        std::fs::copy(host, self.guest(guest)).map(|_| ()).map_err(|e| Error::io("fake: copy in", e))
    }

    async fn copy_out(&self, guest: &Path, host: &Path) -> Result<()> {
        std::fs::copy(self.guest(guest), host).map(|_| ()).map_err(|e| Error::io("fake: copy out", e))
    }

    fn console(&self) -> Result<Box<dyn Console>> {
        Err(Error::usage("fake: no console"))
    }

    async fn shutdown(&self) -> Result<()> {
        Ok(())
    }

    async fn kill(&self) -> Result<()> {
        Ok(())
    }

    fn detach(&self) {}

    async fn save(&self, dir: &Path) -> Result<()> {
        copy_dir(&self.root, &dir.join("root"))?;
        write(&dir.join("state"), STATE)?;
        self.log.lock().unwrap().push(format!("save {}", self.name));
        Ok(())
    }
}
