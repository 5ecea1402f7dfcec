//! The schema of a checked test file: nodes, networks, steps and their actions.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Where an action runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A network-wide action (partition, heal, loss, delay, sleep).
    None,
    /// These nodes, in parallel when more than one.
    Nodes(Vec<String>),
}

/// One action of a step.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Succeed(String),
    Fail(String),
    Execute(String),
    WaitUntilSucceeds(String),
    WaitUntilFails(String),
    WaitForFile(String),
    WaitForUnixSocket(String),
    WaitForOpenPort(u16),
    WaitForClosedPort(u16),
    WaitForConsole(String),
    WaitForUnit(String),
    Systemctl(String),
    CopyTo {
        src: PathBuf,
        dst: PathBuf,
    },
    CopyFrom {
        src: PathBuf,
        dst: PathBuf,
    },
    Block,
    Unblock,
    Start,
    Shutdown,
    Crash,
    Reboot,
    Partition(Vec<Vec<String>>),
    Heal,
    /// Percent of frames dropped, on one link or (None) every link.
    Loss {
        percent: f64,
        link: Option<(String, String)>,
    },
    Delay {
        delay: Duration,
        link: Option<(String, String)>,
    },
    Sleep(Duration),
}

impl Action {
    /// Partitions, heals, link faults and blocks act on the runner's private network.
    pub fn needs_private_network(&self) -> bool {
        matches!(
            self,
            Action::Partition(_)
                | Action::Heal
                | Action::Loss { .. }
                | Action::Delay { .. }
                | Action::Block
                | Action::Unblock
        )
    }

    /// `succeed "curl ..."`, for messages and JUnit.
    pub fn describe(&self) -> String {
        let link = |l: &Option<(String, String)>| match l {
            Some((a, b)) => format!(" on {a}<->{b}"),
            None => " on every link".into(),
        };
        match self {
            Action::Succeed(c) => format!("succeed `{c}`"),
            Action::Fail(c) => format!("fail `{c}`"),
            Action::Execute(c) => format!("execute `{c}`"),
            Action::WaitUntilSucceeds(c) => format!("wait_until_succeeds `{c}`"),
            Action::WaitUntilFails(c) => format!("wait_until_fails `{c}`"),
            Action::WaitForFile(p) => format!("wait_for_file {p}"),
            Action::WaitForUnixSocket(p) => format!("wait_for_unix_socket {p}"),
            Action::WaitForOpenPort(p) => format!("wait_for_open_port {p}"),
            Action::WaitForClosedPort(p) => format!("wait_for_closed_port {p}"),
            Action::WaitForConsole(r) => format!("wait_for_console `{r}`"),
            Action::WaitForUnit(u) => format!("wait_for_unit {u}"),
            Action::Systemctl(a) => format!("systemctl {a}"),
            Action::CopyTo { src, dst } => format!("copy_to {} -> {}", src.display(), dst.display()),
            Action::CopyFrom { src, dst } => format!("copy_from {} -> {}", src.display(), dst.display()),
            Action::Block => "block".into(),
            Action::Unblock => "unblock".into(),
            Action::Start => "start".into(),
            Action::Shutdown => "shutdown".into(),
            Action::Crash => "crash".into(),
            Action::Reboot => "reboot".into(),
            Action::Partition(groups) => format!(
                "partition {}",
                groups.iter().map(|g| format!("[{}]", g.join(","))).collect::<Vec<_>>().join(" ")
            ),
            Action::Heal => "heal".into(),
            Action::Loss { percent, link: l } => format!("loss {percent}%{}", link(l)),
            Action::Delay { delay, link: l } => {
                format!("delay {}{}", crate::spec::format_duration(*delay), link(l))
            }
            Action::Sleep(d) => format!("sleep {}", crate::spec::format_duration(*d)),
        }
    }

    /// Whether the action runs on nodes (needs `on`).
    pub(super) fn on_nodes(&self) -> bool {
        !matches!(
            self,
            Action::Partition(_)
                | Action::Heal
                | Action::Loss { .. }
                | Action::Delay { .. }
                | Action::Sleep(_)
        )
    }

    /// Whether `expect_stdout` means something for it.
    pub(super) fn has_stdout(&self) -> bool {
        matches!(
            self,
            Action::Succeed(_)
                | Action::Fail(_)
                | Action::Execute(_)
                | Action::WaitUntilSucceeds(_)
                | Action::WaitUntilFails(_)
                | Action::Systemctl(_)
                | Action::WaitForConsole(_)
        )
    }
}

/// The action keys a step may hold (exactly one of them).
pub const ACTIONS: &[&str] = &[
    "succeed",
    "fail",
    "execute",
    "wait_until_succeeds",
    "wait_until_fails",
    "wait_for_file",
    "wait_for_unix_socket",
    "wait_for_open_port",
    "wait_for_closed_port",
    "wait_for_console",
    "wait_for_unit",
    "systemctl",
    "copy_to",
    "copy_from",
    "block",
    "unblock",
    "start",
    "shutdown",
    "crash",
    "reboot",
    "partition",
    "heal",
    "loss",
    "delay",
    "sleep",
];

pub(super) const STEP_KEYS: &[&str] =
    &["on", "subtest", "timeout", "expect_stdout", "link", "checkpoint", "from"];
pub(super) const NODE_KEYS: &[&str] =
    &["cpus", "memory", "kernel", "modules", "image", "exec", "networks", "files", "boot_timeout"];

/// One step, checked.
#[derive(Clone, Debug)]
pub struct Step {
    pub line: usize,
    pub on: Target,
    pub subtest: Option<String>,
    pub timeout: Option<Duration>,
    pub expect_stdout: Option<regex::Regex>,
    pub action: Action,
    /// `checkpoint = "NAME"`: once this step passed, every node is saved under this name.
    pub checkpoint: Option<Mark>,
    /// `from = "NAME"`: this step's subtest runs on its own copy of the nodes, restored from
    /// that checkpoint (every step of the subtest says the same).
    pub from: Option<Mark>,
}

/// A checkpoint's name where a step gives it, with the line it is on (for messages).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mark {
    pub name: String,
    pub line: usize,
}

impl Step {
    /// The name of the checkpoint this step makes, if any.
    pub fn checkpoint_name(&self) -> Option<&str> {
        self.checkpoint.as_ref().map(|m| m.name.as_str())
    }

    /// The name of the checkpoint this step's subtest starts from, if any.
    pub fn from_name(&self) -> Option<&str> {
        self.from.as_ref().map(|m| m.name.as_str())
    }
}

/// One node, with the defaults applied.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeDef {
    pub name: String,
    pub line: usize,
    pub cpus: u32,
    pub memory_mib: u64,
    pub kernel: Option<PathBuf>,
    /// The kernel's modules (an INSTALL_MOD_PATH or its `lib/modules/<release>`).
    pub modules: Option<PathBuf>,
    /// A built image (`vmtest image build`): image mode instead of kernel mode.
    pub image: Option<String>,
    /// How commands reach an image node: `agent` (default), `ssh` or `serial`.
    pub exec: crate::spec::ExecVia,
    pub networks: Vec<u8>,
    /// `networks` was written (for the node or in `[defaults]`) rather than the default `[1]`.
    pub networks_explicit: bool,
    /// (host path, guest path); host paths resolved against the test file's directory.
    pub files: Vec<(PathBuf, PathBuf)>,
    pub boot_timeout: Duration,
}

/// Faults a network starts with.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct NetDef {
    pub loss_percent: f64,
    pub delay: Duration,
    /// Where `[networks.N]` is, for messages.
    pub line: usize,
}

/// A checked test file.
#[derive(Clone, Debug)]
pub struct TestFile {
    pub path: PathBuf,
    pub name: String,
    pub timeout: Duration,
    pub step_timeout: Duration,
    /// `backend` in [test], the name of the backend that runs every node, not checked
    /// against any list (see [`TestFile::check_backend_names`]). `None`: the caller's choice.
    pub backend: Option<String>,
    /// Where `backend` is, for messages (0 when it is not set).
    pub backend_line: usize,
    pub nodes: Vec<NodeDef>,
    pub networks: BTreeMap<u8, NetDef>,
    pub steps: Vec<Step>,
}

/// What the backend that runs a test can do, for [`TestFile::check_backend`].
#[derive(Clone, Copy, Debug)]
pub struct BackendTraits<'a> {
    pub name: &'a str,
    /// Private L2 networks between nodes, with partitions and link faults.
    pub private_networks: bool,
    /// Boots a given kernel file.
    pub boots_kernels: bool,
    /// Saves and restores guests (it has a checkpoint store), for `checkpoint` and `from`.
    pub checkpoints: bool,
}

impl TestFile {
    /// The step that makes the file's checkpoint (at most one: see `testfile::checkpoints`),
    /// with its index in [`TestFile::steps`].
    pub fn checkpoint(&self) -> Option<(usize, &Step)> {
        self.steps.iter().enumerate().find(|(_, s)| s.checkpoint.is_some())
    }

    /// The file's checkpoint: its name and line.
    pub fn checkpoint_mark(&self) -> Option<&Mark> {
        self.checkpoint().and_then(|(_, s)| s.checkpoint.as_ref())
    }

    /// The subtests, in order of first appearance.
    pub fn subtests(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for s in &self.steps {
            if let Some(n) = &s.subtest {
                if !v.contains(n) {
                    v.push(n.clone());
                }
            }
        }
        v
    }
}
