//! Descriptors a client passes with its requests (`SCM_RIGHTS` on a unix socket), for the
//! commands that take one: QEMU's `getfd` and `add-fd`, with which libvirt hands over the
//! files and sockets it opened itself (a save target, a disk it may open and Keel may not).
//!
//! As in QEMU, descriptors belong to the connection, not to one request: those that come
//! with a read replace any the connection still holds (closing them), and a command run for
//! that connection takes the first of them with [`take_received_fd`]. A request that takes
//! none leaves them for a later one. Received descriptors are close-on-exec.

use std::cell::RefCell;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

/// Most descriptors one message may carry; more are closed by the kernel (`MSG_CTRUNC`).
pub const MAX_FDS_PER_MESSAGE: usize = 16;

/// The descriptors a connection holds for its next command.
pub(crate) type Held = Arc<Mutex<Vec<OwnedFd>>>;

thread_local! {
    /// The descriptors of the connection whose request this thread runs now.
    static CURRENT: RefCell<Option<Held>> = const { RefCell::new(None) };
}

/// Runs `f` (one request of the connection holding `held`) so that
/// [`take_received_fd`] sees that connection's descriptors.
pub(crate) fn with_held<R>(held: &Held, f: impl FnOnce() -> R) -> R {
    CURRENT.with(|c| *c.borrow_mut() = Some(held.clone()));
    let r = f();
    CURRENT.with(|c| *c.borrow_mut() = None);
    r
}

/// Takes the first descriptor the client of the request being run passed (the others it
/// passed with it are closed, as QEMU does); `None` if it passed none, or the request does
/// not come from a unix socket connection.
pub fn take_received_fd() -> Option<OwnedFd> {
    CURRENT.with(|c| {
        let held = c.borrow().clone()?;
        let mut fds = held.lock().unwrap_or_else(|e| e.into_inner());
        if fds.is_empty() {
            return None;
        }
        let first = fds.remove(0);
        fds.clear();
        Some(first)
    })
}

/// Space for the control message of [`MAX_FDS_PER_MESSAGE`] descriptors, aligned for
/// `cmsghdr`.
#[repr(C, align(8))]
struct ControlBuf([u8; 128]);

/// What one non-blocking `recvmsg` gave: the byte count (or the error) and the descriptors
/// that came with the bytes.
pub(crate) fn recv_with_fds(fd: RawFd, buf: &mut [u8]) -> (isize, Vec<OwnedFd>) {
    let mut control = ControlBuf([0; 128]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: a zeroed msghdr is valid (null name, no iovecs); the fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control.0.len();
    // SAFETY: `msg` points at `iov` (the caller's buffer, valid for its length) and at
    // `control`, both alive for the call; `fd` is the caller's open socket.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC) };
    let mut fds = Vec::new();
    if n < 0 || msg.msg_controllen == 0 {
        return (n, fds);
    }
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled, within
    // `msg_controllen`; each SCM_RIGHTS payload is an array of descriptors this process now
    // owns (received, so open and owned by nobody else).
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let c = &*cmsg;
            if c.cmsg_level == libc::SOL_SOCKET && c.cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let len = (c.cmsg_len as usize).saturating_sub(data as usize - cmsg as usize);
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let raw = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    (n, fds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    fn send_with_fd(s: &UnixStream, bytes: &[u8], fds: &[RawFd]) {
        let mut control = ControlBuf([0; 128]);
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr() as *mut _,
            iov_len: bytes.len(),
        };
        // SAFETY: test-only sendmsg of a valid iovec and one SCM_RIGHTS message of open fds.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.0.as_mut_ptr().cast();
            let payload = std::mem::size_of_val(fds) as u32;
            msg.msg_controllen = libc::CMSG_SPACE(payload) as usize;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                payload as usize,
            );
            assert!(libc::sendmsg(s.as_raw_fd(), &msg, 0) >= 0);
        }
    }

    #[test]
    fn descriptors_arrive_close_on_exec_and_the_first_is_taken() {
        let (a, b) = UnixStream::pair().unwrap();
        let f1 = std::fs::File::open("/dev/null").unwrap();
        let f2 = std::fs::File::open("/dev/null").unwrap();
        send_with_fd(&a, b"{}", &[f1.as_raw_fd(), f2.as_raw_fd()]);
        let mut buf = [0u8; 16];
        let (n, fds) = recv_with_fds(b.as_raw_fd(), &mut buf);
        assert_eq!(n, 2);
        assert_eq!(fds.len(), 2);
        for fd in &fds {
            // SAFETY: F_GETFD on an open descriptor.
            let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
            assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        }
        let first = fds[0].as_raw_fd();
        let held: Held = Arc::new(Mutex::new(fds));
        assert!(take_received_fd().is_none(), "no request is being run");
        let got = with_held(&held, take_received_fd).unwrap();
        assert_eq!(got.as_raw_fd(), first);
        assert!(held.lock().unwrap().is_empty(), "the others are closed");
        assert!(with_held(&held, take_received_fd).is_none());
        // Plain bytes bring no descriptor.
        (&a).write_all(b"x").unwrap();
        let (n, fds) = recv_with_fds(b.as_raw_fd(), &mut buf);
        assert_eq!((n, fds.len()), (1, 0));
    }
}
