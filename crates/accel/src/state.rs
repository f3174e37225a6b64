//! Backend-neutral machine state for snapshots: what a vCPU and the platform devices an
//! accelerator owns (8259 pair, 8254, IOAPIC) hold, in architectural terms, so a state saved
//! under one backend restores under another. Each backend converts from and to its own
//! structures (KVM's `kvm_*` ioctls, the interpreter's models); the encodings are the
//! stream's sections (`docs/SNAPSHOT.md`).

use keel_snapshot::{Dec, DecodeError, Enc, Persist, SectionId};

use crate::{DescriptorTable, Regs, Segment, SpecialRegs};

/// Section id of a vCPU's state (instance = vCPU index).
pub const VCPU_SECTION: SectionId = SectionId(*b"VCPU");
/// Layout version of [`VcpuState`].
pub const VCPU_VERSION: u32 = 1;
/// Section id of the accelerator-owned platform devices.
pub const PLATFORM_SECTION: SectionId = SectionId(*b"PLAT");
/// Layout version of [`PlatformState`].
pub const PLATFORM_VERSION: u32 = 1;

/// MSRs a vCPU state carries, beyond those in [`SpecialRegs`] (EFER, APIC base) and the
/// segment bases: what both backends model.
pub const SAVED_MSRS: &[u32] = &[
    0x10,        // IA32_TSC
    0x174,       // IA32_SYSENTER_CS
    0x175,       // IA32_SYSENTER_ESP
    0x176,       // IA32_SYSENTER_EIP
    0x1a0,       // IA32_MISC_ENABLE
    0x277,       // IA32_PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];

/// Where a vCPU stands between instructions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RunState {
    /// Executing.
    #[default]
    Runnable,
    /// In `hlt`, waiting for an interrupt.
    Halted,
    /// An application processor waiting for INIT/SIPI.
    WaitSipi,
}

/// An exception or interrupt the vCPU has taken but not yet delivered through the IDT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingEvent {
    /// Vector.
    pub vector: u8,
    /// Error code, for the exceptions that push one.
    pub error_code: Option<u32>,
    /// An external interrupt (not an exception).
    pub external: bool,
}

/// Events and interrupt blocking between instructions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VcpuEvents {
    /// Interrupts blocked for one instruction after `sti`.
    pub sti_shadow: bool,
    /// Interrupts and debug traps held for one instruction after `mov ss` / `pop ss`.
    pub mov_ss_shadow: bool,
    /// An NMI waits for delivery.
    pub nmi_pending: bool,
    /// An NMI handler runs: further NMIs wait for the next `iret`.
    pub nmi_masked: bool,
    /// An exception or interrupt taken but not delivered yet.
    pub pending: Option<PendingEvent>,
}

/// Everything about one vCPU that a restore must put back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuState {
    /// General registers.
    pub regs: Regs,
    /// Segment, descriptor-table and control registers, EFER, APIC base.
    pub sregs: SpecialRegs,
    /// The 512-byte FXSAVE image (x87, MXCSR, XMM0-15) in its architectural layout.
    pub fxsave: Vec<u8>,
    /// DR0-DR3, DR6, DR7.
    pub debug: [u64; 6],
    /// (index, value) of the MSRs of [`SAVED_MSRS`] the backend models.
    pub msrs: Vec<(u32, u64)>,
    /// Events and interrupt blocking.
    pub events: VcpuEvents,
    /// Running, halted or waiting for SIPI.
    pub run: RunState,
    /// The local APIC's 1 KiB register page (as read through its MMIO window, with the
    /// timer's current count), when the vCPU has one.
    pub lapic: Option<Vec<u8>>,
}

impl VcpuState {
    /// The value of MSR `index`, if saved.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|(i, _)| *i == index).map(|(_, v)| *v)
    }
}

fn enc_seg(e: &mut Enc, s: &Segment) {
    e.u64(s.base)
        .u32(s.limit)
        .u16(s.selector)
        .u8(s.type_)
        .u8(s.dpl)
        .bool(s.present)
        .bool(s.db)
        .bool(s.s)
        .bool(s.l)
        .bool(s.g)
        .bool(s.avl)
        .bool(s.unusable);
}

fn dec_seg(d: &mut Dec<'_>) -> Result<Segment, DecodeError> {
    Ok(Segment {
        base: d.u64("segment base")?,
        limit: d.u32("segment limit")?,
        selector: d.u16("segment selector")?,
        type_: d.u8("segment type")?,
        dpl: d.u8("segment dpl")?,
        present: d.bool("segment present")?,
        db: d.bool("segment db")?,
        s: d.bool("segment s")?,
        l: d.bool("segment l")?,
        g: d.bool("segment g")?,
        avl: d.bool("segment avl")?,
        unusable: d.bool("segment unusable")?,
    })
}

impl Persist for VcpuState {
    fn encode(&self, e: &mut Enc) {
        let r = &self.regs;
        for v in [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15, r.rip, r.rflags,
        ] {
            e.u64(v);
        }
        let s = &self.sregs;
        for seg in [&s.cs, &s.ds, &s.es, &s.fs, &s.gs, &s.ss, &s.tr, &s.ldt] {
            enc_seg(e, seg);
        }
        e.u64(s.gdt.base).u16(s.gdt.limit);
        e.u64(s.idt.base).u16(s.idt.limit);
        for v in [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apic_base] {
            e.u64(v);
        }
        e.bytes(&self.fxsave);
        for v in self.debug {
            e.u64(v);
        }
        e.u32(self.msrs.len() as u32);
        for &(i, v) in &self.msrs {
            e.u32(i).u64(v);
        }
        let ev = &self.events;
        e.bool(ev.sti_shadow)
            .bool(ev.mov_ss_shadow)
            .bool(ev.nmi_pending)
            .bool(ev.nmi_masked);
        match ev.pending {
            None => e.u8(0),
            Some(p) => e
                .u8(1)
                .u8(p.vector)
                .bool(p.external)
                .bool(p.error_code.is_some())
                .u32(p.error_code.unwrap_or(0)),
        };
        e.u8(match self.run {
            RunState::Runnable => 0,
            RunState::Halted => 1,
            RunState::WaitSipi => 2,
        });
        match &self.lapic {
            None => e.u8(0),
            Some(page) => e.u8(1).bytes(page),
        };
    }

    fn decode(d: &mut Dec<'_>) -> Result<Self, DecodeError> {
        let mut g = [0u64; 18];
        for v in &mut g {
            *v = d.u64("general register")?;
        }
        let regs = Regs {
            rax: g[0],
            rbx: g[1],
            rcx: g[2],
            rdx: g[3],
            rsi: g[4],
            rdi: g[5],
            rsp: g[6],
            rbp: g[7],
            r8: g[8],
            r9: g[9],
            r10: g[10],
            r11: g[11],
            r12: g[12],
            r13: g[13],
            r14: g[14],
            r15: g[15],
            rip: g[16],
            rflags: g[17],
        };
        let cs = dec_seg(d)?;
        let ds = dec_seg(d)?;
        let es = dec_seg(d)?;
        let fs = dec_seg(d)?;
        let gs = dec_seg(d)?;
        let ss = dec_seg(d)?;
        let tr = dec_seg(d)?;
        let ldt = dec_seg(d)?;
        let gdt = DescriptorTable {
            base: d.u64("gdt base")?,
            limit: d.u16("gdt limit")?,
        };
        let idt = DescriptorTable {
            base: d.u64("idt base")?,
            limit: d.u16("idt limit")?,
        };
        let mut c = [0u64; 7];
        for v in &mut c {
            *v = d.u64("control register")?;
        }
        let sregs = SpecialRegs {
            cs,
            ds,
            es,
            fs,
            gs,
            ss,
            tr,
            ldt,
            gdt,
            idt,
            cr0: c[0],
            cr2: c[1],
            cr3: c[2],
            cr4: c[3],
            cr8: c[4],
            efer: c[5],
            apic_base: c[6],
        };
        let fxsave = d.bytes("fxsave image")?.to_vec();
        if fxsave.len() != 512 {
            return Err(DecodeError::Invalid {
                field: "fxsave image",
                reason: format!("{} bytes instead of 512", fxsave.len()),
            });
        }
        let mut debug = [0u64; 6];
        for v in &mut debug {
            *v = d.u64("debug register")?;
        }
        let n = d.count("msr count", 12)?;
        let mut msrs = Vec::with_capacity(n);
        for _ in 0..n {
            let i = d.u32("msr index")?;
            let v = d.u64("msr value")?;
            if !SAVED_MSRS.contains(&i) {
                return Err(DecodeError::Invalid {
                    field: "msr index",
                    reason: format!("MSR {i:#x} is not one Keel saves"),
                });
            }
            msrs.push((i, v));
        }
        let sti_shadow = d.bool("sti shadow")?;
        let mov_ss_shadow = d.bool("mov ss shadow")?;
        let nmi_pending = d.bool("nmi pending")?;
        let nmi_masked = d.bool("nmi masked")?;
        let pending = match d.u8("pending event")? {
            0 => None,
            1 => {
                let vector = d.u8("event vector")?;
                let external = d.bool("event external")?;
                let has = d.bool("event has error code")?;
                let code = d.u32("event error code")?;
                Some(PendingEvent {
                    vector,
                    error_code: has.then_some(code),
                    external,
                })
            }
            v => {
                return Err(DecodeError::Invalid {
                    field: "pending event",
                    reason: format!("tag {v}"),
                });
            }
        };
        let run = match d.u8("run state")? {
            0 => RunState::Runnable,
            1 => RunState::Halted,
            2 => RunState::WaitSipi,
            v => {
                return Err(DecodeError::Invalid {
                    field: "run state",
                    reason: format!("tag {v}"),
                });
            }
        };
        let lapic = match d.u8("local apic")? {
            0 => None,
            1 => {
                let page = d.bytes("local apic page")?.to_vec();
                if page.len() != 1024 {
                    return Err(DecodeError::Invalid {
                        field: "local apic page",
                        reason: format!("{} bytes instead of 1024", page.len()),
                    });
                }
                Some(page)
            }
            v => {
                return Err(DecodeError::Invalid {
                    field: "local apic",
                    reason: format!("tag {v}"),
                });
            }
        };
        Ok(Self {
            regs,
            sregs,
            fxsave,
            debug,
            msrs,
            events: VcpuEvents {
                sti_shadow,
                mov_ss_shadow,
                nmi_pending,
                nmi_masked,
                pending,
            },
            run,
            lapic,
        })
    }
}

/// One 8259A, in the terms of its data sheet (ICWs/OCWs and the three registers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PicChipState {
    /// Interrupt request register.
    pub irr: u8,
    /// In-service register.
    pub isr: u8,
    /// Interrupt mask register.
    pub imr: u8,
    /// Current level of each input (edge detection).
    pub pins: u8,
    /// Edge/level control register (level-triggered inputs).
    pub elcr: u8,
    /// Vector base (ICW2).
    pub vector_base: u8,
    /// The input with the highest priority (rotation).
    pub highest: u8,
    /// Next step of the initialisation sequence: 0 operational, 1 ICW2, 2 ICW3, 3 ICW4.
    pub init_step: u8,
    /// ICW1.LTIM (all inputs level triggered).
    pub ltim: bool,
    /// ICW1.IC4.
    pub expect_icw4: bool,
    /// ICW1.SNGL.
    pub single: bool,
    /// ICW3.
    pub icw3: u8,
    /// ICW4.AEOI.
    pub auto_eoi: bool,
    /// Rotate in automatic-EOI mode.
    pub rotate_on_aeoi: bool,
    /// ICW4.SFNM.
    pub special_fully_nested: bool,
    /// OCW3: the command port reads ISR (else IRR).
    pub read_isr: bool,
    /// OCW3: the next read is a poll.
    pub poll: bool,
    /// OCW3 special mask mode.
    pub special_mask: bool,
}

/// One 8254 counter. Time is relative: `elapsed_ns` is how long the counter had been
/// counting from `reload` at save, so the time the machine spent saved is not counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PitChannelState {
    /// Mode (0-5).
    pub mode: u8,
    /// Access mode: 0 unprogrammed, 1 low byte, 2 high byte, 3 low then high.
    pub access: u8,
    /// BCD counting.
    pub bcd: bool,
    /// Initial count in input ticks (1..=65536).
    pub reload: u32,
    /// A count was written since the last control word (the counter runs).
    pub loaded: bool,
    /// Nanoseconds since counting from `reload` started.
    pub elapsed_ns: u64,
    /// Gate input level.
    pub gate: bool,
    /// Latched count waiting to be read.
    pub latched_count: Option<u16>,
    /// Latched status waiting to be read.
    pub latched_status: Option<u8>,
    /// The next read returns the high byte (access mode 3).
    pub read_hi: bool,
    /// The next write is the high byte (access mode 3), `write_lo` the low byte written.
    pub write_hi: bool,
    /// Low byte written so far.
    pub write_lo: u8,
}

/// The IOAPIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoapicState {
    /// IOAPIC id register.
    pub id: u32,
    /// Register select.
    pub select: u32,
    /// Redirection table.
    pub rte: [u64; 24],
    /// Input levels, one bit per pin.
    pub pins: u32,
}

/// The platform devices an accelerator owns.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PlatformState {
    /// The 8259 pair (master, slave).
    pub pic: Option<[PicChipState; 2]>,
    /// The 8254's three counters.
    pub pit: Option<[PitChannelState; 3]>,
    /// Port 0x61 bits 0-3 (channel 2 gate, speaker).
    pub port61: u8,
    /// The IOAPIC.
    pub ioapic: Option<IoapicState>,
}

impl Persist for PlatformState {
    fn encode(&self, e: &mut Enc) {
        match &self.pic {
            None => {
                e.u8(0);
            }
            Some(chips) => {
                e.u8(1);
                for c in chips {
                    e.u8(c.irr)
                        .u8(c.isr)
                        .u8(c.imr)
                        .u8(c.pins)
                        .u8(c.elcr)
                        .u8(c.vector_base)
                        .u8(c.highest)
                        .u8(c.init_step)
                        .bool(c.ltim)
                        .bool(c.expect_icw4)
                        .bool(c.single)
                        .u8(c.icw3)
                        .bool(c.auto_eoi)
                        .bool(c.rotate_on_aeoi)
                        .bool(c.special_fully_nested)
                        .bool(c.read_isr)
                        .bool(c.poll)
                        .bool(c.special_mask);
                }
            }
        }
        match &self.pit {
            None => {
                e.u8(0);
            }
            Some(chans) => {
                e.u8(1);
                for c in chans {
                    e.u8(c.mode)
                        .u8(c.access)
                        .bool(c.bcd)
                        .u32(c.reload)
                        .bool(c.loaded)
                        .u64(c.elapsed_ns)
                        .bool(c.gate)
                        .bool(c.latched_count.is_some())
                        .u16(c.latched_count.unwrap_or(0))
                        .bool(c.latched_status.is_some())
                        .u8(c.latched_status.unwrap_or(0))
                        .bool(c.read_hi)
                        .bool(c.write_hi)
                        .u8(c.write_lo);
                }
            }
        }
        e.u8(self.port61);
        match &self.ioapic {
            None => {
                e.u8(0);
            }
            Some(io) => {
                e.u8(1).u32(io.id).u32(io.select).u32(io.pins);
                for r in io.rte {
                    e.u64(r);
                }
            }
        }
    }

    fn decode(d: &mut Dec<'_>) -> Result<Self, DecodeError> {
        let flag = |d: &mut Dec<'_>, field: &'static str| match d.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(DecodeError::Invalid {
                field,
                reason: format!("tag {v}"),
            }),
        };
        let pic = if flag(d, "pic present")? {
            let mut chips = [PicChipState::default(); 2];
            for c in &mut chips {
                *c = PicChipState {
                    irr: d.u8("pic irr")?,
                    isr: d.u8("pic isr")?,
                    imr: d.u8("pic imr")?,
                    pins: d.u8("pic pins")?,
                    elcr: d.u8("pic elcr")?,
                    vector_base: d.u8("pic vector base")?,
                    highest: d.u8("pic highest")?,
                    init_step: d.u8("pic init step")?,
                    ltim: d.bool("pic ltim")?,
                    expect_icw4: d.bool("pic icw4")?,
                    single: d.bool("pic single")?,
                    icw3: d.u8("pic icw3")?,
                    auto_eoi: d.bool("pic aeoi")?,
                    rotate_on_aeoi: d.bool("pic rotate")?,
                    special_fully_nested: d.bool("pic sfnm")?,
                    read_isr: d.bool("pic read isr")?,
                    poll: d.bool("pic poll")?,
                    special_mask: d.bool("pic special mask")?,
                };
                if c.highest > 7 || c.init_step > 3 {
                    return Err(DecodeError::Invalid {
                        field: "pic",
                        reason: format!(
                            "priority {} / init step {} out of range",
                            c.highest, c.init_step
                        ),
                    });
                }
            }
            Some(chips)
        } else {
            None
        };
        let pit = if flag(d, "pit present")? {
            let mut chans = [PitChannelState::default(); 3];
            for c in &mut chans {
                let mode = d.u8("pit mode")?;
                let access = d.u8("pit access")?;
                let bcd = d.bool("pit bcd")?;
                let reload = d.u32("pit reload")?;
                let loaded = d.bool("pit loaded")?;
                let elapsed_ns = d.u64("pit elapsed")?;
                let gate = d.bool("pit gate")?;
                let has_count = d.bool("pit latched count")?;
                let count = d.u16("pit latched count")?;
                let has_status = d.bool("pit latched status")?;
                let status = d.u8("pit latched status")?;
                if mode > 5 || access > 3 || reload > 0x1_0000 {
                    return Err(DecodeError::Invalid {
                        field: "pit",
                        reason: format!("mode {mode}, access {access}, reload {reload}"),
                    });
                }
                *c = PitChannelState {
                    mode,
                    access,
                    bcd,
                    reload,
                    loaded,
                    elapsed_ns,
                    gate,
                    latched_count: has_count.then_some(count),
                    latched_status: has_status.then_some(status),
                    read_hi: d.bool("pit read hi")?,
                    write_hi: d.bool("pit write hi")?,
                    write_lo: d.u8("pit write lo")?,
                };
            }
            Some(chans)
        } else {
            None
        };
        let port61 = d.u8("port 0x61")?;
        let ioapic = if flag(d, "ioapic present")? {
            let id = d.u32("ioapic id")?;
            let select = d.u32("ioapic select")?;
            let pins = d.u32("ioapic pins")?;
            let mut rte = [0u64; 24];
            for r in &mut rte {
                *r = d.u64("ioapic redirection entry")?;
            }
            Some(IoapicState {
                id,
                select,
                rte,
                pins,
            })
        } else {
            None
        };
        Ok(Self {
            pic,
            pit,
            port61,
            ioapic,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn vcpu_and_platform_states_round_trip() {
        let mut fx = vec![0u8; 512];
        fx[0] = 0x7f;
        fx[24] = 0x80;
        let v = VcpuState {
            regs: Regs {
                rax: 1,
                rip: 0x1000,
                rflags: 2,
                ..Regs::default()
            },
            sregs: SpecialRegs {
                cr0: 0x8000_0011,
                efer: 0x500,
                ..SpecialRegs::default()
            },
            fxsave: fx,
            debug: [0, 0, 0, 0, 0xffff_0ff0, 0x400],
            msrs: vec![(0x10, 12345), (0xc000_0082, 0xffff_ffff_8100_0000)],
            events: VcpuEvents {
                sti_shadow: true,
                pending: Some(PendingEvent {
                    vector: 14,
                    error_code: Some(2),
                    external: false,
                }),
                ..VcpuEvents::default()
            },
            run: RunState::Halted,
            lapic: Some(vec![3u8; 1024]),
        };
        assert_eq!(VcpuState::from_payload(&v.to_payload()).unwrap(), v);
        let p = PlatformState {
            pic: Some(
                [PicChipState {
                    imr: 0xfb,
                    vector_base: 0x30,
                    ..PicChipState::default()
                }; 2],
            ),
            pit: Some(
                [PitChannelState {
                    mode: 2,
                    access: 3,
                    reload: 1193,
                    loaded: true,
                    latched_count: Some(7),
                    ..PitChannelState::default()
                }; 3],
            ),
            port61: 1,
            ioapic: None,
        };
        assert_eq!(PlatformState::from_payload(&p.to_payload()).unwrap(), p);
    }

    #[test]
    fn an_msr_keel_does_not_save_is_refused() {
        let mut e = Enc::new();
        let v = VcpuState {
            regs: Regs::default(),
            sregs: SpecialRegs::default(),
            fxsave: vec![0; 512],
            debug: [0; 6],
            msrs: vec![(0xdead, 1)],
            events: VcpuEvents::default(),
            run: RunState::Runnable,
            lapic: None,
        };
        v.encode(&mut e);
        assert!(VcpuState::from_payload(&e.finish()).is_err());
    }
}
