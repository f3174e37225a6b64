//! Where the Debian guest of `scripts/build-guest.sh` is, for the Linux boot tests.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::path::PathBuf;

/// The guest directory (`$KEEL_GUEST_DIR`, else `~/.cache/keel-guest/current`) when it holds
/// every one of `files`. Otherwise the test prints why and skips (`None`), unless
/// `KEEL_REQUIRE_GUEST=1` (CI), where it fails.
pub fn guest_dir(files: &[&str]) -> Option<PathBuf> {
    let dir = match std::env::var_os("KEEL_GUEST_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".cache/keel-guest/current"),
    };
    let missing: Vec<_> = files.iter().filter(|f| !dir.join(f).is_file()).collect();
    if missing.is_empty() {
        return Some(dir);
    }
    let why = format!(
        "guest files {missing:?} missing in {} (run scripts/build-guest.sh or set KEEL_GUEST_DIR)",
        dir.display()
    );
    if std::env::var("KEEL_REQUIRE_GUEST").as_deref() == Ok("1") {
        panic!("KEEL_REQUIRE_GUEST=1 but {why}");
    }
    eprintln!("skipping: {why}");
    None
}
