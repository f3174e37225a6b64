//! The human monitor on a socket (`-monitor unix:PATH,server=on,wait=off`) and on stdio
//! (`-monitor stdio`): QEMU's banner and prompt, each command's answer. The socket
//! conversation is held with QEMU 7.2 too where it is installed, and the answers compared
//! (QEMU redraws its line after each keystroke; only the text between the echoed command
//! and the next prompt is compared).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SCRIPT: &[&str] = &[
    "info status",
    "info name",
    "nosuch",
    "stop",
    "info status",
    "quit",
];

fn start(bin: &str, sock: &std::path::Path) -> Child {
    let mon = format!("unix:{},server=on,wait=off", sock.display());
    Command::new(bin)
        .args([
            "-M",
            "pc",
            "-S",
            "-display",
            "none",
            "-nodefaults",
            "-name",
            "hmp-test",
        ])
        .args(["-monitor", &mon])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Sends the script one line at a time, each after the previous prompt; returns the raw
/// conversation.
fn converse(sock: &std::path::Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut s = loop {
        match UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < deadline, "{}: {e}", sock.display());
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    for (prompts, line) in SCRIPT.iter().enumerate() {
        while text.windows(7).filter(|w| w == b"(qemu) ").count() <= prompts {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&text));
            text.extend_from_slice(&buf[..n]);
        }
        s.write_all(format!("{line}\r\n").as_bytes()).unwrap();
    }
    // After quit the monitor closes.
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        text.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&text).into_owned()
}

/// The banner with the version's digits hidden, then each answer.
fn answers(text: &str) -> Vec<String> {
    let mut parts = text.split("(qemu) ");
    let banner: String = parts
        .next()
        .unwrap()
        .chars()
        .map(|c| if c.is_ascii_digit() { '#' } else { c })
        .collect();
    let mut out = vec![banner.replace("#.#.##", "#.#.#")];
    for p in parts {
        out.push(
            p.split_once("\r\n")
                .map(|(_, a)| a.to_owned())
                .unwrap_or_default(),
        );
    }
    out
}

#[test]
fn hmp_on_a_socket_answers_as_qemu() {
    let dir = common::TempDir::new();
    let sock = dir.path("hmp.sock");
    let mut vmm = common::Guard(start(common::BIN, &sock));
    let keel = converse(&sock);
    assert!(vmm.wait().success());
    let ours = answers(&keel);
    assert_eq!(
        ours,
        // Each line ends in "\r\n", which QEMU's readline takes as two Enters: every
        // answer is followed by the empty line's prompt.
        [
            "QEMU #.#.# monitor - type 'help' for more information\r\n",
            "VM status: paused (prelaunch)\r\n",
            "",
            "hmp-test\r\n",
            "",
            "unknown command: 'nosuch'\r\n",
            "",
            "",
            "",
            // `stop` before the first `cont` leaves the machine in prelaunch.
            "VM status: paused (prelaunch)\r\n",
            "",
            "",
        ],
        "{keel:?}"
    );
    let qemu = std::env::var("KEEL_COMPAT_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    if Command::new(&qemu).arg("-version").output().is_err() {
        eprintln!("skipped the comparison: {qemu} is not installed");
        return;
    }
    let qsock = dir.path("qemu-hmp.sock");
    let mut q = common::Guard(start(&qemu, &qsock));
    let theirs = answers(&converse(&qsock));
    q.wait();
    assert_eq!(ours, theirs);
}

#[test]
fn hmp_on_stdio_takes_stdio_from_the_serial_port() {
    let mut child = Command::new(common::BIN)
        .args([
            "-M", "microvm", "-S", "-display", "none", "-monitor", "stdio",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"info status\nquit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "QEMU 7.2.0 monitor - type 'help' for more information\r\n(qemu) info status\r\n\
         VM status: paused (prelaunch)\r\n(qemu) quit\r\n"
    );
    let (st, err) = common::run_to_end(&["-monitor", "stdio", "-serial", "stdio"]);
    assert_eq!(st.code(), Some(1));
    assert_eq!(
        err,
        "vmm: -serial stdio: cannot use stdio by multiple character devices\n"
    );
}
