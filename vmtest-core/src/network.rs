//! Private networks for multi-VM tests: a user-space L2 switch inside the runner.
//!
//! Each VM NIC is one switch *port*: a pair of unix datagram sockets in the run dir. The
//! switch binds `<node>-<net>.sw`; the hypervisor binds `<node>-<net>.vm` and sends every
//! Ethernet frame of the NIC to the switch's socket (QEMU: `-netdev dgram`). The switch
//! learns source MACs and forwards known unicast to one port, everything else to every port
//! of the same network. Nothing leaves this machine: there is no tap, no root, no route out.
//!
//! Faults are applied per link (a pair of nodes): partitions, blocked nodes (`block()`, all
//! of a node's NICs), loss (a probability per frame) and delay (per frame, order kept).

use crate::error::{Error, Result};
use crate::spec::NicSpec;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::UnixDatagram;

/// The largest frame the switch moves (QEMU's dgram netdev sends at most 64 KiB).
const MAX_FRAME: usize = 65536;

/// The address of node `index` (1-based) on network `net`: `192.168.<net>.<index>`.
pub fn node_address(net: u8, index: u8) -> [u8; 4] {
    [192, 168, net, index]
}

/// A deterministic, locally administered MAC for node `index` on network `net`
/// (`52:54:00:12:<net>:<index>`, as NixOS tests use).
pub fn node_mac(net: u8, index: u8) -> [u8; 6] {
    [0x52, 0x54, 0x00, 0x12, net, index]
}

/// Faults on one link, in both directions.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LinkFault {
    /// Probability (0.0..=1.0) that a frame is dropped.
    pub loss: f64,
    /// Added to every frame's trip.
    pub delay: Duration,
}

#[derive(Default)]
struct Faults {
    /// Groups of nodes that can reach each other; a link between two nodes listed in
    /// different groups is cut. Nodes listed in no group reach everyone.
    partition: Vec<HashSet<String>>,
    blocked: HashSet<String>,
    /// Keyed by the (sorted) node pair.
    links: HashMap<(String, String), LinkFault>,
    /// Applies to links without their own entry.
    default_link: LinkFault,
}

impl Faults {
    fn cut(&self, a: &str, b: &str) -> bool {
        if self.blocked.contains(a) || self.blocked.contains(b) {
            return true;
        }
        let ga = self.partition.iter().position(|g| g.contains(a));
        let gb = self.partition.iter().position(|g| g.contains(b));
        matches!((ga, gb), (Some(x), Some(y)) if x != y)
    }

    fn link(&self, a: &str, b: &str) -> LinkFault {
        self.links.get(&pair(a, b)).copied().unwrap_or(self.default_link)
    }
}

fn pair(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_owned(), b.to_owned())
    } else {
        (b.to_owned(), a.to_owned())
    }
}

struct Port {
    node: String,
    network: u8,
    socket: Arc<UnixDatagram>,
    guest: PathBuf,
}

/// Frame counters, for tests and for `--keep` diagnostics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub received: u64,
    pub delivered: u64,
    /// Dropped by a partition or a blocked node.
    pub cut: u64,
    /// Dropped by simulated loss.
    pub lost: u64,
}

struct Inner {
    ports: Vec<Port>,
    /// (network, MAC) to port index.
    macs: Mutex<HashMap<(u8, [u8; 6]), usize>>,
    faults: Mutex<Faults>,
    counters: Mutex<Counters>,
    rng: Mutex<u64>,
}

/// Where a kept run's switch plan is written, in the switch's directory.
pub const PLAN_FILE: &str = "switch.json";

/// Builds a switch: declare every port, then [`SwitchBuilder::start`]. Serializable, so a
/// kept run's network can be served again by another process ([`serve_while`]).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SwitchBuilder {
    dir: PathBuf,
    ports: Vec<(String, u8)>,
}

impl SwitchBuilder {
    /// Sockets go to `dir` (created), which must be short enough for unix socket paths.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        SwitchBuilder { dir: dir.into(), ports: Vec::new() }
    }

    /// Add a port for `node` on network `net`; returns the NIC the node's VM gets, with the
    /// node's `index` (1-based) deciding its MAC and address.
    pub fn port(&mut self, node: &str, index: u8, net: u8) -> NicSpec {
        self.ports.push((node.to_owned(), net));
        NicSpec {
            network: net,
            mac: node_mac(net, index),
            address: node_address(net, index),
            prefix: 24,
            switch_socket: self.dir.join(format!("{node}-{net}.sw")),
            guest_socket: self.dir.join(format!("{node}-{net}.vm")),
        }
    }

    /// Bind every port and start forwarding. Must run inside a tokio runtime.
    pub fn start(self) -> Result<Switch> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| Error::io(format!("cannot create {}", self.dir.display()), e))?;
        let mut ports = Vec::new();
        for (node, net) in &self.ports {
            let path = self.dir.join(format!("{node}-{net}.sw"));
            let _ = std::fs::remove_file(&path);
            let socket = UnixDatagram::bind(&path)
                .map_err(|e| Error::io(format!("cannot bind switch port {}", path.display()), e))?;
            ports.push(Port {
                node: node.clone(),
                network: *net,
                socket: Arc::new(socket),
                guest: self.dir.join(format!("{node}-{net}.vm")),
            });
        }
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        let inner = Arc::new(Inner {
            ports,
            macs: Mutex::default(),
            faults: Mutex::default(),
            counters: Mutex::default(),
            rng: Mutex::new(seed),
        });
        let tasks = (0..inner.ports.len()).map(|i| tokio::spawn(forward(inner.clone(), i))).collect();
        Ok(Switch { inner, tasks, dir: self.dir })
    }
}

/// A running switch. Dropping it stops forwarding; its sockets stay until the run dir goes.
pub struct Switch {
    inner: Arc<Inner>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    dir: PathBuf,
}

impl Drop for Switch {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Switch {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The ports this switch was built with, to start it again elsewhere (faults not
    /// included: a kept network starts healed).
    pub fn plan(&self) -> SwitchBuilder {
        let ports = self.inner.ports.iter().map(|p| (p.node.clone(), p.network)).collect();
        SwitchBuilder { dir: self.dir.clone(), ports }
    }

    /// Write [`Switch::plan`] to `PLAN_FILE` in the switch's directory.
    pub fn save_plan(&self) -> Result<PathBuf> {
        let path = self.dir.join(PLAN_FILE);
        let json = serde_json::to_vec(&self.plan()).expect("a plan serializes");
        std::fs::write(&path, json).map_err(|e| Error::io(format!("cannot write {}", path.display()), e))?;
        Ok(path)
    }

    /// The nodes with at least one port.
    pub fn nodes(&self) -> Vec<String> {
        let mut v: Vec<String> = self.inner.ports.iter().map(|p| p.node.clone()).collect();
        v.sort();
        v.dedup();
        v
    }

    fn check_nodes<'a>(&self, nodes: impl IntoIterator<Item = &'a str>) -> Result<()> {
        let known = self.nodes();
        for n in nodes {
            if !known.iter().any(|k| k == n) {
                return Err(Error::usage(format!(
                    "node `{n}` is on no network of this switch (nodes: {})",
                    known.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// Cut every link between nodes of different groups. Replaces an earlier partition.
    pub fn partition(&self, groups: &[Vec<String>]) -> Result<()> {
        self.check_nodes(groups.iter().flatten().map(String::as_str))?;
        self.inner.faults.lock().unwrap().partition =
            groups.iter().map(|g| g.iter().cloned().collect()).collect();
        Ok(())
    }

    /// Undo partitions, blocks, loss and delay: every link works again.
    pub fn heal(&self) {
        *self.inner.faults.lock().unwrap() = Faults::default();
    }

    /// Cut every link of `node` (its NICs stay up, as a pulled cable at the switch).
    pub fn block(&self, node: &str) -> Result<()> {
        self.check_nodes([node])?;
        self.inner.faults.lock().unwrap().blocked.insert(node.to_owned());
        Ok(())
    }

    pub fn unblock(&self, node: &str) -> Result<()> {
        self.check_nodes([node])?;
        self.inner.faults.lock().unwrap().blocked.remove(node);
        Ok(())
    }

    /// Set loss and delay on the link between `a` and `b` (both directions).
    pub fn set_link(&self, a: &str, b: &str, fault: LinkFault) -> Result<()> {
        self.check_nodes([a, b])?;
        check_fault(&fault)?;
        self.inner.faults.lock().unwrap().links.insert(pair(a, b), fault);
        Ok(())
    }

    /// The faults of the link between `a` and `b`.
    pub fn link(&self, a: &str, b: &str) -> LinkFault {
        self.inner.faults.lock().unwrap().link(a, b)
    }

    /// Set loss and delay on every link (links with their own setting keep it).
    pub fn set_default_link(&self, fault: LinkFault) -> Result<()> {
        check_fault(&fault)?;
        self.inner.faults.lock().unwrap().default_link = fault;
        Ok(())
    }

    pub fn counters(&self) -> Counters {
        *self.inner.counters.lock().unwrap()
    }

    /// Ports per network, for messages.
    pub fn describe(&self) -> String {
        let mut nets: BTreeMap<u8, Vec<&str>> = BTreeMap::new();
        for p in &self.inner.ports {
            nets.entry(p.network).or_default().push(&p.node);
        }
        nets.iter()
            .map(|(n, nodes)| format!("network {n}: {}", nodes.join(", ")))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Serve the network saved in `dir` (by [`Switch::save_plan`]) for as long as `needed`
/// says, checking every second: what keeps a kept run's machines connected after the runner
/// that booted them is gone. Rebinding the switch's socket paths takes the ports over.
pub async fn serve_while(dir: &Path, needed: impl Fn() -> bool) -> Result<()> {
    let path = dir.join(PLAN_FILE);
    let text = std::fs::read(&path).map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
    let plan: SwitchBuilder = serde_json::from_slice(&text)
        .map_err(|e| Error::infra(format!("bad switch plan {}: {e}", path.display())))?;
    if !needed() {
        return Ok(()); // destroyed meanwhile: do not make its directory again
    }
    let switch = plan.start()?;
    tracing::info!("serving {} from {}", switch.describe(), dir.display());
    while needed() {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}

fn check_fault(f: &LinkFault) -> Result<()> {
    if !(0.0..=1.0).contains(&f.loss) {
        return Err(Error::usage(format!("loss {} is not a probability between 0 and 1", f.loss)));
    }
    Ok(())
}

fn next_random(inner: &Inner) -> f64 {
    let mut s = inner.rng.lock().unwrap();
    // xorshift64*: plenty for dropping frames.
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    let v = s.wrapping_mul(0x2545_F491_4F6C_DD1D);
    (v >> 11) as f64 / (1u64 << 53) as f64
}

/// Receive frames on port `me` and forward them.
async fn forward(inner: Arc<Inner>, me: usize) {
    let mut buf = vec![0u8; MAX_FRAME];
    let port = &inner.ports[me];
    loop {
        let n = match port.socket.recv(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!("switch port {}-{}: {e}", port.node, port.network);
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if n < 14 {
            continue; // not an Ethernet frame
        }
        let frame = &buf[..n];
        let dst: [u8; 6] = frame[0..6].try_into().unwrap();
        let src: [u8; 6] = frame[6..12].try_into().unwrap();
        inner.counters.lock().unwrap().received += 1;
        let targets: Vec<usize> = {
            let mut macs = inner.macs.lock().unwrap();
            if src[0] & 1 == 0 {
                macs.insert((port.network, src), me);
            }
            match (dst[0] & 1 == 0).then(|| macs.get(&(port.network, dst)).copied()).flatten() {
                Some(t) if t != me => vec![t],
                Some(_) => Vec::new(),
                None => (0..inner.ports.len())
                    .filter(|&i| i != me && inner.ports[i].network == port.network)
                    .collect(),
            }
        };
        for t in targets {
            let to = &inner.ports[t];
            let (cut, link) = {
                let f = inner.faults.lock().unwrap();
                (f.cut(&port.node, &to.node), f.link(&port.node, &to.node))
            };
            if cut {
                inner.counters.lock().unwrap().cut += 1;
                continue;
            }
            if link.loss > 0.0 && next_random(&inner) < link.loss {
                inner.counters.lock().unwrap().lost += 1;
                continue;
            }
            if link.delay.is_zero() {
                deliver(&inner, t, frame);
            } else {
                let (inner, data) = (inner.clone(), frame.to_vec());
                tokio::spawn(async move {
                    tokio::time::sleep(link.delay).await;
                    deliver(&inner, t, &data);
                });
            }
        }
    }
}

/// Send to a port's guest socket. A guest that is not up yet, or whose queue is full, loses
/// the frame, as on a real wire.
fn deliver(inner: &Inner, t: usize, frame: &[u8]) {
    let to = &inner.ports[t];
    if to.socket.try_send_to(frame, &to.guest).is_ok() {
        inner.counters.lock().unwrap().delivered += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(payload);
        f
    }

    struct FakeNic {
        sock: UnixDatagram,
        nic: NicSpec,
    }

    impl FakeNic {
        fn new(nic: NicSpec) -> Self {
            let sock = UnixDatagram::bind(&nic.guest_socket).unwrap();
            FakeNic { sock, nic }
        }
        async fn send(&self, dst: [u8; 6], payload: &[u8]) {
            self.sock.send_to(&frame(dst, self.nic.mac, payload), &self.nic.switch_socket).await.unwrap();
        }
        async fn recv(&self, within: Duration) -> Option<Vec<u8>> {
            let mut buf = vec![0u8; 2048];
            match tokio::time::timeout(within, self.sock.recv(&mut buf)).await {
                Ok(Ok(n)) => Some(buf[14..n].to_vec()),
                _ => None,
            }
        }
    }

    const BCAST: [u8; 6] = [0xff; 6];
    const SHORT: Duration = Duration::from_millis(150);

    fn three() -> (tempfile::TempDir, SwitchBuilder, Vec<NicSpec>) {
        let tmp = tempfile::tempdir().unwrap();
        let mut b = SwitchBuilder::new(tmp.path().join("net"));
        let nics = vec![b.port("a", 1, 1), b.port("b", 2, 1), b.port("c", 3, 1)];
        (tmp, b, nics)
    }

    #[tokio::test]
    async fn floods_unknown_then_learns_and_forwards_unicast() {
        let (_tmp, b, nics) = three();
        let sw = b.start().unwrap();
        let [a, b, c] = [0, 1, 2].map(|i| FakeNic::new(nics[i].clone()));
        a.send(BCAST, b"hello all").await;
        assert_eq!(b.recv(SHORT * 10).await.unwrap(), b"hello all");
        assert_eq!(c.recv(SHORT * 10).await.unwrap(), b"hello all");
        assert_eq!(a.recv(SHORT).await, None, "no echo to the sender");
        // b answers a by unicast: a's MAC was learned, so c does not see it.
        b.send(a.nic.mac, b"to a").await;
        assert_eq!(a.recv(SHORT * 10).await.unwrap(), b"to a");
        assert_eq!(c.recv(SHORT).await, None);
        assert_eq!(sw.counters().delivered, 3);
    }

    #[tokio::test]
    async fn partitions_blocks_and_heal_cut_and_restore_links() {
        let (_tmp, b, nics) = three();
        let sw = b.start().unwrap();
        let [a, b, c] = [0, 1, 2].map(|i| FakeNic::new(nics[i].clone()));
        sw.partition(&[vec!["a".into()], vec!["b".into(), "c".into()]]).unwrap();
        a.send(BCAST, b"x").await;
        assert_eq!(b.recv(SHORT).await, None);
        assert_eq!(c.recv(SHORT).await, None);
        b.send(BCAST, b"y").await;
        assert_eq!(c.recv(SHORT * 10).await.unwrap(), b"y", "same side still talks");
        assert_eq!(a.recv(SHORT).await, None);
        sw.heal();
        a.send(BCAST, b"z").await;
        assert_eq!(b.recv(SHORT * 10).await.unwrap(), b"z");
        assert_eq!(c.recv(SHORT * 10).await.unwrap(), b"z");
        sw.block("c").unwrap();
        a.send(BCAST, b"w").await;
        assert_eq!(b.recv(SHORT * 10).await.unwrap(), b"w");
        assert_eq!(c.recv(SHORT).await, None, "blocked");
        sw.unblock("c").unwrap();
        a.send(BCAST, b"v").await;
        assert_eq!(c.recv(SHORT * 10).await.unwrap(), b"v");
        assert!(sw.counters().cut >= 3);
        assert!(sw.partition(&[vec!["nobody".into()]]).unwrap_err().message().contains("`nobody`"));
    }

    #[tokio::test]
    async fn loss_drops_and_delay_delays_per_link() {
        let (_tmp, b, nics) = three();
        let sw = b.start().unwrap();
        let [a, b, c] = [0, 1, 2].map(|i| FakeNic::new(nics[i].clone()));
        sw.set_link("a", "b", LinkFault { loss: 1.0, delay: Duration::ZERO }).unwrap();
        sw.set_link("a", "c", LinkFault { loss: 0.0, delay: Duration::from_millis(300) }).unwrap();
        let t0 = std::time::Instant::now();
        a.send(BCAST, b"slow").await;
        assert_eq!(b.recv(SHORT).await, None, "100% loss");
        assert_eq!(c.recv(Duration::from_secs(3)).await.unwrap(), b"slow");
        assert!(t0.elapsed() >= Duration::from_millis(300), "{:?}", t0.elapsed());
        assert_eq!(sw.counters().lost, 1);
        // b to c is untouched.
        b.send(BCAST, b"fast").await;
        assert_eq!(c.recv(SHORT * 10).await.unwrap(), b"fast");
        assert!(sw.set_link("a", "b", LinkFault { loss: 2.0, delay: Duration::ZERO }).is_err());
    }

    #[tokio::test]
    async fn networks_are_separate() {
        let tmp = tempfile::tempdir().unwrap();
        let mut b = SwitchBuilder::new(tmp.path().join("net"));
        let n1a = b.port("a", 1, 1);
        let n2b = b.port("b", 2, 2);
        let n2a = b.port("a", 1, 2);
        let _sw = b.start().unwrap();
        let (a1, b2, a2) = (FakeNic::new(n1a), FakeNic::new(n2b), FakeNic::new(n2a));
        a1.send(BCAST, b"net1").await;
        assert_eq!(b2.recv(SHORT).await, None);
        assert_eq!(a2.recv(SHORT).await, None);
        b2.send(BCAST, b"net2").await;
        assert_eq!(a2.recv(SHORT * 10).await.unwrap(), b"net2");
    }

    #[test]
    fn addresses_and_macs_are_deterministic() {
        assert_eq!(node_address(1, 2), [192, 168, 1, 2]);
        assert_eq!(node_mac(3, 4), [0x52, 0x54, 0, 0x12, 3, 4]);
    }
}
