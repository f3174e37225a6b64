//! Each thread class's filter, installed for real: a thread of the class first does what
//! its kind does (allowed), then one call its kind never makes; the process must stop with
//! the report naming the class and the call, and status 159.
//!
//! A filter cannot be removed, so each case runs in a child process: this test binary again,
//! told by an environment variable which case to play (test code only, nothing in the
//! library reads it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::{Command, Output};

use keel_sandbox::{FORBIDDEN_SYSCALL_STATUS, Policy, SandboxOptions, ThreadClass};

const CASE: &str = "KEEL_SANDBOX_TEST_CASE";

fn run_case(case: &str) -> Output {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_case", "--nocapture", "--test-threads=1"])
        .env(CASE, case)
        .output()
        .unwrap()
}

fn say(s: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{s}").unwrap();
    out.flush().unwrap();
}

/// What a thread of each class does in Keel, then the forbidden call.
fn play(case: &str) {
    keel_sandbox::set_no_new_privs().unwrap();
    let opts = if case == "main-spawn-allowed" {
        SandboxOptions::parse("on,spawn=allow").unwrap()
    } else {
        SandboxOptions::default()
    };
    keel_sandbox::set_process_policy(Policy::new(&opts, false).unwrap()).unwrap();
    keel_sandbox::enter(ThreadClass::Main);
    // The baseline: open a file, make an eventfd, start a thread.
    let file = std::fs::File::open("/proc/self/status").unwrap();
    drop(file);
    // SAFETY: eventfd with integer arguments.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(efd >= 0);
    let class = match case {
        "main" | "main-clone3" | "main-spawn-allowed" => ThreadClass::Main,
        "vcpu" | "vcpu-write-open" | "vcpu-spawns" => ThreadClass::Vcpu,
        "worker" => ThreadClass::Worker,
        "monitor" => ThreadClass::Monitor,
        other => panic!("unknown case {other}"),
    };
    let case = case.to_owned();
    // The monitor is handed its sockets by the main class.
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || {
        keel_sandbox::enter(class);
        // Allowed in every class: memory, futexes, eventfd writes, time.
        let v: Vec<u8> = vec![7; 1 << 20];
        assert_eq!(v[12345], 7);
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
        let n = unsafe { libc::write(efd, (&1u64 as *const u64).cast(), 8) };
        assert_eq!(n, 8);
        std::thread::sleep(std::time::Duration::from_millis(1));
        match case.as_str() {
            "main" => {
                let s = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                drop(s);
                say("ALLOWED-DONE");
                // SAFETY: fork through the raw call; the filter stops it before the kernel
                // runs it.
                unsafe { libc::syscall(libc::SYS_fork) };
            }
            "main-spawn-allowed" => {
                // SAFETY: the child only calls _exit; the parent waits for it.
                let pid = unsafe { libc::fork() };
                if pid == 0 {
                    // SAFETY: ends the forked child at once.
                    unsafe { libc::_exit(7) };
                }
                let mut status = 0;
                // SAFETY: waits for our own child with a valid status pointer.
                let r = unsafe { libc::waitpid(pid, &mut status, 0) };
                assert_eq!(r, pid);
                assert_eq!(libc::WEXITSTATUS(status), 7);
                say("FORKED");
            }
            "main-clone3" => {
                // SAFETY: clone3 with a null argument: the ENOSYS filter answers first.
                let r = unsafe { libc::syscall(libc::SYS_clone3, 0usize, 0usize) };
                let e = std::io::Error::last_os_error().raw_os_error();
                assert_eq!((r, e), (-1, Some(libc::ENOSYS)));
                say("CLONE3-ENOSYS");
            }
            "vcpu" => {
                let cpus = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
                assert!(!cpus.is_empty());
                say("ALLOWED-DONE");
                // SAFETY: socket with integer arguments.
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            }
            "vcpu-write-open" => {
                say("ALLOWED-DONE");
                let _ = std::fs::OpenOptions::new()
                    .append(true)
                    .open("/tmp/keel-sandbox-test-should-not-open");
            }
            "vcpu-spawns" => {
                // The RTC's timer thread is started by a vCPU.
                std::thread::spawn(|| say("GRANDCHILD-RAN")).join().unwrap();
                say("ALLOWED-DONE");
            }
            "worker" => {
                let mut buf = [0u8; 8];
                // SAFETY: reads 8 bytes into our buffer from our eventfd.
                let n = unsafe { libc::read(efd, buf.as_mut_ptr().cast(), 8) };
                assert_eq!(n, 8);
                say("ALLOWED-DONE");
                // SAFETY: FIONBIO on our eventfd with a valid int.
                unsafe { libc::ioctl(efd, libc::FIONBIO, &1i32) };
            }
            "monitor" => {
                (&a).write_all(b"{}").unwrap();
                a.set_nonblocking(true).unwrap();
                assert!(b.as_raw_fd() >= 0);
                say("ALLOWED-DONE");
                let _ = std::fs::File::open("/etc/hostname");
            }
            _ => unreachable!(),
        }
    });
    t.join().unwrap();
    say("CASE-RETURNED");
}

#[test]
fn child_case() {
    if let Ok(case) = std::env::var(CASE) {
        play(&case);
    }
}

fn assert_stopped(case: &str, class: &str, call: &str) {
    let out = run_case(case);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("ALLOWED-DONE"),
        "{case}: {stdout}\n{stderr}"
    );
    assert!(!stdout.contains("CASE-RETURNED"), "{case}: {stdout}");
    let want = format!("vmm: seccomp: thread {class} made forbidden syscall {call} ");
    assert!(stderr.contains(&want), "{case}: want {want:?} in\n{stderr}");
    assert_eq!(
        out.status.code(),
        Some(FORBIDDEN_SYSCALL_STATUS),
        "{case}: {stderr}"
    );
}

#[test]
fn main_may_open_and_listen_but_not_fork() {
    assert_stopped("main", "main", "fork");
}

#[test]
fn vcpu_may_read_sysfs_but_not_make_a_socket() {
    assert_stopped("vcpu", "vcpu", "socket");
}

#[test]
fn vcpu_may_not_open_for_writing() {
    assert_stopped("vcpu-write-open", "vcpu", "openat");
}

#[test]
fn worker_may_read_eventfds_but_not_ioctl() {
    assert_stopped("worker", "worker", "ioctl");
}

#[test]
fn monitor_may_use_sockets_but_not_open_files() {
    assert_stopped("monitor", "monitor", "openat");
}

#[test]
fn clone3_is_answered_enosys_and_threads_still_start() {
    let out = run_case("main-clone3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("CLONE3-ENOSYS"), "{out:?}");
    assert!(out.status.success(), "{out:?}");
    let out = run_case("vcpu-spawns");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("GRANDCHILD-RAN"), "{out:?}");
    assert!(stdout.contains("CASE-RETURNED"), "{out:?}");
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn spawn_allow_lets_the_main_class_fork() {
    let out = run_case("main-spawn-allowed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("FORKED"), "{out:?}");
    assert!(out.status.success(), "{out:?}");
}
