//! QMP under abuse, against the real binary: an oversized message, clients that never
//! read, a malformed-input flood, a bind that fails, and descriptors that must not leak
//! into children. Memory is measured as the process's VmRSS (a resource assertion, not a
//! timing one); the disconnections are also checked in the log.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{Client, Vmm, run_to_end};
use serde_json::Value;

/// The process's resident set, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// Writes `chunk` up to `times` times; returns the bytes written once the server hangs up.
fn write_until_gone(w: &mut UnixStream, chunk: &[u8], times: usize) -> usize {
    let mut sent = 0;
    for _ in 0..times {
        match w.write_all(chunk) {
            Ok(()) => sent += chunk.len(),
            Err(e) if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) => {
                return sent;
            }
            Err(e) => panic!("write: {e}"),
        }
    }
    panic!("the server never hung up ({sent} bytes written)");
}

/// Reads to the end of the stream; returns the byte count.
fn read_to_eof(s: &mut UnixStream) -> usize {
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return total,
            Ok(n) => total += n,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return total,
            Err(e) => panic!("not disconnected: {e}"),
        }
    }
}

fn negotiated(vmm: &mut Vmm) -> UnixStream {
    let c = vmm.qmp();
    let s = c.writer.try_clone().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
    s
}

/// Ends the VMM with `quit` and returns what it logged.
fn quit_and_log(mut vmm: Vmm) -> String {
    let mut c = vmm.qmp();
    c.ok("quit", Value::Null);
    vmm.wait();
    let mut log = String::new();
    vmm.child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    log
}

#[test]
fn a_hundred_megabyte_message_is_refused_in_bounded_memory() {
    let mut vmm = Vmm::start_none(&[]);
    let mut good = vmm.qmp();
    let before = rss(vmm.child.id());
    let mut s = negotiated(&mut vmm);
    s.write_all(b"{\"execute\": \"query-status\", \"arguments\": {\"x\": \"")
        .unwrap();
    let sent = write_until_gone(&mut s, &[b'a'; 64 << 10], 1600);
    assert!(sent < 100 << 20, "all of it was read");
    let after = rss(vmm.child.id());
    // The server hung up with our input unread: the reply, then the end (or a reset).
    let mut rest = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => rest.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("not disconnected: {e}"),
        }
    }
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains("JSON token size limit exceeded"), "{rest:?}");
    assert!(
        after < before + (80 << 20),
        "VmRSS grew from {before} to {after}"
    );
    assert_eq!(good.status(), "running");
    let log = quit_and_log(vmm);
    assert!(
        log.contains("disconnected: JSON token size limit exceeded"),
        "{log}"
    );
}

#[test]
fn sixteen_clients_that_never_read_are_disconnected_in_bounded_memory() {
    let mut vmm = Vmm::start_none(&[]);
    let mut good = vmm.qmp();
    let before = rss(vmm.child.id());
    let writers: Vec<_> = (0..16)
        .map(|_| {
            let mut s = negotiated(&mut vmm);
            std::thread::spawn(move || {
                // query-qmp-schema answers with the whole schema; nothing is read.
                write_until_gone(&mut s, b"{\"execute\": \"query-qmp-schema\"}", 1 << 20);
                s
            })
        })
        .collect();
    // A well-behaved client is served meanwhile.
    for _ in 0..200 {
        assert_eq!(good.status(), "running");
    }
    let mut peak = 0;
    let mut socks = Vec::new();
    for w in writers {
        socks.push(w.join().unwrap());
        peak = peak.max(rss(vmm.child.id()));
    }
    for s in &mut socks {
        read_to_eof(s);
    }
    assert!(
        peak < before + (80 << 20),
        "VmRSS grew from {before} to {peak}"
    );
    assert_eq!(good.status(), "running");
    let log = quit_and_log(vmm);
    let dropped = log.matches("disconnected:").count();
    assert!(dropped >= 16, "{log}");
    assert!(
        log.contains("not reading") || log.contains("over its budget"),
        "{log}"
    );
}

#[test]
fn a_malformed_flood_gets_bounded_output() {
    let mut vmm = Vmm::start_none(&[]);
    let mut s = negotiated(&mut vmm);
    let mut r = s.try_clone().unwrap();
    let reader = std::thread::spawn(move || read_to_eof(&mut r));
    // 5 MiB of stray ']', each one an error in QEMU (75 bytes of reply per byte).
    let sent = write_until_gone(&mut s, &[b']'; 64 << 10], 80);
    let got = reader.join().unwrap();
    assert!(got < 1 << 20, "{got} bytes of errors for {sent} bytes");
    let mut good = vmm.qmp();
    assert_eq!(good.status(), "running");
    let log = quit_and_log(vmm);
    assert!(log.contains("disconnected: malformed input"), "{log}");
}

#[test]
fn a_failed_bind_says_what_and_why() {
    let (status, err) = run_to_end(&[
        "-machine",
        "none",
        "-qmp",
        "unix:/nonexistent-keel-dir/qmp.sock,server=on,wait=off",
    ]);
    assert!(!status.success());
    assert!(err.contains("/nonexistent-keel-dir/qmp.sock"), "{err}");
    assert!(err.contains("No such file or directory"), "{err}");
}

/// The flags of descriptor `fd` of process `pid` ("self" for this one) and its target.
fn fd_flags(pid: &str, fd: &str) -> Option<(u32, String)> {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())?;
    let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
    Some((flags, target.display().to_string()))
}

#[test]
fn every_descriptor_is_close_on_exec() {
    const O_CLOEXEC: u32 = 0o2_000_000;
    let mut vmm = Vmm::start_none(&[]);
    let _clients: Vec<Client> = (0..3).map(|_| vmm.qmp()).collect();
    let pid = vmm.child.id().to_string();
    let mut leaks = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap() {
        let fd = e.unwrap().file_name().to_string_lossy().into_owned();
        if fd.parse::<i32>().unwrap() <= 2 {
            continue;
        }
        let Some((flags, target)) = fd_flags(&pid, &fd) else {
            continue;
        };
        // Descriptors this test process passed on (the harness's own, e.g. a jobserver
        // pipe) are inherited, not opened by Keel.
        let inherited =
            fd_flags("self", &fd).is_some_and(|(f, t)| f & O_CLOEXEC == 0 && t == target);
        if flags & O_CLOEXEC == 0 && !inherited {
            leaks.push(format!("{fd} -> {target}"));
        }
    }
    assert!(leaks.is_empty(), "not close-on-exec: {leaks:?}");
}
