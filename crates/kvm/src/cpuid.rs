//! Per-vCPU CPUID: what KVM supports, shaped into one machine's topology.
//!
//! `KVM_GET_SUPPORTED_CPUID` describes the host as KVM can virtualise it, not a machine: its
//! APIC ids, core counts and topology leaves describe no particular vCPU. This module turns that
//! table into the table of vCPU `index` of a `count`-vCPU machine with one socket, one thread per
//! core and APIC id = index. It is a pure function so it is tested without `/dev/kvm`.

use kvm_bindings::{KVM_CPUID_FLAG_SIGNIFCANT_INDEX, kvm_cpuid_entry2};

/// The machine-level facts the table depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTopology {
    /// This vCPU's index (also its APIC id).
    pub index: u32,
    /// Number of vCPUs in the machine.
    pub count: u32,
    /// Whether an in-kernel local APIC exists; without it the APIC feature bits are cleared.
    pub lapic: bool,
}

/// The hypervisor signature KVM exposes at leaf 0x4000_0000 ("KVMKVMKVM\0\0\0").
pub const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

const LEAF1_ECX_X2APIC: u32 = 1 << 21;
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_APIC: u32 = 1 << 9;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const AMD_EXT_ECX_CMP_LEGACY: u32 = 1 << 1;

/// Topology level types of leaves 0xB / 0x1F.
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Number of APIC-id bits needed to number `count` cores: ceil(log2(count)).
fn core_shift(count: u32) -> u32 {
    match count {
        0 | 1 => 0,
        n => 32 - (n - 1).leading_zeros(),
    }
}

fn vendor_is_amd(entries: &[kvm_cpuid_entry2]) -> bool {
    entries.iter().any(|e| {
        e.function == 0 && e.index == 0
            // "AuthenticAMD" / "HygonGenuine": both use the AMD extended topology leaves.
            && ((e.ebx, e.edx, e.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163)
                || (e.ebx, e.edx, e.ecx) == (0x6f67_7948, 0x6e65_476e, 0x656e_6975))
    })
}

fn max_basic_leaf(entries: &[kvm_cpuid_entry2]) -> u32 {
    entries
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax)
}

fn topology_leaf(function: u32, sub: u32, topo: &CpuTopology) -> kvm_cpuid_entry2 {
    let (eax, ebx, level) = match sub {
        // One thread per core: the SMT level adds no id bits.
        0 => (0, 1, LEVEL_SMT),
        1 => (core_shift(topo.count), topo.count, LEVEL_CORE),
        _ => (0, 0, 0),
    };
    kvm_cpuid_entry2 {
        function,
        index: sub,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (level << 8) | sub,
        edx: topo.index,
        ..Default::default()
    }
}

/// The backend-neutral form of a KVM table.
pub fn to_leaves(entries: &[kvm_cpuid_entry2]) -> Vec<keel_accel::CpuidLeaf> {
    entries
        .iter()
        .map(|e| keel_accel::CpuidLeaf {
            function: e.function,
            index: e.index,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        })
        .collect()
}

/// A backend-neutral table (a named CPU model, a restored guest's) as KVM entries for
/// vCPU `index`: the vCPU's APIC id put in (see [`keel_accel::cpuid_for_vcpu`]), and the
/// leaves whose sub-leaf selects the answer flagged so.
pub fn from_leaves(template: &[keel_accel::CpuidLeaf], index: u32) -> Vec<kvm_cpuid_entry2> {
    keel_accel::cpuid_for_vcpu(template, index)
        .into_iter()
        .map(|l| {
            let indexed = matches!(l.function, 4 | 7 | 0xb | 0xd | 0xf | 0x10 | 0x14 | 0x1f)
                || l.function == 0x8000_001d;
            kvm_cpuid_entry2 {
                function: l.function,
                index: l.index,
                flags: if indexed {
                    KVM_CPUID_FLAG_SIGNIFCANT_INDEX
                } else {
                    0
                },
                eax: l.eax,
                ebx: l.ebx,
                ecx: l.ecx,
                edx: l.edx,
                ..Default::default()
            }
        })
        .collect()
}

/// Builds the CPUID table of one vCPU from KVM's supported table.
pub fn vcpu_cpuid(supported: &[kvm_cpuid_entry2], topo: &CpuTopology) -> Vec<kvm_cpuid_entry2> {
    let amd = vendor_is_amd(supported);
    let max_basic = max_basic_leaf(supported);
    let count = topo.count.max(1);
    let apic_id = topo.index;
    let mut out: Vec<kvm_cpuid_entry2> = supported
        .iter()
        .filter(|e| e.function != 0xb && e.function != 0x1f)
        .copied()
        .collect();

    for e in &mut out {
        match e.function {
            1 => {
                // EBX[31:24] initial APIC id, EBX[23:16] addressable logical processors.
                let logical = 1u32 << core_shift(count);
                e.ebx = (e.ebx & 0x0000_ffff) | ((apic_id & 0xff) << 24) | ((logical & 0xff) << 16);
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if !topo.lapic {
                    e.edx &= !LEAF1_EDX_APIC;
                    e.ecx &= !(LEAF1_ECX_X2APIC | LEAF1_ECX_TSC_DEADLINE);
                }
            }
            // Deterministic cache parameters (valid sub-leaves have a type in EAX[4:0]):
            // EAX[31:26] = cores per package - 1; EAX[25:14] = threads sharing the cache - 1,
            // which is 0 with one thread per core.
            4 if !amd && e.eax & 0x1f != 0 => {
                let cores = (1u32 << core_shift(count)) - 1;
                e.eax = (e.eax & 0x0000_3fff) | ((cores & 0x3f) << 26);
            }
            0x8000_0001 if amd => {
                e.ecx &= !AMD_EXT_ECX_CMP_LEGACY;
            }
            0x8000_0008 if amd => {
                // ECX[15:12] APIC-id bits for cores, ECX[7:0] cores - 1.
                e.ecx = (e.ecx & !0xf0ff) | (core_shift(count) << 12) | ((count - 1) & 0xff);
            }
            0x8000_001e if amd => {
                // Extended APIC id, compute-unit id, node id: one core per unit, one node.
                e.eax = apic_id;
                e.ebx = apic_id & 0xff;
                e.ecx = 0;
                e.edx = 0;
            }
            0x4000_0000 => {
                e.ebx = KVM_SIGNATURE[0];
                e.ecx = KVM_SIGNATURE[1];
                e.edx = KVM_SIGNATURE[2];
                e.eax = e.eax.max(0x4000_0001);
            }
            _ => {}
        }
    }

    if !out.iter().any(|e| e.function == 0x4000_0000) {
        out.push(kvm_cpuid_entry2 {
            function: 0x4000_0000,
            eax: 0x4000_0001,
            ebx: KVM_SIGNATURE[0],
            ecx: KVM_SIGNATURE[1],
            edx: KVM_SIGNATURE[2],
            ..Default::default()
        });
    }
    if !out.iter().any(|e| e.function == 0x4000_0001) {
        out.push(kvm_cpuid_entry2 {
            function: 0x4000_0001,
            ..Default::default()
        });
    }

    for function in [0xb, 0x1f] {
        if max_basic >= function {
            for sub in 0..3 {
                out.push(topology_leaf(function, sub, topo));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn amd_host() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0, 0, [0x10, 0x6874_7541, 0x444d_4163, 0x6974_6e65]),
            // Host-ish leaf 1: APIC id 7, 16 logical, APIC + HTT + x2APIC.
            entry(
                1,
                0,
                [
                    0xa10f11,
                    0x0710_0800,
                    LEAF1_ECX_X2APIC,
                    LEAF1_EDX_APIC | LEAF1_EDX_HTT,
                ],
            ),
            entry(0xb, 0, [1, 2, 0x100, 7]),
            entry(0xb, 1, [4, 16, 0x201, 7]),
            entry(0x8000_0008, 0, [0x3030, 0, 0x700f, 0]),
            entry(0x8000_001e, 0, [7, 0x103, 0x0, 0]),
        ]
    }

    fn find(t: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *t.iter().find(|e| e.function == f && e.index == i).unwrap()
    }

    #[test]
    fn core_shift_is_ceil_log2() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(core_shift), [0, 1, 2, 2, 3, 3, 4]);
    }

    #[test]
    fn apic_ids_and_counts_follow_the_machine() {
        let t = vcpu_cpuid(
            &amd_host(),
            &CpuTopology {
                index: 2,
                count: 3,
                lapic: true,
            },
        );
        let l1 = find(&t, 1, 0);
        assert_eq!(l1.ebx >> 24, 2);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        let smt = find(&t, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        let core = find(&t, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 3, 0x201, 2));
        let end = find(&t, 0xb, 2);
        assert_eq!((end.ecx >> 8) & 0xff, 0);
        assert_eq!(t.iter().filter(|e| e.function == 0xb).count(), 3);
        assert_eq!(find(&t, 0x8000_0008, 0).ecx & 0xf0ff, 0x2002);
        assert_eq!(find(&t, 0x8000_001e, 0).eax, 2);
        // Max basic leaf 0x10 < 0x1f: no 0x1f leaves invented.
        assert!(!t.iter().any(|e| e.function == 0x1f));
    }

    #[test]
    fn single_cpu_without_lapic_clears_apic_features() {
        let t = vcpu_cpuid(
            &amd_host(),
            &CpuTopology {
                index: 0,
                count: 1,
                lapic: false,
            },
        );
        let l1 = find(&t, 1, 0);
        assert_eq!(l1.edx & (LEAF1_EDX_APIC | LEAF1_EDX_HTT), 0);
        assert_eq!(l1.ecx & LEAF1_ECX_X2APIC, 0);
        assert_eq!(l1.ebx >> 16, 1);
    }

    #[test]
    fn hypervisor_leaf_carries_the_kvm_signature() {
        let t = vcpu_cpuid(
            &amd_host(),
            &CpuTopology {
                index: 0,
                count: 1,
                lapic: true,
            },
        );
        let h = find(&t, 0x4000_0000, 0);
        let mut sig = Vec::new();
        for r in [h.ebx, h.ecx, h.edx] {
            sig.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&sig, b"KVMKVMKVM\0\0\0");
        assert!(h.eax >= 0x4000_0001);
        assert!(t.iter().any(|e| e.function == 0x4000_0001));
    }
}
