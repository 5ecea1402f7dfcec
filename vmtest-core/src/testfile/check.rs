//! The checker: a parsed test file to its schema, or every problem with its line.

use super::schema::{
    Action, BackendTraits, Mark, NetDef, NodeDef, Step, Target, TestFile, ACTIONS, NODE_KEYS, STEP_KEYS,
};
use super::spans::{Entries, Entry, Located, Val};
use crate::error::{Error, Result};
use crate::spec::{parse_duration, parse_memory_mib};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

impl TestFile {
    /// The file's `backend`, if it names none of `known` (the names the caller's backends
    /// answer to), as `FILE:LINE: unknown backend ...`.
    pub fn check_backend_names(&self, known: &[&str]) -> Result<()> {
        match &self.backend {
            Some(b) if !known.contains(&b.as_str()) => Err(report(
                &self.path,
                vec![(
                    self.backend_line,
                    format!("unknown backend `{b}`; expected one of {}", known.join(", ")),
                )],
            )),
            _ => Ok(()),
        }
    }

    /// Everything in the file that `backend` cannot do, each with its line, before anything
    /// boots. Nodes that merely keep the default network run without one where the backend
    /// has no private networks.
    pub fn check_backend(&self, backend: BackendTraits<'_>) -> Result<()> {
        let b = backend.name;
        let mut problems: Vec<(usize, String)> = Vec::new();
        if let (Some(Mark { name, line }), false) = (self.checkpoint_mark(), backend.checkpoints) {
            problems.push((
                *line,
                format!(
                    "checkpoint `{name}`: the {b} backend cannot save guests; use the qemu backend, or remove \
                     `checkpoint` and `from`"
                ),
            ));
        }
        for n in &self.nodes {
            if n.kernel.is_some() && !backend.boots_kernels {
                problems.push((
                    n.line,
                    format!("node `{}`: the {b} backend boots images, not a `kernel`", n.name),
                ));
            }
            if n.modules.is_some() && !backend.boots_kernels {
                problems.push((
                    n.line,
                    format!(
                        "node `{}`: the {b} backend boots images, which bring their own `modules`",
                        n.name
                    ),
                ));
            }
            if n.networks_explicit && !n.networks.is_empty() && !backend.private_networks {
                problems.push((
                    n.line,
                    format!(
                        "node `{}` joins network {}, but the {b} backend has no private networks; use the qemu \
                         backend or `networks = []`",
                        n.name, n.networks[0]
                    ),
                ));
            }
        }
        if !backend.private_networks {
            for (id, def) in &self.networks {
                problems
                    .push((def.line, format!("[networks.{id}]: the {b} backend has no private networks")));
            }
            for st in &self.steps {
                if st.action.needs_private_network() {
                    problems.push((
                        st.line,
                        format!("{}: the {b} backend has no private networks to fault", st.action.describe()),
                    ));
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(report(&self.path, problems))
        }
    }
}

/// Collects problems with their lines.
#[derive(Default)]
struct Check {
    problems: Vec<(usize, String)>,
}

impl Check {
    fn at<T>(&mut self, s: &Located<T>, msg: impl Into<String>) {
        self.problems.push((s.line(), msg.into()));
    }

    fn string(&mut self, v: &Located<Val>, key: &str) -> Option<String> {
        match v.get_ref() {
            Val::Str(s) => Some(s.clone()),
            other => {
                self.at(v, format!("`{key}` must be a string, not {}", other.kind()));
                None
            }
        }
    }

    fn duration(&mut self, v: &Located<Val>, key: &str) -> Option<Duration> {
        match v.get_ref() {
            Val::Str(s) => match parse_duration(s) {
                Ok(d) => Some(d),
                Err(e) => {
                    self.at(v, format!("`{key}`: {}", e.message()));
                    None
                }
            },
            Val::Int(n) if *n >= 0 => Some(Duration::from_secs(*n as u64)),
            other => {
                self.at(v, format!("`{key}` must be a duration such as \"30s\", not {}", other.kind()));
                None
            }
        }
    }

    fn int(&mut self, v: &Located<Val>, key: &str, min: i64, max: i64) -> Option<i64> {
        match v.get_ref() {
            Val::Int(n) if (min..=max).contains(n) => Some(*n),
            Val::Int(n) => {
                self.at(v, format!("`{key}` = {n} is out of range {min}..={max}"));
                None
            }
            other => {
                self.at(v, format!("`{key}` must be an integer, not {}", other.kind()));
                None
            }
        }
    }

    fn table<'v>(&mut self, v: &'v Located<Val>, key: &str) -> Option<&'v [Entry]> {
        match v.get_ref() {
            Val::Table(t) => Some(t),
            other => {
                self.at(v, format!("`{key}` must be a table, not {}", other.kind()));
                None
            }
        }
    }

    fn array<'v>(&mut self, v: &'v Located<Val>, key: &str) -> Option<&'v [Located<Val>]> {
        match v.get_ref() {
            Val::Array(a) => Some(a),
            other => {
                self.at(v, format!("`{key}` must be an array, not {}", other.kind()));
                None
            }
        }
    }

    fn names(&mut self, v: &Located<Val>, key: &str) -> Option<Vec<Located<String>>> {
        let items = self.array(v, key)?;
        let mut out = Vec::new();
        for it in items {
            match it.get_ref() {
                Val::Str(s) => out.push(Located::new(it.line(), s.clone())),
                other => self.at(it, format!("`{key}` must list node names (strings), not {}", other.kind())),
            }
        }
        Some(out)
    }
}

#[derive(Clone, Debug, Default)]
struct NodeRaw {
    cpus: Option<u32>,
    memory_mib: Option<u64>,
    kernel: Option<PathBuf>,
    modules: Option<PathBuf>,
    image: Option<String>,
    exec: Option<crate::spec::ExecVia>,
    networks: Option<Vec<u8>>,
    files: Option<Vec<(PathBuf, PathBuf)>>,
    boot_timeout: Option<Duration>,
}

fn valid_node_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 24
        && n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !n.starts_with('-')
}

impl Check {
    /// A path relative to the test file, which must be `what` (`Path::is_file`, ...):
    /// `not` says otherwise.
    fn path(
        &mut self,
        v: &Located<Val>,
        key: &str,
        base: &Path,
        what: fn(&Path) -> bool,
        not: &str,
    ) -> Option<PathBuf> {
        let s = self.string(v, key)?;
        let p = base.join(&s);
        if !what(&p) {
            self.at(v, format!("{key} `{s}` {not} ({})", p.display()));
        }
        Some(p)
    }

    fn node(&mut self, table: &[Entry], base: &Path, what: &str) -> NodeRaw {
        let mut n = NodeRaw::default();
        for (k, v) in table {
            match k.get_ref().as_str() {
                "cpus" => n.cpus = self.int(v, "cpus", 1, 64).map(|c| c as u32),
                "memory" => {
                    n.memory_mib = match v.get_ref() {
                        Val::Str(s) => match parse_memory_mib(s) {
                            Ok(m) => Some(m),
                            Err(e) => {
                                self.at(v, format!("`memory`: {}", e.message()));
                                None
                            }
                        },
                        Val::Int(m) if *m >= 64 => Some(*m as u64),
                        _ => {
                            self.at(v, "`memory` must be a size such as \"512M\" or \"2G\"");
                            None
                        }
                    }
                }
                "kernel" => n.kernel = self.path(v, "kernel", base, Path::is_file, "does not exist"),
                "modules" => n.modules = self.path(v, "modules", base, Path::is_dir, "is not a directory"),
                "image" => {
                    if let Some(s) = self.string(v, "image") {
                        if s.is_empty() || s.contains('/') {
                            self.at(
                                v,
                                format!(
                                    "{what}: `image` must name a built image (see `vmtest image list`), not `{s}`"
                                ),
                            );
                        } else {
                            n.image = Some(s);
                        }
                    }
                }
                "exec" => {
                    if let Some(s) = self.string(v, "exec") {
                        match s.parse() {
                            Ok(e) => n.exec = Some(e),
                            Err(e) => self.at(v, format!("{what}: {}", crate::Error::message(&e))),
                        }
                    }
                }
                "backend" => self.at(
                    k,
                    format!("{what}: `backend` is set for the whole test, in [test] (one backend runs every node)"),
                ),
                "networks" => {
                    if let Some(items) = self.array(v, "networks") {
                        let mut nets = Vec::new();
                        for it in items {
                            if let Some(x) = self.int(it, "networks", 1, 254) {
                                if nets.contains(&(x as u8)) {
                                    self.at(it, format!("network {x} is listed twice"));
                                }
                                nets.push(x as u8);
                            }
                        }
                        n.networks = Some(nets);
                    }
                }
                "files" => {
                    if let Some(items) = self.array(v, "files") {
                        let mut files = Vec::new();
                        for it in items {
                            if let Some((src, dst)) = self.copy_pair(it, "files", base, true) {
                                files.push((src, dst));
                            }
                        }
                        n.files = Some(files);
                    }
                }
                "boot_timeout" => n.boot_timeout = self.duration(v, "boot_timeout"),
                other => self.at(
                    k,
                    format!("unknown key `{other}` in {what}; expected one of {}", NODE_KEYS.join(", ")),
                ),
            }
        }
        n
    }

    /// `{ src = "...", dst = "..." }`; `src` is a host path (checked when `host_src`).
    fn copy_pair(
        &mut self,
        v: &Located<Val>,
        key: &str,
        base: &Path,
        host_src: bool,
    ) -> Option<(PathBuf, PathBuf)> {
        let t = self.table(v, key)?;
        let (mut src, mut dst) = (None, None);
        for (k, val) in t {
            match k.get_ref().as_str() {
                "src" => src = self.string(val, "src").map(|s| (s, val.clone())),
                "dst" => dst = self.string(val, "dst"),
                other => self.at(k, format!("unknown key `{other}` in `{key}`; expected src and dst")),
            }
        }
        let (Some((src, src_v)), Some(dst)) = (src, dst) else {
            self.at(v, format!("`{key}` needs both `src` and `dst`"));
            return None;
        };
        if host_src {
            let p = base.join(&src);
            if !p.exists() {
                self.at(&src_v, format!("file `{src}` does not exist ({})", p.display()));
            }
            if !dst.starts_with('/') {
                self.at(v, format!("guest path `{dst}` must be absolute"));
            }
            Some((p, PathBuf::from(dst)))
        } else {
            if !src.starts_with('/') {
                self.at(&src_v, format!("guest path `{src}` must be absolute"));
            }
            Some((PathBuf::from(src), base.join(dst)))
        }
    }
}

/// Check `top`, the entries of the test file at `path`.
pub(super) fn file(path: &Path, top: &Entries) -> Result<TestFile> {
    let mut c = Check::default();
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let base = if base.as_os_str().is_empty() { PathBuf::from(".") } else { base };

    let mut name =
        path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "test".into());
    let mut timeout = Duration::from_secs(600);
    let mut step_timeout = Duration::from_secs(120);
    let mut backend = None;
    let mut backend_line = 0;
    let mut defaults = NodeRaw::default();
    let mut nodes_raw: Vec<(Located<String>, NodeRaw)> = Vec::new();
    let mut networks = BTreeMap::new();
    let mut steps_raw: Vec<&Located<Val>> = Vec::new();
    let mut nodes_seen = false;

    for (k, v) in top {
        match k.get_ref().as_str() {
            "test" => {
                let Some(t) = c.table(v, "test") else { continue };
                for (k2, v2) in t {
                    match k2.get_ref().as_str() {
                        "name" => {
                            if let Some(n) = c.string(v2, "name") {
                                name = n;
                            }
                        }
                        "timeout" => timeout = c.duration(v2, "timeout").unwrap_or(timeout),
                        "step_timeout" => step_timeout = c.duration(v2, "step_timeout").unwrap_or(step_timeout),
                        "backend" => {
                            // Which names exist is the caller's registry: check_backend_names.
                            backend = c.string(v2, "backend");
                            backend_line = v2.line();
                        }
                        other => c.at(
                            k2,
                            format!("unknown key `{other}` in [test]; expected name, timeout, step_timeout, backend"),
                        ),
                    }
                }
            }
            "defaults" => {
                if let Some(t) = c.table(v, "defaults") {
                    defaults = c.node(t, &base, "[defaults]");
                }
            }
            "nodes" => {
                nodes_seen = true;
                let Some(t) = c.table(v, "nodes") else { continue };
                for (nk, nv) in t {
                    if !valid_node_name(nk.get_ref()) {
                        c.at(
                            nk,
                            format!(
                                "bad node name `{}`: use at most 24 lowercase letters, digits and dashes",
                                nk.get_ref()
                            ),
                        );
                    }
                    if let Some(prev) = nodes_raw.iter().find(|(n, _)| n.get_ref() == nk.get_ref()) {
                        let l = prev.0.line();
                        c.at(nk, format!("duplicate node `{}` (first defined on line {l})", nk.get_ref()));
                    }
                    let what = format!("node `{}`", nk.get_ref());
                    let Some(t2) = c.table(nv, &what) else { continue };
                    let raw = c.node(t2, &base, &what);
                    nodes_raw.push((nk.clone(), raw));
                }
            }
            "networks" => {
                let Some(t) = c.table(v, "networks") else { continue };
                for (nk, nv) in t {
                    let Some(id) = nk.get_ref().parse::<u8>().ok().filter(|n| (1..=254).contains(n)) else {
                        c.at(nk, format!("network `{}` must be a number from 1 to 254", nk.get_ref()));
                        continue;
                    };
                    let mut def = NetDef { line: nk.line(), ..NetDef::default() };
                    let Some(t2) = c.table(nv, "network") else { continue };
                    for (k2, v2) in t2 {
                        match k2.get_ref().as_str() {
                            "loss" => def.loss_percent = c.percent(v2).unwrap_or(0.0),
                            "delay" => def.delay = c.duration(v2, "delay").unwrap_or_default(),
                            other => c.at(
                                k2,
                                format!("unknown key `{other}` in network {id}; expected loss, delay"),
                            ),
                        }
                    }
                    networks.insert(id, def);
                }
            }
            "step" => {
                if let Some(items) = c.array(v, "step") {
                    steps_raw.extend(items.iter());
                }
            }
            other => {
                c.at(k, format!("unknown section `{other}`; expected test, defaults, nodes, networks, step"))
            }
        }
    }
    if !nodes_seen || nodes_raw.is_empty() {
        c.problems.push((1, "no nodes: add at least one [nodes.NAME] table".into()));
    }

    let nodes: Vec<NodeDef> = nodes_raw
        .iter()
        .map(|(n, raw)| NodeDef {
            name: n.get_ref().clone(),
            line: n.line(),
            cpus: raw.cpus.or(defaults.cpus).unwrap_or(1),
            memory_mib: raw.memory_mib.or(defaults.memory_mib).unwrap_or(512),
            kernel: raw.kernel.clone().or_else(|| defaults.kernel.clone()),
            modules: raw.modules.clone().or_else(|| defaults.modules.clone()),
            image: raw.image.clone().or_else(|| defaults.image.clone()),
            exec: raw.exec.or(defaults.exec).unwrap_or_default(),
            networks: raw.networks.clone().or_else(|| defaults.networks.clone()).unwrap_or_else(|| vec![1]),
            networks_explicit: raw.networks.is_some() || defaults.networks.is_some(),
            files: {
                let mut f = defaults.files.clone().unwrap_or_default();
                f.extend(raw.files.clone().unwrap_or_default());
                f
            },
            boot_timeout: raw.boot_timeout.or(defaults.boot_timeout).unwrap_or(Duration::from_secs(120)),
        })
        .collect();
    let node_names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();

    let mut steps = Vec::new();
    let mut subtests_seen: Vec<(String, usize)> = Vec::new();
    let mut last_subtest: Option<String> = None;
    for sv in steps_raw {
        if let Some(step) = c.step(sv, &base, &node_names) {
            if let Some(st) = &step.subtest {
                if last_subtest.as_ref() != Some(st) {
                    if let Some((_, l)) = subtests_seen.iter().find(|(n, _)| n == st) {
                        c.problems.push((
                            step.line,
                            format!("duplicate subtest `{st}` (already used on line {l}); its steps must be consecutive"),
                        ));
                    } else {
                        subtests_seen.push((st.clone(), step.line));
                    }
                }
            }
            last_subtest = step.subtest.clone();
            steps.push(step);
        }
    }
    c.problems.extend(super::checkpoints::check(&steps, &nodes));
    if steps.is_empty() && c.problems.is_empty() {
        c.problems.push((1, "no steps: add at least one [[step]]".into()));
    }
    if !c.problems.is_empty() {
        return Err(report(path, c.problems));
    }
    Ok(TestFile {
        path: path.to_owned(),
        name,
        timeout,
        step_timeout,
        backend,
        backend_line,
        nodes,
        networks,
        steps,
    })
}

pub(super) fn report(path: &Path, mut problems: Vec<(usize, String)>) -> Error {
    problems.sort_by_key(|(l, _)| *l);
    let lines: Vec<String> = problems.iter().map(|(l, m)| format!("{}:{l}: {m}", path.display())).collect();
    let n = lines.len();
    let head = if n == 1 {
        lines[0].clone()
    } else {
        format!("{}: {n} problems; nothing was booted", path.display())
    };
    let e = Error::usage(head);
    if n == 1 {
        e
    } else {
        e.with_detail(lines.join("\n"))
    }
}

impl Check {
    fn percent(&mut self, v: &Located<Val>) -> Option<f64> {
        let p = match v.get_ref() {
            Val::Int(n) => *n as f64,
            Val::Float(f) => *f,
            other => {
                self.at(v, format!("`loss` must be a percentage (0 to 100), not {}", other.kind()));
                return None;
            }
        };
        if !(0.0..=100.0).contains(&p) {
            self.at(v, format!("`loss` = {p} is not a percentage between 0 and 100"));
            return None;
        }
        Some(p)
    }

    fn known_node(&mut self, n: &Located<String>, nodes: &[String]) -> bool {
        if nodes.iter().any(|k| k == n.get_ref()) {
            return true;
        }
        self.at(n, format!("unknown node `{}` (nodes: {})", n.get_ref(), nodes.join(", ")));
        false
    }

    fn step(&mut self, sv: &Located<Val>, base: &Path, nodes: &[String]) -> Option<Step> {
        let line = sv.line();
        let t = self.table(sv, "step")?;
        let mut on: Option<(Located<()>, Target)> = None;
        let mut on_given = false;
        let mut unknown_key = false;
        let mut subtest = None;
        let mut timeout = None;
        let mut expect: Option<(Located<()>, regex::Regex)> = None;
        let mut link: Option<(String, String)> = None;
        let mut checkpoint = None;
        let mut from = None;
        let mut actions: Vec<(Located<String>, Option<Action>)> = Vec::new();
        for (k, v) in t {
            let key = k.get_ref().as_str();
            let here = Located::new(v.line(), ());
            match key {
                "on" => {
                    on_given = true;
                    let target = match v.get_ref() {
                        Val::Str(s) if s == "*" => Some(Target::Nodes(nodes.to_vec())),
                        Val::Str(s) => {
                            let n = Located::new(v.line(), s.clone());
                            self.known_node(&n, nodes).then(|| Target::Nodes(vec![s.clone()]))
                        }
                        Val::Array(_) => {
                            let names = self.names(v, "on")?;
                            if names.is_empty() {
                                self.at(v, "`on` lists no node");
                            }
                            let ok = names.iter().all(|n| self.known_node(n, nodes));
                            ok.then(|| Target::Nodes(names.iter().map(|n| n.get_ref().clone()).collect()))
                        }
                        other => {
                            self.at(
                                v,
                                format!(
                                    "`on` must be a node name, a list of names or \"*\", not {}",
                                    other.kind()
                                ),
                            );
                            None
                        }
                    };
                    if let Some(t) = target {
                        on = Some((here, t));
                    }
                }
                "subtest" => subtest = self.string(v, "subtest"),
                "checkpoint" => checkpoint = self.checkpoint_name(v, "checkpoint"),
                "from" => from = self.checkpoint_name(v, "from"),
                "timeout" => timeout = self.duration(v, "timeout"),
                "expect_stdout" => {
                    if let Some(s) = self.string(v, "expect_stdout") {
                        match regex::Regex::new(&s) {
                            Ok(re) => expect = Some((here, re)),
                            Err(e) => self.at(v, format!("`expect_stdout` is not a valid regex: {e}")),
                        }
                    }
                }
                "link" => {
                    if let Some(names) = self.names(v, "link") {
                        if names.len() != 2 {
                            self.at(v, "`link` names exactly two nodes, e.g. [\"client\", \"server\"]");
                        } else if names.iter().all(|n| self.known_node(n, nodes)) {
                            link = Some((names[0].get_ref().clone(), names[1].get_ref().clone()));
                        }
                    }
                }
                _ if ACTIONS.contains(&key) => {
                    let a = self.action(key, v, base, nodes);
                    actions.push((k.clone(), a));
                }
                other => {
                    unknown_key = true;
                    let msg = match ACTIONS.iter().chain(STEP_KEYS).find(|a| similar(a, other)) {
                        Some(a) => format!("unknown action or key `{other}` in step; did you mean `{a}`?"),
                        None => format!(
                            "unknown action or key `{other}` in step; actions: {}; keys: {}",
                            ACTIONS.join(", "),
                            STEP_KEYS.join(", ")
                        ),
                    };
                    self.at(k, msg)
                }
            }
        }
        let line = line.max(actions.first().map(|(k, _)| k.line()).unwrap_or(line));
        match actions.len() {
            0 if unknown_key => return None,
            0 => {
                self.problems.push((line, format!("step has no action; give one of {}", ACTIONS.join(", "))));
                return None;
            }
            1 => {}
            _ => {
                let names: Vec<&str> = actions.iter().map(|(k, _)| k.get_ref().as_str()).collect();
                self.problems.push((
                    line,
                    format!("step has {} actions ({}); give one per step", names.len(), names.join(", ")),
                ));
                return None;
            }
        }
        let (key, action) = actions.pop().unwrap();
        let mut action = action?;
        match &mut action {
            Action::Loss { link: l, .. } | Action::Delay { link: l, .. } => *l = link.take(),
            _ => {
                if link.is_some() {
                    self.at(&key, "`link` only goes with `loss` or `delay`");
                }
            }
        }
        let target = match (action.on_nodes(), on) {
            (true, Some((_, t))) => t,
            (true, None) if on_given => return None,
            (true, None) => {
                self.at(
                    &key,
                    format!("`{}` runs on nodes: add `on = \"NODE\"` (or a list, or \"*\")", key.get_ref()),
                );
                return None;
            }
            (false, Some((sp, _))) => {
                self.at(&sp, format!("`{}` acts on the network, not on nodes: remove `on`", key.get_ref()));
                return None;
            }
            (false, None) => Target::None,
        };
        if let Some((sp, _)) = &expect {
            if !action.has_stdout() {
                self.at(sp, format!("`expect_stdout` does not apply to `{}`", key.get_ref()));
            }
        }
        Some(Step {
            line,
            on: target,
            subtest,
            timeout,
            expect_stdout: expect.map(|(_, r)| r),
            action,
            checkpoint,
            from,
        })
    }

    /// A checkpoint's name: a word, since messages and the store's manifest quote it.
    fn checkpoint_name(&mut self, v: &Located<Val>, key: &str) -> Option<Mark> {
        let s = self.string(v, key)?;
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !ok {
            self.at(
                v,
                format!(
                    "bad checkpoint name `{s}` in `{key}`: use at most 64 letters, digits, `-`, `_` and `.`"
                ),
            );
            return None;
        }
        Some(Mark { name: s, line: v.line() })
    }

    fn action(&mut self, key: &str, v: &Located<Val>, base: &Path, nodes: &[String]) -> Option<Action> {
        let flag = |c: &mut Self, a: Action| match v.get_ref() {
            Val::Bool(true) => Some(a),
            _ => {
                c.at(v, format!("write `{key} = true`"));
                None
            }
        };
        Some(match key {
            "succeed" => Action::Succeed(self.string(v, key)?),
            "fail" => Action::Fail(self.string(v, key)?),
            "execute" => Action::Execute(self.string(v, key)?),
            "wait_until_succeeds" => Action::WaitUntilSucceeds(self.string(v, key)?),
            "wait_until_fails" => Action::WaitUntilFails(self.string(v, key)?),
            "wait_for_file" => Action::WaitForFile(self.string(v, key)?),
            "wait_for_unix_socket" => Action::WaitForUnixSocket(self.string(v, key)?),
            "wait_for_open_port" => Action::WaitForOpenPort(self.int(v, key, 1, 65535)? as u16),
            "wait_for_closed_port" => Action::WaitForClosedPort(self.int(v, key, 1, 65535)? as u16),
            "wait_for_console" => {
                let r = self.string(v, key)?;
                if let Err(e) = regex::bytes::Regex::new(&r) {
                    self.at(v, format!("`wait_for_console` is not a valid regex: {e}"));
                    return None;
                }
                Action::WaitForConsole(r)
            }
            "wait_for_unit" => Action::WaitForUnit(self.string(v, key)?),
            "systemctl" => Action::Systemctl(self.string(v, key)?),
            "copy_to" => {
                let (src, dst) = self.copy_pair(v, key, base, true)?;
                Action::CopyTo { src, dst }
            }
            "copy_from" => {
                let (src, dst) = self.copy_pair(v, key, base, false)?;
                Action::CopyFrom { src, dst }
            }
            "block" => flag(self, Action::Block)?,
            "unblock" => flag(self, Action::Unblock)?,
            "start" => flag(self, Action::Start)?,
            "shutdown" => flag(self, Action::Shutdown)?,
            "crash" => flag(self, Action::Crash)?,
            "reboot" => flag(self, Action::Reboot)?,
            "heal" => flag(self, Action::Heal)?,
            "partition" => {
                let groups = self.array(v, key)?;
                let mut out = Vec::new();
                let mut seen: Vec<String> = Vec::new();
                for g in groups {
                    let names = self.names(g, "partition")?;
                    let mut group = Vec::new();
                    for n in names {
                        if !self.known_node(&n, nodes) {
                            continue;
                        }
                        if seen.contains(n.get_ref()) {
                            self.at(&n, format!("node `{}` is in two partition groups", n.get_ref()));
                        }
                        seen.push(n.get_ref().clone());
                        group.push(n.into_inner());
                    }
                    out.push(group);
                }
                if out.len() < 2 {
                    self.at(v, "`partition` needs at least two groups, e.g. [[\"client\"], [\"server\"]]");
                    return None;
                }
                Action::Partition(out)
            }
            "loss" => Action::Loss { percent: self.percent(v)?, link: None },
            "delay" => Action::Delay { delay: self.duration(v, key)?, link: None },
            "sleep" => Action::Sleep(self.duration(v, key)?),
            _ => unreachable!("only keys in ACTIONS get here"),
        })
    }
}

/// A typo of `want`: one edit apart, or a swap.
fn similar(want: &str, got: &str) -> bool {
    let (a, b) = (want.as_bytes(), got.as_bytes());
    if a.len().abs_diff(b.len()) > 1 {
        return false;
    }
    // Levenshtein distance <= 2, small strings.
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut cur = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
        }
        prev = cur;
    }
    prev[b.len()] <= 2
}
