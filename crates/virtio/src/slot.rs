//! Where a virtio-mmio device sits, and how a guest learns of it.

use std::sync::Arc;

use keel_accel::{BusError, IoBuses};

use crate::MmioTransport;

/// Size of one virtio-mmio register window (registers up to 0x100, config space after).
pub const MMIO_WINDOW_SIZE: u64 = 0x200;

/// One virtio-mmio slot of a machine: its MMIO window and its interrupt.
///
/// The machine chooses the slots (QEMU's microvm puts them at the top of the 32-bit MMIO
/// hole, one GSI each) and uses this to (a) map the transport, (b) add a `LNRO0005`
/// device to the ACPI DSDT and (c) optionally add a `virtio_mmio.device=` argument for
/// kernels built with `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES` (Debian's are not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioSlot {
    /// Guest-physical base of the window.
    pub base: u64,
    /// GSI the device interrupts on (level-triggered, active high).
    pub irq: u32,
}

impl VirtioMmioSlot {
    /// The ACPI hardware ID Linux's virtio_mmio driver matches (`LNRO0005`).
    pub const ACPI_HID: &'static str = "LNRO0005";
    /// Window length, as [`MMIO_WINDOW_SIZE`].
    pub const SIZE: u64 = MMIO_WINDOW_SIZE;

    /// A slot at `base` interrupting on `irq`.
    pub fn new(base: u64, irq: u32) -> Self {
        Self { base, irq }
    }

    /// `virtio_mmio.device=512@0xADDR:IRQ`, for kernels that parse it.
    pub fn kernel_cmdline_arg(&self) -> String {
        format!(
            "virtio_mmio.device={}@{:#x}:{}",
            MMIO_WINDOW_SIZE, self.base, self.irq
        )
    }

    /// The DSDT device name for slot number `index` (`VR00`, `VR01`, ... as QEMU's microvm).
    pub fn acpi_name(index: usize) -> String {
        format!("VR{:02X}", index & 0xff)
    }

    /// Maps `transport` at this slot on the MMIO bus.
    pub fn attach(&self, buses: &IoBuses, transport: Arc<MmioTransport>) -> Result<(), BusError> {
        buses.mmio.insert(self.base, MMIO_WINDOW_SIZE, transport)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_and_names() {
        let s = VirtioMmioSlot::new(0xfeb0_0000, 12);
        assert_eq!(
            s.kernel_cmdline_arg(),
            "virtio_mmio.device=512@0xfeb00000:12"
        );
        assert_eq!(VirtioMmioSlot::acpi_name(10), "VR0A");
        assert_eq!(VirtioMmioSlot::ACPI_HID, "LNRO0005");
    }
}
