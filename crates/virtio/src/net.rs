//! virtio-net (`virtio-net-device`) over a tap interface or any [`NetBackend`].

use std::io;
use std::os::fd::RawFd;

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
            active.interrupt.signal_used_queue();
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
        self.active = Some(Active::from_activation(activation));
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
