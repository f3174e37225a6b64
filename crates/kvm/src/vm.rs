//! A KVM virtual machine: memory slots, interrupt controller, PIT, IRQ lines.

use std::sync::{Arc, Mutex};

use keel_accel::{
    AccelError, GuestMemory, IoEventMatch, IrqChip, IrqLine, MachineRequirements, MmioAddress,
    SystemEvents, Vcpu, Vm,
};
use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MEM_LOG_DIRTY_PAGES,
    kvm_cpuid_entry2, kvm_irqchip, kvm_userspace_memory_region,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::KvmAccel;
use crate::pit::LazyPit;
use crate::vcpu::{KvmVcpu, VcpuSetup};

/// Guest-physical page KVM uses for the real-mode identity page table (one page).
pub const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// Guest-physical base of the three pages KVM uses for the real-mode TSS.
pub const TSS_ADDR: u64 = 0xfffb_d000;
/// End of the pages reserved for KVM's real-mode support (exclusive).
pub const KVM_RESERVED_END: u64 = TSS_ADDR + 3 * 4096;

fn host(what: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> AccelError {
    move |e| AccelError::Host {
        what,
        source: e.into(),
    }
}

/// Evaluates `$call` with `$v` bound to the datamatch value of `$m` in the integer type whose
/// width KVM matches (kvm-ioctls takes the width from the type), or to `NoDatamatch`.
macro_rules! with_datamatch {
    ($m:expr, |$v:ident| $call:expr) => {
        match $m {
            IoEventMatch::Any => {
                let $v = NoDatamatch;
                $call
            }
            IoEventMatch::U8($v) => $call,
            IoEventMatch::U16($v) => $call,
            IoEventMatch::U32($v) => $call,
            IoEventMatch::U64($v) => $call,
        }
    };
}

/// A VM created by [`KvmAccel`].
pub struct KvmVm {
    // Field order is drop order: the VM fd goes before the memory it maps.
    vm: Arc<VmFd>,
    req: MachineRequirements,
    irqchip: bool,
    supported_cpuid: Vec<kvm_cpuid_entry2>,
    /// The table `Vm::set_cpuid` chose for new vCPUs (vCPU 0's); `None`: KVM's own model.
    model: Mutex<Option<Vec<keel_accel::CpuidLeaf>>>,
    msr_index_list: Vec<u32>,
    created: Mutex<Vec<bool>>,
    power_on_irqchip: Vec<kvm_irqchip>,
    pit: Arc<LazyPit>,
    events: Arc<dyn SystemEvents>,
    memory: Arc<GuestMemory>,
}

impl std::fmt::Debug for KvmVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmVm")
            .field("machine", &self.req.machine)
            .field("vcpus", &self.req.vcpus)
            .field("irqchip", &self.irqchip)
            .finish_non_exhaustive()
    }
}

impl KvmVm {
    pub(crate) fn new(
        accel: &KvmAccel,
        req: &MachineRequirements,
        memory: Arc<GuestMemory>,
        events: Arc<dyn SystemEvents>,
    ) -> Result<Self, AccelError> {
        let incompatible = |reason: String| AccelError::Incompatible {
            accel: crate::ACCEL_NAME,
            machine: req.machine.clone(),
            reason,
        };
        let regions = memory.num_regions();
        let slots = accel.kvm.get_nr_memslots();
        if regions > slots {
            return Err(incompatible(format!(
                "{regions} memory regions, KVM offers {slots} slots"
            )));
        }
        for r in memory.iter() {
            let start = r.start_addr().0;
            let end = start.saturating_add(r.len());
            if start < KVM_RESERVED_END && end > IDENTITY_MAP_ADDR {
                return Err(incompatible(format!(
                    "RAM at {start:#x}..{end:#x} overlaps the pages KVM reserves at \
                     {IDENTITY_MAP_ADDR:#x}..{KVM_RESERVED_END:#x}"
                )));
            }
        }

        let vm = accel.kvm.create_vm().map_err(host("KVM_CREATE_VM"))?;
        vm.set_identity_map_address(IDENTITY_MAP_ADDR)
            .map_err(host("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm.set_tss_address(TSS_ADDR as usize)
            .map_err(host("KVM_SET_TSS_ADDR"))?;

        for (slot, r) in memory.iter().enumerate() {
            let host_addr = r
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| incompatible(format!("guest memory region not mapped: {e}")))?;
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: host_addr as u64,
            };
            // SAFETY: the region is a live mapping of `r.len()` bytes owned by `memory`, and
            // this VM (and every vCPU, which hold their own `Arc`) keeps `memory` alive for as
            // long as the VM fd exists (field order above).
            unsafe { vm.set_user_memory_region(region) }
                .map_err(host("KVM_SET_USER_MEMORY_REGION"))?;
        }

        let irqchip = accel.options.in_kernel_irqchip;
        let mut power_on_irqchip = Vec::new();
        if irqchip {
            vm.create_irq_chip().map_err(host("KVM_CREATE_IRQCHIP"))?;
            for chip_id in [
                KVM_IRQCHIP_PIC_MASTER,
                KVM_IRQCHIP_PIC_SLAVE,
                KVM_IRQCHIP_IOAPIC,
            ] {
                let mut chip = kvm_irqchip {
                    chip_id,
                    ..Default::default()
                };
                vm.get_irqchip(&mut chip).map_err(host("KVM_GET_IRQCHIP"))?;
                power_on_irqchip.push(chip);
            }
        }
        // The PIT is created on the guest's first access to its ports: see the `pit` module.
        let vm = Arc::new(vm);
        let pit = Arc::new(LazyPit::new(vm.clone(), req.pit));

        Ok(Self {
            vm,
            req: req.clone(),
            irqchip,
            supported_cpuid: accel.supported_cpuid.clone(),
            model: Mutex::new(None),
            msr_index_list: accel.msr_index_list.clone(),
            created: Mutex::new(vec![false; req.vcpus as usize]),
            power_on_irqchip,
            pit,
            events,
            memory,
        })
    }

    /// The KVM VM file descriptor, for KVM-specific work the seam does not cover
    /// (ioeventfds, dirty logging).
    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// Whether the in-kernel PIT exists yet (it is created on the guest's first access to
    /// its ports, see the crate docs).
    pub fn pit_created(&self) -> bool {
        self.pit.created()
    }

    /// Whether the in-kernel irqchip exists.
    pub fn has_irqchip(&self) -> bool {
        self.irqchip
    }

    fn max_gsi(&self) -> u32 {
        match self.req.irqchip {
            IrqChip::Pic => 16,
            IrqChip::PicIoapic => 24,
        }
    }

    fn check_gsi(&self, gsi: u32) -> Result<(), AccelError> {
        if !self.irqchip {
            return Err(AccelError::Incompatible {
                accel: crate::ACCEL_NAME,
                machine: self.req.machine.clone(),
                reason: format!("IRQ {gsi} requested but this VM has no in-kernel irqchip"),
            });
        }
        if gsi >= self.max_gsi() {
            return Err(AccelError::Incompatible {
                accel: crate::ACCEL_NAME,
                machine: self.req.machine.clone(),
                reason: format!(
                    "GSI {gsi} does not exist (the irqchip has {})",
                    self.max_gsi()
                ),
            });
        }
        Ok(())
    }

    /// An eventfd bound to `gsi` with `KVM_IRQFD`: each write raises an edge on the line
    /// without a trip through this process's vCPU threads (for device event loops).
    pub fn irqfd(&self, gsi: u32) -> Result<EventFd, AccelError> {
        self.check_gsi(gsi)?;
        let fd = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|source| {
            AccelError::Host {
                what: "eventfd",
                source,
            }
        })?;
        self.vm
            .register_irqfd(&fd, gsi)
            .map_err(host("KVM_IRQFD"))?;
        Ok(fd)
    }

    /// Creates vCPU `index` with its concrete type (for KVM-specific calls such as
    /// [`KvmVcpu::vcpu_fd`]); [`Vm::create_vcpu`] boxes this.
    pub fn create_kvm_vcpu(&self, index: u32) -> Result<KvmVcpu, AccelError> {
        {
            let mut created = self.created.lock().unwrap_or_else(|p| p.into_inner());
            match created.get_mut(index as usize) {
                None => {
                    return Err(AccelError::Incompatible {
                        accel: crate::ACCEL_NAME,
                        machine: self.req.machine.clone(),
                        reason: format!(
                            "vCPU {index} requested, the machine has {}",
                            self.req.vcpus
                        ),
                    });
                }
                Some(true) => {
                    return Err(AccelError::Incompatible {
                        accel: crate::ACCEL_NAME,
                        machine: self.req.machine.clone(),
                        reason: format!("vCPU {index} already exists"),
                    });
                }
                Some(slot) => *slot = true,
            }
        }
        // The index stays taken even if creation fails: KVM does not let a vCPU id be reused.
        KvmVcpu::new(VcpuSetup {
            vm: &self.vm,
            index,
            count: self.req.vcpus,
            irqchip: self.irqchip,
            supported_cpuid: &self.supported_cpuid,
            model: self.model.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            msr_index_list: &self.msr_index_list,
            memory: self.memory.clone(),
            events: self.events.clone(),
            pit: self.pit.clone(),
        })
    }
}

/// Memory slots as `create` registered them: `(slot, region)` with the region's page offset
/// in the dirty bitmap (regions by address, as `keel_accel::dirty::DirtyBitmap`).
struct DirtySlot {
    slot: u32,
    region: kvm_userspace_memory_region,
    first_page: u64,
}

/// KVM's dirty log over every memory slot (`KVM_MEM_LOG_DIRTY_PAGES`, `KVM_GET_DIRTY_LOG`).
struct KvmDirtyLog {
    vm: Arc<VmFd>,
    slots: Vec<DirtySlot>,
    /// Keeps the memory behind the slots mapped while they are re-registered.
    _memory: Arc<GuestMemory>,
}

impl KvmDirtyLog {
    fn set_logging(&self, on: bool) -> Result<(), keel_accel::AccelError> {
        for s in &self.slots {
            let mut region = s.region;
            region.flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
            // SAFETY: the same live mapping `create` registered for this slot, kept alive by
            // `_memory`; only the flags change.
            unsafe { self.vm.set_user_memory_region(region) }
                .map_err(host("KVM_SET_USER_MEMORY_REGION (dirty logging)"))?;
        }
        Ok(())
    }
}

impl keel_accel::dirty::DirtyLog for KvmDirtyLog {
    fn collect(&self, into: &mut [u64]) -> Result<(), keel_accel::AccelError> {
        for s in &self.slots {
            let bits = self
                .vm
                .get_dirty_log(s.slot, s.region.memory_size as usize)
                .map_err(host("KVM_GET_DIRTY_LOG"))?;
            for (w, word) in bits.iter().enumerate() {
                let mut word = *word;
                while word != 0 {
                    let b = u64::from(word.trailing_zeros());
                    word &= word - 1;
                    let page = s.first_page + w as u64 * 64 + b;
                    if let Some(d) = into.get_mut((page / 64) as usize) {
                        *d |= 1 << (page % 64);
                    }
                }
            }
        }
        Ok(())
    }

    fn stop(&self) {
        // Nothing to report to: a slot left logging only costs the guest some speed.
        let _ = self.set_logging(false);
    }
}

impl Drop for KvmDirtyLog {
    fn drop(&mut self) {
        keel_accel::dirty::DirtyLog::stop(self);
    }
}

impl Vm for KvmVm {
    fn start_dirty_log(&self) -> Result<Arc<dyn keel_accel::dirty::DirtyLog>, AccelError> {
        let mut slots = Vec::new();
        for (slot, r) in self.memory.iter().enumerate() {
            let host_addr = r
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| AccelError::Host {
                    what: "mapping guest memory for dirty logging",
                    source: std::io::Error::other(e.to_string()),
                })?;
            slots.push(DirtySlot {
                slot: slot as u32,
                region: kvm_userspace_memory_region {
                    slot: slot as u32,
                    flags: 0,
                    guest_phys_addr: r.start_addr().0,
                    memory_size: r.len(),
                    userspace_addr: host_addr as u64,
                },
                first_page: 0,
            });
        }
        slots.sort_by_key(|s| s.region.guest_phys_addr);
        let mut next = 0;
        for s in &mut slots {
            s.first_page = next;
            next += s.region.memory_size.div_ceil(keel_accel::dirty::DIRTY_PAGE);
        }
        let log = KvmDirtyLog {
            vm: self.vm.clone(),
            slots,
            _memory: self.memory.clone(),
        };
        log.set_logging(true)?;
        Ok(Arc::new(log))
    }

    fn save_platform(&self) -> Result<keel_accel::PlatformState, AccelError> {
        crate::snapshot::save_platform(&self.vm, self.irqchip, &self.pit)
    }

    fn restore_platform(&self, state: &keel_accel::PlatformState) -> Result<(), AccelError> {
        crate::snapshot::restore_platform(&self.vm, self.irqchip, &self.pit, self.req.pit, state)
    }

    fn set_cpuid(&self, template: &[keel_accel::CpuidLeaf]) -> Result<(), AccelError> {
        let capable = crate::vcpu::capable(&self.supported_cpuid, self.req.vcpus, self.irqchip);
        keel_accel::check_cpuid(crate::ACCEL_NAME, template, &capable)?;
        *self.model.lock().unwrap_or_else(|p| p.into_inner()) = Some(template.to_vec());
        Ok(())
    }

    fn create_vcpu(&self, index: u32) -> Result<Box<dyn Vcpu>, AccelError> {
        Ok(Box::new(self.create_kvm_vcpu(index)?))
    }

    fn reset(&self) -> Result<(), AccelError> {
        for chip in &self.power_on_irqchip {
            self.vm.set_irqchip(chip).map_err(host("KVM_SET_IRQCHIP"))?;
        }
        self.pit.reset()
    }

    fn irq_line(&self, gsi: u32) -> Result<Arc<dyn IrqLine>, AccelError> {
        self.check_gsi(gsi)?;
        Ok(Arc::new(KvmIrqLine {
            vm: self.vm.clone(),
            gsi,
        }))
    }

    fn register_ioevent(
        &self,
        addr: MmioAddress,
        matches: IoEventMatch,
        fd: &EventFd,
    ) -> Result<(), AccelError> {
        let a = IoEventAddress::Mmio(addr.0);
        with_datamatch!(matches, |v| self.vm.register_ioevent(fd, &a, v))
            .map_err(host("KVM_IOEVENTFD"))
    }

    fn unregister_ioevent(
        &self,
        addr: MmioAddress,
        matches: IoEventMatch,
        fd: &EventFd,
    ) -> Result<(), AccelError> {
        let a = IoEventAddress::Mmio(addr.0);
        with_datamatch!(matches, |v| self.vm.unregister_ioevent(fd, &a, v))
            .map_err(host("KVM_IOEVENTFD (deassign)"))
    }

    fn register_irqfd(
        &self,
        gsi: u32,
        trigger: &EventFd,
        resample: Option<&EventFd>,
    ) -> Result<(), AccelError> {
        self.check_gsi(gsi)?;
        match resample {
            None => self
                .vm
                .register_irqfd(trigger, gsi)
                .map_err(host("KVM_IRQFD")),
            Some(r) => self
                .vm
                .register_irqfd_with_resample(trigger, r, gsi)
                .map_err(host("KVM_IRQFD (resample)")),
        }
    }

    fn unregister_irqfd(&self, gsi: u32, trigger: &EventFd) -> Result<(), AccelError> {
        self.vm
            .unregister_irqfd(trigger, gsi)
            .map_err(host("KVM_IRQFD (deassign)"))
    }

    /// `KVM_SIGNAL_MSI`: the in-kernel local APICs decode the message. A message the guest
    /// blocked (e.g. to an absent APIC) is not an error.
    fn signal_msi(&self, address: u64, data: u32) -> Result<(), AccelError> {
        let msi = kvm_bindings::kvm_msi {
            address_lo: address as u32,
            address_hi: (address >> 32) as u32,
            data,
            ..Default::default()
        };
        self.vm
            .signal_msi(msi)
            .map(|_| ())
            .map_err(host("KVM_SIGNAL_MSI"))
    }
}

/// A GSI driven with `KVM_IRQ_LINE`.
struct KvmIrqLine {
    vm: Arc<VmFd>,
    gsi: u32,
}

impl IrqLine for KvmIrqLine {
    fn set_level(&self, high: bool) {
        // The GSI was validated when the line was made; KVM_IRQ_LINE then only fails if the
        // VM is being torn down, when a lost interrupt no longer matters.
        let _ = self.vm.set_irq_line(self.gsi, high);
    }
}
