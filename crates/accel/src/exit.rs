//! Owned vCPU exits and the pure function that handles them.

use crate::bus::{IoBuses, MmioAddress, PioAddress};

/// Why [`crate::Vcpu::run`] returned. Owned: borrows nothing from the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum VcpuExit {
    /// `in` of `size` bytes (1, 2 or 4); answer with [`crate::Vcpu::complete_read`].
    IoIn {
        /// Port.
        port: PioAddress,
        /// Access size in bytes.
        size: u8,
    },
    /// `out` of `size` bytes; `data` holds the value in its low bytes.
    IoOut {
        /// Port.
        port: PioAddress,
        /// Access size in bytes.
        size: u8,
        /// Value written.
        data: u64,
    },
    /// Load of `size` bytes (1..=8) from a non-RAM address; answer with `complete_read`.
    MmioRead {
        /// Guest-physical address.
        addr: MmioAddress,
        /// Access size in bytes.
        size: u8,
    },
    /// Store of `size` bytes to a non-RAM address.
    MmioWrite {
        /// Guest-physical address.
        addr: MmioAddress,
        /// Access size in bytes.
        size: u8,
        /// Value written (low bytes).
        data: u64,
    },
    /// The vCPU executed `hlt` and nothing can wake it inside the backend.
    Halted,
    /// Triple fault: the CPU shut down.
    Shutdown,
    /// The platform asked for a reset (e.g. a KVM system event).
    Reset,
    /// The platform asked to power off.
    PowerOff,
    /// [`crate::Kick::kick`] was called: the caller has work (pause, quit, reset).
    Interrupted,
}

/// What the vCPU loop does after an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitAction {
    /// Run again.
    Resume,
    /// Hand `data` to [`crate::Vcpu::complete_read`], then run again.
    CompleteRead(u64),
    /// Wait for an interrupt or a kick, then run again.
    WaitForInterrupt,
    /// Check the VMM's requests (pause, quit, reset) before running again.
    CheckRequests,
    /// The CPU triple-faulted.
    TripleFault,
    /// Reset the machine.
    Reset,
    /// Power off the machine.
    PowerOff,
}

/// Handles one exit against the machine's buses. Pure: no backend, no `/dev/kvm`.
#[inline]
pub fn handle_exit(exit: &VcpuExit, buses: &IoBuses) -> ExitAction {
    match *exit {
        VcpuExit::IoIn { port, size } => {
            let mut buf = [0u8; 8];
            let n = usize::from(size).clamp(1, 4);
            buses.pio_read(port, &mut buf[..n]);
            ExitAction::CompleteRead(u64::from_le_bytes(buf))
        }
        VcpuExit::IoOut { port, size, data } => {
            let bytes = data.to_le_bytes();
            let n = usize::from(size).clamp(1, 4);
            buses.pio_write(port, &bytes[..n]);
            ExitAction::Resume
        }
        VcpuExit::MmioRead { addr, size } => {
            let mut buf = [0u8; 8];
            let n = usize::from(size).clamp(1, 8);
            buses.mmio_read(addr, &mut buf[..n]);
            ExitAction::CompleteRead(u64::from_le_bytes(buf))
        }
        VcpuExit::MmioWrite { addr, size, data } => {
            let bytes = data.to_le_bytes();
            let n = usize::from(size).clamp(1, 8);
            buses.mmio_write(addr, &bytes[..n]);
            ExitAction::Resume
        }
        VcpuExit::Halted => ExitAction::WaitForInterrupt,
        VcpuExit::Shutdown => ExitAction::TripleFault,
        VcpuExit::Reset => ExitAction::Reset,
        VcpuExit::PowerOff => ExitAction::PowerOff,
        VcpuExit::Interrupted => ExitAction::CheckRequests,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use std::sync::{Arc, Mutex};

    struct Reg(Mutex<u32>);
    impl BusDevice for Reg {
        fn read(&self, _offset: u64, data: &mut [u8]) {
            let v = self.0.lock().unwrap().to_le_bytes();
            let n = data.len().min(4);
            data[..n].copy_from_slice(&v[..n]);
        }
        fn write(&self, _offset: u64, data: &[u8]) {
            let mut b = [0u8; 4];
            let n = data.len().min(4);
            b[..n].copy_from_slice(&data[..n]);
            *self.0.lock().unwrap() = u32::from_le_bytes(b);
        }
    }

    #[test]
    fn fabricated_pio_round_trip() {
        let buses = IoBuses::new();
        buses
            .pio
            .insert(0x510, 2, Arc::new(Reg(Mutex::new(0))))
            .unwrap();
        let w = VcpuExit::IoOut {
            port: PioAddress(0x510),
            size: 2,
            data: 0xdead_beef,
        };
        assert_eq!(handle_exit(&w, &buses), ExitAction::Resume);
        let r = VcpuExit::IoIn {
            port: PioAddress(0x510),
            size: 4,
        };
        assert_eq!(handle_exit(&r, &buses), ExitAction::CompleteRead(0xbeef));
    }

    #[test]
    fn unassigned_reads_are_all_ones_of_the_access_size() {
        let buses = IoBuses::new();
        let r = VcpuExit::IoIn {
            port: PioAddress(0x80),
            size: 1,
        };
        assert_eq!(handle_exit(&r, &buses), ExitAction::CompleteRead(0xff));
        let m = VcpuExit::MmioRead {
            addr: MmioAddress(0xfee0_0000),
            size: 4,
        };
        assert_eq!(
            handle_exit(&m, &buses),
            ExitAction::CompleteRead(0xffff_ffff)
        );
    }

    #[test]
    fn hostile_sizes_are_clamped() {
        let buses = IoBuses::new();
        buses
            .mmio
            .insert(0x1000, 0x10, Arc::new(Reg(Mutex::new(7))))
            .unwrap();
        let m = VcpuExit::MmioRead {
            addr: MmioAddress(0x1000),
            size: 200,
        };
        assert_eq!(handle_exit(&m, &buses), ExitAction::CompleteRead(7));
        let z = VcpuExit::MmioWrite {
            addr: MmioAddress(0x1000),
            size: 0,
            data: 9,
        };
        assert_eq!(handle_exit(&z, &buses), ExitAction::Resume);
    }

    #[test]
    fn lifecycle_exits_map_to_actions() {
        let buses = IoBuses::new();
        assert_eq!(
            handle_exit(&VcpuExit::Halted, &buses),
            ExitAction::WaitForInterrupt
        );
        assert_eq!(
            handle_exit(&VcpuExit::Shutdown, &buses),
            ExitAction::TripleFault
        );
        assert_eq!(
            handle_exit(&VcpuExit::Interrupted, &buses),
            ExitAction::CheckRequests
        );
    }
}
