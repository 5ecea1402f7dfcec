//! Contract tests: the bhyve backend against the fake host tools, through the same code path
//! users run (`Hypervisor::launch`, `Vm::exec`, `run_command`, `destroy_record`, the sweep).

mod common;

use backend_bhyve::config::{Flavor, ShareMode};
use backend_bhyve::host::Privilege;
use backend_bhyve::{BhyveData, ConsoleKind};
use common::{in_order, FakeHost};
use std::path::Path;
use std::time::{Duration, Instant};
use vmtest_core::exec::ExecRequest;
use vmtest_core::protocol::ExitStatus;
use vmtest_core::spec::{BootSpec, VmSpec};
use vmtest_core::state::{ProcessId, StateDir, VmRecord};
use vmtest_core::{ErrorKind, Hypervisor};

fn spec(run: &vmtest_core::state::RunDir) -> VmSpec {
    let mut s = VmSpec::new(run.vm_name("vm"), "vm");
    s.boot = BootSpec::Image { name: "img1".into() };
    s.boot_timeout = Duration::from_secs(20);
    s
}

fn record(run: &vmtest_core::state::RunDir) -> VmRecord {
    serde_json::from_slice(&std::fs::read(run.record_path("vm")).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freebsd_launch_exec_copy_and_destroy() {
    let fh = FakeHost::new(Flavor::FreeBsd, &[("FAKE_ZVOL_DELAY_MS", "300")]);
    let be = fh.backend(fh.config(Privilege::None));
    fh.import(&be, "img1").await;
    assert!(
        in_order(
            &fh.commands(),
            &[
                &["zfs", "list", "-H", "-o", "name", "tank/vmtest/img/img1"],
                &["zfs", "create", "-p", "-V", "3145728", "-o", "volmode=dev", "tank/vmtest/img/img1"],
                &[
                    "dd",
                    &format!("if={}", fh.dir.path().join("img1.raw").display()),
                    "of=/dev/zvol/tank/vmtest/img/img1",
                    "bs=1024k"
                ],
                &["zfs", "snapshot", "tank/vmtest/img/img1@base"],
            ]
        ),
        "{:#?}",
        fh.commands()
    );
    assert_eq!(std::fs::read(fh.dev().join("zvol/tank/vmtest/img/img1")).unwrap(), vec![7u8; 3 << 20]);
    assert_eq!(be.list_images().await.unwrap(), ["img1"]);
    // Importing again is refused without force.
    let raw = fh.dir.path().join("img1.raw");
    let e = be.import_image(&raw, "img1", false).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Usage);
    assert!(e.message().contains("--force"), "{e}");
    fh.clear_commands();

    let state = StateDir::at(fh.dir.path().join("state"));
    let run = state.create_run().unwrap();
    let sp = spec(&run);
    let vm = be.launch(&sp, &run).await.unwrap();
    let vmname = sp.name.clone();
    let clone = format!("tank/vmtest/run/{}/{vmname}", run.id());
    let cmds = fh.commands();
    let owner = format!("vmtest:owner={}", run.id());
    let nmdm = format!("com1,/dev/nmdm-{vmname}.1A");
    let rom = format!("bootrom,{}", fh.bootrom().display());
    let blk = format!("2,virtio-blk,/dev/zvol/{clone}");
    let vmarg = format!("--vm={vmname}");
    assert!(
        in_order(
            &cmds,
            &[
                &["zfs", "list", "-H", "-o", "name", "tank/vmtest/img/img1@base"],
                &[
                    "zfs",
                    "clone",
                    "-p",
                    "-o",
                    &owner,
                    "-o",
                    "volmode=dev",
                    "tank/vmtest/img/img1@base",
                    &clone
                ],
                &["bhyvectl", &vmarg, "--destroy"],
                &[
                    "bhyve",
                    "-H",
                    "-P",
                    "-c",
                    "1",
                    "-m",
                    "512M",
                    "-s",
                    "0,hostbridge",
                    "-s",
                    "1,lpc",
                    "-s",
                    &blk,
                    "-l",
                    &nmdm,
                    "-l",
                    &rom,
                    &vmname
                ],
            ]
        ),
        "{cmds:#?}"
    );
    // Every teardown parameter is in the record.
    let data = BhyveData::from_record(&record(&run)).unwrap();
    assert_eq!(data.dataset, clone);
    assert_eq!(data.vm, vmname);
    assert!(data.pid.is_some());
    assert!(matches!(data.console, ConsoleKind::Nmdm { .. }));
    assert_eq!(fh.vmm(), std::slice::from_ref(&vmname));

    // Commands: argv exactly, status, stderr apart.
    let mut req =
        ExecRequest::new(["sh", "-c", "printf '%s|' \"$@\"; echo err >&2; exit 5", "sh", "a b", "it's"]);
    req.timeout = Some(Duration::from_secs(20));
    let out = vm.exec(req).await.unwrap();
    assert_eq!(out.stdout_lossy(), "a b|it's|");
    assert_eq!(out.stderr_lossy(), "err\n");
    assert_eq!(out.status, ExitStatus::Code(5));

    // Copy in (base64 over serial, cksum-checked) and out.
    let src = fh.dir.path().join("payload");
    let payload: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&src, &payload).unwrap();
    let guest = fh.dir.path().join("guest/in/payload");
    vm.copy_in(&src, &guest).await.unwrap();
    assert_eq!(std::fs::read(&guest).unwrap(), payload);
    let back = fh.dir.path().join("back");
    vm.copy_out(&guest, &back).await.unwrap();
    assert_eq!(std::fs::read(&back).unwrap(), payload);

    // The console is teed to console.log, boot banner included.
    let log = std::fs::read_to_string(run.path().join("vm/console.log")).unwrap();
    assert!(log.contains("vmtest fake freebsd guest booting"), "{log}");
    assert!(log.contains("login:"), "{log}");

    fh.clear_commands();
    vm.shutdown().await.unwrap();
    let pid = data.pid.unwrap().pid.to_string();
    assert!(
        in_order(&fh.commands(), &[&["bhyvectl", &vmarg, "--destroy"], &["zfs", "destroy", "-r", &clone]]),
        "{:#?}",
        fh.commands()
    );
    let _ = pid;
    assert!(fh.vmm().is_empty());
    assert_eq!(
        fh.datasets(),
        [
            "tank",
            "tank/vmtest",
            "tank/vmtest/img",
            "tank/vmtest/img/img1",
            "tank/vmtest/img/img1@base",
            "tank/vmtest/run"
        ]
    );
    assert!(!run.record_path("vm").exists());
    // Idempotent: a second shutdown and a destroy_record of the old record change nothing.
    vm.shutdown().await.unwrap();
    let mut rec = VmRecord::new(&vmname, "vm", run.id(), "bhyve");
    rec.backend_data = serde_json::to_value(&data).unwrap();
    be.destroy_record(&rec).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn illumos_pfexec_socket_console_vnic_9p_and_busy_retries() {
    let fh = FakeHost::new(Flavor::Illumos, &[("FAKE_DLADM_BUSY", "2"), ("FAKE_ZFS_BUSY", "0")]);
    let mut cfg = fh.config(Privilege::Pfexec);
    cfg.nic = Some("igb0".into());
    cfg.share = ShareMode::P9kp;
    let be = fh.backend(cfg);
    fh.import(&be, "img1").await;
    assert!(
        in_order(
            &fh.commands(),
            &[
                &[
                    "pfexec",
                    &fh.bin().join("zfs").display().to_string(),
                    "create",
                    "-p",
                    "-V",
                    "3145728",
                    "-o",
                    "volblocksize=4k",
                    "tank/vmtest/img/img1"
                ],
                &["zfs", "create", "-p", "-V", "3145728", "-o", "volblocksize=4k", "tank/vmtest/img/img1"],
            ]
        ),
        "{:#?}",
        fh.commands()
    );
    fh.clear_commands();
    let state = StateDir::at(fh.dir.path().join("state"));
    let run = state.create_run().unwrap();
    let sp = spec(&run);
    let vm = be.launch(&sp, &run).await.unwrap();
    let vmname = sp.name.clone();
    let clone = format!("tank/vmtest/run/{}/{vmname}", run.id());
    let vnic = format!("vmt{}vm0", run.id());
    let sock = format!("com1,socket,{}", run.path().join("vm/console.sock").display());
    let blk = format!("2,virtio-blk,/dev/zvol/rdsk/{clone}");
    let net = format!("3,virtio-net-viona,vnic={vnic}");
    let p9 = format!("4,virtio-9p,vmtest={},ro", run.path().join("vm/share").display());
    let owner = format!("vmtest:owner={}", run.id());
    let cmds = fh.commands();
    assert!(
        in_order(
            &cmds,
            &[
                &["zfs", "clone", "-p", "-o", &owner, "tank/vmtest/img/img1@base", &clone],
                &["dladm", "create-vnic", "-t", "-l", "igb0", &vnic],
                &[
                    "bhyve",
                    "-H",
                    "-c",
                    "1",
                    "-m",
                    "512M",
                    "-s",
                    "0,hostbridge",
                    "-s",
                    "1,lpc",
                    "-s",
                    &blk,
                    "-s",
                    &net,
                    "-s",
                    &p9,
                    "-l",
                    &sock,
                    "-l",
                    &format!("bootrom,{}", fh.bootrom().display()),
                    &vmname
                ],
            ]
        ),
        "{cmds:#?}"
    );
    // Every host command went through pfexec.
    let direct: Vec<_> = cmds.iter().filter(|c| c[0] != "pfexec").collect();
    let via: Vec<_> = cmds.iter().filter(|c| c[0] == "pfexec").collect();
    assert_eq!(direct.len(), via.len(), "{cmds:#?}");
    // Connected before boot: the banner printed 0.2 s after start is in the log.
    let log = std::fs::read_to_string(run.path().join("vm/console.log")).unwrap();
    assert!(log.contains("vmtest fake illumos guest booting"), "{log}");
    assert!(log.contains("console login:"), "{log}");

    // Copy-in through the 9p share and `p9kp pull`.
    let src = fh.dir.path().join("bin1");
    std::fs::write(&src, b"#!/bin/sh\necho from-9p\n").unwrap();
    let guest = fh.dir.path().join("g/bin1");
    vm.copy_in(&src, &guest).await.unwrap();
    assert_eq!(std::fs::read(&guest).unwrap(), std::fs::read(&src).unwrap());

    fh.clear_commands();
    vm.shutdown().await.unwrap();
    // bhyve got SIGTERM (ACPI power-off) through pfexec first.
    let all = fh.commands();
    assert!(all[0][0] == "pfexec" && all[0][1].ends_with("/kill") && all[0][2] == "-TERM", "{all:#?}");
    let cmds: Vec<Vec<String>> = all.into_iter().filter(|c| c[0] != "pfexec").collect();
    let vmarg = format!("--vm={vmname}");
    assert!(
        in_order(
            &cmds,
            &[
                &["bhyvectl", &vmarg, "--destroy"],
                &["dladm", "delete-vnic", &vnic],
                &["dladm", "delete-vnic", &vnic],
                &["dladm", "delete-vnic", &vnic],
                &["zfs", "destroy", "-r", &clone],
            ]
        ),
        "{cmds:#?}"
    );
    assert!(fh.vmm().is_empty());
    assert!(!fh.datasets().iter().any(|d| d.contains("/run/")), "{:?}", fh.datasets());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listed_error_is_classified_and_explained() {
    let fh = FakeHost::new(Flavor::FreeBsd, &[]);
    let be = fh.backend(fh.config(Privilege::None));
    let state = StateDir::at(fh.dir.path().join("state"));

    // No image: usage, with the import command.
    let run = state.create_run().unwrap();
    let e = be.launch(&spec(&run), &run).await.err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Usage, "{e}");
    assert!(e.message().contains("vmtest image import --backend bhyve FILE img1"), "{e}");
    assert!(e.message().contains("dataset does not exist"), "{e}");
    fh.import(&be, "img1").await;

    // The VMM dies: fail fast with its stderr (falcon #136), and leave nothing behind.
    fh.set_env(&[("FAKE_BHYVE_CRASH", "vm_setup_memory: Cannot allocate memory")]);
    let run = state.create_run().unwrap();
    let t0 = Instant::now();
    let e = be.launch(&spec(&run), &run).await.err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Boot, "{e}");
    assert!(e.message().contains("status 4 (bhyve error)"), "{e}");
    assert!(e.message().contains("Cannot allocate memory"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(!fh.datasets().iter().any(|d| d.contains("/run/")), "{:?}", fh.datasets());
    assert!(fh.vmm().is_empty());
    assert!(!run.record_path("vm").exists());

    // No getty on the console: a boot error with the console tail.
    fh.set_env(&[("FAKE_GUEST_NO_GETTY", "1")]);
    let run = state.create_run().unwrap();
    let mut sp = spec(&run);
    sp.boot_timeout = Duration::from_secs(2);
    let e = be.launch(&sp, &run).await.err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Boot, "{e}");
    assert!(e.message().contains("gave no shell on its serial console within 2.00s"), "{e}");
    assert!(e.detail().unwrap_or_default().contains("guest booting"), "{:?}", e.detail());
    assert!(fh.vmm().is_empty());

    // A wrong password.
    fh.set_env(&[("FAKE_GUEST_PASSWORD", "sekrit")]);
    let run = state.create_run().unwrap();
    let e = be.launch(&spec(&run), &run).await.err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Boot, "{e}");
    assert!(e.message().contains("refused the password"), "{e}");
    let mut cfg = fh.config(Privilege::None);
    cfg.password = Some("sekrit".into());
    let be2 = fh.backend(cfg);
    let run = state.create_run().unwrap();
    let vm = be2.launch(&spec(&run), &run).await.unwrap();
    assert_eq!(vm.exec(ExecRequest::shell("echo ok")).await.unwrap().stdout_lossy(), "ok\n");

    // A command past its deadline: Ctrl-C, a Timeout error, and the VM still works.
    let e = vm.exec(ExecRequest::shell("sleep 300").timeout(Duration::from_secs(1))).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert_eq!(vm.exec(ExecRequest::shell("echo again")).await.unwrap().stdout_lossy(), "again\n");

    // A leftover clone of the same name: transient, so the retry loop sweeps and retries.
    let data = BhyveData::from_record(&record(&run)).unwrap();
    fh.set_env(&[("FAKE_ZFS_BUSY", "100")]);
    let e = vm.shutdown().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Infrastructure);
    assert!(e.message().contains("dataset is busy"), "{e}");
    assert!(e.message().contains("vmtest cleanup"), "{e}");
    // Earlier steps still ran: the kernel VM is gone although the dataset is busy.
    assert!(fh.vmm().is_empty());
    assert!(fh.datasets().contains(&data.dataset));
    fh.set_env(&[]);
    let run2 = state.create_run().unwrap();
    std::fs::remove_dir_all(run2.path()).unwrap();
    let mut sp = spec(&run);
    sp.name = data.vm.clone();
    let e = be2.launch(&sp, &run).await.err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Transient, "{e}");
    assert!(e.message().contains("dataset already exists"), "{e}");

    // Not FreeBSD or illumos: preflight.
    let mut cfg = fh.config(Privilege::None);
    cfg.flavor = None;
    let be3 = fh.backend(cfg);
    let e = be3.launch(&spec(&run), &run).await.err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Preflight, "{e}");
    assert!(!be3.preflight().await.passed());
    assert!(be.preflight().await.passed());
    // A missing privilege tool is a preflight failure naming the fix.
    let mut cfg = fh.config(Privilege::Doas);
    cfg.host.path_override = vec![fh.dir.path().join("nowhere")];
    let pf = fh.backend(cfg).preflight().await;
    assert!(!pf.passed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_destroys_dead_owners_only_and_never_images() {
    let fh = FakeHost::new(Flavor::FreeBsd, &[]);
    let be = fh.backend(fh.config(Privilege::None));
    fh.import(&be, "img1").await;
    let state = StateDir::at(fh.dir.path().join("state"));

    // A VM whose owner died (kill -9 of the runner): its record says a dead pid.
    let dead_run = state.create_run().unwrap();
    let vm = be.launch(&spec(&dead_run), &dead_run).await.unwrap();
    vm.detach();
    drop(vm);
    let mut rec = record(&dead_run);
    rec.owner = ProcessId { pid: u32::MAX - 7, start_time: 1 };
    dead_run.write_record(&rec).unwrap();
    let dead_pid = BhyveData::from_record(&rec).unwrap().pid.unwrap();

    // A clone and a kernel VM with no record at all.
    let o = fh.tool(
        "zfs",
        &[
            "clone",
            "-p",
            "-o",
            "vmtest:owner=deadbeef",
            "tank/vmtest/img/img1@base",
            "tank/vmtest/run/deadbeef/vmt-deadbeef-x",
        ],
    );
    assert!(o.status.success());
    std::fs::write(fh.dev().join("vmm/vmt-0badc0de-y"), b"").unwrap();
    std::fs::write(fh.dev().join("vmm/other-vm"), b"").unwrap();

    // A live VM of ours.
    let live_run = state.create_run().unwrap();
    let live = be.launch(&spec(&live_run), &live_run).await.unwrap();

    let owned = be.sweep(&state, true).await.unwrap();
    let mut d = owned.destroyed.clone();
    d.sort();
    let mut want = vec![rec.name.clone(), "vmt-deadbeef-x".to_owned(), "vmt-0badc0de-y".to_owned()];
    want.sort();
    assert_eq!(d, want);
    assert_eq!(owned.skipped, [live.name().to_owned()]);
    assert!(fh.datasets().iter().any(|d| d.contains("deadbeef")), "list-only destroys nothing");

    let report = be.sweep(&state, false).await.unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(!backend_bhyve::teardown::alive(&dead_pid), "the dead owner's bhyve was stopped");
    assert_eq!(fh.vmm(), ["other-vm".to_owned(), live.name().to_owned()]);
    let ds = fh.datasets();
    assert!(ds.contains(&"tank/vmtest/img/img1@base".to_owned()));
    assert!(!ds.iter().any(|d| d.contains("deadbeef") || d.contains(dead_run.id())), "{ds:?}");
    assert!(ds.iter().any(|d| d.contains(live_run.id())), "{ds:?}");
    assert!(!dead_run.path().exists());
    live.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freebsd_tap_is_created_described_and_swept() {
    let fh = FakeHost::new(Flavor::FreeBsd, &[]);
    let mut cfg = fh.config(Privilege::Sudo);
    cfg.nic = Some("bridge0".into());
    let be = fh.backend(cfg);
    fh.import(&be, "img1").await;
    let state = StateDir::at(fh.dir.path().join("state"));
    let run = state.create_run().unwrap();
    let vm = be.launch(&spec(&run), &run).await.unwrap();
    let desc = format!("vmtest:{}:{}", run.id(), vm.name());
    let cmds: Vec<Vec<String>> = fh.commands().into_iter().filter(|c| c[0] != "sudo").collect();
    assert!(
        in_order(
            &cmds,
            &[
                &["ifconfig", "tap", "create"],
                &["ifconfig", "tap0", "description", &desc],
                &["ifconfig", "bridge0", "addm", "tap0"],
                // A created tap is down until brought up.
                &["ifconfig", "tap0", "up"]
            ]
        ),
        "{cmds:#?}"
    );
    let shown = String::from_utf8_lossy(&fh.tool("ifconfig", &["tap0"]).stdout).into_owned();
    assert!(shown.contains("<UP,"), "{shown}");
    assert!(fh.commands().iter().any(|c| c[0] == "sudo" && c[1] == "-n"));
    assert!(cmds.iter().any(|c| c[0] == "bhyve" && c.contains(&"3,virtio-net,tap0".to_owned())));
    // A stale tap from a dead run is swept; ours is not.
    fh.tool("ifconfig", &["tap", "create"]);
    fh.tool("ifconfig", &["tap1", "description", "vmtest:deadbeef:vmt-deadbeef-vm"]);
    let r = be.sweep(&state, false).await.unwrap();
    assert_eq!(r.links, ["tap1"]);
    vm.shutdown().await.unwrap();
    let out = fh.tool("ifconfig", &["-g", "tap"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
}

/// The omicron use case: a test binary copied into the guest's cargo bay, run by test name,
/// its status returned; on failure the VM is kept with the commands to reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn omicron_test_binary_runs_by_name_and_failures_keep_the_vm() {
    let fh = FakeHost::new(Flavor::Illumos, &[]);
    let mut cfg = fh.config(Privilege::Pfexec);
    cfg.share = ShareMode::P9kp;
    let be = fh.backend(cfg);
    fh.import(&be, "img1").await;
    let state = StateDir::at(fh.dir.path().join("state"));
    let target = fh.dir.path().join("target/debug/deps");
    std::fs::create_dir_all(&target).unwrap();
    let bin = target.join("omicron_test_utils-1234");
    std::fs::write(
        &bin,
        "#!/bin/sh\n[ \"$1\" = --exact ] || exit 2\ncase \"$2\" in launch) echo 'test launch ... ok'; exit 0;; \
         *) echo \"test $2 ... FAILED\"; exit 101;; esac\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();

    // What `vmtest run --keep-on-failure` does: launch, exec, then tear down or detach and keep.
    let run = |name: &'static str| {
        let (be, state, bin) = (&be, &state, bin.clone());
        async move {
            let dir = state.create_run().unwrap();
            let mut sp = VmSpec::new(dir.vm_name("vm"), "vm");
            sp.boot = BootSpec::Image { name: "img1".into() };
            let vm = be.launch(&sp, &dir).await.unwrap();
            let mut req = ExecRequest::new([
                bin.as_os_str(),
                "--exact".as_ref(),
                name.as_ref(),
                "--nocapture".as_ref(),
            ]);
            req.cwd = Some(std::env::current_dir().unwrap());
            let out = vm.exec(req).await.unwrap();
            if out.status.success() {
                vm.shutdown().await.unwrap();
                (out, None)
            } else {
                vm.detach();
                let mut rec = record(&dir);
                rec.kept = true;
                dir.write_record(&rec).unwrap();
                (out, Some(vm.name().to_owned()))
            }
        }
    };
    let (ok, kept) = run("launch").await;
    assert_eq!(ok.status, ExitStatus::Code(0));
    assert_eq!(ok.stdout_lossy(), "test launch ... ok\n");
    assert_eq!(kept, None);
    assert!(fh.vmm().is_empty());
    assert!(std::fs::read(fh.bay().join("omicron_test_utils-1234")).is_ok(), "copied into the cargo bay");

    let (bad, kept) = run("other_test").await;
    assert_eq!(bad.status, ExitStatus::Code(101));
    assert_eq!(bad.stdout_lossy(), "test other_test ... FAILED\n");
    let kept = kept.expect("kept on failure");
    assert_eq!(fh.vmm(), std::slice::from_ref(&kept));
    let (_, rec) = state.records().into_iter().find(|(_, r)| r.name == kept).unwrap();
    assert!(rec.kept);
    let how = backend_bhyve::vm::keep_instructions(&rec);
    assert!(how.contains(&format!("vmtest exec {kept} -- CMD")), "{how}");
    assert!(how.contains(&format!("vmtest destroy {kept}")), "{how}");
    assert!(how.contains("pfexec nc -U"), "{how}");
    // A sweep leaves kept VMs alone; destroying by name removes it.
    assert!(be.sweep(&state, false).await.unwrap().skipped.contains(&kept));
    be.destroy_record(&rec).await.unwrap();
    assert!(fh.vmm().is_empty());
    assert!(!fh.datasets().iter().any(|d| d.contains("/run/")), "{:?}", fh.datasets());
    let _ = Path::new("/");
}

/// A kept VM is reached again from its record alone (`Hypervisor::attach`): exec resumes the
/// serial shell the run left, a guest back at its login prompt is logged in again, dropping the
/// handle leaves the VM up and gives the console back, and a VM whose bhyve is gone is a
/// one-line usage error pointing at `vmtest destroy`.
async fn attach_to_a_kept_vm(flavor: Flavor) {
    let fh = FakeHost::new(flavor, &[("FAKE_GUEST_RESPAWN", "1")]);
    let be = fh.backend(fh.config(Privilege::None));
    fh.import(&be, "img1").await;
    let state = StateDir::at(fh.dir.path().join("state"));
    let run = state.create_run().unwrap();
    let sp = spec(&run);
    let vm = be.launch(&sp, &run).await.unwrap();
    let _guard = DestroyOnDrop(run.record_path("vm"));
    let mark = fh.dir.path().join("mark");
    let out = vm.exec(ExecRequest::shell(&format!("echo kept >{}; exit 1", mark.display()))).await.unwrap();
    assert_eq!(out.status, ExitStatus::Code(1));
    vm.detach();
    drop(vm);
    let mut rec = record(&run);
    // Not kept and its owner (this test) alive: a runner still uses the console.
    let busy = be.attach(&rec).await.err().expect("a VM in use is not attached");
    assert_eq!(busy.kind(), ErrorKind::Usage, "{busy}");
    assert!(busy.message().contains("in use by vmtest pid"), "{busy}");
    rec.kept = true;
    run.write_record(&rec).unwrap();
    // The record names the bhyve process with its start time (`vmtest list` status).
    let data = BhyveData::from_record(&rec).unwrap();
    let pid = data.pid.expect("bhyve pid recorded");
    assert_eq!(rec.processes, [pid]);
    assert_eq!(Some(pid), ProcessId::of(pid.pid));
    assert!(pid.is_alive());

    let a = be.attach(&rec).await.unwrap();
    assert_eq!(a.name(), rec.name);
    let out = a.exec(ExecRequest::new(["cat", mark.to_str().unwrap()])).await.unwrap();
    assert_eq!((out.status, out.stdout_lossy()), (ExitStatus::Code(0), "kept\n".to_owned()));
    let out = a.exec(ExecRequest::shell("echo out; echo err >&2; exit 7")).await.unwrap();
    assert_eq!(out.status, ExitStatus::Code(7));
    assert_eq!((out.stdout_lossy(), out.stderr_lossy()), ("out\n".to_owned(), "err\n".to_owned()));
    if flavor == Flavor::Illumos {
        // bhyve serves one console client: a second attach is told who holds it.
        let t = Instant::now();
        let e = be.attach(&rec).await.err().expect("the console is taken");
        assert_eq!(e.kind(), ErrorKind::Infrastructure, "{e}");
        assert!(e.message().contains("another client holds it"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(10));
    }
    drop(a);
    assert_eq!(fh.vmm(), [rec.name.clone()], "dropping an attached handle leaves the VM up");
    assert!(pid.is_alive());

    // The guest logs out (its getty prompts again): the next attach logs in again.
    let b = be.attach(&rec).await.unwrap();
    let mut con = b.console().unwrap();
    con.send(b"exit\n").await.unwrap();
    con.wait_for(&regex::bytes::Regex::new("ogin: *$").unwrap(), Duration::from_secs(10)).await.unwrap();
    drop(con);
    drop(b);
    let c = be.attach(&rec).await.unwrap();
    let out = c.exec(ExecRequest::shell("echo back; exit 3")).await.unwrap();
    assert_eq!((out.status, out.stdout_lossy()), (ExitStatus::Code(3), "back\n".to_owned()));
    // An interactive console gets echo and a prompt; exec afterwards still works.
    c.prepare_interactive_console().await.unwrap();
    let mut con = c.console().unwrap();
    con.send(b"echo SUM=$((40+2))\n").await.unwrap();
    con.wait_for(&regex::bytes::Regex::new("SUM=42").unwrap(), Duration::from_secs(10)).await.unwrap();
    drop(con);
    let out = c.exec(ExecRequest::new(["echo", "again"])).await.unwrap();
    assert_eq!(out.stdout_lossy(), "again\n");
    drop(c);
    let log = std::fs::read_to_string(run.path().join("vm/console.log")).unwrap();
    assert!(log.contains("SUM=42"), "{log}");
    // Logged in at boot and again after the logout, as the user (nothing else typed at login:).
    assert_eq!(log.matches("ogin: root\r\n").count(), 2, "{log}");
    assert!(
        log.split("ogin: ").skip(1).all(|after| after.starts_with("root\r\n") || after.starts_with("\r\n")),
        "only the user or a CR is typed at a login prompt: {log}"
    );
    assert_eq!(fh.commands().iter().filter(|c| c[0] == "bhyve").count(), 1, "attach starts no bhyve");

    // bhyve goes away: attach says so in one line and points at `vmtest destroy`.
    let st = std::process::Command::new("kill").args(["-TERM", &pid.pid.to_string()]).status().unwrap();
    assert!(st.success());
    let t = Instant::now();
    while pid.is_alive() && t.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!pid.is_alive());
    let e = be.attach(&rec).await.err().expect("gone");
    assert_eq!(e.kind(), ErrorKind::Usage, "{e}");
    assert!(e.message().contains("is not running any more"), "{e}");
    assert!(e.message().contains(&format!("`vmtest destroy {}` cleans up", rec.name)), "{e}");
    assert!(!e.message().contains('\n'), "{e}");
    be.destroy_record(&rec).await.unwrap();
    assert!(fh.vmm().is_empty());
    assert!(!fh.datasets().iter().any(|d| d.contains("/run/")), "{:?}", fh.datasets());
    assert!(fh.datasets().contains(&"tank/vmtest/img/img1@base".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freebsd_attach_to_a_kept_vm() {
    attach_to_a_kept_vm(Flavor::FreeBsd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn illumos_attach_to_a_kept_vm() {
    attach_to_a_kept_vm(Flavor::Illumos).await;
}

/// Tears a kept VM down (from its record file) if its test fails midway: no fake bhyve
/// outlives a test. Idempotent, like every teardown.
struct DestroyOnDrop(std::path::PathBuf);

impl Drop for DestroyOnDrop {
    fn drop(&mut self) {
        let rec: Option<VmRecord> = std::fs::read(&self.0).ok().and_then(|b| serde_json::from_slice(&b).ok());
        if let Some(d) = rec.as_ref().and_then(|r| BhyveData::from_record(r).ok()) {
            let _ = backend_bhyve::teardown::destroy(&rec.unwrap().name, &d);
        }
    }
}
