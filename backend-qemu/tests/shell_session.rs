//! `ShellSession` over a real QEMU guest's serial console: a shell is started on /dev/ttyS0
//! through the agent, then driven only through `vm.console()`.

use backend_qemu::{QemuBackend, QemuOptions};
use std::time::Duration;
use vmtest_core::exec::ExecRequest;
use vmtest_core::shell::{ShellOptions, ShellSession};
use vmtest_core::spec::VmSpec;
use vmtest_core::state::StateDir;
use vmtest_core::{ErrorKind, Hypervisor};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_session_runs_commands_over_the_guest_serial_console() {
    let tmp = tempfile::tempdir().unwrap();
    let run = StateDir::at(tmp.path().join("state")).create_run().unwrap();
    let backend = QemuBackend::new(QemuOptions::default());
    let mut spec = VmSpec::new(run.vm_name("sh"), "sh");
    spec.boot_timeout = Duration::from_secs(180);
    let vm = backend.launch(&spec, &run).await.expect("the QEMU guest boots");

    let result = async {
        // A shell on the serial port, started the way `vmtest console` does it (the agent
        // makes ttyS0 its controlling terminal, so Ctrl-C works).
        vm.prepare_interactive_console().await.unwrap();

        let opts =
            ShellOptions { login: None, ready_timeout: Duration::from_secs(60), ..ShellOptions::default() };
        let mut sh = ShellSession::start(vm.console().unwrap(), opts).await.unwrap();

        let out =
            sh.run(b"uname -s; echo err >&2; exit 4", None, Some(Duration::from_secs(60))).await.unwrap();
        assert_eq!(out.stdout, b"Linux\n");
        assert_eq!(out.stderr, b"err\n");
        assert_eq!(out.status, 4);

        // A line far past the tty's width, and stdin.
        let long = "y".repeat(3000);
        let script = format!("printf %s {long} | wc -c; cat");
        let out = sh.run(script.as_bytes(), Some(b"piped\n"), Some(Duration::from_secs(60))).await.unwrap();
        let words: Vec<String> =
            String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_owned).collect();
        assert_eq!(words, ["3000", "piped"]);

        // argv exactly.
        let mut req = ExecRequest::new(["/bin/sh", "-c", "printf '<%s>' \"$@\"", "sh", "a b", "it's"]);
        req.timeout = Some(Duration::from_secs(60));
        let out = sh.exec(req).await.unwrap();
        assert_eq!(out.stdout_lossy(), "<a b><it's>");

        // A deadline: Ctrl-C, a Timeout error, and the shell answers again.
        let e = sh.run(b"sleep 600", None, Some(Duration::from_secs(3))).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
        let out = sh.run(b"echo back", None, Some(Duration::from_secs(60))).await.unwrap();
        assert_eq!(out.stdout, b"back\n");
    }
    .await;
    vm.shutdown().await.unwrap();
    result
}
