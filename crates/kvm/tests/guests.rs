//! Tiny hand-encoded guests run on the real `/dev/kvm` through the seam.
//!
//! Each test skips (prints why and returns) where `/dev/kvm` cannot be used. On KVM-PVM hosts
//! real-mode and CPL0 code is emulated at ~1.5 MIPS, so the guests are a few instructions.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_accel::{
    Accelerator, BusDevice, ExitAction, GuestMemory, IoBuses, IrqChip, MachineRequirements,
    MmioAddress, PioAddress, Segment, Vcpu, VcpuExit, Vm, handle_exit,
};
use keel_kvm::{KvmAccel, KvmOptions};
use vm_memory::{Bytes, GuestAddress};

use common::{Events, accel, no_irqchip, requirements, start_real_mode};

const RAM: u64 = 0x10_0000;
const CODE: u64 = 0x1000;

/// Records writes; a read returns `base + number of reads so far` in every byte's low byte, or
/// the last byte written plus one when `latch` is set.
#[derive(Default)]
struct Device {
    writes: Mutex<Vec<(u64, Vec<u8>)>>,
    reads: AtomicU32,
    latch: bool,
    read_value: u64,
}

impl BusDevice for Device {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let n = self.reads.fetch_add(1, Ordering::SeqCst);
        let v = if self.latch {
            let w = self.writes.lock().unwrap();
            u64::from(w.last().map_or(0, |(_, d)| d[0]).wrapping_add(1))
        } else if self.read_value != 0 {
            self.read_value >> (8 * (offset & 7))
        } else {
            0x10 + u64::from(n)
        };
        let b = v.to_le_bytes();
        let k = data.len().min(8);
        data[..k].copy_from_slice(&b[..k]);
    }
    fn write(&self, offset: u64, data: &[u8]) {
        self.writes.lock().unwrap().push((offset, data.to_vec()));
    }
}

struct Guest {
    _vm: Box<dyn Vm>,
    vcpu: Box<dyn Vcpu>,
    mem: Arc<GuestMemory>,
    buses: Arc<IoBuses>,
}

/// A 1 MiB VM with `code` at 0x1000 and vCPU `index` (of `count`) in real mode at CS:IP 0:0x1000.
fn guest_n(opts: KvmOptions, code: &[u8], index: u32, count: u32) -> Option<Guest> {
    let accel = accel(opts)?;
    let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap());
    mem.write_slice(code, GuestAddress(CODE)).unwrap();
    let req = requirements("test", count, RAM, false);
    let buses = Arc::new(IoBuses::new());
    let vm = accel
        .create_vm(
            &req,
            mem.clone(),
            buses.clone(),
            Arc::new(Events::default()),
        )
        .unwrap();
    let mut vcpu = vm.create_vcpu(index).unwrap();
    start_real_mode(vcpu.as_mut(), CODE);
    Some(Guest {
        _vm: vm,
        vcpu,
        mem,
        buses,
    })
}

fn guest(opts: KvmOptions, code: &[u8]) -> Option<Guest> {
    guest_n(opts, code, 0, 1)
}

/// Runs until an exit that is not port or MMIO I/O; returns it and the I/O exits seen.
fn run_to_stop(g: &mut Guest) -> (VcpuExit, Vec<VcpuExit>) {
    let mut io = Vec::new();
    for _ in 0..10_000 {
        let exit = g.vcpu.run().unwrap();
        match handle_exit(&exit, &g.buses) {
            ExitAction::Resume => io.push(exit),
            ExitAction::CompleteRead(v) => {
                io.push(exit);
                g.vcpu.complete_read(v);
            }
            _ => return (exit, io),
        }
    }
    panic!("guest did not stop");
}

#[test]
fn real_mode_out_in_round_trip() {
    // mov al,0x5a ; mov dx,0x510 ; out dx,al ; in al,dx ; inc dx ; out dx,al ; hlt
    let code = [0xb0, 0x5a, 0xba, 0x10, 0x05, 0xee, 0xec, 0x42, 0xee, 0xf4];
    let Some(mut g) = guest(no_irqchip(), &code) else {
        return;
    };
    let dev = Arc::new(Device {
        latch: true,
        ..Device::default()
    });
    g.buses.pio.insert(0x510, 2, dev.clone()).unwrap();
    let (stop, io) = run_to_stop(&mut g);
    assert_eq!(stop, VcpuExit::Halted);
    assert_eq!(
        io,
        vec![
            VcpuExit::IoOut {
                port: PioAddress(0x510),
                size: 1,
                data: 0x5a
            },
            VcpuExit::IoIn {
                port: PioAddress(0x510),
                size: 1
            },
            VcpuExit::IoOut {
                port: PioAddress(0x511),
                size: 1,
                data: 0x5b
            },
        ]
    );
    assert_eq!(
        dev.writes.lock().unwrap().as_slice(),
        &[(0, vec![0x5a]), (1, vec![0x5b])]
    );
    assert_eq!(g.vcpu.regs().unwrap().rax & 0xff, 0x5b);
}

#[test]
fn string_io_is_split_into_single_accesses() {
    // mov si,0x2000 ; mov cx,4 ; mov dx,0x510 ; rep outsb
    // mov di,0x3000 ; mov cx,3 ; rep insb ; hlt
    let code = [
        0xbe, 0x00, 0x20, 0xb9, 0x04, 0x00, 0xba, 0x10, 0x05, 0xf3, 0x6e, 0xbf, 0x00, 0x30, 0xb9,
        0x03, 0x00, 0xf3, 0x6c, 0xf4,
    ];
    let Some(mut g) = guest(no_irqchip(), &code) else {
        return;
    };
    g.mem
        .write_slice(&[1, 2, 3, 4], GuestAddress(0x2000))
        .unwrap();
    let dev = Arc::new(Device::default());
    g.buses.pio.insert(0x510, 1, dev.clone()).unwrap();
    let (stop, io) = run_to_stop(&mut g);
    assert_eq!(stop, VcpuExit::Halted);
    assert_eq!(io.len(), 7);
    let w: Vec<u8> = dev
        .writes
        .lock()
        .unwrap()
        .iter()
        .map(|(_, d)| d[0])
        .collect();
    assert_eq!(w, [1, 2, 3, 4]);
    let mut got = [0u8; 4];
    g.mem.read_slice(&mut got, GuestAddress(0x3000)).unwrap();
    assert_eq!(got, [0x10, 0x11, 0x12, 0]);
    let r = g.vcpu.regs().unwrap();
    assert_eq!(
        (r.rsi & 0xffff, r.rdi & 0xffff, r.rcx & 0xffff),
        (0x2004, 0x3003, 0)
    );
}

#[test]
fn mmio_write_and_read() {
    // mov ax,0xd000 ; mov ds,ax ; mov word [4],0x1234 ; mov ax,[8] ; hlt
    let code = [
        0xb8, 0x00, 0xd0, 0x8e, 0xd8, 0xc7, 0x06, 0x04, 0x00, 0x34, 0x12, 0xa1, 0x08, 0x00, 0xf4,
    ];
    // 64 KiB of RAM, so 0xd0000 is not RAM.
    let dev = Arc::new(Device {
        read_value: 0xbeef,
        ..Device::default()
    });
    let Some(mut g) = guest_small(&code) else {
        return;
    };
    g.buses.mmio.insert(0xd0000, 0x10, dev.clone()).unwrap();
    let (stop, io) = run_to_stop(&mut g);
    assert_eq!(stop, VcpuExit::Halted);
    assert_eq!(
        io,
        vec![
            VcpuExit::MmioWrite {
                addr: MmioAddress(0xd0004),
                size: 2,
                data: 0x1234
            },
            VcpuExit::MmioRead {
                addr: MmioAddress(0xd0008),
                size: 2
            },
        ]
    );
    assert_eq!(
        dev.writes.lock().unwrap().as_slice(),
        &[(4, vec![0x34, 0x12])]
    );
    assert_eq!(g.vcpu.regs().unwrap().rax & 0xffff, 0xbeef);
}

/// Like [`guest`] but with 64 KiB of RAM, so 0xd0000 is MMIO.
fn guest_small(code: &[u8]) -> Option<Guest> {
    let accel = accel(no_irqchip())?;
    let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap());
    mem.write_slice(code, GuestAddress(CODE)).unwrap();
    let req = requirements("test", 1, 0x10000, false);
    let buses = Arc::new(IoBuses::new());
    let vm = accel
        .create_vm(
            &req,
            mem.clone(),
            buses.clone(),
            Arc::new(Events::default()),
        )
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    start_real_mode(vcpu.as_mut(), CODE);
    Some(Guest {
        _vm: vm,
        vcpu,
        mem,
        buses,
    })
}

#[test]
fn hlt_without_irqchip_exits_halted() {
    // hlt
    let Some(mut g) = guest(no_irqchip(), &[0xf4]) else {
        return;
    };
    assert_eq!(g.vcpu.run().unwrap(), VcpuExit::Halted);
    assert_eq!(g.vcpu.regs().unwrap().rip, CODE + 1);
}

#[test]
fn triple_fault_is_shutdown() {
    // 32-bit: ud2 with an empty IDT: #UD cannot be delivered -> #GP cannot -> #DF cannot ->
    // the CPU shuts down.
    let Some(mut g) = guest(no_irqchip(), &[0x0f, 0x0b]) else {
        return;
    };
    enter_protected_mode(&mut g, 0);
    let mut s = g.vcpu.sregs().unwrap();
    s.idt.limit = 0;
    g.vcpu.set_sregs(&s).unwrap();
    let (stop, io) = run_to_stop(&mut g);
    assert!(io.is_empty(), "{io:?}");
    assert_eq!(stop, VcpuExit::Shutdown);
}

/// Runs `vcpu` on a thread until it returns something that is not I/O; reports it.
fn run_on_thread(
    mut vcpu: Box<dyn Vcpu>,
    buses: Arc<IoBuses>,
) -> mpsc::Receiver<(VcpuExit, Box<dyn Vcpu>)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        loop {
            let exit = vcpu.run().unwrap();
            match handle_exit(&exit, &buses) {
                ExitAction::Resume => {}
                ExitAction::CompleteRead(v) => vcpu.complete_read(v),
                _ => {
                    let _ = tx.send((exit, vcpu));
                    return;
                }
            }
        }
    });
    rx
}

#[test]
fn kick_interrupts_a_spinning_guest() {
    // jmp $
    let Some(g) = guest(KvmOptions::default(), &[0xeb, 0xfe]) else {
        return;
    };
    let kicker = g.vcpu.kicker();
    let rx = run_on_thread(g.vcpu, g.buses.clone());
    std::thread::sleep(Duration::from_millis(100));
    assert!(rx.try_recv().is_err(), "the spinning guest must still run");
    kicker.kick();
    let (exit, mut vcpu) = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("kick did not interrupt KVM_RUN");
    assert_eq!(exit, VcpuExit::Interrupted);
    let rip = vcpu.regs().unwrap().rip;
    assert_eq!(rip, CODE, "still at the jmp");
    // A kick before run() is not lost either.
    kicker.kick();
    assert_eq!(vcpu.run().unwrap(), VcpuExit::Interrupted);
}

#[test]
fn kick_wakes_a_vcpu_halted_in_the_kernel() {
    // out 0x80,al ; hlt   (with the in-kernel irqchip, hlt waits inside KVM)
    let Some(mut g) = guest(KvmOptions::default(), &[0xe6, 0x80, 0xf4]) else {
        return;
    };
    let exit = g.vcpu.run().unwrap();
    assert!(matches!(
        exit,
        VcpuExit::IoOut {
            port: PioAddress(0x80),
            ..
        }
    ));
    let kicker = g.vcpu.kicker();
    let rx = run_on_thread(g.vcpu, g.buses.clone());
    std::thread::sleep(Duration::from_millis(100));
    kicker.kick();
    let (exit, vcpu) = rx.recv_timeout(Duration::from_secs(20)).expect("no wakeup");
    assert_eq!(exit, VcpuExit::Interrupted);
    assert_eq!(vcpu.regs().unwrap().rip, CODE + 3);
}

#[test]
fn many_kicks_from_another_thread_never_hang() {
    // out 0x80,al ; jmp short back   -- a stream of exits to race kicks against.
    let Some(g) = guest(KvmOptions::default(), &[0xe6, 0x80, 0xeb, 0xfc]) else {
        return;
    };
    let mut vcpu = g.vcpu;
    let kicker = vcpu.kicker();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = done.clone();
    let t = std::thread::spawn(move || {
        let mut interrupted = 0;
        while interrupted < 20 {
            let exit = vcpu.run().unwrap();
            if exit == VcpuExit::Interrupted {
                interrupted += 1;
            }
        }
        d.store(true, Ordering::SeqCst);
    });
    let start = std::time::Instant::now();
    while !done.load(Ordering::SeqCst) {
        assert!(start.elapsed() < Duration::from_secs(30), "kicks were lost");
        kicker.kick();
        std::thread::sleep(Duration::from_millis(2));
    }
    t.join().unwrap();
}

fn flat(selector: u16, type_: u8) -> Segment {
    Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: true,
        dpl: 0,
        db: true,
        s: true,
        l: false,
        g: true,
        avl: false,
        unusable: false,
    }
}

/// Puts the vCPU in 32-bit protected mode at 0x1000 as a PVH loader does: flat 4 GiB code and
/// data segments, a busy 32-bit TSS, paging off, %ebx = `start_info`.
fn enter_protected_mode(g: &mut Guest, start_info: u64) {
    // GDT: null, code32, data32, 32-bit TSS.
    let gdt: [u64; 4] = [
        0,
        0x00cf_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x0000_8b00_0000_0067,
    ];
    for (i, d) in gdt.iter().enumerate() {
        g.mem
            .write_obj(*d, GuestAddress(0x500 + 8 * i as u64))
            .unwrap();
    }
    let mut s = g.vcpu.sregs().unwrap();
    s.cs = flat(0x8, 0xb);
    let data = flat(0x10, 0x3);
    (s.ds, s.es, s.fs, s.gs, s.ss) = (data, data, data, data, data);
    s.tr = Segment {
        limit: 0x67,
        g: false,
        db: false,
        s: false,
        ..flat(0x18, 0xb)
    };
    s.gdt.base = 0x500;
    s.gdt.limit = 31;
    s.cr0 = 0x11;
    s.cr4 = 0;
    s.efer = 0;
    g.vcpu.set_sregs(&s).unwrap();
    let mut r = g.vcpu.regs().unwrap();
    r.rbx = start_info;
    r.rip = CODE;
    r.rflags = 2;
    g.vcpu.set_regs(&r).unwrap();
}

#[test]
fn protected_mode_entry_pvh_style() {
    // 32-bit code:
    // mov eax,ebx ; mov edx,0x510 ; out dx,eax ; mov [0xd0000000],eax ; mov eax,[0xd0000004] ; hlt
    let code = [
        0x89, 0xd8, 0xba, 0x10, 0x05, 0x00, 0x00, 0xef, 0xa3, 0x00, 0x00, 0x00, 0xd0, 0xa1, 0x04,
        0x00, 0x00, 0xd0, 0xf4,
    ];
    let Some(mut g) = guest(no_irqchip(), &code) else {
        return;
    };
    enter_protected_mode(&mut g, 0x6000);
    let back = g.vcpu.sregs().unwrap();
    assert_eq!(back.cs, flat(0x8, 0xb));
    assert_eq!(back.ds, flat(0x10, 0x3));
    assert_eq!(back.mode(), keel_accel::CpuMode::Protected32);

    let dev = Arc::new(Device {
        read_value: 0xcafe_f00d_0000_0000,
        ..Device::default()
    });
    g.buses.mmio.insert(0xd000_0000, 8, dev.clone()).unwrap();
    let (stop, io) = run_to_stop(&mut g);
    assert_eq!(stop, VcpuExit::Halted);
    assert_eq!(
        io,
        vec![
            VcpuExit::IoOut {
                port: PioAddress(0x510),
                size: 4,
                data: 0x6000
            },
            VcpuExit::MmioWrite {
                addr: MmioAddress(0xd000_0000),
                size: 4,
                data: 0x6000
            },
            VcpuExit::MmioRead {
                addr: MmioAddress(0xd000_0004),
                size: 4
            },
        ]
    );
    assert_eq!(g.vcpu.regs().unwrap().rax, 0xcafe_f00d);
}

#[test]
fn cpuid_shows_kvm_signature_and_apic_id() {
    // mov eax,0x40000000 ; cpuid ; mov esi,edx ; mov dx,0x510 ;
    // out dx,ebx ; out dx,ecx ; out dx,esi (each via mov eax,reg ; out dx,eax) ;
    // mov eax,1 ; cpuid ; mov dx,0x510 ; mov eax,ebx ; out dx,eax ; hlt
    let code = [
        0x66, 0xb8, 0x00, 0x00, 0x00, 0x40, // mov eax,0x40000000
        0x0f, 0xa2, // cpuid
        0x66, 0x89, 0xd6, // mov esi,edx
        0xba, 0x10, 0x05, // mov dx,0x510
        0x66, 0x89, 0xd8, 0x66, 0xef, // mov eax,ebx ; out dx,eax
        0x66, 0x89, 0xc8, 0x66, 0xef, // mov eax,ecx ; out dx,eax
        0x66, 0x89, 0xf0, 0x66, 0xef, // mov eax,esi ; out dx,eax
        0x66, 0xb8, 0x01, 0x00, 0x00, 0x00, // mov eax,1
        0x0f, 0xa2, // cpuid
        0xba, 0x10, 0x05, // mov dx,0x510
        0x66, 0x89, 0xd8, 0x66, 0xef, // mov eax,ebx ; out dx,eax
        0xf4, // hlt
    ];
    let Some(mut g) = guest_n(no_irqchip(), &code, 1, 2) else {
        return;
    };
    let (stop, io) = run_to_stop(&mut g);
    assert_eq!(stop, VcpuExit::Halted);
    let words: Vec<u32> = io
        .iter()
        .map(|e| match e {
            VcpuExit::IoOut { data, .. } => *data as u32,
            other => panic!("{other:?}"),
        })
        .collect();
    let sig: Vec<u8> = words[..3].iter().flat_map(|w| w.to_le_bytes()).collect();
    assert_eq!(&sig, b"KVMKVMKVM\0\0\0");
    assert_eq!(words[3] >> 24, 1, "APIC id of vCPU 1");
}

#[test]
fn reset_restores_the_power_on_state() {
    let Some(mut g) = guest(no_irqchip(), &[0xf4]) else {
        return;
    };
    assert_eq!(g.vcpu.run().unwrap(), VcpuExit::Halted);
    // Only KvmVcpu has reset(); build one directly.
    let accel = accel(no_irqchip()).unwrap();
    let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap());
    let req = MachineRequirements {
        machine: "test".into(),
        vcpus: 1,
        memory: 0x10000,
        irqchip: IrqChip::PicIoapic,
        pit: false,
    };
    let vm = keel_kvm_vm(&accel, &req, mem);
    let mut v = vm.create_kvm_vcpu(0).unwrap();
    let power_on = (v.regs().unwrap(), v.sregs().unwrap());
    assert_eq!(power_on.0.rip, 0xfff0);
    assert_eq!(power_on.1.cs.base, 0xffff_0000);
    let mut r = power_on.0;
    r.rip = 0x1234;
    r.rax = 7;
    v.set_regs(&r).unwrap();
    let mut s = power_on.1;
    s.cr0 |= 1;
    v.set_sregs(&s).unwrap();
    v.reset().unwrap();
    assert_eq!((v.regs().unwrap(), v.sregs().unwrap()), power_on);
}

fn keel_kvm_vm(
    accel: &KvmAccel,
    req: &MachineRequirements,
    mem: Arc<GuestMemory>,
) -> keel_kvm::KvmVm {
    accel
        .create_kvm_vm(req, mem, Arc::new(Events::default()))
        .unwrap()
}

#[test]
fn check_explains_what_does_not_fit() {
    let Some(accel) = accel(KvmOptions::default()) else {
        return;
    };
    let mut req = MachineRequirements {
        machine: "microvm".into(),
        vcpus: 1,
        memory: 128 << 20,
        irqchip: IrqChip::PicIoapic,
        pit: true,
    };
    accel.check(&req).unwrap();
    req.vcpus = 100_000;
    let e = accel.check(&req).unwrap_err().to_string();
    assert!(e.contains("KVM_CAP_MAX_VCPUS"), "{e}");
    req.vcpus = 1;
    req.memory = u64::MAX;
    let e = accel.check(&req).unwrap_err().to_string();
    assert!(e.contains("address space"), "{e}");
    let plain = KvmAccel::with_options(no_irqchip()).unwrap();
    req.memory = 1 << 20;
    let e = plain.check(&req).unwrap_err().to_string();
    assert!(e.contains("PIT"), "{e}");
}

#[test]
fn irq_lines_and_irqfds_exist_for_valid_gsis_only() {
    let Some(accel) = accel(KvmOptions::default()) else {
        return;
    };
    let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap());
    let req = MachineRequirements {
        machine: "microvm".into(),
        vcpus: 1,
        memory: 0x10000,
        irqchip: IrqChip::PicIoapic,
        pit: true,
    };
    let vm = keel_kvm_vm(&accel, &req, mem);
    let line = vm.irq_line(4).unwrap();
    line.set_level(true);
    line.set_level(false);
    line.pulse();
    assert!(vm.irq_line(24).is_err());
    let fd = vm.irqfd(5).unwrap();
    fd.write(1).unwrap();
    assert!(vm.irqfd(99).is_err());
    assert!(vm.create_vcpu(1).is_err(), "only one vCPU in this machine");
    vm.create_vcpu(0).unwrap();
    assert!(vm.create_vcpu(0).is_err(), "vCPU 0 exists");
}

#[test]
fn kick_after_an_in_exit_still_completes_the_in() {
    // mov dx,0x510 ; in al,dx ; jmp $
    let code = [0xba, 0x10, 0x05, 0xec, 0xeb, 0xfe];
    let Some(mut g) = guest(KvmOptions::default(), &code) else {
        return;
    };
    assert_eq!(
        g.vcpu.run().unwrap(),
        VcpuExit::IoIn {
            port: PioAddress(0x510),
            size: 1
        }
    );
    // Pause request arrives while the vCPU thread is handling the exit.
    g.vcpu.kicker().kick();
    g.vcpu.complete_read(0x42);
    assert_eq!(g.vcpu.run().unwrap(), VcpuExit::Interrupted);
    // KVM finished the `in` before honouring immediate_exit: the state is consistent.
    let r = g.vcpu.regs().unwrap();
    assert_eq!((r.rax & 0xff, r.rip), (0x42, CODE + 4));
}

#[test]
fn pic_interrupt_through_irq_line_wakes_a_halted_guest() {
    // Program the in-kernel master 8259 (vector base 0x08, only IRQ 4 unmasked), then
    // `sti ; hlt` in a loop. The IRQ 4 handler acknowledges the PIC and reports on port 0x99.
    let code = [
        0xfa, // cli
        0xb0, 0x11, 0xe6, 0x20, // ICW1: edge, cascade, ICW4 follows
        0xb0, 0x08, 0xe6, 0x21, // ICW2: vectors 0x08..0x0f
        0xb0, 0x04, 0xe6, 0x21, // ICW3: slave on IRQ 2
        0xb0, 0x01, 0xe6, 0x21, // ICW4: 8086 mode
        0xb0, 0xef, 0xe6, 0x21, // OCW1: unmask IRQ 4 only
        0xfb, // sti
        0xf4, // hlt
        0xeb, 0xfd, // jmp back to hlt
    ];
    let handler = [
        0xb0, 0x20, 0xe6, 0x20, // mov al,0x20 ; out 0x20,al  (EOI)
        0xe6, 0x99, // out 0x99,al
        0xcf, // iret
    ];
    let Some(g) = guest(KvmOptions::default(), &code) else {
        return;
    };
    g.mem.write_slice(&handler, GuestAddress(0x1100)).unwrap();
    // IVT entry 0x0c (IRQ 4) -> 0000:1100.
    g.mem
        .write_obj(0x0000_1100u32, GuestAddress(0x0c * 4))
        .unwrap();
    let line = g._vm.irq_line(4).unwrap();
    let (tx, rx) = mpsc::channel();
    let mut vcpu = g.vcpu;
    let kicker = vcpu.kicker();
    let buses = g.buses.clone();
    std::thread::spawn(move || {
        loop {
            let exit = vcpu.run().unwrap();
            let stop = matches!(
                exit,
                VcpuExit::IoOut {
                    port: PioAddress(0x99),
                    ..
                } | VcpuExit::Interrupted
            );
            if let ExitAction::CompleteRead(v) = handle_exit(&exit, &buses) {
                vcpu.complete_read(v);
            }
            if stop {
                let _ = tx.send(exit);
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(rx.try_recv().is_err(), "no interrupt raised yet");
    line.pulse();
    let got = rx.recv_timeout(Duration::from_secs(10));
    if got.is_err() {
        kicker.kick();
    }
    assert!(
        matches!(
            got,
            Ok(VcpuExit::IoOut {
                port: PioAddress(0x99),
                ..
            })
        ),
        "{got:?}"
    );
}

#[test]
fn vm_reset_restores_the_interrupt_controller() {
    let Some(accel) = accel(KvmOptions::default()) else {
        return;
    };
    let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap());
    let req = MachineRequirements {
        machine: "microvm".into(),
        vcpus: 1,
        memory: 0x10000,
        irqchip: IrqChip::PicIoapic,
        pit: true,
    };
    let vm = keel_kvm_vm(&accel, &req, mem);
    let read = |id| {
        let mut c = kvm_bindings::kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        vm.vm_fd().get_irqchip(&mut c).unwrap();
        // SAFETY: chip 0 is the master PIC, whose member is `pic`.
        unsafe { c.chip.pic.imr }
    };
    let before = read(kvm_bindings::KVM_IRQCHIP_PIC_MASTER);
    let mut c = kvm_bindings::kvm_irqchip {
        chip_id: kvm_bindings::KVM_IRQCHIP_PIC_MASTER,
        ..Default::default()
    };
    vm.vm_fd().get_irqchip(&mut c).unwrap();
    c.chip.pic.imr = before ^ 0x5a;
    vm.vm_fd().set_irqchip(&c).unwrap();
    assert_eq!(read(kvm_bindings::KVM_IRQCHIP_PIC_MASTER), before ^ 0x5a);
    Vm::reset(&vm).unwrap();
    assert_eq!(read(kvm_bindings::KVM_IRQCHIP_PIC_MASTER), before);
}

#[test]
fn triple_fault_then_reset_runs_again() {
    let Some(mut g) = guest(no_irqchip(), &[0x0f, 0x0b]) else {
        return;
    };
    enter_protected_mode(&mut g, 0);
    let mut s = g.vcpu.sregs().unwrap();
    s.idt.limit = 0;
    g.vcpu.set_sregs(&s).unwrap();
    assert_eq!(run_to_stop(&mut g).0, VcpuExit::Shutdown);
    // What a VMM does on RESET: reset the vCPU, reload the boot state, run again.
    g.vcpu.reset().unwrap();
    // Back at the architectural reset vector, in real mode.
    let (r, s) = (g.vcpu.regs().unwrap(), g.vcpu.sregs().unwrap());
    assert_eq!(s.mode(), keel_accel::CpuMode::Real);
    assert_eq!((r.rip, s.cs.base), (0xfff0, 0xffff_0000));
    g.mem.write_slice(&[0xf4], GuestAddress(CODE)).unwrap();
    let mut s = g.vcpu.sregs().unwrap();
    s.cs.base = 0;
    s.cs.selector = 0;
    g.vcpu.set_sregs(&s).unwrap();
    let mut r = g.vcpu.regs().unwrap();
    r.rip = CODE;
    g.vcpu.set_regs(&r).unwrap();
    assert_eq!(g.vcpu.run().unwrap(), VcpuExit::Halted);
}

#[test]
fn bsp_starts_an_ap_with_init_sipi() {
    // BSP, 32-bit flat:
    //   mov dword [0xfee00310], 0x01000000   ; ICR high: destination APIC id 1
    //   mov dword [0xfee00300], 0x00004500   ; ICR low: INIT, assert
    //   mov dword [0xfee00300], 0x00004602   ; ICR low: STARTUP, vector 2 -> 0x2000
    //   out 0x98, al ; hlt
    let bsp = [
        0xc7, 0x05, 0x10, 0x03, 0xe0, 0xfe, 0x00, 0x00, 0x00, 0x01, //
        0xc7, 0x05, 0x00, 0x03, 0xe0, 0xfe, 0x00, 0x45, 0x00, 0x00, //
        0xc7, 0x05, 0x00, 0x03, 0xe0, 0xfe, 0x02, 0x46, 0x00, 0x00, //
        0xe6, 0x98, 0xf4,
    ];
    // AP, real mode at 0200:0000: out 0x99, al ; hlt
    let ap_code = [0xe6, 0x99, 0xf4];
    let Some(mut g) = guest_n(KvmOptions::default(), &bsp, 0, 2) else {
        return;
    };
    g.mem.write_slice(&ap_code, GuestAddress(0x2000)).unwrap();
    enter_protected_mode(&mut g, 0);
    let mut ap = g._vm.create_vcpu(1).unwrap();
    let ap_kicker = ap.kicker();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let exit = ap.run();
        let _ = tx.send((exit, ap.sregs().map(|s| s.cs.base)));
    });
    std::thread::sleep(Duration::from_millis(50));
    assert!(rx.try_recv().is_err(), "the AP waits for SIPI");
    let exit = g.vcpu.run().unwrap();
    assert_eq!(
        exit,
        VcpuExit::IoOut {
            port: PioAddress(0x98),
            size: 1,
            data: 0
        }
    );
    let got = rx.recv_timeout(Duration::from_secs(10));
    if got.is_err() {
        ap_kicker.kick();
    }
    let (exit, cs_base) = got.expect("the AP did not start");
    assert!(
        matches!(
            exit,
            Ok(VcpuExit::IoOut {
                port: PioAddress(0x99),
                ..
            })
        ),
        "{exit:?}"
    );
    assert_eq!(cs_base.unwrap(), 0x2000);
}
