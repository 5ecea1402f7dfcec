//! `ShellSession`: run commands over any serial [`Console`] with a POSIX `sh` behind it.
//!
//! The protocol (reference/bhyve-falcon.md, "exec over serial"):
//! - optional login (user, then password prompt), then `exec /bin/sh` (root's shell may be csh),
//!   then `stty -echo`, empty `PS1`/`PS2`, `TERM=dumb`, line editing off, and a sync marker;
//! - every call picks a fresh nonce and ships its files (the command script, its stdin and a
//!   small wrapper) as base64 inside quoted here-documents, one line per 64 characters, so no
//!   line the guest's tty sees ever gets near 76 columns;
//! - the wrapper prints `==VMB <nonce>==`, the command's stdout in base64, `==VMM <nonce>==`,
//!   its stderr in base64 and `==VME <nonce> <status>==`. The host reads between the markers;
//!   an echoed command line never matches them (the marker text is only ever assembled by
//!   `printf` in the guest), and output cannot fake them (it is base64);
//! - each call has a host-side deadline: on expiry the host sends Ctrl-C, re-synchronises the
//!   shell and returns a Timeout error.
//!
//! Output is captured in the guest and handed over when the command ends; an output sink
//! sees it then, not live. Output is kept in the console's memory, so one call's output is
//! limited to about 700 KiB (1 MiB of base64).

use crate::console::Console;
use crate::error::{Error, ErrorKind, Result};
use crate::exec::{ExecOutput, ExecRequest, OutputMode, StdinSource};
use crate::protocol::{ExitStatus, Stream};
use regex::bytes::Regex;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, Instant};

/// Base64 characters per line sent to the guest (plus a newline: well under 76 columns, and
/// within the 64 that `openssl base64 -d` accepts).
pub const CHUNK_COLUMNS: usize = 64;

/// Where the guest keeps a call's temporary files.
const GUEST_TMP: &str = "/tmp";

/// A login at the console's `login:` prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Login {
    pub user: String,
    /// Sent when the guest asks for a password.
    pub password: Option<String>,
}

/// How to bring a console to a usable shell.
#[derive(Clone, Debug)]
pub struct ShellOptions {
    /// Log in first; `None` when a shell already runs on the console.
    pub login: Option<Login>,
    /// Replace the login shell with `/bin/sh` (root's shell may be csh or bash).
    pub exec_sh: bool,
    /// How long the whole start may take (the guest may still be booting).
    pub ready_timeout: Duration,
    /// How often to nudge the console (a CR, a new sync marker) while waiting.
    pub nudge_every: Duration,
}

impl Default for ShellOptions {
    fn default() -> Self {
        ShellOptions {
            login: None,
            exec_sh: true,
            ready_timeout: Duration::from_secs(120),
            nudge_every: Duration::from_secs(3),
        }
    }
}

/// How one shell call ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShellOutput {
    /// The exit status `sh` reported (128 + N when killed by signal N).
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// A shell on a serial console, ready for commands.
pub struct ShellSession {
    console: Box<dyn Console>,
    /// Set when the shell could not be re-synchronised after a timeout.
    broken: bool,
}

impl ShellSession {
    /// Log in (if asked), start `/bin/sh`, prepare it and wait until it answers. `console`
    /// should see output from the start (e.g. `ConsoleLog::handle_from_start`) so a login
    /// prompt printed before the call is not missed.
    pub async fn start(console: Box<dyn Console>, opts: ShellOptions) -> Result<ShellSession> {
        let mut s = ShellSession { console, broken: false };
        let deadline = Instant::now() + opts.ready_timeout;
        if let Some(login) = &opts.login {
            s.login(login, deadline, opts.nudge_every).await?;
        }
        if opts.exec_sh {
            s.console.send(b"exec /bin/sh\n").await?;
        }
        for line in SETUP {
            s.console.send(line.as_bytes()).await?;
            s.console.send(b"\n").await?;
        }
        s.sync(deadline, opts.nudge_every).await?;
        Ok(s)
    }

    /// Use a console on which a prepared shell already answers (no login, no setup).
    pub async fn resume(console: Box<dyn Console>, timeout: Duration) -> Result<ShellSession> {
        let mut s = ShellSession { console, broken: false };
        s.console.send(b"\n").await?;
        for line in SETUP {
            s.console.send(line.as_bytes()).await?;
            s.console.send(b"\n").await?;
        }
        s.sync(Instant::now() + timeout, Duration::from_secs(3)).await?;
        Ok(s)
    }

    async fn login(&mut self, login: &Login, deadline: Instant, nudge: Duration) -> Result<()> {
        let prompt = Regex::new(r"ogin: *$").unwrap();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.not_ready("no `login:` prompt appeared"));
            }
            match self.console.wait_for(&prompt, left.min(nudge)).await {
                Ok(_) => break,
                Err(e) if e.kind() == ErrorKind::Timeout => self.console.send(b"\r").await?,
                Err(e) => return Err(e),
            }
        }
        tracing::debug!("console: logging in as {}", login.user);
        self.console.send(format!("{}\r", login.user).as_bytes()).await?;
        let after_user = Regex::new(r"(?i)password: *$|[#$%>] *$|ogin incorrect").unwrap();
        let left = deadline.saturating_duration_since(Instant::now()).min(Duration::from_secs(20));
        let seen = self.console.wait_for(&after_user, left).await.unwrap_or_default();
        if seen.to_ascii_lowercase().contains("incorrect") {
            return Err(Error::boot(format!(
                "the guest refused the login `{}`; check the image's user and password settings",
                login.user
            ))
            .with_detail(self.console.tail(20)));
        }
        if seen.to_ascii_lowercase().contains("password") {
            let pw = login.password.as_deref().unwrap_or("");
            self.console.send(format!("{pw}\r").as_bytes()).await?;
            let prompt = Regex::new(r"[#$%>] *$|ogin incorrect").unwrap();
            let left = deadline.saturating_duration_since(Instant::now()).min(Duration::from_secs(20));
            let seen = self.console.wait_for(&prompt, left).await.unwrap_or_default();
            if seen.contains("incorrect") {
                return Err(Error::boot(format!(
                    "the guest refused the password for `{}`; set the right one (VMTEST_BHYVE_PASSWORD)",
                    login.user
                ))
                .with_detail(self.console.tail(20)));
            }
        }
        Ok(())
    }

    fn not_ready(&self, what: &str) -> Error {
        Error::new(
            ErrorKind::Timeout,
            format!(
                "waiting for a shell on the serial console timed out ({what}); check console.log: the guest \
                 may not have booted, or has no getty on its serial port"
            ),
        )
        .with_detail(self.console.tail(30))
    }

    /// Print a fresh marker until it comes back.
    async fn sync(&mut self, deadline: Instant, nudge: Duration) -> Result<()> {
        let nonce = new_nonce();
        let marker = Regex::new(&format!("==VMR {nonce}==")).unwrap();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.not_ready("the shell did not answer"));
            }
            self.console.send(format!("printf '==%s %s==\\n' VMR {nonce}\n").as_bytes()).await?;
            match self.console.wait_for(&marker, left.min(nudge)).await {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Timeout => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Run `script` with `sh`, stdin from `stdin` (else `/dev/null`), within `timeout`.
    pub async fn run(
        &mut self,
        script: &[u8],
        stdin: Option<&[u8]>,
        timeout: Option<Duration>,
    ) -> Result<ShellOutput> {
        if self.broken {
            return Err(Error::infra(
                "the serial shell is unusable after a timed-out command; destroy the VM and start again",
            ));
        }
        let nonce = new_nonce();
        let timeout = timeout.unwrap_or(Duration::from_secs(365 * 24 * 3600));
        let call = self.call(&nonce, script, stdin);
        match tokio::time::timeout(timeout, call).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!("serial command {nonce} timed out after {timeout:?}; sending Ctrl-C");
                self.interrupt(&nonce).await;
                Err(Error::timeout(
                    "the command on the serial console",
                    timeout,
                    "it was interrupted with Ctrl-C; raise the timeout or check what it waits for",
                )
                .with_detail(self.console.tail(20)))
            }
        }
    }

    async fn call(&mut self, nonce: &str, script: &[u8], stdin: Option<&[u8]>) -> Result<ShellOutput> {
        let base = format!("{GUEST_TMP}/vmt.{nonce}");
        self.ship(&format!("{base}.c"), script).await?;
        if let Some(data) = stdin {
            self.ship(&format!("{base}.i"), data).await?;
        }
        let input = if stdin.is_some() { format!("{base}.i") } else { "/dev/null".to_owned() };
        self.ship(&format!("{base}.w"), wrapper(nonce, &base, &input).as_bytes()).await?;
        self.console.send(format!("sh {base}.w\n").as_bytes()).await?;
        let re = Regex::new(&format!(r"(?s)==VMB {nonce}==(.*?)==VMM {nonce}==(.*?)==VME {nonce} (\d+)=="))
            .unwrap();
        let text = self.console.wait_for(&re, Duration::from_secs(365 * 24 * 3600)).await?;
        let caps = re.captures(text.as_bytes()).expect("the text matched");
        let field = |i: usize| caps.get(i).map(|m| m.as_bytes()).unwrap_or_default();
        let stdout = b64_decode(field(1)).map_err(|e| garbled("stdout", e))?;
        let stderr = b64_decode(field(2)).map_err(|e| garbled("stderr", e))?;
        let status = std::str::from_utf8(field(3)).ok().and_then(|s| s.parse().ok()).unwrap_or(255);
        Ok(ShellOutput { status, stdout, stderr })
    }

    /// Write `data` to the guest file `path` as a base64 here-document.
    async fn ship(&mut self, path: &str, data: &[u8]) -> Result<()> {
        let mut text = format!("vmt_d >{path} <<'VMT_EOF'\n").into_bytes();
        for line in b64_encode(data).as_bytes().chunks(CHUNK_COLUMNS) {
            text.extend_from_slice(line);
            text.push(b'\n');
        }
        text.extend_from_slice(b"VMT_EOF\n");
        // In pieces, so a slow console applies back-pressure instead of us buffering it all.
        for piece in text.chunks(4096) {
            self.console.send(piece).await?;
        }
        Ok(())
    }

    /// Ctrl-C, then bring the shell back to a known state.
    async fn interrupt(&mut self, nonce: &str) {
        let _ = self.console.send(b"\x03").await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        // A here-document may have been cut mid-way: end it, then re-sync.
        let _ = self.console.send(b"\nVMT_EOF\n").await;
        // Generous: a loaded host (or a slow guest console) must not turn one timed-out
        // command into a shell declared unusable.
        let deadline = Instant::now() + Duration::from_secs(30);
        match self.sync(deadline, Duration::from_secs(2)).await {
            Ok(()) => {
                let _ = self.console.send(format!("rm -f {GUEST_TMP}/vmt.{nonce}.*\n").as_bytes()).await;
            }
            Err(e) => {
                tracing::warn!("the serial shell did not come back after Ctrl-C: {e}");
                self.broken = true;
            }
        }
    }

    /// Run an [`ExecRequest`]: argv exactly, its env as the complete environment, its cwd.
    pub async fn exec(&mut self, req: ExecRequest) -> Result<ExecOutput> {
        let script = command_script(&req, None);
        self.exec_script(req, &script).await
    }

    /// Run a prepared script on behalf of `req` (its stdin, output mode and timeout).
    pub async fn exec_script(&mut self, req: ExecRequest, script: &[u8]) -> Result<ExecOutput> {
        let started = Instant::now();
        let stdin = match req.stdin {
            StdinSource::Null => None,
            StdinSource::Bytes(b) => Some(b),
            StdinSource::Reader(mut r) => {
                // The serial shell needs all of stdin up front. Read it on a plain thread; a
                // terminal that never ends it is cut off after a short wait.
                let (tx, rx) = tokio::sync::oneshot::channel();
                std::thread::spawn(move || {
                    use std::io::Read;
                    let mut buf = Vec::new();
                    let _ = r.read_to_end(&mut buf);
                    let _ = tx.send(buf);
                });
                match tokio::time::timeout(Duration::from_millis(500), rx).await {
                    Ok(Ok(b)) => Some(b),
                    _ => {
                        tracing::debug!("stdin did not end; running the command with /dev/null");
                        None
                    }
                }
            }
        };
        let out = self.run(script, stdin.as_deref(), req.timeout).await?;
        let status = ExitStatus::Code(out.status);
        let duration = started.elapsed();
        match req.output {
            OutputMode::Capture => {
                Ok(ExecOutput { status, stdout: out.stdout, stderr: out.stderr, duration })
            }
            OutputMode::Stream(mut sink) => {
                if !out.stdout.is_empty() {
                    sink.write(Stream::Stdout, &out.stdout);
                }
                if !out.stderr.is_empty() {
                    sink.write(Stream::Stderr, &out.stderr);
                }
                Ok(ExecOutput { status, stdout: Vec::new(), stderr: Vec::new(), duration })
            }
        }
    }

    /// Write a guest file and check it arrived intact (POSIX `cksum`: CRC and size).
    pub async fn write_file(
        &mut self,
        path: &[u8],
        data: &[u8],
        mode: u32,
        timeout: Option<Duration>,
    ) -> Result<()> {
        let p = sh_quote(path);
        let mut script = b"set -e\nd=$(dirname -- ".to_vec();
        script.extend_from_slice(&p);
        script.extend_from_slice(b")\nmkdir -p -- \"$d\"\ncat >");
        script.extend_from_slice(&p);
        script.extend_from_slice(format!("\nchmod {mode:o} ").as_bytes());
        script.extend_from_slice(&p);
        script.extend_from_slice(b"\ncksum <");
        script.extend_from_slice(&p);
        script.push(b'\n');
        let out = self.run(&script, Some(data), timeout).await?;
        let shown = String::from_utf8_lossy(path).into_owned();
        if out.status != 0 {
            return Err(Error::infra(format!(
                "cannot write {shown} in the guest (status {}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let want = format!("{} {}", cksum(data), data.len());
        let got =
            String::from_utf8_lossy(&out.stdout).split_whitespace().take(2).collect::<Vec<_>>().join(" ");
        if got != want {
            return Err(Error::transient(format!(
                "copy of {shown} over the serial console arrived damaged (cksum `{got}`, expected `{want}`); try again"
            )));
        }
        Ok(())
    }

    /// Read a whole guest file.
    pub async fn read_file(&mut self, path: &[u8], timeout: Option<Duration>) -> Result<Vec<u8>> {
        let mut script = b"exec cat -- ".to_vec();
        script.extend_from_slice(&sh_quote(path));
        let out = self.run(&script, None, timeout).await?;
        if out.status != 0 {
            return Err(Error::infra(format!(
                "cannot read {} in the guest: {}",
                String::from_utf8_lossy(path),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(out.stdout)
    }

    /// The last lines the console printed.
    pub fn tail(&self, lines: usize) -> String {
        self.console.tail(lines)
    }

    /// Give the console back.
    pub fn into_console(self) -> Box<dyn Console> {
        self.console
    }
}

/// What the shell gets before the first call: quiet, dumb and able to decode base64. Every
/// line stays far below 76 columns.
const SETUP: &[&str] = &[
    "stty -echo 2>/dev/null; set +o emacs +o vi 2>/dev/null",
    "PS1=''; PS2=''; TERM=dumb; export PS1 PS2 TERM",
    "vmt_d() {",
    "if command -v base64 >/dev/null 2>&1; then base64 -d",
    "elif command -v b64decode >/dev/null 2>&1; then b64decode -r",
    "else openssl base64 -d; fi; }",
];

/// The per-call wrapper: markers, the command, its output in base64, the status.
fn wrapper(nonce: &str, base: &str, input: &str) -> String {
    format!(
        r#"e() {{
if command -v base64 >/dev/null 2>&1; then base64 <"$1"
elif command -v b64encode >/dev/null 2>&1; then b64encode -r x <"$1"
else openssl base64 -in "$1"; fi; }}
printf '==%s %s==\n' VMB {nonce}
sh {base}.c <{input} >{base}.o 2>{base}.e
s=$?
e {base}.o
printf '\n==%s %s==\n' VMM {nonce}
e {base}.e
printf '\n==%s %s %d==\n' VME {nonce} "$s"
rm -f {base}.c {base}.i {base}.o {base}.e {base}.w
"#
    )
}

fn garbled(what: &str, e: String) -> Error {
    Error::transient(format!("the command's {what} arrived garbled over the serial console ({e}); try again"))
}

/// The `sh` script that runs `req.argv` exactly, with `req.env` as the complete environment, in
/// `req.cwd`. When the cwd does not exist in the guest and `cwd_fallback` is given, the command
/// runs there instead; without a fallback a missing cwd fails with status 126.
pub fn command_script(req: &ExecRequest, cwd_fallback: Option<&[u8]>) -> Vec<u8> {
    let mut s = Vec::new();
    if let Some(cwd) = &req.cwd {
        s.extend_from_slice(b"cd -- ");
        s.extend_from_slice(&sh_quote(cwd.as_os_str().as_bytes()));
        s.extend_from_slice(b" 2>/dev/null || ");
        match cwd_fallback {
            Some(f) => {
                s.extend_from_slice(b"cd -- ");
                s.extend_from_slice(&sh_quote(f));
                s.push(b'\n');
            }
            None => {
                s.extend_from_slice(b"{ echo \"vmtest: cannot cd to ");
                s.extend_from_slice(&sh_quote(cwd.as_os_str().as_bytes()));
                s.extend_from_slice(b" in the guest\" >&2; exit 126; }\n");
            }
        }
    }
    s.extend_from_slice(b"exec env -i");
    for (k, v) in &req.env {
        let mut kv = k.as_bytes().to_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        s.push(b' ');
        s.extend_from_slice(&sh_quote(&kv));
    }
    for a in &req.argv {
        s.push(b' ');
        s.extend_from_slice(&sh_quote(OsStr::new(a).as_bytes()));
    }
    s.push(b'\n');
    s
}

/// Single-quote bytes for `sh`.
pub fn sh_quote(b: &[u8]) -> Vec<u8> {
    let mut out = vec![b'\''];
    for &c in b {
        if c == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(c);
        }
    }
    out.push(b'\'');
    out
}

/// A per-call nonce: 12 hex digits.
fn new_nonce() -> String {
    crate::random::hex(6)
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding, no line breaks.
pub fn b64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decode base64, ignoring whitespace and carriage returns (a tty adds them).
pub fn b64_decode(text: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let mut acc = 0u32;
    let mut bits = 0;
    let mut pad = false;
    for &c in text {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => {
                pad = true;
                continue;
            }
            b' ' | b'\t' | b'\r' | b'\n' => continue,
            other => return Err(format!("unexpected byte 0x{other:02x}")),
        };
        if pad {
            return Err("data after padding".into());
        }
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

/// The POSIX `cksum` CRC of `data` (the first number `cksum` prints).
pub fn cksum(data: &[u8]) -> u32 {
    fn feed(crc: u32, byte: u8) -> u32 {
        let mut crc = crc ^ (u32::from(byte) << 24);
        for _ in 0..8 {
            crc = if crc & 0x8000_0000 != 0 { (crc << 1) ^ 0x04C1_1DB7 } else { crc << 1 };
        }
        crc
    }
    let mut crc = data.iter().fold(0u32, |c, &b| feed(c, b));
    let mut len = data.len() as u64;
    while len != 0 {
        crc = feed(crc, (len & 0xff) as u8);
        len >>= 8;
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::ConsoleLog;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::process::Command;

    #[test]
    fn base64_round_trips_and_matches_the_standard() {
        assert_eq!(b64_encode(b""), "");
        assert_eq!(b64_encode(b"f"), "Zg==");
        assert_eq!(b64_encode(b"fo"), "Zm8=");
        assert_eq!(b64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(b64_decode(b"Zm9v\r\nYmE=\r\n").unwrap(), b"fooba");
        assert!(b64_decode(b"Zm9v!").is_err());
        let all: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        assert_eq!(b64_decode(b64_encode(&all).as_bytes()).unwrap(), all);
    }

    #[test]
    fn cksum_matches_the_posix_tool() {
        for data in [&b""[..], b"hello\n", &[0u8; 300][..]] {
            let out = Command::new("cksum")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .and_then(|mut c| {
                    use std::io::Write;
                    c.stdin.take().unwrap().write_all(data)?;
                    c.wait_with_output()
                })
                .unwrap();
            let text = String::from_utf8(out.stdout).unwrap();
            assert_eq!(text.split_whitespace().next().unwrap(), cksum(data).to_string());
        }
    }

    #[test]
    fn scripts_quote_every_word_and_keep_lines_short() {
        let mut req = ExecRequest::new(["printf", "%s|", "it's", "a b"]);
        req.cwd = Some("/tmp".into());
        let s = String::from_utf8(command_script(&req, None)).unwrap();
        assert!(s.contains(r"'printf' '%s|' 'it'\''s' 'a b'"), "{s}");
        assert!(s.contains("exit 126"));
        for line in SETUP {
            assert!(line.len() < 76, "{line}");
        }
    }

    /// A real `/bin/sh -i` on a pty: the pty master is the console.
    struct PtyShell {
        child: std::process::Child,
        log: ConsoleLog,
        _dir: tempfile::TempDir,
    }

    impl Drop for PtyShell {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn pty_shell(program: &str, args: &[&str]) -> PtyShell {
        let (mut master, mut slave) = (0, 0);
        // SAFETY: openpty writes two fds; null name/termios/winsize are allowed.
        let rc = unsafe {
            libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), std::ptr::null())
        };
        assert_eq!(rc, 0);
        // Close-on-exec: other tests of this process spawn children concurrently, and a child
        // that inherits this terminal keeps it open after the shell is gone.
        for fd in [master, slave] {
            // SAFETY: fcntl on fds just opened here.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
        // SAFETY: both fds were just opened and are owned here.
        let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env("PS1", "$ ")
            .stdin(slave.try_clone().unwrap())
            .stdout(slave.try_clone().unwrap())
            .stderr(slave.try_clone().unwrap());
        let sfd = slave.as_raw_fd();
        // SAFETY: setsid/ioctl are async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                libc::setsid();
                libc::ioctl(sfd, libc::TIOCSCTTY, 0);
                // A guest's shell starts with the default dispositions, whatever the tests
                // inherited (a background job of a non-interactive shell ignores SIGINT
                // and SIGQUIT, and Ctrl-C would then interrupt nothing).
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                libc::signal(libc::SIGQUIT, libc::SIG_DFL);
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        drop(slave);
        let dir = tempfile::tempdir().unwrap();
        let reader = tokio::fs::File::from_std(std::fs::File::from(master.try_clone().unwrap()));
        let writer = tokio::fs::File::from_std(std::fs::File::from(master));
        let log = ConsoleLog::spawn(reader, Some(Box::new(writer)), &dir.path().join("console.log")).unwrap();
        PtyShell { child, log, _dir: dir }
    }

    fn opts() -> ShellOptions {
        ShellOptions { ready_timeout: Duration::from_secs(20), ..ShellOptions::default() }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_commands_over_a_real_sh_on_a_pty() {
        let pty = pty_shell("/bin/sh", &["-i"]);
        let mut sh = ShellSession::start(Box::new(pty.log.handle_from_start()), opts()).await.unwrap();

        let out =
            sh.run(b"echo hello; echo oops >&2; exit 3", None, Some(Duration::from_secs(20))).await.unwrap();
        assert_eq!(out, ShellOutput { status: 3, stdout: b"hello\n".to_vec(), stderr: b"oops\n".to_vec() });

        // Output that looks like markers, and binary output, come back exactly.
        let out = sh.run(b"printf '==VME x 0==\\n\\001\\377'", None, None).await.unwrap();
        assert_eq!(out.stdout, b"==VME x 0==\n\x01\xff");
        assert_eq!(out.status, 0);

        // A line far longer than a tty's 80 columns, and stdin.
        let long = "x".repeat(5000);
        let out = sh.run(format!("echo {long} | wc -c; cat").as_bytes(), Some(b"in\n"), None).await.unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).split_whitespace().collect::<Vec<_>>(),
            ["5001", "in"]
        );

        // argv exactly, a complete environment, a cwd.
        let mut req = ExecRequest::new([
            "sh",
            "-c",
            "printf '%s|' \"$@\" \"$FOO\" \"$(pwd)\"; exit 7",
            "sh",
            "a b",
            "it's",
            "",
        ]);
        req.env = vec![("FOO".into(), "bar baz".into()), ("PATH".into(), "/usr/bin:/bin".into())];
        req.cwd = Some("/usr".into());
        let out = sh.exec(req).await.unwrap();
        assert_eq!(out.stdout_lossy(), "a b|it's||bar baz|/usr|");
        assert_eq!(out.status, ExitStatus::Code(7));

        // A missing cwd is an error of the command, not a hang.
        let mut req = ExecRequest::new(["true"]);
        req.cwd = Some("/no/such/dir".into());
        let out = sh.exec(req).await.unwrap();
        assert_eq!(out.status, ExitStatus::Code(126));
        assert!(out.stderr_lossy().contains("cannot cd"), "{}", out.stderr_lossy());

        // Files in and out, checked.
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("sub/blob");
        let data: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 256) as u8).collect();
        sh.write_file(path.as_os_str().as_bytes(), &data, 0o755, None).await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o755);
        assert_eq!(sh.read_file(path.as_os_str().as_bytes(), None).await.unwrap(), data);
        let err = sh.read_file(b"/no/such/file", None).await.unwrap_err();
        assert!(err.message().contains("/no/such/file"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_timeout_interrupts_with_ctrl_c_and_the_shell_stays_usable() {
        let pty = pty_shell("/bin/sh", &["-i"]);
        let mut sh = ShellSession::start(Box::new(pty.log.handle_from_start()), opts()).await.unwrap();
        let t0 = Instant::now();
        // An unusual duration, so no other process on the host is mistaken for ours.
        let err = sh.run(b"echo started; sleep 613", None, Some(Duration::from_secs(2))).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Timeout);
        assert!(err.message().contains("timed out after 2.00s"), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(35), "{:?}", t0.elapsed());
        let out = sh.run(b"echo still here", None, Some(Duration::from_secs(20))).await.unwrap();
        assert_eq!(out.stdout, b"still here\n");
        // No `sleep 613` survived the Ctrl-C.
        let out = sh.run(b"ps -eo args | grep -c '^sleep 613' || true", None, None).await.unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn logs_in_with_user_and_password_prompts() {
        // A tiny getty: prompts, checks the answers, then hands over to an interactive sh.
        let getty = r#"printf 'FreeBSD/amd64 (guest) (ttyu0)\n\nlogin: '; read u
printf 'Password:'; stty -echo; read p; stty echo; echo
[ "$u" = root ] && [ "$p" = secret ] || { echo 'Login incorrect'; exit 1; }
exec /bin/sh -i"#;
        let pty = pty_shell("/bin/sh", &["-c", getty]);
        let o = ShellOptions {
            login: Some(Login { user: "root".into(), password: Some("secret".into()) }),
            ..opts()
        };
        let mut sh = ShellSession::start(Box::new(pty.log.handle_from_start()), o).await.unwrap();
        let out = sh.run(b"echo in", None, None).await.unwrap();
        assert_eq!(out.stdout, b"in\n");

        let pty = pty_shell("/bin/sh", &["-c", getty]);
        let o = ShellOptions {
            login: Some(Login { user: "root".into(), password: Some("wrong".into()) }),
            ..opts()
        };
        let err = ShellSession::start(Box::new(pty.log.handle_from_start()), o).await.err().unwrap();
        assert_eq!(err.kind(), ErrorKind::Boot);
        assert!(err.message().contains("refused the password"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_console_without_a_shell_times_out_clearly() {
        let pty = pty_shell("/bin/sh", &["-c", "exec sleep 60"]);
        let o = ShellOptions {
            ready_timeout: Duration::from_secs(2),
            nudge_every: Duration::from_millis(500),
            ..opts()
        };
        let err = ShellSession::start(Box::new(pty.log.handle_from_start()), o).await.err().unwrap();
        assert_eq!(err.kind(), ErrorKind::Timeout);
        assert!(err.message().contains("shell on the serial console"), "{err}");
    }
}
