//! Property tests of instruction semantics: random operands (biased towards edge values) and
//! random incoming flags for ALU ops, shifts and rotates, mul/div and bit operations, batched
//! many cases per guest. Each batch runs under tcg and is compared record by record with the
//! Rust reference model (`ops::model`); where `/dev/kvm` works the same batch also runs under
//! kvm and must match the model too (KVM-PVM emulates this CPL0 code, so batches stay small).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{End, run};
use keel_testguest::ops::{self, Case, Op, OpSpec};
use keel_testguest::strings::{self, Rep, StrCase, StrOp};
use proptest::prelude::*;

const BUDGET: Duration = Duration::from_secs(60);
/// Random cases per op spec in one guest.
const PER_SPEC: usize = 16;

fn operand(w: u32) -> BoxedStrategy<u64> {
    let edges = ops::edge_values(w);
    prop_oneof![
        3 => any::<u64>(),
        2 => proptest::sample::select(edges),
        1 => 0u64..=4,
    ]
    .boxed()
}

fn case(w: u32) -> impl Strategy<Value = Case> {
    (operand(w), operand(w), operand(w), any::<u64>()).prop_map(|(a, b, c, f)| Case {
        a,
        b,
        c,
        flags_in: f & ops::ARITH_FLAGS,
    })
}

fn shift_case(w: u32) -> impl Strategy<Value = Case> {
    (operand(w), operand(w), 0u64..300, any::<u64>()).prop_map(|(a, b, c, f)| Case {
        a,
        b,
        c,
        flags_in: f & ops::ARITH_FLAGS,
    })
}

/// One batch: `PER_SPEC` cases for every valid (op, width).
fn batch(ops_: &'static [Op], shift_like: bool) -> impl Strategy<Value = Vec<(OpSpec, Vec<Case>)>> {
    batch_of(ops_, shift_like, false)
}

/// Like [`batch`], in memory-destination form when `mem`.
fn batch_of(
    ops_: &'static [Op],
    shift_like: bool,
    mem: bool,
) -> impl Strategy<Value = Vec<(OpSpec, Vec<Case>)>> {
    let specs: Vec<OpSpec> = ops_
        .iter()
        .flat_map(|op| {
            [8, 16, 32, 64].map(|w| {
                if mem {
                    OpSpec::mem(*op, w)
                } else {
                    OpSpec::new(*op, w)
                }
            })
        })
        .filter(|s| s.is_valid())
        .collect();
    let strategies: Vec<_> = specs
        .into_iter()
        .map(|s| {
            let cases = if shift_like {
                proptest::collection::vec(shift_case(s.width).boxed(), PER_SPEC).boxed()
            } else {
                proptest::collection::vec(case(s.width).boxed(), PER_SPEC).boxed()
            };
            cases.prop_map(move |c| (s, c))
        })
        .collect();
    strategies
}

fn check(groups: &[(OpSpec, Vec<Case>)]) -> Result<(), TestCaseError> {
    let guest = ops::ops_guest("prop", groups).expect("guest builds");
    let want = ops::expected_results(groups);
    let mut backends = vec![common::tcg()];
    if let Some(k) = common::kvm() {
        backends.push(k);
    }
    for b in &backends {
        let o = run(b.as_ref(), &guest, BUDGET);
        prop_assert_eq!(&o.end, &End::Exit(0), "{}: {}", o.accel, o.serial);
        let specs: Vec<(OpSpec, Case)> = groups
            .iter()
            .filter(|(s, _)| s.is_valid())
            .flat_map(|(s, cs)| cs.iter().map(move |c| (*s, ops::normalize(*s, *c))))
            .collect();
        for (i, ((spec, c), w)) in specs.iter().zip(&want).enumerate() {
            let got = o.results.get(i);
            prop_assert_eq!(
                got,
                Some(w),
                "{}: {} a={:#x} b={:#x} c={:#x} flags_in={:#x}",
                o.accel,
                spec.name(),
                c.a,
                c.b,
                c.c,
                c.flags_in
            );
        }
    }
    Ok(())
}

fn str_case() -> impl Strategy<Value = StrCase> {
    (
        proptest::sample::select(vec![
            StrOp::Movs,
            StrOp::Stos,
            StrOp::Lods,
            StrOp::Cmps,
            StrOp::Scas,
        ]),
        proptest::sample::select(vec![1u32, 2, 4, 8]),
        proptest::sample::select(vec![Rep::None, Rep::Rep, Rep::Repne]),
        any::<bool>(),
        0u64..21,
        (
            0u64..193,
            0u64..193,
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
        ),
    )
        .prop_map(|(op, size, rep, df, count, (src, dst, rax, flags, seed))| {
            // Equal data makes repe/repne run longer: reuse the source offset half the time.
            let dst = if seed & 1 == 0 { src } else { dst };
            StrCase {
                op,
                size,
                rep,
                df,
                count,
                src,
                dst,
                rax,
                flags_in: flags,
                seed,
            }
            .normalize()
        })
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 8,
        max_shrink_iters: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn alu_matches_model(groups in batch(
        &[Op::Add, Op::Adc, Op::Sub, Op::Sbb, Op::And, Op::Or, Op::Xor, Op::Cmp, Op::Test,
          Op::Inc, Op::Dec, Op::Neg, Op::Not],
        false,
    )) {
        check(&groups)?;
    }

    #[test]
    fn shifts_match_model(groups in batch(
        &[Op::Shl, Op::Shr, Op::Sar, Op::Rol, Op::Ror, Op::Rcl, Op::Rcr, Op::ShlOne,
          Op::ShrOne, Op::SarOne, Op::Shld, Op::Shrd],
        true,
    )) {
        check(&groups)?;
    }

    #[test]
    fn muldiv_matches_model(groups in batch(
        &[Op::Mul, Op::Imul1, Op::Imul2, Op::Div, Op::Idiv],
        false,
    )) {
        check(&groups)?;
    }

    #[test]
    fn bitops_match_model(groups in batch(
        &[Op::Bt, Op::Bts, Op::Btr, Op::Btc, Op::Bsf, Op::Bsr, Op::Cmpxchg, Op::Xadd,
          Op::Bswap, Op::Setcc, Op::Cmovcc, Op::Cwd, Op::Movzx8, Op::Movsx8, Op::Movzx16,
          Op::Movsx16, Op::Movsxd, Op::Xchg, Op::Imul3, Op::Cmc, Op::Clc, Op::Stc,
          Op::Cmpxchg8b],
        false,
    )) {
        check(&groups)?;
    }

    #[test]
    fn string_ops_match_model(cases in proptest::collection::vec(str_case(), 48)) {
        let guest = strings::string_guest("strprop", &[("all".to_string(), cases.clone())])
            .expect("guest builds");
        let mut backends = vec![common::tcg()];
        if let Some(k) = common::kvm() {
            backends.push(k);
        }
        for b in &backends {
            let o = run(b.as_ref(), &guest, BUDGET);
            prop_assert_eq!(&o.end, &End::Exit(0), "{}: {}", o.accel, o.serial);
            let got = strings::parse_results(&o.raw_results);
            for (c, g) in cases.iter().zip(&got) {
                prop_assert_eq!(*g, strings::model(c), "{}: {} {:x?}", o.accel, c.name(), c);
            }
        }
    }

    #[test]
    fn memory_forms_match_model(groups in batch_of(
        &[Op::Add, Op::Adc, Op::Sub, Op::Sbb, Op::And, Op::Or, Op::Xor, Op::Cmp, Op::Test,
          Op::Inc, Op::Dec, Op::Neg, Op::Not, Op::Shl, Op::Shr, Op::Sar, Op::Rol, Op::Ror,
          Op::Rcl, Op::Rcr, Op::Bt, Op::Bts, Op::Btr, Op::Btc, Op::Shld, Op::Shrd, Op::Xadd],
        true,
        true,
    )) {
        check(&groups)?;
    }
}
