//! What every machine type's snapshot has, written over a [`MachineCore`] so that each
//! machine type adds only its own devices: the header with the machine's shape, the
//! machine's run state (`MACH`), the accelerator's platform devices (`PLAT`), every vCPU
//! (`VCPU` #i), guest RAM over all of its ranges (`RAM`), the end marker; at restore the
//! shape and RAM checks, the optional-device rule and the refusal of a section nobody reads.
//! The byte layout is in `docs/SNAPSHOT.md`.
//!
//! A restore decodes everything first ([`check_core`] plus the machine's own sections) and
//! only then changes the machine ([`apply_core`]), so a refused stream changes nothing.
//! `pc` is built on it (`crate::pc_snapshot`); microvm has the same sections in the same
//! layout (`crate::microvm::snapshot`).

use std::io::Write;

use keel_accel::{
    PLATFORM_SECTION, PLATFORM_VERSION, PlatformState, VCPU_SECTION, VCPU_VERSION, VcpuState,
};
use keel_snapshot::{
    Header, Persist, RamStats, SectionId, Shape, Snapshot, SnapshotError, Stateful, Writer,
};

use crate::core::MachineCore;
use crate::microvm::snapshot::{MACHINE_SECTION, MachineState, StateOp};

/// Layout version of the machine's own section.
const MACHINE_VERSION: u32 = 1;

/// The sections every machine's stream has besides RAM.
pub(crate) const CORE_SECTIONS: [SectionId; 4] = [
    MACHINE_SECTION,
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
        platform,
        vcpus,
    })
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
    let ops = r
        .vcpus
        .into_iter()
        .map(|v| StateOp::Restore(Box::new(v)))
        .collect();
    vcpu_ops(core, ops).map_err(|e| section_err(VCPU_SECTION, e))?;
    Ok(())
}
