//! Test harness: guest memory, a serial-capture port, isa-debug-exit, and mode setup helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::sync::{Arc, Mutex};

use keel_accel::{
    BusDevice, IoBuses, Regs, Segment, SpecialRegs, SystemEvent, SystemEvents, Vcpu, VcpuExit, Vm,
};
use keel_tcg::{TcgVcpu, TcgVm};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const CODE: u64 = 0x10_0000;
pub const STACK: u64 = 0x8_0000;
pub const GDT: u64 = 0x1000;
pub const IDT: u64 = 0x2000;
pub const TSS: u64 = 0x3000;
pub const PML4: u64 = 0x1_0000;

#[derive(Default)]
pub struct Capture(pub Mutex<Vec<u8>>);
impl BusDevice for Capture {
    fn read(&self, offset: u64, data: &mut [u8]) {
        // LSR (offset 5) reports the transmitter empty.
        data.fill(if offset == 5 { 0x60 } else { 0 });
    }
    fn write(&self, offset: u64, data: &[u8]) {
        if offset == 0 {
            self.0.lock().unwrap().extend_from_slice(data);
        }
    }
}

#[derive(Default)]
pub struct ExitPort(pub Mutex<Option<u32>>);
impl BusDevice for ExitPort {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, _offset: u64, data: &[u8]) {
        let mut b = [0u8; 4];
        b[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
        *self.0.lock().unwrap() = Some(u32::from_le_bytes(b));
    }
}

struct NoEvents;
impl SystemEvents for NoEvents {
    fn request(&self, _e: SystemEvent) {}
}

pub struct Harness {
    pub mem: Arc<GuestMemoryMmap>,
    pub buses: Arc<IoBuses>,
    pub vm: TcgVm,
    pub vcpu: TcgVcpu,
    pub serial: Arc<Capture>,
    pub exit: Arc<ExitPort>,
}

impl Harness {
    pub fn new(mem_mb: u64) -> Self {
        let mem = Arc::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), (mem_mb << 20) as usize)])
                .unwrap(),
        );
        let buses = Arc::new(IoBuses::new());
        let serial = Arc::new(Capture::default());
        let exit = Arc::new(ExitPort::default());
        buses.pio.insert(0x3f8, 8, serial.clone()).unwrap();
        buses.pio.insert(0xf4, 4, exit.clone()).unwrap();
        let vm = TcgVm::new(
            mem.clone(),
            buses.clone(),
            Arc::new(NoEvents),
            Default::default(),
        )
        .unwrap();
        for (r, d) in vm.platform_devices() {
            buses.pio.insert(r.base, r.len, d).unwrap();
        }
        let vcpu = vm.create_tcg_vcpu(0);
        Self {
            mem,
            buses,
            vm,
            vcpu,
            serial,
            exit,
        }
    }

    pub fn write(&self, gpa: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(gpa)).unwrap();
    }
    pub fn w64(&self, gpa: u64, v: u64) {
        self.write(gpa, &v.to_le_bytes());
    }
    pub fn r64(&self, gpa: u64) -> u64 {
        let mut b = [0u8; 8];
        self.mem.read_slice(&mut b, GuestAddress(gpa)).unwrap();
        u64::from_le_bytes(b)
    }

    /// Flat 64-bit long mode, identity map of the first 1 GiB with 2 MiB pages, CPL0.
    pub fn long_mode(&mut self, code: &[u8]) {
        self.write(CODE, code);
        // GDT: null, code64 (0x08), data (0x10), code64 DPL3 (0x18|3), data DPL3 (0x20|3), TSS (0x28)
        let gdt = [
            0u64,
            0x00af_9b00_0000_ffff,
            0x00cf_9300_0000_ffff,
            0x00af_fb00_0000_ffff,
            0x00cf_f300_0000_ffff,
        ];
        for (k, d) in gdt.iter().enumerate() {
            self.w64(GDT + 8 * k as u64, *d);
        }
        // 64-bit TSS descriptor at 0x28.
        let base = TSS;
        let lim = 0x67u64;
        let lo = (lim & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x89 << 40)
            | (((base >> 24) & 0xff) << 56);
        self.w64(GDT + 0x28, lo);
        self.w64(GDT + 0x30, base >> 32);
        let pdpt = PML4 + 0x1000;
        let pd = PML4 + 0x2000;
        self.w64(PML4, pdpt | 7);
        self.w64(pdpt, pd | 7);
        for k in 0..512u64 {
            self.w64(pd + 8 * k, (k << 21) | 0x87);
        }
        let seg = |sel: u16, code: bool| Segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: sel,
            type_: if code { 0xb } else { 3 },
            present: true,
            dpl: 0,
            db: !code,
            s: true,
            l: code,
            g: true,
            avl: false,
            unusable: false,
        };
        let mut s = SpecialRegs {
            cs: seg(8, true),
            ds: seg(0x10, false),
            es: seg(0x10, false),
            fs: seg(0x10, false),
            gs: seg(0x10, false),
            ss: seg(0x10, false),
            ..Default::default()
        };
        s.tr = Segment {
            base: TSS,
            limit: 0x67,
            selector: 0x28,
            type_: 0xb,
            present: true,
            s: false,
            ..Default::default()
        };
        s.gdt.base = GDT;
        s.gdt.limit = 0x37;
        s.idt.base = IDT;
        s.idt.limit = 0xfff;
        s.cr0 = 0x8000_0033 | (1 << 16);
        s.cr3 = PML4;
        s.cr4 = 0x620; // PAE, OSFXSR, OSXMMEXCPT
        s.efer = 0xd01; // SCE LME LMA NXE
        self.vcpu.set_sregs(&s).unwrap();
        self.vcpu
            .set_regs(&Regs {
                rip: CODE,
                rsp: STACK,
                rflags: 2,
                ..Default::default()
            })
            .unwrap();
    }

    /// Sets a 64-bit interrupt gate for `vector` at `handler` (IST `ist`, DPL `dpl`).
    pub fn gate64(&self, vector: u8, handler: u64, ist: u8, dpl: u8) {
        let lo = (handler & 0xffff)
            | (8 << 16)
            | (u64::from(ist) << 32)
            | ((0x8e | (u64::from(dpl) << 5)) << 40)
            | (((handler >> 16) & 0xffff) << 48);
        self.w64(IDT + 16 * u64::from(vector), lo);
        self.w64(IDT + 16 * u64::from(vector) + 8, handler >> 32);
    }

    /// Flat 32-bit protected mode with paging off (the PVH entry state).
    pub fn protected32(&mut self, code: &[u8]) {
        self.write(CODE, code);
        let gdt = [0u64, 0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
        for (k, d) in gdt.iter().enumerate() {
            self.w64(GDT + 8 * k as u64, *d);
        }
        let s = flat32_sregs();
        self.vcpu.set_sregs(&s).unwrap();
        self.vcpu
            .set_regs(&Regs {
                rip: CODE,
                rsp: STACK,
                rflags: 2,
                ..Default::default()
            })
            .unwrap();
    }

    /// Runs until the guest halts with interrupts off, writes isa-debug-exit, or shuts down.
    pub fn run(&mut self) -> VcpuExit {
        for _ in 0..1_000_000 {
            let x = self.vcpu.run().unwrap();
            match x {
                VcpuExit::Interrupted => {
                    if self.exit.0.lock().unwrap().is_some() {
                        return x;
                    }
                }
                _ => return x,
            }
        }
        panic!("guest did not stop");
    }

    pub fn regs(&self) -> Regs {
        self.vcpu.regs().unwrap()
    }

    pub fn serial_text(&self) -> String {
        String::from_utf8_lossy(&self.serial.0.lock().unwrap()).into_owned()
    }
}

/// Assembles with iced's code assembler at `ip`.
pub fn asm(bits: u32, ip: u64, f: impl FnOnce(&mut iced_x86::code_asm::CodeAssembler)) -> Vec<u8> {
    let mut a = iced_x86::code_asm::CodeAssembler::new(bits).unwrap();
    f(&mut a);
    a.assemble(ip).unwrap()
}

/// Flat 32-bit protected mode (paging off): CS 0x10 and data 0x18 over the 4 GiB segments of
/// the GDT at [`GDT`], a busy 32-bit TSS.
pub fn flat32_sregs() -> SpecialRegs {
    let seg = |sel: u16, code: bool| Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: sel,
        type_: if code { 0xb } else { 3 },
        present: true,
        dpl: 0,
        db: true,
        s: true,
        l: false,
        g: true,
        avl: false,
        unusable: false,
    };
    let mut s = SpecialRegs {
        cs: seg(0x10, true),
        ds: seg(0x18, false),
        es: seg(0x18, false),
        fs: seg(0x18, false),
        gs: seg(0x18, false),
        ss: seg(0x18, false),
        ..Default::default()
    };
    s.tr = Segment {
        limit: 0x67,
        type_: 0xb,
        present: true,
        ..Default::default()
    };
    s.gdt.base = GDT;
    s.gdt.limit = 0x1f;
    s.cr0 = 0x11;
    s
}

/// Real mode at segment 0 everywhere, the IVT at 0 (the state after a reset with CS:IP
/// moved to low memory).
pub fn real_mode_sregs() -> SpecialRegs {
    let real = |code: bool| Segment {
        limit: 0xffff,
        type_: if code { 0xb } else { 3 },
        present: true,
        s: true,
        ..Default::default()
    };
    SpecialRegs {
        cs: real(true),
        ds: real(false),
        es: real(false),
        fs: real(false),
        gs: real(false),
        ss: real(false),
        cr0: 0x10,
        idt: keel_accel::DescriptorTable {
            base: 0,
            limit: 0x3ff,
        },
        ..Default::default()
    }
}
