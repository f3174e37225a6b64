//! The human monitor as a terminal conversation (`-monitor stdio`, `-monitor
//! unix:PATH,server,nowait`, `-mon chardev=ID,mode=readline`): QEMU's banner, the
//! `(qemu) ` prompt, each line echoed and answered, until the peer goes or says `quit`.
//!
//! Transport-neutral: it reads any [`BufRead`] and writes any [`Write`]; the VMM supplies
//! the function that answers a command line (its `human-monitor-command`). QEMU's readline
//! redraws the line after every keystroke; Keel echoes the whole line once, which reads the
//! same on a terminal and is what scripts reading the socket need (the echo, the answer,
//! the next prompt).

use std::io::{self, BufRead, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;

use keel_qmp::{Endpoint, ServerError};

/// The prompt QEMU prints before each command.
pub const PROMPT: &str = "(qemu) ";

/// The longest command line kept: QEMU's readline buffer is 4 KiB; bytes past it on one
/// line are dropped, so a peer that never sends a newline cannot grow the monitor.
pub const MAX_LINE: usize = 4096;

/// QEMU's greeting for a monitor of QEMU version `version` (`7.2.0`).
pub fn banner(version: &str) -> String {
    format!("QEMU {version} monitor - type 'help' for more information\r\n")
}

/// Reads one line, ended by `\n` or `\r` (each one an Enter, as in QEMU's readline: a
/// `\r\n` is a line and an empty one), keeping at most [`MAX_LINE`] bytes of it. `None`
/// at end of input.
fn read_line<R: BufRead>(input: &mut R) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    loop {
        let mut b = [0u8; 1];
        if input.read(&mut b)? == 0 {
            return Ok((!line.is_empty()).then(|| String::from_utf8_lossy(&line).into_owned()));
        }
        match b[0] {
            b'\n' | b'\r' => break,
            c if line.len() < MAX_LINE => line.push(c),
            _ => {}
        }
    }
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

/// Holds one conversation: the banner and a prompt, then for each line the echo, `answer`'s
/// text and a new prompt. Ends at end of input, on a write error (the peer went), or after
/// `quit`/`q` was answered.
pub fn converse<R: BufRead, W: Write>(
    mut input: R,
    mut out: W,
    version: &str,
    answer: &dyn Fn(&str) -> String,
) -> io::Result<()> {
    out.write_all(banner(version).as_bytes())?;
    out.write_all(PROMPT.as_bytes())?;
    out.flush()?;
    while let Some(line) = read_line(&mut input)? {
        out.write_all(line.as_bytes())?;
        out.write_all(b"\r\n")?;
        let reply = answer(&line);
        out.write_all(reply.as_bytes())?;
        if matches!(line.split_whitespace().next(), Some("quit" | "q")) {
            out.flush()?;
            return Ok(());
        }
        out.write_all(PROMPT.as_bytes())?;
        out.flush()?;
    }
    Ok(())
}

/// What answers a command line: the VMM's `human-monitor-command`.
pub type Answer = std::sync::Arc<dyn Fn(&str) -> String + Send + Sync>;

fn io_err(what: &'static str, target: &str) -> impl FnOnce(io::Error) -> ServerError {
    let target = target.to_owned();
    move |source| ServerError::Io {
        what,
        target,
        source,
    }
}

fn spawn(name: &str, work: impl FnOnce() + Send + 'static) -> Result<(), ServerError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(work)
        .map(drop)
        .map_err(io_err("cannot start the human monitor on", name))
}

/// Converses with one connected stream; a failure means the peer went.
fn stream_session<S>(s: S, version: &str, answer: &Answer)
where
    S: Read + Write,
    for<'a> &'a S: Read + Write,
{
    let _ = converse(io::BufReader::new(&s), &s, version, answer.as_ref());
}

/// With `wait` (QEMU's `server` default), the first client, accepted before the monitor
/// counts as started.
fn accept_first<S>(
    wait: bool,
    shown: &str,
    accept: impl FnOnce() -> io::Result<S>,
) -> Result<Option<S>, ServerError> {
    if !wait {
        return Ok(None);
    }
    accept()
        .map(Some)
        .map_err(io_err("cannot accept on", shown))
}

/// One client at a time, as a QEMU chardev serves them: `first`, then each that connects.
fn serve_clients<S>(
    first: Option<S>,
    incoming: impl Iterator<Item = io::Result<S>>,
    version: &str,
    answer: &Answer,
) where
    S: Read + Write,
    for<'a> &'a S: Read + Write,
{
    for s in first.into_iter().chain(incoming.map_while(Result::ok)) {
        stream_session(s, version, answer);
    }
}

/// Starts a human monitor on `endpoint`, answered by `answer` and greeting as QEMU
/// `version`. A listening socket serves one client at a time, as a QEMU chardev does; with
/// `wait` (QEMU's default for `server`) the first client is accepted before this returns.
/// Inherited descriptors (`fd=`) are for QMP only.
pub fn serve(endpoint: &Endpoint, version: &str, answer: Answer) -> Result<(), ServerError> {
    let version = version.to_owned();
    match endpoint.clone() {
        Endpoint::Stdio => spawn("hmp-stdio", move || {
            let _ = converse(io::stdin().lock(), io::stdout(), &version, answer.as_ref());
        }),
        Endpoint::Unix {
            path,
            server: true,
            wait,
        } => {
            let shown = path.display().to_string();
            let listener = keel_qmp::bind_unix_0600(&path)
                .map_err(io_err("cannot listen on unix socket", &shown))?;
            let first = accept_first(wait, &shown, || listener.accept().map(|(s, _)| s))?;
            spawn("hmp-accept", move || {
                serve_clients(first, listener.incoming(), &version, &answer);
            })
        }
        Endpoint::Tcp {
            host,
            port,
            server: true,
            wait,
        } => {
            let addr = format!("{host}:{port}");
            let listener =
                TcpListener::bind(&addr).map_err(io_err("cannot listen on tcp", &addr))?;
            let first = accept_first(wait, &addr, || listener.accept().map(|(s, _)| s))?;
            spawn("hmp-accept", move || {
                serve_clients(first, listener.incoming(), &version, &answer);
            })
        }
        Endpoint::Unix { path, .. } => {
            let shown = path.display().to_string();
            let s = UnixStream::connect(&path)
                .map_err(io_err("cannot connect to unix socket", &shown))?;
            spawn("hmp-client", move || stream_session(s, &version, &answer))
        }
        Endpoint::Tcp { host, port, .. } => {
            let addr = format!("{host}:{port}");
            let s = TcpStream::connect(&addr).map_err(io_err("cannot connect to", &addr))?;
            spawn("hmp-client", move || stream_session(s, &version, &answer))
        }
        Endpoint::Fd { fd, .. } => Err(ServerError::Syntax(format!(
            "fd={fd}: the human monitor takes stdio, unix: or tcp: (inherited sockets are for QMP)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &str) -> String {
        let mut out = Vec::new();
        converse(input.as_bytes(), &mut out, "7.2.0", &|l| match l.trim() {
            "info status" => "VM status: running\r\n".into(),
            _ => String::new(),
        })
        .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_session_reads_like_qemus() {
        assert_eq!(
            run("info status\r\nquit\nnever read\n"),
            "QEMU 7.2.0 monitor - type 'help' for more information\r\n(qemu) \
             info status\r\nVM status: running\r\n(qemu) \r\n(qemu) quit\r\n"
        );
    }

    #[test]
    fn end_of_input_and_endless_lines_are_bounded() {
        let long = "x".repeat(MAX_LINE * 3);
        let text = run(&long);
        assert!(text.len() < MAX_LINE + 200, "{}", text.len());
        assert!(run("").ends_with(PROMPT));
    }
}
