//! Backend-neutral x86 register state, shaped like KVM's so the mapping is one-to-one.

/// General-purpose registers, RIP and RFLAGS.
#[allow(missing_docs)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// A segment register with its hidden descriptor cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Segment {
    /// Base address.
    pub base: u64,
    /// Limit in bytes (already scaled by granularity).
    pub limit: u32,
    /// Visible selector.
    pub selector: u16,
    /// Descriptor type field (4 bits).
    pub type_: u8,
    /// Present bit.
    pub present: bool,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// Default operand size (D/B bit).
    pub db: bool,
    /// Code/data (1) or system (0) descriptor.
    pub s: bool,
    /// 64-bit code segment (L bit).
    pub l: bool,
    /// Granularity bit.
    pub g: bool,
    /// Available-for-software bit.
    pub avl: bool,
    /// Null or unusable segment.
    pub unusable: bool,
}

/// GDTR / IDTR.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DescriptorTable {
    /// Linear base address.
    pub base: u64,
    /// Limit in bytes.
    pub limit: u16,
}

/// Segment, descriptor-table and control registers.
#[allow(missing_docs)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpecialRegs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
}

/// The execution mode implied by CR0, EFER and CS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuMode {
    /// CR0.PE clear.
    Real,
    /// Protected mode with a 16-bit code segment.
    Protected16,
    /// Protected mode with a 32-bit code segment (or compatibility mode's 32-bit CS).
    Protected32,
    /// Long mode with CS.L set.
    Long64,
}

impl SpecialRegs {
    /// The mode these registers put the CPU in.
    pub fn mode(&self) -> CpuMode {
        const CR0_PE: u64 = 1;
        const EFER_LMA: u64 = 1 << 10;
        if self.cr0 & CR0_PE == 0 {
            CpuMode::Real
        } else if self.efer & EFER_LMA != 0 && self.cs.l {
            CpuMode::Long64
        } else if self.cs.db {
            CpuMode::Protected32
        } else {
            CpuMode::Protected16
        }
    }
}

/// One CPUID leaf as a guest sees it (what [`crate::Accelerator::cpuid`] reports).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuidLeaf {
    /// Leaf (EAX on input).
    pub function: u32,
    /// Sub-leaf (ECX on input; 0 where the leaf has none).
    pub index: u32,
    /// EAX.
    pub eax: u32,
    /// EBX.
    pub ebx: u32,
    /// ECX.
    pub ecx: u32,
    /// EDX.
    pub edx: u32,
}

/// The table vCPU `index` sees, from `template`, the table of vCPU 0 of the same machine:
/// only the fields that hold the vCPU's own APIC id differ between vCPUs (leaf 1 EBX[31:24],
/// the x2APIC id in EDX of the topology leaves 0xB and 0x1F, AMD's extended APIC id in leaf
/// 0x8000_001E). Both backends use it for a model the machine chose ([`crate::Vm::set_cpuid`]).
pub fn cpuid_for_vcpu(template: &[CpuidLeaf], index: u32) -> Vec<CpuidLeaf> {
    template
        .iter()
        .map(|l| {
            let mut l = *l;
            match l.function {
                1 => l.ebx = (l.ebx & 0x00ff_ffff) | ((index & 0xff) << 24),
                0xb | 0x1f => l.edx = index,
                0x8000_001e => {
                    l.eax = index;
                    l.ebx = (l.ebx & !0xff) | (index & 0xff);
                }
                _ => {}
            }
            l
        })
        .collect()
}

/// One feature bit of a CPUID table: leaf, sub-leaf, register (0 EAX, 1 EBX, 2 ECX, 3 EDX)
/// and bit number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuidBit {
    /// Leaf.
    pub function: u32,
    /// Sub-leaf.
    pub index: u32,
    /// Register: 0 EAX, 1 EBX, 2 ECX, 3 EDX.
    pub reg: u8,
    /// Bit number.
    pub bit: u32,
}

impl CpuidBit {
    /// The word alone, as QEMU names it: `CPUID.01H:ECX`.
    pub fn word(&self) -> String {
        let reg = ["EAX", "EBX", "ECX", "EDX"][usize::from(self.reg & 3)];
        format!("CPUID.{:02X}H:{reg}", self.function)
    }
}

impl std::fmt::Display for CpuidBit {
    /// QEMU's spelling: `CPUID.01H:ECX [bit 0]`, `CPUID.(EAX=07H,ECX=0):EBX [bit 5]`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let reg = ["EAX", "EBX", "ECX", "EDX"][usize::from(self.reg & 3)];
        if matches!(self.function, 7 | 0xd) {
            write!(
                f,
                "CPUID.(EAX={:02X}H,ECX={}):{reg}",
                self.function, self.index
            )?;
        } else {
            write!(f, "CPUID.{:02X}H:{reg}", self.function)?;
        }
        write!(f, " [bit {}]", self.bit)
    }
}

/// The registers of CPUID that hold feature flags (a guest may rely on each bit they set):
/// (leaf, sub-leaf, register). Other words are identification (vendor, family, brand),
/// sizes and topology, which any backend can present.
pub const CPUID_FEATURE_WORDS: &[(u32, u32, u8)] = &[
    (1, 0, 3),
    (1, 0, 2),
    (7, 0, 1),
    (7, 0, 2),
    (7, 0, 3),
    (0xd, 1, 0),
    (0x4000_0001, 0, 0),
    (0x8000_0001, 0, 3),
    (0x8000_0001, 0, 2),
    (0x8000_0007, 0, 3),
    (0x8000_0008, 0, 1),
];

/// The leaf 1 EDX features AMD processors repeat in leaf 0x8000_0001 EDX (fpu vme de pse
/// tsc msr pae mce cx8 apic mtrr pge mca cmov pat pse36 mmx fxsr).
pub const AMD_EDX_ALIASES: u32 = 0x0183_f3ff;

/// The value of feature word (`function`, `index`, `reg`) in `table` (0 where absent).
pub fn cpuid_word(table: &[CpuidLeaf], function: u32, index: u32, reg: u8) -> u32 {
    table
        .iter()
        .find(|l| l.function == function && l.index == index)
        .map_or(0, |l| match reg {
            0 => l.eax,
            1 => l.ebx,
            2 => l.ecx,
            _ => l.edx,
        })
}

/// The feature bits `table` sets that `capable` (what a backend can present) does not, in
/// [`CPUID_FEATURE_WORDS`] order: what a backend must refuse rather than advertise. HTT
/// (leaf 1 EDX bit 28) and CmpLegacy (leaf 0x8000_0001 ECX bit 1) describe the topology
/// (more than one logical processor in the package), not something a backend implements,
/// and are not compared.
pub fn cpuid_missing(table: &[CpuidLeaf], capable: &[CpuidLeaf]) -> Vec<CpuidBit> {
    let mut out = Vec::new();
    for &(function, index, reg) in CPUID_FEATURE_WORDS {
        let topology = match (function, reg) {
            (1, 3) => 1 << 28,
            (0x8000_0001, 2) => 1 << 1,
            _ => 0,
        };
        let mut can = cpuid_word(capable, function, index, reg);
        if (function, reg) == (0x8000_0001, 3) {
            // AMD repeats these leaf 1 EDX features here: a backend that presents them there
            // presents them here.
            can |= cpuid_word(capable, 1, 0, 3) & AMD_EDX_ALIASES;
        }
        let extra = cpuid_word(table, function, index, reg) & !can & !topology;
        for bit in (0..32).filter(|b| extra & (1 << b) != 0) {
            out.push(CpuidBit {
                function,
                index,
                reg,
                bit,
            });
        }
    }
    out
}
