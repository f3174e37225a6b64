//! The embedding API: what an embedder adds through `Vmm::builder()` runs like the built-in
//! parts (no vmm source changes).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use keel_accel::{AccelError, AccelProbe, Accelerator};
use vmm::Vmm;
use vmm::commands::{
    AccelList, AccelSet, MachineDone, MachineInit, MachineSet, QueryAccels, QueryCpusFast,
};

/// An accelerator of the embedder's: the interpreter under another name, counting opens.
#[derive(Debug, Default)]
struct MyAccel(AtomicUsize);

impl AccelProbe for MyAccel {
    fn name(&self) -> &'static str {
        "my-accel"
    }

    fn open(&self) -> Result<Arc<dyn Accelerator>, AccelError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(Arc::new(keel_tcg::TcgAccel::new()))
    }
}

/// One that is never usable here.
#[derive(Debug)]
struct Absent;

impl AccelProbe for Absent {
    fn name(&self) -> &'static str {
        "absent"
    }

    fn open(&self) -> Result<Arc<dyn Accelerator>, AccelError> {
        Err(AccelError::Unavailable {
            accel: "absent",
            reason: "no such hardware here".into(),
        })
    }
}

#[test]
fn an_added_accelerator_runs_the_built_in_machine_after_a_fallback() {
    let mine = Arc::new(MyAccel::default());
    let vmm = Vmm::builder()
        .accel(mine.clone())
        .accel(Arc::new(Absent))
        .build();
    vmm.execute(MachineSet {
        type_name: Some("microvm".into()),
        memory: Some(16 << 20),
        cpus: Some(2),
        ..Default::default()
    })
    .unwrap();
    let choice = vmm
        .execute(AccelSet {
            accel: AccelList::Many(vec!["absent".into(), "my-accel".into()]),
        })
        .unwrap();
    assert_eq!(choice.accel, "my-accel");
    assert_eq!(choice.rejected.len(), 1);
    assert!(
        choice.rejected[0].reason.contains("no such hardware here"),
        "{:?}",
        choice.rejected
    );
    // The machine is built on the accelerator the probe handed over.
    let before = mine.0.load(Ordering::SeqCst);
    vmm.execute(MachineInit {}).unwrap();
    vmm.set_autostart(false); // as -S: stay in prelaunch
    vmm.execute(MachineDone {}).unwrap();
    assert_eq!(vmm.execute(QueryCpusFast {}).unwrap().len(), 2);
    assert_eq!(
        mine.0.load(Ordering::SeqCst),
        before,
        "opened once, at accel-set"
    );
    let accels = vmm.execute(QueryAccels {}).unwrap();
    let names: Vec<&str> = accels.iter().map(|a| a.name.as_str()).collect();
    assert!(
        names.contains(&"my-accel") && names.contains(&"absent"),
        "{names:?}"
    );
    let mine_info = accels.iter().find(|a| a.name == "my-accel").unwrap();
    assert!(mine_info.selected && mine_info.available);
}
