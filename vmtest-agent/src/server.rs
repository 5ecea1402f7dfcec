//! Serving the host: one reader loop on the port, one writer thread, a few threads per command.

use crate::{init, sys};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmtest_core::protocol::{
    self, AgentHello, ExecStart, ExitStatus, GuestMessage, HostMessage, Stream, CHUNK_LEN, PROTOCOL_VERSION,
};

/// A running command: its process group, and the feed of its stdin while that is open.
struct Running {
    pgid: i32,
    stdin: Option<Sender<Vec<u8>>>,
}

type Table = Arc<Mutex<HashMap<u64, Running>>>;

/// How long output may keep arriving after the command exited (a background child holding
/// the pipe must not hold up the exit status forever).
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// Serve the host on `port` until it asks to shut down. As init, a host that disconnects
/// (a kept VM whose runner exited) is waited for, not treated as the end.
///
/// The port stays open across disconnects: closing it would make the guest driver discard
/// data a reconnecting host already sent, and a read on a port with no host simply returns
/// end-of-file until one connects.
pub fn serve(port: &Path, as_init: bool) -> io::Result<()> {
    // The agent leads a session of its own, with no controlling terminal, so each command
    // is a member of a real session and never its leader: as under a shell or cargo on the
    // host, a command that opens a terminal without O_NOCTTY does not make it its
    // controlling terminal (and is not hung up when it closes it). Already a session
    // leader (a service in an image): nothing to do.
    // SAFETY: setsid takes no arguments.
    unsafe { libc::setsid() };
    let table: Table = Arc::default();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(port)
        .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", port.display())))?;
    let (tx, rx) = mpsc::channel::<GuestMessage>();
    let writer = file.try_clone()?;
    std::thread::spawn(move || write_loop(writer, rx));
    let _ = tx.send(GuestMessage::Hello(AgentHello {
        protocol: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        kernel_release: sys::kernel_release(),
        uptime_ms: sys::uptime_ms(),
        init_ms: init::INIT_MS.load(std::sync::atomic::Ordering::Relaxed),
        modules_ms: init::MODULES_MS.load(std::sync::atomic::Ordering::Relaxed),
    }));
    loop {
        // A fresh buffer per connection: nothing of a half-sent frame carries over.
        let mut reader = BufReader::with_capacity(CHUNK_LEN + 64, &file);
        loop {
            match protocol::read_frame::<_, HostMessage>(&mut reader) {
                Ok(Some(msg)) => handle(msg, &tx, &table),
                Ok(None) => break,
                Err(e) => {
                    eprintln!("vmtest-agent: bad frame from host: {e}");
                    break;
                }
            }
        }
        if !as_init {
            return Ok(());
        }
        // No host now; wait for the next one.
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn write_loop(mut port: File, rx: mpsc::Receiver<GuestMessage>) {
    for msg in rx {
        // A write blocks while no host is connected and goes to the next one; a failed
        // write means the host is gone, which the reader notices.
        let _ = protocol::write_frame(&mut port, &msg);
    }
}

fn handle(msg: HostMessage, tx: &Sender<GuestMessage>, table: &Table) {
    match msg {
        HostMessage::Setup(setup) => {
            let error = init::setup(&setup).err().map(|e| e.to_string());
            let _ = tx.send(GuestMessage::SetupDone { error });
        }
        HostMessage::Exec(start) => exec(start, tx.clone(), table.clone()),
        HostMessage::Stdin { id, data } => {
            if let Some(Running { stdin: Some(feed), .. }) = table.lock().unwrap().get(&id) {
                let _ = feed.send(data);
            }
        }
        HostMessage::CloseStdin { id } => {
            if let Some(r) = table.lock().unwrap().get_mut(&id) {
                r.stdin = None;
            }
        }
        HostMessage::Signal { id, signal } => {
            if let Some(r) = table.lock().unwrap().get(&id) {
                // SAFETY: kill takes plain integers.
                unsafe {
                    // No such group yet: the child has not reached its setpgid. It is
                    // alone then, and its pid is the group's id to be.
                    if libc::kill(-r.pgid, signal) < 0 {
                        libc::kill(r.pgid, signal);
                    }
                }
            }
        }
        HostMessage::WriteFile { id, path, mode, data, append } => {
            let error = write_file(&path, mode, &data, append).err().map(|e| e.to_string());
            let _ = tx.send(GuestMessage::FileDone { id, error });
        }
        HostMessage::ReadFile { id, path } => {
            let tx = tx.clone();
            std::thread::spawn(move || read_file(id, &path, &tx));
        }
        HostMessage::Shutdown => sys::power_off(),
    }
}

fn write_file(path: &[u8], mode: u32, data: &[u8], append: bool) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = Path::new(OsStr::from_bytes(path));
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .mode(mode)
        // The agent leads a session: a terminal it opens must not become its own.
        .custom_flags(libc::O_NOCTTY)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    f.write_all(data)
}

fn read_file(id: u64, path: &[u8], tx: &Sender<GuestMessage>) {
    use std::os::unix::fs::OpenOptionsExt;
    let path = Path::new(OsStr::from_bytes(path));
    // O_NOCTTY: see `write_file`.
    let mut f = match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOCTTY).open(path) {
        Ok(f) => f,
        Err(e) => {
            let _ = tx.send(GuestMessage::FileDone { id, error: Some(format!("{}: {e}", path.display())) });
            return;
        }
    };
    let mut buf = vec![0u8; CHUNK_LEN];
    loop {
        match f.read(&mut buf) {
            Ok(0) => {
                let _ = tx.send(GuestMessage::FileChunk { id, data: Vec::new(), eof: true });
                return;
            }
            Ok(n) => {
                let _ = tx.send(GuestMessage::FileChunk { id, data: buf[..n].to_vec(), eof: false });
            }
            Err(e) => {
                let _ =
                    tx.send(GuestMessage::FileDone { id, error: Some(format!("{}: {e}", path.display())) });
                return;
            }
        }
    }
}

fn exec(start: ExecStart, tx: Sender<GuestMessage>, table: Table) {
    let id = start.id;
    let fail = |error: String, errno: i32| {
        let _ = tx.send(GuestMessage::SpawnFailed { id, error, errno });
    };
    let Some((program, args)) = start.argv.split_first() else {
        return fail("empty argv".into(), libc::EINVAL);
    };
    if let Some(cwd) = &start.cwd {
        if !Path::new(OsStr::from_bytes(cwd)).is_dir() {
            let shown = String::from_utf8_lossy(cwd);
            return fail(format!("working directory {shown} does not exist in the guest"), libc::ENOTDIR);
        }
    }
    let mut cmd = Command::new(OsStr::from_bytes(program));
    cmd.args(args.iter().map(|a| OsStr::from_bytes(a)));
    cmd.env_clear();
    for kv in &start.env {
        if let Some(eq) = kv.iter().position(|b| *b == b'=') {
            cmd.env(OsStr::from_bytes(&kv[..eq]), OsStr::from_bytes(&kv[eq + 1..]));
        }
    }
    if let Some(cwd) = &start.cwd {
        cmd.current_dir(OsStr::from_bytes(cwd));
    }
    cmd.stdin(if start.stdin { Stdio::piped() } else { Stdio::null() });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    // Its own process group, so that a signal from the host reaches all of it; but not a
    // session of its own (see `serve`).
    cmd.process_group(0);
    let (uid, gid, groups) = (start.uid, start.gid, start.groups.clone());
    let (rlimits, umask) = (start.rlimits.clone(), start.umask);
    // SAFETY: only async-signal-safe calls between fork and exec; `groups` and `rlimits`
    // were allocated before.
    unsafe {
        cmd.pre_exec(move || {
            sys::host_like_process(&rlimits, umask);
            if libc::setgroups(groups.len(), groups.as_ptr()) < 0
                || libc::setgid(gid) < 0
                || libc::setuid(uid) < 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return fail(e.to_string(), e.raw_os_error().unwrap_or(0)),
    };
    let pid = child.id();
    let _ = tx.send(GuestMessage::Started { id, pid });

    let stdin_feed = child.stdin.take().map(|mut stdin| {
        let (feed, chunks) = mpsc::channel::<Vec<u8>>();
        std::thread::spawn(move || {
            for chunk in chunks {
                if stdin.write_all(&chunk).is_err() {
                    return; // the command closed its stdin
                }
            }
        });
        feed
    });
    table.lock().unwrap().insert(id, Running { pgid: pid as i32, stdin: stdin_feed });

    let (done_tx, done_rx) = mpsc::channel::<()>();
    for (pipe, stream) in [
        (child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>), Stream::Stdout),
        (child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>), Stream::Stderr),
    ] {
        let (tx, done) = (tx.clone(), done_tx.clone());
        if let Some(pipe) = pipe {
            std::thread::spawn(move || {
                forward(id, stream, pipe, &tx);
                let _ = done.send(());
            });
        }
    }
    drop(done_tx);
    std::thread::spawn(move || {
        let status = match child.wait() {
            Ok(s) => match (s.code(), s.signal()) {
                (Some(c), _) => ExitStatus::Code(c),
                (None, Some(sig)) => ExitStatus::Signal(sig),
                _ => ExitStatus::Code(255),
            },
            Err(_) => ExitStatus::Code(255),
        };
        let deadline = std::time::Instant::now() + DRAIN_AFTER_EXIT;
        for _ in 0..2 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if done_rx.recv_timeout(left).is_err() {
                break;
            }
        }
        table.lock().unwrap().remove(&id);
        let _ = tx.send(GuestMessage::Exited { id, status });
    });
}

fn forward(id: u64, stream: Stream, mut pipe: Box<dyn Read + Send>, tx: &Sender<GuestMessage>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx.send(GuestMessage::Output { id, stream, data: buf[..n].to_vec() }).is_err() {
                    return;
                }
            }
        }
    }
}
