//! The guest-side wrapper around every command: exact argv and environment, the working
//! directory, root through `sudo`, a process group the host can kill, and the command's true
//! exit status written as a sentinel line on stderr.
//!
//! Multipass shell-quotes each argument of `multipass exec NAME -- ARGS` and joins them with
//! spaces for the guest user's shell, so the backend passes `sh -c SCRIPT` and puts the user's
//! argv, quoted for the guest shell, inside SCRIPT. The client's own exit code cannot be
//! trusted (1.16 loops on 4 and exits 2 on SSH failure; main exits 255 on SSH failure), so the
//! wrapper always exits 0 after printing `MARKER:STATUS` and the backend reads the status
//! from the marker.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Quote one word for a POSIX shell. UTF-8 words go in single quotes; words that are not
/// UTF-8 (which the client would mangle into U+FFFD) are rebuilt in the guest with `printf`
/// octal escapes, so the script itself is always valid UTF-8.
fn quote(word: &OsStr, vars: &mut String, n: &mut usize) -> String {
    match word.to_str() {
        Some(s) => format!("'{}'", s.replace('\'', r"'\''")),
        None => {
            *n += 1;
            let var = format!("__vmt_w{n}");
            let mut fmt = String::new();
            for b in word.as_bytes() {
                let _ = write!(fmt, "\\{b:03o}");
            }
            // `$(...)` strips trailing newlines, hence the `x` that is cut off afterwards.
            let _ = writeln!(vars, "{var}=$(printf '{fmt}x'); {var}=${{{var}%x}}");
            format!("\"${var}\"")
        }
    }
}

/// What the wrapper needs to know.
pub struct Wrapper<'a> {
    pub argv: &'a [std::ffi::OsString],
    pub env: &'a [(std::ffi::OsString, std::ffi::OsString)],
    pub cwd: Option<&'a Path>,
    pub root: bool,
    /// Unique per call: names the marker and the pid file.
    pub nonce: &'a str,
}

pub fn marker(nonce: &str) -> String {
    format!("__VMTEST_EXIT_{nonce}__")
}

/// The guest directory of the pid files. A fixed path, not under `$HOME`: the command may run
/// through `sudo`, and the kill after a deadline always does, and `sudo` on Ubuntu sets `HOME`
/// to `/root`. The default user creates it (so it may remove the files root writes there).
pub const PID_DIR: &str = "/tmp/vmtest-exec";

/// The guest path of the file holding the command's process group id.
pub fn pid_file(nonce: &str) -> String {
    format!("{PID_DIR}/{nonce}.pid")
}

impl Wrapper<'_> {
    /// The `sh -c` script.
    pub fn script(&self) -> String {
        let mut vars = String::new();
        let mut n = 0;
        let mut words: Vec<String> = Vec::new();
        if self.root {
            words.extend(["sudo", "-n", "--"].map(str::to_owned));
        }
        // setsid: the command gets its own process group, so a host-side deadline can kill
        // all of it; the inner sh records that group's id before becoming the command.
        words.extend(
            ["setsid", "-w", "sh", "-c", r#"'echo $$ >"$0"; exec "$@"'"#, r#""$__vmt_pid""#]
                .map(str::to_owned),
        );
        words.extend(["env", "-i", "--"].map(str::to_owned));
        for (k, v) in self.env {
            let mut kv = k.clone();
            kv.push("=");
            kv.push(v);
            words.push(quote(&kv, &mut vars, &mut n));
        }
        if self.argv.first().is_some_and(|a| a.as_bytes().contains(&b'=')) {
            // env(1) would take it for an assignment.
            words.extend(["sh", "-c", r#"'exec "$0" "$@"'"#].map(str::to_owned));
        }
        for a in self.argv {
            words.push(quote(a, &mut vars, &mut n));
        }
        let cwd = self.cwd.map(|c| quote(c.as_os_str(), &mut vars, &mut n));
        let mut s = String::new();
        s.push_str(&vars);
        let _ = writeln!(s, "mkdir -p {PID_DIR} 2>/dev/null; __vmt_pid='{}'", pid_file(self.nonce));
        if let Some(cwd) = cwd {
            // The guest does not share the host's files: stay in the home directory when the
            // host's working directory does not exist there.
            let _ = writeln!(s, "cd -- {cwd} 2>/dev/null || cd");
        }
        let _ = writeln!(s, "{}", words.join(" "));
        let _ = writeln!(s, "__vmt_s=$?");
        let _ = writeln!(s, "rm -f \"$__vmt_pid\" 2>/dev/null");
        let _ = writeln!(s, "printf '%s:%d\\n' '{}' \"$__vmt_s\" >&2", marker(self.nonce));
        s.push_str("exit 0\n");
        s
    }
}

/// The script that kills the command's process group after a host-side deadline.
pub fn kill_script(nonce: &str) -> String {
    let f = pid_file(nonce);
    format!("p=$(cat '{f}' 2>/dev/null) && [ -n \"$p\" ] && kill -9 -\"$p\"; rm -f '{f}'")
}

/// Removes the status marker from a stderr stream and keeps the status. Output before the
/// marker is passed on as it arrives, except for a tail that might be the marker's start.
pub struct SentinelFilter {
    marker: Vec<u8>,
    pending: Vec<u8>,
    status: Option<i32>,
    /// Inside the marker line, after the marker: the digits so far.
    in_line: Option<Vec<u8>>,
}

impl SentinelFilter {
    pub fn new(nonce: &str) -> Self {
        let mut marker = marker(nonce).into_bytes();
        marker.push(b':');
        SentinelFilter { marker, pending: Vec::new(), status: None, in_line: None }
    }

    /// The command's status, once its marker line has been seen whole.
    pub fn status(&self) -> Option<i32> {
        self.status
    }

    /// Feed stderr bytes; returns what the user should see now.
    pub fn feed(&mut self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for &b in data {
            if let Some(digits) = &mut self.in_line {
                if b == b'\n' {
                    let parsed = std::str::from_utf8(digits).ok().and_then(|d| d.parse().ok());
                    match parsed {
                        Some(s) if self.status.is_none() => self.status = Some(s),
                        _ => {
                            out.extend_from_slice(&self.marker);
                            out.extend_from_slice(digits);
                            out.push(b'\n');
                        }
                    }
                    self.in_line = None;
                } else {
                    digits.push(b);
                }
                continue;
            }
            self.pending.push(b);
            if self.pending.ends_with(&self.marker) {
                let keep = self.pending.len() - self.marker.len();
                out.extend_from_slice(&self.pending[..keep]);
                self.pending.clear();
                self.in_line = Some(Vec::new());
                continue;
            }
            // Pass on everything that can no longer be the start of a marker.
            let mut keep = 0;
            for k in (1..=self.pending.len().min(self.marker.len() - 1)).rev() {
                if self.pending.ends_with(&self.marker[..k]) {
                    keep = k;
                    break;
                }
            }
            let emit = self.pending.len() - keep;
            if emit > 0 {
                out.extend(self.pending.drain(..emit));
            }
        }
        out
    }

    /// The end of the stream: whatever was held back.
    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.pending);
        if let Some(digits) = self.in_line.take() {
            out.extend_from_slice(&self.marker);
            out.extend_from_slice(&digits);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;

    fn run_sh(script: &str) -> std::process::Output {
        std::process::Command::new("sh")
            .args(["-c", script])
            .env("HOME", std::env::temp_dir())
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    }

    #[test]
    fn the_filter_strips_the_marker_split_anywhere() {
        let nonce = "abc123";
        let stream = format!("err line\npartial{}:33\nlater\n", marker(nonce));
        for chunk in 1..stream.len() {
            let mut f = SentinelFilter::new(nonce);
            let mut seen = Vec::new();
            for part in stream.as_bytes().chunks(chunk) {
                seen.extend(f.feed(part));
            }
            seen.extend(f.finish());
            assert_eq!(String::from_utf8(seen).unwrap(), "err line\npartiallater\n", "chunk {chunk}");
            assert_eq!(f.status(), Some(33));
        }
    }

    #[test]
    fn a_stream_without_marker_passes_whole() {
        let mut f = SentinelFilter::new("n");
        let mut seen = f.feed(b"__VMTEST_EX");
        seen.extend(f.finish());
        assert_eq!(seen, b"__VMTEST_EX");
        assert_eq!(f.status(), None);
    }

    #[test]
    fn the_wrapper_passes_argv_and_env_exactly_and_reports_the_status() {
        let weird = OsString::from_vec(vec![b'a', 0xff, b'\n', b'\'', b'%', b'\n']);
        let argv: Vec<OsString> = vec![
            "sh".into(),
            "-c".into(),
            "printf '%s|' \"$@\"; printf '%s' \"$V\"; exit 4".into(),
            "x".into(),
            "it's a \"word\" $HOME `id`".into(),
            weird.clone(),
            "".into(),
        ];
        let env = vec![("V".into(), weird.clone()), ("PATH".into(), "/usr/bin:/bin".into())];
        let w = Wrapper { argv: &argv, env: &env, cwd: Some(Path::new("/")), root: false, nonce: "n1" };
        let out = run_sh(&w.script());
        let mut want = b"it's a \"word\" $HOME `id`|".to_vec();
        want.extend_from_slice(weird.as_encoded_bytes());
        want.extend_from_slice(b"||");
        want.extend_from_slice(weird.as_encoded_bytes());
        assert_eq!(out.stdout, want);
        assert_eq!(out.status.code(), Some(0), "the wrapper never exits 4");
        let mut f = SentinelFilter::new("n1");
        let mut err = f.feed(&out.stderr);
        err.extend(f.finish());
        assert_eq!(f.status(), Some(4));
        assert!(err.is_empty(), "{}", String::from_utf8_lossy(&err));
    }

    #[test]
    fn the_environment_is_exactly_the_requested_one() {
        let argv: Vec<OsString> = vec!["/usr/bin/env".into()];
        let env = vec![("ONLY".into(), "1".into())];
        let w = Wrapper { argv: &argv, env: &env, cwd: None, root: false, nonce: "n2" };
        let out = run_sh(&w.script());
        assert_eq!(String::from_utf8_lossy(&out.stdout), "ONLY=1\n");
    }
}
