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
