//! CPUID: a configurable feature set.
//!
//! The default advertises what this interpreter implements and what Linux needs
//! (the features a Debian 6.1 kernel needs to boot): fpu tsc msr pae cx8 cmov pat fxsr sse sse2 (leaf 1 EDX), hypervisor
//! (leaf 1 ECX bit 31), syscall nx lm (leaf 0x8000_0001 EDX), and the hypervisor leaf
//! 0x4000_0000 with the signature `TCGTCGTCGTCG`, and the invariant TSC (leaf 0x8000_0007
//! EDX bit 8: the guest TSC is the host's constant-rate TSC plus an offset shared by all
//! vCPUs, so Linux keeps the TSC as clocksource with several CPUs). The local APIC bit is
//! added by [`crate::vm::TcgVm`] when the VM has local APICs (see [`crate::vm::ApicMode`]);
//! without it the kernel runs the 8259 PIC.
//!
//! The local APICs implement the TSC-deadline timer, but it is advertised (leaf 1 ECX bit 24,
//! [`ecx1::TSC_DEADLINE`]) only when a caller sets it here. It saves Linux the 100 ms
//! calibration of the APIC timer (a `-smp 2` boot took 7.73 s instead of 8.29 s), but a
//! one-shot timer cannot make up for ticks the vCPU takes late (waiting for the execution
//! lock, or not scheduled by a loaded host), and early in boot, while Linux still counts
//! periodic ticks, lost ones made it distrust its TSC in 3 of 4 boots on a loaded host. The
//! periodic timer re-injects late ticks, so it is the default.

/// Physical-address width the guest sees (leaf 0x8000_0008 EAX[7:0]); the page walker
/// treats address bits from here up to bit 51 of PAE and 4-level entries as reserved.
pub const MAXPHYADDR: u32 = 40;

/// Leaf 1 EDX bits.
pub mod edx1 {
    /// x87.
    pub const FPU: u32 = 1 << 0;
    /// Page size extension.
    pub const PSE: u32 = 1 << 3;
    /// Time-stamp counter.
    pub const TSC: u32 = 1 << 4;
    /// RDMSR/WRMSR.
    pub const MSR: u32 = 1 << 5;
    /// PAE.
    pub const PAE: u32 = 1 << 6;
    /// CMPXCHG8B.
    pub const CX8: u32 = 1 << 8;
    /// Local APIC.
    pub const APIC: u32 = 1 << 9;
    /// CMOVcc.
    pub const CMOV: u32 = 1 << 15;
    /// Page attribute table.
    pub const PAT: u32 = 1 << 16;
    /// CLFLUSH.
    pub const CLFSH: u32 = 1 << 19;
    /// FXSAVE/FXRSTOR.
    pub const FXSR: u32 = 1 << 24;
    /// SSE.
    pub const SSE: u32 = 1 << 25;
    /// SSE2.
    pub const SSE2: u32 = 1 << 26;
}

/// Leaf 1 ECX bits.
pub mod ecx1 {
    /// CMPXCHG16B.
    pub const CX16: u32 = 1 << 13;
    /// Local APIC timer TSC-deadline mode.
    pub const TSC_DEADLINE: u32 = 1 << 24;
    /// Running under a hypervisor.
    pub const HYPERVISOR: u32 = 1 << 31;
}

/// Leaf 0x8000_0001 EDX bits.
pub mod edx81 {
    /// SYSCALL/SYSRET.
    pub const SYSCALL: u32 = 1 << 11;
    /// No-execute.
    pub const NX: u32 = 1 << 20;
    /// 1 GiB pages.
    pub const PDPE1GB: u32 = 1 << 26;
    /// Long mode.
    pub const LM: u32 = 1 << 29;
}

/// Leaf 0x8000_0001 ECX bits.
pub mod ecx81 {
    /// LAHF/SAHF in 64-bit mode.
    pub const LAHF_LM: u32 = 1 << 0;
    /// LZCNT.
    pub const ABM: u32 = 1 << 5;
}

/// Leaf 0x8000_0007 EDX bits.
pub mod edx87 {
    /// Invariant TSC (constant rate in every power state).
    pub const INVARIANT_TSC: u32 = 1 << 8;
}

/// The feature words the guest sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuidConfig {
    /// Vendor string (12 bytes).
    pub vendor: [u8; 12],
    /// Leaf 1 EDX.
    pub edx1: u32,
    /// Leaf 1 ECX.
    pub ecx1: u32,
    /// Leaf 0x8000_0001 EDX.
    pub edx81: u32,
    /// Leaf 0x8000_0001 ECX.
    pub ecx81: u32,
    /// Leaf 0x8000_0007 EDX (advanced power management).
    pub edx87: u32,
    /// Hypervisor signature at leaf 0x4000_0000 (12 bytes).
    pub hv_signature: [u8; 12],
    /// Processor brand string (48 bytes, leaves 0x8000_0002..4).
    pub brand: [u8; 48],
    /// Cores in the one package (leaf 0x8000_0008 ECX): every vCPU of a VM is a core of the
    /// same socket, so Linux treats them as siblings (and an application processor takes the
    /// BSP's delay-loop calibration instead of measuring its own against the timer tick).
    pub cores: u32,
    /// A whole table chosen by the machine ([`keel_accel::Vm::set_cpuid`]: a named CPU model,
    /// or the table a restored guest saw), as vCPU 0 sees it; when set, [`CpuidConfig::query`]
    /// answers from it (with the vCPU's own APIC id) and the feature words above are read
    /// from it.
    pub table: Option<std::sync::Arc<[keel_accel::CpuidLeaf]>>,
}

impl Default for CpuidConfig {
    fn default() -> Self {
        let mut brand = [0u8; 48];
        let b = b"Keel TCG x86-64 interpreter";
        brand[..b.len()].copy_from_slice(b);
        Self {
            vendor: *b"AuthenticAMD",
            edx1: edx1::FPU
                | edx1::PSE
                | edx1::TSC
                | edx1::MSR
                | edx1::PAE
                | edx1::CX8
                | edx1::CMOV
                | edx1::PAT
                | edx1::CLFSH
                | edx1::FXSR
                | edx1::SSE
                | edx1::SSE2,
            ecx1: ecx1::HYPERVISOR | ecx1::CX16,
            edx81: edx81::SYSCALL | edx81::NX | edx81::LM | edx81::PDPE1GB,
            ecx81: ecx81::LAHF_LM,
            edx87: edx87::INVARIANT_TSC,
            hv_signature: *b"TCGTCGTCGTCG",
            brand,
            cores: 1,
            table: None,
        }
    }
}

fn words(b: &[u8]) -> [u32; 4] {
    let mut w = [0u32; 4];
    for (i, c) in b.chunks(4).take(4).enumerate() {
        let mut x = [0u8; 4];
        x[..c.len()].copy_from_slice(c);
        w[i] = u32::from_le_bytes(x);
    }
    w
}

impl CpuidConfig {
    /// Whether LZCNT is advertised (otherwise `F3 0F BD` runs as BSR).
    pub fn has_lzcnt(&self) -> bool {
        self.ecx81 & ecx81::ABM != 0
    }

    /// Whether CMPXCHG16B is advertised.
    pub fn has_cx16(&self) -> bool {
        self.ecx1 & ecx1::CX16 != 0
    }

    /// This configuration answering from `table` (vCPU 0's table of a named model or of a
    /// restored guest): the feature words the interpreter consults follow the table.
    pub fn with_table(&self, table: &[keel_accel::CpuidLeaf]) -> Self {
        let get = |f: u32| table.iter().find(|l| l.function == f && l.index == 0);
        let mut c = self.clone();
        let l1 = get(1).copied().unwrap_or_default();
        let l81 = get(0x8000_0001).copied().unwrap_or_default();
        c.edx1 = l1.edx;
        c.ecx1 = l1.ecx;
        c.edx81 = l81.edx;
        c.ecx81 = l81.ecx;
        c.edx87 = get(0x8000_0007).map_or(0, |l| l.edx);
        if let Some(l0) = get(0) {
            for (i, r) in [l0.ebx, l0.edx, l0.ecx].iter().enumerate() {
                c.vendor[i * 4..i * 4 + 4].copy_from_slice(&r.to_le_bytes());
            }
        }
        c.table = Some(table.into());
        c
    }

    /// Answers CPUID for `leaf`/`subleaf` on vCPU `apic_id`: (eax, ebx, ecx, edx).
    pub fn query(&self, leaf: u32, subleaf: u32, apic_id: u32) -> (u32, u32, u32, u32) {
        if let Some(t) = &self.table {
            // Leaves whose sub-leaf selects the answer; the others ignore ECX.
            let indexed =
                matches!(leaf, 4 | 7 | 0xb | 0xd | 0xf | 0x10 | 0x14 | 0x1f) || leaf == 0x8000_001d;
            let found = t
                .iter()
                .find(|l| l.function == leaf && (l.index == subleaf || (!indexed && l.index == 0)));
            return match found {
                Some(l) => {
                    let l = keel_accel::cpuid_for_vcpu(std::slice::from_ref(l), apic_id)[0];
                    (l.eax, l.ebx, l.ecx, l.edx)
                }
                None => (0, 0, 0, 0),
            };
        }
        let v = words(&self.vendor);
        match leaf {
            0 => (0xd, v[0], v[2], v[1]),
            1 => (
                0x0000_0f61, // family 15, model 6, stepping 1
                // APIC ID, one logical processor per package, CLFLUSH line size 64.
                (apic_id << 24) | (1 << 16) | (8 << 8),
                self.ecx1,
                self.edx1,
            ),
            2..=0xd => (0, 0, 0, 0),
            0x4000_0000 => {
                let s = words(&self.hv_signature);
                (0x4000_0001, s[0], s[1], s[2])
            }
            0x4000_0001 => (0, 0, 0, 0),
            0x8000_0000 => (0x8000_0008, v[0], v[2], v[1]),
            0x8000_0001 => (0x0000_0f61, 0, self.ecx81, self.edx81),
            0x8000_0002..=0x8000_0004 => {
                let i = (leaf - 0x8000_0002) as usize * 16;
                let w = words(&self.brand[i..i + 16]);
                (w[0], w[1], w[2], w[3])
            }
            0x8000_0005..=0x8000_0006 => (0, 0, 0, 0),
            0x8000_0007 => (0, 0, 0, self.edx87),
            // MAXPHYADDR physical, 48 linear address bits; cores - 1 in ECX[7:0], the APIC-ID
            // core bits derived from it.
            0x8000_0008 => (0x0000_3000 | MAXPHYADDR, 0, self.cores.clamp(1, 256) - 1, 0),
            _ => (0, 0, 0, 0),
        }
    }
}
