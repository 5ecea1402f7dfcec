//! A checkpoint's key: a digest of everything its saved guests depend on, so that a changed
//! input makes a new checkpoint instead of restoring a stale one.

use crate::error::{Error, Result};
use crate::hypervisor::Hypervisor;
use crate::spec::VmSpec;
use crate::testfile::{Action, NetDef, TestFile};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The key of `file`'s checkpoint for nodes of `specs`: [`material`] and each node's state
/// identity (hypervisor, kernel, image and vmtest versions, as the backend knows them).
pub async fn key(hv: &dyn Hypervisor, file: &TestFile, specs: &[VmSpec]) -> Result<String> {
    let mut text = material(file)?;
    for spec in specs {
        let id = hv.state_identity(spec).await?;
        text.push_str(&format!("identity {}: {id}\n", spec.node));
    }
    Ok(hex(&Sha256::digest(text.as_bytes())))
}

/// What the file puts into its checkpoint's key, as text: vmtest's version, `[test]`, the
/// nodes (defaults applied) with the content of the files they get, the networks, and the
/// steps up to and including the checkpoint's, with the content of the files they copy in.
/// Lines are left out, so a comment or a blank line changes nothing; steps after the
/// checkpoint are left out, so editing them reuses it.
pub fn material(file: &TestFile) -> Result<String> {
    let Some((last, _)) = file.checkpoint() else {
        return Err(Error::usage(format!("{} has no checkpoint", file.path.display())));
    };
    let mut t = format!("vmtest {}\n", env!("CARGO_PKG_VERSION"));
    t.push_str(&format!(
        "test name={:?} timeout={:?} step_timeout={:?} backend={:?}\n",
        file.name, file.timeout, file.step_timeout, file.backend
    ));
    let mut nodes: Vec<_> = file.nodes.iter().collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    for n in nodes {
        let mut n = n.clone();
        n.line = 0;
        let files = std::mem::take(&mut n.files);
        t.push_str(&format!("node {n:?}\n"));
        for (src, dst) in files {
            t.push_str(&format!("  file {:?} {}\n", dst, content_digest(&src)?));
        }
    }
    for (id, net) in &file.networks {
        t.push_str(&format!("network {id} {:?}\n", NetDef { line: 0, ..*net }));
    }
    for st in &file.steps[..=last] {
        let mut st = st.clone();
        st.line = 0;
        for mark in st.checkpoint.iter_mut().chain(st.from.iter_mut()) {
            mark.line = 0;
        }
        if let Action::CopyTo { src, .. } = &mut st.action {
            *src = PathBuf::from(content_digest(src)?);
        }
        t.push_str(&format!("step {st:?}\n"));
    }
    Ok(t)
}

/// The digest of a host file's content, or of a directory's names and contents.
fn content_digest(path: &Path) -> Result<String> {
    let mut h = Sha256::new();
    add_content(&mut h, path)?;
    Ok(hex(&h.finalize()))
}

fn add_content(h: &mut Sha256, path: &Path) -> Result<()> {
    let cannot = |e| Error::io(format!("cannot read {} for the checkpoint's key", path.display()), e);
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(cannot)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .map_err(cannot)?;
        entries.sort();
        for e in entries {
            h.update(format!("entry {:?}\n", e.file_name().unwrap_or_default()).as_bytes());
            add_content(h, &e)?;
        }
        return Ok(());
    }
    let mut f = std::fs::File::open(path).map_err(cannot)?;
    std::io::copy(&mut f, h).map_err(cannot)?;
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
