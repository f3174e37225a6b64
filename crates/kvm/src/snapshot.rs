//! Snapshot support: the vCPU and the in-kernel platform devices (8259 pair, IOAPIC, PIT)
//! converted between KVM's structures and the backend-neutral states of `keel-accel`.

use keel_accel::{
    AccelError, IoapicState, PendingEvent, PicChipState, PitChannelState, PlatformState, RunState,
    SAVED_MSRS, VcpuEvents, VcpuState,
};
use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MP_STATE_HALTED,
    KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED,
    KVM_VCPUEVENT_VALID_NMI_PENDING, KVM_VCPUEVENT_VALID_SHADOW, KVM_X86_SHADOW_INT_MOV_SS,
    KVM_X86_SHADOW_INT_STI, Msrs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pic_state, kvm_pit_channel_state,
};
use kvm_ioctls::{VcpuFd, VmFd};

use crate::pit::LazyPit;
use crate::regs::{regs_from_kvm, regs_to_kvm, sregs_from_kvm, sregs_to_kvm};
use crate::vcpu::host;

/// `KVM_X86_SHADOW_*` as the one byte `kvm_vcpu_events.interrupt.shadow` holds.
const SHADOW_STI: u8 = KVM_X86_SHADOW_INT_STI as u8;
const SHADOW_MOV_SS: u8 = KVM_X86_SHADOW_INT_MOV_SS as u8;

fn fxsave_from_kvm(f: &kvm_fpu) -> Vec<u8> {
    let mut img = vec![0u8; 512];
    img[0..2].copy_from_slice(&f.fcw.to_le_bytes());
    img[2..4].copy_from_slice(&f.fsw.to_le_bytes());
    img[4] = f.ftwx;
    img[6..8].copy_from_slice(&f.last_opcode.to_le_bytes());
    img[8..16].copy_from_slice(&f.last_ip.to_le_bytes());
    img[16..24].copy_from_slice(&f.last_dp.to_le_bytes());
    img[24..28].copy_from_slice(&f.mxcsr.to_le_bytes());
    img[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
    for (k, r) in f.fpr.iter().enumerate() {
        img[32 + 16 * k..48 + 16 * k].copy_from_slice(r);
    }
    for (k, r) in f.xmm.iter().enumerate() {
        img[160 + 16 * k..176 + 16 * k].copy_from_slice(r);
    }
    img
}

fn fxsave_to_kvm(img: &[u8]) -> kvm_fpu {
    let u16_at = |o: usize| u16::from_le_bytes([img[o], img[o + 1]]);
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&img[o..o + 8]);
        u64::from_le_bytes(b)
    };
    let mut f = kvm_fpu {
        fcw: u16_at(0),
        fsw: u16_at(2),
        ftwx: img[4],
        last_opcode: u16_at(6),
        last_ip: u64_at(8),
        last_dp: u64_at(16),
        mxcsr: u32::from_le_bytes([img[24], img[25], img[26], img[27]]),
        ..Default::default()
    };
    for (k, r) in f.fpr.iter_mut().enumerate() {
        r.copy_from_slice(&img[32 + 16 * k..48 + 16 * k]);
    }
    for (k, r) in f.xmm.iter_mut().enumerate() {
        r.copy_from_slice(&img[160 + 16 * k..176 + 16 * k]);
    }
    f
}

/// Reads the MSRs of [`SAVED_MSRS`] KVM supports: `KVM_GET_MSRS` stops at the first one it
/// does not know, which is then left out.
fn get_msrs(fd: &VcpuFd, vcpu: u32) -> Result<Vec<(u32, u64)>, AccelError> {
    let mut wanted: Vec<u32> = SAVED_MSRS.to_vec();
    loop {
        let entries: Vec<kvm_msr_entry> = wanted
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| AccelError::Guest {
            vcpu,
            reason: "too many MSRs to save".to_string(),
        })?;
        let n = fd.get_msrs(&mut msrs).map_err(host("KVM_GET_MSRS"))?;
        if n == wanted.len() {
            return Ok(msrs.as_slice().iter().map(|e| (e.index, e.data)).collect());
        }
        wanted.remove(n);
    }
}

/// Captures vCPU `vcpu` (`lapic`: the VM has an in-kernel irqchip).
pub(crate) fn save_vcpu(fd: &VcpuFd, vcpu: u32, lapic: bool) -> Result<VcpuState, AccelError> {
    let regs = regs_from_kvm(&fd.get_regs().map_err(host("KVM_GET_REGS"))?);
    let sregs = sregs_from_kvm(&fd.get_sregs().map_err(host("KVM_GET_SREGS"))?);
    let fxsave = fxsave_from_kvm(&fd.get_fpu().map_err(host("KVM_GET_FPU"))?);
    let d = fd.get_debug_regs().map_err(host("KVM_GET_DEBUGREGS"))?;
    let ev = fd.get_vcpu_events().map_err(host("KVM_GET_VCPU_EVENTS"))?;
    let pending = if ev.exception.injected != 0 || ev.exception.pending != 0 {
        Some(PendingEvent {
            vector: ev.exception.nr,
            error_code: (ev.exception.has_error_code != 0).then_some(ev.exception.error_code),
            external: false,
        })
    } else if ev.interrupt.injected != 0 {
        Some(PendingEvent {
            vector: ev.interrupt.nr,
            error_code: None,
            external: true,
        })
    } else {
        None
    };
    let mp = fd.get_mp_state().map_err(host("KVM_GET_MP_STATE"))?;
    let run = match mp.mp_state {
        KVM_MP_STATE_HALTED => RunState::Halted,
        KVM_MP_STATE_UNINITIALIZED | KVM_MP_STATE_INIT_RECEIVED => RunState::WaitSipi,
        _ => RunState::Runnable,
    };
    let lapic = if lapic {
        let l = fd.get_lapic().map_err(host("KVM_GET_LAPIC"))?;
        Some(l.regs.iter().map(|&b| b as u8).collect())
    } else {
        None
    };
    Ok(VcpuState {
        regs,
        sregs,
        fxsave,
        debug: [d.db[0], d.db[1], d.db[2], d.db[3], d.dr6, d.dr7],
        msrs: get_msrs(fd, vcpu)?,
        events: VcpuEvents {
            sti_shadow: ev.interrupt.shadow & SHADOW_STI != 0,
            mov_ss_shadow: ev.interrupt.shadow & SHADOW_MOV_SS != 0,
            nmi_pending: ev.nmi.pending != 0 || ev.nmi.injected != 0,
            nmi_masked: ev.nmi.masked != 0,
            pending,
        },
        run,
        lapic,
    })
}

/// Puts vCPU `vcpu` in `s` (`lapic`: the VM has an in-kernel irqchip; a state without a
/// local APIC page leaves KVM's as it is).
pub(crate) fn restore_vcpu(
    fd: &VcpuFd,
    vcpu: u32,
    lapic: bool,
    s: &VcpuState,
) -> Result<(), AccelError> {
    if s.fxsave.len() != 512 {
        return Err(AccelError::Guest {
            vcpu,
            reason: "the saved FXSAVE image is not 512 bytes".to_string(),
        });
    }
    // Order as QEMU's kvm_arch_put_registers: special registers (mode) before the general
    // ones, MSRs, then the local APIC and events.
    let mut k = fd.get_sregs().map_err(host("KVM_GET_SREGS"))?;
    sregs_to_kvm(&s.sregs, &mut k);
    fd.set_sregs(&k).map_err(host("KVM_SET_SREGS"))?;
    fd.set_regs(&regs_to_kvm(&s.regs))
        .map_err(host("KVM_SET_REGS"))?;
    fd.set_fpu(&fxsave_to_kvm(&s.fxsave))
        .map_err(host("KVM_SET_FPU"))?;
    let mut d = fd.get_debug_regs().map_err(host("KVM_GET_DEBUGREGS"))?;
    d.db.copy_from_slice(&s.debug[..4]);
    d.dr6 = s.debug[4];
    d.dr7 = s.debug[5];
    fd.set_debug_regs(&d).map_err(host("KVM_SET_DEBUGREGS"))?;
    let entries: Vec<kvm_msr_entry> = s
        .msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| AccelError::Guest {
        vcpu,
        reason: "too many MSRs to restore".to_string(),
    })?;
    let n = fd.set_msrs(&msrs).map_err(host("KVM_SET_MSRS"))?;
    if n != entries.len() {
        let which = entries.get(n).map_or(0, |e| e.index);
        return Err(AccelError::Guest {
            vcpu,
            reason: format!("KVM refused the saved value of MSR {which:#x}"),
        });
    }
    if lapic && let Some(page) = &s.lapic {
        let mut l = kvm_lapic_state::default();
        for (d, &b) in l.regs.iter_mut().zip(page.iter()) {
            *d = b as libc::c_char;
        }
        fd.set_lapic(&l).map_err(host("KVM_SET_LAPIC"))?;
    }
    let mut ev = fd.get_vcpu_events().map_err(host("KVM_GET_VCPU_EVENTS"))?;
    ev.exception = Default::default();
    ev.interrupt = Default::default();
    ev.exception_has_payload = 0;
    ev.exception_payload = 0;
    match s.events.pending {
        Some(p) if p.external => {
            ev.interrupt.injected = 1;
            ev.interrupt.nr = p.vector;
        }
        Some(p) => {
            ev.exception.injected = 1;
            ev.exception.nr = p.vector;
            ev.exception.has_error_code = u8::from(p.error_code.is_some());
            ev.exception.error_code = p.error_code.unwrap_or(0);
        }
        None => {}
    }
    ev.interrupt.shadow = if s.events.sti_shadow { SHADOW_STI } else { 0 }
        | if s.events.mov_ss_shadow {
            SHADOW_MOV_SS
        } else {
            0
        };
    ev.nmi.injected = 0;
    ev.nmi.pending = u8::from(s.events.nmi_pending);
    ev.nmi.masked = u8::from(s.events.nmi_masked);
    ev.flags = KVM_VCPUEVENT_VALID_SHADOW | KVM_VCPUEVENT_VALID_NMI_PENDING;
    fd.set_vcpu_events(&ev)
        .map_err(host("KVM_SET_VCPU_EVENTS"))?;
    let mp_state = match s.run {
        RunState::Runnable => KVM_MP_STATE_RUNNABLE,
        RunState::Halted => KVM_MP_STATE_HALTED,
        RunState::WaitSipi => KVM_MP_STATE_INIT_RECEIVED,
    };
    fd.set_mp_state(kvm_mp_state { mp_state })
        .map_err(host("KVM_SET_MP_STATE"))
}

fn pic_from_kvm(p: &kvm_pic_state, master: bool) -> PicChipState {
    PicChipState {
        irr: p.irr,
        isr: p.isr,
        imr: p.imr,
        pins: p.last_irr,
        elcr: p.elcr,
        vector_base: p.irq_base,
        highest: p.priority_add & 7,
        init_step: p.init_state.min(3),
        ltim: false,
        expect_icw4: p.init4 != 0,
        single: false,
        icw3: if master { 0x04 } else { 0x02 },
        auto_eoi: p.auto_eoi != 0,
        rotate_on_aeoi: p.rotate_on_auto_eoi != 0,
        special_fully_nested: p.special_fully_nested_mode != 0,
        read_isr: p.read_reg_select != 0,
        poll: p.poll != 0,
        special_mask: p.special_mask != 0,
    }
}

fn pic_to_kvm(c: &PicChipState, p: &mut kvm_pic_state) {
    p.irr = c.irr;
    p.isr = c.isr;
    p.imr = c.imr;
    p.last_irr = c.pins;
    p.elcr = c.elcr & p.elcr_mask;
    p.irq_base = c.vector_base;
    p.priority_add = c.highest & 7;
    p.init_state = c.init_step;
    p.init4 = u8::from(c.expect_icw4);
    p.auto_eoi = u8::from(c.auto_eoi);
    p.rotate_on_auto_eoi = u8::from(c.rotate_on_aeoi);
    p.special_fully_nested_mode = u8::from(c.special_fully_nested);
    p.read_reg_select = u8::from(c.read_isr);
    p.poll = u8::from(c.poll);
    p.special_mask = u8::from(c.special_mask);
}

/// KVM's `RW_STATE_*` of the PIT's byte flip-flops.
const RW_LSB: u8 = 1;
const RW_MSB: u8 = 2;
const RW_WORD0: u8 = 3;
const RW_WORD1: u8 = 4;

fn monotonic_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

fn flip(access: u8, hi: bool) -> u8 {
    match access {
        1 => RW_LSB,
        2 => RW_MSB,
        _ if hi => RW_WORD1,
        _ => RW_WORD0,
    }
}

fn pit_from_kvm(c: &kvm_pit_channel_state, now: i64) -> PitChannelState {
    let latched = c.count_latched != 0;
    PitChannelState {
        mode: c.mode.min(5),
        access: c.rw_mode.min(3),
        bcd: c.bcd != 0,
        reload: c.count.min(0x1_0000),
        loaded: c.count != 0,
        elapsed_ns: u64::try_from(now.saturating_sub(c.count_load_time)).unwrap_or(0),
        gate: c.gate != 0,
        latched_count: latched.then_some(c.latched_count),
        latched_status: (c.status_latched != 0).then_some(c.status),
        read_hi: if latched {
            c.count_latched == RW_MSB && c.rw_mode == 3
        } else {
            c.read_state == RW_WORD1
        },
        write_hi: c.write_state == RW_WORD1,
        write_lo: c.write_latch,
    }
}

fn pit_to_kvm(c: &PitChannelState, k: &mut kvm_pit_channel_state, now: i64) {
    k.count = if c.loaded { c.reload } else { 0 };
    k.count_load_time = now.saturating_sub(i64::try_from(c.elapsed_ns).unwrap_or(i64::MAX));
    k.latched_count = c.latched_count.unwrap_or(0);
    k.count_latched = match c.latched_count {
        None => 0,
        Some(_) if c.access == 3 && c.read_hi => RW_MSB,
        Some(_) if c.access == 3 => RW_WORD0,
        Some(_) => c.access,
    };
    k.status_latched = u8::from(c.latched_status.is_some());
    k.status = c.latched_status.unwrap_or(0);
    k.read_state = flip(c.access, c.read_hi);
    k.write_state = flip(c.access, c.write_hi);
    k.write_latch = c.write_lo;
    k.rw_mode = c.access;
    k.mode = c.mode;
    k.bcd = u8::from(c.bcd);
    k.gate = u8::from(c.gate);
}

fn chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, AccelError> {
    let mut c = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c).map_err(host("KVM_GET_IRQCHIP"))?;
    Ok(c)
}

/// Captures the in-kernel 8259 pair and IOAPIC (with `irqchip`) and the PIT (once created).
pub(crate) fn save_platform(
    vm: &VmFd,
    irqchip: bool,
    pit: &LazyPit,
) -> Result<PlatformState, AccelError> {
    let mut out = PlatformState::default();
    if irqchip {
        let m = chip(vm, KVM_IRQCHIP_PIC_MASTER)?;
        let s = chip(vm, KVM_IRQCHIP_PIC_SLAVE)?;
        let io = chip(vm, KVM_IRQCHIP_IOAPIC)?;
        // SAFETY: KVM filled the union member named by `chip_id`.
        let (m, s, io) = unsafe { (m.chip.pic, s.chip.pic, io.chip.ioapic) };
        out.pic = Some([pic_from_kvm(&m, true), pic_from_kvm(&s, false)]);
        let mut rte = [0u64; 24];
        for (r, k) in rte.iter_mut().zip(io.redirtbl.iter()) {
            // SAFETY: every bit pattern is a valid `u64`.
            *r = unsafe { k.bits };
        }
        out.ioapic = Some(IoapicState {
            id: io.id,
            select: io.ioregsel,
            rte,
            pins: io.irr,
        });
    }
    if pit.created() {
        let p = vm.get_pit2().map_err(host("KVM_GET_PIT2"))?;
        let now = monotonic_ns();
        out.pit = Some([
            pit_from_kvm(&p.channels[0], now),
            pit_from_kvm(&p.channels[1], now),
            pit_from_kvm(&p.channels[2], now),
        ]);
        out.port61 = u8::from(p.channels[2].gate != 0);
    }
    Ok(out)
}

/// Puts the in-kernel devices in `s`; a device `s` has that this VM has not is refused first.
pub(crate) fn restore_platform(
    vm: &VmFd,
    irqchip: bool,
    pit: &LazyPit,
    wants_pit: bool,
    s: &PlatformState,
) -> Result<(), AccelError> {
    if !irqchip && (s.pic.is_some() || s.ioapic.is_some()) {
        return Err(AccelError::Unsupported {
            accel: "kvm",
            what: "restoring an interrupt controller without the in-kernel irqchip",
        });
    }
    // A PIT the guest never programmed is the same as none (the interpreter always has one).
    let pit_used = s.pit.is_some_and(|p| p.iter().any(|c| c.loaded));
    if pit_used && !wants_pit {
        return Err(AccelError::Unsupported {
            accel: "kvm",
            what: "restoring a PIT into a machine without one",
        });
    }
    if let Some(chips) = &s.pic {
        for (c, id) in chips
            .iter()
            .zip([KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE])
        {
            let mut k = chip(vm, id)?;
            // SAFETY: KVM filled the PIC member for a PIC `chip_id`.
            let mut p = unsafe { k.chip.pic };
            pic_to_kvm(c, &mut p);
            k.chip.pic = p;
            vm.set_irqchip(&k).map_err(host("KVM_SET_IRQCHIP"))?;
        }
    }
    if let Some(io) = &s.ioapic {
        let mut k = chip(vm, KVM_IRQCHIP_IOAPIC)?;
        // SAFETY: KVM filled the IOAPIC member for the IOAPIC `chip_id`.
        let mut a = unsafe { k.chip.ioapic };
        a.id = io.id;
        a.ioregsel = io.select;
        a.irr = io.pins;
        for (k, &r) in a.redirtbl.iter_mut().zip(io.rte.iter()) {
            k.bits = r;
        }
        k.chip.ioapic = a;
        vm.set_irqchip(&k).map_err(host("KVM_SET_IRQCHIP"))?;
    }
    if let Some(chans) = s.pit.as_ref().filter(|_| wants_pit) {
        pit.ensure()?;
        let mut p = vm.get_pit2().map_err(host("KVM_GET_PIT2"))?;
        let now = monotonic_ns();
        for (c, k) in chans.iter().zip(p.channels.iter_mut()) {
            pit_to_kvm(c, k, now);
        }
        p.channels[2].gate = s.port61 & 1;
        vm.set_pit2(&p).map_err(host("KVM_SET_PIT2"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fxsave_image_round_trips_through_kvm_fpu() {
        let mut img = vec![0u8; 512];
        for (i, b) in img.iter_mut().enumerate() {
            *b = (i * 7) as u8;
        }
        img[5] = 0;
        img[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
        for k in 0..8 {
            img[32 + 16 * k + 10..48 + 16 * k].fill(0);
        }
        for b in &mut img[416..] {
            *b = 0;
        }
        let back = fxsave_from_kvm(&fxsave_to_kvm(&img));
        assert_eq!(back[..160], img[..160]);
        assert_eq!(back[160..416], img[160..416]);
    }

    #[test]
    fn pit_channel_round_trips_through_kvm() {
        let c = PitChannelState {
            mode: 2,
            access: 3,
            bcd: false,
            reload: 11932,
            loaded: true,
            elapsed_ns: 12345,
            gate: true,
            latched_count: Some(100),
            latched_status: None,
            read_hi: true,
            write_hi: false,
            write_lo: 0x9c,
        };
        let mut k = kvm_pit_channel_state::default();
        pit_to_kvm(&c, &mut k, 1_000_000);
        assert_eq!(pit_from_kvm(&k, 1_000_000), c);
    }
}
