//! The client/server scenario of examples/vm-tests, written in Rust against the Machine API:
//! two real QEMU guests on a private network through the in-process switch, real HTTP.

use backend_qemu::{QemuBackend, QemuOptions};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmtest_core::machine::{Cluster, NodeConfig};
use vmtest_core::network::LinkFault;
use vmtest_core::runner::Silent;
use vmtest_core::state::StateDir;
use vmtest_core::ErrorKind;

const T: Duration = Duration::from_secs(60);

#[tokio::test]
async fn client_fetches_from_server_by_name_and_faults_apply() {
    let tmp = tempfile::tempdir().unwrap();
    let state = StateDir::at(tmp.path().join("state"));
    let page = tmp.path().join("index.html");
    std::fs::write(&page, "hello from the server\n").unwrap();

    let hv: Arc<dyn vmtest_core::Hypervisor> = Arc::new(QemuBackend::new(QemuOptions::default()));
    let mut server = NodeConfig::new("server");
    server.files.push((page.clone(), "/srv/www/index.html".into()));
    let client = NodeConfig::new("client");
    let t0 = Instant::now();
    let cluster = Cluster::start(hv, &state, vec![server, client], None, &Silent).await.unwrap();
    eprintln!("two nodes up in {:?}", t0.elapsed());
    let (server, client) = (cluster.machine("server").unwrap(), cluster.machine("client").unwrap());

    // Names resolve to the private addresses (nodes are numbered by sorted name).
    assert_eq!(
        client.succeed("getent hosts server").await.unwrap().split_whitespace().next(),
        Some("192.168.1.2")
    );
    assert_eq!(server.succeed("hostname").await.unwrap().trim(), "server");

    server
        .succeed("cd /srv/www && setsid /usr/bin/python3 -m http.server 80 </dev/null >/tmp/http.log 2>&1 &")
        .await
        .unwrap();
    server.wait_for_open_port(80, T).await.unwrap();
    let body =
        client.wait_until_succeeds("curl -fsS --max-time 5 http://server/index.html", T).await.unwrap();
    assert_eq!(body, "hello from the server\n");

    // A failing command names the machine, the command, its status and its output.
    let e = client.succeed("echo out; echo err >&2; exit 3").await.unwrap_err();
    assert!(e.message().contains("machine `client`") && e.message().contains("exit status 3"), "{e}");
    let detail = e.detail().unwrap();
    assert!(detail.contains("stdout:\nout") && detail.contains("stderr:\nerr"), "{detail}");

    // Partition: the fetch fails; heal: it works again.
    let net = cluster.network().unwrap();
    net.partition(&[vec!["client".into()], vec!["server".into()]]).unwrap();
    client.fail("curl -fsS --max-time 3 http://server/index.html").await.unwrap();
    net.heal();
    client.wait_until_succeeds("curl -fsS --max-time 5 http://server/index.html", T).await.unwrap();

    // block/unblock one machine.
    server.block().unwrap();
    client.fail("curl -fsS --max-time 3 http://server/index.html").await.unwrap();
    server.unblock().unwrap();
    client.wait_until_succeeds("curl -fsS --max-time 5 http://server/index.html", T).await.unwrap();

    // Delay on the link shows up in the round trip.
    net.set_link("client", "server", LinkFault { loss: 0.0, delay: Duration::from_millis(400) }).unwrap();
    let t = Instant::now();
    client.succeed("curl -fsS --max-time 10 http://server/index.html").await.unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(800),
        "TCP handshake + request cross the link twice: {:?}",
        t.elapsed()
    );
    net.heal();

    // Waits have host-side deadlines and say what they waited for.
    let e = server.wait_for_file("/nonexistent", Duration::from_secs(2)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
    assert!(e.message().contains("machine `server`") && e.message().contains("/nonexistent"), "{e}");
    server.wait_for_closed_port(8080, T).await.unwrap();

    // Console: only output after the last match.
    server.succeed("echo marker-one > /dev/ttyS0; echo marker-two > /dev/ttyS0").await.unwrap();
    assert_eq!(server.wait_for_console("marker-\\w+", T).await.unwrap(), "marker-one");
    assert_eq!(server.wait_for_console("marker-\\w+", T).await.unwrap(), "marker-two");
    assert!(server.wait_for_console("marker-\\w+", Duration::from_millis(500)).await.is_err());

    // Copy in and out, byte for byte.
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let host_in = tmp.path().join("payload.bin");
    std::fs::write(&host_in, &payload).unwrap();
    client.copy_to(&host_in, "/root/payload.bin".as_ref()).await.unwrap();
    let sum = client.succeed("cksum < /root/payload.bin").await.unwrap();
    let host_sum = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("cksum < {}", host_in.display()))
        .output()
        .unwrap();
    assert_eq!(sum, String::from_utf8_lossy(&host_sum.stdout));
    client.succeed("echo from-the-guest > /root/out.txt").await.unwrap();
    let got = client.copy_from("/root/out.txt".as_ref(), &tmp.path().join("out")).await.unwrap();
    assert_eq!(std::fs::read_to_string(got).unwrap(), "from-the-guest\n");
    let e = client.copy_from("/root/missing".as_ref(), &tmp.path().join("out")).await.unwrap_err();
    assert!(e.message().contains("client") && e.message().contains("/root/missing"), "{e}");
    cluster.shutdown().await.unwrap();
    let left: Vec<_> = std::fs::read_dir(state.path()).unwrap().flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "{left:?}");
}
