use super::*;
use std::path::PathBuf;
use std::time::Duration;

fn problems(text: &str) -> Vec<String> {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("t.toml");
    let e = parse(&path, text).unwrap_err();
    let all = e.detail().map(str::to_owned).unwrap_or_else(|| e.message().to_owned());
    let prefix = format!("{}:", path.display());
    all.lines().map(|l| l.strip_prefix(&prefix).unwrap_or(l).to_owned()).collect()
}

#[test]
fn a_backend_without_networks_or_kernels_refuses_what_needs_them_by_line() {
    let tmp = tempfile::tempdir().unwrap();
    let kernel = tmp.path().join("vmlinuz");
    std::fs::write(&kernel, "k").unwrap();
    let text = format!(
        r#"[test]
backend = "multipass"
[nodes.a]
[nodes.b]
networks = [2]
[nodes.c]
kernel = "{}"
[networks.2]
loss = 5
[[step]]
on = "a"
succeed = "true"
[[step]]
heal = true
[[step]]
on = "b"
block = true
"#,
        kernel.display()
    );
    let path = tmp.path().join("t.toml");
    let file = parse(&path, &text).unwrap();
    assert_eq!(file.backend.as_deref(), Some("multipass"));
    let none = BackendTraits {
        name: "multipass",
        private_networks: false,
        boots_kernels: false,
        checkpoints: false,
    };
    let e = file.check_backend(none).unwrap_err();
    let prefix = format!("{}:", path.display());
    let lines: Vec<String> =
        e.detail().unwrap().lines().map(|l| l.strip_prefix(&prefix).unwrap_or(l).to_owned()).collect();
    assert_eq!(
        lines,
        [
            "4: node `b` joins network 2, but the multipass backend has no private networks; use the qemu \
             backend or `networks = []`",
            "6: node `c`: the multipass backend boots images, not a `kernel`",
            "8: [networks.2]: the multipass backend has no private networks",
            "14: heal: the multipass backend has no private networks to fault",
            "17: block: the multipass backend has no private networks to fault",
        ]
    );
    // Node `a` keeps the default network: fine anywhere.
    let qemu = BackendTraits { name: "qemu", private_networks: true, boots_kernels: true, checkpoints: true };
    file.check_backend(qemu).unwrap();
}

#[test]
fn backend_is_one_per_test_and_its_name_is_checked_against_the_known_ones() {
    assert_eq!(
        problems("[test]\nbackend = \"vbox\"\n[nodes.a]\nbackend = \"qemu\"\n[[step]]\non = \"a\"\nsucceed = \"true\"\n"),
        ["4: node `a`: `backend` is set for the whole test, in [test] (one backend runs every node)"]
    );
    // The core knows no backend by name: the caller says which exist.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("t.toml");
    let file =
        parse(&path, "[test]\nbackend = \"vbox\"\n[nodes.a]\n[[step]]\non = \"a\"\nsucceed = \"true\"\n")
            .unwrap();
    assert_eq!((file.backend.as_deref(), file.backend_line), (Some("vbox"), 2));
    let e = file.check_backend_names(&["qemu", "bhyve", "multipass", "auto"]).unwrap_err();
    assert_eq!(
        e.message(),
        format!("{}:2: unknown backend `vbox`; expected one of qemu, bhyve, multipass, auto", path.display())
    );
    file.check_backend_names(&["vbox"]).unwrap();
}

#[test]
fn a_good_file_parses_with_defaults_and_overrides() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("index.html"), "hi").unwrap();
    let text = r#"
[test]
name = "web"
step_timeout = "30s"

[defaults]
memory = "256M"

[nodes.server]
cpus = 2
files = [{ src = "index.html", dst = "/srv/index.html" }]

[nodes.client]
memory = "1G"

[networks.1]
delay = "5ms"

[[step]]
on = "*"
succeed = "true"

[[step]]
subtest = "fetch"
on = ["client"]
wait_until_succeeds = "curl http://server/"
expect_stdout = "hi"
timeout = "10s"

[[step]]
subtest = "fetch"
partition = [["client"], ["server"]]

[[step]]
loss = 50
link = ["client", "server"]
"#;
    let f = parse(&tmp.path().join("web.toml"), text).unwrap();
    assert_eq!(f.name, "web");
    assert_eq!(f.step_timeout, Duration::from_secs(30));
    let server = f.nodes.iter().find(|n| n.name == "server").unwrap();
    assert_eq!((server.cpus, server.memory_mib, server.networks.clone()), (2, 256, vec![1]));
    assert_eq!(server.files, vec![(tmp.path().join("index.html"), PathBuf::from("/srv/index.html"))]);
    let client = f.nodes.iter().find(|n| n.name == "client").unwrap();
    assert_eq!(client.memory_mib, 1024);
    assert_eq!(f.steps.len(), 4);
    assert_eq!(f.steps[0].on, Target::Nodes(vec!["server".into(), "client".into()]));
    assert_eq!(f.steps[1].line, 26, "a step is placed at its action");
    assert_eq!(f.steps[1].timeout, Some(Duration::from_secs(10)));
    assert_eq!(f.steps[2].action, Action::Partition(vec![vec!["client".into()], vec!["server".into()]]));
    assert_eq!(f.steps[2].on, Target::None);
    assert_eq!(
        f.steps[3].action,
        Action::Loss { percent: 50.0, link: Some(("client".into(), "server".into())) }
    );
    assert_eq!(f.subtests(), vec!["fetch".to_owned()]);
    assert_eq!(f.networks[&1].delay, Duration::from_millis(5));
}

#[test]
fn every_problem_is_reported_with_its_line() {
    let text = r#"[test]
timeout = "ten minutes"

[nodes.server]
memory = "lots"

[nodes.client]
image = "images/debian.qcow2"
files = [{ src = "missing.html", dst = "/x" }]

[[step]]
on = "sever"
succeed = "true"

[[step]]
on = "client"
suceed = "true"

[[step]]
on = "client"
succeed = "a"
fail = "b"

[[step]]
partition = [["client"], ["ghost"]]

[[step]]
on = "client"
wait_until_succeeds = "x"
timeout = "5 parsecs"
"#;
    let p = problems(text);
    let expect = [
        "2: `timeout`: bad duration `ten minutes`",
        "5: `memory`: bad memory size `lots`",
        "8: node `client`: `image` must name a built image",
        "9: file `missing.html` does not exist",
        "12: unknown node `sever` (nodes: server, client)",
        "17: unknown action or key `suceed` in step; did you mean `succeed`?",
        "21: step has 2 actions (succeed, fail); give one per step",
        "25: unknown node `ghost`",
        "30: `timeout`: bad duration `5 parsecs`",
    ];
    for (want, got) in expect.iter().zip(&p) {
        assert!(got.starts_with(want), "want {want:?}\n got {got:?}\nall: {p:#?}");
    }
    assert_eq!(p.len(), expect.len(), "{p:#?}");
}

#[test]
fn toml_syntax_errors_and_duplicates_have_lines() {
    let p = problems("[nodes.a]\n[nodes.a]\n");
    assert!(p[0].starts_with("2:") && p[0].contains("duplicate"), "{p:?}");
    let p = problems("[nodes.a]\ncpus = \n");
    assert!(p[0].starts_with("2:"), "{p:?}");
    let p = problems(
        "[nodes.a]\n[[step]]\nsubtest = \"x\"\non = \"a\"\nsucceed = \"true\"\n[[step]]\nsubtest = \"y\"\non = \"a\"\nsucceed = \"true\"\n[[step]]\nsubtest = \"x\"\non = \"a\"\nsucceed = \"true\"\n",
    );
    assert!(p[0].starts_with("13:") && p[0].contains("duplicate subtest `x` (already used on line"), "{p:?}");
}

#[test]
fn network_actions_refuse_on_and_node_actions_need_it() {
    let p = problems("[nodes.a]\n[[step]]\nheal = true\non = \"a\"\n[[step]]\nsucceed = \"x\"\n[[step]]\nblock = 1\non = \"a\"\n");
    assert!(p.iter().any(|l| l.starts_with("4:") && l.contains("remove `on`")), "{p:?}");
    assert!(p.iter().any(|l| l.starts_with("6:") && l.contains("add `on")), "{p:?}");
    assert!(p.iter().any(|l| l.starts_with("8:") && l.contains("block = true")), "{p:?}");
}

#[test]
fn a_node_may_name_its_kernels_modules_relative_to_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("linux/.vmtest-modules")).unwrap();
    let path = tmp.path().join("t.toml");
    let text = "[defaults]\nmodules = \"linux/.vmtest-modules\"\n[nodes.a]\n[nodes.b]\nmodules = \"nope\"\n\
                [[step]]\non = \"a\"\nsucceed = \"true\"\n";
    let e = parse(&path, text).unwrap_err();
    let all = e.detail().map(str::to_owned).unwrap_or_else(|| e.message().to_owned());
    assert!(all.contains(":5: modules `nope` is not a directory"), "{all}");
    let file = parse(&path, &text.replace("modules = \"nope\"\n", "")).unwrap();
    assert_eq!(file.nodes[1].modules, Some(tmp.path().join("linux/.vmtest-modules")));
    let e = file
        .check_backend(BackendTraits {
            name: "multipass",
            private_networks: true,
            boots_kernels: false,
            checkpoints: false,
        })
        .unwrap_err();
    assert!(e
        .detail()
        .unwrap()
        .contains("the multipass backend boots images, which bring their own `modules`"));
}

#[test]
fn a_checkpoint_and_subtests_from_it_parse() {
    let tmp = tempfile::tempdir().unwrap();
    let text = "[defaults]\nimage = \"web\"\n[nodes.a]\n\
                [[step]]\non = \"a\"\nsucceed = \"setup\"\ncheckpoint = \"ready\"\n\
                [[step]]\nsubtest = \"one\"\nfrom = \"ready\"\non = \"a\"\nsucceed = \"x\"\n\
                [[step]]\nsubtest = \"one\"\nfrom = \"ready\"\non = \"a\"\nsucceed = \"y\"\n\
                [[step]]\non = \"a\"\nsucceed = \"main line\"\n";
    let f = parse(&tmp.path().join("t.toml"), text).unwrap();
    let (i, st) = f.checkpoint().unwrap();
    assert_eq!((i, st.checkpoint_name(), st.line), (0, Some("ready"), 6));
    assert_eq!(f.checkpoint_mark().map(|m| m.line), Some(7), "the checkpoint is where its key is");
    assert_eq!(f.steps[1].from_name(), Some("ready"));
    assert_eq!(f.steps[3].from, None);
    let no_saves =
        BackendTraits { name: "multipass", private_networks: true, boots_kernels: false, checkpoints: false };
    let e = f.check_backend(no_saves).unwrap_err();
    assert_eq!(
        e.message(),
        format!(
            "{}:7: checkpoint `ready`: the multipass backend cannot save guests; use the qemu backend, or \
             remove `checkpoint` and `from`",
            f.path.display()
        )
    );
}

#[test]
fn checkpoint_and_from_rules_are_checked_with_lines() {
    let text = r#"[defaults]
image = "web"
[nodes.a]
[[step]]
subtest = "early"
from = "ready"
on = "a"
succeed = "x"
[[step]]
on = "a"
succeed = "setup"
checkpoint = "ready"
[[step]]
on = "a"
succeed = "more"
checkpoint = "again"
[[step]]
on = "a"
succeed = "z"
checkpoint = "ready"
[[step]]
from = "ready"
on = "a"
succeed = "no subtest"
[[step]]
subtest = "mixed"
from = "ready"
on = "a"
succeed = "1"
[[step]]
subtest = "mixed"
on = "a"
succeed = "2"
[[step]]
subtest = "ghost"
from = "nope"
on = "a"
succeed = "3"
[[step]]
on = "a"
succeed = "4"
checkpoint = "bad name!"
"#;
    let p = problems(text);
    let expect = [
        "6: `from = \"ready\"` names no checkpoint of an earlier step; add `checkpoint = \"ready\"` to a step \
         before this subtest",
        "16: a second checkpoint `again`: a test file has one (`ready`, line 12)",
        "20: duplicate checkpoint `ready` (already on line 12)",
        "22: `from = \"ready\"` goes on the steps of a subtest: add `subtest = \"NAME\"`",
        "33: this step of subtest `mixed` has no `from`, but its first step (line 27) has `from = \"ready\"`; \
         every step of a subtest starts from the same checkpoint",
        "36: `from = \"nope\"` names no checkpoint of an earlier step",
        "42: bad checkpoint name `bad name!` in `checkpoint`",
    ];
    for (want, got) in expect.iter().zip(&p) {
        assert!(got.starts_with(want), "want {want:?}\n got {got:?}\nall: {p:#?}");
    }
    assert_eq!(p.len(), expect.len(), "{p:#?}");
}

#[test]
fn kernel_mode_nodes_cannot_be_checkpointed() {
    let text = "[nodes.web]\nimage = \"web\"\n[nodes.host]\n[nodes.other]\n\
                [[step]]\non = \"web\"\nsucceed = \"setup\"\ncheckpoint = \"ready\"\n";
    assert_eq!(
        problems(text),
        ["8: checkpoint `ready`: node(s) `host`, `other` run in kernel mode (no `image`), on the host's root \
          shared over 9p, which cannot be saved (QEMU does not migrate 9p); give them an `image` (`vmtest image \
          build`)"]
    );
}
