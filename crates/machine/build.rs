//! Builds the demo guest (src/demo/demo.S) into a PVH ELF with GNU `as` and `ld` (binutils),
//! when the `demo-guest` feature is on.

use std::path::PathBuf;
use std::process::Command;

fn run(cmd: &mut Command, what: &str) -> Result<(), String> {
    let status = cmd.status().map_err(|e| {
        format!("cannot run {what} to build the demo guest ({e}); install binutils (GNU as/ld)")
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what} failed building the demo guest: {status}"))
    }
}

fn main() -> Result<(), String> {
    // Only the `demo-guest` feature needs binutils.
    if std::env::var_os("CARGO_FEATURE_DEMO_GUEST").is_none() {
        return Ok(());
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("cargo did not set OUT_DIR")?);
    let obj = out.join("demo.o");
    let elf = out.join("demo.elf");
    println!("cargo:rerun-if-changed=src/demo/demo.S");
    println!("cargo:rerun-if-changed=src/demo/demo.ld");
    run(
        Command::new("as")
            .args(["--64", "-o"])
            .arg(&obj)
            .arg("src/demo/demo.S"),
        "as",
    )?;
    run(
        Command::new("ld")
            .args([
                "-m",
                "elf_x86_64",
                "-static",
                "-nostdlib",
                "--build-id=none",
                "-z",
                "noexecstack",
                "-z",
                "max-page-size=0x1000",
                "--no-warn-rwx-segments",
                "-T",
                "src/demo/demo.ld",
                "-o",
            ])
            .arg(&elf)
            .arg(&obj),
        "ld",
    )
}
