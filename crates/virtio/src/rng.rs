//! virtio-rng (`virtio-rng-device`), fed from the host's `/dev/urandom`.

use keel_qdev::{BusType, DeviceType};
use std::fs::File;
use std::io::Read;

use keel_accel::GuestMemory;
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;

use crate::chain::{self, ParsedChain};
use crate::device::{Activation, Active, Outcome, VirtioDevice};
use crate::{Error, features};

/// Most bytes given for one request; a larger buffer is filled only this far (the
/// driver asks again), so one notify cannot keep a vCPU thread reading for long.
pub const MAX_BYTES_PER_REQUEST: u64 = 64 * 1024;
/// QEMU's virtio-rng queue size (drivers read it; Linux's hw_random posts one buffer at a
/// time).
const QUEUE_SIZE: u16 = 8;

/// A virtio entropy device.
pub struct Rng {
    source: Box<dyn Read + Send>,
    queue_sizes: [u16; 1],
    active: Option<Active>,
}

impl std::fmt::Debug for Rng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rng")
            .field("active", &self.active.is_some())
            .finish()
    }
}

impl Rng {
    /// QEMU's driver name for this device on virtio-mmio.
    pub const DRIVER: &'static str = "virtio-rng-device";
    /// The host entropy source.
    pub const SOURCE: &'static str = "/dev/urandom";

    /// An entropy device reading the host's `/dev/urandom`.
    pub fn new() -> Result<Self, Error> {
        let file = File::open(Self::SOURCE).map_err(|source| Error::OpenEntropy {
            path: Self::SOURCE.to_string(),
            source,
        })?;
        Ok(Self::with_source(Box::new(file)))
    }

    /// An entropy device reading `source` (tests use a deterministic one).
    pub fn with_source(source: Box<dyn Read + Send>) -> Self {
        Self {
            source,
            queue_sizes: [QUEUE_SIZE],
            active: None,
        }
    }

    fn handle(&mut self, mem: &GuestMemory, req: &ParsedChain) -> Outcome {
        if !req.readable.is_empty() {
            return Outcome::Broken("entropy request with a device-readable buffer".into());
        }
        let want = req.writable_len().min(MAX_BYTES_PER_REQUEST);
        let mut buf = [0u8; 4096];
        let mut done = 0u64;
        while done < want {
            let n = (want - done).min(buf.len() as u64) as usize;
            if let Err(e) = self.source.read_exact(&mut buf[..n]) {
                log::warn!("virtio-rng: entropy source failed: {e}");
                break;
            }
            let w = chain::write_bytes(mem, &req.writable, done, &buf[..n]);
            done += w as u64;
            if w < n {
                break;
            }
        }
        Outcome::Used(done as u32)
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn features(&self) -> u64 {
        features::VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), Error> {
        self.active = Some(Active::new(activation, &[0])?);
        Ok(())
    }

    fn queue_notify(&mut self, index: u16) {
        let Some(mut active) = self.active.take() else {
            return;
        };
        active.process(usize::from(index), |mem, req| self.handle(mem, req));
        self.active = Some(active);
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

impl Rng {
    /// QEMU's type name.
    pub const QDEV_TYPE: &'static str = "virtio-rng-device";

    /// The qdev type: `virtio-rng-device` on a virtio-mmio bus, with QEMU's `rng` (the id
    /// of an `rng-random` or `rng-builtin` object; empty: the host's `/dev/urandom`, which
    /// is what QEMU's default `rng-builtin` gives too). The machine resolves it.
    pub fn qdev_type() -> DeviceType {
        DeviceType::new(Self::QDEV_TYPE, BusType::VirtioMmio)
            .category(keel_qdev::Category::Misc)
            .description("virtio entropy device (host /dev/urandom)")
            .prop(
                keel_qdev::PropSpec::string("rng")
                    .default_str("")
                    .description("ID of an rng-random or rng-builtin object"),
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    fn rig() -> (Arc<GuestMemory>, crate::MmioTransport) {
        let mem = memory();
        let (_, t, _) = transport(Rng::with_source(Box::new(std::io::repeat(0xab))), &mem);
        (mem, t)
    }

    use std::sync::Arc;

    #[test]
    fn fills_writable_buffers() {
        let (mem, t) = rig();
        let mut q = TestQueue::new(&mem, 0, 8);
        bring_up(&t, &[&q]);
        assert_eq!(rd(&t, 0x8), 4);
        q.add(&[(DATA, 32, true), (DATA + 0x100, 16, true)]);
        notify(&t, 0);
        assert_eq!(q.used(0), (0, 48));
        assert_eq!(fetch(&mem, DATA, 32), vec![0xab; 32]);
        assert_eq!(fetch(&mem, DATA + 0x100, 16), vec![0xab; 16]);
        assert_eq!(fetch(&mem, DATA + 32, 1), vec![0]);
    }

    #[test]
    fn large_request_is_capped() {
        let (mem, t) = rig();
        let mut q = TestQueue::new(&mem, 0, 8);
        bring_up(&t, &[&q]);
        q.add(&[(DATA, 1 << 20, true)]);
        notify(&t, 0);
        assert_eq!(u64::from(q.used(0).1), MAX_BYTES_PER_REQUEST);
    }

    #[test]
    fn readable_buffer_needs_reset() {
        let (mem, t) = rig();
        let mut q = TestQueue::new(&mem, 0, 8);
        bring_up(&t, &[&q]);
        q.add(&[(DATA, 32, false)]);
        notify(&t, 0);
        assert!(needs_reset(&t));
        assert_eq!(q.used_idx(), 0);
    }

    #[test]
    fn host_urandom_opens() {
        let mut rng = Rng::new().unwrap();
        let mut b = [0u8; 64];
        rng.source.read_exact(&mut b).unwrap();
        assert_ne!(b, [0u8; 64]);
    }
}

#[cfg(test)]
mod suppression_tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn no_interrupt_flag_is_honoured() {
        let mem = memory();
        let (_, t, line) = transport(Rng::with_source(Box::new(std::io::repeat(1))), &mem);
        let mut q = TestQueue::new(&mem, 0, 8);
        bring_up(&t, &[&q]);
        fill(&mem, q.vq.avail_addr().0, &[1, 0]); // VRING_AVAIL_F_NO_INTERRUPT
        q.add(&[(DATA, 8, true)]);
        notify(&t, 0);
        assert_eq!(q.used_idx(), 1, "request served");
        assert_eq!(rd(&t, 0x60), 0, "but no interrupt");
        assert_eq!(line.raises.load(std::sync::atomic::Ordering::SeqCst), 0);
        fill(&mem, q.vq.avail_addr().0, &[0, 0]);
        q.add(&[(DATA, 8, true)]);
        notify(&t, 0);
        assert_eq!(rd(&t, 0x60), 1);
    }
}
