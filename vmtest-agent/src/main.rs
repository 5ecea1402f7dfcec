//! vmtest-agent: the guest side of vmtest for Linux guests.
//!
//! As PID 1 of a vmtest initramfs it mounts the basics, loads the kernel modules the
//! initramfs carries, finds its virtio-serial port and serves the host's requests. It forks
//! first: PID 1 only reaps orphans and powers off if the agent dies, so the agent's own
//! children are waited for by the agent alone.
//!
//! Run as an ordinary process (an image whose init starts it), it serves the port given as
//! its first argument, or the one named [`AGENT_PORT_NAME`].

mod imageroot;
mod init;
mod modprobe;
mod net;
mod server;
mod sys;

use vmtest_core::protocol::AGENT_PORT_NAME;

fn main() {
    if std::process::id() == 1 {
        init::pid1();
    }
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // The kernel's module helper: setup links the initramfs's /sbin/modprobe to the agent.
    if args.first().and_then(|a| std::path::Path::new(a).file_name()) == Some("modprobe".as_ref()) {
        modprobe::main(args);
    }
    let port = match std::env::args_os().nth(1) {
        Some(p) => std::path::PathBuf::from(p),
        None => match init::find_port(AGENT_PORT_NAME, std::time::Duration::from_secs(10)) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("vmtest-agent: {e}");
                std::process::exit(1);
            }
        },
    };
    if let Err(e) = server::serve(&port, false) {
        eprintln!("vmtest-agent: {e}");
        std::process::exit(1);
    }
}
