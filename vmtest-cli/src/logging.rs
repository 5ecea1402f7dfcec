//! vmtest's own log records (`tracing`), written the way the rest of its output is: in
//! human mode as `vmtest: warning: ...` lines (timestamped off a terminal, like the CI
//! progress lines), in JSON mode as `log` events, so that with `--message-format json`
//! every line vmtest writes on stderr is one JSON object.

use crate::ui;
use std::fmt::Write as _;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The `tracing` target of messages meant for the user as they are.
const NOTICE_TARGET: &str = "vmtest_notice";

/// Install the log writer with `filter` (a `RUST_LOG`-style directive).
pub fn init(filter: EnvFilter) {
    tracing_subscriber::registry().with(filter).with(Lines).init();
}

/// Writes each record as one whole line through the terminal lock.
struct Lines;

impl<S: Subscriber> Layer<S> for Lines {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut text = Text::default();
        event.record(&mut text);
        let meta = event.metadata();
        if ui::json_mode() {
            ui::line(&crate::events::log_line(meta.level().as_str(), meta.target(), &text.0));
        } else {
            ui::line(&human_line(*meta.level(), meta.target(), &text.0));
        }
    }
}

fn human_line(level: Level, target: &str, message: &str) -> String {
    let what = match level {
        // A notice from the library for the user (e.g. how to attach gdb): no level label.
        _ if target == NOTICE_TARGET => message.to_owned(),
        Level::ERROR => format!("error: {message}"),
        Level::WARN => format!("warning: {message}"),
        Level::INFO => message.to_owned(),
        _ => format!("[{} {target}] {message}", level.as_str().to_lowercase()),
    };
    if ui::live_status_wanted() {
        format!("vmtest: {what}")
    } else {
        format!("{} vmtest: {what}", ui::rfc3339(std::time::SystemTime::now()))
    }
}

/// The record's message, then its other fields as `name=value`.
#[derive(Default)]
struct Text(String);

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_read_as_vmtest_notices() {
        let warn = human_line(Level::WARN, "backend_qemu::accel", "using TCG");
        assert!(warn.ends_with("vmtest: warning: using TCG"), "{warn}");
        let debug = human_line(Level::DEBUG, "backend_qemu::vm", "starting");
        assert!(debug.ends_with("vmtest: [debug backend_qemu::vm] starting"), "{debug}");
    }
}
