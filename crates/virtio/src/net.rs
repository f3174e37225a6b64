//! virtio-net (`virtio-net-device`) over a tap interface, a user network (libslirp, see
//! `keel-slirp`) or any [`NetBackend`].

use keel_qdev::{BusType, DeviceType, PropSpec, Props};
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_accel::GuestMemory;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;

use crate::chain::{self, ParsedChain};
use crate::device::{Activation, Active, Outcome, VirtioDevice, read_config_bytes};
use crate::tap::Tap;
use crate::{Error, features};

/// Length of the virtio 1.x net header (`virtio_net_hdr_v1`, with `num_buffers`) that
/// precedes every frame on the queues and on the backend.
pub const NET_HDR_LEN: usize = 12;
/// Largest frame accepted, header included (64 KiB of payload plus Ethernet and header).
pub const MAX_FRAME_LEN: usize = 65_562;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const QUEUE_SIZE: u16 = 256;
const CONFIG_LEN: usize = 12;

/// A packet backend: frames carry a [`NET_HDR_LEN`]-byte virtio-net header first.
pub trait NetBackend: Send {
    /// Receives one frame into `buf`; `ErrorKind::WouldBlock` when none is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Sends one frame.
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
    /// The descriptor that becomes readable when a frame waits, for the owner's event loop.
    fn raw_fd(&self) -> Option<RawFd>;
}

/// Options of a [`Net`] device (`-device virtio-net-device,mac=..`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    /// The guest's MAC address.
    pub mac: [u8; 6],
}

impl Default for NetConfig {
    /// QEMU's default MAC for the first NIC, 52:54:00:12:34:56.
    fn default() -> Self {
        Self {
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
        }
    }
}

impl NetConfig {
    /// Parses `aa:bb:cc:dd:ee:ff`; multicast addresses are refused.
    pub fn parse_mac(s: &str) -> Result<[u8; 6], Error> {
        let bad = || Error::InvalidMac(s.to_string());
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut mac {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() || mac[0] & 1 != 0 {
            return Err(bad());
        }
        Ok(mac)
    }
}

/// What [`Net::poll_rx`] stopped on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxState {
    /// The backend has no more frames: wait until its descriptor is readable.
    Drained,
    /// A frame waits but the guest has posted no receive buffer; receiving resumes by
    /// itself when the guest notifies its receive queue. An event loop watching the
    /// backend level-triggered should stop watching until then (or use edge-triggered).
    NeedBuffers,
    /// The device is not running (not activated, reset, or in its error state).
    Inactive,
}

/// A virtio network device with one receive and one transmit queue, no offloads.
pub struct Net {
    backend: Box<dyn NetBackend>,
    config: [u8; CONFIG_LEN],
    queue_sizes: [u16; 2],
    rx_frame: Vec<u8>,
    rx_len: Option<usize>,
    tx_frame: Vec<u8>,
    active: Option<Active>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("mac", &&self.config[..6])
            .field("rx_pending", &self.rx_len)
            .field("active", &self.active.is_some())
            .finish()
    }
}

impl Net {
    /// QEMU's driver name for this device on virtio-mmio.
    pub const DRIVER: &'static str = "virtio-net-device";

    /// A device over `backend`.
    pub fn new(backend: Box<dyn NetBackend>, config: NetConfig) -> Self {
        let mut cfg = [0u8; CONFIG_LEN];
        cfg[..6].copy_from_slice(&config.mac);
        Self {
            backend,
            config: cfg,
            queue_sizes: [QUEUE_SIZE; 2],
            rx_frame: vec![0; MAX_FRAME_LEN],
            rx_len: None,
            tx_frame: Vec::with_capacity(MAX_FRAME_LEN),
            active: None,
        }
    }

    /// A device over the tap interface `ifname` (`-netdev tap,ifname=IF,script=no,downscript=no`).
    pub fn with_tap(ifname: &str, config: NetConfig) -> Result<Self, Error> {
        Ok(Self::new(Box::new(Tap::open(ifname)?), config))
    }

    /// A device on user network `net` (`-netdev user`); fails if another device uses it.
    pub fn with_user(net: &keel_slirp::UserNet, config: NetConfig) -> Result<Self, Error> {
        let port = net.attach().map_err(|e| Error::UserNet(e.to_string()))?;
        Ok(Self::new(Box::new(port), config))
    }

    /// The backend descriptor to watch for readability (register it with the event loop,
    /// edge-triggered, and call [`Net::poll_rx`] when it fires).
    pub fn rx_fd(&self) -> Option<RawFd> {
        self.backend.raw_fd()
    }

    /// Moves frames from the backend into guest receive buffers until one side runs out.
    pub fn poll_rx(&mut self) -> RxState {
        let Some(active) = self.active.as_mut() else {
            return RxState::Inactive;
        };
        let mut used = false;
        let state = loop {
            if active.interrupt.needs_reset() {
                break RxState::Inactive;
            }
            let len = match self.rx_len {
                Some(len) => len,
                None => match self.backend.recv(&mut self.rx_frame) {
                    // A backend at end of file has nothing more to give.
                    Ok(0) => break RxState::Drained,
                    Ok(len) if len >= NET_HDR_LEN => {
                        self.rx_len = Some(len);
                        len
                    }
                    Ok(len) => {
                        log::debug!("virtio-net: dropping {len}-byte runt from the backend");
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        if e.kind() != io::ErrorKind::WouldBlock {
                            log::warn!("virtio-net: backend receive failed: {e}");
                        }
                        break RxState::Drained;
                    }
                },
            };
            let Some((head, req)) = active.pop(RX_QUEUE) else {
                break if active.interrupt.needs_reset() {
                    RxState::Inactive
                } else {
                    RxState::NeedBuffers
                };
            };
            self.rx_len = None;
            if !req.readable.is_empty() {
                active.fail("net receive buffer is device-readable");
                break RxState::Inactive;
            }
            let frame = &mut self.rx_frame[..len];
            // No offloads were negotiated: plain header, one buffer per frame.
            frame[..NET_HDR_LEN].fill(0);
            frame[10..12].copy_from_slice(&1u16.to_le_bytes());
            let written = if req.writable_len() < len as u64 {
                log::debug!(
                    "virtio-net: {len}-byte frame does not fit the receive buffer; dropped"
                );
                0
            } else {
                chain::write_bytes(&active.memory, &req.writable, 0, frame)
            };
            if !active.put_used(RX_QUEUE, head, written as u32) {
                break RxState::Inactive;
            }
            used = true;
        };
        if used {
            active.signal_used(RX_QUEUE);
        }
        state
    }

    fn transmit(
        backend: &mut dyn NetBackend,
        frame: &mut Vec<u8>,
        mem: &GuestMemory,
        req: &ParsedChain,
    ) -> Outcome {
        if !req.writable.is_empty() {
            return Outcome::Broken("net transmit buffer is device-writable".into());
        }
        let len = req.readable_len();
        if len < NET_HDR_LEN as u64 || len > MAX_FRAME_LEN as u64 {
            log::debug!("virtio-net: dropping transmit of {len} bytes");
            return Outcome::Used(0);
        }
        frame.clear();
        frame.resize(len as usize, 0);
        if chain::read_bytes(mem, &req.readable, 0, frame) != frame.len() {
            return Outcome::Used(0);
        }
        // The guest's header asks for nothing we offered; send a clean one.
        frame[..NET_HDR_LEN].fill(0);
        if let Err(e) = backend.send(frame) {
            log::debug!("virtio-net: backend send failed, frame dropped: {e}");
        }
        Outcome::Used(0)
    }
}

/// A user network's port carries bare Ethernet frames: the header is added on the way to
/// the guest (no offloads, so all zero) and taken off on the way out.
impl NetBackend for keel_slirp::UserPort {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(payload) = buf.get_mut(NET_HDR_LEN..) else {
            return Err(io::ErrorKind::InvalidInput.into());
        };
        let n = keel_slirp::UserPort::recv(self, payload)?;
        buf[..NET_HDR_LEN].fill(0);
        Ok(n + NET_HDR_LEN)
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        keel_slirp::UserPort::send(self, frame.get(NET_HDR_LEN..).unwrap_or_default())
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.fd())
    }
}

/// A thread that feeds a [`Net`] device's receive path without an event loop: it waits
/// for the backend to become readable and calls [`Net::poll_rx`]. Stops when dropped.
#[derive(Debug)]
pub struct RxPoller {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RxPoller {
    /// Starts polling `device`'s backend; fails if the backend has no descriptor.
    pub fn spawn(device: Arc<Mutex<Net>>) -> io::Result<Self> {
        let fd = device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .rx_fd()
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::Unsupported, "backend has no descriptor")
            })?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("virtio-net-rx".into())
            .spawn(move || {
                keel_sandbox::enter(keel_sandbox::ThreadClass::Worker);
                while !flag.load(Ordering::Acquire) {
                    let mut pfd = libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: `pfd` is one valid pollfd; the descriptor stays open while the
                    // device (held by this thread) lives.
                    let n = unsafe { libc::poll(&mut pfd, 1, 100) };
                    if n <= 0 {
                        continue;
                    }
                    let state = device.lock().unwrap_or_else(|p| p.into_inner()).poll_rx();
                    // The descriptor stays readable while a frame waits for guest buffers
                    // (the guest's receive notify resumes delivery): back off meanwhile.
                    match state {
                        RxState::Drained => {}
                        RxState::NeedBuffers => std::thread::sleep(Duration::from_millis(2)),
                        RxState::Inactive => std::thread::sleep(Duration::from_millis(50)),
                    }
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for RxPoller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn features(&self) -> u64 {
        features::VERSION_1 | features::RING_INDIRECT_DESC | 1 << VIRTIO_NET_F_MAC
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), Error> {
        self.active = Some(Active::new(activation, &[0, 1])?);
        self.poll_rx();
        Ok(())
    }

    fn queue_notify(&mut self, index: u16) {
        match usize::from(index) {
            RX_QUEUE => {
                self.poll_rx();
            }
            TX_QUEUE => {
                let Some(active) = self.active.as_mut() else {
                    return;
                };
                let backend = &mut self.backend;
                let frame = &mut self.tx_frame;
                active.process(TX_QUEUE, |mem, req| {
                    Self::transmit(backend.as_mut(), frame, mem, req)
                });
            }
            _ => {}
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.rx_len = None;
    }
}

/// The validated `-device virtio-net-device` properties ([`Net::qdev_type`]). The tap comes
/// from the network backend `netdev` names, which the caller looks up:
///
/// ```ignore
/// let p = NetProps::from_props(dev.props)?;
/// let net = Net::with_tap(&backends.net(&p.netdev)?.ifname, p.config())?;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetProps {
    /// Network backend id (`netdev=`).
    pub netdev: String,
    /// Guest MAC address (`mac=`).
    pub mac: [u8; 6],
}

impl NetProps {
    /// From the properties [`Net::qdev_type`] validated; parses the MAC address.
    pub fn from_props(props: &Props) -> Result<Self, Error> {
        let netdev = props.str("netdev").ok_or(Error::Property {
            driver: Net::QDEV_TYPE,
            property: "netdev",
        })?;
        let mac = match props.str("mac") {
            Some(m) => NetConfig::parse_mac(m)?,
            None => NetConfig::default().mac,
        };
        Ok(Self {
            netdev: netdev.to_owned(),
            mac,
        })
    }

    /// The device configuration.
    pub fn config(&self) -> NetConfig {
        NetConfig { mac: self.mac }
    }
}

impl Net {
    /// QEMU's type name.
    pub const QDEV_TYPE: &'static str = "virtio-net-device";

    /// The qdev type: `virtio-net-device` on a virtio-mmio bus, properties `netdev`
    /// (required) and `mac`. See [`NetProps`].
    pub fn qdev_type() -> DeviceType {
        DeviceType::new(Self::QDEV_TYPE, BusType::VirtioMmio)
            .category(keel_qdev::Category::Network)
            .description("virtio network device (tap or user backend)")
            .prop(PropSpec::string("netdev").description("network backend id (netdev_add)"))
            .prop(
                PropSpec::string("mac")
                    .default_str("52:54:00:12:34:56")
                    .description("guest MAC address"),
            )
            .prop(
                PropSpec::int32("bootindex")
                    .default_i64(-1)
                    .range(-1, i32::MAX.into())
                    .description("boot order (Keel boots -kernel directly: kept for introspection and uniqueness)"),
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixDatagram;

    /// A backend whose other end the test holds: one datagram per frame.
    struct Pair(UnixDatagram);
    impl NetBackend for Pair {
        fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.0.recv(buf)
        }
        fn send(&mut self, frame: &[u8]) -> io::Result<()> {
            self.0.send(frame).map(|_| ())
        }
        fn raw_fd(&self) -> Option<RawFd> {
            Some(self.0.as_raw_fd())
        }
    }

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; NET_HDR_LEN];
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&NetConfig::default().mac);
        f.extend_from_slice(&[0x88, 0xb5]);
        f.extend_from_slice(payload);
        f
    }

    fn rig() -> (
        Arc<GuestMemory>,
        Arc<Mutex<Net>>,
        crate::MmioTransport,
        UnixDatagram,
    ) {
        let (a, b) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        let mem = memory();
        let (dev, t, _) = transport(Net::new(Box::new(Pair(a)), NetConfig::default()), &mem);
        (mem, dev, t, b)
    }

    #[test]
    fn config_has_mac() {
        let (_, _, t, _) = rig();
        assert_eq!(rd(&t, 0x8), 1);
        let mut mac = [0u8; 6];
        for (i, b) in mac.iter_mut().enumerate() {
            let mut d = [0u8; 1];
            keel_accel::BusDevice::read(&t, 0x100 + i as u64, &mut d);
            *b = d[0];
        }
        assert_eq!(mac, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        wr(&t, 0x14, 0);
        assert_ne!(rd(&t, 0x10) & 1 << VIRTIO_NET_F_MAC, 0);
    }

    #[test]
    fn transmit_sends_clean_header_and_frame() {
        let (mem, _, t, peer) = rig();
        let rx = TestQueue::new(&mem, 0, 256);
        let mut tx = TestQueue::new(&mem, 0x8000, 256);
        bring_up(&t, &[&rx, &tx]);
        let mut f = frame(b"ping");
        f[0] = 0x01; // guest asks for checksum offload it never negotiated
        fill(&mem, DATA, &f[..NET_HDR_LEN]);
        fill(&mem, DATA + 0x100, &f[NET_HDR_LEN..]);
        tx.add(&[
            (DATA, NET_HDR_LEN as u32, false),
            (DATA + 0x100, (f.len() - NET_HDR_LEN) as u32, false),
        ]);
        notify(&t, 1);
        let mut got = [0u8; 2048];
        let n = peer.recv(&mut got).unwrap();
        assert_eq!(&got[..n], &frame(b"ping")[..]);
        assert_eq!(tx.used(0), (0, 0));
        assert_eq!(rd(&t, 0x60), 1);
    }

    #[test]
    fn receive_waits_for_buffers_then_delivers() {
        let (mem, dev, t, peer) = rig();
        let mut rx = TestQueue::new(&mem, 0, 256);
        let tx = TestQueue::new(&mem, 0x8000, 256);
        bring_up(&t, &[&rx, &tx]);
        assert_eq!(dev.lock().unwrap().poll_rx(), RxState::Drained);
        peer.send(&frame(b"one")).unwrap();
        peer.send(&frame(b"two")).unwrap();
        assert_eq!(dev.lock().unwrap().poll_rx(), RxState::NeedBuffers);
        rx.add(&[(DATA, 1526, true)]);
        rx.add(&[(DATA + 0x1000, 1526, true)]);
        notify(&t, 0); // the guest's rx notify resumes receiving
        assert_eq!(rx.used_idx(), 2);
        let want = frame(b"one");
        assert_eq!(rx.used(0), (0, want.len() as u32));
        let mut hdr = vec![0u8; NET_HDR_LEN];
        hdr[10] = 1; // num_buffers
        assert_eq!(fetch(&mem, DATA, NET_HDR_LEN), hdr);
        assert_eq!(
            fetch(&mem, DATA + NET_HDR_LEN as u64, want.len() - NET_HDR_LEN),
            &want[NET_HDR_LEN..]
        );
        assert_eq!(
            &fetch(&mem, DATA + 0x1000 + NET_HDR_LEN as u64, 17)[14..],
            b"two"
        );
        assert_eq!(dev.lock().unwrap().poll_rx(), RxState::Drained);
    }

    #[test]
    fn frame_larger_than_buffer_is_dropped() {
        let (mem, dev, t, peer) = rig();
        let mut rx = TestQueue::new(&mem, 0, 256);
        let tx = TestQueue::new(&mem, 0x8000, 256);
        bring_up(&t, &[&rx, &tx]);
        rx.add(&[(DATA, 20, true)]);
        peer.send(&frame(b"too long for twenty bytes")).unwrap();
        assert_eq!(dev.lock().unwrap().poll_rx(), RxState::Drained);
        assert_eq!(rx.used(0), (0, 0));
    }

    #[test]
    fn hostile_transmit_needs_reset() {
        let (mem, dev, t, peer) = rig();
        let rx = TestQueue::new(&mem, 0, 256);
        let tx = TestQueue::new(&mem, 0x8000, 256);
        bring_up(&t, &[&rx, &tx]);
        tx.store(0, DATA, 64, 1, 0); // NEXT pointing at itself
        tx.publish(0);
        notify(&t, 1);
        assert!(needs_reset(&t));
        peer.send(&frame(b"x")).unwrap();
        assert_eq!(dev.lock().unwrap().poll_rx(), RxState::Inactive);
    }

    #[test]
    fn rx_poller_delivers_without_an_event_loop() {
        let (mem, dev, t, peer) = rig();
        let mut rx = TestQueue::new(&mem, 0, 256);
        let tx = TestQueue::new(&mem, 0x8000, 256);
        bring_up(&t, &[&rx, &tx]);
        rx.add(&[(DATA, 1526, true)]);
        notify(&t, 0);
        let poller = RxPoller::spawn(Arc::clone(&dev)).unwrap();
        peer.send(&frame(b"async")).unwrap();
        let mut waited = 0;
        while rx.used_idx() == 0 && waited < 500 {
            std::thread::sleep(std::time::Duration::from_millis(10));
            waited += 1;
        }
        drop(poller);
        assert_eq!(rx.used_idx(), 1);
        assert_eq!(&fetch(&mem, DATA + NET_HDR_LEN as u64 + 14, 5), b"async");
    }

    #[test]
    fn missing_queue_fails_activation() {
        let (mem, dev, t, peer) = rig();
        let rx = TestQueue::new(&mem, 0, 256);
        bring_up(&t, &[&rx]); // transmit queue never made ready
        assert!(needs_reset(&t));
        peer.send(&frame(b"x")).unwrap();
        assert_eq!(dev.lock().unwrap().poll_rx(), RxState::Inactive);
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            NetConfig::parse_mac("52:54:00:AB:cd:01").unwrap(),
            [0x52, 0x54, 0, 0xab, 0xcd, 1]
        );
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:01:02",
            "01:00:00:00:00:00",
            "5:54:00:ab:cd:01",
            "zz:54:00:ab:cd:01",
        ] {
            assert!(NetConfig::parse_mac(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn invalid_ifname_is_refused() {
        assert!(matches!(Tap::open(""), Err(Error::InvalidIfname(_))));
        assert!(matches!(
            Tap::open("a-very-long-ifname"),
            Err(Error::InvalidIfname(_))
        ));
    }

    /// Real tap in a private network namespace: guest frames reach the host interface
    /// and host frames reach the guest. Skips (with the reason) where tap is unusable.
    #[test]
    fn tap_exchanges_frames_in_a_netns() {
        std::thread::spawn(tap_exchange).join().unwrap();
    }

    fn tap_exchange() {
        // SAFETY: unshare only changes this thread's network namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "skipped: cannot make a network namespace: {}",
                io::Error::last_os_error()
            );
            return;
        }
        let tap = match Tap::open("kvtap%d") {
            Ok(t) => t,
            Err(e) => {
                eprintln!("skipped: {e}: {:?}", std::error::Error::source(&e));
                return;
            }
        };
        let ifname = tap.ifname().to_string();
        assert!(ifname.starts_with("kvtap"));
        let packet = host::PacketSocket::open(&ifname);
        let mem = memory();
        let (dev, t, _) = transport(Net::new(Box::new(tap), NetConfig::default()), &mem);
        let mut rx = TestQueue::new(&mem, 0, 256);
        let mut tx = TestQueue::new(&mem, 0x8000, 256);
        bring_up(&t, &[&rx, &tx]);

        // Guest -> host.
        let f = frame(b"keel guest to host");
        fill(&mem, DATA, &f);
        tx.add(&[(DATA, f.len() as u32, false)]);
        notify(&t, 1);
        assert!(
            packet.wait_for(b"keel guest to host"),
            "host never saw the guest frame"
        );

        // Host -> guest: give the guest buffers, send, poll as an event loop would.
        for i in 0..16u64 {
            rx.add(&[(DATA + 0x1_0000 + i * 0x1000, 2048, true)]);
        }
        notify(&t, 0);
        packet.send(&f[NET_HDR_LEN..NET_HDR_LEN + 12], b"keel host to guest");
        let mut found = false;
        for _ in 0..200 {
            dev.lock().unwrap().poll_rx();
            for i in 0..rx.used_idx() {
                let (id, len) = rx.used(i);
                let addr = DATA + 0x1_0000 + u64::from(id) * 0x1000;
                let data = fetch(&mem, addr, len as usize);
                if data.windows(18).any(|w| w == b"keel host to guest") {
                    found = true;
                }
            }
            if found {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(found, "guest never received the host frame");
    }

    /// Host side of the tap test: link up and an AF_PACKET socket on the interface.
    mod host {
        use std::ffi::CString;
        use std::io;

        pub(super) struct PacketSocket {
            fd: libc::c_int,
            ifindex: libc::c_int,
        }

        impl Drop for PacketSocket {
            fn drop(&mut self) {
                // SAFETY: closing a descriptor this struct owns.
                unsafe { libc::close(self.fd) };
            }
        }

        #[repr(C)]
        struct IfReqFlags {
            name: [u8; 16],
            flags: libc::c_short,
            _pad: [u8; 22],
        }

        impl PacketSocket {
            pub(super) fn open(ifname: &str) -> Self {
                let cname = CString::new(ifname).unwrap();
                // SAFETY: plain socket/ioctl calls on descriptors created here with
                // correctly sized arguments.
                unsafe {
                    let ctl = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
                    assert!(ctl >= 0);
                    let mut req = IfReqFlags {
                        name: [0; 16],
                        flags: 0,
                        _pad: [0; 22],
                    };
                    req.name[..ifname.len()].copy_from_slice(ifname.as_bytes());
                    assert_eq!(libc::ioctl(ctl, libc::SIOCGIFFLAGS, &mut req), 0);
                    req.flags |= libc::IFF_UP as libc::c_short;
                    assert_eq!(
                        libc::ioctl(ctl, libc::SIOCSIFFLAGS, &mut req),
                        0,
                        "{}",
                        io::Error::last_os_error()
                    );
                    libc::close(ctl);
                    let ifindex = libc::if_nametoindex(cname.as_ptr()) as libc::c_int;
                    assert!(ifindex > 0);
                    let fd = libc::socket(
                        libc::AF_PACKET,
                        libc::SOCK_RAW,
                        (libc::ETH_P_ALL as u16).to_be() as i32,
                    );
                    assert!(fd >= 0, "{}", io::Error::last_os_error());
                    let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                    sll.sll_family = libc::AF_PACKET as u16;
                    sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
                    sll.sll_ifindex = ifindex;
                    let rc = libc::bind(
                        fd,
                        &sll as *const _ as *const libc::sockaddr,
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    );
                    assert_eq!(rc, 0);
                    let tv = libc::timeval {
                        tv_sec: 0,
                        tv_usec: 100_000,
                    };
                    libc::setsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        libc::SO_RCVTIMEO,
                        &tv as *const _ as *const libc::c_void,
                        std::mem::size_of::<libc::timeval>() as u32,
                    );
                    Self { fd, ifindex }
                }
            }

            /// Waits up to ~2 s for a frame containing `needle`.
            pub(super) fn wait_for(&self, needle: &[u8]) -> bool {
                let mut buf = [0u8; 2048];
                for _ in 0..20 {
                    // SAFETY: reading into a live buffer of the given length.
                    let n = unsafe { libc::recv(self.fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                    if n > 0 && buf[..n as usize].windows(needle.len()).any(|w| w == needle) {
                        return true;
                    }
                }
                false
            }

            /// Sends an Ethernet frame (`dst, src` MACs given as 12 bytes) with `payload`.
            pub(super) fn send(&self, macs: &[u8], payload: &[u8]) {
                let mut f = macs.to_vec();
                f.truncate(12);
                f[..6].copy_from_slice(&super::NetConfig::default().mac);
                f.extend_from_slice(&[0x88, 0xb5]);
                f.extend_from_slice(payload);
                // SAFETY: zeroed sockaddr_ll is valid; sendto reads `f` and the address.
                unsafe {
                    let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                    sll.sll_family = libc::AF_PACKET as u16;
                    sll.sll_ifindex = self.ifindex;
                    sll.sll_halen = 6;
                    let n = libc::sendto(
                        self.fd,
                        f.as_ptr().cast(),
                        f.len(),
                        0,
                        &sll as *const _ as *const libc::sockaddr,
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    );
                    assert_eq!(n, f.len() as isize, "{}", io::Error::last_os_error());
                }
            }
        }
    }
}
