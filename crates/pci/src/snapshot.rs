//! The saved state of a PCI function (what [`crate::PciDevice::save_state`] returns for the
//! functions of this crate): the configuration space as the guest and the firmware role
//! programmed it (command, BARs, interrupt line, capability registers), and for a virtio-pci
//! function the transport (`keel_virtio::TransportSnapshot`: status, feature selects,
//! driver features, queue select, every queue's setup and ring position, ISR, configuration
//! generation), the MSI-X vector of each source, the MSI-X table and the pending bits.
//!
//! A restore puts back only what a guest could have written: the read-only bits of the
//! configuration space stay this function's ([`PciConfig::restore_image`]), vector numbers
//! past the table become "no vector", and the transport is checked against the device
//! (type, queue count, queue sizes) before anything changes.

use keel_snapshot::{Dec, DecodeError, Enc, Persist};
use keel_virtio::TransportSnapshot;

use crate::PciError;
use crate::config::{CONFIG_SPACE_SIZE, PciConfig};

/// Layout version of [`FunctionState`] (the machine writes it in the section frame).
pub const FUNCTION_STATE_VERSION: u32 = 1;

/// The virtio-pci part of a function's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioPciState {
    /// The transport-neutral virtio state.
    pub transport: TransportSnapshot,
    /// The MSI-X vector of configuration changes.
    pub config_vector: u16,
    /// The MSI-X vector of each queue.
    pub queue_vectors: Vec<u16>,
    /// The MSI-X table (16 bytes per vector).
    pub msix_table: Vec<u8>,
    /// The MSI-X pending bits (one bit per vector).
    pub msix_pending: Vec<u64>,
}

/// A PCI function's saved state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionState {
    /// The 256 bytes of the configuration space.
    pub config: [u8; CONFIG_SPACE_SIZE],
    /// The virtio-pci transport's state, for a virtio-pci function.
    pub virtio: Option<VirtioPciState>,
}

impl Persist for FunctionState {
    fn encode(&self, e: &mut Enc) {
        e.fixed(&self.config);
        match &self.virtio {
            None => {
                e.u8(0);
            }
            Some(v) => {
                e.u8(1).put(&v.transport).u16(v.config_vector);
                e.u32(v.queue_vectors.len() as u32);
                for &q in &v.queue_vectors {
                    e.u16(q);
                }
                e.bytes(&v.msix_table);
                e.u32(v.msix_pending.len() as u32);
                for &p in &v.msix_pending {
                    e.u64(p);
                }
            }
        }
    }

    fn decode(d: &mut Dec<'_>) -> Result<Self, DecodeError> {
        let config = d.fixed::<CONFIG_SPACE_SIZE>("configuration space")?;
        let virtio = match d.u8("transport kind")? {
            0 => None,
            _ => {
                let transport = d.get::<TransportSnapshot>()?;
                let config_vector = d.u16("configuration vector")?;
                let n = d.count("queue vector count", 2)?;
                let mut queue_vectors = Vec::with_capacity(n);
                for _ in 0..n {
                    queue_vectors.push(d.u16("queue vector")?);
                }
                let msix_table = d.bytes("MSI-X table")?.to_vec();
                let n = d.count("MSI-X pending words", 8)?;
                let mut msix_pending = Vec::with_capacity(n);
                for _ in 0..n {
                    msix_pending.push(d.u64("MSI-X pending bits")?);
                }
                Some(VirtioPciState {
                    transport,
                    config_vector,
                    queue_vectors,
                    msix_table,
                    msix_pending,
                })
            }
        };
        Ok(Self { config, virtio })
    }
}

/// Decodes a saved state, naming the field that failed.
pub(crate) fn decode(state: &[u8]) -> Result<FunctionState, PciError> {
    FunctionState::from_payload(state).map_err(|e| PciError::StateMismatch(e.to_string()))
}

/// The state of a function made of its configuration space only.
pub(crate) fn save_config(config: &PciConfig) -> Vec<u8> {
    FunctionState {
        config: config.image(),
        virtio: None,
    }
    .to_payload()
}

/// The configuration image of a state saved by [`save_config`] (a virtio-pci state does
/// not fit such a function).
pub(crate) fn decode_config(state: &[u8]) -> Result<[u8; CONFIG_SPACE_SIZE], PciError> {
    let s = decode(state)?;
    if s.virtio.is_some() {
        return Err(PciError::StateMismatch(
            "the saved function is a virtio-pci device, this one is not".into(),
        ));
    }
    Ok(s.config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PciIds;
    use crate::{PciDevice, PciFunction};

    #[test]
    fn config_only_state_round_trips_and_keeps_read_only_bits() {
        let mut c = PciConfig::new(PciIds {
            vendor: 0x8086,
            device: 0x7000,
            ..PciIds::default()
        });
        c.add_bar(0, crate::BarSpec::mem32(0x1000, false))
            .expect("the BAR fits");
        let f = PciFunction::new(c.clone());
        f.config_write(0x10, &0xfebf_1000u32.to_le_bytes());
        f.config_write(0x04, &3u16.to_le_bytes());
        f.config_write(0x3c, &[11]);
        let saved = f.save_state().expect("a plain function saves");
        let mut bad = decode(&saved).expect("decodes");
        // A stream that claims another vendor cannot change the read-only id.
        bad.config[0] = 0x34;
        let g = PciFunction::new(c);
        g.check_state(&bad.to_payload()).expect("checks");
        g.restore_state(&bad.to_payload()).expect("restores");
        let mut id = [0u8; 4];
        g.config_read(0, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x7000_8086);
        let mut bar = [0u8; 4];
        g.config_read(0x10, &mut bar);
        assert_eq!(u32::from_le_bytes(bar), 0xfebf_1000);
        assert_eq!(g.bar_regions(), f.bar_regions());
        assert!(matches!(
            g.check_state(&saved[..saved.len() - 1]),
            Err(PciError::StateMismatch(_))
        ));
    }
}
