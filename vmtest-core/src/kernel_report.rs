//! Recognizing the guest kernel's bug reports in its log: WARNING, BUG, Oops, KASAN, UBSAN,
//! KFENCE, lockdep, RCU stalls, hung tasks, soft lockups, panics. Titles and extents follow
//! the conventions of syzkaller's report parser (e.g. `WARNING in func`, `KASAN:
//! use-after-free Read in func`), so a title is stable across runs and can be searched for.

use serde::Serialize;

/// One report the kernel printed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KernelReport {
    /// What kind of report: `warning`, `bug`, `oops`, `kasan`, `ubsan`, `kfence`, `lockdep`,
    /// `rcu_stall`, `hung_task`, `soft_lockup`, `panic`.
    pub kind: &'static str,
    /// A one-line title, e.g. `WARNING in vmtest_probe`.
    pub title: String,
    /// The report's lines, timestamps removed: the header and its call trace.
    pub text: String,
}

/// How a report starts, its kind, and how it ends.
struct Start {
    kind: &'static str,
    starts: fn(&str) -> bool,
    /// Reports framed by lines of `=` (KASAN, UBSAN, KFENCE) end at the closing frame.
    framed: bool,
}

const STARTS: &[Start] = &[
    Start { kind: "kasan", starts: |l| l.starts_with("BUG: KASAN: "), framed: true },
    Start { kind: "kfence", starts: |l| l.starts_with("BUG: KFENCE: "), framed: true },
    Start { kind: "ubsan", starts: |l| l.starts_with("UBSAN: "), framed: true },
    Start {
        kind: "lockdep",
        starts: |l| {
            l.starts_with("WARNING: possible circular locking dependency detected")
                || l.starts_with("WARNING: possible recursive locking detected")
                || l.starts_with("WARNING: inconsistent lock state")
                || l.starts_with("WARNING: suspicious RCU usage")
                || l.starts_with("BUG: sleeping function called from invalid context")
        },
        framed: false,
    },
    Start { kind: "soft_lockup", starts: |l| l.contains("BUG: soft lockup - CPU#"), framed: false },
    Start {
        kind: "rcu_stall",
        starts: |l| l.contains("detected stalls on CPU") || l.contains("self-detected stall on CPU"),
        framed: false,
    },
    Start {
        kind: "hung_task",
        starts: |l| l.starts_with("INFO: task ") && l.contains(" blocked for more than "),
        framed: false,
    },
    Start {
        kind: "warning",
        starts: |l| l.starts_with("WARNING: CPU: ") || l.starts_with("WARNING: at "),
        framed: false,
    },
    Start {
        kind: "oops",
        starts: |l| l.starts_with("Oops: ") || l.starts_with("general protection fault"),
        framed: false,
    },
    Start {
        kind: "bug",
        starts: |l| l.starts_with("BUG: ") || l.starts_with("kernel BUG at "),
        framed: false,
    },
    Start { kind: "panic", starts: |l| l.starts_with("Kernel panic - not syncing"), framed: false },
];

/// The longest a report runs when nothing ends it earlier.
const MAX_LINES: usize = 200;

/// Every report in `log` (a console log: printk timestamps and carriage returns allowed).
pub fn find(log: &str) -> Vec<KernelReport> {
    let lines: Vec<&str> = log.lines().map(strip_prefix).collect();
    let mut reports = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(start) = STARTS.iter().find(|s| (s.starts)(lines[i])) else {
            i += 1;
            continue;
        };
        // A "cut here" line just before belongs to the report.
        let first = if i > 0 && lines[i - 1].contains("[ cut here ]") { i - 1 } else { i };
        let end = extent(&lines, i, start);
        let body = &lines[first..end];
        reports.push(KernelReport {
            kind: start.kind,
            title: title(start.kind, lines[i], body),
            text: body.join("\n"),
        });
        i = end.max(i + 1);
    }
    reports
}

/// One past the last line of the report that starts at `i`.
fn extent(lines: &[&str], i: usize, start: &Start) -> usize {
    let limit = (i + MAX_LINES).min(lines.len());
    for (j, line) in lines.iter().enumerate().take(limit).skip(i + 1) {
        if line.contains("---[ end trace") || line.contains("---[ end Kernel panic") {
            return j + 1;
        }
        if start.framed && line.starts_with("=====") {
            return j + 1;
        }
        // The next report ends this one.
        if STARTS.iter().any(|s| (s.starts)(line)) && !line.starts_with("BUG: KASAN") {
            return j;
        }
    }
    limit
}

/// The title of a report starting with `header`, after syzkaller's conventions.
fn title(kind: &str, header: &str, body: &[&str]) -> String {
    let frame = first_frame(header, body);
    let in_frame = |what: &str| match &frame {
        Some(f) => format!("{what} in {f}"),
        None => what.to_owned(),
    };
    match kind {
        "warning" => in_frame("WARNING"),
        "kasan" | "kfence" => {
            // "BUG: KASAN: use-after-free in f+0x1/0x2" then "Read of size 8 at addr ...".
            let rest = header.trim_start_matches("BUG: ");
            let (what, _) = rest.split_once(" in ").unwrap_or((rest, ""));
            let access = body.iter().find_map(|l| {
                let l = l.trim();
                l.starts_with("Read of size")
                    .then_some("Read")
                    .or(l.starts_with("Write of size").then_some("Write"))
            });
            let what = match access {
                Some(a) if kind == "kasan" => format!("{what} {a}"),
                _ => what.to_owned(),
            };
            in_frame(&what)
        }
        "ubsan" => {
            // "UBSAN: shift-out-of-bounds in lib/foo.c:12:3" -> "UBSAN: shift-out-of-bounds in lib/foo.c".
            let rest = header.trim_start_matches("UBSAN: ");
            match rest.split_once(" in ") {
                Some((what, at)) => format!("UBSAN: {what} in {}", at.split(':').next().unwrap_or(at)),
                None => format!("UBSAN: {rest}"),
            }
        }
        "lockdep" => {
            let what = header.trim_start_matches("WARNING: ").trim_start_matches("BUG: ");
            let what = if what.starts_with("possible circular") || what.starts_with("possible recursive") {
                "possible deadlock"
            } else {
                what.trim_end_matches(" detected").trim_end_matches('!')
            };
            in_frame(what)
        }
        "soft_lockup" => in_frame("BUG: soft lockup"),
        "rcu_stall" => "INFO: rcu detected stall".to_owned(),
        "hung_task" => {
            // "INFO: task kworker/0:1:12 blocked for more than 120 seconds."
            let task = header.trim_start_matches("INFO: task ").split(" blocked").next().unwrap_or("");
            let name = task.rsplit_once(':').map(|(n, _)| n).unwrap_or(task);
            format!("INFO: task hung in {}", frame.unwrap_or_else(|| name.to_owned()))
        }
        "oops" => {
            if header.starts_with("general protection fault") {
                in_frame("general protection fault")
            } else {
                in_frame("Oops")
            }
        }
        "bug" => {
            let what = header.trim_start_matches("BUG: ");
            let what = what.split(", address").next().unwrap_or(what);
            let what = what.split(" at ").next().unwrap_or(what).trim_end_matches('!');
            in_frame(&format!("BUG: {what}"))
        }
        "panic" => header.trim().to_owned(),
        _ => header.trim().to_owned(),
    }
}

/// The function a report is about: from the header (`... at file:line func+0x1/0x2`,
/// `... in func+0x1/0x2`), else the first call-trace frame that is not reporting machinery.
fn first_frame(header: &str, body: &[&str]) -> Option<String> {
    if let Some(f) = header.split_whitespace().rev().find_map(frame_name) {
        return Some(f);
    }
    let trace = body.iter().skip_while(|l| !l.trim_start().starts_with("Call Trace:")).skip(1);
    trace
        .map(|l| l.trim().trim_start_matches("? "))
        .filter_map(frame_name)
        .find(|f| !is_reporting_machinery(f))
}

/// `func+0x12/0x40` (or `func+0x12/0x40 [module]`) to `func`.
fn frame_name(word: &str) -> Option<String> {
    let (name, offset) = word.split_once('+')?;
    let valid = !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        && offset.starts_with("0x")
        && offset.contains('/');
    valid.then(|| name.to_owned())
}

fn is_reporting_machinery(f: &str) -> bool {
    const MACHINERY: &[&str] = &[
        "dump_stack",
        "dump_stack_lvl",
        "show_stack",
        "__warn",
        "warn_slowpath_fmt",
        "report_bug",
        "handle_bug",
        "exc_invalid_op",
        "asm_exc_invalid_op",
        "print_report",
        "kasan_report",
        "panic",
        "__might_sleep",
        "__might_resched",
        "lockdep_rcu_suspicious",
    ];
    MACHINERY.contains(&f) || f.starts_with("__sanitizer") || f.starts_with("ubsan_")
}

/// A console line without its carriage return and printk timestamp (`[   12.345678] `).
fn strip_prefix(line: &str) -> &str {
    let line = line.trim_end_matches('\r');
    match line.strip_prefix('[').and_then(|r| r.split_once("] ")) {
        Some((ts, rest)) if ts.trim().chars().all(|c| c.is_ascii_digit() || c == '.') => rest,
        _ => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WARNING: &str = "\
[   10.100000] ------------[ cut here ]------------
[   10.100001] WARNING: CPU: 0 PID: 1 at drivers/vmtest/probe.c:42 vmtest_probe+0x10/0x20
[   10.100002] Modules linked in: 9p
[   10.100003] CPU: 0 PID: 1 Comm: sh Not tainted 6.1.0 #1
[   10.100004] Call Trace:
[   10.100005]  <TASK>
[   10.100006]  do_one_initcall+0x5b/0x300
[   10.100007]  </TASK>
[   10.100008] ---[ end trace 0000000000000000 ]---
[   10.200000] virtio_net virtio1 eth0: renamed
";

    #[test]
    fn a_warning_is_found_with_its_title_and_whole_trace() {
        let found = find(WARNING);
        assert_eq!(found.len(), 1);
        let r = &found[0];
        assert_eq!(r.kind, "warning");
        assert_eq!(r.title, "WARNING in vmtest_probe");
        assert!(r.text.starts_with("------------[ cut here ]------------\nWARNING: CPU: 0"), "{}", r.text);
        assert!(r.text.contains("do_one_initcall+0x5b/0x300"));
        assert!(r.text.ends_with("---[ end trace 0000000000000000 ]---"), "{}", r.text);
        assert!(!r.text.contains("renamed"), "the report ends at its end marker");
    }

    #[test]
    fn ordinary_kernel_messages_are_not_reports() {
        let log = "[    0.000000] Linux version 6.1.0\n[    1.0] 9pnet: Installing 9P2000 support\n\
                   [    2.0] random: crng init done\n[    3.0] EXT4-fs (vda): mounted filesystem\n\
                   [    4.0] audit: type=1400 audit(1.0:2): apparmor=\"STATUS\"\nwarning: not a kernel report\n";
        assert_eq!(find(log), Vec::new());
    }

    #[test]
    fn sanitizer_reports_take_syzkaller_style_titles_and_end_at_their_frame() {
        let kasan = "==================================================================\n\
            BUG: KASAN: use-after-free in kfree_thing+0x20/0x40\n\
            Read of size 8 at addr ffff888000000000 by task sh/1\n\
            Call Trace:\n dump_stack_lvl+0x1/0x2\n kfree_thing+0x20/0x40\n\
            ==================================================================\n\
            after\n";
        let r = &find(kasan)[0];
        assert_eq!((r.kind, r.title.as_str()), ("kasan", "KASAN: use-after-free Read in kfree_thing"));
        assert!(r.text.ends_with("====="), "{}", r.text);
        let ubsan = "UBSAN: shift-out-of-bounds in lib/foo.c:12:3\nshift exponent 70 is too large\n=====\n";
        assert_eq!(find(ubsan)[0].title, "UBSAN: shift-out-of-bounds in lib/foo.c");
        let kfence = "BUG: KFENCE: out-of-bounds read in bar_fn+0x1/0x2\n=====\n";
        assert_eq!(find(kfence)[0].title, "KFENCE: out-of-bounds read in bar_fn");
    }

    #[test]
    fn every_report_kind_is_recognized() {
        let cases = [
            ("WARNING: possible circular locking dependency detected\nCall Trace:\n lock_acquire+0x1/0x2\n f_a+0x1/0x2\n", "lockdep", "possible deadlock in lock_acquire"),
            ("watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [sh:1]\nCall Trace:\n spin_f+0x1/0x2\n", "soft_lockup", "BUG: soft lockup in spin_f"),
            ("rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:\n", "rcu_stall", "INFO: rcu detected stall"),
            ("INFO: task kworker/0:1:12 blocked for more than 120 seconds.\nCall Trace:\n schedule+0x1/0x2\n wait_x+0x1/0x2\n", "hung_task", "INFO: task hung in schedule"),
            ("BUG: kernel NULL pointer dereference, address: 0000000000000000\nCall Trace:\n null_f+0x1/0x2\n", "bug", "BUG: kernel NULL pointer dereference in null_f"),
            ("general protection fault, probably for non-canonical address 0xdead: 0000 [#1] SMP\nRIP: 0010:gp_f+0x1/0x2\nCall Trace:\n gp_f+0x1/0x2\n", "oops", "general protection fault in gp_f"),
            ("Kernel panic - not syncing: Attempted to kill init!\n", "panic", "Kernel panic - not syncing: Attempted to kill init!"),
        ];
        for (log, kind, title) in cases {
            let found = find(log);
            assert_eq!(found.len(), 1, "{log}");
            assert_eq!((found[0].kind, found[0].title.as_str()), (kind, title), "{log}");
        }
    }

    #[test]
    fn two_reports_in_a_row_are_two() {
        let log = format!("{WARNING}{WARNING}");
        assert_eq!(find(&log).len(), 2);
    }
}
