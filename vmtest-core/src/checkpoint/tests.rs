use super::*;
use crate::testfile;

const FILE: &str = r#"[defaults]
image = "web"
[nodes.server]
files = [{ src = "index.html", dst = "/srv/index.html" }]
[nodes.client]
[[step]]
on = "server"
succeed = "start-server"
[[step]]
on = "client"
copy_to = { src = "conf", dst = "/etc/conf" }
checkpoint = "ready"
[[step]]
subtest = "later"
on = "client"
succeed = "curl server"
"#;

/// The key material of FILE with `edit` applied, in a dir with its two host files.
fn material_of(edit: impl Fn(&Path, String) -> String) -> String {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("index.html"), "hello").unwrap();
    std::fs::write(tmp.path().join("conf"), "a=1").unwrap();
    let text = edit(tmp.path(), FILE.to_owned());
    let file = testfile::parse(&tmp.path().join("t.toml"), &text).unwrap();
    material(&file).unwrap()
}

#[test]
fn the_key_covers_what_comes_before_the_checkpoint_and_nothing_after() {
    let base = material_of(|_, t| t);
    assert_eq!(base, material_of(|_, t| t), "the same file gives the same key");
    // Not part of it: a later step, comments and blank lines.
    assert_eq!(base, material_of(|_, t| t.replace("curl server", "curl -v server")));
    assert_eq!(base, material_of(|_, t| format!("# a comment\n\n{t}")));
    // Part of it: a step before, the checkpoint step, node settings, the copied files.
    assert_ne!(base, material_of(|_, t| t.replace("start-server", "start-server --fast")));
    assert_ne!(base, material_of(|_, t| t.replace("/etc/conf", "/etc/conf2")));
    assert_ne!(base, material_of(|_, t| t.replace("[nodes.client]", "[nodes.client]\nmemory = \"1G\"")));
    assert_ne!(base, material_of(|_, t| format!("[test]\nstep_timeout = \"9s\"\n{t}")));
    assert_ne!(
        base,
        material_of(|d, t| {
            std::fs::write(d.join("index.html"), "hello!").unwrap();
            t
        }),
        "a node's `files`"
    );
    assert_ne!(
        base,
        material_of(|d, t| {
            std::fs::write(d.join("conf"), "a=2").unwrap();
            t
        }),
        "a `copy_to` before the checkpoint"
    );
}

#[test]
fn a_whole_checkpoint_is_found_and_anything_else_is_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::new(tmp.path());
    assert_eq!(store.find("k1", &["a", "b"]), None);

    let mut pending = store.begin("k1").unwrap();
    let tmp_dir = pending.dir().to_owned();
    pending.node_dir("a").unwrap();
    pending.node_dir("b").unwrap();
    assert_eq!(store.find("k1", &["a", "b"]), None, "not in place before the commit");
    let dir =
        store.commit(&mut pending, "k1", &Manifest::new(Path::new("t.toml"), "ready", &["b", "a"])).unwrap();
    drop(pending);
    assert_eq!(dir, tmp.path().join("k1"));
    assert!(!tmp_dir.exists());
    assert_eq!(store.find("k1", &["b", "a"]), Some(dir.clone()));

    // Another node set: not this checkpoint, and removed.
    assert_eq!(store.find("k1", &["a"]), None);
    assert!(!dir.exists());

    // A dir without a manifest (a copy cut short, a hand-made dir) is removed.
    std::fs::create_dir_all(tmp.path().join("k2/a")).unwrap();
    assert_eq!(store.find("k2", &["a"]), None);
    assert!(!tmp.path().join("k2").exists());
}

#[test]
fn pending_dirs_go_away_unless_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::new(tmp.path().join("store"));
    let pending = store.begin("k").unwrap();
    let dir = pending.dir().to_owned();
    assert!(dir.is_dir());
    drop(pending);
    assert!(!dir.exists());

    // A dead runner's temporary dir is removed by the next look-up; a live one's stays.
    let dead = tmp.path().join(format!("store/{PENDING_PREFIX}{}-k", u32::MAX - 3));
    let live = store.begin("k").unwrap();
    std::fs::create_dir_all(&dead).unwrap();
    store.find("other", &["a"]);
    assert!(!dead.exists());
    assert!(live.dir().is_dir());

    // A run-only checkpoint is a temporary dir of its own, never committed.
    let scratch = store.scratch().unwrap();
    let other = store.scratch().unwrap();
    assert_ne!(scratch.dir(), other.dir());
    let dir = scratch.dir().to_owned();
    drop(scratch);
    assert!(!dir.exists());
}

#[test]
fn a_commit_onto_a_stored_key_leaves_the_checkpoint_to_this_run() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::new(tmp.path());
    let m = Manifest::new(Path::new("t.toml"), "ready", &["a"]);
    let mut first = store.begin("k").unwrap();
    first.node_dir("a").unwrap();
    store.commit(&mut first, "k", &m).unwrap();
    drop(first);
    assert!(tmp.path().join("k/a").is_dir(), "a stored checkpoint outlives its pending handle");
    let mut second = store.begin("k").unwrap();
    second.node_dir("a").unwrap();
    let e = store.commit(&mut second, "k", &m).unwrap_err();
    assert!(second.dir().join("a").is_dir(), "{e}");
    assert!(e.message().contains("cannot store checkpoint"), "{e}");
    let dir = second.dir().to_owned();
    drop(second);
    assert!(!dir.exists(), "an uncommitted checkpoint goes away with its handle");
}
