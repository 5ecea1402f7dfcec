//! Exec over SSH for image-mode guests (ssh2 / libssh2).
//!
//! Each run makes its own ed25519 key (`ssh-keygen` into the VM's run dir); the public half
//! reaches the guest on the kernel command line and lands in root's `authorized_keys` at
//! boot. QEMU forwards a loopback port of the host to the guest's port 22 (user networking
//! with `restrict=on`: the guest reaches nothing else). Every exec is one connection and one
//! channel; stdout and stderr stay separate; the exit status (or signal) is the channel's.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vmtest_core::exec::{ExecOutput, ExecRequest, OutputMode, StdinSource};
use vmtest_core::protocol::{ExitStatus, Stream};
use vmtest_core::{Error, Result};

/// Where and how to reach a guest's sshd.
#[derive(Clone, Debug)]
pub struct SshTarget {
    pub port: u16,
    /// The private key; its public half is `<key>.pub`.
    pub key: PathBuf,
    pub user: String,
}

/// Make a fresh key pair at `path` (and `path.pub`). Returns the public key line.
pub fn make_key(path: &Path) -> Result<String> {
    let _ = std::fs::remove_file(path);
    let out = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "vmtest", "-f"])
        .arg(path)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| {
            Error::preflight(format!("cannot run ssh-keygen: {e}; apt-get install openssh-client"))
        })?;
    if !out.status.success() {
        return Err(Error::infra(format!(
            "ssh-keygen failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let public = std::fs::read_to_string(path.with_extension("pub"))
        .map_err(|e| Error::io("cannot read the new public key".to_owned(), e))?;
    Ok(public.trim().to_owned())
}

/// The public key as the guest's setup carries it: `TYPE BASE64` (without the comment).
pub fn authorized_key(public: &str) -> String {
    let mut parts = public.split_whitespace();
    let (t, b) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    format!("{t} {b}")
}

/// A free TCP port on loopback (the kernel picks it; QEMU binds it right after).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::transient(format!("no free loopback port: {e}")))?;
    Ok(l.local_addr().map_err(|e| Error::transient(format!("no free loopback port: {e}")))?.port())
}

impl SshTarget {
    fn session(&self, timeout: Duration) -> std::result::Result<ssh2::Session, String> {
        let tcp = TcpStream::connect_timeout(
            &([127, 0, 0, 1], self.port).into(),
            timeout.min(Duration::from_secs(10)),
        )
        .map_err(|e| format!("connect to 127.0.0.1:{}: {e}", self.port))?;
        let _ = tcp.set_nodelay(true);
        let mut s = ssh2::Session::new().map_err(|e| e.to_string())?;
        s.set_tcp_stream(tcp);
        s.set_timeout(timeout.as_millis().min(u32::MAX as u128) as u32);
        s.handshake().map_err(|e| format!("SSH handshake: {e}"))?;
        s.userauth_pubkey_file(&self.user, None, &self.key, None)
            .map_err(|e| format!("SSH key login as {}: {e}", self.user))?;
        Ok(s)
    }

    /// Wait until sshd accepts the run's key, up to `limit`.
    pub fn wait_ready(&self, limit: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        let mut last = String::new();
        while t0.elapsed() < limit {
            match self.session(Duration::from_secs(5)) {
                Ok(_) => return Ok(t0.elapsed()),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(Error::boot(format!(
            "sshd in the guest did not accept the run's key within {}s (last: {last}); \
             does the image have openssh-server?",
            limit.as_secs()
        )))
    }

    /// Run one command (blocking). `what` names it in errors.
    pub fn exec(&self, req: ExecRequest, vm: &str) -> Result<ExecOutput> {
        let t0 = Instant::now();
        let shown = req.display_argv();
        // A deadline is enforced by libssh2's per-call timeout on every read.
        let limit = req.timeout.unwrap_or(Duration::from_secs(24 * 3600));
        let timed_out = |t: Duration| {
            Error::timeout(
                &format!("`{shown}` in {vm} (over SSH)"),
                t,
                "raise --timeout, or find out why it hangs (--keep leaves the VM up to look)",
            )
        };
        let sess = self.session(limit).map_err(|e| Error::infra(format!("{vm}: {e}")))?;
        let script = vmtest_core::shell::command_script(&req, None);
        let mut command = b"sh -c ".to_vec();
        command.extend_from_slice(&vmtest_core::shell::sh_quote(&script));
        let command = String::from_utf8_lossy(&command).into_owned();
        let mut ch = sess.channel_session().map_err(|e| Error::infra(format!("{vm}: SSH channel: {e}")))?;
        ch.exec(&command).map_err(|e| Error::infra(format!("{vm}: SSH exec: {e}")))?;
        let stdin: Option<Vec<u8>> = match req.stdin {
            StdinSource::Null => None,
            StdinSource::Bytes(b) => Some(b),
            StdinSource::Reader(mut r) => {
                let mut b = Vec::new();
                let _ = r.read_to_end(&mut b);
                Some(b)
            }
        };
        if let Some(data) = stdin {
            let _ = ch.write_all(&data);
        }
        let _ = ch.send_eof();
        let mut sink = match req.output {
            OutputMode::Capture => None,
            OutputMode::Stream(s) => Some(s),
        };
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        // Read both streams without blocking on either: non-blocking mode and a short poll.
        sess.set_blocking(false);
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let mut progressed = false;
            for stream in [Stream::Stdout, Stream::Stderr] {
                let got = match stream {
                    Stream::Stdout => ch.read(&mut buf),
                    Stream::Stderr => ch.stderr().read(&mut buf),
                };
                match got {
                    Ok(0) => {}
                    Ok(n) => {
                        progressed = true;
                        match (&mut sink, stream) {
                            (Some(s), _) => s.write(stream, &buf[..n]),
                            (None, Stream::Stdout) => stdout.extend_from_slice(&buf[..n]),
                            (None, Stream::Stderr) => stderr.extend_from_slice(&buf[..n]),
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(Error::infra(format!("{vm}: reading over SSH: {e}"))),
                }
            }
            if !progressed {
                if ch.eof() {
                    break;
                }
                if t0.elapsed() > limit {
                    return Err(timed_out(limit));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        sess.set_blocking(true);
        let _ = ch.wait_close();
        let status = match ch.exit_signal().ok().and_then(|s| s.exit_signal) {
            Some(sig) => ExitStatus::Signal(signal_number(&sig)),
            None => ExitStatus::Code(ch.exit_status().map_err(|e| Error::infra(format!("{vm}: {e}")))?),
        };
        Ok(ExecOutput { status, stdout, stderr, duration: t0.elapsed() })
    }
}

/// `KILL` -> 9, as SSH names signals without the `SIG` prefix.
fn signal_number(name: &str) -> i32 {
    match name {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "ILL" => 4,
        "ABRT" => 6,
        "FPE" => 8,
        "KILL" => 9,
        "SEGV" => 11,
        "PIPE" => 13,
        "ALRM" => 14,
        "TERM" => 15,
        "USR1" => 10,
        "USR2" => 12,
        _ => 0,
    }
}

/// Turn a blocking SSH call into an async one.
pub async fn exec_async(target: SshTarget, req: ExecRequest, vm: String) -> Result<ExecOutput> {
    tokio::task::spawn_blocking(move || target.exec(req, &vm))
        .await
        .map_err(|e| Error::infra(format!("SSH exec task: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_authorized_key_has_no_comment() {
        assert_eq!(authorized_key("ssh-ed25519 AAAAC3Nz vmtest"), "ssh-ed25519 AAAAC3Nz");
        assert_eq!(signal_number("KILL"), 9);
    }
}
