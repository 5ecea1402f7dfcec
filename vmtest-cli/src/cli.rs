//! The command-line definition.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::ffi::OsString;
use std::path::PathBuf;
use vmtest_core::config::Flags;
use vmtest_core::runner::{KeepPolicy, KernelReports};

#[derive(Parser, Debug)]
#[command(name = "vmtest", version, about = "Run commands and tests inside real virtual machines")]
pub struct Cli {
    /// More log output (-v: info, -vv: debug). VMTEST_LOG takes a tracing filter.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    /// Only errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Boot a VM, run a command in it as if on the host, tear the VM down.
    ///
    /// Works as a cargo runner:
    /// CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="vmtest run --" cargo test
    Run(RunArgs),
    /// Run declarative multi-VM test files (TOML): boot the nodes on a private network,
    /// run the steps, write JUnit, tear everything down.
    Test(TestArgs),
    /// Show the VMs vmtest knows of: running, kept, orphaned.
    List {
        /// One JSON object per VM, in an array.
        #[arg(long)]
        json: bool,
    },
    /// Run a command in a kept VM.
    Exec(ExecArgs),
    /// Attach to a kept VM's serial console (Ctrl-] to leave).
    Console {
        /// The VM's name, as `vmtest list` shows it.
        name: String,
    },
    /// Tear down a VM and everything it used.
    Destroy {
        /// The VM's name, as `vmtest list` shows it.
        name: String,
    },
    /// Destroy VMs that dead vmtest runs left behind.
    Cleanup(CleanupArgs),
    /// Manage guest kernels.
    #[command(subcommand)]
    Kernel(KernelCommand),
    /// What the cache holds (kernels, QEMU, images, snapshots...), and pruning it.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// QEMU for the qemu backend: where it comes from, or fetch the distro's.
    #[command(subcommand)]
    Qemu(QemuCommand),
    /// Manage base images of backends that have an image store.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Check that this host can run VMs, and say how to fix what is missing.
    Doctor {
        /// The backend whose failure makes doctor fail (default: auto).
        #[arg(long, env = "VMTEST_BACKEND", default_value = "auto", value_name = "NAME")]
        backend: String,
    },
    /// Print the effective `vmtest run` settings and where each value came from.
    ///
    /// Layers, lowest first: built-in defaults, vmtest.toml (found by walking up from the
    /// current directory), its [target.NAME] table, environment variables, flags.
    Config(ConfigArgs),
    /// Print a shell completion script, e.g. `vmtest completions bash > /etc/bash_completion.d/vmtest`.
    Completions {
        #[arg(value_enum)]
        shell: CompletionShell,
    },
    /// Print the man page (roff), e.g. `vmtest man | man -l -`.
    Man {
        /// Write vmtest.1 and one page per subcommand (vmtest-run.1, ...) into this directory.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
    /// Print the raw QEMU boot floor's command line as JSON (for `cargo xtask bench`).
    #[command(hide = true, name = "floor-command")]
    Floor(FloorArgs),
    /// Serve a kept multi-VM test's private network until its machines are destroyed
    /// (started detached by `vmtest test --keep`).
    #[command(hide = true, name = "network-keeper")]
    NetworkKeeper {
        /// The kept run's directory.
        run_dir: PathBuf,
    },
}

/// When a VM is left running after `vmtest run`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Keep {
    Never,
    /// When the command fails, times out or errors after boot.
    OnFailure,
    Always,
}

/// What a bug report of the guest kernel (WARNING, BUG, KASAN...) printed during the
/// command does to the run.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KernelWarnings {
    /// Fail the run (exit 70), whatever the command's status.
    Fail,
    /// Show each report (title and trace) and emit it as an event; the status is the command's.
    Report,
    /// Do not watch the kernel's log.
    Ignore,
}

impl From<Keep> for KeepPolicy {
    fn from(k: Keep) -> Self {
        match k {
            Keep::Never => KeepPolicy::Never,
            Keep::OnFailure => KeepPolicy::OnFailure,
            Keep::Always => KeepPolicy::Always,
        }
    }
}

impl From<KernelWarnings> for KernelReports {
    fn from(k: KernelWarnings) -> Self {
        match k {
            KernelWarnings::Fail => KernelReports::Fail,
            KernelWarnings::Report => KernelReports::Report,
            KernelWarnings::Ignore => KernelReports::Ignore,
        }
    }
}

impl RunSettings {
    /// These flags and the command's, as the library's top config layer.
    pub fn flags(&self, cmd: &CommandArgs) -> Flags {
        let lossy = |s: &OsString| s.to_string_lossy().into_owned();
        Flags {
            config: self.config.clone(),
            target: self.target.clone(),
            backend: self.backend.clone(),
            kernel: self.kernel.clone(),
            modules: self.modules.clone(),
            image: self.image.clone(),
            accel: self.accel.clone(),
            cpus: self.cpus,
            memory: self.memory.clone(),
            boot_timeout: self.boot_timeout.clone(),
            timeout: cmd.timeout.clone(),
            kernel_args: self.kernel_args.clone(),
            keep: self.keep.map(Into::into),
            kernel_warnings: self.kernel_warnings.map(Into::into),
            max_vms: self.max_vms,
            clear_env: cmd.clear_env,
            unset_env: cmd.unset_env.iter().map(lossy).collect(),
            env: cmd.env.iter().map(lossy).collect(),
        }
    }
}

/// How the guest command runs: shared by `run` and `exec`.
#[derive(Args, Debug, Default)]
pub struct CommandArgs {
    /// Kill the command after this long, e.g. 30s, 5m (exit code 124).
    #[arg(long, value_name = "DUR")]
    pub timeout: Option<String>,

    /// Set NAME=VALUE in the guest, or pass the host's NAME through (with --clear-env, or
    /// one of the host-only variables dropped by default).
    #[arg(short, long = "env", value_name = "NAME[=VALUE]")]
    pub env: Vec<OsString>,

    /// Do not pass this host variable.
    #[arg(long, value_name = "NAME")]
    pub unset_env: Vec<OsString>,

    /// Start the guest environment empty instead of from the host's.
    #[arg(long)]
    pub clear_env: bool,

    /// Run the command as root instead of as the invoking user.
    #[arg(long)]
    pub root: bool,

    /// Working directory in the guest. Default: the current directory.
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<PathBuf>,
}

/// VM settings of `vmtest run`. Each one overrides the same key of the nearest `vmtest.toml`
/// (and its `--target`), which overrides the built-in default; `vmtest config` shows the
/// result and where each value came from.
#[derive(Args, Debug, Default, Clone)]
pub struct RunSettings {
    /// The project config file. Default: the first vmtest.toml found walking up from the
    /// current directory ($VMTEST_CONFIG; `none` ignores config files).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// A named target of the config file (its [target.NAME] table) ($VMTEST_TARGET).
    #[arg(short = 't', long, value_name = "NAME")]
    pub target: Option<String>,

    /// Hypervisor backend: qemu, bhyve, multipass, or auto (the first whose pre-flight
    /// passes, in a per-OS order) ($VMTEST_BACKEND). Default: auto.
    #[arg(long, value_name = "NAME")]
    pub backend: Option<String>,

    /// Guest kernel image (bzImage or vmlinux). Default: $VMTEST_KERNEL, the newest readable
    /// /boot/vmlinuz-*, or the cache (fetched on first use). Repeat it for a kernel matrix:
    /// the command runs once per kernel, at once within --max-vms, each run's output
    /// labelled, then a summary; the exit code is the first failing kernel's.
    #[arg(long, value_name = "PATH", conflicts_with = "image")]
    pub kernel: Vec<PathBuf>,

    /// The kernel's modules: the INSTALL_MOD_PATH of `make modules_install` (holding
    /// lib/modules/RELEASE) or that lib/modules/RELEASE itself ($VMTEST_MODULES). Default:
    /// beside the kernel, its build tree's .vmtest-modules, /lib/modules/RELEASE.
    #[arg(long, value_name = "DIR", conflicts_with = "image")]
    pub modules: Option<PathBuf>,

    /// Boot this image of the backend's image store instead of a kernel (qemu: built by
    /// `vmtest image build`; commands go through $VMTEST_EXEC=agent|ssh|serial).
    #[arg(long, value_name = "NAME")]
    pub image: Option<String>,

    /// CPU acceleration: kvm only when proven to work (auto), or forced. Default: auto.
    #[arg(long, value_name = "auto|kvm|tcg")]
    pub accel: Option<String>,

    /// Virtual CPUs. Default: 1.
    #[arg(long, value_name = "N")]
    pub cpus: Option<u32>,

    /// Guest memory, e.g. 512M or 2G (a bare number is MiB). Default: 512M.
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,

    /// Give up if the guest is not ready after this long. Default: 120s.
    #[arg(long, value_name = "DUR")]
    pub boot_timeout: Option<String>,

    /// Extra kernel command-line words.
    #[arg(long, value_name = "ARGS")]
    pub kernel_args: Option<String>,

    /// Leave the VM running after the run: `--keep` alone keeps it when the command fails.
    /// Default: never.
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "on-failure")]
    pub keep: Option<Keep>,

    /// At most this many VMs at once, counted over every vmtest process of this user
    /// (1: strictly one at a time) ($VMTEST_MAX_VMS). Default: what the cores and memory allow.
    #[arg(long, value_name = "N")]
    pub max_vms: Option<usize>,

    /// What a guest kernel bug report (WARNING, BUG, Oops, KASAN, UBSAN, KFENCE, lockdep,
    /// RCU stall, hung task, soft lockup) printed while the command runs does: fail (exit
    /// 70), report, or ignore. Default: report.
    #[arg(long, value_enum, value_name = "WHAT")]
    pub kernel_warnings: Option<KernelWarnings>,
}

/// How `vmtest run` reports what it does.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MessageFormat {
    /// Progress for people on stderr: a live status line on a terminal, timestamped lines
    /// otherwise (or with CI=true).
    #[default]
    Human,
    /// One JSON event per line on stderr (schema: docs/events.md).
    Json,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub settings: RunSettings,

    /// Print how long boot, setup, the command and teardown took.
    #[arg(long)]
    pub timings: bool,

    /// Boot every VM instead of restoring the snapshot saved at "agent ready" (QEMU).
    #[arg(long, env = "VMTEST_NO_SNAPSHOT", value_parser = clap::builder::FalseyValueParser::new())]
    pub no_snapshot: bool,

    /// Expose QEMU's gdb stub on 127.0.0.1:PORT (a free port when none is given); vmtest
    /// prints the gdb command to attach (qemu kernel mode).
    #[arg(long, value_name = "PORT", num_args = 0..=1, default_missing_value = "0")]
    pub gdb: Option<u16>,

    /// With the gdb stub: start the guest halted until gdb continues it (boots cold).
    #[arg(long)]
    pub gdb_wait: bool,

    /// How progress and results are reported on stderr ($VMTEST_MESSAGE_FORMAT).
    #[arg(long, value_enum, value_name = "FMT", env = "VMTEST_MESSAGE_FORMAT", default_value = "human")]
    pub message_format: MessageFormat,

    /// Also write the JSON event stream to this file (any --message-format).
    #[arg(long, value_name = "PATH")]
    pub events_file: Option<PathBuf>,

    /// When the run fails, keep its logs (console, QEMU) in this directory.
    #[arg(long, env = "VMTEST_FAILURE_LOGS", value_name = "DIR")]
    pub failure_logs: Option<PathBuf>,

    #[command(flatten)]
    pub command_args: CommandArgs,

    /// The command and its arguments, passed exactly.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

#[derive(Args, Debug)]
pub struct ConfigArgs {
    #[command(flatten)]
    pub settings: RunSettings,

    #[command(flatten)]
    pub command_args: CommandArgs,

    /// Print a JSON object instead of annotated TOML.
    #[arg(long)]
    pub json: bool,
}

/// A shell to generate completions for.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
    Elvish,
    #[value(name = "powershell")]
    PowerShell,
}

#[derive(Args, Debug)]
pub struct TestArgs {
    /// Test files (TOML). All are checked before anything boots.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,

    /// Write a JUnit XML report here (one test case per subtest).
    #[arg(long, value_name = "PATH")]
    pub junit: Option<PathBuf>,

    /// On failure, leave the machines running and print how to reach them.
    #[arg(long)]
    pub keep: bool,

    /// Only run subtests whose name contains this (steps outside subtests always run).
    #[arg(long, value_name = "SUBTEST")]
    pub filter: Option<String>,

    /// Run only share K of N of the files (1-based, e.g. 2/3), for sharding over CI machines.
    #[arg(long, value_name = "K/N")]
    pub partition: Option<String>,

    /// Only check the files; boot nothing.
    #[arg(long)]
    pub check: bool,

    /// Boot every node: reuse no stored checkpoint (a file's `checkpoint` is made afresh and
    /// kept only for this run's `from` subtests) and no snapshot saved at "agent ready" (QEMU).
    #[arg(long, env = "VMTEST_NO_SNAPSHOT", value_parser = clap::builder::FalseyValueParser::new())]
    pub no_snapshot: bool,

    /// Hypervisor backend for every file: qemu, bhyve, multipass or auto. Default: the file's
    /// `backend` in [test], else vmtest.toml's or $VMTEST_BACKEND, else qemu. Private
    /// networks, partitions and link faults need qemu.
    #[arg(long, value_name = "NAME")]
    pub backend: Option<String>,

    /// CPU acceleration: kvm only when proven to work (auto), or forced. Default: vmtest.toml's,
    /// else auto.
    #[arg(long, value_name = "auto|kvm|tcg")]
    pub accel: Option<String>,

    /// At most this many VMs at once over every vmtest process of this user. A test takes
    /// a slot per node, all at once ($VMTEST_MAX_VMS). Default: vmtest.toml's, else what the
    /// cores and memory allow, but at least the largest test's node count.
    #[arg(long, value_name = "N")]
    pub max_vms: Option<usize>,

    /// What a guest kernel bug report printed during a step does: fail the step (exit 1,
    /// the case fails), report it (an event, and a line in the step's JUnit case), or
    /// ignore. Default: vmtest.toml's `kernel-warnings`, else report.
    #[arg(long, value_enum, value_name = "WHAT")]
    pub kernel_warnings: Option<KernelWarnings>,

    /// The project config file, as for `vmtest run` ($VMTEST_CONFIG; `none` ignores it):
    /// its backend, accel, max-vms and kernel-warnings apply to every file.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// A named target of the config file ($VMTEST_TARGET).
    #[arg(short = 't', long, value_name = "NAME")]
    pub target: Option<String>,

    /// How progress and results are reported on stderr ($VMTEST_MESSAGE_FORMAT).
    #[arg(long, value_enum, value_name = "FMT", env = "VMTEST_MESSAGE_FORMAT", default_value = "human")]
    pub message_format: MessageFormat,

    /// Also write the JSON event stream to this file (any --message-format).
    #[arg(long, value_name = "PATH")]
    pub events_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    /// The VM's name, as `vmtest list` shows it.
    pub name: String,

    #[command(flatten)]
    pub command_args: CommandArgs,

    /// The command and its arguments, passed exactly.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

#[derive(Args, Debug)]
pub struct CleanupArgs {
    /// Only show what would be destroyed.
    #[arg(long)]
    pub list_only: bool,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub force: bool,
    /// Also kept VMs and VMs of runs still in progress (careful).
    #[arg(long)]
    pub all: bool,
}

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Import a raw disk image as a named base image (bhyve: a ZFS volume with @base).
    Import {
        #[arg(long, env = "VMTEST_BACKEND", value_name = "NAME")]
        backend: String,
        /// The raw image file.
        file: PathBuf,
        /// The image's name.
        name: String,
        /// Replace an image of that name.
        #[arg(long)]
        force: bool,
    },
    /// List a backend's base images (default: the QEMU image cache).
    List {
        #[arg(long, env = "VMTEST_BACKEND", value_name = "NAME", default_value = "qemu")]
        backend: String,
    },
    /// Build a QEMU image from a spec (debootstrap; cached by the spec's content: a second
    /// build of the same spec is instant).
    Build {
        /// The image spec (TOML: name, release, packages, files, commands).
        spec: PathBuf,
    },
    /// Remove a QEMU image by name (its files go unless another name shares them).
    Rm { name: String },
    /// Remove QEMU images no name points at and leftovers of interrupted builds.
    Gc,
}

#[derive(Subcommand, Debug)]
pub enum KernelCommand {
    /// Download the distro's kernel package (apt-get download) into the cache.
    Fetch {
        /// A package name, e.g. linux-image-6.1.0-56-amd64. Default: the current one.
        package: Option<String>,
        /// Do nothing when vmtest already finds a kernel (--kernel aside).
        #[arg(long)]
        if_missing: bool,
    },
    /// Show the kernel vmtest would use, and the cached ones.
    List,
}

#[derive(Subcommand, Debug)]
pub enum CacheCommand {
    /// Every entry with its kind, size and last use; whether vmtest makes it again on demand.
    List {
        /// One JSON object per entry, in an array.
        #[arg(long)]
        json: bool,
    },
    /// Remove what vmtest makes again on demand (snapshots, extracted kernels, initramfs
    /// images, module lists, KVM verdicts), least recently used first. Fetched kernels and
    /// QEMU and built images are never removed here.
    Gc {
        /// Keep at most this much of it, e.g. 2G (0 removes all of it).
        #[arg(long, value_name = "SIZE")]
        max_size: Option<String>,
        /// Remove what was not used for this long, e.g. 7d, 12h.
        #[arg(long, value_name = "DUR")]
        older_than: Option<String>,
        /// Only these kinds (snapshot, boot-image, initramfs, module-list, kvm-verdict).
        #[arg(long = "kind", value_name = "KIND")]
        kinds: Vec<String>,
        /// Say what would go, remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum QemuCommand {
    /// Download the distro's qemu-system-x86 and the libraries the host lacks (apt-get
    /// download, no root) and unpack them into the cache.
    Fetch {
        /// Do nothing when vmtest already finds a QEMU ($VMTEST_QEMU, PATH, or fetched).
        #[arg(long)]
        if_missing: bool,
    },
    /// Show the QEMU vmtest would use, and where it came from.
    Which,
}

#[derive(Args, Debug)]
pub struct FloorArgs {
    /// Where the floor guest's sockets go (the caller creates and removes it).
    #[arg(long)]
    pub dir: PathBuf,
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    #[arg(long, default_value = "auto")]
    pub accel: String,
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    #[arg(long, default_value = "512M")]
    pub memory: String,
}
