//! How run events reach the user: one plain line each, on stderr.

use vmtest_core::runner::{Event, Reporter};

pub struct Stderr;

impl Reporter for Stderr {
    fn event(&self, event: &Event<'_>) {
        match event {
            Event::WaitingForSlots { needed, max, holders } => {
                let who: Vec<String> = holders.iter().map(|h| h.to_string()).collect();
                eprintln!(
                    "vmtest: waiting for {needed} of {max} VM slot(s), held by: {}",
                    if who.is_empty() { "processes that are exiting".to_owned() } else { who.join("; ") }
                );
            }
            Event::Kept { name } => {
                eprintln!("vmtest: the VM is kept running: {name}");
                eprintln!("  vmtest console {name}        # serial console (Ctrl-] to leave)");
                eprintln!("  vmtest exec {name} -- CMD    # run a command in it");
                eprintln!("  vmtest destroy {name}        # tear it down");
            }
        }
    }
}
