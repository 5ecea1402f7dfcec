//! Running a checked test file: boot its nodes (in parallel, within the lock slots), run its
//! steps in order, report one JUnit case per subtest, tear everything down (or keep it).

use crate::error::{Error, ErrorKind, Result};
use crate::events::{Event, FileRef, StepRef, StepResult};
use crate::hypervisor::Hypervisor;
use crate::junit::{Case, CaseStatus, Suite};
use crate::lock::SlotPool;
use crate::machine::{join_all, output_detail, Cluster, Machine, NetworkKeeper, NodeConfig};
use crate::network::LinkFault;
use crate::runner::{CancelReason, KernelReports, Reporter};
use crate::spec::{AccelChoice, BootSpec, VmSpec};
use crate::state::StateDir;
use crate::testfile::{Action, BackendTraits, Step, Target, TestFile};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How to run test files.
pub struct RunConfig<'a> {
    /// Run only subtests whose name contains this; steps outside subtests always run.
    pub filter: Option<String>,
    /// On failure, leave the machines running.
    pub keep: bool,
    pub slots: Option<SlotPool>,
    /// Receives the file's events (and its machines').
    pub reporter: &'a dyn Reporter,
    pub accel: AccelChoice,
    /// What a guest kernel's bug report during a step does: fail the step, or be reported
    /// (as an event and in the step's JUnit case).
    pub kernel_reports: KernelReports,
    /// With `keep`: starts a process that serves a kept run's private network (given the
    /// run dir), so kept machines stay connected. See [`Cluster::keep`].
    pub keep_network: Option<&'a NetworkKeeper>,
}

/// How a test file ended.
#[derive(Debug)]
pub enum Verdict {
    Passed,
    /// A step failed; the message names the step, the node and the output.
    Failed(Error),
    /// The test could not run to the end: boot, preflight, global timeout, interrupted.
    Error(Error),
}

#[derive(Debug)]
pub struct FileOutcome {
    pub verdict: Verdict,
    pub suite: Suite,
    /// VM names left running (`keep`).
    pub kept: Vec<String>,
}

impl FileOutcome {
    /// Tell the reporter the file is over, and hand the outcome on.
    fn reported(self, cfg: &RunConfig<'_>, file: &FileRef<'_>) -> FileOutcome {
        cfg.reporter.event(&Event::FileFinished { file, outcome: &self });
        self
    }
}

/// The name of the JUnit case for steps outside any subtest.
pub const SETUP_CASE: &str = "(steps outside subtests)";

/// Run one test file. `cancel` resolves on SIGINT and the like.
pub async fn run_file<C>(
    hv: Arc<dyn Hypervisor>,
    state: &StateDir,
    file: &TestFile,
    cfg: &RunConfig<'_>,
    cancel: C,
) -> FileOutcome
where
    C: Future<Output = CancelReason>,
{
    tokio::pin!(cancel);
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + file.timeout;
    let file_ref = &FileRef { name: &file.name, path: &file.path };
    let report = |e: Event<'_>| cfg.reporter.event(&e);
    let mut cases = Cases::new(file, cfg.filter.as_deref());

    if let Err(e) = file.check_backend(backend_traits(hv.as_ref())) {
        return cases.abort(file, started, Verdict::Error(e), Vec::new()).reported(cfg, file_ref);
    }
    let private_networks = hv.private_networks();
    let nodes: Vec<NodeConfig> = file
        .nodes
        .iter()
        .map(|n| {
            let mut spec = VmSpec::new("", &n.name);
            spec.cpus = n.cpus;
            spec.memory_mib = n.memory_mib;
            spec.boot = match &n.image {
                Some(name) => BootSpec::Image { name: name.clone() },
                None => BootSpec::Kernel { kernel: n.kernel.clone(), modules: n.modules.clone() },
            };
            spec.exec = n.exec;
            spec.accel = cfg.accel;
            spec.boot_timeout = n.boot_timeout;
            // Without private networks, nodes that kept the default network get none
            // (check_backend refused explicit ones).
            let networks = if private_networks { n.networks.clone() } else { Vec::new() };
            let watch_kernel_log = cfg.kernel_reports != KernelReports::Ignore;
            NodeConfig { spec, networks, files: n.files.clone(), watch_kernel_log }
        })
        .collect();
    let names: Vec<&str> = file.nodes.iter().map(|n| n.name.as_str()).collect();
    report(Event::FileStarted { file: file_ref, backend: hv.name(), nodes: &names });
    if !private_networks && names.len() > 1 {
        let message = format!(
            "the {} backend has no private networks: the nodes are not connected to each other by vmtest",
            hv.name()
        );
        report(Event::FileNotice { file: file_ref, message: &message });
    }

    let created = tokio::select! {
        r = Cluster::create(hv, state, nodes, cfg.slots.as_ref(), cfg.reporter) => r,
        reason = &mut cancel => Err(Error::interrupted(reason)),
        _ = tokio::time::sleep_until(deadline) => Err(global_timeout(file)),
    };
    let cluster = match created {
        Ok(c) => c,
        Err(e) => return cases.abort(file, started, Verdict::Error(e), Vec::new()).reported(cfg, file_ref),
    };
    if let Err(e) = apply_network_defaults(&cluster, file) {
        cluster.kill().await;
        return cases.abort(file, started, Verdict::Error(e), Vec::new()).reported(cfg, file_ref);
    }
    let t0 = Instant::now();
    let booted = tokio::select! {
        r = cluster.boot_all(true) => r,
        reason = &mut cancel => Err(Error::interrupted(reason)),
        _ = tokio::time::sleep_until(deadline) => Err(global_timeout(file)),
    };
    if let Err(e) = booted {
        cluster.kill().await;
        return cases.abort(file, started, Verdict::Error(e), Vec::new()).reported(cfg, file_ref);
    }
    report(Event::NodesUp { file: file_ref, duration: t0.elapsed() });

    let mut failure: Option<Verdict> = None;
    for step in &file.steps {
        if !cases.wants(step) {
            continue;
        }
        let t = Instant::now();
        let result = tokio::select! {
            r = run_step(&cluster, file, step) => r.map_err(Verdict::Failed),
            reason = &mut cancel => Err(Verdict::Error(Error::interrupted(reason))),
            _ = tokio::time::sleep_until(deadline) => Err(Verdict::Error(global_timeout(file))),
        };
        let result = kernel_reports(&cluster, cfg, result).await;
        let where_ = describe_step(file, step);
        let step_ref = StepRef { line: step.line, description: &where_, case: Cases::name_of(step) };
        match result {
            Ok(out) => {
                let result = StepResult::Passed { output: &out };
                report(Event::StepFinished {
                    file: file_ref,
                    step: &step_ref,
                    duration: t.elapsed(),
                    result,
                });
                cases.passed_step(step, t.elapsed(), &where_, &out);
            }
            Err(v) => {
                let e = match &v {
                    Verdict::Failed(e) | Verdict::Error(e) => e,
                    Verdict::Passed => unreachable!(),
                };
                let msg = format!("{where_}: {}", e.headline());
                let result = StepResult::Failed { error: e };
                report(Event::StepFinished {
                    file: file_ref,
                    step: &step_ref,
                    duration: t.elapsed(),
                    result,
                });
                cases.failed_step(step, t.elapsed(), &msg, e.detail().unwrap_or(""));
                let detail = e.detail().map(str::to_owned).unwrap_or_default();
                let e2 = Error::new(e.kind(), msg).with_detail(detail);
                failure = Some(match v {
                    Verdict::Failed(_) => Verdict::Failed(e2),
                    _ => Verdict::Error(e2),
                });
                break;
            }
        }
    }

    let interrupted = matches!(&failure, Some(Verdict::Error(e)) if e.kind() == ErrorKind::Interrupted);
    let mut kept = Vec::new();
    if failure.is_some() && cfg.keep && !interrupted {
        kept = cluster.keep(cfg.keep_network).await;
    } else if interrupted {
        cluster.kill().await;
    } else if let Err(e) = cluster.shutdown().await {
        tracing::warn!("teardown: {e}");
    }
    for name in &kept {
        report(Event::Kept { name });
    }
    let verdict = failure.unwrap_or(Verdict::Passed);
    cases.finish(file, started, verdict, kept).reported(cfg, file_ref)
}

/// The guest kernels' bug reports printed during `step`: each an event and a line in the
/// step's JUnit case; with [`KernelReports::Fail`], a step that passed fails on them.
async fn kernel_reports(
    cluster: &Cluster,
    cfg: &RunConfig<'_>,
    result: std::result::Result<String, Verdict>,
) -> std::result::Result<String, Verdict> {
    if cfg.kernel_reports == KernelReports::Ignore {
        return result;
    }
    let mut found = Vec::new();
    for m in cluster.machines() {
        for r in m.take_kernel_reports().await {
            cfg.reporter.event(&Event::KernelReport { name: m.vm_name(), report: &r });
            found.push((m.name().to_owned(), r));
        }
    }
    if found.is_empty() {
        return result;
    }
    let log: String =
        found.iter().map(|(node, r)| format!("kernel report on {node}: {}\n{}\n", r.title, r.text)).collect();
    match result {
        Ok(_) if cfg.kernel_reports == KernelReports::Fail => {
            let reports: Vec<_> = found.into_iter().map(|(_, r)| r).collect();
            Err(Verdict::Failed(crate::kernel_log::failure(&reports, "the step")))
        }
        Ok(out) => Ok(format!("{out}{}{log}", if out.is_empty() || out.ends_with('\n') { "" } else { "\n" })),
        Err(Verdict::Failed(e)) => Err(Verdict::Failed(with_log(e, &log))),
        Err(Verdict::Error(e)) => Err(Verdict::Error(with_log(e, &log))),
        Err(Verdict::Passed) => Err(Verdict::Passed),
    }
}

/// `e` with `log` added to its detail.
fn with_log(e: Error, log: &str) -> Error {
    let detail = format!("{}\n{log}", e.detail().unwrap_or_default());
    e.with_detail(detail)
}

/// What `hv` can do, as [`TestFile::check_backend`] asks it.
pub fn backend_traits(hv: &dyn Hypervisor) -> BackendTraits<'_> {
    BackendTraits {
        name: hv.name(),
        private_networks: hv.private_networks(),
        boots_kernels: hv.boots_kernels(),
        checkpoints: hv.checkpoint_store().is_some(),
    }
}

fn global_timeout(file: &TestFile) -> Error {
    Error::timeout(
        &format!("test `{}`", file.name),
        file.timeout,
        "raise `timeout` in [test], or find the step that hangs",
    )
}

/// `web.toml:23: succeed `curl ...` on client`.
pub fn describe_step(file: &TestFile, step: &Step) -> String {
    let on = match &step.on {
        Target::None => String::new(),
        Target::Nodes(n) => format!(" on {}", n.join(", ")),
    };
    format!("{}:{}: {}{on}", file.path.display(), step.line, step.action.describe())
}

fn apply_network_defaults(cluster: &Cluster, file: &TestFile) -> Result<()> {
    for (net, def) in &file.networks {
        if def.loss_percent == 0.0 && def.delay.is_zero() {
            continue;
        }
        let on: Vec<&str> =
            file.nodes.iter().filter(|n| n.networks.contains(net)).map(|n| n.name.as_str()).collect();
        let sw = cluster.network()?;
        for (i, a) in on.iter().enumerate() {
            for b in &on[i + 1..] {
                sw.set_link(a, b, LinkFault { loss: def.loss_percent / 100.0, delay: def.delay })?;
            }
        }
    }
    Ok(())
}

/// Run one step; the value is what it printed (for the log).
async fn run_step(cluster: &Cluster, file: &TestFile, step: &Step) -> Result<String> {
    let t = step.timeout.unwrap_or(file.step_timeout);
    match (&step.on, &step.action) {
        (Target::None, action) => network_action(cluster, file, action).await.map(|_| String::new()),
        (Target::Nodes(nodes), _) => {
            let machines = nodes.iter().map(|n| cluster.machine(n)).collect::<Result<Vec<_>>>()?;
            let results = join_all(machines.iter().map(|m| node_action(m, step, t)).collect()).await;
            let mut outs = Vec::new();
            let mut errors = Vec::new();
            for (m, r) in machines.iter().zip(results) {
                match r {
                    Ok(o) => outs.push(if machines.len() > 1 { format!("{}: {o}", m.name()) } else { o }),
                    Err(e) => errors.push(e),
                }
            }
            match errors.len() {
                0 => Ok(outs.join("\n")),
                1 => Err(errors.pop().unwrap()),
                n => {
                    let kind = errors[0].kind();
                    let msg = format!("{n} machines failed; first: {}", errors[0].headline());
                    let detail = errors
                        .iter()
                        .map(|e| format!("{}\n{}", e.headline(), e.detail().unwrap_or("")))
                        .collect::<Vec<_>>()
                        .join("\n");
                    Err(Error::new(kind, msg).with_detail(detail))
                }
            }
        }
    }
}

async fn network_action(cluster: &Cluster, file: &TestFile, action: &Action) -> Result<()> {
    let pairs = |link: &Option<(String, String)>| -> Vec<(String, String)> {
        match link {
            Some(p) => vec![p.clone()],
            None => {
                let n: Vec<&String> = file.nodes.iter().map(|n| &n.name).collect();
                let mut v = Vec::new();
                for (i, a) in n.iter().enumerate() {
                    for b in &n[i + 1..] {
                        v.push(((*a).clone(), (*b).clone()));
                    }
                }
                v
            }
        }
    };
    match action {
        Action::Sleep(d) => {
            tokio::time::sleep(*d).await;
            Ok(())
        }
        Action::Partition(groups) => cluster.network()?.partition(groups),
        Action::Heal => {
            cluster.network()?.heal();
            Ok(())
        }
        Action::Loss { percent, link } => {
            let sw = cluster.network()?;
            for (a, b) in pairs(link) {
                let f = sw.link(&a, &b);
                sw.set_link(&a, &b, LinkFault { loss: percent / 100.0, ..f })?;
            }
            Ok(())
        }
        Action::Delay { delay, link } => {
            let sw = cluster.network()?;
            for (a, b) in pairs(link) {
                let f = sw.link(&a, &b);
                sw.set_link(&a, &b, LinkFault { delay: *delay, ..f })?;
            }
            Ok(())
        }
        other => Err(Error::usage(format!("`{}` needs `on`", other.describe()))),
    }
}

fn check_expect(m: &Machine, step: &Step, cmd: &str, out: &crate::exec::ExecOutput) -> Result<()> {
    if let Some(re) = &step.expect_stdout {
        if !re.is_match(&out.stdout_lossy()) {
            return Err(m.command_failed(cmd, &format!("printed stdout that does not match `{re}`"), out));
        }
    }
    Ok(())
}

async fn node_action(m: &Machine, step: &Step, t: Duration) -> Result<String> {
    match &step.action {
        Action::Succeed(c) => {
            let out = m.execute_within(c, t).await?;
            if !out.status.success() {
                return Err(m.command_failed(c, "failed", &out));
            }
            check_expect(m, step, c, &out)?;
            Ok(out.stdout_lossy())
        }
        Action::Fail(c) => {
            let out = m.execute_within(c, t).await?;
            if out.status.success() {
                return Err(m.command_failed(c, "succeeded but was expected to fail", &out));
            }
            check_expect(m, step, c, &out)?;
            Ok(out.stdout_lossy())
        }
        Action::Execute(c) => {
            let out = m.execute_within(c, t).await?;
            check_expect(m, step, c, &out)?;
            Ok(format!("{}\n{}", out.status, out.stdout_lossy()))
        }
        Action::WaitUntilSucceeds(c) => {
            m.wait_until_succeeds_matching(c, step.expect_stdout.as_ref(), t).await
        }
        Action::WaitUntilFails(c) => {
            let out = m.wait_until_fails(c, t).await?;
            check_expect(m, step, c, &out)?;
            Ok(output_detail(&out))
        }
        Action::WaitForFile(p) => m.wait_for_file(p, t).await.map(|_| String::new()),
        Action::WaitForUnixSocket(p) => m.wait_for_unix_socket(p, t).await.map(|_| String::new()),
        Action::WaitForOpenPort(p) => m.wait_for_open_port(*p, t).await.map(|_| String::new()),
        Action::WaitForClosedPort(p) => m.wait_for_closed_port(*p, t).await.map(|_| String::new()),
        Action::WaitForConsole(r) => {
            let got = m.wait_for_console(r, t).await?;
            if let Some(re) = &step.expect_stdout {
                if !re.is_match(&got) {
                    return Err(Error::infra(format!(
                        "machine `{}`: console text `{got}` does not match `{re}`",
                        m.name()
                    )));
                }
            }
            Ok(got)
        }
        Action::WaitForUnit(u) => m.wait_for_unit(u, t).await.map(|_| String::new()),
        Action::Systemctl(a) => {
            let out = m.systemctl(a).await?;
            check_expect(m, step, &format!("systemctl {a}"), &out)?;
            Ok(out.stdout_lossy())
        }
        Action::CopyTo { src, dst } => {
            if let Some(dir) = dst.parent() {
                m.succeed(&format!("mkdir -p {}", crate::machine::quote(&dir.to_string_lossy()))).await?;
            }
            m.copy_to(src, dst).await.map(|_| String::new())
        }
        Action::CopyFrom { src, dst } => m.copy_from(src, dst).await.map(|p| p.display().to_string()),
        Action::Block => m.block().map(|_| String::new()),
        Action::Unblock => m.unblock().map(|_| String::new()),
        Action::Start => m.start().await.map(|_| String::new()),
        Action::Shutdown => m.shutdown().await.map(|_| String::new()),
        Action::Crash => m.crash().await.map(|_| String::new()),
        Action::Reboot => m.reboot().await.map(|_| String::new()),
        other => Err(Error::usage(format!("`{}` acts on the network, not on nodes", other.describe()))),
    }
}

/// The JUnit cases of one file as the steps run.
struct Cases {
    filter: Option<String>,
    cases: Vec<Case>,
}

impl Cases {
    fn new(file: &TestFile, filter: Option<&str>) -> Self {
        let filter = filter.map(str::to_owned);
        let mut cases = Vec::new();
        if file.steps.iter().any(|s| s.subtest.is_none()) {
            cases.push(Case {
                name: SETUP_CASE.into(),
                time: Duration::ZERO,
                status: CaseStatus::Passed,
                log: String::new(),
            });
        }
        for st in file.subtests() {
            let status = match &filter {
                Some(f) if !st.contains(f.as_str()) => {
                    CaseStatus::Skipped { reason: format!("filtered out by --filter {f}") }
                }
                _ => CaseStatus::Passed,
            };
            cases.push(Case { name: st, time: Duration::ZERO, status, log: String::new() });
        }
        Cases { filter, cases }
    }

    /// The case a step belongs to.
    fn name_of(step: &Step) -> &str {
        step.subtest.as_deref().unwrap_or(SETUP_CASE)
    }

    fn case_of(&mut self, step: &Step) -> &mut Case {
        let name = Self::name_of(step);
        self.cases.iter_mut().find(|c| c.name == name).expect("every step has its case")
    }

    fn wants(&self, step: &Step) -> bool {
        match (&step.subtest, &self.filter) {
            (Some(st), Some(f)) => st.contains(f.as_str()),
            _ => true,
        }
    }

    fn passed_step(&mut self, step: &Step, d: Duration, what: &str, out: &str) {
        let c = self.case_of(step);
        c.time += d;
        c.log.push_str(&format!("{what}: ok\n"));
        if !out.trim().is_empty() {
            c.log.push_str(out.trim_end());
            c.log.push('\n');
        }
    }

    fn failed_step(&mut self, step: &Step, d: Duration, msg: &str, detail: &str) {
        let c = self.case_of(step);
        c.time += d;
        c.status = CaseStatus::Failed { message: msg.to_owned(), detail: detail.to_owned() };
    }

    /// The test stopped before its steps (boot, slots, signal): mark the first case failed.
    fn abort(
        mut self,
        file: &TestFile,
        started: Instant,
        verdict: Verdict,
        kept: Vec<String>,
    ) -> FileOutcome {
        if let Verdict::Error(e) | Verdict::Failed(e) = &verdict {
            let c = match self.cases.iter_mut().find(|c| c.status == CaseStatus::Passed) {
                Some(c) => c,
                None => {
                    self.cases.insert(
                        0,
                        Case {
                            name: SETUP_CASE.into(),
                            time: Duration::ZERO,
                            status: CaseStatus::Passed,
                            log: String::new(),
                        },
                    );
                    &mut self.cases[0]
                }
            };
            c.status =
                CaseStatus::Failed { message: e.headline(), detail: e.detail().unwrap_or("").to_owned() };
        }
        self.finish(file, started, verdict, kept)
    }

    fn finish(
        mut self,
        file: &TestFile,
        started: Instant,
        verdict: Verdict,
        kept: Vec<String>,
    ) -> FileOutcome {
        // Cases after a failure never ran.
        if !matches!(verdict, Verdict::Passed) {
            let mut after = false;
            for c in &mut self.cases {
                if after && c.status == CaseStatus::Passed {
                    c.status = CaseStatus::Skipped { reason: "an earlier step failed".into() };
                }
                if matches!(c.status, CaseStatus::Failed { .. }) {
                    after = true;
                }
            }
        }
        let suite = Suite {
            name: file.name.clone(),
            file: file.path.display().to_string(),
            time: started.elapsed(),
            cases: self.cases,
        };
        FileOutcome { verdict, suite, kept }
    }
}
