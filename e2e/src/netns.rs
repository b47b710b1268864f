//! Hosts of a test's own: a network namespace joined to this one by a veth
//! pair, so that what a process there sends crosses a real link whose
//! faults the test sets: packet loss and partitions (nftables in the
//! namespace, which drop silently, as a broken network does: no reset, no
//! error, only silence), the link taken down, and latency.
//!
//! Latency comes from a relay on the link's near end, not from `tc netem`:
//! the kernels this runs on (Firecracker's) are built without `sch_netem`.
//! Every service a remote process reaches (Redis, RabbitMQ, the chat
//! services) is reached through a [`Relay`] on this side of the link, which
//! holds each chunk for the configured delay before passing it on, in
//! order; the services themselves listen on loopback only.
//!
//! Namespaces are named `parley-<pid>-<n>`; one whose test process died
//! without cleaning up (a SIGKILL) is removed by the next test that makes
//! one.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Runs a command of iproute2 or nftables, failing with what it printed.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> anyhow::Result<()> {
    use std::io::Write;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().with_context(|| {
        format!("running {program} (scripts/services installs iproute2 and nftables)")
    })?;
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// What the link to a [`Host`] does to packets now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    /// Percent of TCP segments dropped, each way, at random.
    pub loss: u8,
    /// Ports on the near end the host cannot reach: every segment to or
    /// from them is dropped (a partition from those services).
    pub blocked: Vec<u16>,
}

/// A network namespace with one veth link to this one.
#[derive(Debug)]
pub struct Host {
    pub name: String,
    /// This side of the link.
    pub near: Ipv4Addr,
    /// The host's side: where its processes listen.
    pub far: Ipv4Addr,
    /// The link's interface on this side.
    link: String,
}

impl Host {
    /// Makes the namespace and its link, up and addressed (a /30 out of
    /// 10.200.0.0/13, picked at random).
    pub fn create() -> anyhow::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        sweep_orphans();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let name = format!("parley-{pid}-{n}");
        let link = format!("pv{:x}", rand::random::<u32>() & 0xff_ffff);
        let peer = format!("{link}b");
        let block: u32 = 0x0ac8_0000 | (rand::random::<u32>() & 0x7_fffc);
        let (near, far) = (Ipv4Addr::from(block | 1), Ipv4Addr::from(block | 2));
        run("ip", &["netns", "add", &name], None)?;
        let host = Self {
            name,
            near,
            far,
            link,
        };
        let ns = host.name.as_str();
        let steps: [&[&str]; 6] = [
            &[
                "link", "add", &host.link, "type", "veth", "peer", "name", &peer, "netns", ns,
            ],
            &["addr", "add", &format!("{near}/30"), "dev", &host.link],
            &["link", "set", &host.link, "up"],
            &["-n", ns, "addr", "add", &format!("{far}/30"), "dev", &peer],
            &["-n", ns, "link", "set", &peer, "up"],
            &["-n", ns, "link", "set", "lo", "up"],
        ];
        for step in steps {
            run("ip", step, None)?;
        }
        host.inject(&Faults::default())?;
        Ok(host)
    }

    /// The command prefix that runs a program on this host.
    pub fn exec(&self) -> Vec<String> {
        vec!["netns".into(), "exec".into(), self.name.clone()]
    }

    /// Sets the link's faults, replacing whatever was set before.
    pub fn inject(&self, f: &Faults) -> anyhow::Result<()> {
        let mut rules = String::new();
        if f.loss > 0 {
            rules += &format!("meta l4proto tcp numgen random mod 100 < {} drop;", f.loss);
        }
        let ports: Vec<String> = f.blocked.iter().map(u16::to_string).collect();
        let ports = ports.join(", ");
        let (input, output) = if ports.is_empty() {
            (rules.clone(), rules)
        } else {
            let near = self.near;
            (
                format!("{rules} ip saddr {near} tcp sport {{ {ports} }} drop;"),
                format!("{rules} ip daddr {near} tcp dport {{ {ports} }} drop;"),
            )
        };
        let table = format!(
            "table inet parley\ndelete table inet parley\ntable inet parley {{\n\
             chain input {{ type filter hook input priority 0; {input} }}\n\
             chain output {{ type filter hook output priority 0; {output} }}\n}}\n"
        );
        run(
            "ip",
            &["netns", "exec", &self.name, "nft", "-f", "-"],
            Some(&table),
        )
    }

    /// Takes the link down (everything across it stops, silently) or up.
    pub fn link(&self, up: bool) -> anyhow::Result<()> {
        let state = if up { "up" } else { "down" };
        run("ip", &["link", "set", &self.link, state], None)
    }

    /// A relay on this side of the link to `upstream`, which the host
    /// reaches at the relay's address.
    pub async fn relay(&self, upstream: SocketAddr) -> anyhow::Result<Relay> {
        Relay::start(SocketAddr::from((self.near, 0)), upstream).await
    }
}

impl Drop for Host {
    /// Removes the namespace; the link goes with it.
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name], None);
    }
}

/// Removes namespaces left by test processes that are gone.
fn sweep_orphans() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(pid) = name
            .strip_prefix("parley-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run("ip", &["netns", "del", name], None);
        }
    }
}

/// Resets every established TCP connection to `server` in this namespace
/// (`ss -K`, the kernel's socket destroy): the side named loses its socket
/// with an error at once and the other gets a reset, as when a NAT or load
/// balancer on the path forgets them. `at_server` takes the server's sockets,
/// otherwise its clients'. Answers how many were reset.
pub fn reset_connections(server: SocketAddr, at_server: bool) -> anyhow::Result<usize> {
    let (ip, port) = (server.ip().to_string(), format!(":{}", server.port()));
    let filter: [&str; 4] = if at_server {
        ["src", &ip, "sport", "="]
    } else {
        ["dst", &ip, "dport", "="]
    };
    let out = Command::new("ss")
        .args(["-K", "-t", "-n", "state", "established"])
        .args(filter)
        .arg(&port)
        .output()
        .context("running ss (iproute2)")?;
    if !out.status.success() {
        bail!("ss -K: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    // A header line, then one line per socket destroyed.
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .count())
}

/// A TCP relay that delays every chunk by the same, adjustable, time,
/// keeping order: a link with latency but no limit on throughput.
#[derive(Debug)]
pub struct Relay {
    pub addr: SocketAddr,
    delay_us: Arc<AtomicU64>,
    tasks: JoinSet<()>,
}

impl Relay {
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("a relay on {listen}"))?;
        let addr = listener.local_addr()?;
        let delay_us = Arc::new(AtomicU64::new(0));
        let mut tasks = JoinSet::new();
        let delay = delay_us.clone();
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((down, _)) = listener.accept().await {
                let delay = delay.clone();
                conns.spawn(async move {
                    let Ok(up) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = (down.set_nodelay(true), up.set_nodelay(true));
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    tokio::join!(pump(dr, uw, delay.clone()), pump(ur, dw, delay));
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(Self {
            addr,
            delay_us,
            tasks,
        })
    }

    /// The delay each way from now on.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_us
            .store(delay.as_micros() as u64, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

/// Copies `from` to `to`, each chunk written `delay` after it was read.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Arc<AtomicU64>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let read = async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = from.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let due = Instant::now() + Duration::from_micros(delay.load(Ordering::Relaxed));
            if tx.send((due, buf[..n].to_vec())).is_err() {
                break;
            }
        }
    };
    let write = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}
