//! Finding and destroying what runs left behind.
//!
//! Every vmtest command first sweeps *orphans*: VMs whose owner process is dead and that
//! were not kept on purpose. `vmtest cleanup` does the same on demand, and with `--all` also
//! takes kept VMs and VMs of runs still in progress. Only what vmtest created is ever
//! touched: records in the state dir, and what a backend's `list_owned` reports by vmtest's
//! own naming or tagging.

use crate::error::{Error, Result};
use crate::hypervisor::Hypervisor;
use crate::state::{RunDir, StateDir, VmRecord};

/// Why a VM is a candidate for destruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The process that made it is gone and it was not kept.
    OwnerDead,
    /// Kept on purpose (`--keep`); only `--all` or `destroy NAME` takes it.
    Kept,
    /// Its run is still in progress; only `--all` takes it.
    OwnerAlive,
    /// The backend reports it but no record names it (a runner died before writing one).
    NoRecord,
}

impl Reason {
    pub fn describe(self) -> &'static str {
        match self {
            Reason::OwnerDead => "orphan (its vmtest process is gone)",
            Reason::Kept => "kept (--keep)",
            Reason::OwnerAlive => "in use by a running vmtest",
            Reason::NoRecord => "orphan (no record; found by the backend)",
        }
    }
}

/// One VM the sweep found.
#[derive(Clone, Debug)]
pub struct Found {
    pub record: VmRecord,
    /// The run dir holding its record (`None` for [`Reason::NoRecord`]).
    pub run: Option<RunDir>,
    pub reason: Reason,
}

/// What to include beyond orphans.
#[derive(Clone, Copy, Debug, Default)]
pub struct Scope {
    /// Kept VMs and VMs of runs in progress too (`cleanup --all`).
    pub all: bool,
    /// Ask the backends too (slow for some, e.g. Multipass), not only the state dir.
    pub query_backends: bool,
}

fn classify(record: &VmRecord) -> Reason {
    if record.kept {
        Reason::Kept
    } else if record.owner.is_alive() {
        Reason::OwnerAlive
    } else {
        Reason::OwnerDead
    }
}

/// Every VM in scope: orphans always, the rest with `scope.all`.
pub async fn find(state: &StateDir, backends: &[&dyn Hypervisor], scope: Scope) -> Vec<Found> {
    let mut found: Vec<Found> = state
        .records()
        .into_iter()
        .map(|(run, record)| {
            let reason = classify(&record);
            Found { record, run: Some(run), reason }
        })
        .collect();
    if scope.query_backends {
        for b in backends {
            match b.list_owned().await {
                Ok(listed) => {
                    for record in listed {
                        if !found.iter().any(|f| f.record.name == record.name) {
                            found.push(Found { record, run: None, reason: Reason::NoRecord });
                        }
                    }
                }
                // A backend that is not installed has nothing of ours to list.
                Err(e) => tracing::debug!("{}: cannot list its VMs: {e}", b.name()),
            }
        }
    }
    found.retain(|f| scope.all || matches!(f.reason, Reason::OwnerDead | Reason::NoRecord));
    found
}

/// Destroy one found VM with its backend, then forget its record (and its run dir once the
/// run has no VM left).
pub async fn destroy(found: &Found, backends: &[&dyn Hypervisor]) -> Result<()> {
    let backend = backends.iter().find(|b| b.name() == found.record.backend).ok_or_else(|| {
        Error::usage(format!(
            "{} was made by backend `{}`, which this vmtest does not have",
            found.record.name, found.record.backend
        ))
    })?;
    backend.destroy_record(&found.record).await?;
    if let Some(run) = &found.run {
        run.remove_record(&found.record.node);
        if run.records().is_empty() {
            run.remove()?;
        }
    }
    Ok(())
}

/// Remove run dirs that hold no record and whose owner is gone (a runner killed between
/// making its run dir and writing the first record), and staging dirs of runners killed
/// while making one. A run dir in place always has its owner file (see
/// [`StateDir::create_run`]), so a missing owner means a damaged dir, not a young one.
pub fn remove_empty_dead_runs(state: &StateDir) {
    for run in state.runs() {
        let dead = run.owner().map(|o| !o.is_alive()).unwrap_or(true);
        if dead && run.records().is_empty() {
            let _ = run.remove();
        }
    }
    for dir in state.dead_staging_dirs() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The automatic sweep at the start of a command: orphans from the state dir only.
pub async fn sweep_orphans(state: &StateDir, backends: &[&dyn Hypervisor]) -> Vec<(String, Result<()>)> {
    let mut results = Vec::new();
    for f in find(state, backends, Scope::default()).await {
        let r = destroy(&f, backends).await;
        if let Err(e) = &r {
            tracing::warn!("could not clean up orphan {}: {e}", f.record.name);
        } else {
            tracing::info!("cleaned up orphan {} (left by pid {})", f.record.name, f.record.owner.pid);
        }
        results.push((f.record.name.clone(), r));
    }
    remove_empty_dead_runs(state);
    results
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ProcessId;

    #[tokio::test]
    async fn only_dead_owners_unkept_are_orphans() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::at(tmp.path());
        let run = state.create_run().unwrap();
        let mut dead = VmRecord::new("vmt-x-dead", "dead", run.id(), "qemu");
        dead.owner = ProcessId { pid: u32::MAX - 7, start_time: 1 };
        let mut kept = VmRecord::new("vmt-x-kept", "kept", run.id(), "qemu");
        kept.owner = dead.owner;
        kept.kept = true;
        let live = VmRecord::new("vmt-x-live", "live", run.id(), "qemu");
        for r in [&dead, &kept, &live] {
            run.write_record(r).unwrap();
        }
        let orphans = find(&state, &[], Scope::default()).await;
        assert_eq!(orphans.iter().map(|f| f.record.name.as_str()).collect::<Vec<_>>(), ["vmt-x-dead"]);
        let mut all: Vec<_> = find(&state, &[], Scope { all: true, query_backends: false })
            .await
            .into_iter()
            .map(|f| (f.record.name, f.reason))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            all,
            [
                ("vmt-x-dead".to_owned(), Reason::OwnerDead),
                ("vmt-x-kept".to_owned(), Reason::Kept),
                ("vmt-x-live".to_owned(), Reason::OwnerAlive)
            ]
        );
    }

    #[test]
    fn empty_runs_of_dead_owners_are_removed_but_ours_stay() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::at(tmp.path());
        let ours = state.create_run().unwrap();
        let theirs = state.create_run().unwrap();
        std::fs::write(
            theirs.path().join("run.json"),
            serde_json::to_vec(&ProcessId { pid: u32::MAX - 9, start_time: 3 }).unwrap(),
        )
        .unwrap();
        remove_empty_dead_runs(&state);
        assert!(ours.path().exists());
        assert!(!theirs.path().exists());
    }

    #[test]
    fn staging_dirs_of_dead_runners_are_removed_and_live_ones_stay() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::at(tmp.path());
        state.create_run().unwrap();
        let dead = tmp.path().join(".new-0badf00d");
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(
            dead.join("run.json"),
            serde_json::to_vec(&ProcessId { pid: u32::MAX - 9, start_time: 3 }).unwrap(),
        )
        .unwrap();
        // A runner that is between making its staging dir and writing its owner.
        let young = tmp.path().join(".new-12345678");
        std::fs::create_dir(&young).unwrap();
        remove_empty_dead_runs(&state);
        assert!(!dead.exists());
        assert!(young.exists());
        assert_eq!(state.runs().len(), 1, "staging dirs are never listed as runs");
    }

    /// Many runners at once, each making its run dir, writing a record and sweeping, as
    /// concurrent `vmtest run`s do: no runner ever loses its run dir or its record to
    /// another's sweep.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_runs_and_sweeps_never_disturb_each_other() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::at(tmp.path());
        let mut runners = Vec::new();
        for t in 0..12 {
            let state = state.clone();
            runners.push(tokio::spawn(async move {
                for i in 0..40 {
                    let run = state.create_run().expect("run dir");
                    sweep_orphans(&state, &[]).await;
                    let node = format!("n{t}-{i}");
                    let record = VmRecord::new(&run.vm_name(&node), &node, run.id(), "qemu");
                    run.write_record(&record).expect("record written into our own run dir");
                    sweep_orphans(&state, &[]).await;
                    assert_eq!(run.records(), [record], "our record survived the others' sweeps");
                    run.remove_record(&node);
                    sweep_orphans(&state, &[]).await;
                    assert!(run.path().is_dir(), "an empty run dir of a live owner stays");
                    run.remove().unwrap();
                }
            }));
        }
        for r in runners {
            r.await.unwrap();
        }
        assert!(state.runs().is_empty());
    }
}
