//! One step of a test file on a cluster: a command, a wait or a copy on its nodes, or a
//! fault on the runner's network.

use super::{Halt, RunConfig};
use crate::error::{Error, Result};
use crate::events::Event;
use crate::machine::{join_all, output_detail, Cluster, Machine};
use crate::network::LinkFault;
use crate::runner::KernelReports;
use crate::testfile::{Action, Step, Target, TestFile};
use std::time::Duration;

/// `web.toml:23: succeed `curl ...` on client`.
pub fn describe_step(file: &TestFile, step: &Step) -> String {
    let on = match &step.on {
        Target::None => String::new(),
        Target::Nodes(n) => format!(" on {}", n.join(", ")),
    };
    format!("{}:{}: {}{on}", file.path.display(), step.line, step.action.describe())
}

pub(super) fn apply_network_defaults(cluster: &Cluster, file: &TestFile) -> Result<()> {
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
pub(super) async fn run_step(cluster: &Cluster, file: &TestFile, step: &Step) -> Result<String> {
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

/// The guest kernels' bug reports printed during `step`: each an event and a line in the
/// step's JUnit case; with [`KernelReports::Fail`], a step that passed fails on them.
pub(super) async fn kernel_reports(
    cluster: &Cluster,
    cfg: &RunConfig<'_>,
    result: std::result::Result<String, Halt>,
) -> std::result::Result<String, Halt> {
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
            Err(Halt::Failed(crate::kernel_log::failure(&reports, "the step")))
        }
        Ok(out) => Ok(format!("{out}{}{log}", if out.is_empty() || out.ends_with('\n') { "" } else { "\n" })),
        Err(h) => Err(h.map(|e| with_log(e, &log))),
    }
}

/// `e` with `log` added to its detail.
fn with_log(e: Error, log: &str) -> Error {
    let detail = format!("{}\n{log}", e.detail().unwrap_or_default());
    e.with_detail(detail)
}
