//! Random guest rings against every device (the fuzz target's harness, on stable).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

#[test]
fn random_rings_never_panic_or_hang() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..1500u32 {
        let len = 8 + (next() % 512) as usize;
        let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        data[0] = (i % 4) as u8; // every device type in turn
        harness::run(&data);
    }
}
