//! The host side of the agent protocol: one reader task routing guest messages by command
//! id, one writer task, and the exec/file operations built on them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use vmtest_core::exec::{ExecOutput, ExecRequest, OutputMode, StdinSource};
use vmtest_core::protocol::{self, ExecStart, ExitStatus, GuestMessage, HostMessage, Stream, CHUNK_LEN};

/// Ways an agent operation fails, before the VM adds its context.
#[derive(Debug)]
pub enum AgentError {
    /// The connection ended: the guest or QEMU went away.
    Disconnected,
    /// The command's deadline passed; its process group was killed.
    TimedOut,
    /// The guest refused a file operation.
    Refused(String),
}

/// Open command routes; `None` once the connection is gone, so late callers fail at once.
type Routes = Arc<Mutex<Option<HashMap<u64, UnboundedSender<GuestMessage>>>>>;

/// A connection to one guest agent. Cheap to share behind an `Arc`.
pub struct AgentClient {
    frames: UnboundedSender<Vec<u8>>,
    routes: Routes,
    next_id: AtomicU64,
}

/// Messages not tied to a command (`Hello`, `SetupDone`).
pub type ControlReceiver = UnboundedReceiver<GuestMessage>;

impl AgentClient {
    /// Start talking over `reader`/`writer`.
    pub fn start<R, W>(reader: R, writer: W) -> (AgentClient, ControlReceiver)
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        let (frames, frames_rx) = mpsc::unbounded_channel();
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let routes: Routes = Arc::new(Mutex::new(Some(HashMap::new())));
        tokio::spawn(write_loop(writer, frames_rx));
        tokio::spawn(read_loop(reader, routes.clone(), control_tx));
        (AgentClient { frames, routes, next_id: AtomicU64::new(1) }, control_rx)
    }

    pub fn send(&self, msg: &HostMessage) -> Result<(), AgentError> {
        self.frames.send(protocol::encode(msg)).map_err(|_| AgentError::Disconnected)
    }

    fn open_route(&self) -> (u64, UnboundedReceiver<GuestMessage>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        if let Some(routes) = self.routes.lock().unwrap().as_mut() {
            routes.insert(id, tx);
        }
        (id, rx)
    }

    fn close_route(&self, id: u64) {
        if let Some(routes) = self.routes.lock().unwrap().as_mut() {
            routes.remove(&id);
        }
    }

    /// Run a command. `Ok` carries its status whatever it is; a command that cannot be
    /// started ends as a shell would report it (127 not found, 126 not executable) with the
    /// reason on its stderr.
    pub async fn exec(&self, req: ExecRequest) -> Result<ExecOutput, AgentError> {
        let (id, mut rx) = self.open_route();
        let result = self.exec_routed(id, &mut rx, req).await;
        self.close_route(id);
        result
    }

    async fn exec_routed(
        &self,
        id: u64,
        rx: &mut UnboundedReceiver<GuestMessage>,
        req: ExecRequest,
    ) -> Result<ExecOutput, AgentError> {
        use std::os::unix::ffi::OsStrExt;
        let started = Instant::now();
        let bytes = |s: &std::ffi::OsStr| s.as_bytes().to_vec();
        let start = ExecStart {
            id,
            argv: req.argv.iter().map(|a| bytes(a)).collect(),
            env: req
                .env
                .iter()
                .map(|(k, v)| {
                    let mut kv = bytes(k);
                    kv.push(b'=');
                    kv.extend_from_slice(v.as_bytes());
                    kv
                })
                .collect(),
            cwd: req.cwd.as_ref().map(|c| bytes(c.as_os_str())),
            uid: req.user.uid,
            gid: req.user.gid,
            groups: req.user.groups.clone(),
            stdin: !matches!(req.stdin, StdinSource::Null),
            rlimits: host_rlimits(),
            umask: Some(host_umask()),
        };
        tracing::debug!("exec #{id}: {}", req.display_argv());
        self.send(&HostMessage::Exec(start))?;
        self.feed_stdin(id, req.stdin);

        let mut out = ExecOutput {
            status: ExitStatus::Code(0),
            stdout: Vec::new(),
            stderr: Vec::new(),
            duration: Duration::ZERO,
        };
        let mut sink = req.output;
        let deadline = req.timeout.map(|t| tokio::time::Instant::now() + t);
        loop {
            let msg = match deadline {
                Some(d) => match tokio::time::timeout_at(d, rx.recv()).await {
                    Ok(m) => m,
                    Err(_) => {
                        // Kill the whole process group, give the agent a moment to report.
                        let _ = self.send(&HostMessage::Signal { id, signal: libc::SIGKILL });
                        let _ = tokio::time::timeout(
                            Duration::from_secs(2),
                            drain_until_exit(rx, &mut out, &mut sink),
                        )
                        .await;
                        return Err(AgentError::TimedOut);
                    }
                },
                None => rx.recv().await,
            };
            match msg {
                None => return Err(AgentError::Disconnected),
                Some(GuestMessage::Output { stream, data, .. }) => {
                    deliver(&mut sink, &mut out, stream, &data)
                }
                Some(GuestMessage::Exited { status, .. }) => {
                    out.status = status;
                    out.duration = started.elapsed();
                    return Ok(out);
                }
                Some(GuestMessage::SpawnFailed { error, errno, .. }) => {
                    let (code, what) = match errno {
                        libc::ENOENT => (127, "command not found in the guest"),
                        _ => (126, "cannot run command in the guest"),
                    };
                    let program =
                        req.argv.first().map(|a| a.to_string_lossy().into_owned()).unwrap_or_default();
                    let line = format!("vmtest: {what}: {program}: {error}\n");
                    deliver(&mut sink, &mut out, Stream::Stderr, line.as_bytes());
                    out.status = ExitStatus::Code(code);
                    out.duration = started.elapsed();
                    return Ok(out);
                }
                Some(_) => {}
            }
        }
    }

    fn feed_stdin(&self, id: u64, stdin: StdinSource) {
        match stdin {
            StdinSource::Null => {}
            StdinSource::Bytes(data) => {
                for chunk in data.chunks(CHUNK_LEN) {
                    let _ = self.send(&HostMessage::Stdin { id, data: chunk.to_vec() });
                }
                let _ = self.send(&HostMessage::CloseStdin { id });
            }
            StdinSource::Reader(mut reader) => {
                // A plain thread: host stdin may block forever, and must not hold up the runtime.
                let frames = self.frames.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        match reader.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                let msg = HostMessage::Stdin { id, data: buf[..n].to_vec() };
                                if frames.send(protocol::encode(&msg)).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = frames.send(protocol::encode(&HostMessage::CloseStdin { id }));
                });
            }
        }
    }

    /// Write a whole file in the guest.
    pub async fn write_file(&self, path: &[u8], mode: u32, data: &[u8]) -> Result<(), AgentError> {
        let mut first = true;
        let mut chunks: Vec<&[u8]> = data.chunks(CHUNK_LEN).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        for chunk in chunks {
            let (id, mut rx) = self.open_route();
            let sent = self.send(&HostMessage::WriteFile {
                id,
                path: path.to_vec(),
                mode,
                data: chunk.to_vec(),
                append: !first,
            });
            let reply = match sent {
                Ok(()) => rx.recv().await,
                Err(_) => None,
            };
            self.close_route(id);
            match reply {
                Some(GuestMessage::FileDone { error: None, .. }) => {}
                Some(GuestMessage::FileDone { error: Some(e), .. }) => return Err(AgentError::Refused(e)),
                _ => return Err(AgentError::Disconnected),
            }
            first = false;
        }
        Ok(())
    }

    /// Read a whole file from the guest.
    pub async fn read_file(&self, path: &[u8]) -> Result<Vec<u8>, AgentError> {
        let (id, mut rx) = self.open_route();
        let result = async {
            self.send(&HostMessage::ReadFile { id, path: path.to_vec() })?;
            let mut data = Vec::new();
            loop {
                match rx.recv().await {
                    Some(GuestMessage::FileChunk { data: d, eof, .. }) => {
                        data.extend_from_slice(&d);
                        if eof {
                            return Ok(data);
                        }
                    }
                    Some(GuestMessage::FileDone { error: Some(e), .. }) => {
                        return Err(AgentError::Refused(e))
                    }
                    Some(_) => {}
                    None => return Err(AgentError::Disconnected),
                }
            }
        }
        .await;
        self.close_route(id);
        result
    }
}

fn deliver(sink: &mut OutputMode, out: &mut ExecOutput, stream: Stream, data: &[u8]) {
    match sink {
        OutputMode::Stream(s) => s.write(stream, data),
        OutputMode::Capture => match stream {
            Stream::Stdout => out.stdout.extend_from_slice(data),
            Stream::Stderr => out.stderr.extend_from_slice(data),
        },
    }
}

async fn drain_until_exit(
    rx: &mut UnboundedReceiver<GuestMessage>,
    out: &mut ExecOutput,
    sink: &mut OutputMode,
) {
    while let Some(msg) = rx.recv().await {
        match msg {
            GuestMessage::Output { stream, data, .. } => deliver(sink, out, stream, &data),
            GuestMessage::Exited { status, .. } => {
                out.status = status;
                return;
            }
            _ => {}
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(mut writer: W, mut frames: UnboundedReceiver<Vec<u8>>) {
    while let Some(frame) = frames.recv().await {
        if writer.write_all(&frame).await.is_err() {
            return;
        }
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: R,
    routes: Routes,
    control: UnboundedSender<GuestMessage>,
) {
    loop {
        let mut prefix = [0u8; 4];
        if reader.read_exact(&mut prefix).await.is_err() {
            break;
        }
        let Ok(len) = protocol::frame_len(prefix) else { break };
        let mut body = vec![0u8; len];
        if reader.read_exact(&mut body).await.is_err() {
            break;
        }
        tracing::trace!("frame of {len} bytes from the agent");
        let msg: GuestMessage = match protocol::decode(&body) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("undecodable frame from the agent: {e}");
                break;
            }
        };
        let id = match &msg {
            GuestMessage::Started { id, .. }
            | GuestMessage::SpawnFailed { id, .. }
            | GuestMessage::Output { id, .. }
            | GuestMessage::Exited { id, .. }
            | GuestMessage::FileChunk { id, .. }
            | GuestMessage::FileDone { id, .. } => Some(*id),
            GuestMessage::Log { message } => {
                tracing::debug!("agent: {message}");
                continue;
            }
            GuestMessage::Hello(_) | GuestMessage::SetupDone { .. } => None,
        };
        match id {
            Some(id) => {
                if let Some(route) = routes.lock().unwrap().as_ref().and_then(|r| r.get(&id)) {
                    let _ = route.send(msg);
                }
            }
            None => {
                let _ = control.send(msg);
            }
        }
    }
    // Wake every waiter: the connection is gone.
    routes.lock().unwrap().take();
}

/// This process's resource limits, which a command run on the host would inherit.
fn host_rlimits() -> Vec<vmtest_core::protocol::Rlimit> {
    // RLIMIT_CPU (0) through RLIMIT_RTTIME (15): every limit Linux has.
    (0..16u32)
        .filter_map(|resource| {
            let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            // SAFETY: a valid out-pointer; an unknown resource only fails.
            let ok = unsafe { libc::getrlimit(resource as _, &mut r) } == 0;
            let value = |v: libc::rlim_t| if v == libc::RLIM_INFINITY { u64::MAX } else { v };
            ok.then(|| vmtest_core::protocol::Rlimit {
                resource,
                soft: value(r.rlim_cur),
                hard: value(r.rlim_max),
            })
        })
        .collect()
}

/// This process's umask (read by setting it and putting it back at once).
fn host_umask() -> u32 {
    // SAFETY: umask cannot fail; the value is restored right away.
    unsafe {
        let m = libc::umask(0o022);
        libc::umask(m);
        m as u32
    }
}
