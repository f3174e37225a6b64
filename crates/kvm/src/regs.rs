//! One-to-one conversions between KVM's register structs and the seam's.

use keel_accel::{DescriptorTable, Regs, Segment, SpecialRegs};
use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};

pub(crate) fn regs_from_kvm(r: &kvm_regs) -> Regs {
    Regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

pub(crate) fn regs_to_kvm(r: &Regs) -> kvm_regs {
    kvm_regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

fn seg_from_kvm(s: &kvm_segment) -> Segment {
    Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present != 0,
        dpl: s.dpl,
        db: s.db != 0,
        s: s.s != 0,
        l: s.l != 0,
        g: s.g != 0,
        avl: s.avl != 0,
        unusable: s.unusable != 0,
    }
}

fn seg_to_kvm(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_ & 0xf,
        present: u8::from(s.present),
        dpl: s.dpl & 3,
        db: u8::from(s.db),
        s: u8::from(s.s),
        l: u8::from(s.l),
        g: u8::from(s.g),
        avl: u8::from(s.avl),
        unusable: u8::from(s.unusable),
        padding: 0,
    }
}

fn dt_from_kvm(d: &kvm_dtable) -> DescriptorTable {
    DescriptorTable {
        base: d.base,
        limit: d.limit,
    }
}

fn dt_to_kvm(d: &DescriptorTable) -> kvm_dtable {
    kvm_dtable {
        base: d.base,
        limit: d.limit,
        padding: [0; 3],
    }
}

pub(crate) fn sregs_from_kvm(s: &kvm_sregs) -> SpecialRegs {
    SpecialRegs {
        cs: seg_from_kvm(&s.cs),
        ds: seg_from_kvm(&s.ds),
        es: seg_from_kvm(&s.es),
        fs: seg_from_kvm(&s.fs),
        gs: seg_from_kvm(&s.gs),
        ss: seg_from_kvm(&s.ss),
        tr: seg_from_kvm(&s.tr),
        ldt: seg_from_kvm(&s.ldt),
        gdt: dt_from_kvm(&s.gdt),
        idt: dt_from_kvm(&s.idt),
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.apic_base,
    }
}

/// Writes `s` over `into`, keeping `into`'s `interrupt_bitmap` (a pending, already
/// acknowledged external interrupt that the seam does not model and must not drop).
pub(crate) fn sregs_to_kvm(s: &SpecialRegs, into: &mut kvm_sregs) {
    into.cs = seg_to_kvm(&s.cs);
    into.ds = seg_to_kvm(&s.ds);
    into.es = seg_to_kvm(&s.es);
    into.fs = seg_to_kvm(&s.fs);
    into.gs = seg_to_kvm(&s.gs);
    into.ss = seg_to_kvm(&s.ss);
    into.tr = seg_to_kvm(&s.tr);
    into.ldt = seg_to_kvm(&s.ldt);
    into.gdt = dt_to_kvm(&s.gdt);
    into.idt = dt_to_kvm(&s.idt);
    into.cr0 = s.cr0;
    into.cr2 = s.cr2;
    into.cr3 = s.cr3;
    into.cr4 = s.cr4;
    into.cr8 = s.cr8;
    into.efer = s.efer;
    into.apic_base = s.apic_base;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regs_round_trip() {
        let vals: Vec<u64> = (1..=18).map(|i| i * 0x1111_0000_0001).collect();
        let r = Regs {
            rax: vals[0],
            rbx: vals[1],
            rcx: vals[2],
            rdx: vals[3],
            rsi: vals[4],
            rdi: vals[5],
            rsp: vals[6],
            rbp: vals[7],
            r8: vals[8],
            r9: vals[9],
            r10: vals[10],
            r11: vals[11],
            r12: vals[12],
            r13: vals[13],
            r14: vals[14],
            r15: vals[15],
            rip: vals[16],
            rflags: vals[17],
        };
        let k = regs_to_kvm(&r);
        assert_eq!(k.r13, vals[13]);
        assert_eq!(regs_from_kvm(&k), r);
    }

    #[test]
    fn sregs_round_trip_keeps_interrupt_bitmap() {
        let seg = Segment {
            base: 0x1000,
            limit: 0xffff_ffff,
            selector: 0x10,
            type_: 0xb,
            present: true,
            dpl: 0,
            db: true,
            s: true,
            l: false,
            g: true,
            avl: false,
            unusable: false,
        };
        let s = SpecialRegs {
            cs: seg,
            ds: Segment {
                type_: 3,
                selector: 0x18,
                ..seg
            },
            tr: Segment {
                type_: 0xb,
                s: false,
                limit: 0x67,
                ..seg
            },
            ldt: Segment {
                unusable: true,
                ..Segment::default()
            },
            gdt: DescriptorTable {
                base: 0x500,
                limit: 0x27,
            },
            cr0: 0x11,
            cr4: 0x20,
            efer: 0x500,
            apic_base: 0xfee0_0900,
            ..SpecialRegs::default()
        };
        let mut k = kvm_sregs::default();
        k.interrupt_bitmap[0] = 1 << 32;
        sregs_to_kvm(&s, &mut k);
        assert_eq!(k.interrupt_bitmap[0], 1 << 32);
        assert_eq!(k.tr.limit, 0x67);
        assert_eq!(sregs_from_kvm(&k), s);
    }
}
