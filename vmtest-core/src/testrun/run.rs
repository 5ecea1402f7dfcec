//! The phases every cluster of a file's run goes through: up (booted or restored), its
//! steps in order, then down (or kept).

use super::cases::Cases;
use super::steps::{apply_network_defaults, describe_step, kernel_reports, run_step};
use super::stop::{Stop, StopReason};
use super::{Halt, RunConfig};
use crate::error::Error;
use crate::events::{Event, FileRef, StepRef, StepResult};
use crate::hypervisor::Hypervisor;
use crate::machine::{Cluster, NodeConfig};
use crate::state::StateDir;
use crate::testfile::{Step, TestFile};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One file's run: what every phase needs.
pub(super) struct FileRun<'a> {
    pub hv: Arc<dyn Hypervisor>,
    pub state: &'a StateDir,
    pub file: &'a TestFile,
    pub cfg: &'a RunConfig<'a>,
    pub file_ref: &'a FileRef<'a>,
    pub stop: Stop,
    pub cases: &'a Cases,
    /// The shape of each node (without `resume`).
    pub nodes: Vec<NodeConfig>,
}

impl FileRun<'_> {
    /// Run the file; how it ended and the machines kept.
    pub(super) async fn run(&self) -> (Option<Halt>, Vec<String>) {
        if self.file.checkpoint().is_some() {
            return self.run_checkpointed().await;
        }
        let cluster = match self.boot(self.nodes.clone(), true).await {
            Ok((c, up)) => {
                self.report(Event::NodesUp { file: self.file_ref, duration: up });
                c
            }
            Err(h) => return (Some(h), Vec::new()),
        };
        let steps: Vec<&Step> = self.file.steps.iter().filter(|s| self.cases.wants(s)).collect();
        let failure = self.run_steps(&cluster, &steps).await;
        let kept = self.end(cluster, failure.as_ref()).await;
        (failure, kept)
    }

    pub(super) fn report(&self, e: Event<'_>) {
        self.cfg.reporter.event(&e);
    }

    pub(super) fn stopped(&self, why: StopReason) -> Halt {
        Halt::Stopped(why.error(self.file))
    }

    /// A cluster of `nodes`, up, with the file's network settings, and how long booting took
    /// once it had its slots. `copy_files`: each node's `files` are copied in (a restored
    /// node has them already).
    pub(super) async fn boot(
        &self,
        nodes: Vec<NodeConfig>,
        copy_files: bool,
    ) -> Result<(Cluster, Duration), Halt> {
        let cluster = self.create(nodes).await?;
        self.bring_up(cluster, copy_files).await
    }

    /// A cluster of `nodes` with its slots, run dir and network, nothing started.
    pub(super) async fn create(&self, nodes: Vec<NodeConfig>) -> Result<Cluster, Halt> {
        let slots = self.cfg.slots.as_ref();
        let created =
            self.stop.guard(Cluster::create(self.hv.clone(), self.state, nodes, slots, self.cfg.reporter));
        let cluster = match created.await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(Halt::Broken(e)),
            Err(why) => return Err(self.stopped(why)),
        };
        if let Err(e) = apply_network_defaults(&cluster, self.file) {
            cluster.kill().await;
            return Err(Halt::Broken(e));
        }
        Ok(cluster)
    }

    /// Start every machine of `cluster` (killing them all if one fails); how long it took.
    pub(super) async fn bring_up(
        &self,
        cluster: Cluster,
        copy_files: bool,
    ) -> Result<(Cluster, Duration), Halt> {
        let t0 = Instant::now();
        match self.stop.guard(cluster.boot_all(copy_files)).await {
            Ok(Ok(())) => Ok((cluster, t0.elapsed())),
            Ok(Err(e)) => {
                cluster.kill().await;
                Err(Halt::Broken(e))
            }
            Err(why) => {
                cluster.kill().await;
                Err(self.stopped(why))
            }
        }
    }

    /// Run `steps` in order on `cluster`, each reported and recorded; the first failure ends it.
    pub(super) async fn run_steps(&self, cluster: &Cluster, steps: &[&Step]) -> Option<Halt> {
        for step in steps {
            if let Err(h) = self.run_one(cluster, step).await {
                return Some(h);
            }
        }
        None
    }

    async fn run_one(&self, cluster: &Cluster, step: &Step) -> Result<(), Halt> {
        let t = Instant::now();
        let result = match self.stop.guard(run_step(cluster, self.file, step)).await {
            Ok(r) => r.map_err(Halt::Failed),
            Err(why) => Err(self.stopped(why)),
        };
        let result = kernel_reports(cluster, self.cfg, result).await;
        let where_ = describe_step(self.file, step);
        let step_ref = StepRef { line: step.line, description: &where_, case: Cases::name_of(step) };
        let file = self.file_ref;
        match result {
            Ok(out) => {
                let result = StepResult::Passed { output: &out };
                self.report(Event::StepFinished { file, step: &step_ref, duration: t.elapsed(), result });
                self.cases.passed_step(step, t.elapsed(), &where_, &out);
                Ok(())
            }
            Err(h) => {
                let e = h.error();
                let msg = format!("{where_}: {}", e.headline());
                let result = StepResult::Failed { error: e };
                self.report(Event::StepFinished { file, step: &step_ref, duration: t.elapsed(), result });
                self.cases.failed_step(step, t.elapsed(), &msg, e.detail().unwrap_or(""));
                Err(h.map(|e| {
                    let detail = e.detail().map(str::to_owned).unwrap_or_default();
                    Error::new(e.kind(), msg).with_detail(detail)
                }))
            }
        }
    }

    /// Tear `cluster` down, or keep it (`--keep`) after a failure other than an interruption.
    /// Returns the VM names kept.
    pub(super) async fn end(&self, cluster: Cluster, failure: Option<&Halt>) -> Vec<String> {
        match failure {
            Some(h) if h.interrupted() => {
                cluster.kill().await;
                Vec::new()
            }
            Some(_) if self.cfg.keep => {
                let kept = cluster.keep(self.cfg.keep_network).await;
                for name in &kept {
                    self.report(Event::Kept { name });
                }
                kept
            }
            _ => {
                if let Err(e) = cluster.shutdown().await {
                    tracing::warn!("teardown: {e}");
                }
                Vec::new()
            }
        }
    }
}
