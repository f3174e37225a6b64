//! The stack driven with hand-made frames, as a guest NIC would: ARP, UDP to a host
//! socket through 10.0.2.2, a `hostfwd` listener reaching the guest. Skips (saying so)
//! where libslirp is not installed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use std::net::{TcpListener, TcpStream, UdpSocket};

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const GUEST_IP: [u8; 4] = [10, 0, 2, 15];
const HOST_IP: [u8; 4] = [10, 0, 2, 2];

fn have_lib() -> bool {
    match library_version() {
        Ok(v) => {
            eprintln!("libslirp {v}");
            true
        }
        Err(e) => {
            eprintln!("skipped: {e}");
            false
        }
    }
}

fn arp_request(target: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&GUEST_IP);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target);
    f
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn udp_frame(dst_mac: [u8; 6], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = dst_mac.to_vec();
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&GUEST_IP);
    ip.extend_from_slice(&dst);
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]); // no UDP checksum
    f.extend_from_slice(payload);
    f
}

/// Waits for a frame the predicate accepts (up to 5 s).
fn wait_frame(port: &mut UserPort, what: &str, ok: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 65536];
    loop {
        match port.recv(&mut buf) {
            Ok(n) if ok(&buf[..n]) => return buf[..n].to_vec(),
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no {what} from the stack");
                let mut p = libc::pollfd {
                    fd: port.fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut p, 1, 100) };
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// ARP for the gateway: the reply teaches the test slirp's MAC and slirp the guest's.
fn arp_gateway(port: &mut UserPort) -> [u8; 6] {
    port.send(&arp_request(HOST_IP)).unwrap();
    let reply = wait_frame(port, "ARP reply", |f| {
        f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2]
    });
    assert_eq!(&reply[28..32], &HOST_IP);
    assert_eq!(&reply[0..6], &GUEST_MAC);
    reply[22..28].try_into().unwrap()
}

#[test]
fn arp_and_udp_reach_a_host_socket_through_the_gateway() {
    if !have_lib() {
        return;
    }
    let net = UserNet::start(UserConfig::default()).unwrap();
    let mut port = net.attach().unwrap();
    assert!(matches!(net.attach(), Err(Error::InUse)));
    let gw_mac = arp_gateway(&mut port);

    // 10.0.2.2 is the host's loopback to the guest.
    let host = UdpSocket::bind("127.0.0.1:0").unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let hport = host.local_addr().unwrap().port();
    port.send(&udp_frame(
        gw_mac,
        HOST_IP,
        4000,
        hport,
        b"keel guest says hi",
    ))
    .unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = host.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"keel guest says hi");
    host.send_to(b"keel host answers", from).unwrap();
    let f = wait_frame(&mut port, "UDP answer", |f| {
        f.len() > 42 && f[12..14] == [0x08, 0x00] && f[23] == 17
    });
    assert_eq!(&f[26..30], &HOST_IP, "source is the gateway");
    assert_eq!(&f[30..34], &GUEST_IP);
    assert_eq!(u16::from_be_bytes([f[36], f[37]]), 4000);
    assert_eq!(&f[42..], b"keel host answers");
}

#[test]
fn hostfwd_listens_on_the_host_and_connects_into_the_guest() {
    if !have_lib() {
        return;
    }
    let free = TcpListener::bind("127.0.0.1:0").unwrap();
    let hport = free.local_addr().unwrap().port();
    drop(free);
    let mut cfg = UserConfig::default();
    cfg.hostfwd
        .push(HostFwd::parse(&format!("tcp:127.0.0.1:{hport}-:7777")).unwrap());
    let net = UserNet::start(cfg).unwrap();
    let mut port = net.attach().unwrap();
    arp_gateway(&mut port);
    let _client = TcpStream::connect(("127.0.0.1", hport)).unwrap();
    // The stack opens the connection into the guest: a SYN to 10.0.2.15:7777.
    let syn = wait_frame(&mut port, "TCP SYN", |f| {
        f.len() >= 54 && f[12..14] == [0x08, 0x00] && f[23] == 6
    });
    assert_eq!(&syn[30..34], &GUEST_IP);
    assert_eq!(u16::from_be_bytes([syn[36], syn[37]]), 7777);
    assert_eq!(syn[47] & 0x02, 0x02, "SYN flag");

    // A second network cannot take the same host port; the message names the rule.
    let mut cfg = UserConfig::default();
    let rule = format!("tcp:127.0.0.1:{hport}-:22");
    cfg.hostfwd.push(HostFwd::parse(&rule).unwrap());
    let e = UserNet::start(cfg).unwrap_err().to_string();
    assert!(
        e.contains(&format!("Could not set up host forwarding rule '{rule}'")),
        "{e}"
    );

    // Removing and adding at run time (HMP hostfwd_remove / hostfwd_add).
    assert!(
        net.hostfwd_remove(&format!("tcp:127.0.0.1:{hport}"))
            .unwrap()
    );
    assert!(
        !net.hostfwd_remove(&format!("tcp:127.0.0.1:{hport}"))
            .unwrap()
    );
    assert!(
        TcpStream::connect(("127.0.0.1", hport)).is_err(),
        "listener closed"
    );
    net.hostfwd_add(&format!("tcp:127.0.0.1:{hport}-:7778"))
        .unwrap();
    let _again = TcpStream::connect(("127.0.0.1", hport)).unwrap();
    let syn = wait_frame(&mut port, "TCP SYN to 7778", |f| {
        f.len() >= 54 && f[23] == 6 && u16::from_be_bytes([f[36], f[37]]) == 7778
    });
    assert_eq!(syn[47] & 0x02, 0x02);
}

#[test]
fn frames_for_no_device_are_dropped_and_a_port_can_be_taken_again() {
    if !have_lib() {
        return;
    }
    let net = UserNet::start(UserConfig::default()).unwrap();
    let mut port = net.attach().unwrap();
    arp_gateway(&mut port);
    drop(port);
    let mut port = net.attach().unwrap();
    let mut buf = [0u8; 2048];
    assert_eq!(
        port.recv(&mut buf).unwrap_err().kind(),
        io::ErrorKind::WouldBlock
    );
    arp_gateway(&mut port);
}
