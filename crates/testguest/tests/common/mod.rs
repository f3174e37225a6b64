//! A minimal in-test machine: guest RAM, a serial capture device, isa-debug-exit, and the
//! vCPU loop over `keel_accel`, shared by the differential and property tests and usable
//! with any [`Accelerator`].

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_accel::{
    Accelerator, BusDevice, ExitAction, GuestMemory, IoBuses, IrqChip, MachineRequirements,
    SystemEvent, SystemEvents, handle_exit,
};
use keel_testguest::{DEBUG_EXIT_PORT, GUEST_MEM_SIZE, SERIAL_PORT, TestGuest, ops::CaseResult};
use vm_memory::GuestAddress;

/// Captures bytes written to the UART data register; models the registers guests read
/// (scratch at +7, line status at +5 = transmitter empty) like a 16550 with nothing attached.
#[derive(Default)]
pub struct SerialCapture {
    out: Mutex<Vec<u8>>,
    scratch: Mutex<u8>,
}

impl BusDevice for SerialCapture {
    fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = match offset {
                5 => 0x60,
                7 => *self.scratch.lock().unwrap(),
                _ => 0,
            };
        }
    }
    fn write(&self, offset: u64, data: &[u8]) {
        let Some(b) = data.first() else { return };
        match offset {
            0 => self.out.lock().unwrap().push(*b),
            7 => *self.scratch.lock().unwrap() = *b,
            _ => {}
        }
    }
}

/// QEMU's isa-debug-exit: records the value written.
#[derive(Default)]
pub struct DebugExit {
    value: Mutex<Option<u8>>,
    hit: AtomicBool,
}

impl DebugExit {
    /// The value written, once the guest wrote one.
    pub fn value(&self) -> Option<u8> {
        if self.hit.load(Ordering::SeqCst) {
            Some(self.value.lock().unwrap().unwrap_or(0))
        } else {
            None
        }
    }
}

impl BusDevice for DebugExit {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write(&self, _offset: u64, data: &[u8]) {
        *self.value.lock().unwrap() = data.first().copied();
        self.hit.store(true, Ordering::SeqCst);
    }
}

#[derive(Default)]
struct Events(Mutex<Vec<SystemEvent>>);
impl SystemEvents for Events {
    fn request(&self, event: SystemEvent) {
        self.0.lock().unwrap().push(event);
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The guest wrote this value to isa-debug-exit.
    Exit(u8),
    /// The vCPU halted with nothing to wake it.
    Halted,
    /// Triple fault.
    TripleFault,
    /// The time budget ran out.
    Timeout,
    /// The backend failed.
    Error(String),
}

/// What one run produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Backend name.
    pub accel: &'static str,
    /// Serial output (lossy UTF-8).
    pub serial: String,
    /// How it ended.
    pub end: End,
    /// The guest's op result records, if it has any.
    pub results: Vec<CaseResult>,
    /// The guest's raw result area (any record format).
    pub raw_results: Vec<u8>,
    /// Wall time of the vCPU loop.
    pub elapsed: Duration,
    /// Number of exits handled.
    pub exits: u64,
}

/// Runs `guest` on `accel` until it exits, halts, faults or `budget` passes.
pub fn run(accel: &dyn Accelerator, guest: &TestGuest, budget: Duration) -> Outcome {
    let name = accel.name();
    let fail = |e: String| Outcome {
        accel: name,
        serial: String::new(),
        end: End::Error(e),
        results: Vec::new(),
        raw_results: Vec::new(),
        elapsed: Duration::ZERO,
        exits: 0,
    };
    let mem =
        Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), GUEST_MEM_SIZE as usize)]).unwrap());
    if let Err(e) = guest.load(&mem) {
        return fail(e.to_string());
    }
    let buses = Arc::new(IoBuses::new());
    let serial = Arc::new(SerialCapture::default());
    let exit = Arc::new(DebugExit::default());
    buses
        .pio
        .insert(u64::from(SERIAL_PORT), 8, serial.clone())
        .unwrap();
    buses
        .pio
        .insert(u64::from(DEBUG_EXIT_PORT), 4, exit.clone())
        .unwrap();
    let req = MachineRequirements {
        machine: "testguest".into(),
        vcpus: 1,
        memory: GUEST_MEM_SIZE,
        irqchip: IrqChip::Pic,
        pit: guest.uses_pic_pit,
    };
    if let Err(e) = accel.check(&req) {
        return fail(e.to_string());
    }
    let vm = match accel.create_vm(
        &req,
        mem.clone(),
        buses.clone(),
        Arc::new(Events::default()),
    ) {
        Ok(vm) => vm,
        Err(e) => return fail(format!("create_vm: {e}")),
    };
    for (range, dev) in vm.platform_devices() {
        let _ = buses.pio.insert(range.base, range.len, dev);
    }
    let mut vcpu = match vm.create_vcpu(0) {
        Ok(v) => v,
        Err(e) => return fail(format!("create_vcpu: {e}")),
    };
    if let Err(e) = vcpu.set_sregs(&guest.entry.sregs) {
        return fail(format!("set_sregs: {e}"));
    }
    if let Err(e) = vcpu.set_regs(&guest.entry.regs) {
        return fail(format!("set_regs: {e}"));
    }
    // A watchdog kicks the vCPU out of guest code once the budget is spent.
    let done = Arc::new(AtomicBool::new(false));
    let kicker = vcpu.kicker();
    let d2 = done.clone();
    let watchdog = std::thread::spawn(move || {
        let until = Instant::now() + budget;
        while !d2.load(Ordering::SeqCst) {
            if Instant::now() >= until {
                kicker.kick();
                std::thread::sleep(Duration::from_millis(50));
            } else {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    });
    let start = Instant::now();
    let mut exits = 0u64;
    let end = loop {
        let ex = match vcpu.run() {
            Ok(ex) => ex,
            Err(e) => break End::Error(e.to_string()),
        };
        exits += 1;
        let action = handle_exit(&ex, &buses);
        if exit.hit.load(Ordering::SeqCst) {
            break End::Exit(exit.value.lock().unwrap().unwrap_or(0));
        }
        match action {
            ExitAction::Resume => {}
            ExitAction::CompleteRead(v) => vcpu.complete_read(v),
            ExitAction::WaitForInterrupt => break End::Halted,
            ExitAction::TripleFault | ExitAction::Reset | ExitAction::PowerOff => {
                break End::TripleFault;
            }
            ExitAction::CheckRequests => {
                if start.elapsed() >= budget {
                    break End::Timeout;
                }
            }
        }
    };
    let elapsed = start.elapsed();
    done.store(true, Ordering::SeqCst);
    let _ = watchdog.join();
    let results = guest.read_results(&mem).unwrap_or_default();
    let raw_results = guest.read_result_bytes(&mem).unwrap_or_default();
    let serial = String::from_utf8_lossy(&serial.out.lock().unwrap()).into_owned();
    Outcome {
        accel: name,
        serial,
        end,
        results,
        raw_results,
        elapsed,
        exits,
    }
}

/// The backends available on this host, each with a note when one is skipped.
pub fn backends() -> Vec<Box<dyn Accelerator>> {
    let mut v: Vec<Box<dyn Accelerator>> = vec![Box::new(keel_tcg::TcgAccel::new())];
    if let Some(k) = kvm() {
        v.push(k);
    }
    v
}

/// The KVM backend, or `None` with the reason printed (no /dev/kvm, no permission).
pub fn kvm() -> Option<Box<dyn Accelerator>> {
    if std::env::var_os("KEEL_TEST_NO_KVM").is_some() {
        eprintln!("skipping kvm: KEEL_TEST_NO_KVM is set");
        return None;
    }
    match keel_kvm::KvmAccel::new() {
        Ok(k) => Some(Box::new(k)),
        Err(e) => {
            eprintln!("skipping kvm: {e}");
            None
        }
    }
}

/// The interpreter backend.
pub fn tcg() -> Box<dyn Accelerator> {
    Box::new(keel_tcg::TcgAccel::new())
}
