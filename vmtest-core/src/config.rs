//! The project config file, `vmtest.toml`, and how it combines with the environment and the
//! command line into the effective settings of a run: one resolve step that `vmtest run`,
//! `vmtest test`, `vmtest config` and any program embedding vmtest share.
//!
//! Layers, lowest first: built-in defaults; the file's top-level keys; its `[target.NAME]`
//! table (picked by `--target`, `$VMTEST_TARGET` or `default-target`); environment
//! variables; flags. The file is the first `vmtest.toml` found walking up from the current
//! directory, as Cargo finds `Cargo.toml`, so it also applies when vmtest runs as a cargo
//! runner (cwd = the package directory).

use crate::environment::EnvRules;
use crate::error::{Error, Result};
use crate::registry::BackendSettings;
use crate::runner::{KeepPolicy, KernelReports};
use crate::spec::{self, BootSpec, VmSpec};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

pub const FILE_NAME: &str = "vmtest.toml";

/// The `env` table: rules added to the guest environment (see `vmtest run --help`).
#[derive(Deserialize, Default, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct EnvTable {
    /// Start the guest environment empty.
    pub clear: Option<bool>,
    /// Host variables to pass through.
    #[serde(default)]
    pub pass: Vec<String>,
    /// Host variables to drop.
    #[serde(default)]
    pub unset: Vec<String>,
    /// Variables to set.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
}

macro_rules! settings {
    ($(#[$m:meta])* $name:ident { $($extra:tt)* }) => {
        $(#[$m])*
        #[derive(Deserialize, Default, Debug, Clone, PartialEq)]
        #[serde(deny_unknown_fields, rename_all = "kebab-case")]
        pub struct $name {
            pub backend: Option<String>,
            pub kernel: Option<Kernels>,
            pub modules: Option<PathBuf>,
            pub image: Option<String>,
            pub accel: Option<String>,
            pub cpus: Option<u32>,
            pub memory: Option<String>,
            #[serde(alias = "boot_timeout")]
            pub boot_timeout: Option<String>,
            pub timeout: Option<String>,
            #[serde(alias = "kernel_args")]
            pub kernel_args: Option<String>,
            pub keep: Option<KeepPolicy>,
            #[serde(alias = "kernel_warnings")]
            pub kernel_warnings: Option<KernelReports>,
            #[serde(alias = "max_vms")]
            pub max_vms: Option<usize>,
            pub env: Option<EnvTable>,
            $($extra)*
        }
    };
}

settings!(
    /// One `[target.NAME]` table.
    TargetSettings {}
);

settings!(
    /// A whole `vmtest.toml`: defaults at the top level, named targets below.
    ConfigFile {
        /// The target used when neither --target nor $VMTEST_TARGET names one.
        #[serde(alias = "default_target")]
        pub default_target: Option<String>,
        #[serde(default)]
        pub target: BTreeMap<String, TargetSettings>,
    }
);

impl ConfigFile {
    fn defaults(&self) -> TargetSettings {
        TargetSettings {
            backend: self.backend.clone(),
            kernel: self.kernel.clone(),
            modules: self.modules.clone(),
            image: self.image.clone(),
            accel: self.accel.clone(),
            cpus: self.cpus,
            memory: self.memory.clone(),
            boot_timeout: self.boot_timeout.clone(),
            timeout: self.timeout.clone(),
            kernel_args: self.kernel_args.clone(),
            keep: self.keep,
            kernel_warnings: self.kernel_warnings,
            max_vms: self.max_vms,
            env: self.env.clone(),
        }
    }

    /// Parse `text`, read from `path` (for messages).
    pub fn parse(text: &str, path: &Path) -> Result<ConfigFile> {
        toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|s| {
                    let before = &text[..s.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
                    format!(":{line}:{col}")
                })
                .unwrap_or_default();
            let msg = e.message().replace('\n', " ");
            let msg = msg.trim();
            Error::usage(format!("{}{at}: {msg}; see `vmtest config --help` for the keys", path.display()))
        })
    }
}

/// `kernel` in vmtest.toml: one path, or a list for a kernel matrix (the command runs once
/// per kernel).
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(untagged)]
pub enum Kernels {
    One(PathBuf),
    Many(Vec<PathBuf>),
}

impl Kernels {
    fn paths(&self) -> &[PathBuf] {
        match self {
            Kernels::One(p) => std::slice::from_ref(p),
            Kernels::Many(v) => v,
        }
    }
}

/// The highest layer: what the command line (or an embedding program) sets. Each field
/// overrides the same key of the config file; `None` leaves it alone. Provenance names the
/// `vmtest` flag that sets it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Flags {
    /// The config file (`none`: no config file). Default: `$VMTEST_CONFIG`, else the first
    /// `vmtest.toml` walking up from the current directory.
    pub config: Option<PathBuf>,
    /// A `[target.NAME]` table of the config file.
    pub target: Option<String>,
    pub backend: Option<String>,
    /// Kernels; more than one makes a kernel matrix.
    pub kernel: Vec<PathBuf>,
    /// The kernel's modules (`make modules_install`'s INSTALL_MOD_PATH, or its
    /// `lib/modules/<release>`).
    pub modules: Option<PathBuf>,
    pub image: Option<String>,
    pub accel: Option<String>,
    pub cpus: Option<u32>,
    pub memory: Option<String>,
    pub boot_timeout: Option<String>,
    /// The command's timeout.
    pub timeout: Option<String>,
    pub kernel_args: Option<String>,
    pub keep: Option<KeepPolicy>,
    pub kernel_warnings: Option<KernelReports>,
    pub max_vms: Option<usize>,
    /// Start the guest environment empty.
    pub clear_env: bool,
    /// Host variables not to pass.
    pub unset_env: Vec<String>,
    /// `NAME=VALUE` to set, or `NAME` to pass a host variable through.
    pub env: Vec<String>,
}

/// Where a value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Default,
    File(PathBuf),
    Target(String, PathBuf),
    Env(&'static str),
    Flag(&'static str),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => write!(f, "default"),
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Target(t, p) => write!(f, "{} [target.{t}]", p.display()),
            Source::Env(v) => write!(f, "env {v}"),
            Source::Flag(fl) => write!(f, "{fl}"),
        }
    }
}

/// A value and its origin.
#[derive(Clone, Debug, PartialEq)]
pub struct Val<T> {
    pub value: T,
    pub source: Source,
}

/// One environment rule and its origin.
#[derive(Clone, Debug, PartialEq)]
pub enum EnvRule {
    Clear,
    Pass(String),
    Unset(String),
    Set(String, String),
}

/// The effective settings of one run: every value with where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Effective {
    pub file: Option<PathBuf>,
    pub target: Option<Val<String>>,
    pub backend: Val<String>,
    /// Empty: the backend finds one. More than one: a kernel matrix.
    pub kernel: Val<Vec<PathBuf>>,
    pub modules: Val<Option<PathBuf>>,
    pub image: Val<Option<String>>,
    pub accel: Val<String>,
    pub cpus: Val<u32>,
    pub memory: Val<String>,
    pub boot_timeout: Val<String>,
    pub timeout: Val<Option<String>>,
    pub kernel_args: Val<Option<String>>,
    pub keep: Val<KeepPolicy>,
    pub kernel_warnings: Val<KernelReports>,
    pub max_vms: Val<Option<usize>>,
    /// In the order they apply (config first, flags last, so flags win).
    pub env: Vec<(EnvRule, Source)>,
}

impl Effective {
    /// The VM these settings describe (named "vm"; a run gives it its unique name).
    /// `$VMTEST_EXEC` picks the exec transport of image guests.
    pub fn vm_spec(&self) -> Result<VmSpec> {
        if self.cpus.value == 0 {
            return blame(Err(Error::usage("cpus must be at least 1")), &self.cpus.source);
        }
        let mut vm = VmSpec::new("", "vm");
        vm.cpus = self.cpus.value;
        vm.memory_mib = blame(spec::parse_memory_mib(&self.memory.value), &self.memory.source)?;
        vm.accel = blame(self.accel.value.parse(), &self.accel.source)?;
        vm.boot_timeout = blame(spec::parse_duration(&self.boot_timeout.value), &self.boot_timeout.source)?;
        vm.boot = match &self.image.value {
            Some(name) => BootSpec::Image { name: name.clone() },
            None => BootSpec::Kernel {
                kernel: self.kernel.value.first().cloned(),
                modules: self.modules.value.clone(),
            },
        };
        if let Some(via) = std::env::var("VMTEST_EXEC").ok().filter(|v| !v.is_empty()) {
            vm.exec =
                via.parse().map_err(|e: Error| Error::usage(format!("$VMTEST_EXEC: {}", e.headline())))?;
        }
        Ok(vm)
    }

    /// The command's timeout, if one is set.
    pub fn command_timeout(&self) -> Result<Option<std::time::Duration>> {
        blame(self.timeout.value.as_deref().map(spec::parse_duration).transpose(), &self.timeout.source)
    }

    /// What the backends are made with: the kernel arguments, and whether VMs may outlive
    /// this process (they may when they may be kept).
    pub fn backend_settings(&self) -> BackendSettings {
        BackendSettings {
            kernel_args: self
                .kernel_args
                .value
                .as_deref()
                .map(|a| a.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default(),
            die_with_parent: self.keep.value == KeepPolicy::Never,
            ..BackendSettings::default()
        }
    }

    /// The guest environment rules.
    pub fn env_rules(&self) -> EnvRules {
        let mut rules = EnvRules::default();
        for (rule, _) in &self.env {
            match rule {
                EnvRule::Clear => rules.clear = true,
                EnvRule::Pass(n) => rules.pass.push(n.into()),
                EnvRule::Unset(n) => rules.unset.push(n.into()),
                EnvRule::Set(k, v) => rules.set.push((k.into(), v.into())),
            }
        }
        rules
    }
}

/// Turn an error about a value into one that says where the value came from.
pub fn blame<T>(r: Result<T>, source: &Source) -> Result<T> {
    r.map_err(|e| match source {
        // Only a bad value is the setting's fault; a backend that cannot run keeps its kind.
        s if *s != Source::Default && e.kind() == crate::ErrorKind::Usage => {
            Error::usage(format!("{} (set by {s})", e.headline()))
        }
        _ => e,
    })
}

/// The config file that applies: `--config`, `$VMTEST_CONFIG`, else the first vmtest.toml
/// walking up from `cwd`. `none` turns config files off.
pub fn locate(
    flag: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
    cwd: &Path,
) -> Result<Option<PathBuf>> {
    let (chosen, how) = match (flag, env("VMTEST_CONFIG").filter(|v| !v.is_empty())) {
        (Some(p), _) => (Some(p.to_path_buf()), "--config"),
        (None, Some(v)) => (Some(PathBuf::from(v)), "$VMTEST_CONFIG"),
        (None, None) => (None, ""),
    };
    match chosen {
        Some(p) if p.as_os_str() == "none" => Ok(None),
        Some(p) => {
            let p = cwd.join(p);
            if p.is_file() {
                Ok(Some(p))
            } else {
                Err(Error::usage(format!(
                    "config file {} (from {how}) does not exist; fix the path, or use `none` for no config file",
                    p.display()
                )))
            }
        }
        None => Ok(cwd.ancestors().map(|d| d.join(FILE_NAME)).find(|p| p.is_file())),
    }
}

/// Combine defaults, the config file, the environment and the flags.
pub fn resolve(flags: &Flags, env: &dyn Fn(&str) -> Option<String>, cwd: &Path) -> Result<Effective> {
    let Layers { file, target, layers } = config_layers(flags, env, cwd)?;
    let env_val = |name: &'static str| env(name).filter(|v| !v.is_empty()).map(|v| (name, v));
    // Pick the highest layer that sets a key.
    macro_rules! pick {
        ($field:ident, $default:expr, $env:expr, $flag:expr, $flagname:expr) => {{
            let mut v = Val { value: $default, source: Source::Default };
            for (l, src, _) in &layers {
                if let Some(x) = &l.$field {
                    v = Val { value: x.clone().into(), source: src.clone() };
                }
            }
            if let Some((name, x)) = $env {
                v = Val { value: x, source: Source::Env(name) };
            }
            if let Some(x) = $flag {
                v = Val { value: x.clone().into(), source: Source::Flag($flagname) };
            }
            v
        }};
    }
    let env_parse = |name: &'static str| -> Result<Option<(&'static str, usize)>> {
        match env_val(name) {
            Some((n, v)) => v.trim().parse().map(|x| Some((n, x))).map_err(|_| {
                Error::usage(format!(
                    "${name} is `{v}`, not a number; set it to a positive integer or unset it"
                ))
            }),
            None => Ok(None),
        }
    };

    let backend =
        pick!(backend, "auto".to_owned(), env_val("VMTEST_BACKEND"), flags.backend.as_ref(), "--backend");
    let BootSource { kernel, modules, image } = boot_source(&layers, flags, &env_val, cwd)?;
    let accel = pick!(accel, "auto".to_owned(), None, flags.accel.as_ref(), "--accel");
    let cpus = pick!(cpus, 1u32, None, flags.cpus.as_ref(), "--cpus");
    let memory = pick!(memory, "512M".to_owned(), None, flags.memory.as_ref(), "--memory");
    let boot_timeout =
        pick!(boot_timeout, "120s".to_owned(), None, flags.boot_timeout.as_ref(), "--boot-timeout");
    let timeout: Val<Option<String>> =
        pick!(timeout, None, None, flags.timeout.as_ref().map(|t| Some(t.clone())), "--timeout");
    let kernel_args: Val<Option<String>> =
        pick!(kernel_args, None, None, flags.kernel_args.as_ref().map(|t| Some(t.clone())), "--kernel-args");
    let keep = pick!(keep, KeepPolicy::Never, None, flags.keep.as_ref(), "--keep");
    let kernel_warnings = pick!(
        kernel_warnings,
        KernelReports::Report,
        None,
        flags.kernel_warnings.as_ref(),
        "--kernel-warnings"
    );
    let max_vms: Val<Option<usize>> = pick!(
        max_vms,
        None,
        env_parse("VMTEST_MAX_VMS")?.map(|(n, x)| (n, Some(x))),
        flags.max_vms.map(Some).as_ref(),
        "--max-vms"
    );

    let rules = env_rules(&layers, flags);
    Ok(Effective {
        file,
        target,
        backend,
        kernel,
        modules,
        image,
        accel,
        cpus,
        memory,
        boot_timeout,
        timeout,
        kernel_args,
        keep,
        kernel_warnings,
        max_vms,
        env: rules,
    })
}

/// A config layer: a table's settings, where they came from, and the directory its paths
/// are relative to.
type Layer = (TargetSettings, Source, PathBuf);

/// The config file that applies, the target picked in it, and the layers they give.
struct Layers {
    file: Option<PathBuf>,
    target: Option<Val<String>>,
    /// Lowest first.
    layers: Vec<Layer>,
}

/// The config file, the target, and the layers they give, lowest first.
fn config_layers(flags: &Flags, env: &dyn Fn(&str) -> Option<String>, cwd: &Path) -> Result<Layers> {
    let file = locate(flags.config.as_deref(), env, cwd)?;
    let parsed = match &file {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| {
                Error::usage(format!("cannot read {}: {e}; check its permissions", p.display()))
            })?;
            Some(ConfigFile::parse(&text, p)?)
        }
        None => None,
    };
    let target = match (&flags.target, env("VMTEST_TARGET").filter(|v| !v.is_empty())) {
        (Some(t), _) => Some(Val { value: t.clone(), source: Source::Flag("--target") }),
        (None, Some(t)) => Some(Val { value: t, source: Source::Env("VMTEST_TARGET") }),
        (None, None) => parsed
            .as_ref()
            .and_then(|c| c.default_target.clone())
            .map(|t| Val { value: t, source: Source::File(file.clone().unwrap_or_default()) }),
    };

    // The config layers, lowest first, with their sources and base directories.
    let mut layers: Vec<Layer> = Vec::new();
    if let (Some(cfg), Some(path)) = (&parsed, &file) {
        let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
        layers.push((cfg.defaults(), Source::File(path.clone()), dir.clone()));
        if let Some(t) = &target {
            let Some(ts) = cfg.target.get(&t.value) else {
                let names: Vec<&str> = cfg.target.keys().map(String::as_str).collect();
                return Err(Error::usage(format!(
                    "no target `{}` (from {}) in {}; {}",
                    t.value,
                    t.source,
                    path.display(),
                    if names.is_empty() {
                        "it defines none: add a [target.NAME] table".to_owned()
                    } else {
                        format!("its targets: {}", names.join(", "))
                    }
                )));
            };
            layers.push((ts.clone(), Source::Target(t.value.clone(), path.clone()), dir));
        }
    } else if let Some(t) = &target {
        return Err(Error::usage(format!(
            "target `{}` (from {}) needs a config file, and no {FILE_NAME} was found in {} or above; \
             create one with a [target.{}] table, or pass --config PATH",
            t.value,
            t.source,
            cwd.display(),
            t.value
        )));
    }

    Ok(Layers { file, target, layers })
}

/// What a guest boots: kernels (and their modules), or an image.
struct BootSource {
    kernel: Val<Vec<PathBuf>>,
    modules: Val<Option<PathBuf>>,
    image: Val<Option<String>>,
}

/// The boot source over every layer: a flag for one source overrides the other one from a
/// lower layer, and a kernel and an image from the same layer clash.
fn boot_source(
    layers: &[Layer],
    flags: &Flags,
    env_val: &dyn Fn(&'static str) -> Option<(&'static str, String)>,
    cwd: &Path,
) -> Result<BootSource> {
    let mut kernel: Val<Vec<PathBuf>> = Val { value: Vec::new(), source: Source::Default };
    for (l, src, dir) in layers {
        if let Some(k) = &l.kernel {
            // Relative to the file that names it (like danobi/vmtest#94 asks).
            kernel = Val { value: k.paths().iter().map(|k| dir.join(k)).collect(), source: src.clone() };
        }
    }
    if let Some((n, v)) = env_val("VMTEST_KERNEL") {
        kernel = Val { value: vec![PathBuf::from(v)], source: Source::Env(n) };
    }
    if !flags.kernel.is_empty() {
        kernel = Val {
            value: flags.kernel.iter().map(|k| cwd.join(k)).collect(),
            source: Source::Flag("--kernel"),
        };
    }
    let mut modules = path_setting(
        layers,
        |l| l.modules.as_ref(),
        env_val("VMTEST_MODULES"),
        flags.modules.as_ref().map(|m| (cwd.join(m), "--modules")),
    );
    let mut image: Val<Option<String>> = Val { value: None, source: Source::Default };
    for (l, src, _) in layers {
        if let Some(i) = &l.image {
            image = Val { value: Some(i.clone()), source: src.clone() };
        }
    }
    if let Some(i) = &flags.image {
        image = Val { value: Some(i.clone()), source: Source::Flag("--image") };
    }
    // A flag for one boot source overrides the other one from a lower layer.
    let (kernel, image) = match (&kernel.source, &image.source) {
        (Source::Flag(_), _) if flags.image.is_none() => {
            (kernel, Val { value: None, source: Source::Flag("--kernel") })
        }
        (_, Source::Flag(_)) => (Val { value: Vec::new(), source: Source::Flag("--image") }, image),
        _ => (kernel, image),
    };
    // An image flag replaces the lower layers' modules as it replaces their kernel.
    if flags.image.is_some() && flags.modules.is_none() {
        modules = Val { value: None, source: Source::Flag("--image") };
    }
    if let (Some(_), Some(_)) = (&modules.value, &image.value) {
        return Err(Error::usage(format!(
            "kernel modules (from {}) go with a kernel, and an image (from {}) is set, which brings its own; \
             keep one",
            modules.source, image.source
        )));
    }
    if let (false, Some(_)) = (kernel.value.is_empty(), &image.value) {
        return Err(Error::usage(format!(
            "both a kernel (from {}) and an image (from {}) are set; keep one (in a config file, a target's \
             `kernel` or `image` replaces neither: remove one of them)",
            kernel.source, image.source
        )));
    }
    Ok(BootSource { kernel, modules, image })
}

/// The guest environment rules, in the order they apply: config layers first, flags last.
fn env_rules(layers: &[Layer], flags: &Flags) -> Vec<(EnvRule, Source)> {
    let mut rules = Vec::new();
    for (l, src, _) in layers {
        if let Some(e) = &l.env {
            if e.clear == Some(true) {
                rules.push((EnvRule::Clear, src.clone()));
            }
            rules.extend(e.unset.iter().map(|n| (EnvRule::Unset(n.clone()), src.clone())));
            rules.extend(e.pass.iter().map(|n| (EnvRule::Pass(n.clone()), src.clone())));
            rules.extend(e.set.iter().map(|(k, v)| (EnvRule::Set(k.clone(), v.clone()), src.clone())));
        }
    }
    if flags.clear_env {
        rules.push((EnvRule::Clear, Source::Flag("--clear-env")));
    }
    for n in &flags.unset_env {
        rules.push((EnvRule::Unset(n.clone()), Source::Flag("--unset-env")));
    }
    for s in &flags.env {
        let rule = match s.split_once('=') {
            Some((k, v)) => EnvRule::Set(k.to_owned(), v.to_owned()),
            None => EnvRule::Pass(s.clone()),
        };
        rules.push((rule, Source::Flag("--env")));
    }

    rules
}

/// A path setting from the highest layer that sets it: a file's value relative to the file
/// that names it (like danobi/vmtest#94 asks), an environment variable's as it is, a flag's
/// (already joined to the current directory).
fn path_setting(
    layers: &[Layer],
    key: fn(&TargetSettings) -> Option<&PathBuf>,
    env: Option<(&'static str, String)>,
    flag: Option<(PathBuf, &'static str)>,
) -> Val<Option<PathBuf>> {
    let from_file = layers.iter().filter_map(|(l, source, dir)| Some((dir.join(key(l)?), source.clone())));
    let from_env = env.map(|(name, v)| (PathBuf::from(v), Source::Env(name)));
    let from_flag = flag.map(|(p, name)| (p, Source::Flag(name)));
    match from_file.chain(from_env).chain(from_flag).last() {
        Some((path, source)) => Val { value: Some(path), source },
        None => Val { value: None, source: Source::Default },
    }
}

/// The real process environment.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join(FILE_NAME);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn defaults_without_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = resolve(&Flags::default(), &no_env, dir.path()).unwrap();
        assert_eq!(e.file, None);
        assert_eq!(e.cpus, Val { value: 1, source: Source::Default });
        assert_eq!(e.memory.value, "512M");
        assert_eq!(e.backend.value, "auto");
        assert!(e.env.is_empty());
    }

    #[test]
    fn found_walking_up_and_layered() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            r#"
cpus = 2
memory = "1G"
kernel = "k/bzImage"
timeout = "5m"
[env]
set = { A = "1" }
pass = ["HOME"]
[target.big]
cpus = 4
env = { unset = ["SECRET"] }
"#,
        );
        let sub = dir.path().join("a/b");
        std::fs::create_dir_all(&sub).unwrap();
        let flags = Flags {
            target: Some("big".into()),
            memory: Some("2G".into()),
            env: vec!["A=2".into()],
            ..Default::default()
        };
        let e = resolve(&flags, &no_env, &sub).unwrap();
        assert_eq!(e.file.as_deref(), Some(path.as_path()));
        assert_eq!(e.cpus, Val { value: 4, source: Source::Target("big".into(), path.clone()) });
        assert_eq!(e.memory, Val { value: "2G".into(), source: Source::Flag("--memory") });
        assert_eq!(e.timeout, Val { value: Some("5m".into()), source: Source::File(path.clone()) });
        assert_eq!(e.kernel.value, [dir.path().join("k/bzImage")]);
        let rules = e.env_rules();
        assert_eq!(rules.unset, vec![OsString::from("SECRET")]);
        assert_eq!(rules.pass, vec![OsString::from("HOME")]);
        // The flag comes last, so it wins.
        assert_eq!(rules.set.last().unwrap(), &(OsString::from("A"), OsString::from("2")));
    }

    #[test]
    fn env_vars_beat_the_file_and_flags_beat_env_vars() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "backend = \"multipass\"\nmax-vms = 3\n");
        let env = |n: &str| match n {
            "VMTEST_BACKEND" => Some("qemu".to_owned()),
            "VMTEST_MAX_VMS" => Some("2".to_owned()),
            _ => None,
        };
        let e = resolve(&Flags::default(), &env, dir.path()).unwrap();
        assert_eq!(e.backend, Val { value: "qemu".into(), source: Source::Env("VMTEST_BACKEND") });
        assert_eq!(e.max_vms, Val { value: Some(2), source: Source::Env("VMTEST_MAX_VMS") });
        let flags = Flags { max_vms: Some(1), ..Default::default() };
        let e = resolve(&flags, &env, dir.path()).unwrap();
        assert_eq!(e.max_vms, Val { value: Some(1), source: Source::Flag("--max-vms") });
    }

    #[test]
    fn default_target_and_unknown_targets() {
        let dir = tempfile::tempdir().unwrap();
        // snake_case spellings (as in test files) work too.
        write(
            dir.path(),
            "default_target = \"a\"\n[target.a]\ncpus = 3\nboot_timeout = \"9s\"\n[target.b]\ncpus = 5\n",
        );
        let e = resolve(&Flags::default(), &no_env, dir.path()).unwrap();
        assert_eq!(e.cpus.value, 3);
        assert_eq!(e.boot_timeout.value, "9s");
        let env = |n: &str| (n == "VMTEST_TARGET").then(|| "b".to_owned());
        assert_eq!(resolve(&Flags::default(), &env, dir.path()).unwrap().cpus.value, 5);
        let flags = Flags { target: Some("c".into()), ..Default::default() };
        let err = resolve(&flags, &no_env, dir.path()).unwrap_err();
        assert!(err.message().contains("no target `c` (from --target)"), "{}", err.message());
        assert!(err.message().ends_with("its targets: a, b"), "{}", err.message());
    }

    #[test]
    fn typos_name_the_line_and_the_key() {
        let err = ConfigFile::parse("cpus = 2\ncpu = 3\n", Path::new("/p/vmtest.toml")).unwrap_err();
        let m = err.message();
        assert!(m.starts_with("/p/vmtest.toml:2:1: unknown field `cpu`"), "{m}");
        assert!(!m.contains('\n'));
        let err = ConfigFile::parse("[target.x]\nmemory = 512\n", Path::new("v.toml")).unwrap_err();
        assert!(err.message().contains("v.toml:2:"), "{}", err.message());
    }

    #[test]
    fn config_none_and_missing_config() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "cpus = 2\n");
        let flags = Flags { config: Some("none".into()), ..Default::default() };
        assert_eq!(resolve(&flags, &no_env, dir.path()).unwrap().cpus.value, 1);
        let flags = Flags { config: Some("nope.toml".into()), ..Default::default() };
        let err = resolve(&flags, &no_env, dir.path()).unwrap_err();
        assert!(err.message().contains("nope.toml (from --config) does not exist"), "{}", err.message());
    }

    #[test]
    fn kernel_flag_overrides_an_image_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "image = \"noble\"\n");
        let flags = Flags { kernel: vec!["/k".into()], ..Default::default() };
        let e = resolve(&flags, &no_env, dir.path()).unwrap();
        assert_eq!(e.kernel.value, [PathBuf::from("/k")]);
        assert_eq!(e.image.value, None);
        write(dir.path(), "image = \"noble\"\nkernel = \"/k\"\n");
        let err = resolve(&Flags::default(), &no_env, dir.path()).unwrap_err();
        assert!(err.message().contains("both a kernel"), "{}", err.message());
    }

    #[test]
    fn a_kernel_list_in_a_target_is_a_matrix_relative_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "[target.matrix]\nkernel = [\"k/a\", \"/abs/b\"]\n");
        let flags = Flags { target: Some("matrix".into()), ..Default::default() };
        let e = resolve(&flags, &no_env, dir.path()).unwrap();
        assert_eq!(e.kernel.value, [dir.path().join("k/a"), PathBuf::from("/abs/b")]);
        let flags = Flags { kernel: vec!["x".into(), "y".into()], ..flags };
        let e = resolve(&flags, &no_env, dir.path()).unwrap();
        assert_eq!(e.kernel.value, [dir.path().join("x"), dir.path().join("y")]);
        assert_eq!(e.kernel.source, Source::Flag("--kernel"));
    }

    #[test]
    fn modules_are_paths_like_the_kernel_and_go_with_a_kernel_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "kernel = \"linux/arch/x86/boot/bzImage\"\nmodules = \"linux/.mods\"\n");
        let sub = dir.path().join("sub");
        std::fs::create_dir_all(&sub).unwrap();
        let e = resolve(&Flags::default(), &no_env, &sub).unwrap();
        assert_eq!(
            e.modules,
            Val { value: Some(dir.path().join("linux/.mods")), source: Source::File(path) }
        );
        assert_eq!(
            e.vm_spec().unwrap().boot,
            BootSpec::Kernel {
                kernel: Some(dir.path().join("linux/arch/x86/boot/bzImage")),
                modules: Some(dir.path().join("linux/.mods")),
            }
        );
        let env = |n: &str| (n == "VMTEST_MODULES").then(|| "/env/mods".to_owned());
        let e = resolve(&Flags::default(), &env, &sub).unwrap();
        assert_eq!(e.modules, Val { value: Some("/env/mods".into()), source: Source::Env("VMTEST_MODULES") });
        let flags = Flags { modules: Some("m".into()), ..Default::default() };
        let e = resolve(&flags, &env, &sub).unwrap();
        assert_eq!(e.modules, Val { value: Some(sub.join("m")), source: Source::Flag("--modules") });
        // An image brings its own modules: an image flag drops the file's, and both flags clash.
        let flags = Flags { image: Some("noble".into()), ..Default::default() };
        assert_eq!(resolve(&flags, &no_env, &sub).unwrap().modules.value, None);
        let flags = Flags { image: Some("noble".into()), modules: Some("m".into()), ..Default::default() };
        let err = resolve(&flags, &no_env, &sub).unwrap_err();
        assert!(
            err.message().contains("kernel modules (from --modules) go with a kernel"),
            "{}",
            err.message()
        );
    }
}
