//! A file with a checkpoint: restore the stored one when its key matches (discarding it if
//! it does not restore), otherwise run the steps up to it and save every node. The steps
//! after it run on those nodes; its `from` subtests run on copies ([`super::copies`]).

use super::cases::Cases;
use super::run::FileRun;
use super::steps::{describe_step, run_step};
use super::{prefixed, Halt};
use crate::checkpoint::{self, Manifest, Pending, Store};
use crate::error::{Error, Result};
use crate::events::{CheckpointEvent, Event, StepRef};
use crate::machine::{join_all, Cluster, Machine, NodeConfig};
use crate::spec::VmSpec;
use crate::testfile::Step;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The checkpoint this run's `from` subtests start from.
pub(super) struct Held {
    pub dir: PathBuf,
    /// A checkpoint kept out of the store, removed with this.
    _local: Option<Pending>,
}

/// The backend's store and the file's key in it.
type Stored = (Store, String);

/// A run that could not reach the checkpoint: why, and the machines kept.
type Unreached = (Halt, Vec<String>);

impl FileRun<'_> {
    pub(super) async fn run_checkpointed(&self) -> (Option<Halt>, Vec<String>) {
        let (cluster, held) = match self.at_checkpoint().await {
            Ok(started) => started,
            Err((h, kept)) => return (Some(h), kept),
        };
        let (k, _) = self.file.checkpoint().expect("a file with a checkpoint");
        let after: Vec<&Step> =
            self.file.steps[k + 1..].iter().filter(|s| s.from.is_none() && self.cases.wants(s)).collect();
        let failure = self.run_steps(&cluster, &after).await;
        let mut kept = self.end(cluster, failure.as_ref()).await;
        if matches!(failure, Some(Halt::Stopped(_))) {
            return (failure, kept);
        }
        let (copy_failure, copy_kept) = self.run_copies(&held).await;
        kept.extend(copy_kept);
        (failure.or(copy_failure), kept)
    }

    pub(super) fn checkpoint_name(&self) -> &str {
        &self.file.checkpoint_mark().expect("a file with a checkpoint").name
    }

    /// The file's nodes at the checkpoint: restored from the store, or booted, brought there
    /// by the steps up to it, and saved.
    async fn at_checkpoint(&self) -> Result<(Cluster, Held), Unreached> {
        let stored = self.store_and_key().await.map_err(|h| (h, Vec::new()))?;
        if let Some((store, key)) = &stored {
            if let Some(restored) = self.restore(store, key).await.map_err(|h| (h, Vec::new()))? {
                return Ok(restored);
            }
        }
        self.make(stored.as_ref()).await
    }

    /// The store and the key, unless checkpoints are for this run only (`--no-snapshot`).
    async fn store_and_key(&self) -> Result<Option<Stored>, Halt> {
        let root = match (self.cfg.store_checkpoints, self.hv.checkpoint_store()) {
            (true, Some(root)) => root,
            _ => return Ok(None),
        };
        let specs: Vec<VmSpec> = self.nodes.iter().map(|n| n.spec.clone()).collect();
        match self.stop.guard(checkpoint::key(self.hv.as_ref(), self.file, &specs)).await {
            Ok(Ok(key)) => Ok(Some((Store::new(root), key))),
            Ok(Err(e)) => Err(Halt::Broken(self.cannot("cannot make its key", e))),
            Err(why) => Err(self.stopped(why)),
        }
    }

    /// Where a checkpoint for this run only goes: a temporary dir in the backend's store.
    fn scratch(&self) -> Result<Pending> {
        let root = self
            .hv
            .checkpoint_store()
            .ok_or_else(|| Error::usage(format!("the {} backend cannot save guests", self.hv.name())))?;
        Store::new(root).scratch()
    }

    /// `e`, saying it is about the file's checkpoint.
    fn cannot(&self, what: &str, e: Error) -> Error {
        prefixed(e, &format!("{}: checkpoint `{}`: {what}", self.file.path.display(), self.checkpoint_name()))
    }

    /// The file's nodes restored from the stored checkpoint of `key`, the steps up to it
    /// reported as restored. `None` when none is stored, or when it does not restore: then
    /// it is discarded (and the reason said) and the file runs cold.
    async fn restore(&self, store: &Store, key: &str) -> Result<Option<(Cluster, Held)>, Halt> {
        let names: Vec<&str> = self.nodes.iter().map(|n| n.spec.node.as_str()).collect();
        let Some(dir) = store.find(key, &names) else { return Ok(None) };
        let t = Instant::now();
        // Slots and run dir first: failing to get them says nothing about the checkpoint.
        let cluster = self.create(self.resumed_nodes(&dir)).await?;
        match self.restored(cluster).await {
            Ok((cluster, up)) => {
                self.report(Event::NodesUp { file: self.file_ref, duration: up });
                self.report_restored(&dir, None, t.elapsed());
                self.report_restored_steps();
                Ok(Some((cluster, Held { dir, _local: None })))
            }
            Err(h @ Halt::Stopped(_)) => Err(h),
            Err(h) => {
                let reason = h.error().headline();
                tracing::warn!(
                    "checkpoint `{}` of {} did not restore ({reason}); discarded {}, running the file cold",
                    self.checkpoint_name(),
                    self.file.path.display(),
                    dir.display()
                );
                let what = CheckpointEvent::Discarded { reason: &reason };
                self.report_checkpoint(what, &dir, Duration::ZERO);
                checkpoint::discard(&dir);
                Ok(None)
            }
        }
    }

    /// A new cluster of the file's nodes restored from the checkpoint in `dir`, its network
    /// as the steps up to the checkpoint left it.
    pub(super) async fn restore_cluster(&self, dir: &Path) -> Result<(Cluster, Duration), Halt> {
        let cluster = self.create(self.resumed_nodes(dir)).await?;
        self.restored(cluster).await
    }

    /// The file's nodes, each to be restored from its directory in `dir`.
    fn resumed_nodes(&self, dir: &Path) -> Vec<NodeConfig> {
        let resumed = |mut n: NodeConfig| {
            n.spec.resume = Some(dir.join(&n.spec.node));
            n
        };
        self.nodes.iter().cloned().map(resumed).collect()
    }

    /// `cluster` restored (started from its nodes' `resume`), its network set again.
    async fn restored(&self, cluster: Cluster) -> Result<(Cluster, Duration), Halt> {
        let (cluster, up) = self.bring_up(cluster, false).await?;
        if let Err(e) = self.replay_network(&cluster).await {
            cluster.kill().await;
            return Err(Halt::Broken(e));
        }
        Ok((cluster, up))
    }

    /// The runner's network is not part of the saved guests: the faults the steps up to the
    /// checkpoint set (partitions, loss, delay, blocks) are set again.
    async fn replay_network(&self, cluster: &Cluster) -> Result<()> {
        let (k, _) = self.file.checkpoint().expect("a file with a checkpoint");
        for step in self.file.steps[..=k].iter().filter(|s| s.action.needs_private_network()) {
            run_step(cluster, self.file, step).await?;
        }
        Ok(())
    }

    /// Boot, run every step up to the checkpoint, save. The filter does not apply to those
    /// steps: they make the state that later runs start from.
    async fn make(&self, stored: Option<&Stored>) -> Result<(Cluster, Held), Unreached> {
        let (k, step) = self.file.checkpoint().expect("a file with a checkpoint");
        let (cluster, up) = self.boot(self.nodes.clone(), true).await.map_err(|h| (h, Vec::new()))?;
        self.report(Event::NodesUp { file: self.file_ref, duration: up });
        let setup: Vec<&Step> = self.file.steps[..=k].iter().collect();
        let failure = match self.run_steps(&cluster, &setup).await {
            Some(h) => h,
            None => match self.save(&cluster, stored).await {
                Ok(held) => return Ok((cluster, held)),
                Err(h) => {
                    let e = h.error();
                    self.cases.failed_case(Cases::name_of(step), &e.headline(), e.detail().unwrap_or(""));
                    h
                }
            },
        };
        let kept = self.end(cluster, Some(&failure)).await;
        Err((failure, kept))
    }

    /// Save every node of `cluster`: into the store when there is one (in place once all
    /// saved), else for this run only.
    async fn save(&self, cluster: &Cluster, stored: Option<&Stored>) -> Result<Held, Halt> {
        let pending = match stored {
            Some((store, key)) => store.begin(key),
            None => self.scratch(),
        };
        let pending = pending.map_err(|e| Halt::Broken(self.cannot("cannot save it", e)))?;
        let t = Instant::now();
        let saves = join_all(cluster.machines().iter().map(|m| save_machine(m, &pending)).collect());
        let results = self.stop.guard(saves).await.map_err(|why| self.stopped(why))?;
        if let Some(e) = results.into_iter().find_map(Result::err) {
            return Err(Halt::Broken(self.cannot("cannot save it", e)));
        }
        let mut pending = pending;
        let (dir, local) = match stored {
            Some((store, key)) => {
                let names: Vec<&str> = cluster.machines().iter().map(|m| m.name()).collect();
                let manifest = Manifest::new(&self.file.path, self.checkpoint_name(), &names);
                match store.commit(&mut pending, key, &manifest) {
                    Ok(dir) => (dir, None),
                    Err(e) => {
                        tracing::warn!("checkpoint `{}` serves this run only: {e}", self.checkpoint_name());
                        (pending.dir().to_owned(), Some(pending))
                    }
                }
            }
            None => (pending.dir().to_owned(), Some(pending)),
        };
        self.report_checkpoint(CheckpointEvent::Saved { stored: local.is_none() }, &dir, t.elapsed());
        Ok(Held { dir, _local: local })
    }

    pub(super) fn report_checkpoint(&self, what: CheckpointEvent<'_>, dir: &Path, duration: Duration) {
        let checkpoint = self.checkpoint_name();
        self.report(Event::Checkpoint { file: self.file_ref, checkpoint, what, dir, duration });
    }

    pub(super) fn report_restored(&self, dir: &Path, subtest: Option<&str>, duration: Duration) {
        self.report_checkpoint(CheckpointEvent::Restored { subtest }, dir, duration);
    }

    /// The steps up to the checkpoint did not run: their effect was restored.
    fn report_restored_steps(&self) {
        let (k, _) = self.file.checkpoint().expect("a file with a checkpoint");
        let checkpoint = self.checkpoint_name();
        for step in &self.file.steps[..=k] {
            let where_ = describe_step(self.file, step);
            let step_ref = StepRef { line: step.line, description: &where_, case: Cases::name_of(step) };
            self.report(Event::StepRestored { file: self.file_ref, step: &step_ref, checkpoint });
            self.cases.restored_step(step, &where_, checkpoint);
        }
    }
}

async fn save_machine(m: &Machine, pending: &Pending) -> Result<()> {
    let dir = pending.node_dir(m.name())?;
    m.save(&dir).await
}
