//! Writes every generated guest as a PVH ELF (`NAME.elf`) plus the serial output it must
//! produce (`NAME.expected`, when predicted) into a directory, to boot them on QEMU or with
//! `vmm -kernel`:
//!
//! ```sh
//! cargo run -p keel-testguest --example write_guests -- /tmp/guests
//! qemu-system-x86_64 -M microvm -accel tcg -m 32M -nodefaults -no-user-config \
//!     -display none -serial stdio -kernel /tmp/guests/alu.elf \
//!     -device isa-debug-exit,iobase=0xf4,iosize=0x04     # exit status 1 = guest wrote 0
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: write_guests DIR");
        return ExitCode::from(2);
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("cannot create {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    for g in keel_testguest::all() {
        let g = match g {
            Ok(g) => g,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        };
        let elf = dir.join(format!("{}.elf", g.name));
        if let Err(e) = std::fs::write(&elf, g.pvh_elf()) {
            eprintln!("cannot write {}: {e}", elf.display());
            return ExitCode::FAILURE;
        }
        if let Some(text) = &g.expected_serial {
            let p = dir.join(format!("{}.expected", g.name));
            if let Err(e) = std::fs::write(&p, text) {
                eprintln!("cannot write {}: {e}", p.display());
                return ExitCode::FAILURE;
            }
        }
        println!("{}", elf.display());
    }
    ExitCode::SUCCESS
}
