//! Snapshot support of the interpreter: a vCPU and the VM's platform devices to and from
//! the backend-neutral states of `keel-accel`.

use keel_accel::{AccelError, PlatformState, RunState, SAVED_MSRS, Vcpu, VcpuEvents, VcpuState};

use super::{BlockCache, TcgVcpu, TcgVm};
use crate::cpu::Shadow;
use crate::exec::system::{read_msr, write_msr};
use crate::exec::x87::{f64_to_f80, f80_to_f64};

/// Offset of the spurious-interrupt vector register in the local APIC page; bit 8 is the
/// APIC software enable.
const APIC_SVR: usize = 0xf0;

fn refuse(vcpu: u32, reason: &str) -> AccelError {
    AccelError::Guest {
        vcpu,
        reason: reason.to_string(),
    }
}

impl TcgVcpu {
    pub(super) fn save(&self) -> Result<VcpuState, AccelError> {
        let c = &self.cpu;
        let mut img = vec![0u8; 512];
        img[0..2].copy_from_slice(&c.fpu.cw.to_le_bytes());
        img[2..4].copy_from_slice(&c.fsw().to_le_bytes());
        img[4] = c.fpu.tags;
        img[6..8].copy_from_slice(&c.fpu.fop.to_le_bytes());
        img[24..28].copy_from_slice(&c.mxcsr.to_le_bytes());
        img[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
        for k in 0..8u8 {
            let v = c.fpu.st[usize::from((c.fpu.top + k) & 7)];
            let o = 32 + 16 * usize::from(k);
            img[o..o + 10].copy_from_slice(&f64_to_f80(v));
        }
        for (k, x) in c.xmm.iter().enumerate() {
            img[160 + 16 * k..176 + 16 * k].copy_from_slice(&x.to_le_bytes());
        }
        let msrs = SAVED_MSRS
            .iter()
            .filter_map(|&n| read_msr(c, n).map(|v| (n, v)))
            .collect();
        let lapic = self.lapic.as_ref().map(|l| {
            let mut page = vec![0u8; 1024];
            for off in (0..1024).step_by(16) {
                page[off..off + 4].copy_from_slice(&l.read_reg(off as u64).to_le_bytes());
            }
            page
        });
        Ok(VcpuState {
            regs: self.regs()?,
            sregs: self.sregs()?,
            fxsave: img,
            debug: [c.dr[0], c.dr[1], c.dr[2], c.dr[3], c.dr[6], c.dr[7]],
            msrs,
            events: VcpuEvents {
                sti_shadow: c.shadow == Shadow::Active,
                mov_ss_shadow: c.shadow == Shadow::MovSs,
                nmi_pending: self.nmi_pending,
                nmi_masked: c.nmi_blocked,
                pending: None,
            },
            run: if self.wait_sipi {
                RunState::WaitSipi
            } else if c.halted {
                RunState::Halted
            } else {
                RunState::Runnable
            },
            lapic,
        })
    }

    pub(super) fn restore(&mut self, s: &VcpuState) -> Result<(), AccelError> {
        let index = self.cpu.index;
        // Everything that can refuse the state is checked before anything changes.
        if s.fxsave.len() != 512 {
            return Err(refuse(index, "the saved FXSAVE image is not 512 bytes"));
        }
        if let Some(page) = &s.lapic {
            let svr = page
                .get(APIC_SVR..APIC_SVR + 4)
                .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            match &self.lapic {
                None if svr & 0x100 != 0 => {
                    return Err(refuse(
                        index,
                        "the saved guest uses its local APIC and this tcg VM has none \
                         (tcg gives one vCPU an APIC only with APIC mode on)",
                    ));
                }
                Some(_) if svr & 0x100 != 0 => {
                    return Err(refuse(
                        index,
                        "restoring an enabled local APIC into the interpreter is not \
                         supported yet",
                    ));
                }
                _ => {}
            }
        }
        self.set_sregs(&s.sregs)?;
        self.set_regs(&s.regs)?;
        let img = &s.fxsave;
        let c = &mut self.cpu;
        let mxcsr = u32::from_le_bytes([img[24], img[25], img[26], img[27]]);
        c.mxcsr = mxcsr & 0xffff;
        c.fpu.cw = u16::from_le_bytes([img[0], img[1]]);
        let sw = u16::from_le_bytes([img[2], img[3]]);
        c.fpu.sw = sw;
        c.fpu.top = ((sw >> 11) & 7) as u8;
        c.fpu.tags = img[4];
        c.fpu.fop = u16::from_le_bytes([img[6], img[7]]);
        for k in 0..8u8 {
            let o = 32 + 16 * usize::from(k);
            let mut b = [0u8; 10];
            b.copy_from_slice(&img[o..o + 10]);
            let idx = usize::from((c.fpu.top + k) & 7);
            c.fpu.st[idx] = f80_to_f64(b);
        }
        for (k, x) in c.xmm.iter_mut().enumerate() {
            let mut b = [0u8; 16];
            b.copy_from_slice(&img[160 + 16 * k..176 + 16 * k]);
            *x = u128::from_le_bytes(b);
        }
        c.dr[..4].copy_from_slice(&s.debug[..4]);
        c.dr[6] = s.debug[4];
        c.dr[7] = s.debug[5];
        for &(n, v) in &s.msrs {
            if write_msr(c, n, v).is_err() {
                return Err(refuse(
                    index,
                    &format!("the saved value {v:#x} of MSR {n:#x} is not valid"),
                ));
            }
        }
        c.shadow = if s.events.mov_ss_shadow {
            Shadow::MovSs
        } else if s.events.sti_shadow {
            Shadow::Active
        } else {
            Shadow::None
        };
        c.nmi_blocked = s.events.nmi_masked;
        c.halted = s.run == RunState::Halted;
        self.nmi_pending = s.events.nmi_pending;
        self.wait_sipi = s.run == RunState::WaitSipi;
        // Guest RAM changed under the block cache: decode everything again.
        self.cache = BlockCache::new();
        self.blocks_seen = 0;
        self.resync_code();
        self.next_poll = 0;
        if let Some(p) = s.events.pending {
            // An event the saved backend had taken but not delivered: deliver it now, as
            // the first thing the restored vCPU does.
            let _ = self.raise(p.vector, p.error_code, false, p.external);
        }
        Ok(())
    }
}

impl TcgVm {
    pub(super) fn save(&self) -> PlatformState {
        // The PIT first: it signals the IRQ 0 edges that are due into the 8259 pair.
        let (pit, port61) = self.pit.save_state();
        PlatformState {
            pic: Some(self.pic.save_state()),
            pit: Some(pit),
            port61,
            ioapic: self.apics.as_ref().map(|a| a.ioapic.save_state()),
        }
    }

    pub(super) fn restore(&self, s: &PlatformState) -> Result<(), AccelError> {
        if let Some(io) = &s.ioapic
            && self.apics.is_none()
            && io.rte.iter().any(|r| r & (1 << 16) == 0)
        {
            return Err(AccelError::Guest {
                vcpu: 0,
                reason: "the saved guest routes interrupts through an IOAPIC and this tcg VM \
                         has none (tcg gives one vCPU an IOAPIC only with APIC mode on)"
                    .to_string(),
            });
        }
        if let Some(pic) = &s.pic {
            self.pic.restore_state(pic);
        }
        if let Some(pit) = &s.pit {
            self.pit.restore_state(pit, s.port61);
        }
        if let (Some(io), Some(a)) = (&s.ioapic, &self.apics) {
            a.ioapic.restore_state(io);
        }
        Ok(())
    }
}
