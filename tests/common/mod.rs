//! Test support: start the real `vmm` binary and talk QMP to it over real sockets.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const BIN: &str = env!("CARGO_BIN_EXE_vmm");

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh directory for sockets, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A directory nobody else uses: its name is new (a pid is reused within a long test
    /// run, and a directory left by an earlier process may hold a live socket).
    pub fn new() -> TempDir {
        loop {
            let p = std::env::temp_dir().join(format!(
                "keel-vmm-test-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::SeqCst)
            ));
            match std::fs::create_dir(&p) {
                Ok(()) => return TempDir(p),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("cannot create {}: {e}", p.display()),
            }
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `vmm` process, killed on drop.
pub struct Vmm {
    pub child: Child,
    pub dir: TempDir,
    pub sock: PathBuf,
}

impl Vmm {
    /// Starts `vmm ARGS -qmp unix:SOCK,server=on,wait=off` (the monitor first, so that it
    /// is live whatever the rest does).
    pub fn start(args: &[&str]) -> Vmm {
        Vmm::start_with_stdout(args, Stdio::null())
    }

    /// [`Vmm::start`] with the process's standard output going to `stdout` (e.g. piped, to
    /// read what QEMU prints there; read it, or the process blocks once the pipe is full).
    pub fn start_with_stdout(args: &[&str], stdout: Stdio) -> Vmm {
        let dir = TempDir::new();
        let sock = dir.path("qmp.sock");
        let spec = format!("unix:{},server=on,wait=off", sock.display());
        let mut all = vec!["-qmp", spec.as_str()];
        all.extend_from_slice(args);
        let child = Command::new(BIN)
            .args(&all)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Vmm { child, dir, sock }
    }

    /// The conformance command line: `-machine none -nodefaults -display none` plus `extra`.
    pub fn start_none(extra: &[&str]) -> Vmm {
        let mut args = vec!["-machine", "none", "-nodefaults", "-display", "none"];
        args.extend_from_slice(extra);
        Vmm::start(&args)
    }

    /// Connects and reads the greeting.
    pub fn connect(&mut self) -> Client {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(s) = UnixStream::connect(&self.sock) {
                return Client::new(s);
            }
            if let Some(st) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                self.child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                panic!("vmm exited with {st} before accepting: {err}");
            }
            assert!(Instant::now() < deadline, "QMP socket never appeared");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Connects, reads the greeting and negotiates.
    pub fn qmp(&mut self) -> Client {
        let mut c = self.connect();
        c.negotiate();
        c
    }

    /// How the process stands, for a failure message: its exit status and what it wrote
    /// to stderr once it has exited (waits up to 2 s for it to exit), or "still running".
    #[allow(dead_code)]
    pub fn post_mortem(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => {
                    let mut err = String::new();
                    if let Some(mut e) = self.child.stderr.take() {
                        let _ = e.read_to_string(&mut err);
                    }
                    return format!("vmm exited with {st}; its stderr:\n{err}");
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Ok(None) => return "vmm is still running".to_owned(),
                Err(e) => return format!("vmm's status is unknown: {e}"),
            }
        }
    }

    /// Waits for the process to exit (up to 10 s).
    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "vmm did not exit");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child process killed on drop, so a failing test never leaves a `vmm` behind (one
/// holding the test harness's pipes would make `cargo test` wait forever).
pub struct Guard(pub Child);

impl Guard {
    /// Starts `vmm ARGS` with the given stdin/stdout (stderr discarded).
    pub fn spawn(args: &[&str], stdin: Stdio, stdout: Stdio) -> Guard {
        Guard(
            Command::new(BIN)
                .args(args)
                .stdin(stdin)
                .stdout(stdout)
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }

    /// Waits for exit (10 s at most).
    pub fn wait(&mut self) -> ExitStatus {
        self.wait_for(Duration::from_secs(10))
    }

    /// Waits for exit (`limit` at most).
    pub fn wait_for(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.0.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "vmm did not exit");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits up to `limit` for `child` to exit; past it the child is killed and the test fails
/// naming `what`.
pub fn wait_or_kill(child: &mut std::process::Child, limit: Duration, what: &str) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `vmm ARGS` to completion (10 s at most); returns (status, stderr).
pub fn run_to_end(args: &[&str]) -> (ExitStatus, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_or_kill(
        &mut child,
        Duration::from_secs(10),
        &format!("vmm {args:?}"),
    );
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status, err)
}

/// A QMP client on a raw socket.
pub struct Client {
    pub reader: BufReader<UnixStream>,
    pub writer: UnixStream,
    pub greeting: Value,
    /// Events seen while waiting for replies.
    pub events: Vec<Value>,
}

impl Client {
    pub fn new(s: UnixStream) -> Client {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let writer = s.try_clone().unwrap();
        let mut c = Client {
            reader: BufReader::new(s),
            writer,
            greeting: Value::Null,
            events: Vec::new(),
        };
        c.greeting = c.read_line_json();
        c
    }

    pub fn from_path(p: &Path) -> Client {
        Client::new(UnixStream::connect(p).unwrap())
    }

    /// Reads one raw line (with its line ending).
    pub fn read_raw_line(&mut self) -> String {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).unwrap();
        assert!(n > 0, "connection closed");
        line
    }

    pub fn read_line_json(&mut self) -> Value {
        let line = self.read_raw_line();
        assert!(line.ends_with("\r\n"), "not CRLF-terminated: {line:?}");
        assert!(line.is_ascii(), "not ASCII: {line:?}");
        serde_json::from_str(&line).unwrap()
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    /// Sends `bytes` with descriptor `fd` attached (`SCM_RIGHTS`), as a client passing a
    /// file for `getfd`/`add-fd` does.
    pub fn send_with_fd(&mut self, bytes: &[u8], fd: std::os::fd::RawFd) {
        send_with_fd(&self.writer, bytes, fd);
    }

    /// Runs `command` with `args`, passing descriptor `fd` with the request; the reply.
    pub fn cmd_with_fd(&mut self, command: &str, args: Value, fd: std::os::fd::RawFd) -> Value {
        let req = json!({"execute": command, "arguments": args}).to_string() + "\n";
        self.send_with_fd(req.as_bytes(), fd);
        self.recv()
    }

    /// Next message that is not an event (events are kept in `self.events`).
    pub fn recv(&mut self) -> Value {
        loop {
            let v = self.read_line_json();
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    /// Next event (first from those already seen).
    pub fn next_event(&mut self) -> Value {
        if !self.events.is_empty() {
            return self.events.remove(0);
        }
        let v = self.read_line_json();
        assert!(v.get("event").is_some(), "expected an event, got {v}");
        v
    }

    pub fn request(&mut self, raw: &str) -> Value {
        self.send_raw(raw.as_bytes());
        self.recv()
    }

    pub fn cmd(&mut self, name: &str, args: Value) -> Value {
        let req = if args.is_null() {
            json!({"execute": name})
        } else {
            json!({"execute": name, "arguments": args})
        };
        self.request(&req.to_string())
    }

    /// Runs a command that must succeed; returns its `return`.
    pub fn ok(&mut self, name: &str, args: Value) -> Value {
        let r = self.cmd(name, args);
        assert!(r.get("return").is_some(), "{name} failed: {r}");
        r["return"].clone()
    }

    /// Runs a command that must fail with `class`; returns its `desc`.
    pub fn err(&mut self, name: &str, args: Value, class: &str) -> String {
        let r = self.cmd(name, args);
        assert_eq!(r["error"]["class"], class, "{name}: {r}");
        r["error"]["desc"].as_str().unwrap().to_owned()
    }

    pub fn negotiate(&mut self) {
        assert_eq!(
            self.cmd("qmp_capabilities", Value::Null),
            json!({"return": {}})
        );
    }

    pub fn phase(&mut self) -> String {
        self.ok("query-phase", Value::Null)["phase"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub fn status(&mut self) -> String {
        self.ok("query-status", Value::Null)["status"]
            .as_str()
            .unwrap()
            .to_owned()
    }
}

/// The Debian reference guest of scripts/build-guest.sh (`$KEEL_GUEST_DIR`, else
/// `~/.cache/keel-guest/current`): its kernel and the initramfs named `initrd`
/// (`initramfs.cpio.gz`, or `initramfs-virtio.cpio.gz` with the virtio modules). `None`
/// where it is not built, after printing that the test skips; with `KEEL_REQUIRE_GUEST=1`
/// (CI) a missing guest fails the test instead.
pub fn debian_guest(initrd: &str) -> Option<(PathBuf, PathBuf)> {
    let dir = std::env::var_os("KEEL_GUEST_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/keel-guest/current"))
        })
        .unwrap_or_default();
    let kernel = ["vmlinux", "bzImage"]
        .iter()
        .map(|k| dir.join(k))
        .find(|p| p.is_file());
    let initrd = dir.join(initrd);
    match kernel {
        Some(k) if initrd.is_file() => Some((k, initrd)),
        _ => {
            assert!(
                std::env::var("KEEL_REQUIRE_GUEST").as_deref() != Ok("1"),
                "KEEL_REQUIRE_GUEST=1 but no guest in {} (run scripts/build-guest.sh)",
                dir.display()
            );
            eprintln!(
                "skipped: no guest in {} (run scripts/build-guest.sh or set KEEL_GUEST_DIR)",
                dir.display()
            );
            None
        }
    }
}

/// Sends `bytes` on `s` with descriptor `fd` attached (`SCM_RIGHTS`).
pub fn send_with_fd(s: &UnixStream, bytes: &[u8], fd: std::os::fd::RawFd) {
    use std::os::fd::AsRawFd;
    #[repr(C, align(8))]
    struct Control([u8; 64]);
    let mut control = Control([0; 64]);
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut _,
        iov_len: bytes.len(),
    };
    // SAFETY: one SCM_RIGHTS control message of one open descriptor, built in a buffer
    // large and aligned enough, sent with a valid iovec.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.0.as_mut_ptr().cast();
        let len = std::mem::size_of::<std::os::fd::RawFd>() as u32;
        msg.msg_controllen = libc::CMSG_SPACE(len) as usize;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(len) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<std::os::fd::RawFd>(), fd);
        assert_eq!(libc::sendmsg(s.as_raw_fd(), &msg, 0), bytes.len() as isize);
    }
}

/// The Debian guest's shell (`keel.mode=shell`) on a tcg microvm with the raw image `disk`
/// as its virtio disk and QMP on `sock`: what the snapshot and migration tests drive. Its
/// console output is collected in `out`; commands go to the shell through `type_line`.
pub struct ShellVm {
    pub guard: Guard,
    pub out: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl ShellVm {
    /// Starts the VMM with `extra` options after the machine's (`-incoming ...`).
    pub fn start(kernel: &Path, initrd: &Path, disk: &Path, sock: &Path, extra: &[String]) -> Self {
        Self::start_on(
            "microvm",
            "virtio-blk-device",
            kernel,
            initrd,
            disk,
            sock,
            extra,
        )
    }

    /// As [`ShellVm::start`] on machine type `machine` with the disk on a `disk_device`
    /// (`virtio-blk-pci` on `pc`).
    pub fn start_on(
        machine: &str,
        disk_device: &str,
        kernel: &Path,
        initrd: &Path,
        disk: &Path,
        sock: &Path,
        extra: &[String],
    ) -> Self {
        let drive = format!("file={},if=none,id=d0,format=raw", disk.display());
        let mut c = Command::new(BIN);
        c.args([
            "-qmp",
            &format!("unix:{},server=on,wait=off", sock.display()),
        ]);
        c.args(["-M", machine, "-accel", "tcg", "-m", "256M", "-nodefaults"]);
        c.args(["-no-reboot", "-serial", "stdio", "-append"]);
        c.arg("console=ttyS0 quiet keel.mode=shell");
        c.arg("-kernel").arg(kernel).arg("-initrd").arg(initrd);
        c.args([
            "-drive",
            &drive,
            "-device",
            &format!("{disk_device},drive=d0"),
        ]);
        c.args(extra);
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut stdout = child.stdout.take().unwrap();
        let o = out.clone();
        std::thread::spawn(move || {
            let mut b = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut b) {
                if n == 0 {
                    break;
                }
                o.lock().unwrap().extend_from_slice(&b[..n]);
            }
        });
        ShellVm {
            guard: Guard(child),
            out,
        }
    }

    /// Types `line` (with its newline) into the guest's shell.
    pub fn type_line(&mut self, line: &[u8]) {
        let stdin = self.guard.0.stdin.as_mut().unwrap();
        stdin.write_all(line).unwrap();
        stdin.flush().unwrap();
    }

    /// The console output once it contains `what` (five minutes at most).
    pub fn wait_for(&self, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let text = String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned();
            if text.contains(what) {
                return text;
            }
            assert!(Instant::now() < deadline, "no '{what}' in:\n{text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A negotiated QMP client on the socket at `p`, once it accepts (30 s at most).
pub fn qmp_at(p: &Path) -> Client {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = UnixStream::connect(p) {
            let mut c = Client::new(s);
            c.negotiate();
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "no QMP socket at {}",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether the kvm half of a test can run: `/dev/kvm` opens read-write and
/// `KEEL_TEST_NO_KVM` is unset. Otherwise prints why the kvm cases are skipped.
pub fn kvm_usable() -> bool {
    if std::env::var_os("KEEL_TEST_NO_KVM").is_some() {
        eprintln!("skipping kvm: KEEL_TEST_NO_KVM is set");
        return false;
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipping kvm: /dev/kvm: {e}");
            false
        }
    }
}

/// A keel-testguest guest written as a PVH ELF into a directory of its own (what `-kernel`
/// boots), with the serial output an uninterrupted run prints.
pub struct PvhGuest {
    /// Where the kernel is (and where a test may put its streams and sockets).
    pub dir: TempDir,
    /// The kernel's path.
    pub kernel: String,
    /// What the guest prints on its serial port from start to end.
    pub want: String,
}

impl PvhGuest {
    /// Writes `g` (a guest that states its serial output).
    pub fn new(g: keel_testguest::TestGuest) -> Self {
        let dir = TempDir::new();
        let kernel = dir.path("guest.elf");
        std::fs::write(&kernel, g.pvh_elf()).unwrap();
        Self {
            kernel: kernel.display().to_string(),
            want: g.expected_serial.unwrap(),
            dir,
        }
    }
}
