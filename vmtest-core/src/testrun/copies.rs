//! `from` subtests: each runs on its own copy of every node, restored from the checkpoint,
//! on a private network of its own (a new cluster, so new VM names and run dir, but the
//! same node names, MACs and addresses as the saved guests have), as many at once as the
//! VM slots hold. A copy is torn down when its subtest ends.

use super::checkpointed::Held;
use super::prefixed;
use super::run::FileRun;
use super::Halt;
use crate::machine::join_all;
use crate::testfile::Step;
use std::time::Instant;

impl FileRun<'_> {
    /// Run every `from` subtest the filter keeps; the worst failure and the machines kept.
    pub(super) async fn run_copies(&self, held: &Held) -> (Option<Halt>, Vec<String>) {
        let subtests = self.subtests_from_checkpoint();
        if subtests.is_empty() {
            return (None, Vec::new());
        }
        // Copies wait for each other here rather than in the slot pool, whose wait has a
        // deadline meant for other processes.
        let at_once = match &self.cfg.slots {
            Some(pool) => (pool.max() / self.nodes.len().max(1)).max(1),
            None => subtests.len(),
        };
        let permits = tokio::sync::Semaphore::new(at_once);
        let runs = subtests
            .iter()
            .map(|(name, steps)| async {
                let _permit = permits.acquire().await.expect("the semaphore is never closed");
                self.run_copy(name, steps, held).await
            })
            .collect();
        let mut failure: Option<Halt> = None;
        let mut kept = Vec::new();
        for (f, k) in join_all(runs).await {
            kept.extend(k);
            failure = match (failure, f) {
                // A stop says the most about the run: it wins.
                (Some(Halt::Stopped(e)), _) | (_, Some(Halt::Stopped(e))) => Some(Halt::Stopped(e)),
                (first, next) => first.or(next),
            };
        }
        (failure, kept)
    }

    /// The `from` subtests the filter keeps, each with its steps, in the file's order.
    fn subtests_from_checkpoint(&self) -> Vec<(&str, Vec<&Step>)> {
        let mut out: Vec<(&str, Vec<&Step>)> = Vec::new();
        for st in self.file.steps.iter().filter(|s| s.from.is_some() && self.cases.wants(s)) {
            let name = st.subtest.as_deref().expect("checked: `from` is on the steps of subtests");
            match out.iter_mut().find(|(n, _)| *n == name) {
                Some((_, steps)) => steps.push(st),
                None => out.push((name, vec![st])),
            }
        }
        out
    }

    async fn run_copy(&self, sub: &str, steps: &[&Step], held: &Held) -> (Option<Halt>, Vec<String>) {
        let t = Instant::now();
        let cluster = match self.restore_cluster(&held.dir).await {
            Ok((cluster, _)) => cluster,
            Err(h) => {
                let what = format!("subtest `{sub}`: its copy of checkpoint `{}`", self.checkpoint_name());
                let h = h.map(|e| prefixed(e, &what));
                let e = h.error();
                self.cases.failed_case(sub, &e.headline(), e.detail().unwrap_or(""));
                return (Some(h), Vec::new());
            }
        };
        self.report_restored(&held.dir, Some(sub), t.elapsed());
        let failure = self.run_steps(&cluster, steps).await;
        let kept = self.end(cluster, failure.as_ref()).await;
        (failure, kept)
    }
}
