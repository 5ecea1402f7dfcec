//! The framed protocol between the host and `vmtest-agent` inside a Linux guest.
//!
//! The transport is one byte stream (a virtio-serial port). Every message is a frame: a
//! little-endian `u32` length followed by that many bytes of a postcard-encoded
//! [`HostMessage`] or [`GuestMessage`]. Byte strings (argv, environment, paths, output) travel
//! as raw bytes, never as UTF-8, so a Unix argv reaches the guest exactly as given.
//!
//! Several commands may run at once; each carries the `id` the host chose for it.

use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};

/// Bumped whenever a message changes shape; the host refuses an agent that disagrees.
pub const PROTOCOL_VERSION: u32 = 4;

/// The name of the virtio-serial port the agent talks on (`/sys/class/virtio-ports/*/name`).
pub const AGENT_PORT_NAME: &str = "org.vmtest.agent.0";

/// Kernel command-line word that marks a vmtest guest; tests use it to prove they run in a VM.
pub const BOOT_MARKER: &str = "vmtest.agent=1";

/// Kernel command-line word that makes the agent power off at once (the raw boot floor).
pub const POWEROFF_MARKER: &str = "vmtest.poweroff=1";

/// Largest frame either side accepts; bigger payloads are chunked by the sender.
pub const MAX_FRAME_LEN: usize = 8 << 20;

/// Output and file chunks are at most this long, so a frame never nears [`MAX_FRAME_LEN`].
pub const CHUNK_LEN: usize = 256 << 10;

/// How a guest process ended.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExitStatus {
    /// Exited with this status (0..=255).
    Code(i32),
    /// Killed by this signal number.
    Signal(i32),
}

impl ExitStatus {
    /// True for `Code(0)`.
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }

    /// The status a POSIX shell reports: the code itself, or 128 + the signal number.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit status {c}"),
            ExitStatus::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// Which output stream a chunk belongs to.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A 9p share the agent mounts during setup.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ShareMount {
    /// The 9p mount tag QEMU exports it under.
    pub tag: String,
    /// Where it appears in the guest.
    pub guest_path: Vec<u8>,
    pub read_only: bool,
}

/// What the agent prepares after boot, before any command runs. Kept out of the boot itself
/// so that a VM can be snapshotted at "agent ready" and set up afresh after each restore.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct GuestSetup {
    /// Share holding the host's `/`, mounted read-only under a tmpfs overlay and made the
    /// guest's root. `None` keeps the initramfs root (an image-mode or bare guest).
    pub root_tag: Option<String>,
    /// Further shares, mounted after the root switch.
    pub shares: Vec<ShareMount>,
    pub hostname: String,
    /// Host wall-clock time, applied to the guest clock.
    pub unix_time_secs: i64,
    pub unix_time_nanos: u32,
    /// Size of the tmpfs that takes the guest's writes, e.g. "50%".
    pub overlay_size: String,
    /// Network interfaces to configure, found by MAC.
    pub nics: Vec<GuestNic>,
    /// Lines to add to `/etc/hosts` (every node of a multi-VM test).
    pub hosts: Vec<HostsEntry>,
    /// Host randomness mixed into the guest's pool and the CRNG reseeded: guests restored
    /// from one snapshot must not share their random numbers.
    pub entropy: Vec<u8>,
    /// The guest kernel's module tree, a directory of the host root (the kernel's
    /// `lib/modules/<release>` in the cache), bound read-only at `/lib/modules/<release>`
    /// so that modprobe and the kernel's own module requests find the guest's modules.
    pub modules_dir: Option<Vec<u8>>,
    /// A public key (`TYPE BASE64`) for root's `authorized_keys` (an image guest reached
    /// over SSH). Given here, not at boot, so that a snapshot holds no run's key.
    pub authorized_key: Option<String>,
    /// Write a fresh `/etc/machine-id` (from `entropy`): an image guest restored from a
    /// snapshot that other guests restore too must not share its identity with them.
    pub new_machine_id: bool,
    /// The guest resumes a test checkpoint and keeps what it had (name, addresses, hosts,
    /// root): only the clock, the random pool and the SSH key are renewed.
    pub resumed: bool,
}

/// One network interface the agent configures: up, with one IPv4 address.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct GuestNic {
    pub mac: [u8; 6],
    pub address: [u8; 4],
    pub prefix: u8,
}

/// One `/etc/hosts` line: an address and its names.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct HostsEntry {
    pub address: String,
    pub names: Vec<String>,
}

/// One command to run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ExecStart {
    pub id: u64,
    /// `argv[0]` is looked up in the `PATH` of `env` when it has no slash.
    pub argv: Vec<Vec<u8>>,
    /// The complete environment (`NAME=value`): nothing else is inherited.
    pub env: Vec<Vec<u8>>,
    pub cwd: Option<Vec<u8>>,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    /// False: stdin is `/dev/null`. True: the host sends [`HostMessage::Stdin`] and then
    /// [`HostMessage::CloseStdin`].
    pub stdin: bool,
    /// The host's resource limits, applied to the command as they would be on the host.
    pub rlimits: Vec<Rlimit>,
    /// The host's umask; `None` keeps the agent's.
    pub umask: Option<u32>,
}

/// One resource limit (`getrlimit`): the resource number and its soft and hard values, with
/// `u64::MAX` for unlimited.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rlimit {
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum HostMessage {
    Setup(GuestSetup),
    Exec(ExecStart),
    Stdin {
        id: u64,
        data: Vec<u8>,
    },
    CloseStdin {
        id: u64,
    },
    /// Sent to the command's whole process group.
    Signal {
        id: u64,
        signal: i32,
    },
    /// Write a file; the first chunk creates or truncates it, later ones append.
    WriteFile {
        id: u64,
        path: Vec<u8>,
        mode: u32,
        data: Vec<u8>,
        append: bool,
    },
    /// Read a whole file, answered by `FileChunk`s ending with `eof`.
    ReadFile {
        id: u64,
        path: Vec<u8>,
    },
    /// Sync and power off.
    Shutdown,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct AgentHello {
    pub protocol: u32,
    pub agent_version: String,
    pub kernel_release: String,
    /// Milliseconds since the kernel started, when the agent was ready.
    pub uptime_ms: u64,
    /// Milliseconds since the kernel started, when init began (0 when not init).
    pub init_ms: u64,
    /// Milliseconds init spent loading kernel modules.
    pub modules_ms: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum GuestMessage {
    Hello(AgentHello),
    SetupDone {
        error: Option<String>,
    },
    Started {
        id: u64,
        pid: u32,
    },
    /// The command could not be started (not found, not executable, bad cwd...).
    SpawnFailed {
        id: u64,
        error: String,
        errno: i32,
    },
    Output {
        id: u64,
        stream: Stream,
        data: Vec<u8>,
    },
    Exited {
        id: u64,
        status: ExitStatus,
    },
    FileChunk {
        id: u64,
        data: Vec<u8>,
        eof: bool,
    },
    /// Result of a `WriteFile` or a failed `ReadFile`.
    FileDone {
        id: u64,
        error: Option<String>,
    },
    /// A line for the host's log (module load failures and the like).
    Log {
        message: String,
    },
}

/// Encode one message as a frame.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let body = postcard::to_allocvec(msg).expect("protocol messages always serialize");
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// Decode a frame body (without its length prefix).
pub fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> io::Result<T> {
    postcard::from_bytes(body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Check a length prefix.
pub fn frame_len(prefix: [u8; 4]) -> io::Result<usize> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_FRAME_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the {MAX_FRAME_LEN}-byte limit"),
        ));
    }
    Ok(len)
}

/// Blocking write of one frame (the agent side).
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> io::Result<()> {
    w.write_all(&encode(msg))?;
    w.flush()
}

/// Blocking read of one frame (the agent side). `Ok(None)` on a clean end of stream.
pub fn read_frame<R: Read, T: for<'a> Deserialize<'a>>(r: &mut R) -> io::Result<Option<T>> {
    let mut prefix = [0u8; 4];
    match r.read_exact(&mut prefix) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut body = vec![0u8; frame_len(prefix)?];
    r.read_exact(&mut body)?;
    decode(&body).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_non_utf8_argv() {
        let msg = HostMessage::Exec(ExecStart {
            id: 7,
            argv: vec![b"printf".to_vec(), b"a b\xff\n".to_vec(), Vec::new()],
            env: vec![b"X=1".to_vec()],
            cwd: Some(b"/work".to_vec()),
            uid: 1000,
            gid: 1000,
            groups: vec![27],
            stdin: true,
            rlimits: vec![Rlimit { resource: 7, soft: 1024, hard: u64::MAX }],
            umask: Some(0o027),
        });
        let mut buf = Vec::new();
        write_frame(&mut buf, &msg).unwrap();
        write_frame(&mut buf, &HostMessage::Shutdown).unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame::<_, HostMessage>(&mut r).unwrap(), Some(msg));
        assert_eq!(read_frame::<_, HostMessage>(&mut r).unwrap(), Some(HostMessage::Shutdown));
        assert_eq!(read_frame::<_, HostMessage>(&mut r).unwrap(), None);
    }

    #[test]
    fn oversized_frame_is_refused() {
        let mut r = &(u32::MAX).to_le_bytes()[..];
        let err = read_frame::<_, GuestMessage>(&mut r).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn truncated_frame_is_an_error_not_a_clean_end() {
        let frame = encode(&GuestMessage::Log { message: "hello".into() });
        let mut r = &frame[..frame.len() - 1];
        assert!(read_frame::<_, GuestMessage>(&mut r).is_err());
    }

    #[test]
    fn signal_death_maps_to_128_plus_n() {
        assert_eq!(ExitStatus::Signal(9).shell_code(), 137);
        assert_eq!(ExitStatus::Code(3).shell_code(), 3);
        assert!(!ExitStatus::Code(1).success());
    }
}
