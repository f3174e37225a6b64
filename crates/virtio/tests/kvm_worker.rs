//! ioeventfd and irqfd with a real KVM VM: a real-mode guest notifies a virtio-rng queue by
//! writing `QueueNotify` (the write must not exit to user space), the worker thread fills
//! the buffer, and the interrupt reaches the guest through a resampled irqfd on the 8259.
//!
//! Skips (printing why) where `/dev/kvm` cannot be used. On KVM-PVM hosts real-mode code is
//! emulated instruction by instruction, so the guest is a few dozen instructions.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_accel::{
    Accelerator, BusDevice, ExitAction, GuestMemory, IoBuses, IrqChip, MachineRequirements,
    MmioAddress, PioAddress, SystemEvent, SystemEvents, VcpuExit, handle_exit,
};
use keel_virtio::{IoWorker, MmioTransport, Rng, VirtioMmioSlot};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

const RAM: usize = 0x10000;
const CODE: u64 = 0x1000;
const HANDLER: u64 = 0x1100;
const SLOT_BASE: u64 = 0xd0000;
/// ISA IRQ 5: through the in-kernel 8259 (the IOAPIC stays masked in real mode).
const GSI: u32 = 5;
const QUEUE: u64 = 0x4000;
const BUF: u64 = 0x8000;

struct Events;
impl SystemEvents for Events {
    fn request(&self, _: SystemEvent) {}
}

fn wr(t: &MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn rd(t: &MmioTransport, off: u64) -> u32 {
    let mut d = [0u8; 4];
    t.read(off, &mut d);
    u32::from_le_bytes(d)
}

/// The Linux driver's bring-up sequence, done from the host, with one queue of 16.
fn bring_up(t: &MmioTransport, q: &MockSplitQueue<'_, GuestMemory>) {
    wr(t, 0x70, 0);
    wr(t, 0x70, 1);
    wr(t, 0x70, 3);
    for sel in 0..2 {
        wr(t, 0x14, sel);
        let f = rd(t, 0x10);
        wr(t, 0x24, sel);
        wr(t, 0x20, f);
    }
    wr(t, 0x70, 0xb);
    wr(t, 0x30, 0);
    wr(t, 0x38, 8);
    wr(t, 0x80, q.desc_table_addr().0 as u32);
    wr(t, 0x90, q.avail_addr().0 as u32);
    wr(t, 0xa0, q.used_addr().0 as u32);
    wr(t, 0x44, 1);
    wr(t, 0x70, 0xf);
    assert_eq!(rd(t, 0x70), 0xf, "device did not start");
}

#[test]
fn notify_via_ioeventfd_and_interrupt_via_resampled_irqfd() {
    let accel = match keel_kvm::KvmAccel::new() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("skipping: {e}");
            return;
        }
    };
    let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), RAM)]).unwrap());
    // cli; program the master 8259 (vectors 0x08.., only IRQ 5 unmasked);
    // ds = 0xd000; mov dword [0x50], 0 (QueueNotify, queue 0); sti; hlt; jmp hlt
    #[rustfmt::skip]
    let code = [
        0xfa,
        0xb0, 0x11, 0xe6, 0x20,
        0xb0, 0x08, 0xe6, 0x21,
        0xb0, 0x04, 0xe6, 0x21,
        0xb0, 0x01, 0xe6, 0x21,
        0xb0, 0xdf, 0xe6, 0x21,
        0xb8, 0x00, 0xd0, 0x8e, 0xd8,
        0x66, 0xc7, 0x06, 0x50, 0x00, 0x00, 0x00, 0x00, 0x00,
        0xfb,
        0xf4,
        0xeb, 0xfd,
    ];
    // IRQ 5 handler. First time: EOI without acknowledging the device (out 0x98); the
    // line is level-triggered, so after the EOI it must come back. Second time: read
    // InterruptStatus, write it to InterruptACK, EOI, out 0x99.
    #[rustfmt::skip]
    let handler = [
        0x2e, 0xfe, 0x06, 0x00, 0x05,             // inc byte [cs:0x500]
        0x2e, 0x80, 0x3e, 0x00, 0x05, 0x02,       // cmp byte [cs:0x500], 2
        0x72, 0x0f,                               // jb first
        0x66, 0xa1, 0x60, 0x00,                   // mov eax, [0x60]
        0x66, 0xa3, 0x64, 0x00,                   // mov [0x64], eax
        0xb0, 0x20, 0xe6, 0x20,                   // EOI
        0xe6, 0x99,                               // out 0x99, al
        0xcf,                                     // iret
        0xb0, 0x20, 0xe6, 0x20,                   // first: EOI
        0xe6, 0x98,                               // out 0x98, al
        0xcf,                                     // iret
    ];
    mem.write_slice(&code, GuestAddress(CODE)).unwrap();
    mem.write_slice(&handler, GuestAddress(HANDLER)).unwrap();
    mem.write_obj(HANDLER as u32, GuestAddress(0x0d * 4))
        .unwrap();

    let req = MachineRequirements {
        machine: "test".into(),
        vcpus: 1,
        memory: RAM as u64,
        irqchip: IrqChip::PicIoapic,
        pit: false,
    };
    let buses = Arc::new(IoBuses::new());
    let vm = match accel.create_vm(&req, mem.clone(), buses.clone(), Arc::new(Events)) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("skipping: {e}");
            return;
        }
    };

    // The device: virtio-rng on a transport in a window below 1 MiB, driven by the host.
    let rng = Arc::new(Mutex::new(Rng::with_source(Box::new(std::io::repeat(
        0xa5,
    )))));
    let transport = Arc::new(MmioTransport::new(
        rng,
        mem.clone(),
        vm.irq_line(GSI).unwrap(),
    ));
    let slot = VirtioMmioSlot::new(SLOT_BASE, GSI);
    slot.attach(&buses, transport.clone()).unwrap();
    let q = MockSplitQueue::create(&*mem, GuestAddress(QUEUE), 8);
    bring_up(&transport, &q);
    let worker = IoWorker::start(vm.as_ref(), slot, transport.clone()).unwrap();
    assert!(worker.uses_ioeventfd(), "KVM offers ioeventfds");
    assert!(worker.uses_irqfd(), "KVM offers irqfds with resample");
    // One 32-byte device-writable buffer on the available ring.
    let d = virtio_queue::desc::RawDescriptor::from(virtio_queue::desc::split::Descriptor::new(
        BUF, 32, 2, 0,
    ));
    q.desc_table().store(0, d).unwrap();
    q.avail().ring().ref_at(0).unwrap().store(0);
    q.avail().idx().store(1);

    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut s = vcpu.sregs().unwrap();
    for seg in [&mut s.cs, &mut s.ds, &mut s.es, &mut s.ss] {
        seg.base = 0;
        seg.selector = 0;
    }
    vcpu.set_sregs(&s).unwrap();
    let mut r = vcpu.regs().unwrap();
    r.rip = CODE;
    r.rsp = 0x8000 - 0x100;
    r.rflags = 2;
    vcpu.set_regs(&r).unwrap();

    let (tx, rx) = mpsc::channel();
    let kicker = vcpu.kicker();
    let io = buses.clone();
    let vcpu_thread = std::thread::spawn(move || {
        let mut exits = Vec::new();
        loop {
            let exit = match vcpu.run() {
                Ok(e) => e,
                Err(e) => {
                    let _ = tx.send(Err(format!("{e}")));
                    return;
                }
            };
            if let ExitAction::CompleteRead(v) = handle_exit(&exit, &io) {
                vcpu.complete_read(v);
            }
            let done = matches!(
                exit,
                VcpuExit::IoOut {
                    port: PioAddress(0x99),
                    ..
                } | VcpuExit::Interrupted
            );
            exits.push(exit);
            if done {
                let _ = tx.send(Ok(exits));
                return;
            }
        }
    });
    let got = rx.recv_timeout(Duration::from_secs(30));
    if got.is_err() {
        kicker.kick();
    }
    let exits = got.expect("guest did not finish").expect("vCPU error");
    vcpu_thread.join().unwrap();

    let notify = MmioAddress(SLOT_BASE + 0x50);
    assert!(
        !exits
            .iter()
            .any(|e| matches!(e, VcpuExit::MmioWrite { addr, .. } if *addr == notify)),
        "QueueNotify left the kernel: {exits:?}"
    );
    let ports: Vec<u16> = exits
        .iter()
        .filter_map(|e| match e {
            VcpuExit::IoOut { port, .. } => Some(port.0),
            _ => None,
        })
        .collect();
    assert_eq!(
        ports,
        [0x98, 0x99],
        "first interrupt, then the resampled one: {exits:?}"
    );
    assert!(
        exits.contains(&VcpuExit::MmioWrite {
            addr: MmioAddress(SLOT_BASE + 0x64),
            size: 4,
            data: 1
        }),
        "the guest acknowledged the used-buffer interrupt: {exits:?}"
    );
    assert_eq!(q.used().idx().load(), 1);
    let mut buf = [0u8; 32];
    mem.read_slice(&mut buf, GuestAddress(BUF)).unwrap();
    assert_eq!(buf, [0xa5; 32]);
    assert_eq!(rd(&transport, 0x60), 0, "status cleared by the ack");
    worker.stop(vm.as_ref());
}
