//! Image mode, running: a guest boots a throwaway qcow2 overlay on a cached base image.
//!
//! Boot is direct, as in kernel mode and through the same plan (see [`crate::boot`]): the
//! image's own kernel (copied out at build time, its ELF vmlinux extracted once for PVH) and
//! a vmtest initramfs with the image's virtio/ext4 modules and `vmtest-agent` as `/init`. The
//! agent mounts `/dev/vda` (the overlay), adds itself as a systemd service, a serial-console
//! autologin and the run's SSH key, and execs the image's `/sbin/init`: systemd runs the
//! image's services (nginx...) as on real hardware.
//!
//! The agent (virtio-serial) always does the setup (clock, hostname, NICs, /etc/hosts) and
//! file copies. Commands go through the transport of [`ExecVia`]: the agent, SSH (ssh2, a
//! per-run key, a loopback port forward), or a `ShellSession` on the serial console; this
//! module waits for that transport and routes commands through it.
//! A guest starts from the image's snapshot when there is one ([`crate::snapshot`]), or from
//! a test checkpoint ([`vmtest_core::spec::VmSpec::resume`]), and can be saved itself.

use crate::ssh::SshTarget;
use crate::vm::QemuVm;
use crate::QemuBackend;
use async_trait::async_trait;
use std::path::Path;
use std::time::{Duration, Instant};
use vmtest_core::console::Console;
use vmtest_core::exec::{ExecOutput, ExecRequest};
use vmtest_core::shell::{ShellOptions, ShellSession};
use vmtest_core::spec::{ExecVia, VmSpec};
use vmtest_core::state::RunDir;
use vmtest_core::{Capabilities, Error, Result, Vm};

/// Boot a guest of `spec` from its image, and wait for the transport its commands take.
pub(crate) async fn launch(b: &QemuBackend, spec: &VmSpec, run: &RunDir) -> Result<Box<dyn Vm>> {
    let started = b.start(spec, run).await?;
    let (mut inner, ssh) = (started.vm, started.ssh);
    let console = match (spec.resume.is_some(), started.restored) {
        (true, _) => SerialState::InSession,
        (false, true) => SerialState::AtPrompt,
        (false, false) => SerialState::Booting,
    };
    // What is left of the boot timeout, and at least 10s.
    let left = || spec.boot_timeout.saturating_sub(started.since.elapsed()).max(Duration::from_secs(10));
    let mut shell = None;
    match spec.exec {
        ExecVia::Agent => {}
        ExecVia::Ssh => wait_for_sshd(&mut inner, ssh.clone().expect("ssh target"), left()).await?,
        ExecVia::Serial => {
            shell = Some(tokio::sync::Mutex::new(serial_shell(&mut inner, left(), console).await?))
        }
    }
    Ok(Box::new(ImageVm { inner, via: spec.exec, ssh, shell }))
}

/// Wait up to `limit` for the guest's sshd to take the run's key (the guest is killed if not).
async fn wait_for_sshd(inner: &mut QemuVm, target: SshTarget, limit: Duration) -> Result<()> {
    let took = tokio::task::spawn_blocking(move || target.wait_ready(limit))
        .await
        .map_err(|e| Error::infra(format!("ssh wait: {e}")))?;
    match took {
        Ok(d) => {
            inner.add_timing_last("ssh-ready", d);
            Ok(())
        }
        Err(e) => {
            let _ = inner.kill().await;
            let tail = inner.console_log().tail(30);
            Err(e.with_detail(format!("console (last lines):\n{tail}")))
        }
    }
}

/// A shell session on the serial console, within `ready_timeout` (the guest is killed if not).
/// Wait for the autologin's root prompt: the shell's setup must reach the shell, not the
/// tty before getty opens it (agetty flushes pending input). A guest restored at the
/// prompt is asked for a new one at once.
async fn wait_for_root_prompt(
    console: &mut Box<dyn vmtest_core::console::Console>,
    state: SerialState,
    limit: Duration,
) -> Result<()> {
    let prompt = regex::bytes::Regex::new(r"root@\S+:\S*# *$").expect("a valid regex");
    let deadline = Instant::now() + limit;
    if state == SerialState::AtPrompt {
        console.send(b"\r").await?;
    }
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::boot(
                "no root shell appeared on the serial console (is serial-getty@ttyS0 in the image?)",
            ));
        }
        match console.wait_for(&prompt, left.min(Duration::from_secs(3))).await {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == vmtest_core::ErrorKind::Timeout => console.send(b"\r").await?,
            Err(e) => return Err(e),
        }
    }
}

/// Where a guest's serial console is when its transport is set up.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SerialState {
    /// Booting: the autologin's prompt is still to come.
    Booting,
    /// Restored from a snapshot: the root shell printed its prompt before it was saved.
    AtPrompt,
    /// Resumed from a checkpoint: the shell session of the saved run is there, promptless.
    InSession,
}

/// A shell session on the serial console, within `ready_timeout` (the guest is killed if not).
async fn serial_shell(
    inner: &mut QemuVm,
    ready_timeout: Duration,
    state: SerialState,
) -> Result<ShellSession> {
    let t1 = Instant::now();
    let opts =
        ShellOptions { login: None, exec_sh: true, ready_timeout, nudge_every: Duration::from_secs(2) };
    let mut console = inner.console()?;
    if state != SerialState::InSession {
        if let Err(e) = wait_for_root_prompt(&mut console, state, ready_timeout).await {
            let _ = inner.kill().await;
            return Err(e.with_detail(inner.console_log().tail(30)));
        }
    }
    match ShellSession::start(console, opts).await {
        Ok(s) => {
            inner.add_timing_last("shell-ready", t1.elapsed());
            Ok(s)
        }
        Err(e) => {
            let _ = inner.kill().await;
            Err(e)
        }
    }
}

/// A guest booted from an image.
pub(crate) struct ImageVm {
    inner: QemuVm,
    via: ExecVia,
    ssh: Option<SshTarget>,
    shell: Option<tokio::sync::Mutex<ShellSession>>,
}

#[async_trait]
impl Vm for ImageVm {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn kernel_log(&self) -> Option<Box<dyn Console>> {
        self.inner.kernel_log()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            network: true,
            snapshots: true,
            concurrent_exec: self.via != ExecVia::Serial,
            console: true,
            host_root: false,
        }
    }

    async fn exec(&self, req: ExecRequest) -> Result<ExecOutput> {
        match (self.via, &self.ssh, &self.shell) {
            (ExecVia::Ssh, Some(t), _) => {
                crate::ssh::exec_async(t.clone(), req, self.inner.name().to_owned()).await
            }
            (ExecVia::Serial, _, Some(s)) => s.lock().await.exec(req).await,
            _ => self.inner.exec(req).await,
        }
    }

    async fn copy_in(&self, host: &Path, guest: &Path) -> Result<()> {
        self.inner.copy_in(host, guest).await
    }

    async fn save(&self, dir: &Path) -> Result<()> {
        self.inner.save(dir).await
    }

    async fn copy_out(&self, guest: &Path, host: &Path) -> Result<()> {
        self.inner.copy_out(guest, host).await
    }

    fn console(&self) -> Result<Box<dyn Console>> {
        self.inner.console()
    }

    async fn shutdown(&self) -> Result<()> {
        self.inner.shutdown().await
    }

    async fn kill(&self) -> Result<()> {
        self.inner.kill().await
    }

    fn detach(&self) {
        self.inner.detach()
    }

    async fn prepare_interactive_console(&self) -> Result<()> {
        // The image's serial getty logs root in on the console already.
        Ok(())
    }

    fn boot_timings(&self) -> Vec<(&'static str, Duration)> {
        self.inner.boot_timings()
    }
}
