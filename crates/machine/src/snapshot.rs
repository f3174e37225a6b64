//! What every machine type's snapshot has, written over a [`MachineCore`] so that each
//! machine type adds only its own devices: the header with the machine's shape, the
//! machine's run state (`MACH`), the accelerator's platform devices (`PLAT`), every vCPU
//! (`VCPU` #i), the CPU model the guest saw (`CPID`), guest RAM over all of its ranges
//! (`RAM`), the end marker; at restore the shape, CPU and RAM checks, the optional-device
//! rule and the refusal of a section nobody reads.
//! The byte layout is in `docs/SNAPSHOT.md`.
//!
//! A restore decodes everything first ([`check_core`] plus the machine's own sections) and
//! only then changes the machine ([`apply_core`]), so a refused stream changes nothing.
//! `microvm` (`crate::microvm::snapshot`) and `pc` (`crate::pc_snapshot`) are built on it.

use std::io::Write;

use keel_accel::{
    PLATFORM_SECTION, PLATFORM_VERSION, PlatformState, VCPU_SECTION, VCPU_VERSION, VcpuState,
};
use keel_snapshot::{
    Dec, DecodeError, Enc, Header, Persist, RamStats, SectionId, Shape, Snapshot, SnapshotError,
    Stateful, Writer,
};

use crate::core::MachineCore;

/// Section of the machine's own state (its run state at save).
pub const MACHINE_SECTION: SectionId = SectionId(*b"MACH");
/// Layout version of the machine's own section.
const MACHINE_VERSION: u32 = 1;

/// Section of the CPU model: the model's name, the accelerator that presented it and the
/// CPUID table of vCPU 0 (`docs/SNAPSHOT.md`).
pub const CPUID_SECTION: SectionId = SectionId(*b"CPID");
/// Layout version of the CPU model's section.
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

/// A section of a stream, owned (what a board adds to the machine's).
pub type ExtraSection = (SectionId, u32, u32, Vec<u8>);

/// The sections every machine's stream has (a stream saved before Keel recorded CPUID
/// has no `CPID`).
pub(crate) const CORE_SECTIONS: [SectionId; 5] = [
    MACHINE_SECTION,
    CPUID_SECTION,
    PLATFORM_SECTION,
    VCPU_SECTION,
    SectionId::RAM,
];

/// An error about section `id` (a backend that refused a state, a vCPU that gave none).
pub(crate) fn section_err(id: SectionId, e: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::Corrupt {
        what: format!("section {id}"),
        reason: e.to_string(),
    }
}

/// The header of a stream of this machine.
pub(crate) fn header(shape: Shape, accel: &str) -> Header {
    Header {
        keel_version: env!("CARGO_PKG_VERSION").to_string(),
        shape,
        accel: accel.to_string(),
    }
}

/// Asks every vCPU to save or restore: directly before the vCPU threads exist, else
/// through the parked threads.
fn vcpu_ops(
    core: &mut MachineCore,
    ops: Vec<StateOp>,
) -> Result<Vec<Option<Box<VcpuState>>>, String> {
    if let Some(vcpus) = core.idle_vcpus() {
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
    core.shared().vcpu_states(ops)
}

/// Starts a stream: the header, the machine's run state, the platform devices and every
/// vCPU. The vCPUs must be stopped; the machine type adds its devices to the writer and
/// ends with [`finish`].
pub(crate) fn begin<'a>(
    core: &mut MachineCore,
    out: &'a mut dyn Write,
    header: &Header,
    running: bool,
) -> Result<Writer<&'a mut dyn Write>, SnapshotError> {
    let vcpus = vcpu_ops(
        core,
        (0..header.shape.vcpus).map(|_| StateOp::Save).collect(),
    )
    .map_err(|e| section_err(VCPU_SECTION, e))?;
    let platform = core
        .vm()
        .save_platform()
        .map_err(|e| section_err(PLATFORM_SECTION, e))?;
    let mut w = Writer::new(out, header)?;
    w.section(
        MACHINE_SECTION,
        0,
        MACHINE_VERSION,
        &MachineState { running }.to_payload(),
    )?;
    let cpu = CpuidRecord {
        model: core.cpu().name.clone(),
        accel: core.cpu_accel().to_owned(),
        leaves: core.cpu().cpuid.clone(),
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
    Ok(w)
}

/// Writes device `d`'s section (instance 0), if the machine has it.
pub(crate) fn device<D: Stateful, W: Write>(
    w: &mut Writer<W>,
    d: Option<&std::sync::Arc<D>>,
) -> Result<(), SnapshotError> {
    if let Some(d) = d {
        w.section(D::SECTION, 0, D::VERSION, &d.save_state().to_payload())?;
    }
    Ok(())
}

/// Ends a stream: RAM (every range of it, zero pages left out) unless `ram` is off (a live
/// migration sends RAM on its own), then the end marker.
pub(crate) fn finish<W: Write>(
    mut w: Writer<W>,
    core: &MachineCore,
    ram: bool,
) -> Result<Option<RamStats>, SnapshotError> {
    let stats = if ram {
        Some(w.ram(core.memory())?)
    } else {
        None
    };
    w.finish()?;
    Ok(stats)
}

/// What [`check_core`] decoded.
#[derive(Debug)]
pub(crate) struct CoreRestore {
    /// The machine's run state at save.
    pub machine: MachineState,
    /// The CPU the guest saw (`None`: a stream without the section, see [`check_cpuid`]).
    cpuid: Option<CpuidRecord>,
    platform: PlatformState,
    vcpus: Vec<VcpuState>,
}

/// Checks the stream's shape against `here` and its RAM against the machine's ranges, and
/// decodes the machine, platform and vCPU sections; refuses a section whose id is neither
/// one of these nor in `known` (the machine type's), and a vCPU section past the count.
pub(crate) fn check_core(
    core: &MachineCore,
    snap: &Snapshot,
    here: &Shape,
    known: &[SectionId],
) -> Result<CoreRestore, SnapshotError> {
    snap.header.shape.check(here)?;
    snap.check_ram(core.memory())?;
    let machine: MachineState = snap.decode(MACHINE_SECTION, 0, MACHINE_VERSION)?;
    let platform: PlatformState = snap.decode(PLATFORM_SECTION, 0, PLATFORM_VERSION)?;
    let mut vcpus = Vec::new();
    for i in 0..here.vcpus {
        vcpus.push(snap.decode::<VcpuState>(VCPU_SECTION, i, VCPU_VERSION)?);
    }
    let cpuid = check_cpuid(core, snap)?;
    if let Some(s) = snap
        .sections()
        .iter()
        .find(|s| !CORE_SECTIONS.contains(&s.id) && !known.contains(&s.id))
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
        .find(|s| s.id == VCPU_SECTION && s.instance >= here.vcpus)
    {
        return Err(SnapshotError::ShapeMismatch {
            what: "vCPU",
            saved: format!("vCPU {}", s.instance),
            here: format!("{} vCPUs", here.vcpus),
        });
    }
    Ok(CoreRestore {
        machine,
        cpuid,
        platform,
        vcpus,
    })
}

/// The stream's CPU, checked against what this machine's accelerator can present: a
/// feature the guest saw that it cannot is refused, naming the model, the
/// accelerators, the features and what to do. The APIC bit is this machine's. A stream
/// without the section (saved before Keel recorded CPUID) restores with this machine's model, as QEMU, which trusts
/// the command line.
fn check_cpuid(core: &MachineCore, snap: &Snapshot) -> Result<Option<CpuidRecord>, SnapshotError> {
    let has = snap.sections().iter().any(|s| s.id == CPUID_SECTION);
    if !has {
        return Ok(None);
    }
    let mut c: CpuidRecord = snap.decode(CPUID_SECTION, 0, CPUID_VERSION)?;
    // The local APIC bit follows the machine, as QEMU's (the interpreter gives one vCPU
    // none): a guest that enabled its APIC is refused with the vCPU's state instead.
    const APIC: u32 = 1 << 9;
    let apic = keel_accel::cpuid_word(&core.cpu().capable, 1, 0, 3) & APIC;
    for l in c.leaves.iter_mut() {
        // AMD's models repeat it in leaf 0x8000_0001 (with the FPU bit, bit 0).
        if l.function == 1 || (l.function == 0x8000_0001 && l.edx & 1 != 0) {
            l.edx = (l.edx & !APIC) | apic;
        }
    }
    let missing = keel_accel::cpuid_missing(&c.leaves, &core.cpu().capable);
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
        core.accel_name()
    )))
}

/// The state of an optional device (instance 0): `None` if neither the stream nor the
/// machine has it; a device on one side only is refused, named `what`.
pub(crate) fn optional<D: Stateful>(
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
            here: format!("no {what} (check the -machine and -serial options)"),
        }),
        (false, true) => Err(SnapshotError::ShapeMismatch {
            what: "device",
            saved: format!("no {what}"),
            here: format!("a {what} (check the -machine and -serial options)"),
        }),
    }
}

/// Puts RAM (with `ram`; without it the stream must have none: a live migration wrote RAM
/// already), the platform devices and every vCPU in the state `r` was decoded from. The
/// vCPUs must be stopped. A failure here (the backend refused a value) leaves the machine
/// held: it must not run half restored.
pub(crate) fn apply_core(
    core: &mut MachineCore,
    snap: &Snapshot,
    r: CoreRestore,
    ram: bool,
) -> Result<(), SnapshotError> {
    if ram {
        snap.restore_ram(core.memory())?;
    } else if snap.sections().iter().any(|s| s.id == SectionId::RAM) {
        return Err(section_err(
            SectionId::RAM,
            "a live migration's state carries no RAM section",
        ));
    }
    core.vm()
        .restore_platform(&r.platform)
        .map_err(|e| section_err(PLATFORM_SECTION, e))?;
    if let Some(c) = r.cpuid {
        let table: std::sync::Arc<[keel_accel::CpuidLeaf]> = c.leaves.clone().into();
        let ops = (0..r.vcpus.len())
            .map(|_| StateOp::SetCpuid(table.clone()))
            .collect();
        vcpu_ops(core, ops).map_err(|e| section_err(CPUID_SECTION, e))?;
        core.set_cpu(c.model, c.leaves, c.accel);
    }
    let ops = r
        .vcpus
        .into_iter()
        .map(|v| StateOp::Restore(Box::new(v)))
        .collect();
    vcpu_ops(core, ops).map_err(|e| section_err(VCPU_SECTION, e))?;
    Ok(())
}

/// What a live migration copies while the guest runs (a board's `live_ram`): the RAM, the
/// stream header, and with `track` the accelerator's dirty log, started now.
pub(crate) fn live_ram(
    core: &MachineCore,
    header: Header,
    track: bool,
) -> Result<crate::migration::live::LiveRam, crate::board::BoardError> {
    let log = if track {
        let log = core
            .vm()
            .start_dirty_log()
            .map_err(|e| crate::board::BoardError::Invalid(format!("dirty page tracking: {e}")))?;
        Some(log)
    } else {
        None
    };
    Ok(crate::migration::live::LiveRam {
        memory: core.memory().clone(),
        header,
        log,
    })
}
