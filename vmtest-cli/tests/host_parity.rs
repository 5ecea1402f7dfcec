//! A command in a kernel-mode guest sees what it would see on the host: process model,
//! kernel modules, /dev, file semantics, nested runs. Every test boots real QEMU guests; the
//! last one runs a probe (vmtest-agent/examples/probe.rs) on the host and in a guest and compares.

mod common;

use common::{stderr, stdout, Vmtest};
use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

/// A test that opens a terminal without O_NOCTTY, then closes it, must survive: a session
/// leader would acquire it as its controlling terminal and be hung up (SIGHUP) on close.
/// The command leads its process group (vmtest signals all of it) but not a session, and
/// gets the host's resource limits and umask.
#[test]
fn commands_lead_a_process_group_but_not_a_session_and_keep_host_limits() {
    let vt = Vmtest::new();
    let script = "import os\n\
        m, s = os.openpty()\n\
        fd = os.open(os.ttyname(s), os.O_RDWR)\n\
        os.close(fd); os.close(s); os.close(m)\n\
        print(os.getpgid(0) == os.getpid(), os.getsid(0) == os.getpid(), os.getsid(0) > 0)\n\
        import resource\n\
        print(*resource.getrlimit(resource.RLIMIT_NOFILE), *resource.getrlimit(resource.RLIMIT_CORE))\n\
        print(oct(os.umask(0)))\n";
    let mut cmd = vt.cmd();
    cmd.args(["run", "--", "python3", "-c", script]);
    // Limits and a umask the guest kernel would never pick by itself.
    // SAFETY: setrlimit and umask are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let nofile = libc_rlimit { cur: 777, max: 4321 };
            let core = libc_rlimit { cur: 12345, max: 67890 };
            if setrlimit(7, &nofile) != 0 || setrlimit(4, &core) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            umask(0o027);
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "True False True\n777 4321 12345 67890\n0o27\n");
    vt.assert_clean();
}

#[repr(C)]
struct libc_rlimit {
    cur: u64,
    max: u64,
}

extern "C" {
    fn setrlimit(resource: i32, rlim: *const libc_rlimit) -> i32;
    fn umask(mask: u32) -> u32;
}

/// The guest kernel's module tree is at /lib/modules/$(uname -r), read-only; nothing beyond
/// what boot needs is loaded until asked for; the kernel loads a module on demand (veth for
/// `ip link add`, tun through its static node). Both with a restored snapshot and cold.
#[test]
fn guest_kernel_modules_load_on_demand_restored_and_cold() {
    let vt = Vmtest::new();
    let script = "r=$(uname -r); test -f /lib/modules/$r/modules.dep && echo tree; \
        touch /lib/modules/$r/x 2>/dev/null || echo read-only; \
        grep -qE '^(veth|tun) ' /proc/modules || echo none-loaded; \
        ip link add v0 type veth peer name v1 && echo veth; \
        exec 3<>/dev/net/tun && echo tun; \
        grep -cE '^(veth|tun) ' /proc/modules";
    // As root: adding a link needs CAP_NET_ADMIN, whoever runs the tests.
    for args in [&["--root"][..], &["--root", "--no-snapshot"][..]] {
        let out = vt.run(args, &["sh", "-c", script]);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert_eq!(stdout(&out), "tree\nread-only\nnone-loaded\nveth\ntun\n2\n", "{args:?}");
    }
    // The host's modprobe (kmod), when it has one, works in the guest on the guest's tree:
    // vmtest gave the cached tree depmod's index.
    let host_kmod = ["/usr/sbin/modprobe", "/sbin/modprobe"].iter().any(|p| Path::new(p).exists());
    if host_kmod {
        let out = vt.run(&["--root"], &["sh", "-c", "modprobe dummy && grep -c '^dummy ' /proc/modules"]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert_eq!(stdout(&out), "1\n");
    }
    vt.assert_clean();
}

/// The /dev a minimal udev/systemd system has: the fd links, static nodes of autoloadable
/// modules with udev's permissions, /dev/mqueue.
#[test]
fn dev_has_the_standard_links_and_static_nodes() {
    let vt = Vmtest::new();
    let script = "readlink /dev/fd /dev/stdin /dev/stdout /dev/stderr /dev/core; \
        echo to-stderr > /dev/stderr; cat /dev/stdin; \
        stat -c '%n %F %t:%T %a' /dev/net/tun /dev/fuse /dev/loop-control; \
        stat -f -c %T /dev/mqueue; ls /dev/fd/ | head -3";
    let mut child = vt
        .cmd()
        .args(["run", "--", "sh", "-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"from-stdin\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "/proc/self/fd\n/proc/self/fd/0\n/proc/self/fd/1\n/proc/self/fd/2\n/proc/kcore\nfrom-stdin\n\
         /dev/net/tun character special file a:c8 666\n/dev/fuse character special file a:e5 666\n\
         /dev/loop-control character special file a:ed 660\nmqueue\n0\n1\n2\n"
    );
    assert!(stderr(&out).contains("to-stderr\n"), "{}", stderr(&out));
    vt.assert_clean();
}

/// Inside a guest, `vmtest run -- CMD` is CMD itself (same status, cwd, --env); the verbs
/// that manage VMs say they run on the host.
#[test]
fn nested_run_execs_the_command_and_host_verbs_refuse() {
    let vt = Vmtest::new();
    let vmtest = env!("CARGO_BIN_EXE_vmtest");
    let script = format!(
        "{vmtest} run --env INNER=1 -- sh -c 'echo $INNER $(pwd); exit 3'; echo status $?; \
         {vmtest} list; echo status $?"
    );
    let out = vt.cmd().current_dir("/usr").args(["run", "--", "sh", "-c", &script]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "1 /usr\nstatus 3\nstatus 69\n");
    assert!(
        stderr(&out).contains("`vmtest list` runs on the host, and this is a vmtest guest"),
        "{}",
        stderr(&out)
    );
    vt.assert_clean();
}

/// Documented differences between the host's report and the guest's (README, "What
/// differs from the host"). Each names the guest's value, so a fix shows up as a failure
/// here, and the README and this list are updated together.
fn allowed(key: &str, host: &str, guest: &str) -> bool {
    match key {
        // vmtest puts the command in a process group of its own, to signal all of it; under
        // cargo on the host it shares cargo's group.
        "process.group_leader" => guest == "true",
        // The guest command's stdio are pipes to vmtest and it has no controlling terminal;
        // a host run from a terminal has one.
        "process.controlling_tty" => guest == "false",
        // In a PID namespace whose session leader lives outside it (a container, as CI runs
        // in), getsid() says 0 on the host; the guest command is always in the agent's session.
        "process.in_a_session" => host == "false" && guest == "true",
        // The guest command gets default dispositions; the host probe inherits what the
        // tests were started with: a background job of a non-interactive shell ignores
        // SIGINT and SIGQUIT (bits 1 and 2), nothing else.
        "process.signals_ignored" => {
            let host = u64::from_str_radix(host, 16).unwrap_or(u64::MAX);
            guest == "0000000000000000" && host & !0b110 == 0
        }
        // Descriptors cannot cross into a VM: the guest has exactly stdin, stdout, stderr,
        // whatever the host process inherited beyond them.
        "process.fds" => guest == "[0, 1, 2]",
        // A guest /dev may have what the host lacks (a host without systemd has no /dev/core
        // or /dev/mqueue), never the reverse.
        k if k.starts_with("dev.") => host == "ENOENT",
        // The guest always has its kernel's module tree and can load tun; a host may have
        // tun built in, or no tree (a container, a microVM).
        "modules.tree" | "modules.tun_present" => guest == "true",
        // A file written in the guest is copied up to the overlay's tmpfs layer, and tmpfs
        // before Linux 6.6 has no user xattrs.
        "shared.getxattr_missing_after_write" | "tmp.setxattr_user" => guest == "EOPNOTSUPP",
        // The guest's /tmp is the overlay (the host's /tmp stays visible): its 6.1 overlayfs
        // writes a pwritev2(RWF_APPEND, offset -1) at the file position, not at the end, and
        // has no O_TMPFILE (both fine on tmpfs and on newer kernels).
        "tmp.pwritev2_append_position" => guest == "2",
        "tmp.pwritev2_append_content" => guest == "dec",
        "tmp.o_tmpfile" => guest == "EOPNOTSUPP",
        _ => false,
    }
}

/// The probe's report on the host and in a guest, compared key by key: every difference is
/// either documented (and allowed above) or a failure naming it.
#[test]
fn probe_reports_match_between_host_and_guest() {
    let probe = build_probe();
    let shared = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    std::fs::write(shared.path().join("file"), "from the host").unwrap();
    let file =
        std::ffi::CString::new(shared.path().join("file").into_os_string().into_encoded_bytes()).unwrap();
    // A user attribute the guest must read through the 9p share (on a host file system
    // without them, both sides report the same error).
    // SAFETY: valid strings and a 3-byte value.
    unsafe { libc::setxattr(file.as_ptr(), c"user.vmtest.present".as_ptr(), b"yes".as_ptr().cast(), 3, 0) };
    std::fs::write(shared.path().join("written"), "from the host").unwrap();
    let args = [shared.path().to_str().unwrap(), "/tmp"];
    let host =
        std::process::Command::new(&probe).args(args).stdin(std::process::Stdio::null()).output().unwrap();
    assert!(host.status.success(), "{}", stderr(&host));
    let vt = Vmtest::new();
    let guest = vt.run(&[], &[probe.to_str().unwrap(), args[0], args[1]]);
    assert_eq!(guest.status.code(), Some(0), "{}", stderr(&guest));
    let (host, guest) = (report(&stdout(&host)), report(&stdout(&guest)));
    assert_eq!(host.keys().collect::<Vec<_>>(), guest.keys().collect::<Vec<_>>());
    let mut table = String::new();
    let mut unexplained = Vec::new();
    for (key, h) in &host {
        let g = &guest[key];
        if h != g {
            let ok = allowed(key, h, g);
            table.push_str(&format!(
                "{key}: host `{h}`, guest `{g}`{}\n",
                if ok { " (documented)" } else { "" }
            ));
            if !ok {
                unexplained.push(key.clone());
            }
        }
    }
    // The comparison, for the log and for whoever updates the README.
    if let Some(path) = std::env::var_os("VMTEST_PARITY_REPORT") {
        std::fs::write(path, &table).unwrap();
    }
    eprintln!("{table}");
    assert!(unexplained.is_empty(), "undocumented differences {unexplained:?}:\n{table}");
    vt.assert_clean();
}

fn report(text: &str) -> BTreeMap<String, String> {
    text.lines().filter_map(|l| l.split_once(": ")).map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
}

/// Build vmtest-agent's examples/probe.rs (std and libc only) in a target dir of its own:
/// the outer cargo may hold the lock of this one while tests run.
fn build_probe() -> PathBuf {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("probe-target");
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../vmtest-agent/Cargo.toml");
    let status = std::process::Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--example", "probe", "--manifest-path"])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target)
        .env_remove("RUSTFLAGS")
        .status()
        .unwrap();
    assert!(status.success(), "building the probe failed");
    target.join("debug/examples/probe")
}
