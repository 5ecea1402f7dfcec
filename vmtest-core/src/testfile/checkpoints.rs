//! The rules of `checkpoint` and `from`: one checkpoint per file, subtests that start from an
//! earlier one and agree on it, and only nodes that can be saved.
//!
//! One checkpoint keeps the run simple: the steps before it are the setup that later runs
//! skip, the steps after it run on the saved nodes or on copies of them.

use super::schema::{Mark, NodeDef, Step};

/// Every problem with the file's checkpoint and `from`s, as (line, message).
pub(super) fn check(steps: &[Step], nodes: &[NodeDef]) -> Vec<(usize, String)> {
    let mut problems = one_checkpoint(steps);
    problems.extend(froms(steps));
    problems.extend(saveable_nodes(steps, nodes));
    problems
}

/// The first checkpoint is the file's; a second one is refused.
fn one_checkpoint(steps: &[Step]) -> Vec<(usize, String)> {
    let mut first: Option<&Mark> = None;
    let mut problems = Vec::new();
    for mark in steps.iter().filter_map(|s| s.checkpoint.as_ref()) {
        let Mark { name, line } = mark;
        match first {
            None => first = Some(mark),
            Some(Mark { name: f, line: l }) if f == name => {
                problems.push((*line, format!("duplicate checkpoint `{name}` (already on line {l})")))
            }
            Some(Mark { name: f, line: l }) => problems.push((
                *line,
                format!(
                    "a second checkpoint `{name}`: a test file has one (`{f}`, line {l}); start later \
                     subtests from it with `from = \"{f}\"`, or move it"
                ),
            )),
        }
    }
    problems
}

/// Each `from` is on a subtest, names a checkpoint of an earlier step, and every step of its
/// subtest says the same.
fn froms(steps: &[Step]) -> Vec<(usize, String)> {
    let mut problems = Vec::new();
    // The first step of each subtest: its `from` is the subtest's.
    let mut first_of: Vec<(&str, &Step)> = Vec::new();
    for (i, st) in steps.iter().enumerate() {
        let Some(sub) = st.subtest.as_deref() else {
            if let Some(Mark { name, line }) = &st.from {
                problems.push((
                    *line,
                    format!("`from = \"{name}\"` goes on the steps of a subtest: add `subtest = \"NAME\"`"),
                ));
            }
            continue;
        };
        match first_of.iter().find(|(s, _)| *s == sub) {
            Some((_, head)) if head.from_name() != st.from_name() => {
                let line = st.from.as_ref().map(|m| m.line).unwrap_or(st.line);
                problems.push((line, disagree(sub, st, head)))
            }
            Some(_) => {}
            None => {
                first_of.push((sub, st));
                if let Some(Mark { name, line }) = &st.from {
                    problems.extend(known_before(name, &steps[..i]).err().map(|m| (*line, m)));
                }
            }
        }
    }
    problems
}

fn disagree(sub: &str, st: &Step, head: &Step) -> String {
    let say = |f: Option<&str>| match f {
        Some(f) => format!("`from = \"{f}\"`"),
        None => "no `from`".to_owned(),
    };
    format!(
        "this step of subtest `{sub}` has {}, but its first step (line {}) has {}; every step of a \
         subtest starts from the same checkpoint",
        say(st.from_name()),
        head.from.as_ref().map(|m| m.line).unwrap_or(head.line),
        say(head.from_name())
    )
}

/// `name` is the checkpoint of one of `earlier`, or why not.
fn known_before(name: &str, earlier: &[Step]) -> Result<(), String> {
    if earlier.iter().any(|s| s.checkpoint_name() == Some(name)) {
        return Ok(());
    }
    Err(format!(
        "`from = \"{name}\"` names no checkpoint of an earlier step; add `checkpoint = \"{name}\"` to a \
         step before this subtest"
    ))
}

/// Kernel-mode nodes (no `image`) run on the host's root shared over 9p, which QEMU
/// refuses to migrate: such a node cannot be saved, so neither can the file's checkpoint.
fn saveable_nodes(steps: &[Step], nodes: &[NodeDef]) -> Vec<(usize, String)> {
    let first = |f: fn(&Step) -> Option<&Mark>| steps.iter().find_map(f);
    let (what, line) = match (first(|s| s.checkpoint.as_ref()), first(|s| s.from.as_ref())) {
        (Some(m), _) => (format!("checkpoint `{}`", m.name), m.line),
        (None, Some(m)) => (format!("`from = \"{}\"`", m.name), m.line),
        (None, None) => return Vec::new(),
    };
    let kernel_mode: Vec<String> =
        nodes.iter().filter(|n| n.image.is_none()).map(|n| format!("`{}`", n.name)).collect();
    if kernel_mode.is_empty() {
        return Vec::new();
    }
    vec![(
        line,
        format!(
            "{what}: node(s) {} run in kernel mode (no `image`), on the host's root shared over 9p, which \
             cannot be saved (QEMU does not migrate 9p); give them an `image` (`vmtest image build`)",
            kernel_mode.join(", ")
        ),
    )]
}
