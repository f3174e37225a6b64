//! Snapshots across backends: a guest that counts and prints is stopped mid-run, saved into
//! a real snapshot stream (`keel-snapshot`), restored into a fresh VM on the same or the
//! other backend, and run to its end. The serial output before the stop plus the output
//! after the restore must be exactly the output of an uninterrupted run (and the model's
//! prediction). kvm cases skip with the reason printed when `/dev/kvm` is unusable or
//! `KEEL_TEST_NO_KVM` is set.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{DebugExit, End};
use keel_accel::{
    Accelerator, BusDevice, ExitAction, GuestMemory, IoBuses, IrqChip, Kick, MachineRequirements,
    PLATFORM_SECTION, PLATFORM_VERSION, PlatformState, SystemEvent, SystemEvents, VCPU_SECTION,
    VCPU_VERSION, Vcpu, VcpuExit, VcpuState, Vm, handle_exit,
};
use keel_snapshot::{Header, Persist, Shape, Snapshot, SnapshotError, Writer};
use keel_testguest::{DEBUG_EXIT_PORT, GUEST_MEM_SIZE, SERIAL_PORT, TestGuest};
use vm_memory::GuestAddress;

const BUDGET: Duration = Duration::from_secs(60);

/// A UART data register that records bytes and kicks the vCPU once `stop_at` bytes are in.
#[derive(Default)]
struct StoppingSerial {
    out: Mutex<Vec<u8>>,
    stop: Mutex<Option<(usize, Arc<dyn Kick>)>>,
}

impl BusDevice for StoppingSerial {
    fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 5
            && let Some(b) = data.first_mut()
        {
            *b = 0x60;
        }
    }
    fn write(&self, offset: u64, data: &[u8]) {
        let (Some(b), 0) = (data.first(), offset) else {
            return;
        };
        let mut out = self.out.lock().unwrap();
        out.push(*b);
        if let Some((n, k)) = &*self.stop.lock().unwrap()
            && out.len() >= *n
        {
            k.kick();
        }
    }
}

#[derive(Default)]
struct Events(Mutex<Vec<SystemEvent>>);
impl SystemEvents for Events {
    fn request(&self, event: SystemEvent) {
        self.0.lock().unwrap().push(event);
    }
}

struct Machine {
    accel: &'static str,
    mem: Arc<GuestMemory>,
    buses: Arc<IoBuses>,
    serial: Arc<StoppingSerial>,
    exit: Arc<DebugExit>,
    vm: Box<dyn Vm>,
    vcpu: Box<dyn Vcpu>,
}

fn requirements(guest: &TestGuest) -> MachineRequirements {
    MachineRequirements {
        machine: "testguest".into(),
        vcpus: 1,
        memory: GUEST_MEM_SIZE,
        irqchip: IrqChip::Pic,
        pit: guest.uses_pic_pit,
    }
}

/// A VM with the guest's devices; `boot` loads the guest and sets its entry registers (a
/// machine for a restore gets neither: everything comes from the stream).
fn machine(accel: &dyn Accelerator, guest: &TestGuest, boot: bool) -> Machine {
    let mem =
        Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), GUEST_MEM_SIZE as usize)]).unwrap());
    if boot {
        guest.load(&mem).unwrap();
    }
    let buses = Arc::new(IoBuses::new());
    let serial = Arc::new(StoppingSerial::default());
    let exit = Arc::new(DebugExit::default());
    buses
        .pio
        .insert(u64::from(SERIAL_PORT), 8, serial.clone())
        .unwrap();
    buses
        .pio
        .insert(u64::from(DEBUG_EXIT_PORT), 4, exit.clone())
        .unwrap();
    let req = requirements(guest);
    let vm = accel
        .create_vm(
            &req,
            mem.clone(),
            buses.clone(),
            Arc::new(Events::default()),
        )
        .unwrap();
    for (range, dev) in vm.platform_devices() {
        let _ = buses.pio.insert(range.base, range.len, dev);
    }
    let mut vcpu = vm.create_vcpu(0).unwrap();
    if boot {
        vcpu.set_sregs(&guest.entry.sregs).unwrap();
        vcpu.set_regs(&guest.entry.regs).unwrap();
    }
    Machine {
        accel: accel.name(),
        mem,
        buses,
        serial,
        exit,
        vm,
        vcpu,
    }
}

/// Runs until the guest exits, or (with `stop_at`) until that many serial bytes are out:
/// `None` then means "stopped, not finished".
fn run(m: &mut Machine, stop_at: Option<usize>) -> Option<End> {
    if let Some(n) = stop_at {
        *m.serial.stop.lock().unwrap() = Some((n, m.vcpu.kicker()));
    }
    let start = Instant::now();
    loop {
        let ex = match m.vcpu.run() {
            Ok(ex) => ex,
            Err(e) => return Some(End::Error(e.to_string())),
        };
        if matches!(ex, VcpuExit::Interrupted) && stop_at.is_some() {
            *m.serial.stop.lock().unwrap() = None;
            return None;
        }
        let action = handle_exit(&ex, &m.buses);
        if let Some(v) = m.exit.value() {
            return Some(End::Exit(v));
        }
        match action {
            ExitAction::Resume => {}
            ExitAction::CompleteRead(v) => m.vcpu.complete_read(v),
            ExitAction::WaitForInterrupt => return Some(End::Halted),
            ExitAction::TripleFault | ExitAction::Reset | ExitAction::PowerOff => {
                return Some(End::TripleFault);
            }
            ExitAction::CheckRequests => {}
        }
        if start.elapsed() > BUDGET {
            return Some(End::Timeout);
        }
    }
}

fn serial(m: &Machine) -> String {
    String::from_utf8_lossy(&m.serial.out.lock().unwrap()).into_owned()
}

fn shape() -> Shape {
    Shape {
        machine: "testguest".into(),
        vcpus: 1,
        memory: GUEST_MEM_SIZE,
    }
}

/// Saves the stopped machine into a stream, the way a machine does.
fn save(m: &Machine) -> Vec<u8> {
    let header = Header {
        keel_version: env!("CARGO_PKG_VERSION").into(),
        shape: shape(),
        accel: m.accel.into(),
    };
    let mut w = Writer::new(Vec::new(), &header).unwrap();
    w.section(
        PLATFORM_SECTION,
        0,
        PLATFORM_VERSION,
        &m.vm.save_platform().unwrap().to_payload(),
    )
    .unwrap();
    w.section(
        VCPU_SECTION,
        0,
        VCPU_VERSION,
        &m.vcpu.save_state().unwrap().to_payload(),
    )
    .unwrap();
    w.ram(&m.mem).unwrap();
    w.finish().unwrap()
}

/// Restores a stream into a fresh machine: everything is parsed and decoded first.
fn restore(m: &mut Machine, stream: Vec<u8>) -> Result<(), SnapshotError> {
    let s = Snapshot::parse(stream)?;
    s.header.shape.check(&shape())?;
    let platform: PlatformState = s.decode(PLATFORM_SECTION, 0, PLATFORM_VERSION)?;
    let vcpu: VcpuState = s.decode(VCPU_SECTION, 0, VCPU_VERSION)?;
    s.check_ram(&m.mem)?;
    s.restore_ram(&m.mem)?;
    m.vm.restore_platform(&platform).unwrap();
    m.vcpu.restore_state(&vcpu).unwrap();
    Ok(())
}

fn cross(from: &dyn Accelerator, to: &dyn Accelerator) {
    let guest = keel_testguest::counter(300).unwrap();
    cross_with(from, to, &guest, 40 * 137 + 23);
    // The timer guest programs the 8259 pair and the 8254 and takes IRQ 0 in `hlt`: the
    // platform devices move between the backends too.
    let guest = keel_testguest::timer().unwrap();
    let half = guest.expected_serial.as_ref().unwrap().len() / 2;
    cross_with(from, to, &guest, half);
}

fn cross_with(from: &dyn Accelerator, to: &dyn Accelerator, guest: &TestGuest, stop: usize) {
    let guest = guest.clone();
    let want = guest.expected_serial.clone().unwrap();

    // The uninterrupted run on the saving backend agrees with the model.
    let mut whole = machine(from, &guest, true);
    assert_eq!(run(&mut whole, None), Some(End::Exit(0)));
    assert_eq!(serial(&whole), want, "{} uninterrupted", from.name());

    // Stop in the middle of a line, save, restore elsewhere, finish.
    let mut a = machine(from, &guest, true);
    assert_eq!(
        run(&mut a, Some(stop)),
        None,
        "the guest ended before the stop"
    );
    let before = serial(&a);
    assert!(before.len() >= stop && before.len() < want.len());
    let stream = save(&a);
    // Sparse: a few pages of a 32 MiB guest.
    assert!(
        stream.len() < 64 * 4096,
        "stream of {} bytes is not sparse",
        stream.len()
    );
    drop(a);
    let mut b = machine(to, &guest, false);
    restore(&mut b, stream).unwrap();
    assert_eq!(
        run(&mut b, None),
        Some(End::Exit(0)),
        "{} -> {}",
        from.name(),
        to.name()
    );
    let after = serial(&b);
    assert_eq!(
        format!("{before}{after}"),
        want,
        "{} -> {}: {}: output around the snapshot differs from an uninterrupted run",
        from.name(),
        guest.name,
        to.name()
    );
}

#[test]
fn tcg_to_tcg() {
    cross(&*common::tcg(), &*common::tcg());
}

#[test]
fn tcg_to_kvm() {
    if let Some(k) = common::kvm() {
        cross(&*common::tcg(), &*k);
    }
}

#[test]
fn kvm_to_tcg() {
    if let Some(k) = common::kvm() {
        cross(&*k, &*common::tcg());
    }
}

#[test]
fn kvm_to_kvm() {
    if let Some(k) = common::kvm() {
        cross(&*k, &*k);
    }
}

/// A corrupted, truncated or other-shape stream is refused and the machine it was meant
/// for is untouched: its guest still runs to the end from the start.
#[test]
fn bad_streams_change_nothing() {
    let guest = keel_testguest::counter(20).unwrap();
    let tcg = common::tcg();
    let mut a = machine(&*tcg, &guest, true);
    assert_eq!(run(&mut a, Some(100)), None);
    let good = save(&a);

    let mut corrupt = good.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 1;
    let mut truncated = good.clone();
    truncated.truncate(good.len() - 30);
    let mut other = good.clone();
    other[8] = 9; // framing version
    for (what, bad) in [
        ("corrupt", corrupt),
        ("truncated", truncated),
        ("version", other),
    ] {
        let mut b = machine(&*tcg, &guest, true);
        let e = restore(&mut b, bad).expect_err(what);
        eprintln!("{what}: {e}");
        assert_eq!(run(&mut b, None), Some(End::Exit(0)), "{what}");
        assert_eq!(Some(serial(&b)), guest.expected_serial, "{what}");
    }
    // Another shape.
    let s = Snapshot::parse(good).unwrap();
    let e = s
        .header
        .shape
        .check(&Shape {
            memory: 64 << 20,
            ..shape()
        })
        .unwrap_err();
    assert!(e.to_string().contains("memory size 32 MiB"), "{e}");
}
