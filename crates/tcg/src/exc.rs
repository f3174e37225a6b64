//! Non-local outcomes of executing an instruction.

/// Exception vectors.
pub mod vec {
    /// Divide error.
    pub const DE: u8 = 0;
    /// Debug.
    pub const DB: u8 = 1;
    /// Non-maskable interrupt.
    pub const NMI: u8 = 2;
    /// Breakpoint.
    pub const BP: u8 = 3;
    /// Overflow.
    pub const OF: u8 = 4;
    /// BOUND range exceeded.
    pub const BR: u8 = 5;
    /// Invalid opcode.
    pub const UD: u8 = 6;
    /// Device not available.
    pub const NM: u8 = 7;
    /// Double fault.
    pub const DF: u8 = 8;
    /// Invalid TSS.
    pub const TS: u8 = 10;
    /// Segment not present.
    pub const NP: u8 = 11;
    /// Stack fault.
    pub const SS: u8 = 12;
    /// General protection.
    pub const GP: u8 = 13;
    /// Page fault.
    pub const PF: u8 = 14;
}

/// `Ex::Fault::error` value meaning "no error code" (keeps `Ex` register-sized).
pub const NO_ERR: u32 = u32::MAX;

/// Why an instruction did not simply fall through to the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ex {
    /// A fault: RIP goes back to the faulting instruction, then the exception is delivered.
    Fault {
        /// Vector.
        vector: u8,
        /// Error code, or [`NO_ERR`] for vectors that push none.
        error: u32,
    },
    /// `int n` / `int3` / `into`: delivered as a software interrupt with RIP after the instruction.
    SoftInt(u8),
    /// `hlt`: RIP is after the instruction; wait for an interrupt.
    Halt,
    /// State the block was specialised on changed: look up the next block afresh.
    EndBlock,
}

impl Ex {
    /// The error code as an option.
    #[inline]
    pub fn code(error: u32) -> Option<u32> {
        (error != NO_ERR).then_some(error)
    }
    /// #GP with an error code.
    #[inline]
    pub const fn gp(err: u32) -> Self {
        Ex::Fault {
            vector: vec::GP,
            error: err,
        }
    }
    /// #UD.
    pub const UD: Ex = Ex::Fault {
        vector: vec::UD,
        error: NO_ERR,
    };
    /// #DE.
    pub const DE: Ex = Ex::Fault {
        vector: vec::DE,
        error: NO_ERR,
    };
    /// #NM.
    pub const NM: Ex = Ex::Fault {
        vector: vec::NM,
        error: NO_ERR,
    };
    /// #SS with an error code.
    #[inline]
    pub const fn ss(err: u32) -> Self {
        Ex::Fault {
            vector: vec::SS,
            error: err,
        }
    }
    /// #NP with an error code.
    #[inline]
    pub const fn np(err: u32) -> Self {
        Ex::Fault {
            vector: vec::NP,
            error: err,
        }
    }
    /// #TS with an error code.
    #[inline]
    pub const fn ts(err: u32) -> Self {
        Ex::Fault {
            vector: vec::TS,
            error: err,
        }
    }
}

/// Result of one instruction.
pub type Flow = Result<(), Ex>;
