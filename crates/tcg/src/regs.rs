//! Bits of the control registers, EFER and the debug registers: a leaf, used by the MMU ([`crate::mem`]) as well
//! as by the CPU state and the instructions that write them.

/// CR0 bits.
pub mod cr0 {
    /// Protection enable.
    pub const PE: u64 = 1 << 0;
    /// Monitor coprocessor.
    pub const MP: u64 = 1 << 1;
    /// x87 emulation.
    pub const EM: u64 = 1 << 2;
    /// Task switched.
    pub const TS: u64 = 1 << 3;
    /// Extension type (always one).
    pub const ET: u64 = 1 << 4;
    /// Write protect.
    pub const WP: u64 = 1 << 16;
    /// Not write-through.
    pub const NW: u64 = 1 << 29;
    /// Cache disable.
    pub const CD: u64 = 1 << 30;
    /// Paging.
    pub const PG: u64 = 1 << 31;
}

/// CR4 bits the interpreter looks at.
pub mod cr4 {
    /// Debugging extensions (DR4/DR5 references raise #UD instead of aliasing DR6/DR7).
    pub const DE: u64 = 1 << 3;
    /// Page size extension (4 MiB pages in 2-level paging).
    pub const PSE: u64 = 1 << 4;
    /// Physical address extension.
    pub const PAE: u64 = 1 << 5;
    /// OS supports FXSAVE.
    pub const OSFXSR: u64 = 1 << 9;
    /// FS/GS base instructions.
    pub const FSGSBASE: u64 = 1 << 16;
}

/// EFER bits.
pub mod efer {
    /// SYSCALL enable.
    pub const SCE: u64 = 1 << 0;
    /// Long mode enable.
    pub const LME: u64 = 1 << 8;
    /// Long mode active.
    pub const LMA: u64 = 1 << 10;
    /// No-execute enable.
    pub const NXE: u64 = 1 << 11;
}

/// Debug registers: DR6 bits, DR7 fields and the breakpoint matching the interpreter does
/// (instruction breakpoints before an instruction, data breakpoints on its accesses).
pub mod dr {
    /// DR6: the four breakpoint-condition bits B0-B3.
    pub const B_MASK: u64 = 0xf;
    /// DR6: debug-register access detected (DR7.GD).
    pub const BD: u64 = 1 << 13;
    /// DR6: single step (EFLAGS.TF).
    pub const BS: u64 = 1 << 14;
    /// DR6 bits that read as one (without RTM and bus-lock detection, as on the CPUs KVM
    /// virtualises: bits 4-11 and 16-31).
    pub const DR6_FIXED1: u64 = 0xffff_0ff0;
    /// DR6 bits software can change.
    pub const DR6_WRITABLE: u64 = 0xe00f;
    /// DR7 bit 10, reads as one.
    pub const DR7_FIXED1: u64 = 0x400;
    /// DR7 bits software can change (bits 11, 12, 14 and 15 read as zero, as KVM keeps them).
    pub const DR7_WRITABLE: u64 = 0xffff_2bff;
    /// DR7: general detect (a `mov` to or from a debug register raises #DB first).
    pub const GD: u64 = 1 << 13;
    /// DR7: the L0-G3 enable bits.
    pub const ENABLES: u64 = 0xff;

    /// Whether breakpoint `i` is enabled (L or G).
    #[inline]
    pub fn enabled(dr7: u64, i: usize) -> bool {
        (dr7 >> (2 * i)) & 3 != 0
    }

    /// The R/W field of breakpoint `i`: 0 execute, 1 write, 2 I/O, 3 read or write.
    #[inline]
    pub fn rw(dr7: u64, i: usize) -> u64 {
        (dr7 >> (16 + 4 * i)) & 3
    }

    /// The length in bytes of breakpoint `i`'s LEN field (0: 1, 1: 2, 2: 8, 3: 4).
    #[inline]
    pub fn len(dr7: u64, i: usize) -> u64 {
        match (dr7 >> (18 + 4 * i)) & 3 {
            0 => 1,
            1 => 2,
            2 => 8,
            _ => 4,
        }
    }

    /// Whether some enabled breakpoint watches data (R/W 1 or 3).
    #[inline]
    pub fn watches_data(dr7: u64) -> bool {
        (0..4).any(|i| enabled(dr7, i) && rw(dr7, i) & 1 != 0)
    }

    /// B0-B3 for the enabled instruction breakpoints at linear address `lin`.
    pub fn code_hits(dr: &[u64; 8], lin: u64) -> u64 {
        let dr7 = dr[7];
        (0..4)
            .filter(|&i| enabled(dr7, i) && rw(dr7, i) == 0 && dr[i] == lin)
            .fold(0, |b, i| b | 1 << i)
    }

    /// B0-B3 for the enabled data breakpoints an access of `n` bytes at `lin` meets (`write`:
    /// a write; reads meet only R/W = 3 breakpoints). The breakpoint's address is aligned
    /// down to its length, as the hardware compares it.
    pub fn data_hits(dr: &[u64; 8], lin: u64, n: u64, write: bool) -> u64 {
        let dr7 = dr[7];
        let mut b = 0;
        for (i, &addr) in dr.iter().take(4).enumerate() {
            let kind = rw(dr7, i);
            if !enabled(dr7, i) || kind & 1 == 0 || (kind == 1 && !write) {
                continue;
            }
            let l = len(dr7, i);
            let start = addr & !(l - 1);
            if lin < start.wrapping_add(l) && start < lin.wrapping_add(n) {
                b |= 1 << i;
            }
        }
        b
    }
}
