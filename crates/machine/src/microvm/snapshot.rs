//! Saving and restoring a microvm: RAM, vCPUs, the accelerator's platform devices and the
//! onboard devices, in Keel's snapshot stream (`keel-snapshot`, `docs/SNAPSHOT.md`). The
//! board adds its virtio transports (`MicrovmBoard`).
//!
//! A restore parses and decodes everything first ([`Microvm::check_snapshot`]) and only
//! then changes the machine ([`Microvm::apply_snapshot`]), so a stream that is refused
//! leaves the machine as it was.

use std::io::Write;

use keel_accel::{
    PLATFORM_SECTION, PLATFORM_VERSION, PlatformState, VCPU_SECTION, VCPU_VERSION, VcpuState,
};
use keel_devices::{AcpiGedSnapshot, AcpiPmSnapshot, I8042Snapshot, RtcSnapshot, SerialSnapshot};
use keel_snapshot::{
    Dec, DecodeError, Enc, Header, Persist, RamStats, SectionId, Shape, Snapshot, SnapshotError,
    Stateful, Writer,
};

use super::{MACHINE_NAME, Microvm};

/// Section of the machine's own state (its run state at save).
pub const MACHINE_SECTION: SectionId = SectionId(*b"MACH");
const MACHINE_VERSION: u32 = 1;

/// Section of the CPU model: the model's name, the accelerator that presented it and the
/// CPUID table of vCPU 0 (`docs/SNAPSHOT.md`).
pub const CPUID_SECTION: SectionId = SectionId(*b"CPID");
const CPUID_VERSION: u32 = 1;

/// Most leaves a `CPID` section may hold (KVM's own limit on a CPUID table).
const MAX_CPUID_LEAVES: usize = 256;

/// The CPU the guest saw: what a restore checks and presents again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuidRecord {
    /// The `-cpu` model (`qemu64`, `kvm64`, `max`, `host`).
    pub model: String,
    /// The accelerator that presented it.
    pub accel: String,
    /// vCPU 0's table (the others differ only in their APIC ids).
    pub leaves: Vec<keel_accel::CpuidLeaf>,
}

impl Persist for CpuidRecord {
    fn encode(&self, e: &mut Enc) {
        e.str(&self.model).str(&self.accel);
        e.u32(self.leaves.len() as u32);
        for l in &self.leaves {
            e.u32(l.function)
                .u32(l.index)
                .u32(l.eax)
                .u32(l.ebx)
                .u32(l.ecx)
                .u32(l.edx);
        }
    }
    fn decode(d: &mut Dec<'_>) -> Result<Self, DecodeError> {
        let model = d.str("model")?;
        let accel = d.str("accel")?;
        let n = d.count("leaves", 24)?;
        if n > MAX_CPUID_LEAVES {
            return Err(DecodeError::Invalid {
                field: "leaves",
                reason: format!("{n} leaves, at most {MAX_CPUID_LEAVES}"),
            });
        }
        let mut leaves: Vec<keel_accel::CpuidLeaf> = Vec::with_capacity(n);
        for _ in 0..n {
            let l = keel_accel::CpuidLeaf {
                function: d.u32("function")?,
                index: d.u32("index")?,
                eax: d.u32("eax")?,
                ebx: d.u32("ebx")?,
                ecx: d.u32("ecx")?,
                edx: d.u32("edx")?,
            };
            if leaves
                .iter()
                .any(|o| (o.function, o.index) == (l.function, l.index))
            {
                return Err(DecodeError::Invalid {
                    field: "leaves",
                    reason: format!("leaf {:#x}.{} appears twice", l.function, l.index),
                });
            }
            leaves.push(l);
        }
        Ok(Self {
            model,
            accel,
            leaves,
        })
    }
}

/// What a parked vCPU thread is asked to do.
#[derive(Debug)]
pub(crate) enum StateOp {
    /// Capture the vCPU.
    Save,
    /// Put the vCPU in this state.
    Restore(Box<VcpuState>),
    /// Present this CPUID table (vCPU 0's) from now on.
    SetCpuid(std::sync::Arc<[keel_accel::CpuidLeaf]>),
}

/// One vCPU's mailbox (see `runner::Shared::vcpu_states`).
#[derive(Debug, Default)]
pub(crate) enum StateSlot {
    /// Nothing asked.
    #[default]
    Idle,
    /// Waiting for the vCPU thread.
    Asked(StateOp),
    /// The answer.
    Done(Result<Option<Box<VcpuState>>, String>),
}

/// On a parked vCPU thread: performs what its slot asks; `true` after a restore.
pub(crate) fn serve(
    vcpu: &mut dyn keel_accel::Vcpu,
    slots: &std::sync::Mutex<Vec<StateSlot>>,
) -> bool {
    let index = vcpu.index() as usize;
    let mut st = slots.lock().unwrap_or_else(|p| p.into_inner());
    let Some(slot) = st.get_mut(index) else {
        return false;
    };
    let op = match std::mem::take(slot) {
        StateSlot::Asked(op) => op,
        other => {
            *slot = other;
            return false;
        }
    };
    let (answer, restored) = match op {
        StateOp::Save => (vcpu.save_state().map(|s| Some(Box::new(s))), false),
        StateOp::Restore(s) => (vcpu.restore_state(&s).map(|()| None), true),
        StateOp::SetCpuid(t) => (vcpu.set_cpuid(&t).map(|()| None), false),
    };
    *slot = StateSlot::Done(answer.map_err(|e| e.to_string()));
    restored
}

/// The machine's own section: whether the guest was running when saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineState {
    /// The vCPUs were running (not stopped by the user) when the stream was saved.
    pub running: bool,
}

impl Persist for MachineState {
    fn encode(&self, e: &mut Enc) {
        e.bool(self.running);
    }
    fn decode(d: &mut Dec<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            running: d.bool("running")?,
        })
    }
}

/// Everything a stream holds for a microvm, decoded and checked against the machine.
#[derive(Debug)]
pub struct MicrovmRestore {
    /// The machine's own state.
    pub machine: MachineState,
    /// The CPU the guest saw (`None`: a stream without the section, see `check_cpuid`).
    cpuid: Option<CpuidRecord>,
    platform: PlatformState,
    vcpus: Vec<VcpuState>,
    serial: Option<SerialSnapshot>,
    rtc: Option<RtcSnapshot>,
    i8042: Option<I8042Snapshot>,
    pm: Option<AcpiPmSnapshot>,
    ged: Option<AcpiGedSnapshot>,
}

/// A section of a stream, owned (what a board adds to the machine's).
pub type ExtraSection = (SectionId, u32, u32, Vec<u8>);

fn section_err(id: SectionId, e: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::Corrupt {
        what: format!("section {id}"),
        reason: e.to_string(),
    }
}

fn optional<D: Stateful>(
    snap: &Snapshot,
    here: bool,
    what: &str,
) -> Result<Option<D::State>, SnapshotError> {
    let has = snap
        .sections()
        .iter()
        .any(|s| s.id == D::SECTION && s.instance == 0);
    match (has, here) {
        (true, true) => snap.decode(D::SECTION, 0, D::VERSION).map(Some),
        (false, false) => Ok(None),
        (true, false) => Err(SnapshotError::ShapeMismatch {
            what: "device",
            saved: what.to_string(),
            here: format!("no {what} (check the -machine properties)"),
        }),
        (false, true) => Err(SnapshotError::ShapeMismatch {
            what: "device",
            saved: format!("no {what}"),
            here: format!("a {what} (check the -machine properties)"),
        }),
    }
}

impl Microvm {
    /// The stream's CPU, checked against what this machine's accelerator can present: a
    /// feature the guest saw that it cannot is refused, naming the model, the
    /// accelerators, the features and what to do. The APIC bit is this machine's. A stream without the section (saved
    /// before Keel recorded CPUID) restores with this machine's model, as QEMU, which trusts
    /// the command line.
    fn check_cpuid(&self, snap: &Snapshot) -> Result<Option<CpuidRecord>, SnapshotError> {
        let has = snap.sections().iter().any(|s| s.id == CPUID_SECTION);
        if !has {
            return Ok(None);
        }
        let mut c: CpuidRecord = snap.decode(CPUID_SECTION, 0, CPUID_VERSION)?;
        // The local APIC bit follows the machine, as QEMU's (the interpreter gives one vCPU
        // none): a guest that enabled its APIC is refused with the vCPU's state instead.
        const APIC: u32 = 1 << 9;
        let apic = keel_accel::cpuid_word(&self.cpu.capable, 1, 0, 3) & APIC;
        for l in c.leaves.iter_mut() {
            // AMD's models repeat it in leaf 0x8000_0001 (with the FPU bit, bit 0).
            if l.function == 1 || (l.function == 0x8000_0001 && l.edx & 1 != 0) {
                l.edx = (l.edx & !APIC) | apic;
            }
        }
        let missing = keel_accel::cpuid_missing(&c.leaves, &self.cpu.capable);
        if missing.is_empty() {
            return Ok(Some(c));
        }
        let names: Vec<String> = missing.iter().map(crate::cpu_model::bit_name).collect();
        Err(SnapshotError::Cpu(format!(
            "the stream's CPU ({} under {}) has {} which {} cannot present; save the guest \
             with -cpu qemu64 (the default) to move it between accelerators",
            c.model,
            c.accel,
            names.join(", "),
            self.accel_name
        )))
    }

    /// The shape a stream must have to restore into this machine.
    pub fn snapshot_shape(&self) -> Shape {
        Shape {
            machine: MACHINE_NAME.to_string(),
            vcpus: self.cfg.cpus,
            memory: self.cfg.memory,
        }
    }

    fn vcpu_ops(&mut self, ops: Vec<StateOp>) -> Result<Vec<Option<Box<VcpuState>>>, String> {
        if let Some(vcpus) = self.core.idle_vcpus() {
            let mut out = Vec::new();
            for (v, op) in vcpus.iter_mut().zip(ops) {
                out.push(match op {
                    StateOp::Save => Some(Box::new(v.save_state().map_err(|e| e.to_string())?)),
                    StateOp::Restore(s) => {
                        v.restore_state(&s).map_err(|e| e.to_string())?;
                        None
                    }
                    StateOp::SetCpuid(t) => {
                        v.set_cpuid(&t).map_err(|e| e.to_string())?;
                        None
                    }
                });
            }
            return Ok(out);
        }
        self.core.shared().vcpu_states(ops)
    }

    /// Writes the whole machine to `out`: header, machine state, the accelerator's platform
    /// devices, every vCPU, the onboard devices, `extra` (the board's), RAM, end marker.
    /// The vCPUs must be stopped ([`Microvm::pause`]); `running` is the run state to record.
    pub fn save_snapshot(
        &mut self,
        out: &mut dyn Write,
        running: bool,
        extra: &[ExtraSection],
    ) -> Result<RamStats, SnapshotError> {
        let stats = self.save_stream(out, running, extra, true)?;
        stats.ok_or_else(|| section_err(SectionId::RAM, "not written"))
    }

    /// The stream's header for this machine.
    pub fn snapshot_header(&self) -> Header {
        Header {
            keel_version: env!("CARGO_PKG_VERSION").to_string(),
            shape: self.snapshot_shape(),
            accel: self.accel_name.to_string(),
        }
    }

    /// Starts recording the guest's writes to RAM (a live migration's dirty log).
    pub fn start_dirty_log(
        &self,
    ) -> Result<std::sync::Arc<dyn keel_accel::dirty::DirtyLog>, keel_accel::AccelError> {
        self.core.vm().start_dirty_log()
    }

    /// As [`Microvm::save_snapshot`]; without `ram` the stream has no RAM section (a live
    /// migration sends RAM on its own) and the result is `None`.
    pub fn save_stream(
        &mut self,
        out: &mut dyn Write,
        running: bool,
        extra: &[ExtraSection],
        ram: bool,
    ) -> Result<Option<RamStats>, SnapshotError> {
        let header = self.snapshot_header();
        let vcpus = self
            .vcpu_ops((0..self.cfg.cpus).map(|_| StateOp::Save).collect())
            .map_err(|e| section_err(VCPU_SECTION, e))?;
        let platform = self
            .core
            .vm()
            .save_platform()
            .map_err(|e| section_err(PLATFORM_SECTION, e))?;
        let mut w = Writer::new(out, &header)?;
        w.section(
            MACHINE_SECTION,
            0,
            MACHINE_VERSION,
            &MachineState { running }.to_payload(),
        )?;
        let cpu = CpuidRecord {
            model: self.cpu.name.clone(),
            accel: self.cpu_accel.clone(),
            leaves: self.cpu.cpuid.clone(),
        };
        w.section(CPUID_SECTION, 0, CPUID_VERSION, &cpu.to_payload())?;
        w.section(
            PLATFORM_SECTION,
            0,
            PLATFORM_VERSION,
            &platform.to_payload(),
        )?;
        for (i, v) in vcpus.iter().enumerate() {
            let Some(v) = v else {
                return Err(section_err(VCPU_SECTION, format!("vCPU {i} gave no state")));
            };
            w.section(VCPU_SECTION, i as u32, VCPU_VERSION, &v.to_payload())?;
        }
        fn dev<D: Stateful, W: Write>(
            w: &mut Writer<W>,
            d: &Option<std::sync::Arc<D>>,
        ) -> Result<(), SnapshotError> {
            if let Some(d) = d {
                w.section(D::SECTION, 0, D::VERSION, &d.save_state().to_payload())?;
            }
            Ok(())
        }
        dev(&mut w, &self.serial)?;
        dev(&mut w, &self.rtc)?;
        dev(&mut w, &self.i8042)?;
        dev(&mut w, &self.pm)?;
        dev(&mut w, &self.ged)?;
        for (id, instance, version, payload) in extra {
            w.section(*id, *instance, *version, payload)?;
        }
        let stats = if ram {
            Some(w.ram(self.core.memory())?)
        } else {
            None
        };
        w.finish()?;
        Ok(stats)
    }

    /// Decodes and checks everything of `snap` this machine needs (shape, every section,
    /// the RAM runs) without changing anything. `extra` lists the board's section ids, so
    /// a section nobody reads is refused as a device this machine lacks.
    pub fn check_snapshot(
        &self,
        snap: &Snapshot,
        extra: &[SectionId],
    ) -> Result<MicrovmRestore, SnapshotError> {
        snap.header.shape.check(&self.snapshot_shape())?;
        snap.check_ram(self.core.memory())?;
        let machine: MachineState = snap.decode(MACHINE_SECTION, 0, MACHINE_VERSION)?;
        let platform: PlatformState = snap.decode(PLATFORM_SECTION, 0, PLATFORM_VERSION)?;
        let mut vcpus = Vec::new();
        for i in 0..self.cfg.cpus {
            vcpus.push(snap.decode::<VcpuState>(VCPU_SECTION, i, VCPU_VERSION)?);
        }
        let cpuid = self.check_cpuid(snap)?;
        let r = MicrovmRestore {
            cpuid,
            machine,
            platform,
            vcpus,
            serial: optional::<keel_devices::Serial>(snap, self.serial.is_some(), "COM1")?,
            rtc: optional::<keel_devices::Rtc>(snap, self.rtc.is_some(), "RTC")?,
            i8042: optional::<keel_devices::I8042>(snap, self.i8042.is_some(), "i8042")?,
            pm: optional::<keel_devices::AcpiPm>(snap, self.pm.is_some(), "ACPI PM block")?,
            ged: optional::<keel_devices::AcpiGed>(snap, self.ged.is_some(), "ACPI GED")?,
        };
        let known = [
            MACHINE_SECTION,
            CPUID_SECTION,
            PLATFORM_SECTION,
            VCPU_SECTION,
            SectionId::RAM,
            <keel_devices::Serial as Stateful>::SECTION,
            <keel_devices::Rtc as Stateful>::SECTION,
            <keel_devices::I8042 as Stateful>::SECTION,
            <keel_devices::AcpiPm as Stateful>::SECTION,
            <keel_devices::AcpiGed as Stateful>::SECTION,
        ];
        if let Some(s) = snap
            .sections()
            .iter()
            .find(|s| !known.contains(&s.id) && !extra.contains(&s.id))
        {
            return Err(SnapshotError::ShapeMismatch {
                what: "device",
                saved: format!("state section {} #{}", s.id, s.instance),
                here: "no such device".to_string(),
            });
        }
        if let Some(s) = snap
            .sections()
            .iter()
            .find(|s| s.id == VCPU_SECTION && s.instance >= self.cfg.cpus)
        {
            return Err(SnapshotError::ShapeMismatch {
                what: "vCPU",
                saved: format!("vCPU {}", s.instance),
                here: format!("{} vCPUs", self.cfg.cpus),
            });
        }
        Ok(r)
    }

    /// Puts the machine in the state `r` was decoded from (`snap`'s RAM included). The
    /// vCPUs must be stopped (paused, or not started). A failure here (the backend refused
    /// a register value) leaves the machine held: it must not run half restored.
    pub fn apply_snapshot(
        &mut self,
        snap: &Snapshot,
        r: MicrovmRestore,
    ) -> Result<(), SnapshotError> {
        self.apply_stream(snap, r, true)
    }

    /// As [`Microvm::apply_snapshot`]; without `ram` the machine's RAM is left as it is (a
    /// live migration wrote it already) and the stream must have no RAM section.
    pub fn apply_stream(
        &mut self,
        snap: &Snapshot,
        r: MicrovmRestore,
        ram: bool,
    ) -> Result<(), SnapshotError> {
        if ram {
            snap.restore_ram(self.core.memory())?;
        } else if snap.sections().iter().any(|s| s.id == SectionId::RAM) {
            return Err(section_err(
                SectionId::RAM,
                "a live migration's state carries no RAM section",
            ));
        }
        self.core
            .vm()
            .restore_platform(&r.platform)
            .map_err(|e| section_err(PLATFORM_SECTION, e))?;
        if let Some(c) = r.cpuid {
            let table: std::sync::Arc<[keel_accel::CpuidLeaf]> = c.leaves.clone().into();
            let ops = (0..self.cfg.cpus)
                .map(|_| StateOp::SetCpuid(table.clone()))
                .collect();
            self.vcpu_ops(ops)
                .map_err(|e| section_err(CPUID_SECTION, e))?;
            self.cpu.name = c.model;
            self.cpu.cpuid = c.leaves;
            self.cpu_accel = c.accel;
        }
        let ops = r
            .vcpus
            .into_iter()
            .map(|v| StateOp::Restore(Box::new(v)))
            .collect();
        self.vcpu_ops(ops)
            .map_err(|e| section_err(VCPU_SECTION, e))?;
        if let (Some(d), Some(s)) = (&self.serial, &r.serial) {
            d.restore_state(s);
        }
        if let (Some(d), Some(s)) = (&self.rtc, &r.rtc) {
            d.restore_state(s);
        }
        if let (Some(d), Some(s)) = (&self.i8042, &r.i8042) {
            d.restore_state(s);
        }
        if let (Some(d), Some(s)) = (&self.pm, &r.pm) {
            d.restore_state(s);
        }
        if let (Some(d), Some(s)) = (&self.ged, &r.ged) {
            d.restore_state(s);
        }
        Ok(())
    }
}
