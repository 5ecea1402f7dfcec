//! What a real FreeBSD or illumos host does that a kind fake would not (reference
//! real-hosts.md): root-only nmdm nodes, no boot without firmware or bhyveload, sudo as the
//! parent of bhyve, vmm and nmdm found with kldstat, the clone's size and the guest's name.

mod common;

use backend_bhyve::config::Flavor;
use backend_bhyve::host::Privilege;
use common::{in_order, FakeHost};
use std::time::{Duration, Instant};
use vmtest_core::exec::ExecRequest;
use vmtest_core::hypervisor::CheckStatus;
use vmtest_core::protocol::ExitStatus;
use vmtest_core::spec::{BootSpec, VmSpec};
use vmtest_core::state::{RunDir, StateDir};
use vmtest_core::{ErrorKind, Hypervisor, Preflight};

fn spec(run: &RunDir) -> VmSpec {
    let mut s = VmSpec::new(run.vm_name("vm"), "vm");
    s.boot = BootSpec::Image { name: "img1".into() };
    s.boot_timeout = Duration::from_secs(20);
    s
}

fn status_of(pf: &Preflight, name: &str) -> (CheckStatus, String) {
    let c = pf.checks.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no `{name}` check: {pf:?}"));
    (c.status, format!("{} / {}", c.detail, c.fix.clone().unwrap_or_default()))
}

fn dataset_props(fh: &FakeHost, ds: &str) -> serde_json::Value {
    let s: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fh.state().join("state.json")).unwrap()).unwrap();
    s["datasets"][ds]["props"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nmdm_console_is_opened_through_the_privilege_prefix() {
    let fh = FakeHost::new(Flavor::FreeBsd, &[]);
    let be = fh.backend(fh.config(Privilege::Sudo));
    fh.import(&be, "img1").await;
    let run = StateDir::at(fh.dir.path().join("state")).create_run().unwrap();
    let vm = be.launch(&spec(&run), &run).await.unwrap();
    let b = fh.dev().join(format!("nmdm-{}.1B", vm.name()));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&b).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the fake's nmdm node is root's, as the real one");
    let through_sudo =
        fh.commands().into_iter().any(|c| c[0] == "sudo" && c.iter().any(|a| a == &b.display().to_string()));
    assert!(through_sudo, "the B side was not opened through sudo: {:#?}", fh.commands());
    let out = vm.exec(ExecRequest::shell("echo console works")).await.unwrap();
    assert_eq!(out.stdout_lossy(), "console works\n");
    vm.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_finds_vmm_and_nmdm_with_kldstat_on_freebsd_14_and_15() {
    // FreeBSD 14: no /dev/vmmctl, and /dev/vmm/ only while a VM exists.
    let fh = FakeHost::new(Flavor::FreeBsd, &[]);
    std::fs::remove_file(fh.dev().join("vmmctl")).unwrap();
    let be = fh.backend(fh.config(Privilege::Sudo));
    let pf = be.preflight().await;
    assert_eq!(status_of(&pf, "vmm").0, CheckStatus::Ok, "{pf:?}");
    assert_eq!(status_of(&pf, "nmdm").0, CheckStatus::Ok, "{pf:?}");
    // Neither module loaded.
    fh.set_env(&[("FAKE_KLD_MODULES", "")]);
    let pf = be.preflight().await;
    let (st, text) = status_of(&pf, "vmm");
    assert_eq!(st, CheckStatus::Fail, "{pf:?}");
    assert!(text.contains("kldload vmm"), "{text}");
    let (st, text) = status_of(&pf, "nmdm");
    assert_eq!(st, CheckStatus::Fail, "{pf:?}");
    assert!(text.contains("kldload nmdm"), "{text}");
    // FreeBSD 15: /dev/vmmctl says vmm is there; nmdm still needs its module.
    std::fs::write(fh.dev().join("vmmctl"), b"").unwrap();
    fh.set_env(&[("FAKE_KLD_MODULES", "vmm")]);
    let pf = be.preflight().await;
    assert_eq!(status_of(&pf, "vmm").0, CheckStatus::Ok, "{pf:?}");
    assert_eq!(status_of(&pf, "nmdm").0, CheckStatus::Fail, "{pf:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_bootrom_fails_preflight_and_launch() {
    for flavor in [Flavor::FreeBsd, Flavor::Illumos] {
        let fh = FakeHost::new(flavor, &[]);
        let mut cfg = fh.config(Privilege::None);
        cfg.bootrom = Some(fh.dir.path().join("no-such.fd").display().to_string());
        let be = fh.backend(cfg);
        fh.import(&be, "img1").await;
        let pf = be.preflight().await;
        let (st, text) = status_of(&pf, "bootrom");
        assert_eq!(st, CheckStatus::Fail, "{pf:?}");
        assert!(text.contains("no-such.fd") && text.contains("VMTEST_BHYVE_BOOTROM"), "{text}");
        let run = StateDir::at(fh.dir.path().join("state")).create_run().unwrap();
        let err = be.launch(&spec(&run), &run).await.err().expect("no firmware: no launch");
        assert_eq!(err.kind(), ErrorKind::Preflight, "{err}");
        assert!(fh.vmm().is_empty() && !fh.commands().iter().any(|c| c[0] == "bhyve"));
    }
}

#[test]
fn the_fake_bhyve_without_firmware_or_bhyveload_cannot_boot() {
    let fh = FakeHost::new(Flavor::FreeBsd, &[]);
    let out =
        fh.tool("bhyve", &["-c", "1", "-m", "256M", "-s", "0,hostbridge", "-l", "com1,stdio", "vmt-x-vm"]);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "virtual machine cannot be booted\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freebsd_without_firmware_loads_the_guest_with_bhyveload() {
    let fh = FakeHost::new(Flavor::FreeBsd, &[]);
    let mut cfg = fh.config(Privilege::None);
    cfg.bootrom = None;
    let be = fh.backend(cfg);
    fh.import(&be, "img1").await;
    let run = StateDir::at(fh.dir.path().join("state")).create_run().unwrap();
    let vm = be.launch(&spec(&run), &run).await.unwrap_or_else(|e| panic!("{e}: {:?}", e.detail()));
    let out = vm.exec(ExecRequest::shell("exit 3")).await.unwrap();
    assert_eq!(out.status, ExitStatus::Code(3));
    let cmds = fh.commands();
    let load = cmds.iter().position(|c| c[0] == "bhyveload").expect("bhyveload ran");
    let boot = cmds.iter().position(|c| c[0] == "bhyve").expect("bhyve ran");
    assert!(load < boot, "{cmds:#?}");
    assert!(cmds[load].windows(2).any(|w| w == ["-m", "512M"]), "{:?}", cmds[load]);
    assert!(!cmds[boot].iter().any(|a| a.starts_with("bootrom,")), "{:?}", cmds[boot]);
    vm.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teardown_through_sudo_destroys_the_vm_and_never_orphans_bhyve() {
    // A guest that ignores the power button: bhyve does not end on TERM.
    let fh = FakeHost::new(Flavor::FreeBsd, &[("FAKE_GUEST_NO_ACPI", "1")]);
    let mut cfg = fh.config(Privilege::Sudo);
    cfg.stop_grace = Duration::from_millis(300);
    let be = fh.backend(cfg);
    fh.import(&be, "img1").await;
    let run = StateDir::at(fh.dir.path().join("state")).create_run().unwrap();
    let vm = be.launch(&spec(&run), &run).await.unwrap();
    let name = vm.name().to_owned();
    vm.shutdown().await.unwrap();
    assert!(fh.vmm().is_empty(), "the kernel VM is left: {:?}", fh.vmm());
    let exits = fh.state().join("bhyve-exits.jsonl");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(&exits).unwrap_or_default().contains(&name) {
        assert!(Instant::now() < deadline, "bhyve for {name} is still running after teardown");
        std::thread::sleep(Duration::from_millis(50));
    }
    let line: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&exits).unwrap().lines().last().unwrap()).unwrap();
    assert_eq!(line["orphaned"], false, "sudo was killed while bhyve still ran");
    let cmds = fh.commands();
    assert!(in_order(&cmds, &[&["bhyvectl", &format!("--vm={name}"), "--destroy"]]), "{cmds:#?}");
    assert!(!cmds.iter().any(|c| c.iter().any(|a| a == "-KILL")), "{cmds:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clone_gets_the_disk_size_and_the_guest_its_node_name() {
    let fh = FakeHost::new(Flavor::FreeBsd, &[]);
    let mut cfg = fh.config(Privilege::None);
    cfg.disk_bytes = 64 << 20;
    let be = fh.backend(cfg.clone());
    fh.import(&be, "img1").await;
    let run = StateDir::at(fh.dir.path().join("state")).create_run().unwrap();
    let vm = be.launch(&spec(&run), &run).await.unwrap();
    let ds = format!("tank/vmtest/run/{}/{}", run.id(), vm.name());
    let props = dataset_props(&fh, &ds);
    assert_eq!(props["volsize"].as_str(), Some("67108864"), "{props}");
    assert_eq!(props["sync"].as_str(), Some("disabled"), "{props}");
    let disk = fh.dev().join("zvol").join(&ds);
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 64 << 20);
    let named = std::fs::read_to_string(fh.state().join(format!("guest-{}/hostname", vm.name()))).unwrap();
    assert_eq!(named.trim(), "vm");
    vm.shutdown().await.unwrap();
    // Smaller than the image: never shrunk (that would cut the guest's filesystem).
    let mut small = cfg;
    small.disk_bytes = 1 << 20;
    let be = fh.backend(small);
    let run = StateDir::at(fh.dir.path().join("state")).create_run().unwrap();
    let vm = be.launch(&spec(&run), &run).await.unwrap();
    let ds = format!("tank/vmtest/run/{}/{}", run.id(), vm.name());
    let size = std::fs::metadata(fh.dev().join("zvol").join(&ds)).unwrap().len();
    assert_eq!(size, 3 << 20, "the clone was shrunk");
    vm.shutdown().await.unwrap();
}
