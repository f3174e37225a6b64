//! Message-signalled interrupts: the MSI and MSI-X capabilities, the MSI-X table and
//! pending-bit array, and [`MsiSink`], through which the machine delivers a message
//! (through the local APIC under tcg, KVM's MSI routing or an irqfd under KVM), and the
//! INTx pin as a level line.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use keel_accel::IrqLine;

use crate::PciError;
use crate::config::{PciConfig, cap_id};

/// One message: the address and data the guest programmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MsiMessage {
    /// Message address (on x86: 0xFEEx_xxxx, destination and mode bits).
    pub address: u64,
    /// Message data (vector, delivery mode, trigger).
    pub data: u32,
}

/// Where a function's messages go; the machine implements it.
pub trait MsiSink: Send + Sync {
    /// Delivers one message. Called with the function's interrupt state locked: do not
    /// call back into the function.
    fn deliver(&self, msg: MsiMessage);
}

/// What [`Msix::notify`] did with an interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsixOutcome {
    /// The message went to the sink.
    Delivered,
    /// The vector or the function is masked: the pending bit is set and the message goes
    /// out when it is unmasked.
    Pending,
    /// MSI-X is enabled but the vector does not exist (e.g. virtio's `NO_VECTOR`): nothing.
    NoVector,
    /// MSI-X is disabled: the caller uses INTx.
    Disabled,
}

/// Size of one MSI-X table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Most vectors one MSI-X capability can have.
pub const MSIX_MAX_VECTORS: u16 = 2048;

const CTRL_ENABLE: u16 = 1 << 15;
const CTRL_FUNCTION_MASK: u16 = 1 << 14;
const ENTRY_MASKED: u32 = 1;

/// MSI-X state of one function: the capability (in config space), the table and the PBA
/// (in a BAR region the owner decodes and forwards here).
///
/// Table entries start masked, as the specification requires. The owner calls
/// [`Msix::config_written`] after every guest configuration write so that enabling or
/// unmasking the function sends the messages that were pending.
pub struct Msix {
    cap: u8,
    vectors: u16,
    table: Vec<u8>,
    pending: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    sink: Arc<dyn MsiSink>,
}

impl std::fmt::Debug for Msix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msix")
            .field("cap", &self.cap)
            .field("vectors", &self.vectors)
            .field("enabled", &self.enabled)
            .field("function_masked", &self.function_masked)
            .finish()
    }
}

impl Msix {
    /// Adds an MSI-X capability with `vectors` entries to `config`: table at
    /// `table_offset` in BAR `table_bar`, PBA at `pba_offset` in BAR `pba_bar` (offsets
    /// 8-byte aligned). Messages go to `sink`.
    pub fn new(
        config: &mut PciConfig,
        vectors: u16,
        (table_bar, table_offset): (u8, u32),
        (pba_bar, pba_offset): (u8, u32),
        sink: Arc<dyn MsiSink>,
    ) -> Result<Self, PciError> {
        if vectors == 0 || vectors > MSIX_MAX_VECTORS {
            return Err(PciError::MsixVectors(vectors));
        }
        let ctrl = vectors - 1;
        let mut body = Vec::with_capacity(10);
        body.extend_from_slice(&ctrl.to_le_bytes());
        body.extend_from_slice(&(table_offset & !7 | u32::from(table_bar & 7)).to_le_bytes());
        body.extend_from_slice(&(pba_offset & !7 | u32::from(pba_bar & 7)).to_le_bytes());
        let wmask = (CTRL_ENABLE | CTRL_FUNCTION_MASK).to_le_bytes();
        let cap = config.add_capability(cap_id::MSIX, &body, &wmask)?;
        let mut m = Self {
            cap,
            vectors,
            table: vec![0; usize::from(vectors) * MSIX_ENTRY_SIZE as usize],
            pending: vec![0; usize::from(vectors).div_ceil(64)],
            enabled: false,
            function_masked: false,
            sink,
        };
        m.reset();
        Ok(m)
    }

    /// Number of vectors.
    pub fn vectors(&self) -> u16 {
        self.vectors
    }
    /// Offset of the capability in config space.
    pub fn cap_offset(&self) -> u8 {
        self.cap
    }
    /// Size of the table in bytes.
    pub fn table_size(&self) -> u64 {
        u64::from(self.vectors) * MSIX_ENTRY_SIZE
    }
    /// Size of the PBA in bytes (whole qwords).
    pub fn pba_size(&self) -> u64 {
        self.pending.len() as u64 * 8
    }
    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.enabled
    }
    /// Whether the function mask is set.
    pub fn function_masked(&self) -> bool {
        self.function_masked
    }

    fn entry_u32(&self, vector: u16, word: usize) -> u32 {
        let o = usize::from(vector) * MSIX_ENTRY_SIZE as usize + word * 4;
        self.table
            .get(o..o + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map_or(0, u32::from_le_bytes)
    }

    /// Whether vector `vector` is masked in its entry.
    pub fn vector_masked(&self, vector: u16) -> bool {
        self.entry_u32(vector, 3) & ENTRY_MASKED != 0
    }
    /// The message vector `vector` holds.
    pub fn message(&self, vector: u16) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.entry_u32(vector, 0))
                | u64::from(self.entry_u32(vector, 1)) << 32,
            data: self.entry_u32(vector, 2),
        }
    }
    /// Whether vector `vector` has a pending message.
    pub fn is_pending(&self, vector: u16) -> bool {
        let v = usize::from(vector);
        self.pending
            .get(v / 64)
            .is_some_and(|w| w >> (v % 64) & 1 == 1)
    }
    fn set_pending(&mut self, vector: u16, on: bool) {
        let v = usize::from(vector);
        if let Some(w) = self.pending.get_mut(v / 64) {
            if on {
                *w |= 1 << (v % 64);
            } else {
                *w &= !(1 << (v % 64));
            }
        }
    }

    /// Signals vector `vector` (see [`MsixOutcome`]).
    pub fn notify(&mut self, vector: u16) -> MsixOutcome {
        if !self.enabled {
            return MsixOutcome::Disabled;
        }
        if vector >= self.vectors {
            return MsixOutcome::NoVector;
        }
        if self.function_masked || self.vector_masked(vector) {
            self.set_pending(vector, true);
            return MsixOutcome::Pending;
        }
        self.sink.deliver(self.message(vector));
        MsixOutcome::Delivered
    }

    /// Sends the pending message of `vector` if it may go now.
    fn flush(&mut self, vector: u16) {
        if self.enabled
            && !self.function_masked
            && !self.vector_masked(vector)
            && self.is_pending(vector)
        {
            self.set_pending(vector, false);
            self.sink.deliver(self.message(vector));
        }
    }

    /// Takes the enable and function-mask bits from the capability after a guest config
    /// write; enabling or unmasking sends what was pending.
    pub fn config_written(&mut self, config: &PciConfig) {
        let ctrl = config.read_u16(usize::from(self.cap) + 2);
        self.enabled = ctrl & CTRL_ENABLE != 0;
        self.function_masked = ctrl & CTRL_FUNCTION_MASK != 0;
        for v in 0..self.vectors {
            self.flush(v);
        }
    }

    /// Guest read in the table region; any width, bytes outside read as zero.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| self.table.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    /// Guest write in the table region; any width. Only bit 0 of the vector control
    /// word is writable there. Unmasking a vector with a pending message sends it.
    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        let mut touched = Vec::new();
        for (i, v) in data.iter().enumerate() {
            let Some(o) = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .filter(|&o| o < self.table.len())
            else {
                break;
            };
            let mask = match o % 16 {
                12 => 0x01,
                13..=15 => 0x00,
                _ => 0xff,
            };
            self.table[o] = (self.table[o] & !mask) | (v & mask);
            let vector = (o / 16) as u16;
            if touched.last() != Some(&vector) {
                touched.push(vector);
            }
        }
        for v in touched {
            self.flush(v);
        }
    }

    /// Guest read in the PBA region (read-only); any width.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| self.pending.get(o / 8).map(|w| (w >> (o % 8 * 8)) as u8))
                .unwrap_or(0);
        }
    }

    /// The table and the pending bits (a snapshot; the enable and mask bits are in the
    /// configuration space).
    pub fn save(&self) -> (Vec<u8>, Vec<u64>) {
        (self.table.clone(), self.pending.clone())
    }

    /// Checks that a saved table and pending array fit this capability.
    pub fn check(&self, table: &[u8], pending: &[u64]) -> Result<(), String> {
        if table.len() != self.table.len() || pending.len() != self.pending.len() {
            return Err(format!(
                "the saved MSI-X table has {} vectors, this function {}",
                table.len() / MSIX_ENTRY_SIZE as usize,
                self.vectors
            ));
        }
        Ok(())
    }

    /// Puts back a saved table and pending array (checked with [`Msix::check`]) and takes
    /// the enable and mask bits from `config` (restored first); the reserved bits of each
    /// vector control word stay zero.
    pub fn restore(&mut self, table: &[u8], pending: &[u64], config: &PciConfig) {
        if self.check(table, pending).is_err() {
            return;
        }
        self.table.copy_from_slice(table);
        for (i, b) in self.table.iter_mut().enumerate() {
            match i % 16 {
                12 => *b &= ENTRY_MASKED as u8,
                13..=15 => *b = 0,
                _ => {}
            }
        }
        self.pending.copy_from_slice(pending);
        if let Some(last) = self.pending.last_mut() {
            let used = usize::from(self.vectors) % 64;
            if used != 0 {
                *last &= (1u64 << used) - 1;
            }
        }
        self.config_written(config);
    }

    /// Function reset: every entry masked and cleared, nothing pending, MSI-X disabled
    /// (the capability bits are reset with the config space).
    pub fn reset(&mut self) {
        self.table.fill(0);
        for v in 0..usize::from(self.vectors) {
            self.table[v * 16 + 12] = ENTRY_MASKED as u8;
        }
        self.pending.fill(0);
        self.enabled = false;
        self.function_masked = false;
    }
}

/// A single-vector MSI capability with 64-bit addresses and per-vector masking. Its state
/// lives in config space; this is where it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Msi {
    cap: u8,
}

const MSI_CTRL_ENABLE: u16 = 1;
const MSI_CTRL_64BIT: u16 = 1 << 7;
const MSI_CTRL_PVM: u16 = 1 << 8;

impl Msi {
    /// Adds the capability to `config` (one vector: Multiple Message Capable = 0).
    pub fn new(config: &mut PciConfig) -> Result<Self, PciError> {
        let ctrl = MSI_CTRL_64BIT | MSI_CTRL_PVM;
        let mut body = vec![0u8; 22];
        body[..2].copy_from_slice(&ctrl.to_le_bytes());
        // ctrl: enable and Multiple Message Enable; address low (dword aligned), address
        // high, data (16 bits), reserved, mask bits (one vector), pending (read-only).
        let wmask = [
            0x71, 0x00, 0xfc, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00, 0x00,
            0x01, 0x00, 0x00, 0x00,
        ];
        let cap = config.add_capability(cap_id::MSI, &body, &wmask)?;
        Ok(Self { cap })
    }

    /// Offset of the capability.
    pub fn cap_offset(&self) -> u8 {
        self.cap
    }
    fn off(&self, rel: usize) -> usize {
        usize::from(self.cap) + rel
    }
    /// Whether the guest enabled MSI.
    pub fn enabled(&self, config: &PciConfig) -> bool {
        config.read_u16(self.off(2)) & MSI_CTRL_ENABLE != 0
    }
    /// The programmed message.
    pub fn message(&self, config: &PciConfig) -> MsiMessage {
        MsiMessage {
            address: u64::from(config.read_u32(self.off(4)))
                | u64::from(config.read_u32(self.off(8))) << 32,
            data: u32::from(config.read_u16(self.off(12))),
        }
    }
    /// Whether the vector is masked.
    pub fn masked(&self, config: &PciConfig) -> bool {
        config.read_u32(self.off(16)) & 1 != 0
    }
    /// Whether a message is pending.
    pub fn pending(&self, config: &PciConfig) -> bool {
        config.read_u32(self.off(20)) & 1 != 0
    }

    /// Signals the vector: delivered, or pending while masked; `false` when MSI is off
    /// (use INTx).
    pub fn notify(&self, config: &mut PciConfig, sink: &dyn MsiSink) -> bool {
        if !self.enabled(config) {
            return false;
        }
        if self.masked(config) {
            config.poke_u32(self.off(20), 1);
        } else {
            sink.deliver(self.message(config));
        }
        true
    }

    /// After a guest config write: an unmasked vector with a pending message sends it.
    pub fn config_written(&self, config: &mut PciConfig, sink: &dyn MsiSink) {
        if self.enabled(config) && !self.masked(config) && self.pending(config) {
            config.poke_u32(self.off(20), 0);
            sink.deliver(self.message(config));
        }
    }
}

/// The INTx pin of a function as a level line: asserted by the device, forwarded to the
/// machine's line unless the command register's INTx-disable bit is set.
pub struct IntxLine {
    line: Arc<dyn IrqLine>,
    asserted: AtomicBool,
    disabled: AtomicBool,
}

impl std::fmt::Debug for IntxLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntxLine")
            .field("asserted", &self.asserted())
            .field("disabled", &self.disabled.load(Ordering::Acquire))
            .finish()
    }
}

impl IntxLine {
    /// A pin that drives `line` (the GSI the machine routes the pin to).
    pub fn new(line: Arc<dyn IrqLine>) -> Self {
        Self {
            line,
            asserted: AtomicBool::new(false),
            disabled: AtomicBool::new(false),
        }
    }
    /// Whether the device asserts the pin (the status register's interrupt bit).
    pub fn asserted(&self) -> bool {
        self.asserted.load(Ordering::Acquire)
    }
    /// Follows the command register's INTx-disable bit.
    pub fn set_disabled(&self, disabled: bool) {
        if self.disabled.swap(disabled, Ordering::AcqRel) != disabled {
            self.line.set_level(self.asserted() && !disabled);
        }
    }
}

impl IrqLine for IntxLine {
    fn set_level(&self, high: bool) {
        self.asserted.store(high, Ordering::Release);
        self.line
            .set_level(high && !self.disabled.load(Ordering::Acquire));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::PciIds;
    use std::sync::Mutex;

    #[derive(Default)]
    pub(crate) struct Recorder(pub(crate) Mutex<Vec<MsiMessage>>);
    impl MsiSink for Recorder {
        fn deliver(&self, msg: MsiMessage) {
            self.0.lock().unwrap().push(msg);
        }
    }

    fn setup() -> (PciConfig, Msix, Arc<Recorder>) {
        let mut c = PciConfig::new(PciIds::default());
        let sink = Arc::new(Recorder::default());
        let m = Msix::new(&mut c, 3, (1, 0), (1, 0x800), sink.clone()).unwrap();
        (c, m, sink)
    }

    fn program(m: &mut Msix, v: u16, addr: u64, data: u32) {
        let o = u64::from(v) * 16;
        m.table_write(o, &(addr as u32).to_le_bytes());
        m.table_write(o + 4, &((addr >> 32) as u32).to_le_bytes());
        m.table_write(o + 8, &data.to_le_bytes());
    }

    #[test]
    fn capability_layout() {
        let (c, m, _) = setup();
        let o = usize::from(m.cap_offset());
        assert_eq!(c.read_u8(o), 0x11);
        assert_eq!(c.read_u16(o + 2), 2, "table size - 1");
        assert_eq!(c.read_u32(o + 4), 1);
        assert_eq!(c.read_u32(o + 8), 0x801);
        assert_eq!((m.table_size(), m.pba_size()), (48, 8));
    }

    #[test]
    fn masking_and_pending() {
        let (mut c, mut m, sink) = setup();
        assert_eq!(m.notify(0), MsixOutcome::Disabled);
        let ctrl = usize::from(m.cap_offset()) + 2;
        c.write(ctrl as u64, &0xc000u16.to_le_bytes());
        m.config_written(&c);
        assert!(m.enabled() && m.function_masked());
        program(&mut m, 1, 0xfee0_0000, 0x41);
        // Entries start masked.
        assert_eq!(m.notify(1), MsixOutcome::Pending);
        let mut pba = [0u8; 8];
        m.pba_read(0, &mut pba);
        assert_eq!(pba[0], 0b010);
        // Unmasking the entry alone does not send: the function is masked.
        m.table_write(16 + 12, &0u32.to_le_bytes());
        assert!(sink.0.lock().unwrap().is_empty());
        // Clearing the function mask sends the pending message once.
        c.write(ctrl as u64, &0x8000u16.to_le_bytes());
        m.config_written(&c);
        assert_eq!(
            sink.0.lock().unwrap().as_slice(),
            &[MsiMessage {
                address: 0xfee0_0000,
                data: 0x41
            }]
        );
        assert!(!m.is_pending(1));
        assert_eq!(m.notify(1), MsixOutcome::Delivered);
        assert_eq!(m.notify(3), MsixOutcome::NoVector);
        assert_eq!(sink.0.lock().unwrap().len(), 2);
        // Per-vector mask, then unmask by a byte write.
        m.table_write(16 + 12, &[1]);
        assert_eq!(m.notify(1), MsixOutcome::Pending);
        m.table_write(16 + 12, &[0]);
        assert_eq!(sink.0.lock().unwrap().len(), 3);
        // Reserved vector-control bits and the PBA are read-only.
        m.table_write(16 + 12, &0xffff_fffeu32.to_le_bytes());
        let mut d = [0u8; 4];
        m.table_read(16 + 12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0);
        m.table_read(u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }

    #[test]
    fn msi_pending_while_masked() {
        let mut c = PciConfig::new(PciIds::default());
        let msi = Msi::new(&mut c).unwrap();
        let sink = Recorder::default();
        assert!(!msi.notify(&mut c, &sink));
        let o = u64::from(msi.cap_offset());
        c.write(o + 4, &0xfee0_1000u32.to_le_bytes());
        c.write(o + 12, &0x0031u16.to_le_bytes());
        c.write(o + 16, &1u32.to_le_bytes());
        c.write(o + 2, &1u16.to_le_bytes());
        assert!(msi.notify(&mut c, &sink));
        assert!(msi.pending(&c));
        c.write(o + 20, &0u32.to_le_bytes());
        assert!(msi.pending(&c), "pending bits are read-only");
        c.write(o + 16, &0u32.to_le_bytes());
        msi.config_written(&mut c, &sink);
        assert_eq!(
            sink.0.lock().unwrap().as_slice(),
            &[MsiMessage {
                address: 0xfee0_1000,
                data: 0x31
            }]
        );
        assert!(!msi.pending(&c));
    }
}
