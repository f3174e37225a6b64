//! The `vmm` binary: QEMU's command line onto Keel's lifecycle, then QMP until `quit` or a
//! signal.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use vmm::cli::{self, Action, Invocation};
use vmm::{GuestExitPolicy, ShutdownCause, Vmm};

/// Blocks SIGINT/SIGTERM/SIGHUP in this thread (and so in every thread spawned later) and
/// returns the set, for a dedicated thread to `sigwait` on.
fn block_shutdown_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before any other use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, exclusively borrowed sigset_t for each call; the signal
    // numbers are valid; a null old-set pointer is allowed by pthread_sigmask.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    set
}

fn wait_for_signal(set: libc::sigset_t) -> i32 {
    let mut sig: libc::c_int = 0;
    loop {
        // SAFETY: `set` and `sig` are valid for the call; sigwait only writes `sig`.
        let r = unsafe { libc::sigwait(&set, &mut sig) };
        if r == 0 {
            return sig;
        }
    }
}

/// The binary's one log sink: library crates log through `log`, this prints to stderr.
///
/// A quiet, successful run prints nothing (as QEMU's does): by default only warnings and
/// errors pass, as `vmm: message`. `KEEL_LOG=info|debug|trace` (or `off`) changes the level;
/// above `warn` each line also names its level and module.
struct StderrLogger {
    level: log::LevelFilter,
}

impl log::Log for StderrLogger {
    fn enabled(&self, meta: &log::Metadata<'_>) -> bool {
        meta.level() <= self.level
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut err = std::io::stderr().lock();
        // A closed stderr has nowhere to report to.
        let _ = if self.level > log::LevelFilter::Warn {
            writeln!(
                err,
                "{}vmm: {} {}: {}",
                stamp(),
                record.level(),
                record.target(),
                record.args()
            )
        } else {
            writeln!(err, "{}vmm: {}", stamp(), record.args())
        };
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

/// `-msg timestamp=on` was given: error lines start with the time, as QEMU's.
static MSG_TIMESTAMP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The prefix of an error line: the time under `-msg timestamp=on`, else nothing.
fn stamp() -> String {
    if MSG_TIMESTAMP.load(std::sync::atomic::Ordering::Relaxed) {
        vmm::cli::timestamp_prefix()
    } else {
        String::new()
    }
}

/// An error line on standard error: `[TIME ]vmm: MESSAGE`.
macro_rules! report {
    ($($t:tt)*) => { eprintln!("{}vmm: {}", stamp(), format_args!($($t)*)) };
}

fn install_logger() {
    let level = std::env::var("KEEL_LOG")
        .ok()
        .and_then(|v| v.parse::<log::LevelFilter>().ok())
        .unwrap_or(log::LevelFilter::Warn);
    let logger = Box::leak(Box::new(StderrLogger { level }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}

/// The pid file this process wrote (`-pidfile`), removed when the process exits, as QEMU.
static PIDFILE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

extern "C" fn remove_pidfile() {
    if let Some(p) = PIDFILE.get() {
        let _ = std::fs::remove_file(p);
    }
}

/// Writes the pid file; it is removed at exit.
fn write_pidfile(path: &std::path::Path) -> std::io::Result<()> {
    std::fs::write(path, format!("{}\n", std::process::id()))?;
    if PIDFILE.set(path.to_owned()).is_ok() {
        // SAFETY: registers a plain `extern "C"` function without arguments; it only reads
        // a OnceLock and removes a file.
        unsafe { libc::atexit(remove_pidfile) };
    }
    Ok(())
}

/// `-daemonize`, first half: forks before any thread exists. The parent waits until the
/// child says the command line ran (its monitors listen, the pid file is written) and exits 0,
/// or exits 1 if the child fails first; the child goes on in a new session and returns the
/// pipe end to report on.
fn daemonize() -> Result<std::fs::File, String> {
    use std::io::Read;
    use std::os::fd::FromRawFd;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!(
            "cannot daemonize: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: the process is single-threaded here (nothing has been spawned yet), so the
    // child may run arbitrary code after fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!(
            "cannot daemonize: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: both descriptors came from pipe2 above and are owned by nothing else; each
    // side closes the end it does not use.
    let (read_end, write_end) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    if pid > 0 {
        drop(write_end);
        let mut status = [1u8];
        let ok = matches!((&read_end).read(&mut status), Ok(1)) && status[0] == 0;
        std::process::exit(if ok { 0 } else { 1 });
    }
    drop(read_end);
    // SAFETY: setsid has no memory effects; failure (already a group leader) is harmless.
    unsafe { libc::setsid() };
    Ok(write_end)
}

/// `-daemonize`, second half: tells the waiting parent that the VMM is up, and detaches
/// standard input and output from the terminal (errors keep going to standard error until
/// then, so the user sees why a start failed).
fn daemon_ready(mut pipe: std::fs::File) {
    let _ = pipe.write_all(&[0]);
    drop(pipe);
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        use std::os::fd::AsRawFd;
        for fd in [0, 1, 2] {
            // SAFETY: dup2 onto the standard descriptors with a valid open file; no memory
            // is involved.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

/// `-device help` / `-device DRIVER,help` anywhere on the line: QEMU answers it before
/// anything else runs, and so does Keel. Returns the exit status when it was asked.
fn device_help(args: &[String]) -> Option<ExitCode> {
    let pos = args
        .windows(2)
        .position(|w| matches!(w[0].as_str(), "-device" | "--device") && is_help(&w[1]))?;
    let arg = &args[pos + 1];
    let types = vmm::device_types::offered();
    let driver = arg.rsplit_once(',').map(|(d, _)| d);
    let text = match driver {
        None => Ok(types.device_help()),
        Some(d) => types.device_props_help(d),
    };
    Some(match text {
        Ok(t) => {
            print!("{t}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vmm: -device {arg}: {e}");
            ExitCode::from(1)
        }
    })
}

fn is_help(v: &str) -> bool {
    let last = v.rsplit(',').next().unwrap_or(v);
    matches!(last, "help" | "?")
}

fn main() -> ExitCode {
    install_logger();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(code) = device_help(&args) {
        return code;
    }
    let steps = match cli::parse(&args) {
        Err(e) => {
            report!("{e}");
            return ExitCode::from(1);
        }
        Ok(Invocation::Help) => {
            print!("{}", cli::HELP);
            return ExitCode::SUCCESS;
        }
        Ok(Invocation::Version) => {
            let (a, b, c) = vmm::commands::QEMU_DIALECT;
            println!(
                "vmm (keel) {}\nQMP dialect of QEMU {a}.{b}.{c}",
                env!("CARGO_PKG_VERSION")
            );
            return ExitCode::SUCCESS;
        }
        Ok(Invocation::ListMachines) => {
            let vmm = Vmm::new();
            println!("Supported machines are:");
            if let Ok(list) = vmm.execute(vmm::commands::QueryMachines {}) {
                for m in list {
                    let default = if m.is_default { " (default)" } else { "" };
                    println!("{:<20} {}{default}", m.name, m.description);
                }
            }
            return ExitCode::SUCCESS;
        }
        Ok(Invocation::ListAccels) => {
            let vmm = Vmm::new();
            println!("Accelerators supported in QEMU binary:");
            if let Ok(list) = vmm.execute(vmm::commands::QueryAccels {}) {
                for a in list {
                    match a.reason {
                        None => println!("{}", a.name),
                        Some(r) => println!("{} (unavailable: {r})", a.name),
                    }
                }
            }
            return ExitCode::SUCCESS;
        }
        Ok(Invocation::Run(steps)) => steps,
    };

    if steps
        .iter()
        .any(|s| matches!(s.action, Action::MsgTimestamp))
    {
        MSG_TIMESTAMP.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let pidfile = steps.iter().rev().find_map(|s| match &s.action {
        Action::PidFile(p) => Some(p.clone()),
        _ => None,
    });
    let daemon = if steps.iter().any(|s| matches!(s.action, Action::Daemonize)) {
        match daemonize() {
            Ok(pipe) => Some(pipe),
            Err(e) => {
                report!("{e}");
                return ExitCode::from(1);
            }
        }
    } else {
        None
    };

    let signals = block_shutdown_signals();
    let vmm = Vmm::new();
    // As QEMU: a guest write to isa-debug-exit ends the process there and then.
    vmm.set_guest_exit_policy(GuestExitPolicy::ExitProcess);
    {
        let vmm = vmm.clone();
        let spawned = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let sig = wait_for_signal(signals);
                report!("terminating on signal {sig}");
                vmm.request_shutdown(ShutdownCause::HostSignal);
            });
        if let Err(e) = spawned {
            report!("cannot start the signal thread: {e}");
            return ExitCode::from(1);
        }
    }

    if let Err(e) = cli::execute(&vmm, &steps) {
        report!("{e}");
        vmm.close_monitors(Duration::ZERO);
        return ExitCode::from(1);
    }
    if let Some(p) = &pidfile
        && let Err(e) = write_pidfile(p)
    {
        report!("cannot write pid file {}: {e}", p.display());
        vmm.close_monitors(Duration::ZERO);
        return ExitCode::from(1);
    }
    if let Some(pipe) = daemon {
        daemon_ready(pipe);
    }
    vmm.wait_for_shutdown();
    vmm.close_monitors(Duration::from_secs(1));
    // As QEMU's exit(): only the low 8 bits of isa-debug-exit's (value << 1) | 1 survive.
    ExitCode::from((vmm.exit_status() & 0xff) as u8)
}
