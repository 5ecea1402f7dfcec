//! Choosing a backend by name or automatically (`auto`: the first whose pre-flight passes,
//! in the order the caller gives, which is per OS).

use crate::error::{Error, Result};
use crate::hypervisor::Hypervisor;

/// The backend names the tool knows.
pub const BACKENDS: &[&str] = &["qemu", "bhyve", "multipass"];

/// The `auto` order for this host's OS: native hypervisors first.
pub fn auto_order() -> &'static [&'static str] {
    if cfg!(any(target_os = "freebsd", target_os = "illumos", target_os = "solaris")) {
        &["bhyve", "qemu"]
    } else if cfg!(target_os = "macos") {
        &["multipass", "qemu"]
    } else {
        &["qemu", "multipass"]
    }
}

/// Pick from `candidates` (already in `auto` order). A named backend is used as is (its own
/// errors say what is missing); `auto` runs each pre-flight and takes the first that passes.
pub async fn choose(requested: &str, candidates: Vec<Box<dyn Hypervisor>>) -> Result<Box<dyn Hypervisor>> {
    if requested != "auto" {
        if !BACKENDS.contains(&requested) {
            return Err(Error::usage(format!(
                "unknown backend `{requested}`; use one of auto, {}",
                BACKENDS.join(", ")
            )));
        }
        return candidates
            .into_iter()
            .find(|c| c.name() == requested)
            .ok_or_else(|| Error::preflight(format!("backend `{requested}` is not available on this OS")));
    }
    let mut reasons = Vec::new();
    for c in candidates {
        let pf = c.preflight().await;
        match pf.first_failure() {
            None => return Ok(c),
            // One reason per backend, without the fix: `vmtest doctor` shows the fixes.
            Some(check) if check.name == c.name() => reasons.push(format!("{}: {}", c.name(), check.detail)),
            Some(check) => reasons.push(format!("{}: {}: {}", c.name(), check.name, check.detail)),
        }
    }
    Err(Error::preflight(format!(
        "no backend can run here ({}); run `vmtest doctor` for the fixes",
        reasons.join("; ")
    )))
}
