//! QMP latency and throughput, Keel's `vmm` against QEMU in the same run.
//!
//! For each binary, started as `BIN -machine none -nodefaults -display none -qmp
//! unix:SOCK,server=on,wait=off`, it measures
//! * process start → QMP greeting line received (connecting as soon as the socket accepts);
//! * sequential `query-status` round trips per second after `qmp_capabilities`
//!   (one request in flight, raw socket, same client code for both).
//!
//! Medians over the runs are printed, then the ratios. QEMU is measured if
//! `qemu-system-x86_64` (or `$QEMU`) runs. `KEEL_BENCH_RUNS` (default 15) and
//! `KEEL_BENCH_ROUNDTRIPS` (default 20000) scale the work.
//!
//! Run: `cargo bench --bench qmp`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Sample {
    greeting: Duration,
    round_trips_per_sec: f64,
}

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn start(bin: &str, sock: &Path) -> Child {
    let _ = std::fs::remove_file(sock);
    Command::new(bin)
        .args([
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"))
}

fn read_reply(r: &mut BufReader<UnixStream>, line: &mut String) {
    loop {
        line.clear();
        let n = r.read_line(line).unwrap();
        assert!(n > 0, "connection closed");
        if !line.contains("\"event\"") {
            return;
        }
    }
}

fn measure(bin: &str, sock: &Path, round_trips: usize) -> Sample {
    let t0 = Instant::now();
    let mut child = start(bin, sock);
    let stream = loop {
        match UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(_) => {
                if let Some(st) = child.try_wait().unwrap() {
                    panic!("{bin} exited with {st} before accepting");
                }
                assert!(t0.elapsed() < Duration::from_secs(20), "{bin}: no socket");
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let greeting = t0.elapsed();
    assert!(line.starts_with("{\"QMP\""), "{bin}: {line}");

    w.write_all(b"{\"execute\": \"qmp_capabilities\"}\n")
        .unwrap();
    read_reply(&mut r, &mut line);
    let req = b"{\"execute\": \"query-status\"}\n";
    let t1 = Instant::now();
    for _ in 0..round_trips {
        w.write_all(req).unwrap();
        read_reply(&mut r, &mut line);
        debug_assert!(line.contains("\"return\""));
    }
    let round_trips_per_sec = round_trips as f64 / t1.elapsed().as_secs_f64();
    assert!(line.contains("\"status\""), "{bin}: {line}");

    w.write_all(b"{\"execute\": \"quit\"}\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = child.wait();
    let _ = std::fs::remove_file(sock);
    Sample {
        greeting,
        round_trips_per_sec,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn bench(name: &str, bin: &str, dir: &Path, runs: usize, round_trips: usize) -> (f64, f64) {
    let sock: PathBuf = dir.join(format!("{name}.sock"));
    // One warm-up run (page cache, dynamic loader).
    measure(bin, &sock, 100);
    let samples: Vec<Sample> = (0..runs)
        .map(|_| measure(bin, &sock, round_trips))
        .collect();
    let g = median(
        samples
            .iter()
            .map(|s| s.greeting.as_secs_f64() * 1e3)
            .collect(),
    );
    let rt = median(samples.iter().map(|s| s.round_trips_per_sec).collect());
    println!(
        "{name:<6} start->greeting median {g:8.3} ms   query-status {rt:10.0} round trips/s   ({runs} runs, {round_trips} round trips each)"
    );
    (g, rt)
}

fn main() {
    let runs = env_num("KEEL_BENCH_RUNS", 15).max(1);
    let round_trips = env_num("KEEL_BENCH_ROUNDTRIPS", 20000).max(1);
    let dir = std::env::temp_dir().join(format!("keel-qmp-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let keel = bench("keel", env!("CARGO_BIN_EXE_vmm"), &dir, runs, round_trips);
    let qemu_bin = std::env::var("QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    let have_qemu = Command::new(&qemu_bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if have_qemu {
        let qemu = bench("qemu", &qemu_bin, &dir, runs, round_trips);
        println!(
            "ratio  greeting keel/qemu = {:.3} (target <= 0.1)   query-status keel/qemu = {:.2}x (target >= 3)",
            keel.0 / qemu.0,
            keel.1 / qemu.1
        );
    } else {
        println!("qemu   {qemu_bin} not found: no comparison");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
