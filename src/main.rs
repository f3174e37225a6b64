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
        if let Some(file) = GUEST_LOG.get()
            && record.level() <= log::Level::Warn
            && GUEST_LOG_TARGETS
                .iter()
                .any(|t| record.target().starts_with(t))
        {
            let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(f, "{}", record.args());
            return;
        }
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

/// `-d guest_errors|unimp -D FILE`: where the device models' warnings about the guest go.
static GUEST_LOG: std::sync::OnceLock<std::sync::Mutex<std::fs::File>> = std::sync::OnceLock::new();

/// The crates whose warnings are about what the guest did (QEMU's `guest_errors` and
/// `unimp` log items).
const GUEST_LOG_TARGETS: &[&str] = &["keel_devices", "keel_virtio", "keel_pci", "keel_tcg"];

/// Opens the `-D` file when `-d` asks for guest errors (QEMU opens it, truncated, at
/// start-up and fails if it cannot).
fn open_guest_log(steps: &[cli::Step]) -> Result<(), String> {
    let items = steps.iter().any(|s| {
        matches!(&s.action, Action::LogItems(i)
            if i.iter().any(|i| i == "guest_errors" || i == "unimp"))
    });
    let file = steps.iter().rev().find_map(|s| match &s.action {
        Action::LogFile(p) => Some(p.clone()),
        _ => None,
    });
    if let (true, Some(p)) = (items, file) {
        let f = std::fs::File::create(&p)
            .map_err(|e| format!("Error opening logfile {}: {e}", p.display()))?;
        let _ = GUEST_LOG.set(std::sync::Mutex::new(f));
    }
    Ok(())
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

/// Asks the `pidfile` thread to remove the pid file and waits for it (a second at most).
/// `exit` may run on a vCPU thread (isa-debug-exit), whose seccomp filter does not allow
/// `unlink`; the `pidfile` thread has the main class's.
static PIDFILE_REMOVER: std::sync::OnceLock<
    std::sync::Mutex<std::sync::mpsc::Sender<std::sync::mpsc::SyncSender<()>>>,
> = std::sync::OnceLock::new();

/// Whether the process is exiting: the pid file is then not written any more (held while
/// it is written, so that a removal never comes between the write and its end).
static PIDFILE_EXITING: std::sync::Mutex<bool> = std::sync::Mutex::new(false);

extern "C" fn remove_pidfile() {
    if let Some(tx) = PIDFILE_REMOVER.get() {
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        let sent = tx.lock().map(|t| t.send(done).is_ok()).unwrap_or(false);
        if sent {
            let _ = wait.recv_timeout(Duration::from_secs(1));
        }
    }
}

/// Writes the pid file (into `opened` if it was opened before the process changed its
/// user); it is removed at exit, as QEMU does, even by an exit that comes first.
fn write_pidfile(path: &std::path::Path, opened: Option<std::fs::File>) -> std::io::Result<()> {
    let (tx, rx) = std::sync::mpsc::channel::<std::sync::mpsc::SyncSender<()>>();
    let remove = path.to_owned();
    std::thread::Builder::new()
        .name("pidfile".into())
        .spawn(move || {
            if let Ok(done) = rx.recv() {
                let mut exiting = PIDFILE_EXITING.lock().unwrap_or_else(|p| p.into_inner());
                *exiting = true;
                let _ = std::fs::remove_file(&remove);
                let _ = done.send(());
            }
        })?;
    if PIDFILE_REMOVER.set(std::sync::Mutex::new(tx)).is_ok() {
        // SAFETY: registers a plain `extern "C"` function without arguments; it only sends
        // on a channel and waits for the answer.
        unsafe { libc::atexit(remove_pidfile) };
    }
    let exiting = PIDFILE_EXITING.lock().unwrap_or_else(|p| p.into_inner());
    if *exiting {
        return Ok(());
    }
    let pid = format!("{}\n", std::process::id());
    match opened {
        Some(mut f) => f.write_all(pid.as_bytes()),
        None => std::fs::write(path, pid),
    }
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

/// Sets no-new-privs for the whole process and, unless `-sandbox off`, makes the seccomp
/// policy the process's and installs the main class's filter on this thread, so that every
/// thread started from now on inherits it (and adds its own class's filter on top). Refuses
/// a change of user without root before anything is opened.
fn confine(s: &keel_sandbox::Settings) -> Result<(), keel_sandbox::SandboxError> {
    if let Some(user) = s.run_as.user.as_ref().filter(|_| !keel_sandbox::is_root()) {
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        return Err(keel_sandbox::SandboxError::NotRoot(
            format!("-run-with user={}", user.name),
            uid,
        ));
    }
    keel_sandbox::set_no_new_privs()?;
    if s.sandbox.enable {
        let policy = keel_sandbox::Policy::new(&s.sandbox, s.run_as.requested())?;
        keel_sandbox::set_process_policy(policy)?;
        keel_sandbox::enter(keel_sandbox::ThreadClass::Main);
    }
    Ok(())
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
    let all: Vec<String> = std::env::args().skip(1).collect();
    if let Some(code) = device_help(&all) {
        return code;
    }
    let (args, sandbox) = match keel_sandbox::extract(&all) {
        Ok(x) => x,
        Err(e) => {
            report!("{e}");
            return ExitCode::from(1);
        }
    };
    let steps = match cli::parse(&args) {
        Err(e) => {
            report!("{e}");
            return ExitCode::from(1);
        }
        Ok(Invocation::Help) => {
            print!("{}{}", cli::HELP, keel_sandbox::HELP);
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
        Ok(Invocation::LogUsage) => {
            print!("{}", cli::LOG_HELP);
            return ExitCode::from(1);
        }
        Ok(Invocation::Run(steps)) => steps,
    };
    if let Err(e) = open_guest_log(&steps) {
        report!("{e}");
        return ExitCode::from(1);
    }

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

    if let Err(e) = confine(&sandbox) {
        report!("{e}");
        return ExitCode::from(1);
    }
    // A pid file is opened before the process changes its user, written once the command
    // line ran.
    let pid_handle = match pidfile.as_ref().filter(|_| sandbox.run_as.requested()) {
        None => None,
        Some(p) => match std::fs::File::create(p) {
            Ok(f) => Some(f),
            Err(e) => {
                report!("cannot write pid file {}: {e}", p.display());
                return ExitCode::from(1);
            }
        },
    };

    let signals = block_shutdown_signals();
    let vmm = Vmm::new();
    if sandbox.run_as.requested() {
        // Everything the command line opens is open once the machine is built; the guest
        // runs only after the init-done notifiers.
        let run_as = sandbox.run_as.clone();
        vmm.on_machine_ready(Box::new(move || {
            if let Err(e) = keel_sandbox::drop_privileges(&run_as) {
                report!("{e}");
                std::process::exit(1);
            }
        }));
    }
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
        match vmm.incoming_failure() {
            Some(why) => report!("load of migration failed: {why}"),
            None => report!("{e}"),
        }
        vmm.close_monitors(Duration::ZERO);
        return ExitCode::from(1);
    }
    if let Some(p) = &pidfile
        && let Err(e) = write_pidfile(p, pid_handle)
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
    if let Some(why) = vmm.incoming_failure() {
        report!("load of migration failed: {why}");
    }
    // As QEMU's exit(): only the low 8 bits of isa-debug-exit's (value << 1) | 1 survive.
    ExitCode::from((vmm.exit_status() & 0xff) as u8)
}
