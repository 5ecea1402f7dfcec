//! The serial console: a byte stream teed to `console.log`, kept in memory for `wait_for`
//! and for the console tail shown when a boot fails.

use crate::error::{Error, Result};
use async_trait::async_trait;
use regex::bytes::Regex;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

/// A VM's serial console.
#[async_trait]
pub trait Console: Send {
    /// Wait until output that arrived after the previous match (or after this handle was
    /// made) matches `pattern`; return the matched text.
    async fn wait_for(&mut self, pattern: &Regex, timeout: Duration) -> Result<String>;

    /// Type bytes into the console.
    async fn send(&mut self, data: &[u8]) -> Result<()>;

    /// The last `lines` lines of everything the console printed.
    fn tail(&self, lines: usize) -> String;

    /// The next bytes after the cursor, waiting until there are some; `None` once the
    /// console is closed. For interactive use (`vmtest console`).
    async fn read(&mut self) -> Option<Vec<u8>>;
}

/// Memory kept for matching and tails; older output lives only in `console.log`.
const KEEP_BYTES: usize = 1 << 20;

struct Buffer {
    /// Absolute offset of `data[0]` in the whole stream.
    base: u64,
    data: Vec<u8>,
}

type Writer = Arc<tokio::sync::Mutex<Option<Box<dyn AsyncWrite + Send + Unpin>>>>;

/// The shared console state of one VM. Cheap to clone.
#[derive(Clone)]
pub struct ConsoleLog {
    buffer: Arc<Mutex<Buffer>>,
    /// Total bytes seen so far; also signals end of stream by closing.
    seen: watch::Receiver<u64>,
    writer: Writer,
}

impl ConsoleLog {
    /// Start reading `reader` into memory and into `log_path` (appended). `writer` is where
    /// [`Console::send`] goes, if the console takes input.
    pub fn spawn<R>(
        reader: R,
        writer: Option<Box<dyn AsyncWrite + Send + Unpin>>,
        log_path: &Path,
    ) -> Result<Self>
    where
        R: AsyncRead + Send + Unpin + 'static,
    {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .map_err(|e| Error::io(format!("cannot open console log {}", log_path.display()), e))?;
        let buffer = Arc::new(Mutex::new(Buffer { base: 0, data: Vec::new() }));
        let (tx, seen) = watch::channel(0u64);
        tokio::spawn(pump(reader, tokio::fs::File::from_std(file), buffer.clone(), tx));
        Ok(ConsoleLog { buffer, seen, writer: Arc::new(tokio::sync::Mutex::new(writer)) })
    }

    /// A new handle whose `wait_for` sees only output from now on.
    pub fn handle(&self) -> ConsoleHandle {
        let cursor = *self.seen.borrow();
        ConsoleHandle { log: self.clone(), cursor }
    }

    /// A handle that also sees everything already printed.
    pub fn handle_from_start(&self) -> ConsoleHandle {
        ConsoleHandle { log: self.clone(), cursor: 0 }
    }

    /// Wait up to `limit` for the console stream to end (the VM's side closed and everything
    /// it wrote has been read), so a tail taken afterwards holds the VM's last words.
    pub async fn wait_closed(&self, limit: Duration) -> bool {
        let mut seen = self.seen.clone();
        let closed = async { while seen.changed().await.is_ok() {} };
        tokio::time::timeout(limit, closed).await.is_ok()
    }

    /// The last `lines` lines printed, lossily decoded, without carriage returns.
    pub fn tail(&self, lines: usize) -> String {
        let buf = self.buffer.lock().unwrap();
        tail_lines(&buf.data, lines)
    }
}

async fn pump<R: AsyncRead + Unpin>(
    mut reader: R,
    mut file: tokio::fs::File,
    buffer: Arc<Mutex<Buffer>>,
    seen: watch::Sender<u64>,
) {
    let mut chunk = vec![0u8; 16 << 10];
    loop {
        let n = match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let _ = file.write_all(&chunk[..n]).await;
        let total = {
            let mut buf = buffer.lock().unwrap();
            buf.data.extend_from_slice(&chunk[..n]);
            if buf.data.len() > 2 * KEEP_BYTES {
                let drop = buf.data.len() - KEEP_BYTES;
                buf.data.drain(..drop);
                buf.base += drop as u64;
            }
            buf.base + buf.data.len() as u64
        };
        seen.send_replace(total);
    }
    let _ = file.flush().await;
}

/// One reader's view of a console, with its own "after the last match" cursor.
pub struct ConsoleHandle {
    log: ConsoleLog,
    cursor: u64,
}

impl ConsoleHandle {
    /// Look for `pattern` in what arrived after the cursor; on a match, move the cursor past it.
    fn try_match(&mut self, pattern: &Regex) -> Option<String> {
        let buf = self.log.buffer.lock().unwrap();
        let start = self.cursor.saturating_sub(buf.base) as usize;
        let hay = &buf.data[start.min(buf.data.len())..];
        let m = pattern.find(hay)?;
        self.cursor = buf.base + (start + m.end()) as u64;
        Some(String::from_utf8_lossy(m.as_bytes()).into_owned())
    }
}

#[async_trait]
impl Console for ConsoleHandle {
    async fn wait_for(&mut self, pattern: &Regex, timeout: Duration) -> Result<String> {
        let mut seen = self.log.seen.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(m) = self.try_match(pattern) {
                return Ok(m);
            }
            match tokio::time::timeout_at(deadline, seen.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => {
                    // The stream ended; one last look at what it left.
                    return self.try_match(pattern).ok_or_else(|| {
                        Error::infra(format!("console closed before `{pattern}` appeared"))
                            .with_detail(self.tail(20))
                    });
                }
                Err(_) => {
                    return Err(Error::timeout(
                        &format!("waiting for `{pattern}` on the console"),
                        timeout,
                        "check the console log for what the guest printed instead",
                    )
                    .with_detail(self.tail(20)))
                }
            }
        }
    }

    async fn send(&mut self, data: &[u8]) -> Result<()> {
        let mut w = self.log.writer.lock().await;
        let w = w.as_mut().ok_or_else(|| Error::infra("this console does not take input"))?;
        w.write_all(data).await.map_err(|e| Error::io("cannot write to the console", e))?;
        w.flush().await.map_err(|e| Error::io("cannot write to the console", e))
    }

    fn tail(&self, lines: usize) -> String {
        self.log.tail(lines)
    }

    async fn read(&mut self) -> Option<Vec<u8>> {
        let mut seen = self.log.seen.clone();
        loop {
            {
                let buf = self.log.buffer.lock().unwrap();
                let start = self.cursor.saturating_sub(buf.base) as usize;
                if start < buf.data.len() {
                    self.cursor = buf.base + buf.data.len() as u64;
                    return Some(buf.data[start..].to_vec());
                }
            }
            seen.changed().await.ok()?;
        }
    }
}

/// The last `n` lines of `data`, lossily decoded, carriage returns removed.
pub fn tail_lines(data: &[u8], n: usize) -> String {
    let text = String::from_utf8_lossy(data).replace('\r', "");
    let lines: Vec<&str> = text.trim_end_matches('\n').lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wait_for_only_sees_output_after_the_last_match() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut guest, host) = tokio::io::duplex(1024);
        let log = ConsoleLog::spawn(host, None, &tmp.path().join("console.log")).unwrap();
        let mut con = log.handle();
        guest.write_all(b"login: \r\nlogin: \r\n").await.unwrap();
        let re = Regex::new("login: ").unwrap();
        assert_eq!(con.wait_for(&re, Duration::from_secs(5)).await.unwrap(), "login: ");
        assert_eq!(con.wait_for(&re, Duration::from_secs(5)).await.unwrap(), "login: ");
        // Both matches are consumed: a third wait must time out rather than re-match.
        let e = con.wait_for(&re, Duration::from_millis(100)).await.unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Timeout);
        guest.write_all(b"ready\n").await.unwrap();
        drop(guest);
        let ready = Regex::new("rea.y").unwrap();
        assert_eq!(con.wait_for(&ready, Duration::from_secs(5)).await.unwrap(), "ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let logged = std::fs::read(tmp.path().join("console.log")).unwrap();
        assert_eq!(logged, b"login: \r\nlogin: \r\nready\n");
        assert_eq!(log.tail(2), "login: \nready");
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail_lines(b"a\nb\r\nc\n", 2), "b\nc");
        assert_eq!(tail_lines(b"", 5), "");
    }
}
