//! CPU models in QEMU's terms. `max` (and `host` under kvm) is the accelerator's own CPUID
//! ([`keel_accel::Accelerator::cpuid`]); `qemu64` (the default) and `kvm64` are QEMU 7.2's
//! definitions kept to the features every Keel accelerator presents, so that the vCPUs
//! show the same CPUID under kvm and tcg and a saved guest can move between them
//! ([`present`]; the machine gives the table to the backend with
//! [`keel_accel::Vm::set_cpuid`]). The feature names are QEMU's x86 CPU properties, read
//! from a table: used by `query-cpu-model-expansion`, `query-cpu-definitions`,
//! `qom-list-properties max-x86_64-cpu` and the vCPU's `qom-list`/`qom-get`.

use keel_accel::{Accelerator, CpuidLeaf};

/// The QOM type of Keel's vCPU objects.
pub const CPU_TYPE: &str = "max-x86_64-cpu";

/// The properties of the vCPU object, (name, QOM type): `type`, one boolean per feature
/// (QEMU's aliases included), and the identity properties.
pub fn properties(cpuid: &[CpuidLeaf]) -> Vec<(&'static str, &'static str)> {
    let mut v = vec![("type", "string")];
    v.extend(
        features_with_aliases(cpuid)
            .into_iter()
            .map(|(n, _)| (n, "bool")),
    );
    v.extend([
        ("vendor", "string"),
        ("model-id", "string"),
        ("family", "int"),
        ("model", "int"),
        ("stepping", "int"),
        ("level", "uint32"),
        ("xlevel", "uint32"),
    ]);
    v
}

/// QEMU 7.2's `qemu64` model (the `pc` and `microvm` default): its feature names.
pub const QEMU64_FEATURES: &[&str] = &[
    "fpu", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", "sep", "mtrr", "pge", "mca",
    "cmov", "pat", "pse36", "clflush", "mmx", "fxsr", "sse", "sse2", "pni", "cx16", "lm",
    "syscall", "nx", "lahf-lm", "svm",
];

/// A named CPU model as QEMU 7.2 defines it (`target/i386/cpu.c`, `builtin_x86_defs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelDef {
    /// `-cpu` name.
    pub name: &'static str,
    /// CPUID vendor string.
    pub vendor: &'static [u8; 12],
    /// Family, model and stepping (leaf 1 EAX, QEMU's encoding).
    pub family: u32,
    /// Model.
    pub model: u32,
    /// Stepping.
    pub stepping: u32,
    /// Highest basic leaf.
    pub level: u32,
    /// Highest extended leaf.
    pub xlevel: u32,
    /// Brand string (leaves 0x8000_0002..4).
    pub model_id: &'static str,
    /// Feature names, QEMU's.
    pub features: &'static [&'static str],
}

/// QEMU 7.2's `qemu64` (the default of `pc` and `microvm`).
pub const QEMU64: ModelDef = ModelDef {
    name: "qemu64",
    vendor: b"AuthenticAMD",
    family: 15,
    model: 107,
    stepping: 1,
    level: 0xd,
    xlevel: 0x8000_000a,
    model_id: "QEMU Virtual CPU version 2.5+",
    features: QEMU64_FEATURES,
};

/// QEMU 7.2's `kvm64`.
pub const KVM64: ModelDef = ModelDef {
    name: "kvm64",
    vendor: b"GenuineIntel",
    family: 15,
    model: 6,
    stepping: 1,
    level: 0xd,
    xlevel: 0x8000_0008,
    model_id: "Common KVM processor",
    features: &[
        "fpu", "vme", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", "sep", "mtrr", "pge",
        "mca", "cmov", "pat", "pse36", "clflush", "mmx", "fxsr", "sse", "sse2", "pni", "cx16",
        "lm", "syscall", "nx",
    ],
};

/// The named models `-cpu` accepts besides `max`/`host`.
pub const NAMED_MODELS: &[ModelDef] = &[QEMU64, KVM64];

/// The features every Keel accelerator can present: the ones the interpreter implements
/// (`keel-tcg`), `apic` where the machine has local APICs. A named model keeps only these,
/// so that a machine presents the same CPUID under kvm and tcg and its guest can move
/// between them. Of QEMU's `qemu64` this leaves out `de`, `mce`, `sep`, `mtrr`, `pge`,
/// `mca`, `pse36`, `mmx`, `pni` and `svm` (the interpreter has no SYSENTER, MMX, SSE3,
/// machine-check or MTRR registers, PSE-36 or SVM).
pub const PORTABLE_FEATURES: &[&str] = &[
    "fpu",
    "pse",
    "tsc",
    "msr",
    "pae",
    "cx8",
    "apic",
    "cmov",
    "pat",
    "clflush",
    "fxsr",
    "sse",
    "sse2",
    "cx16",
    "hypervisor",
    "syscall",
    "nx",
    "pdpe1gb",
    "lm",
    "lahf-lm",
];

/// What a machine presents for a `-cpu` model on an accelerator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presented {
    /// The model's canonical name (`qemu64`, `kvm64`, `max`, `host`).
    pub name: String,
    /// The accelerator's own table (`max`): everything it can present.
    pub capable: Vec<CpuidLeaf>,
    /// Whether it is a named model (a table the machine gives the accelerator) rather than
    /// the accelerator's own (`max`, `host`).
    pub named: bool,
    /// The CPUID table of vCPU 0.
    pub cpuid: Vec<CpuidLeaf>,
    /// Features of the model's definition left out (not portable, or the accelerator
    /// lacks them): `query-cpu-definitions`' `unavailable-features`.
    pub left_out: Vec<&'static str>,
    /// QEMU's warnings for features of the model the host's KVM lacks
    /// (`warning: host doesn't support requested feature: CPUID.01H:ECX.cx16 [bit 13]`).
    pub warnings: Vec<String>,
}

/// QEMU's name of a feature bit, or QEMU's spelling of the bit where it has none.
pub fn bit_name(b: &keel_accel::CpuidBit) -> String {
    let named = if b.function == 0x4000_0001 {
        KVM_WORD
            .iter()
            .find(|(bit, _)| *bit == b.bit)
            .map(|(_, n)| n[0])
    } else {
        WORDS
            .iter()
            .find(|(f, i, r, _)| (*f, *i, reg_index(*r)) == (b.function, b.index, b.reg))
            .and_then(|(.., bits)| bits.iter().find(|(bit, _)| *bit == b.bit))
            .map(|(_, n)| n[0])
    };
    named.map_or_else(|| b.to_string(), str::to_owned)
}

/// The table of feature `name`: (leaf, sub-leaf, register, bit).
fn locate(name: &str) -> Option<(u32, u32, Reg, u32)> {
    if name == "hypervisor" {
        return Some((1, 0, Reg::Ecx, 31));
    }
    WORDS.iter().find_map(|(f, i, r, bits)| {
        bits.iter()
            .find(|(_, names)| names.contains(&name))
            .map(|(b, _)| (*f, *i, *r, *b))
    })
}

fn reg_index(r: Reg) -> u8 {
    match r {
        Reg::Eax => 0,
        Reg::Ebx => 1,
        Reg::Ecx => 2,
        Reg::Edx => 3,
    }
}

/// The model name of a `-cpu` value (`qemu64` when none is given, as QEMU's default).
pub fn model_name(spec: Option<&str>) -> &str {
    spec.map_or(QEMU64.name, |s| s.split(',').next().unwrap_or(s))
}

/// What model `name` is on `accel` for a machine of `vcpus` vCPUs: `max`/`host` the
/// accelerator's own table, `qemu64`/`kvm64` QEMU's definition kept to
/// [`PORTABLE_FEATURES`] and to what the accelerator can present, with QEMU's warning for
/// each of those the host's KVM lacks. An unknown name is QEMU's error.
pub fn present(name: &str, accel: &dyn Accelerator, vcpus: u32) -> Result<Presented, String> {
    present_on(name, &accel.cpuid(vcpus), accel.name(), vcpus)
}

/// The table vCPU 0 of the machine `config` describes presents for its `-cpu` (qemu64 when
/// none), from the accelerator's own table `max` (KVM's when `kvm`): what the vCPU's QOM
/// properties show.
pub fn vcpu_table(
    config: Option<&crate::board::MachineConfig>,
    max: &[CpuidLeaf],
    kvm: bool,
) -> Result<Vec<CpuidLeaf>, String> {
    let accel = if kvm { "kvm" } else { "tcg" };
    let spec = config.and_then(|c| c.props.get(crate::microvm_board::CPU_PROPERTY));
    let vcpus = config.and_then(|c| c.cpus).unwrap_or(1);
    Ok(present_on(model_name(spec.map(String::as_str)), max, accel, vcpus)?.cpuid)
}

/// Gives `vm` (a VM of `accel` with `vcpus` vCPUs, before any vCPU exists) the CPU model
/// of `-cpu` value `spec`, printing QEMU's warnings; what the vCPUs will present. A backend
/// without [`keel_accel::Vm::set_cpuid`] presents its own model (`max`).
pub fn apply(
    spec: &str,
    accel: &dyn Accelerator,
    vm: &dyn keel_accel::Vm,
    vcpus: u32,
) -> Result<Presented, ApplyError> {
    let mut cpu = present(model_name(Some(spec)), accel, vcpus)
        .map_err(|e| ApplyError::Model(spec.to_owned(), e))?;
    for w in &cpu.warnings {
        log::warn!("{w}");
    }
    if cpu.named {
        match vm.set_cpuid(&cpu.cpuid) {
            Ok(()) => {}
            Err(keel_accel::AccelError::Unsupported { .. }) => {
                log::info!("accelerator '{}' presents its own CPU model", accel.name());
                cpu = present("max", accel, vcpus)
                    .map_err(|e| ApplyError::Model(spec.to_owned(), e))?;
            }
            Err(e) => return Err(ApplyError::Accel(e)),
        }
    }
    Ok(cpu)
}

/// Why [`apply`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// `-cpu` names no model Keel has.
    #[error("-cpu {0}: {1}")]
    Model(String, String),
    /// The backend refused the table.
    #[error(transparent)]
    Accel(#[from] keel_accel::AccelError),
}

/// [`present`] from the accelerator's own table `max` and its name.
pub fn present_on(
    name: &str,
    max: &[CpuidLeaf],
    accel: &str,
    vcpus: u32,
) -> Result<Presented, String> {
    let own = |name: &str| Presented {
        name: name.to_owned(),
        capable: max.to_vec(),
        named: false,
        cpuid: max.to_vec(),
        left_out: Vec::new(),
        warnings: Vec::new(),
    };
    let def = match name {
        "max" => return Ok(own("max")),
        "host" => return Ok(own("host")),
        n => NAMED_MODELS
            .iter()
            .find(|d| d.name == n)
            .ok_or_else(|| format!("unable to find CPU model '{n}'"))?,
    };
    let mut t = ModelTable::new(def, vcpus, accel == "kvm");
    let mut left_out = Vec::new();
    let mut warnings = Vec::new();
    for &f in def.features.iter().chain(&["hypervisor"]) {
        let Some((function, index, r, bit)) = locate(f) else {
            continue;
        };
        let capable = leaf(max, function, index).is_some_and(|l| reg(l, r) & (1 << bit) != 0);
        let portable = PORTABLE_FEATURES.contains(&f);
        // QEMU's warning where the host's KVM cannot give the guest a feature the model
        // would: not for the features Keel's model leaves out on every accelerator (QEMU
        // warns about `pni` on a host without it; Keel's `qemu64` never has it), nor for
        // the APIC, which follows the machine.
        if !capable && accel == "kvm" && portable && f != "apic" {
            let b = keel_accel::CpuidBit {
                function,
                index,
                reg: reg_index(r),
                bit,
            };
            warnings.push(format!(
                "warning: host doesn't support requested feature: {}.{f} [bit {bit}]",
                b.word()
            ));
        }
        if capable && portable {
            t.set(function, index, r, bit);
        } else if f != "hypervisor" {
            left_out.push(f);
        }
    }
    if def.vendor == b"AuthenticAMD" {
        // AMD repeats leaf 1's basic features in leaf 0x8000_0001 EDX (as QEMU's models).
        let edx1 = t
            .leaves
            .iter()
            .find(|l| l.function == 1)
            .map_or(0, |l| l.edx);
        if let Some(l) = t.leaves.iter_mut().find(|l| l.function == 0x8000_0001) {
            l.edx |= edx1 & keel_accel::AMD_EDX_ALIASES;
        }
    }
    Ok(Presented {
        name: def.name.to_owned(),
        capable: max.to_vec(),
        named: true,
        cpuid: t.leaves,
        left_out,
        warnings,
    })
}

/// A named model's table under construction.
struct ModelTable {
    leaves: Vec<CpuidLeaf>,
}

impl ModelTable {
    /// The table of `def` for vCPU 0 of `vcpus` (one socket, one thread per core) under
    /// kvm or tcg, without feature bits; QEMU's layout of the identification, cache,
    /// topology and hypervisor leaves.
    fn new(def: &ModelDef, vcpus: u32, kvm: bool) -> Self {
        let count = vcpus.max(1);
        let v = |i: usize| {
            u32::from_le_bytes([
                def.vendor[i],
                def.vendor[i + 1],
                def.vendor[i + 2],
                def.vendor[i + 3],
            ])
        };
        let (vb, vd, vc) = (v(0), v(4), v(8));
        let (base_family, ext_family) = if def.family > 0xf {
            (0xf, def.family - 0xf)
        } else {
            (def.family, 0)
        };
        let version = (ext_family << 20)
            | ((def.model >> 4) << 16)
            | (base_family << 8)
            | ((def.model & 0xf) << 4)
            | def.stepping;
        let core_bits = match count {
            1 => 0,
            n => 32 - (n - 1).leading_zeros(),
        };
        let mut leaves = Vec::new();
        let mut put = |function, index, eax, ebx, ecx, edx| {
            leaves.push(CpuidLeaf {
                function,
                index,
                eax,
                ebx,
                ecx,
                edx,
            })
        };
        put(0, 0, def.level, vb, vc, vd);
        // EBX: CLFLUSH line 8 x 8 bytes; logical processors when more than one (HTT then
        // set in EDX by `set`, below); the APIC id is the vCPU's (`cpuid_for_vcpu`).
        let logical = if count > 1 { (count & 0xff) << 16 } else { 0 };
        let htt = if count > 1 { 1 << 28 } else { 0 };
        put(1, 0, version, logical | (8 << 8), 0, htt);
        for f in 2..=def.level {
            match f {
                0xb => {
                    put(0xb, 0, 0, 1, 0x100, 0);
                    put(0xb, 1, core_bits, count, 0x201, 0);
                    put(0xb, 2, 0, 0, 2, 0);
                }
                0xd => {
                    put(0xd, 0, 0, 0, 0, 0);
                    put(0xd, 1, 0, 0, 0, 0);
                }
                f => put(f, 0, 0, 0, 0, 0),
            }
        }
        // The hypervisor's signature, as QEMU's models show it: "KVMKVMKVM" under kvm,
        // "TCGTCGTCGTCG" under tcg (its name, not a feature: the paravirtual features of
        // leaf 0x4000_0001 stay off, the interpreter has none). A restored guest keeps the
        // signature it saw.
        let [sb, sc, sd] = if kvm {
            [0x4b4d_564b, 0x564b_4d56, 0x0000_004d]
        } else {
            [0x5447_4354, 0x4354_4743, 0x4743_5447]
        };
        put(0x4000_0000, 0, 0x4000_0001, sb, sc, sd);
        put(0x4000_0001, 0, 0, 0, 0, 0);
        put(0x8000_0000, 0, def.xlevel, vb, vc, vd);
        // CmpLegacy with more than one core, as QEMU (an AMD package of several cores; QEMU
        // leaves it clear for Intel, where Linux would ignore the thread information).
        let amd = def.vendor == b"AuthenticAMD";
        let cmp_legacy = if count > 1 && amd { 1 << 1 } else { 0 };
        put(0x8000_0001, 0, version, 0, cmp_legacy, 0);
        let mut brand = [0u8; 48];
        let id = def.model_id.as_bytes();
        brand[..id.len().min(47)].copy_from_slice(&id[..id.len().min(47)]);
        for (k, chunk) in brand.chunks(16).enumerate() {
            let w =
                |i: usize| u32::from_le_bytes([chunk[i], chunk[i + 1], chunk[i + 2], chunk[i + 3]]);
            put(0x8000_0002 + k as u32, 0, w(0), w(4), w(8), w(12));
        }
        for f in 0x8000_0005..=def.xlevel {
            match f {
                // QEMU's legacy AMD cache description (its `legacy-cache=on` models):
                // L1 64 KiB 2-way data and instruction caches, 512 KiB 16-way L2, 16 MiB
                // L3.
                0x8000_0005 => put(f, 0, 0x01ff_01ff, 0x01ff_01ff, 0x4002_0140, 0x4002_0140),
                0x8000_0006 => put(f, 0, 0, 0x4200_4200, 0x0200_8140, 0x0080_8140),
                // 40 physical and 48 linear address bits; APIC-id bits of the cores and
                // cores - 1.
                0x8000_0008 => put(f, 0, 0x3028, 0, (core_bits << 12) | (count - 1), 0),
                f => put(f, 0, 0, 0, 0, 0),
            }
        }
        Self { leaves }
    }

    fn set(&mut self, function: u32, index: u32, r: Reg, bit: u32) {
        if let Some(l) = self
            .leaves
            .iter_mut()
            .find(|l| l.function == function && l.index == index)
        {
            match r {
                Reg::Eax => l.eax |= 1 << bit,
                Reg::Ebx => l.ebx |= 1 << bit,
                Reg::Ecx => l.ecx |= 1 << bit,
                Reg::Edx => l.edx |= 1 << bit,
            }
        }
    }
}

/// The CPU models `query-cpu-definitions` lists: (name, static, unavailable features).
/// `max` is the accelerator's own model, `base` its static subset, `host` exists where
/// `/dev/kvm` does (usable only when KVM runs the machine); `qemu64` (the machines' default,
/// as QEMU's) lists as unavailable the features of QEMU's definition the machine leaves out
/// ([`present`]). (`-cpu kvm64` is accepted but not listed: Keel registers no
/// `kvm64-x86_64-cpu` QOM type.) `cpuid` is the accelerator's own table, `kvm_enabled` whether
/// it is KVM.
pub fn definitions(
    cpuid: Option<&[CpuidLeaf]>,
    kvm_present: bool,
    kvm_enabled: bool,
) -> Vec<(&'static str, bool, Vec<String>)> {
    let accel = if kvm_enabled { "kvm" } else { "tcg" };
    let missing = |def: &ModelDef| -> Vec<String> {
        cpuid
            .and_then(|c| present_on(def.name, c, accel, 1).ok())
            .map(|p| p.left_out.iter().map(|f| (*f).to_owned()).collect())
            .unwrap_or_default()
    };
    let mut v = vec![
        ("max", false, Vec::new()),
        ("base", true, Vec::new()),
        ("qemu64", false, missing(&QEMU64)),
    ];
    if kvm_present {
        let missing = if kvm_enabled {
            Vec::new()
        } else {
            vec!["kvm".into()]
        };
        v.insert(1, ("host", false, missing));
    }
    v
}

/// `query-cpu-model-expansion` of model `name` (`full` or static): the model's name as
/// expanded and its properties. Properties given may restate the CPUID, not change it:
/// Keel presents the accelerator's CPUID as it is. Errors are QEMU's texts.
pub fn expand(
    cpuid: &[CpuidLeaf],
    name: &str,
    full: bool,
    given: Option<&Map<String, Value>>,
    kvm_enabled: bool,
) -> Result<(&'static str, Map<String, Value>), String> {
    let canonical = match name {
        "max" => "max",
        "qemu64" => "qemu64",
        "kvm64" => "kvm64",
        "base" => "base",
        "host" if kvm_enabled => "host",
        "host" => return Err("CPU model 'host' requires KVM".into()),
        other => return Err(format!("CPU model '{other}' not found")),
    };
    let accel = if kvm_enabled { "kvm" } else { "tcg" };
    let table = match canonical {
        "qemu64" | "kvm64" => present_on(canonical, cpuid, accel, 1)?.cpuid,
        _ => cpuid.to_vec(),
    };
    let cpuid = table.as_slice();
    let known = features_with_aliases(cpuid);
    for (k, v) in given.into_iter().flatten() {
        match known.iter().find(|(n, _)| n == k) {
            None => return Err(format!("Property '{name}-x86_64-cpu.{k}' not found")),
            Some((_, on)) if Some(*on) != v.as_bool() => {
                return Err(format!(
                    "CPU feature '{k}' cannot be changed: Keel presents the accelerator's \
                     CPUID as it is"
                ));
            }
            Some(_) => {}
        }
    }
    let mut props = Map::new();
    for (n, on) in features(cpuid) {
        props.insert(n.into(), json!(on));
    }
    if full {
        props.extend(identity(cpuid));
    }
    Ok((
        if full && canonical != "base" {
            canonical
        } else {
            "base"
        },
        props,
    ))
}

/// The value of vCPU property `name` (`qom-get`), if it has one.
pub fn property(cpuid: &[CpuidLeaf], name: &str) -> Option<Value> {
    if name == "type" {
        return Some(json!(CPU_TYPE));
    }
    if let Some((_, on)) = features_with_aliases(cpuid)
        .into_iter()
        .find(|(n, _)| *n == name)
    {
        return Some(json!(on));
    }
    identity(cpuid).remove(name)
}
use serde_json::{Map, Value, json};

/// Which register of which leaf a feature word is.
#[derive(Debug, Clone, Copy)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// (leaf, sub-leaf, register, [(bit, QEMU property names)]).
type Word = (u32, u32, Reg, &'static [(u32, &'static [&'static str])]);

/// QEMU 7.2's feature words (`target/i386/cpu.c`, `feature_word_info`), the bits with names;
/// aliases QEMU registers for the same bit follow the first name.
#[rustfmt::skip]
const WORDS: &[Word] = &[
    (1, 0, Reg::Edx, &[
        (0, &["fpu"]), (1, &["vme"]), (2, &["de"]), (3, &["pse"]), (4, &["tsc"]),
        (5, &["msr"]), (6, &["pae"]), (7, &["mce"]), (8, &["cx8"]), (9, &["apic"]),
        (11, &["sep"]), (12, &["mtrr"]), (13, &["pge"]), (14, &["mca"]), (15, &["cmov"]),
        (16, &["pat"]), (17, &["pse36"]), (18, &["pn"]), (19, &["clflush"]), (21, &["ds"]),
        (22, &["acpi"]), (23, &["mmx"]), (24, &["fxsr"]), (25, &["sse"]), (26, &["sse2"]),
        (27, &["ss"]), (28, &["ht"]), (29, &["tm"]), (30, &["ia64"]), (31, &["pbe"]),
    ]),
    (1, 0, Reg::Ecx, &[
        (0, &["pni", "sse3"]), (1, &["pclmulqdq", "pclmuldq"]), (2, &["dtes64"]),
        (3, &["monitor"]), (4, &["ds-cpl", "ds_cpl"]), (5, &["vmx"]), (6, &["smx"]),
        (7, &["est"]), (8, &["tm2"]), (9, &["ssse3"]), (10, &["cid"]), (12, &["fma"]),
        (13, &["cx16"]), (14, &["xtpr"]), (15, &["pdcm"]), (17, &["pcid"]), (18, &["dca"]),
        (19, &["sse4.1", "sse4-1", "sse4_1"]), (20, &["sse4.2", "sse4-2", "sse4_2"]),
        (21, &["x2apic"]), (22, &["movbe"]), (23, &["popcnt"]),
        (24, &["tsc-deadline"]), (25, &["aes"]), (26, &["xsave"]), (28, &["avx"]),
        (29, &["f16c"]), (30, &["rdrand"]), (31, &["hypervisor"]),
    ]),
    (7, 0, Reg::Ebx, &[
        (0, &["fsgsbase"]), (1, &["tsc-adjust", "tsc_adjust"]), (2, &["sgx"]),
        (3, &["bmi1"]), (4, &["hle"]), (5, &["avx2"]), (7, &["smep"]), (8, &["bmi2"]),
        (9, &["erms"]), (10, &["invpcid"]), (11, &["rtm"]), (14, &["mpx"]),
        (16, &["avx512f"]), (17, &["avx512dq"]), (18, &["rdseed"]), (19, &["adx"]),
        (20, &["smap"]), (21, &["avx512ifma"]), (22, &["pcommit"]), (23, &["clflushopt"]),
        (24, &["clwb"]), (25, &["intel-pt"]), (26, &["avx512pf"]), (27, &["avx512er"]),
        (28, &["avx512cd"]), (29, &["sha-ni"]), (30, &["avx512bw"]), (31, &["avx512vl"]),
    ]),
    (7, 0, Reg::Ecx, &[
        (1, &["avx512vbmi"]), (2, &["umip"]), (3, &["pku"]), (5, &["waitpkg"]),
        (6, &["avx512vbmi2"]), (8, &["gfni"]), (9, &["vaes"]), (10, &["vpclmulqdq"]),
        (11, &["avx512vnni"]), (12, &["avx512bitalg"]), (14, &["avx512-vpopcntdq"]),
        (16, &["la57"]), (22, &["rdpid"]), (24, &["bus-lock-detect"]), (25, &["cldemote"]),
        (27, &["movdiri"]), (28, &["movdir64b"]), (30, &["sgxlc"]), (31, &["pks"]),
    ]),
    (7, 0, Reg::Edx, &[
        (2, &["avx512-4vnniw"]), (3, &["avx512-4fmaps"]), (4, &["fsrm"]),
        (8, &["avx512-vp2intersect"]), (10, &["md-clear"]), (14, &["serialize"]),
        (16, &["tsx-ldtrk"]), (19, &["arch-lbr"]), (22, &["amx-bf16"]),
        (23, &["avx512-fp16"]), (24, &["amx-tile"]), (25, &["amx-int8"]),
        (26, &["spec-ctrl"]), (27, &["stibp"]), (29, &["arch-capabilities"]),
        (30, &["core-capability"]), (31, &["ssbd"]),
    ]),
    (0xd, 1, Reg::Eax, &[(0, &["xsaveopt"]), (1, &["xsavec"]), (2, &["xgetbv1"]), (3, &["xsaves"])]),
    (0x8000_0001, 0, Reg::Edx, &[
        (11, &["syscall"]), (20, &["nx", "xd"]), (22, &["mmxext"]),
        (25, &["fxsr-opt", "ffxsr", "fxsr_opt"]), (26, &["pdpe1gb"]), (27, &["rdtscp"]),
        (29, &["lm", "i64"]), (30, &["3dnowext"]), (31, &["3dnow"]),
    ]),
    (0x8000_0001, 0, Reg::Ecx, &[
        (0, &["lahf-lm", "lahf_lm"]), (1, &["cmp-legacy", "cmp_legacy"]), (2, &["svm"]),
        (3, &["extapic"]), (4, &["cr8legacy"]), (5, &["abm"]), (6, &["sse4a"]),
        (7, &["misalignsse"]), (8, &["3dnowprefetch"]), (9, &["osvw"]), (10, &["ibs"]),
        (11, &["xop"]), (12, &["skinit"]), (13, &["wdt"]), (15, &["lwp"]), (16, &["fma4"]),
        (17, &["tce"]), (19, &["nodeid-msr", "nodeid_msr"]), (21, &["tbm"]),
        (22, &["topoext"]), (23, &["perfctr-core", "perfctr_core"]),
        (24, &["perfctr-nb", "perfctr_nb"]),
    ]),
    (0x8000_0007, 0, Reg::Edx, &[(8, &["invtsc"])]),
    (0x8000_0008, 0, Reg::Ebx, &[
        (0, &["clzero"]), (2, &["xsaveerptr"]), (9, &["wbnoinvd"]),
        (12, &["ibpb"]), (14, &["ibrs"]), (15, &["amd-stibp"]), (24, &["amd-ssbd"]),
        (25, &["virt-ssbd"]), (26, &["amd-no-ssb"]),
    ]),
];

/// KVM's paravirtual features (leaf 0x4000_0001 EAX), only under KVM's signature.
#[rustfmt::skip]
const KVM_WORD: &[(u32, &[&str])] = &[
    (0, &["kvmclock"]), (1, &["kvm-nopiodelay"]), (2, &["kvm-mmu"]), (4, &["kvm-asyncpf"]),
    (5, &["kvm-steal-time"]), (6, &["kvm-pv-eoi"]), (7, &["kvm-pv-unhalt"]),
    (9, &["kvm-pv-tlb-flush"]), (11, &["kvm-pv-ipi"]),
    (12, &["kvm-poll-control"]), (13, &["kvm-pv-sched-yield"]), (14, &["kvm-asyncpf-int"]),
    (15, &["kvm-msi-ext-dest-id"]),
];

fn leaf(cpuid: &[CpuidLeaf], function: u32, index: u32) -> Option<&CpuidLeaf> {
    cpuid
        .iter()
        .find(|l| l.function == function && l.index == index)
        .or_else(|| cpuid.iter().find(|l| l.function == function))
}

fn reg(l: &CpuidLeaf, r: Reg) -> u32 {
    match r {
        Reg::Eax => l.eax,
        Reg::Ebx => l.ebx,
        Reg::Ecx => l.ecx,
        Reg::Edx => l.edx,
    }
}

/// Every feature property and whether the CPUID sets it, in QEMU's names, once per bit
/// (what `query-cpu-model-expansion` reports).
pub fn features(cpuid: &[CpuidLeaf]) -> Vec<(&'static str, bool)> {
    let aliases: Vec<&str> = WORDS
        .iter()
        .flat_map(|w| w.3.iter())
        .chain(KVM_WORD.iter())
        .flat_map(|(_, names)| names.iter().skip(1).copied())
        .collect();
    let mut v = features_with_aliases(cpuid);
    v.retain(|(n, _)| !aliases.contains(n));
    v
}

/// [`features`] plus QEMU's alias properties for the same bits (`sse4_1`, `xd`, `i64`...),
/// which the vCPU object also has.
pub fn features_with_aliases(cpuid: &[CpuidLeaf]) -> Vec<(&'static str, bool)> {
    let mut out = Vec::new();
    for (function, index, r, bits) in WORDS {
        let word = leaf(cpuid, *function, *index).map_or(0, |l| reg(l, *r));
        for (bit, names) in *bits {
            for n in *names {
                out.push((*n, word & (1 << bit) != 0));
            }
        }
    }
    let kvm = leaf(cpuid, 0x4000_0000, 0).is_some_and(|l| l.ebx == 0x4b4d_564b);
    let word = match kvm {
        true => leaf(cpuid, 0x4000_0001, 0).map_or(0, |l| l.eax),
        false => 0,
    };
    for (bit, names) in KVM_WORD {
        for n in *names {
            out.push((*n, word & (1 << bit) != 0));
        }
    }
    out
}

fn string(cpuid: &[CpuidLeaf], parts: &[(u32, Reg)]) -> String {
    let mut b = Vec::new();
    for (f, r) in parts {
        if let Some(l) = leaf(cpuid, *f, 0) {
            b.extend_from_slice(&reg(l, *r).to_le_bytes());
        }
    }
    String::from_utf8_lossy(&b)
        .trim_end_matches('\0')
        .trim()
        .to_owned()
}

/// The non-feature properties of a full expansion: vendor, model-id, family, model,
/// stepping, levels.
pub fn identity(cpuid: &[CpuidLeaf]) -> Map<String, Value> {
    let mut m = Map::new();
    let vendor = string(cpuid, &[(0, Reg::Ebx), (0, Reg::Edx), (0, Reg::Ecx)]);
    let brand_parts: Vec<(u32, Reg)> = (0x8000_0002..=0x8000_0004)
        .flat_map(|f| [(f, Reg::Eax), (f, Reg::Ebx), (f, Reg::Ecx), (f, Reg::Edx)])
        .collect();
    let eax1 = leaf(cpuid, 1, 0).map_or(0, |l| l.eax);
    let base_family = (eax1 >> 8) & 0xf;
    let family = base_family
        + if base_family == 0xf {
            (eax1 >> 20) & 0xff
        } else {
            0
        };
    let model = ((eax1 >> 4) & 0xf)
        | if base_family >= 6 {
            ((eax1 >> 16) & 0xf) << 4
        } else {
            0
        };
    m.insert("vendor".into(), json!(vendor));
    m.insert("model-id".into(), json!(string(cpuid, &brand_parts)));
    m.insert("family".into(), json!(family));
    m.insert("model".into(), json!(model));
    m.insert("stepping".into(), json!(eax1 & 0xf));
    m.insert(
        "level".into(),
        json!(leaf(cpuid, 0, 0).map_or(0, |l| l.eax)),
    );
    m.insert(
        "xlevel".into(),
        json!(leaf(cpuid, 0x8000_0000, 0).map_or(0, |l| l.eax)),
    );
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_map_to_qemu_names() {
        let cpuid = [
            CpuidLeaf {
                function: 1,
                edx: (1 << 26) | 1,
                ecx: 1 << 19,
                ..Default::default()
            },
            CpuidLeaf {
                function: 0x8000_0001,
                edx: 1 << 29,
                ..Default::default()
            },
        ];
        let f: std::collections::BTreeMap<_, _> =
            features_with_aliases(&cpuid).into_iter().collect();
        assert!(!features(&cpuid).iter().any(|(n, _)| *n == "sse4_1"));
        assert!(f["sse2"] && f["fpu"] && f["sse4.1"] && f["sse4_1"] && f["lm"] && f["i64"]);
        assert!(!f["avx"] && !f["vme"] && !f["kvmclock"]);
    }

    fn names(cpuid: &[CpuidLeaf]) -> Vec<&'static str> {
        features(cpuid)
            .into_iter()
            .filter(|f| f.1)
            .map(|f| f.0)
            .collect()
    }

    #[test]
    fn portable_features_are_the_interpreters() {
        let tcg = keel_tcg::TcgAccel::new();
        let mut want: Vec<&str> = PORTABLE_FEATURES.to_vec();
        want.push("invtsc");
        want.sort_unstable();
        let mut have = names(&tcg.cpuid(2));
        have.sort_unstable();
        // The interpreter's own model also has the invariant TSC, which QEMU's models lack.
        assert_eq!(have, want);
    }

    #[test]
    fn qemu64_is_the_same_table_on_both_accelerators() {
        let tcg = keel_tcg::TcgAccel::new();
        let p = present_on("qemu64", &tcg.cpuid(2), "tcg", 2).unwrap();
        assert!(p.named && p.warnings.is_empty());
        assert_eq!(
            p.left_out,
            [
                "de", "mce", "sep", "mtrr", "pge", "mca", "pse36", "mmx", "pni", "svm"
            ]
        );
        let mut got = names(&p.cpuid);
        got.sort_unstable();
        // `ht` and `cmp-legacy`: two cores in the package, as QEMU says with -smp 2.
        let mut want = vec![
            "ht",
            "cmp-legacy",
            "fpu",
            "pse",
            "tsc",
            "msr",
            "pae",
            "cx8",
            "apic",
            "cmov",
            "pat",
            "clflush",
            "fxsr",
            "sse",
            "sse2",
            "cx16",
            "hypervisor",
            "syscall",
            "nx",
            "lm",
            "lahf-lm",
        ];
        want.sort_unstable();
        assert_eq!(got, want);
        assert!(keel_accel::cpuid_missing(&p.cpuid, &tcg.cpuid(2)).is_empty());
        // A KVM that has everything the interpreter has and more presents the same table.
        let mut kvm = tcg.cpuid(2);
        for l in &mut kvm {
            if l.function == 1 {
                l.ecx |= 1 << 21 | 1; // x2apic, pni
                l.edx |= 1 << 23; // mmx
            }
        }
        let k = present_on("qemu64", &kvm, "kvm", 2).unwrap();
        let other = |t: &[CpuidLeaf]| -> Vec<CpuidLeaf> {
            t.iter()
                .filter(|l| l.function != 0x4000_0000)
                .copied()
                .collect()
        };
        // The same but for the hypervisor's name.
        assert_eq!(other(&k.cpuid), other(&p.cpuid));
        assert_eq!(
            leaf(&k.cpuid, 0x4000_0000, 0).map(|l| l.ebx),
            Some(0x4b4d_564b)
        );
        assert!(k.warnings.is_empty(), "{:?}", k.warnings);
        let id = identity(&p.cpuid);
        assert_eq!(id["vendor"], "AuthenticAMD");
        assert_eq!(id["model-id"], "QEMU Virtual CPU version 2.5+");
        assert_eq!(
            (id["family"].clone(), id["model"].clone()),
            (json!(15), json!(107))
        );
        assert_eq!(id["xlevel"], json!(0x8000_000au32));
    }

    #[test]
    fn a_feature_the_host_lacks_is_dropped_with_qemus_warning() {
        let mut kvm = keel_tcg::TcgAccel::new().cpuid(1);
        for l in &mut kvm {
            if l.function == 1 {
                l.ecx &= !(1 << 13);
            }
        }
        let p = present_on("qemu64", &kvm, "kvm", 1).unwrap();
        assert_eq!(
            p.warnings,
            ["warning: host doesn't support requested feature: CPUID.01H:ECX.cx16 [bit 13]"]
        );
        assert!(!names(&p.cpuid).contains(&"cx16"));
        assert!(p.left_out.contains(&"cx16"));
        // The interpreter's one-vCPU machine has no local APIC: no APIC bit, no warning.
        let t = present_on("qemu64", &keel_tcg::TcgAccel::new().cpuid(1), "tcg", 1).unwrap();
        assert!(!names(&t.cpuid).contains(&"apic") && t.warnings.is_empty());
        assert_eq!(
            present_on("pentium9", &kvm, "kvm", 1).unwrap_err(),
            "unable to find CPU model 'pentium9'"
        );
    }

    #[test]
    fn bits_are_named_as_qemu_does() {
        let b = |function, reg, bit| keel_accel::CpuidBit {
            function,
            index: 0,
            reg,
            bit,
        };
        assert_eq!(bit_name(&b(1, 2, 21)), "x2apic");
        assert_eq!(bit_name(&b(0x4000_0001, 0, 0)), "kvmclock");
        assert_eq!(
            bit_name(&b(0x8000_0001, 3, 9)),
            "CPUID.80000001H:EDX [bit 9]"
        );
    }
}
