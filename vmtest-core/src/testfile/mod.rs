//! Declarative multi-VM test files (TOML): nodes, networks and ordered steps.
//!
//! ```toml
//! [test]
//! name = "web"            # default: the file's stem
//! timeout = "10m"         # the whole test
//! step_timeout = "2m"     # default deadline of each step
//! backend = "qemu"        # a name the caller knows (vmtest: qemu | bhyve | multipass | auto)
//!
//! [defaults]              # every node: cpus, memory, kernel (+ modules) | image (+ exec), networks, files, boot_timeout
//! memory = "512M"
//!
//! [nodes.server]
//! files = [{ src = "index.html", dst = "/srv/www/index.html" }]   # src: relative to this file
//! [nodes.client]
//!
//! [networks.1]            # optional: loss (percent) and delay on every link of network 1
//! delay = "10ms"
//!
//! [[step]]                # one action each; `on` = a node, a list, or "*" (in parallel)
//! on = "server"
//! succeed = "cd /srv/www && setsid python3 -m http.server 80 >/dev/null 2>&1 &"
//! [[step]]
//! subtest = "fetch"       # consecutive steps with one subtest name form a JUnit case
//! on = "client"
//! wait_until_succeeds = "curl -fsS http://server/"
//! expect_stdout = "hello" # a regex over the action's stdout
//! timeout = "30s"
//! checkpoint = "ready"    # once it passed, save every node; later runs start from here
//! [[step]]
//! subtest = "isolated"
//! from = "ready"          # this subtest runs on its own copy of the nodes, from `ready`
//! on = "client"
//! succeed = "rm -rf /srv"
//! ```
//!
//! The whole file is checked before anything boots, and every problem is reported as
//! `FILE:LINE: message`.

mod check;
mod checkpoints;
mod schema;
mod spans;
#[cfg(test)]
mod tests;

pub use schema::{Action, BackendTraits, Mark, NetDef, NodeDef, Step, Target, TestFile, ACTIONS};

use crate::error::{Error, Result};
use std::path::Path;

/// Read and check a test file. Every problem is reported, each as `FILE:LINE: message`,
/// in one usage error.
pub fn load(path: &Path) -> Result<TestFile> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::usage(format!("cannot read test file {}: {e}", path.display())))?;
    parse(path, &text)
}

/// Check `text` as the test file at `path` (relative paths in it are resolved against
/// `path`'s directory).
pub fn parse(path: &Path, text: &str) -> Result<TestFile> {
    let top = spans::read(text).map_err(|(line, msg)| check::report(path, vec![(line, msg)]))?;
    check::file(path, &top)
}
