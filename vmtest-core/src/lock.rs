//! VM slots: `--max-vms N` counted across every vmtest process of the user.
//!
//! Slot `i` is the file `slot-<i>.lock` in the lock dir, held with `flock(LOCK_EX)`. The
//! kernel drops the lock when its holder dies, however it dies, so there are no stale locks
//! and no heuristics about them. The holder writes who it is (pid, start time, command,
//! since) into the file, so a waiter can say whom it waits for.
//!
//! Several slots (a multi-VM test) are taken all or nothing: a process that cannot get all
//! it needs releases what it got and tries again, so two waiters never deadlock.

use crate::error::{Error, ErrorKind, Result};
use crate::state::{process_command, ProcessId};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Default wait for a slot (`VMTEST_LOCK_TIMEOUT`, seconds or a duration).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// Where the slots live and how long to wait for them.
#[derive(Clone, Debug)]
pub struct SlotPool {
    dir: PathBuf,
    max: usize,
    timeout: Duration,
}

/// Held slots; dropping them releases them.
#[derive(Debug)]
pub struct Slots {
    files: Vec<(usize, File)>,
}

impl Slots {
    pub fn indices(&self) -> Vec<usize> {
        self.files.iter().map(|(i, _)| *i).collect()
    }
}

/// Who holds a slot, as written by the holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub command: String,
    pub since_unix: u64,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let age = now_unix().saturating_sub(self.since_unix);
        write!(f, "pid {} for {age}s: {}", self.pid, self.command)
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl SlotPool {
    pub fn new(dir: impl Into<PathBuf>, max: usize, timeout: Duration) -> Self {
        SlotPool { dir: dir.into(), max: max.max(1), timeout }
    }

    /// `$VMTEST_LOCK_DIR` (default `<state dir>/locks`), `$VMTEST_LOCK_TIMEOUT` (default 300 s).
    pub fn from_env(state_root: &Path, max: usize) -> Result<Self> {
        let dir = std::env::var_os("VMTEST_LOCK_DIR")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| state_root.join("locks"));
        let timeout = match std::env::var("VMTEST_LOCK_TIMEOUT") {
            Ok(v) if !v.is_empty() => crate::spec::parse_duration(&v)
                .map_err(|e| Error::usage(format!("VMTEST_LOCK_TIMEOUT: {}", e.headline())))?,
            _ => DEFAULT_TIMEOUT,
        };
        Ok(SlotPool::new(dir, max, timeout))
    }

    pub fn max(&self) -> usize {
        self.max
    }

    fn open(&self, i: usize) -> Result<File> {
        let path = self.dir.join(format!("slot-{i}.lock"));
        std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(
            |e| {
                Error::usage(format!(
                    "cannot open lock {}: {e}; set VMTEST_LOCK_DIR to a writable directory",
                    path.display()
                ))
            },
        )
    }

    /// Try once to take `n` free slots, all or nothing.
    pub fn try_acquire(&self, n: usize) -> Result<Option<Slots>> {
        if n > self.max {
            return Err(Error::usage(format!(
                "this run needs {n} VMs at once but --max-vms is {}; raise --max-vms to at least {n}",
                self.max
            )));
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| {
            Error::usage(format!("cannot create lock dir {}: {e}; set VMTEST_LOCK_DIR", self.dir.display()))
        })?;
        let mut got = Vec::new();
        for i in 0..self.max {
            let file = self.open(i)?;
            // SAFETY: flock on an fd we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                got.push((i, file));
                if got.len() == n {
                    let mut slots = Slots { files: got };
                    for (_, f) in &mut slots.files {
                        write_holder(f);
                    }
                    return Ok(Some(slots));
                }
            }
        }
        Ok(None) // dropping `got` releases the partial set
    }

    /// The holders of every slot that is busy right now.
    pub fn holders(&self) -> Vec<Holder> {
        (0..self.max)
            .filter_map(|i| {
                let mut f = self.open(i).ok()?;
                // SAFETY: flock on an fd we own; a slot we can take is free, so release it again.
                if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0 {
                    return None;
                }
                let mut text = String::new();
                f.read_to_string(&mut text).ok()?;
                parse_holder(&text)
            })
            .collect()
    }

    /// Take `n` slots, waiting up to the timeout. `on_wait` is called once, when waiting
    /// starts, with the current holders (to say so to the user).
    pub async fn acquire(&self, n: usize, on_wait: impl FnOnce(&[Holder])) -> Result<Slots> {
        let started = Instant::now();
        let mut on_wait = Some(on_wait);
        let mut pause = Duration::from_millis(20);
        loop {
            if let Some(slots) = self.try_acquire(n)? {
                return Ok(slots);
            }
            if let Some(f) = on_wait.take() {
                f(&self.holders());
            }
            if started.elapsed() >= self.timeout {
                let holders = self.holders();
                let who = if holders.is_empty() {
                    "held by processes that have just exited".to_owned()
                } else {
                    holders.iter().map(|h| h.to_string()).collect::<Vec<_>>().join("; ")
                };
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "timed out after {} waiting for {n} of {} VM slot(s) in {} (held by {who}); \
                         wait for it, raise VMTEST_LOCK_TIMEOUT, or raise --max-vms",
                        crate::spec::format_duration(self.timeout),
                        self.max,
                        self.dir.display()
                    ),
                ));
            }
            tokio::time::sleep(pause.min(self.timeout.saturating_sub(started.elapsed()))).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }
}

/// A default `--max-vms`: as many VMs as there are cores, and no more than the available
/// memory holds (each VM's memory plus 128 MiB for QEMU itself), at least one.
pub fn default_max_vms(vm_memory_mib: u64) -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let available_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024);
    let by_memory = available_mib.map(|m| (m / (vm_memory_mib + 128)) as usize).unwrap_or(cores);
    cores.min(by_memory).max(1)
}

fn write_holder(f: &mut File) {
    let me = ProcessId::current();
    let command = process_command(me.pid).unwrap_or_default();
    let text =
        format!("pid={}\nstart_time={}\nsince={}\ncommand={command}\n", me.pid, me.start_time, now_unix());
    let _ = f.set_len(0).and_then(|_| f.rewind()).and_then(|_| f.write_all(text.as_bytes()));
}

fn parse_holder(text: &str) -> Option<Holder> {
    let field = |k: &str| text.lines().find_map(|l| l.strip_prefix(k)).map(str::to_owned);
    Some(Holder {
        pid: field("pid=")?.parse().ok()?,
        command: field("command=").unwrap_or_default(),
        since_unix: field("since=").and_then(|s| s.parse().ok()).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn slots_are_counted_and_released_on_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let pool = SlotPool::new(tmp.path(), 2, Duration::from_millis(200));
        let a = pool.try_acquire(1).unwrap().unwrap();
        let b = pool.try_acquire(1).unwrap().unwrap();
        assert_ne!(a.indices(), b.indices());
        assert!(pool.try_acquire(1).unwrap().is_none(), "both slots are taken");
        let holders = pool.holders();
        assert_eq!(holders.len(), 2);
        assert_eq!(holders[0].pid, std::process::id());
        drop(a);
        assert!(pool.try_acquire(1).unwrap().is_some());
    }

    #[tokio::test]
    async fn several_slots_are_all_or_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let pool = SlotPool::new(tmp.path(), 3, Duration::from_millis(100));
        let one = pool.try_acquire(1).unwrap().unwrap();
        assert!(pool.try_acquire(3).unwrap().is_none());
        // The failed attempt released what it had: two are still free.
        let two = pool.try_acquire(2).unwrap().unwrap();
        assert_eq!(two.indices().len(), 2);
        drop(one);
        let e = pool.try_acquire(4).unwrap_err();
        assert!(e.message().contains("raise --max-vms to at least 4"), "{e}");
    }

    #[tokio::test]
    async fn timeout_names_the_holder() {
        let tmp = tempfile::tempdir().unwrap();
        let pool = SlotPool::new(tmp.path(), 1, Duration::from_millis(150));
        let _held = pool.try_acquire(1).unwrap().unwrap();
        let mut told = Vec::new();
        let e = pool.acquire(1, |h| told.extend_from_slice(h)).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout);
        assert!(e.message().contains(&format!("pid {}", std::process::id())), "{e}");
        assert_eq!(told.len(), 1, "the wait is announced once, naming the holder");
    }
}
