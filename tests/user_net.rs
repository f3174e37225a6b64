//! User-mode networking (`-netdev user`, `-nic user`, libslirp) with the Debian guest from
//! `scripts/build-guest.sh` in `keel.mode=shell`, driven over its serial console:
//!
//! * the guest gets 10.0.2.15 from slirp's DHCP server (busybox `udhcpc`);
//! * it connects to a TCP server the test runs on the host's loopback, through 10.0.2.2;
//! * a `hostfwd` rule of the command line brings a host connection to `nc -l` in the guest,
//!   and one added at run time with HMP `hostfwd_add` (then removed) does too.
//!
//! The same command line runs under Keel (with its default sandbox, so the `slirp` thread's
//! filter is exercised) and, where installed, under QEMU 7.2 (`/usr/bin/qemu-system-x86_64`),
//! whose monitor texts are compared with Keel's. microvm takes `-netdev user` with
//! `-device virtio-net-device`; pc takes `-nic user,model=virtio-net-pci`. Needs the guest
//! and libslirp (both skip with the reason otherwise). Under tcg each boot takes 20-60 s:
//! `cargo test --release --test user_net -- --nocapture`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Client, TempDir};
use serde_json::json;

const QEMU: &str = "/usr/bin/qemu-system-x86_64";
/// The guest's port for `nc -l`.
const GUEST_PORT: u16 = 7777;

fn guest_files() -> Option<(PathBuf, PathBuf)> {
    let dir = std::env::var_os("KEEL_GUEST_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/keel-guest/current"))
        })?;
    let initrd = dir.join("initramfs-virtio.cpio.gz");
    initrd.is_file().then_some((dir, initrd))
}

/// Why the test cannot run here, if it cannot.
fn unavailable() -> Option<String> {
    if guest_files()
        .is_none_or(|(d, _)| !d.join("bzImage").is_file() || !d.join("vmlinux").is_file())
    {
        let why = "skipped: no guest (run scripts/build-guest.sh or set KEEL_GUEST_DIR)";
        assert!(
            std::env::var("KEEL_REQUIRE_GUEST").as_deref() != Ok("1"),
            "{why}"
        );
        return Some(why.into());
    }
    if !Path::new("/usr/lib/x86_64-linux-gnu/libslirp.so.0").exists()
        && !Path::new("/lib/x86_64-linux-gnu/libslirp.so.0").exists()
    {
        let why = "skipped: libslirp.so.0 is not installed (apt-get install libslirp0)";
        assert!(
            std::env::var("KEEL_REQUIRE_GUEST").as_deref() != Ok("1"),
            "{why}"
        );
        return Some(why.into());
    }
    None
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A guest in shell mode under `program`, its console on stdin/stdout, and QMP.
struct Guest {
    label: String,
    child: Child,
    stdin: ChildStdin,
    out: Arc<Mutex<String>>,
    qmp: Client,
    _dir: TempDir,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Guest {
    fn start(program: &str, machine: &str, net: &[String]) -> Guest {
        let (dir, initrd) = guest_files().unwrap();
        // PVH (the ELF) on microvm, the bzImage on pc, as the other guest tests.
        let kernel = dir.join(if machine == "pc" {
            "bzImage"
        } else {
            "vmlinux"
        });
        let dir = TempDir::new();
        let sock = dir.path("qmp.sock");
        let append = format!(
            "console=ttyS0 quiet keel.mode=shell tsc_early_khz={}",
            keel_tcg::guest_tsc_khz()
        );
        let qmp = format!("unix:{},server=on,wait=off", sock.display());
        let mut child = Command::new(program)
            .args(["-M", machine, "-accel", "tcg", "-m", "256M", "-nodefaults"])
            .args(["-no-reboot", "-display", "none", "-serial", "stdio"])
            .args(["-append", &append, "-qmp", &qmp])
            .arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args(net)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let label = format!("{program} -M {machine}");
        let stdin = child.stdin.take().unwrap();
        let out = Arc::new(Mutex::new(String::new()));
        let mut stdout = child.stdout.take().unwrap();
        let sink = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            if let Ok(s) = UnixStream::connect(&sock) {
                break s;
            }
            assert!(child.try_wait().unwrap().is_none(), "{label} exited early");
            assert!(Instant::now() < deadline, "{label}: no QMP socket");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut qmp = Client::new(stream);
        qmp.negotiate();
        Guest {
            label,
            child,
            stdin,
            out,
            qmp,
            _dir: dir,
        }
    }

    /// Waits until the console shows `needle` (from byte `from` on); the text after `from`.
    fn wait_for(&mut self, from: usize, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let text = self.out.lock().unwrap()[from..].to_owned();
            if text.contains(needle) {
                return text;
            }
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("{}: exited ({st}) before {needle:?}:\n{text}", self.label);
            }
            assert!(
                Instant::now() < deadline,
                "{}: no {needle:?} in:\n{text}",
                self.label
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Types `line` into the guest's shell; returns where its output starts.
    fn run(&mut self, line: &str) -> usize {
        let from = self.out.lock().unwrap().len();
        self.stdin.write_all(line.as_bytes()).unwrap();
        self.stdin.write_all(b"\n").unwrap();
        self.stdin.flush().unwrap();
        from
    }

    fn hmp(&mut self, line: &str) -> String {
        let r = self
            .qmp
            .ok("human-monitor-command", json!({"command-line": line}));
        r.as_str().unwrap_or_default().to_owned()
    }
}

/// `Seccomp_filters` of each thread of process `pid`, by thread name.
fn seccomp_filters(pid: u32) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        if let Some(v) = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp_filters:"))
        {
            out.insert(comm.trim().to_owned(), v.trim().to_owned());
        }
    }
    out
}

/// A host connection to `port` that sends `send` and returns everything the guest wrote
/// back before it closed.
fn exchange(port: u16, send: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.write_all(send.as_bytes()).unwrap();
    let mut line = String::new();
    let _ = BufReader::new(&s).read_line(&mut line);
    let _ = s.shutdown(std::net::Shutdown::Both);
    line
}

/// What a run of the scenario saw, for comparing programs.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    lease: String,
    host_got: String,
    guest_got_reply: bool,
    fwd_reply: String,
    guest_got_fwd: bool,
    hmp_add: String,
    run_fwd_reply: String,
    hmp_remove: String,
    hmp_remove_again: String,
}

/// The scenario on one program; `net` holds the network options, with `{HP}` for the
/// command line's host forward port.
fn scenario(program: &str, machine: &str, net: &[&str]) -> Seen {
    let hp = free_port();
    let net: Vec<String> = net
        .iter()
        .map(|a| a.replace("{HP}", &hp.to_string()))
        .collect();
    // The host's TCP server the guest reaches at 10.0.2.2.
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let sport = server.local_addr().unwrap().port();
    let host_side = std::thread::spawn(move || {
        let (mut c, _) = server.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut line = String::new();
        BufReader::new(&c).read_line(&mut line).unwrap();
        c.write_all(b"KEEL-HOST-REPLY over slirp\n").unwrap();
        line
    });

    let mut g = Guest::start(program, machine, &net);
    g.wait_for(0, "KEEL-GUEST-SHELL");
    // The markers are split with '' so that the shell's echo of the command never matches.
    let from = g.run(concat!(
        "printf '#!/bin/sh\\n[ \"$1\" = bound ] && ip addr add $ip/$mask dev $interface && ",
        "ip route add default via $router && echo KEEL-LEASE $ip/$mask via $router\\n' > /tmp/d.sh; ",
        "chmod +x /tmp/d.sh; ip link set eth0 up; udhcpc -i eth0 -f -q -n -t 10 -T 2 -s /tmp/d.sh ",
        "|| echo KEEL-''DHCP-FAILED"
    ));
    let text = g.wait_for(from, "KEEL-LEASE 10.0.2.15");
    let lease = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("KEEL-LEASE") && !l.contains('$'))
        .unwrap_or_default()
        .to_owned();

    let from = g.run(&format!(
        "echo guest-to-host | nc 10.0.2.2 {sport} | sed 's/^/KEEL-GUEST-GOT /'; echo KEEL-''NC-DONE"
    ));
    let text = g.wait_for(from, "KEEL-NC-DONE");
    let guest_got_reply = text.contains("KEEL-GUEST-GOT KEEL-HOST-REPLY over slirp");
    let host_got = host_side.join().unwrap().trim().to_owned();

    // hostfwd from the command line: host port -> guest 7777.
    let listen = format!(
        "(echo KEEL-GUEST-''SERVER | nc -l -p {GUEST_PORT} > /tmp/got &); sleep 1; \
         netstat -ltn | grep -q ':{GUEST_PORT} ' && echo KEEL-''LISTENING"
    );
    let from = g.run(&listen);
    g.wait_for(from, "KEEL-LISTENING");
    let fwd_reply = exchange(hp, "host-through-hostfwd\n").trim().to_owned();
    let from = g.run("sleep 1; sed 's/^/KEEL-FWD-GOT /' /tmp/got; echo KEEL-''CAT-DONE");
    let text = g.wait_for(from, "KEEL-CAT-DONE");
    let guest_got_fwd = text.contains("KEEL-FWD-GOT host-through-hostfwd");

    // A forward added at run time through HMP, then removed.
    let hp2 = free_port();
    let hmp_add = g.hmp(&format!("hostfwd_add tcp:127.0.0.1:{hp2}-:{GUEST_PORT}"));
    let from = g.run(&listen);
    g.wait_for(from, "KEEL-LISTENING");
    let run_fwd_reply = exchange(hp2, "second\n").trim().to_owned();
    let hmp_remove = g
        .hmp(&format!("hostfwd_remove tcp:127.0.0.1:{hp2}"))
        .replace(&hp2.to_string(), "PORT");
    let hmp_remove_again = g
        .hmp(&format!("hostfwd_remove tcp:127.0.0.1:{hp2}"))
        .replace(&hp2.to_string(), "PORT");
    assert!(
        TcpStream::connect(("127.0.0.1", hp2)).is_err(),
        "{}: the removed forward still listens",
        g.label
    );
    if program == common::BIN {
        // Keel's sandbox is on by default: the slirp thread added its class's filter to
        // the baseline, as a vCPU thread adds its own.
        let filters = seccomp_filters(g.child.id());
        let slirp = filters.get("slirp");
        assert!(
            slirp.is_some() && slirp == filters.get("vcpu0") && slirp != filters.get("signals"),
            "seccomp filters per thread: {filters:?}"
        );
    }
    g.qmp.ok("quit", serde_json::Value::Null);
    Seen {
        lease,
        host_got,
        guest_got_reply,
        fwd_reply,
        guest_got_fwd,
        hmp_add,
        run_fwd_reply,
        hmp_remove,
        hmp_remove_again,
    }
}

fn expected() -> Seen {
    Seen {
        lease: "KEEL-LEASE 10.0.2.15/24 via 10.0.2.2".into(),
        host_got: "guest-to-host".into(),
        guest_got_reply: true,
        fwd_reply: "KEEL-GUEST-SERVER".into(),
        guest_got_fwd: true,
        hmp_add: String::new(),
        run_fwd_reply: "KEEL-GUEST-SERVER".into(),
        hmp_remove: "host forwarding rule for tcp:127.0.0.1:PORT removed\r\n".into(),
        hmp_remove_again: "host forwarding rule for tcp:127.0.0.1:PORT not found\r\n".into(),
    }
}

fn both(machine: &str, net: &[&str]) {
    if let Some(why) = unavailable() {
        eprintln!("{why}");
        return;
    }
    let keel = scenario(common::BIN, machine, net);
    eprintln!("Keel on {machine}: {keel:?}");
    assert_eq!(keel, expected(), "Keel on {machine}");
    if Path::new(QEMU).exists() {
        let qemu = scenario(QEMU, machine, net);
        eprintln!("QEMU on {machine}: {qemu:?}");
        assert_eq!(qemu, keel, "QEMU 7.2 and Keel differ on {machine}");
    } else {
        eprintln!("QEMU 7.2 not installed: Keel only");
    }
}

#[test]
fn netdev_user_on_microvm_dhcp_tcp_and_hostfwd() {
    both(
        "microvm",
        &[
            "-netdev",
            "user,id=n0,hostfwd=tcp:127.0.0.1:{HP}-:7777",
            "-device",
            "virtio-net-device,netdev=n0",
        ],
    );
}

#[test]
fn nic_user_on_pc_dhcp_tcp_and_hostfwd() {
    both(
        "pc",
        &[
            "-nic",
            "user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{HP}-:7777",
        ],
    );
}

/// With libslirp hidden (a bind mount of /dev/null over it, in a mount namespace of the
/// test's own), a VM without a user network starts and ends as usual, and only
/// `-netdev user` fails, naming the package. Skips where `unshare -m` is not permitted.
#[test]
fn without_libslirp_only_netdev_user_fails() {
    let Ok(lib) = std::fs::canonicalize("/usr/lib/x86_64-linux-gnu/libslirp.so.0") else {
        eprintln!("skipped: libslirp.so.0 is not installed");
        return;
    };
    let hide = |args: &[&str]| {
        let out = Command::new("unshare")
            .args([
                "-m",
                "sh",
                "-c",
                r#"mount --bind /dev/null "$0" && exec "$@""#,
            ])
            .arg(&lib)
            .arg(common::BIN)
            .args(["-display", "none", "-nodefaults"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (st, err) = hide(&[]);
    if err.contains("unshare") || err.contains("mount") {
        eprintln!("skipped: cannot hide the library here: {err}");
        return;
    }
    assert!(
        st.success(),
        "the demo guest without a user network: {st} {err}"
    );
    let (st, err) = hide(&["-netdev", "user,id=n0"]);
    assert!(!st.success());
    assert!(
        err.contains("user-mode networking needs libslirp (")
            && err.contains("install the libslirp0 package"),
        "{err}"
    );
}
