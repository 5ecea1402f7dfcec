//! A terminal device (the host end of an nmdm pair) as an async byte stream, in raw mode:
//! opened by this process, or through the privilege prefix when only root may open it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::process::{ChildStdin, ChildStdout};

/// Open a tty non-blocking, without making it our controlling terminal, and make it raw.
pub fn open_raw(path: &Path) -> io::Result<(TtyHalf, TtyHalf)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: a valid C string; the fd is owned right away.
    let fd =
        unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just opened.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: termios is plain data; tcgetattr fills it.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd.as_raw_fd(), &mut t) == 0 {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(fd.as_raw_fd(), libc::TCSANOW, &t);
        }
    }
    // SAFETY: we own the fd and it stays open as long as the AsyncFd (which owns it) lives.
    let fd = Arc::new(unsafe { AsyncFd::register(fd) }.map_err(|e| io::Error::other(e.to_string()))?);
    Ok((TtyHalf(fd.clone()), TtyHalf(fd)))
}

/// The relay that runs as root: it opens the tty (`$1`), makes it raw, copies it to stdout in
/// the background and stdin to it. Plain `sh`, `stty` and `cat`: they exist on every host.
const RELAY: &str = r#"exec 3<>"$1" || exit 1
stty raw -echo <&3 2>/dev/null
cat <&3 &
exec cat >&3"#;

/// Open a tty only root may open (nmdm nodes are root:wheel 0600) through the host's privilege
/// prefix: a relay process holds it, and its stdin and stdout are the two halves. Dropping
/// the reader ends the relay.
pub async fn open_privileged(
    host: &crate::host::HostCommand,
    path: &Path,
) -> io::Result<(RelayReader, ChildStdin)> {
    // Like a direct open: not there yet (bhyve makes the pair when it opens its side).
    if !path.exists() {
        return Err(io::Error::from(io::ErrorKind::NotFound));
    }
    let args = ["-c".to_owned(), RELAY.to_owned(), "sh".to_owned(), path.display().to_string()];
    let argv = host.argv("sh", &args, true).map_err(|e| io::Error::other(e.message().to_owned()))?;
    tracing::debug!("console relay: {}", vmtest_core::exec::display_argv(&argv));
    let mut child = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    // A relay that cannot open the tty (or a prefix that refuses) ends at once.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    if let Some(status) = child.try_wait()? {
        return Err(io::Error::other(format!(
            "the console relay through {} ended at once ({status}): it may not run `sh` as root, or cannot \
             open {}",
            host.privilege.program().unwrap_or("the privilege prefix"),
            path.display()
        )));
    }
    let stdin = child.stdin.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    Ok((RelayReader { stdout, _child: child }, stdin))
}

/// The reading half of a privileged relay; owns the relay process.
pub struct RelayReader {
    stdout: ChildStdout,
    _child: tokio::process::Child,
}

impl AsyncRead for RelayReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stdout).poll_read(cx, buf)
    }
}

/// One half (reading or writing) of a shared non-blocking tty.
pub struct TtyHalf(Arc<AsyncFd<OwnedFd>>);

impl AsyncRead for TtyHalf {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            // SAFETY: reads into a valid, initialised buffer of the given length.
            let r = guard.try_io(|fd| {
                let n = unsafe { libc::read(fd.as_raw_fd(), unfilled.as_mut_ptr().cast(), unfilled.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match r {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // The other end closed (EIO on a pty): the end of the stream.
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Poll::Ready(Ok(())),
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for TtyHalf {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.poll_write_ready(cx))?;
            // SAFETY: writes from a valid buffer of the given length.
            let r = guard.try_io(|fd| {
                let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match r {
                Ok(res) => return Poll::Ready(res),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
