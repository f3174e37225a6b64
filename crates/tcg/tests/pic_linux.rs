//! The 8259 pair as Linux programs it, driven through the interpreter's VM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Harness;

#[test]
fn linux_init_8259a_then_irq4_gives_vector_0x34() {
    let h = Harness::new(1);
    let pic = h.vm.pic();
    let out = |port: u16, v: u8| h.buses.pio_write(keel_accel::PioAddress(port), &[v]);
    out(0x21, 0xff);
    out(0x20, 0x11);
    out(0x21, 0x30);
    out(0x21, 0x04);
    out(0x21, 0x01);
    out(0xa0, 0x11);
    out(0xa1, 0x38);
    out(0xa1, 0x02);
    out(0xa1, 0x01);
    out(0x21, 0xfb);
    out(0xa1, 0xff);
    // Unmask IRQ 4 as the serial driver does.
    out(0x21, 0xeb);
    pic.set_irq(4, true).unwrap();
    assert!(pic.has_interrupt());
    assert_eq!(pic.acknowledge(), Some(0x34));
}
