//! Everything vmtest itself writes to the terminal goes through one lock, shared with the
//! command's own output, so a progress line never lands in the middle of the command's line.
//!
//! On a terminal, one status line lives at the bottom of stderr. It is erased before any
//! other output is written and drawn again only when both streams are at the start of a line.
//! Without a terminal (or with `CI=true`) there is no status line, only whole lines.

use std::io::{IsTerminal, Write};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};
use vmtest_core::exec::OutputSink;
use vmtest_core::protocol::Stream;

/// How chatty vmtest is (`-q`, default, `-v`, `-vv`...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verbosity {
    Quiet,
    Normal,
    Verbose,
}

static VERBOSITY: OnceLock<Verbosity> = OnceLock::new();
static JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static START: OnceLock<Instant> = OnceLock::new();

/// When vmtest started (the `elapsed` of JSON log events counts from here).
pub fn process_start() -> Instant {
    *START.get_or_init(Instant::now)
}

/// Every line vmtest writes on stderr is JSON (`--message-format json`).
pub fn set_json_mode() {
    JSON.store(true, std::sync::atomic::Ordering::Relaxed);
}

pub fn json_mode() -> bool {
    JSON.load(std::sync::atomic::Ordering::Relaxed)
}

pub fn set_verbosity(v: Verbosity) {
    let _ = VERBOSITY.set(v);
}

pub fn verbosity() -> Verbosity {
    *VERBOSITY.get().unwrap_or(&Verbosity::Normal)
}

/// True when progress should be a live status line: stderr is a terminal and `CI` is not
/// set to a true value (GitHub Actions, GitLab, Buildkite... set `CI=true`).
pub fn live_status_wanted() -> bool {
    let ci = std::env::var("CI").map(|v| !v.is_empty() && v != "0" && v != "false").unwrap_or(false);
    !ci && std::io::stderr().is_terminal()
}

struct State {
    /// The status text (without elapsed time) and since when its phase runs.
    status: Option<(String, Instant)>,
    /// Whether the status line is on screen now.
    drawn: bool,
    stdout_mid_line: bool,
    stderr_mid_line: bool,
    live: bool,
    ticker: bool,
}

static STATE: Mutex<State> = Mutex::new(State {
    status: None,
    drawn: false,
    stdout_mid_line: false,
    stderr_mid_line: false,
    live: false,
    ticker: false,
});

fn lock() -> std::sync::MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Turn the live status line on (call once, when stderr is a terminal).
pub fn enable_live_status() {
    lock().live = true;
}

impl State {
    fn erase(&mut self, err: &mut impl Write) {
        if self.drawn {
            let _ = err.write_all(b"\r\x1b[2K");
            self.drawn = false;
        }
    }

    fn draw(&mut self, err: &mut impl Write) {
        if !self.live || self.stdout_mid_line || self.stderr_mid_line {
            return;
        }
        if let Some((text, since)) = &self.status {
            let line = format!("{text} {}", format_secs(since.elapsed()));
            let width = terminal_width().saturating_sub(1).max(10);
            let line: String = line.chars().take(width).collect();
            let _ = err.write_all(format!("\r\x1b[2K\x1b[1m{line}\x1b[0m").as_bytes());
            let _ = err.flush();
            self.drawn = true;
        }
    }
}

fn terminal_width() -> usize {
    // SAFETY: TIOCGWINSZ fills a winsize struct; on failure we keep the default.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        if libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_col > 0 {
            return ws.ws_col as usize;
        }
    }
    80
}

/// Show `text` (plus the time since this call, kept current) as the status line; `None`
/// removes it. Without a live terminal this does nothing.
pub fn set_status(text: Option<String>) {
    let mut st = lock();
    if !st.live {
        return;
    }
    let mut err = std::io::stderr().lock();
    st.erase(&mut err);
    st.status = text.map(|t| (t, Instant::now()));
    st.draw(&mut err);
    if st.status.is_some() && !st.ticker {
        st.ticker = true;
        std::thread::spawn(|| loop {
            std::thread::sleep(Duration::from_millis(100));
            let mut st = lock();
            if st.drawn {
                let mut err = std::io::stderr().lock();
                st.draw(&mut err);
            }
        });
    }
}

/// Write whole lines on stderr (a newline is added), below any partial line and above the
/// status line.
pub fn line(text: &str) {
    let mut st = lock();
    let mut err = std::io::stderr().lock();
    st.erase(&mut err);
    if st.stderr_mid_line {
        let _ = err.write_all(b"\n");
        st.stderr_mid_line = false;
    }
    let _ = err.write_all(text.as_bytes());
    if !text.ends_with('\n') {
        let _ = err.write_all(b"\n");
    }
    let _ = err.flush();
    st.draw(&mut err);
}

/// Raw bytes from a log or the command, on one of our streams.
pub fn write_stream(stream: Stream, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let mut st = lock();
    let mut err = std::io::stderr().lock();
    st.erase(&mut err);
    let mid = !data.ends_with(b"\n");
    // A closed pipe on our side must not kill the run; the command's status still matters.
    match stream {
        Stream::Stdout => {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(data).and_then(|_| out.flush());
            // Only a terminal shared with the status line matters.
            st.stdout_mid_line = mid && out.is_terminal();
        }
        Stream::Stderr => {
            let _ = err.write_all(data).and_then(|_| err.flush());
            st.stderr_mid_line = mid;
        }
    }
    st.draw(&mut err);
}

/// The command's output sink: the command's bytes, unchanged, on our stdout and stderr.
pub struct Sink;

impl OutputSink for Sink {
    fn write(&mut self, stream: Stream, data: &[u8]) {
        write_stream(stream, data);
    }
}

/// A command's output with each line prefixed by `[label] ` (the runs of a kernel matrix
/// print at once); a line is written once whole, so the runs' lines never mix.
pub struct LabelledSink {
    label: String,
    partial: [Vec<u8>; 2],
}

impl LabelledSink {
    pub fn new(label: &str) -> Self {
        LabelledSink { label: format!("[{label}] "), partial: [Vec::new(), Vec::new()] }
    }

    fn flush_lines(&mut self, stream: Stream, all: bool) {
        let buf = &mut self.partial[stream as usize];
        let end = if all { buf.len() } else { buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1) };
        if end == 0 {
            return;
        }
        let mut out = Vec::with_capacity(end + 16);
        for line in buf[..end].split_inclusive(|b| *b == b'\n') {
            out.extend_from_slice(self.label.as_bytes());
            out.extend_from_slice(line);
        }
        if !out.ends_with(b"\n") {
            out.push(b'\n');
        }
        buf.drain(..end);
        write_stream(stream, &out);
    }
}

impl OutputSink for LabelledSink {
    fn write(&mut self, stream: Stream, data: &[u8]) {
        self.partial[stream as usize].extend_from_slice(data);
        self.flush_lines(stream, false);
    }
}

impl Drop for LabelledSink {
    fn drop(&mut self) {
        self.flush_lines(Stream::Stdout, true);
        self.flush_lines(Stream::Stderr, true);
    }
}

/// `1.23s`, `12.3s`, `2m05s`.
pub fn format_secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 10.0 {
        format!("{s:.2}s")
    } else if s < 60.0 {
        format!("{s:.1}s")
    } else {
        format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
    }
}

/// RFC 3339 UTC with milliseconds, e.g. `2025-01-09T08:30:00.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_736_411_400_123);
        assert_eq!(rfc3339(t), "2025-01-09T08:30:00.123Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(format_secs(Duration::from_millis(2310)), "2.31s");
        assert_eq!(format_secs(Duration::from_millis(12_340)), "12.3s");
        assert_eq!(format_secs(Duration::from_secs(125)), "2m05s");
    }
}
