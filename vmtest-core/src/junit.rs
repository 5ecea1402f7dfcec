//! JUnit XML for CI: one `<testsuite>` per test file, one `<testcase>` per subtest.

use std::fmt::Write;
use std::time::Duration;

/// How one case ended.
#[derive(Clone, Debug, PartialEq)]
pub enum CaseStatus {
    Passed,
    /// The message (one line) and the detail (output, console tail).
    Failed {
        message: String,
        detail: String,
    },
    /// Not run: filtered out, or an earlier step failed.
    Skipped {
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Case {
    pub name: String,
    pub time: Duration,
    pub status: CaseStatus,
    /// What the steps printed (shown as `<system-out>`).
    pub log: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Suite {
    pub name: String,
    pub file: String,
    pub time: Duration,
    pub cases: Vec<Case>,
}

/// Escape text for XML attributes and bodies; drop characters XML 1.0 forbids.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 => {}
            c => out.push(c),
        }
    }
    out
}

/// The whole report.
pub fn render(suites: &[Suite]) -> String {
    let count =
        |f: fn(&CaseStatus) -> bool| suites.iter().flat_map(|s| &s.cases).filter(|c| f(&c.status)).count();
    let tests: usize = suites.iter().map(|s| s.cases.len()).sum();
    let failures = count(|s| matches!(s, CaseStatus::Failed { .. }));
    let skipped = count(|s| matches!(s, CaseStatus::Skipped { .. }));
    let total: f64 = suites.iter().map(|s| s.time.as_secs_f64()).sum();
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        x,
        "<testsuites name=\"vmtest\" tests=\"{tests}\" failures=\"{failures}\" errors=\"0\" skipped=\"{skipped}\" time=\"{total:.3}\">"
    );
    for s in suites {
        let f = s.cases.iter().filter(|c| matches!(c.status, CaseStatus::Failed { .. })).count();
        let sk = s.cases.iter().filter(|c| matches!(c.status, CaseStatus::Skipped { .. })).count();
        let _ = writeln!(
            x,
            "  <testsuite name=\"{}\" file=\"{}\" tests=\"{}\" failures=\"{f}\" errors=\"0\" skipped=\"{sk}\" time=\"{:.3}\">",
            escape(&s.name),
            escape(&s.file),
            s.cases.len(),
            s.time.as_secs_f64()
        );
        for c in &s.cases {
            let _ = write!(
                x,
                "    <testcase name=\"{}\" classname=\"{}\" time=\"{:.3}\"",
                escape(&c.name),
                escape(&s.name),
                c.time.as_secs_f64()
            );
            let body = match &c.status {
                CaseStatus::Passed => String::new(),
                CaseStatus::Failed { message, detail } => {
                    format!("      <failure message=\"{}\">{}</failure>\n", escape(message), escape(detail))
                }
                CaseStatus::Skipped { reason } => {
                    format!("      <skipped message=\"{}\"/>\n", escape(reason))
                }
            };
            let out = if c.log.is_empty() {
                String::new()
            } else {
                format!("      <system-out>{}</system-out>\n", escape(&c.log))
            };
            if body.is_empty() && out.is_empty() {
                x.push_str("/>\n");
            } else {
                let _ = write!(x, ">\n{body}{out}    </testcase>\n");
            }
        }
        x.push_str("  </testsuite>\n");
    }
    x.push_str("</testsuites>\n");
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_cases_with_escaping_and_counts() {
        let suite = Suite {
            name: "web".into(),
            file: "web.toml".into(),
            time: Duration::from_millis(1500),
            cases: vec![
                Case {
                    name: "ok".into(),
                    time: Duration::from_secs(1),
                    status: CaseStatus::Passed,
                    log: String::new(),
                },
                Case {
                    name: "bad <one>".into(),
                    time: Duration::ZERO,
                    status: CaseStatus::Failed { message: "a \"quote\"".into(), detail: "x & y\u{1}".into() },
                    log: "out".into(),
                },
                Case {
                    name: "later".into(),
                    time: Duration::ZERO,
                    status: CaseStatus::Skipped { reason: "filtered".into() },
                    log: String::new(),
                },
            ],
        };
        let x = render(&[suite]);
        assert!(x.contains("tests=\"3\" failures=\"1\" errors=\"0\" skipped=\"1\""), "{x}");
        assert!(x.contains("<testcase name=\"ok\" classname=\"web\" time=\"1.000\"/>"), "{x}");
        assert!(x.contains("name=\"bad &lt;one&gt;\""), "{x}");
        assert!(x.contains("<failure message=\"a &quot;quote&quot;\">x &amp; y</failure>"), "{x}");
        assert!(x.contains("<skipped message=\"filtered\"/>"), "{x}");
        assert!(x.contains("<system-out>out</system-out>"), "{x}");
    }
}
