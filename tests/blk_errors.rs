//! A full host disk under the Debian guest (`keel.mode=virtio-test`, see scripts/README.md):
//! the disk image is a sparse file on a size-limited tmpfs that the test fills up, so the
//! guest's write at sector 8 fails on the host with `ENOSPC`.
//!
//! * `werror=stop`: the machine stops in `io-error` after `BLOCK_IO_ERROR` (then `STOP`);
//!   once space is freed, `cont` runs the held write and the guest reads its data back.
//! * `werror=report`: the guest sees the I/O error and the machine keeps running.
//!
//! Each scenario runs under Keel and under QEMU 7.2 (`/usr/bin/qemu-system-x86_64`) and
//! the event and run state are compared. Needs root (to mount the tmpfs) and the guest
//! (`scripts/build-guest.sh`); without either the test prints why and passes. The guest
//! runs under tcg: `cargo test --release --test blk_errors -- --nocapture` (about a
//! minute per scenario and program here).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Client, TempDir};
use serde_json::{Value, json};

const QEMU: &str = "/usr/bin/qemu-system-x86_64";
const HOST_MARKER: &[u8] = b"KEEL-HOST-MARKER 7f3a9c written by the host";
const GUEST_WROTE: &[u8] = b"KEEL-GUEST-WROTE-THIS sector=8\n";

/// The Debian guest with its virtio modules (see `common::debian_guest`).
fn guest_files() -> Option<(PathBuf, PathBuf)> {
    common::debian_guest("initramfs-virtio.cpio.gz")
}

/// Why the test cannot run here, if it cannot.
fn unavailable() -> Option<&'static str> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("skipped: mounting a size-limited tmpfs needs root");
    }
    if guest_files().is_none() {
        return Some("skipped: no guest");
    }
    None
}

/// A tmpfs of 1 MiB, unmounted on drop.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(dir: &TempDir) -> SmallFs {
        let path = dir.path("fs");
        std::fs::create_dir_all(&path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1M", "tmpfs"])
            .arg(&path)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount -t tmpfs failed");
        SmallFs(path)
    }

    /// Writes a filler file until the host says ENOSPC.
    fn fill_up(&self) -> PathBuf {
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        loop {
            match f.write(&[0xff; 4096]) {
                Ok(n) if n > 0 => {}
                Ok(_) => break,
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
                    break;
                }
            }
        }
        path
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// The guest under `program` (Keel or QEMU) with its disk on a full tmpfs, a QMP socket
/// and its serial output collected.
struct Guest {
    child: Child,
    out: Arc<Mutex<String>>,
    qmp: Client,
    image: PathBuf,
    filler: PathBuf,
    _fs: SmallFs,
    _dir: TempDir,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Guest {
    fn start(program: &str, werror: &str) -> Guest {
        let (kernel, initrd) = guest_files().unwrap();
        let dir = TempDir::new();
        let fs = SmallFs::mount(&dir);
        let image = fs.0.join("disk.img");
        let mut f = std::fs::File::create(&image).unwrap();
        f.write_all(HOST_MARKER).unwrap();
        f.set_len(1 << 20).unwrap();
        drop(f);
        let filler = fs.fill_up();
        let sock = dir.path("qmp.sock");
        let append = format!(
            "console=ttyS0 quiet keel.mode=virtio-test tsc_early_khz={}",
            keel_tcg::guest_tsc_khz()
        );
        let blockdev = format!("driver=file,node-name=d0,filename={}", image.display());
        let device = format!("virtio-blk-device,drive=d0,serial=keel0,werror={werror}");
        let qmp = format!("unix:{},server=on,wait=off", sock.display());
        let mut child = Command::new(program)
            .args([
                "-M",
                "microvm",
                "-accel",
                "tcg",
                "-m",
                "256M",
                "-nodefaults",
            ])
            .args(["-no-reboot", "-display", "none", "-serial", "stdio"])
            .args(["-append", &append, "-qmp", &qmp])
            .arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-blockdev", &blockdev, "-device", &device])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let out = Arc::new(Mutex::new(String::new()));
        let mut stdout = child.stdout.take().unwrap();
        let sink = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            if let Ok(s) = UnixStream::connect(&sock) {
                break s;
            }
            assert!(
                child.try_wait().unwrap().is_none(),
                "{program} exited early"
            );
            assert!(Instant::now() < deadline, "{program}: no QMP socket");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut qmp = Client::new(stream);
        qmp.negotiate();
        // The guest boots under the interpreter: events may be minutes away.
        qmp.reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(600)))
            .unwrap();
        Guest {
            child,
            out,
            qmp,
            image,
            filler,
            _fs: fs,
            _dir: dir,
        }
    }

    /// Events up to and including the first named `name`.
    fn events_until(&mut self, name: &str) -> Vec<Value> {
        let mut seen = Vec::new();
        loop {
            let ev = self.qmp.next_event();
            let done = ev["event"] == name;
            seen.push(ev);
            if done {
                return seen;
            }
        }
    }

    /// The guest's output once it printed `KEEL-VIRTIO-TEST-DONE` (or exited).
    fn output_when_done(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let text = self.out.lock().unwrap().clone();
            if text.contains("KEEL-VIRTIO-TEST-DONE")
                || self.child.try_wait().unwrap().is_some()
                || Instant::now() > deadline
            {
                return text;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `query-block`'s `io-status` of the one disk.
    fn io_status(&mut self) -> Value {
        let blocks = self.qmp.ok("query-block", Value::Null);
        blocks[0]["io-status"].clone()
    }

    fn status(&mut self) -> Value {
        let s = self.qmp.ok("query-status", Value::Null);
        json!({"status": s["status"], "running": s["running"]})
    }
}

/// What one program did with `werror=stop`: the error event, the events up to STOP, the
/// run state and `query-block`'s `io-status` while stopped, the guest's output after
/// `cont`, the image's sector 8.
fn stop_scenario(program: &str) -> (Value, Vec<String>, Value, String, Vec<u8>) {
    let mut g = Guest::start(program, "stop");
    let events = g.events_until("STOP");
    let names: Vec<String> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap_or_default().to_owned())
        .collect();
    let error = events
        .iter()
        .find(|e| e["event"] == "BLOCK_IO_ERROR")
        .map(|e| e["data"].clone())
        .unwrap_or(Value::Null);
    let mut status = g.status();
    status["io-status"] = g.io_status();
    status["info status"] = g.qmp.ok(
        "human-monitor-command",
        json!({"command-line": "info status"}),
    );
    // Truncated rather than removed: a child another test thread forks at this moment
    // would keep a removed file's pages until it execs.
    std::fs::File::options()
        .write(true)
        .open(&g.filler)
        .unwrap()
        .set_len(0)
        .unwrap();
    g.qmp.ok("cont", Value::Null);
    // QEMU 7.2's `cont` leaves the I/O status of a disk on a -blockdev node as it was (it
    // resets only -drive's named backends).
    assert_eq!(g.io_status(), "nospace", "{program}");
    let text = g.output_when_done();
    let image = std::fs::read(&g.image).unwrap();
    (error, names, status, text, image[8 * 512..9 * 512].to_vec())
}

#[test]
fn werror_stop_pauses_on_a_full_disk_and_cont_completes_the_write() {
    if let Some(why) = unavailable() {
        eprintln!("{why}");
        return;
    }
    let (error, names, status, text, sector) = stop_scenario(common::BIN);
    assert_eq!(
        error,
        json!({"device": "", "node-name": "d0", "operation": "write", "action": "stop",
               "nospace": true, "reason": "No space left on device"}),
        "{names:?}"
    );
    // BLOCK_IO_ERROR, then STOP, as QEMU (no other event in between).
    assert_eq!(names[names.len() - 2..], ["BLOCK_IO_ERROR", "STOP"]);
    assert_eq!(
        status,
        json!({"status": "io-error", "running": false, "io-status": "nospace",
               "info status": "VM status: paused (io-error)\r\n"})
    );
    assert!(text.contains("KEEL-VDA-WRITE OK sector=8"), "{text}");
    assert_eq!(&sector[..GUEST_WROTE.len()], GUEST_WROTE);
    if Path::new(QEMU).exists() {
        let (q_error, q_names, q_status, q_text, q_sector) = stop_scenario(QEMU);
        assert_eq!(error, q_error, "Keel vs QEMU 7.2 BLOCK_IO_ERROR");
        assert_eq!(q_names[q_names.len() - 2..], names[names.len() - 2..]);
        assert_eq!(status, q_status, "Keel vs QEMU 7.2 query-status");
        assert!(q_text.contains("KEEL-VDA-WRITE OK sector=8"), "{q_text}");
        assert_eq!(sector, q_sector);
    }
}

/// What one program did with `werror=report`: the error event, the run state and
/// `query-block`'s `io-status` right after it, the guest's output.
fn report_scenario(program: &str) -> (Value, Value, Value, String) {
    let mut g = Guest::start(program, "report");
    let events = g.events_until("BLOCK_IO_ERROR");
    let error = events.last().map(|e| e["data"].clone()).unwrap_or_default();
    // The guest goes on (reads, entropy, console) for seconds before it powers off.
    let (status, io_status) = (g.status(), g.io_status());
    let text = g.output_when_done();
    (error, status, io_status, text)
}

#[test]
fn werror_report_gives_the_guest_an_io_error() {
    if let Some(why) = unavailable() {
        eprintln!("{why}");
        return;
    }
    let (error, status, io_status, text) = report_scenario(common::BIN);
    assert_eq!(
        error,
        // No `nospace`: with werror=report QEMU tracks no I/O status.
        json!({"device": "", "node-name": "d0", "operation": "write", "action": "report",
               "reason": "No space left on device"})
    );
    assert!(text.contains("KEEL-VIRTIO-TEST-DONE"), "{text}");
    // The write never reached the image: the guest's read-back differs, and its kernel
    // logged the error.
    assert!(!text.contains("KEEL-VDA-WRITE OK"), "{text}");
    assert!(text.contains("I/O error, dev vda"), "{text}");
    assert_eq!(status, json!({"status": "running", "running": true}));
    // The error was reported, so the machine did not stop: werror=report tracks no I/O
    // status either.
    assert_eq!(io_status, Value::Null);
    if Path::new(QEMU).exists() {
        let (q_error, _, q_io_status, q_text) = report_scenario(QEMU);
        assert_eq!(io_status, q_io_status, "Keel vs QEMU 7.2 io-status");
        assert_eq!(error, q_error, "Keel vs QEMU 7.2 BLOCK_IO_ERROR");
        assert!(!q_text.contains("KEEL-VDA-WRITE OK"), "{q_text}");
    }
}

/// `query-block`'s `io-status` of one `virtio-blk-pci` disk with `werror`/`rerror` set
/// (`None`: left to the default), on `pc` before the guest runs (`-S`).
fn pc_io_status(program: &str, werror: Option<&str>, rerror: Option<&str>) -> Value {
    let mut device = "virtio-blk-pci,drive=d0,id=disk0".to_owned();
    if let Some(w) = werror {
        device.push_str(&format!(",werror={w}"));
    }
    if let Some(r) = rerror {
        device.push_str(&format!(",rerror={r}"));
    }
    pc_disk_io_status(program, |image| {
        vec![
            "-blockdev".into(),
            format!("driver=file,node-name=d0,filename={}", image.display()),
            "-device".into(),
            device,
        ]
    })
}

/// `query-block`'s `io-status` of the one disk that `storage(image)`'s options give a
/// `pc` machine stopped before the guest runs (`-S`).
fn pc_disk_io_status(program: &str, storage: impl FnOnce(&Path) -> Vec<String>) -> Value {
    let dir = TempDir::new();
    let image = dir.path("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let sock = dir.path("qmp.sock");
    let qmp = format!("unix:{},server=on,wait=off", sock.display());
    let child = Command::new(program)
        .args([
            "-M",
            "pc",
            "-accel",
            "tcg",
            "-S",
            "-nodefaults",
            "-display",
            "none",
        ])
        .args(["-qmp", &qmp])
        .args(storage(&image))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut child = common::Guard(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    let stream = loop {
        if let Ok(s) = UnixStream::connect(&sock) {
            break s;
        }
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "{program} exited early"
        );
        assert!(Instant::now() < deadline, "{program}: no QMP socket");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut c = Client::new(stream);
    c.negotiate();
    let blocks = c.ok("query-block", Value::Null);
    let disks: Vec<&Value> = blocks
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["qdev"].is_string())
        .collect();
    assert_eq!(disks.len(), 1, "{program}: one disk expected in {blocks}");
    let status = disks[0]["io-status"].clone();
    c.ok("quit", Value::Null);
    let _ = child.wait();
    status
}

/// A `-drive`'s `rerror=`/`werror=` is the policy of a disk on it whose own property is
/// absent or `auto` (QEMU keeps it on the block backend); the disk's own value wins. The
/// I/O status shows which policy the disk follows. Values `-drive` refuses are QEMU's.
#[test]
fn drive_error_policies_are_inherited_by_the_disk() {
    let drive = |image: &Path, extra: &str| format!("file={},format=raw,{extra}", image.display());
    type Storage = Box<dyn Fn(&Path) -> Vec<String>>;
    let cases: Vec<(&str, Storage, Value)> = vec![
        (
            "if=none with werror=report,rerror=report",
            Box::new(move |i| {
                vec![
                    "-drive".into(),
                    drive(i, "if=none,id=d0,werror=report,rerror=report"),
                    "-device".into(),
                    "virtio-blk-pci,drive=d0".into(),
                ]
            }),
            Value::Null,
        ),
        (
            "the device's own werror=stop wins",
            Box::new(move |i| {
                vec![
                    "-drive".into(),
                    drive(i, "if=none,id=d0,werror=report,rerror=report"),
                    "-device".into(),
                    "virtio-blk-pci,drive=d0,werror=stop".into(),
                ]
            }),
            json!("ok"),
        ),
        (
            "if=virtio with werror=ignore",
            Box::new(move |i| vec!["-drive".into(), drive(i, "if=virtio,werror=ignore")]),
            Value::Null,
        ),
    ];
    for (what, storage, expect) in &cases {
        let keel = pc_disk_io_status(common::BIN, storage);
        assert_eq!(&keel, expect, "{what}");
        if Path::new(QEMU).exists() {
            assert_eq!(
                keel,
                pc_disk_io_status(QEMU, storage),
                "Keel vs QEMU 7.2: {what}"
            );
        }
    }
    for bad in ["werror=auto", "rerror=enospc", "werror=halt"] {
        let image = std::env::temp_dir().join("keel-drive-policy-never-opened.img");
        let arg = format!("file={},format=raw,if=none,id=d0,{bad}", image.display());
        let (st, err) = common::run_to_end(&["-M", "pc", "-S", "-display", "none", "-drive", &arg]);
        assert_eq!(st.code(), Some(1), "{bad}: {err}");
        if Path::new(QEMU).exists() {
            let q = Command::new(QEMU)
                .args(["-M", "pc", "-S", "-display", "none", "-drive", &arg])
                .output()
                .unwrap();
            let q_err = String::from_utf8_lossy(&q.stderr);
            let tail = |s: &str| s.rsplit(": ").next().unwrap_or("").trim().to_owned();
            assert_eq!(tail(&err), tail(&q_err), "{bad}");
        }
    }
}

/// The I/O status is tracked only when a policy can stop the machine (QEMU's rule), and
/// `werror`/`rerror` are properties of `virtio-blk-pci` too.
#[test]
fn io_status_is_tracked_only_when_an_error_can_stop() {
    let cases = [
        (None, None, json!("ok")),
        (Some("report"), None, Value::Null),
        (Some("ignore"), Some("stop"), json!("ok")),
        (Some("stop"), Some("report"), json!("ok")),
        (Some("report"), Some("ignore"), Value::Null),
    ];
    for (werror, rerror, expect) in cases {
        let keel = pc_io_status(common::BIN, werror, rerror);
        assert_eq!(keel, expect, "werror={werror:?} rerror={rerror:?}");
        if Path::new(QEMU).exists() {
            let qemu = pc_io_status(QEMU, werror, rerror);
            assert_eq!(
                keel, qemu,
                "Keel vs QEMU 7.2, werror={werror:?} rerror={rerror:?}"
            );
        }
    }
}
