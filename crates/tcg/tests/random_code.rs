//! Random bytes as guest code must never panic or hang the interpreter.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use keel_accel::Vcpu;
use proptest::prelude::*;

fn run_random(code: &[u8], bits64: bool) {
    let mut h = Harness::new(8);
    if bits64 {
        h.long_mode(code);
        // Every vector goes to a handler that halts.
        h.write(0x18_0000, &[0xf4]);
        for v in 0..=255u8 {
            h.gate64(v, 0x18_0000, 0, 3);
        }
    } else {
        h.protected32(code);
    }
    // Registers point into RAM so memory operands mostly hit it.
    let mut r = h.regs();
    r.rax = 0x4000;
    r.rbx = 0x5000;
    r.rsi = 0x6000;
    r.rdi = 0x7000;
    h.vcpu.set_regs(&r).unwrap();
    let k = h.vcpu.kicker();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        k.kick();
    });
    let _ = h.vcpu.run().unwrap();
    t.join().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    #[test]
    fn random_code_64(code in proptest::collection::vec(any::<u8>(), 1..96)) {
        run_random(&code, true);
    }

    #[test]
    fn random_code_32(code in proptest::collection::vec(any::<u8>(), 1..96)) {
        run_random(&code, false);
    }
}
