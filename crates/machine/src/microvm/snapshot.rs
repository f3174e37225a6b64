//! Saving and restoring a microvm: what every machine's stream has (`crate::snapshot`: run
//! state, CPU model, the accelerator's platform devices, vCPUs, RAM) plus the microvm's
//! onboard devices, in Keel's snapshot stream (`keel-snapshot`, `docs/SNAPSHOT.md`). The
//! board adds its virtio transports (`MicrovmBoard`).
//!
//! A restore parses and decodes everything first ([`Microvm::check_snapshot`]) and only
//! then changes the machine ([`Microvm::apply_snapshot`]), so a stream that is refused
//! leaves the machine as it was.

use std::io::Write;

use keel_devices::{
    AcpiGed, AcpiGedSnapshot, AcpiPm, AcpiPmSnapshot, I8042, I8042Snapshot, Rtc, RtcSnapshot,
    Serial, SerialSnapshot,
};
use keel_snapshot::{Header, RamStats, SectionId, Shape, Snapshot, SnapshotError, Stateful};

use super::{MACHINE_NAME, Microvm};
use crate::snapshot::{self as common, CoreRestore, ExtraSection};

/// Everything a stream holds for a microvm, decoded and checked against the machine.
#[derive(Debug)]
pub struct MicrovmRestore {
    core: CoreRestore,
    serial: Option<SerialSnapshot>,
    rtc: Option<RtcSnapshot>,
    i8042: Option<I8042Snapshot>,
    pm: Option<AcpiPmSnapshot>,
    ged: Option<AcpiGedSnapshot>,
}

impl MicrovmRestore {
    /// Whether the guest was running when the stream was saved.
    pub fn running(&self) -> bool {
        self.core.machine.running
    }
}

impl Microvm {
    /// The shape a stream must have to restore into this machine.
    pub fn snapshot_shape(&self) -> Shape {
        Shape {
            machine: MACHINE_NAME.to_string(),
            vcpus: self.cfg.cpus,
            memory: self.cfg.memory,
        }
    }

    /// Writes the whole machine to `out`: header, machine state, CPU model, the
    /// accelerator's platform devices, every vCPU, the onboard devices, `extra` (the
    /// board's), RAM, end marker. The vCPUs must be stopped ([`Microvm::pause`]); `running`
    /// is the run state to record.
    pub fn save_snapshot(
        &mut self,
        out: &mut dyn Write,
        running: bool,
        extra: &[ExtraSection],
    ) -> Result<RamStats, SnapshotError> {
        let stats = self.save_stream(out, running, extra, true)?;
        stats.ok_or_else(|| common::section_err(SectionId::RAM, "not written"))
    }

    /// The stream's header for this machine.
    pub fn snapshot_header(&self) -> Header {
        common::header(self.snapshot_shape(), self.accel_name)
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
        let mut w = common::begin(&mut self.core, out, &header, running)?;
        common::device(&mut w, self.serial.as_ref())?;
        common::device(&mut w, self.rtc.as_ref())?;
        common::device(&mut w, self.i8042.as_ref())?;
        common::device(&mut w, self.pm.as_ref())?;
        common::device(&mut w, self.ged.as_ref())?;
        for (id, instance, version, payload) in extra {
            w.section(*id, *instance, *version, payload)?;
        }
        common::finish(w, &self.core, ram)
    }

    /// Decodes and checks everything of `snap` this machine needs (shape, CPU, every
    /// section, the RAM runs) without changing anything. `extra` lists the board's section
    /// ids, so a section nobody reads is refused as a device this machine lacks.
    pub fn check_snapshot(
        &self,
        snap: &Snapshot,
        extra: &[SectionId],
    ) -> Result<MicrovmRestore, SnapshotError> {
        let mut known = vec![
            <Serial as Stateful>::SECTION,
            <Rtc as Stateful>::SECTION,
            <I8042 as Stateful>::SECTION,
            <AcpiPm as Stateful>::SECTION,
            <AcpiGed as Stateful>::SECTION,
        ];
        known.extend_from_slice(extra);
        let core = common::check_core(&self.core, snap, &self.snapshot_shape(), &known)?;
        Ok(MicrovmRestore {
            core,
            serial: common::optional::<Serial>(snap, self.serial.is_some(), "COM1")?,
            rtc: common::optional::<Rtc>(snap, self.rtc.is_some(), "RTC")?,
            i8042: common::optional::<I8042>(snap, self.i8042.is_some(), "i8042")?,
            pm: common::optional::<AcpiPm>(snap, self.pm.is_some(), "ACPI PM block")?,
            ged: common::optional::<AcpiGed>(snap, self.ged.is_some(), "ACPI GED")?,
        })
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
        common::apply_core(&mut self.core, snap, r.core, ram)?;
        fn put<D: Stateful>(d: &Option<std::sync::Arc<D>>, s: &Option<D::State>) {
            if let (Some(d), Some(s)) = (d, s) {
                d.restore_state(s);
            }
        }
        put(&self.serial, &r.serial);
        put(&self.rtc, &r.rtc);
        put(&self.i8042, &r.i8042);
        put(&self.pm, &r.pm);
        put(&self.ged, &r.ged);
        Ok(())
    }
}
