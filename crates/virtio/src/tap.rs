//! A Linux tap interface opened through `/dev/net/tun` (QEMU's `-netdev tap,ifname=IF`).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::Error;
use crate::net::{NET_HDR_LEN, NetBackend};

const TUN_PATH: &str = "/dev/net/tun";
const IFNAMSIZ: usize = 16;
// _IOW('T', 202, int), _IOW('T', 208, unsigned int), _IOW('T', 216, int)
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags member of the union.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open tap queue: `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, a 12-byte virtio-net header
/// on every frame (the virtio 1.x header), no offloads, non-blocking.
#[derive(Debug)]
pub struct Tap {
    file: File,
    ifname: String,
}

impl Tap {
    /// Opens (creating it if needed and allowed) the tap interface `ifname`; a name
    /// with `%d` lets the kernel pick the number. Bringing the link up and addressing
    /// it is the host's business (`script=no`).
    pub fn open(ifname: &str) -> Result<Self, Error> {
        let bytes = ifname.as_bytes();
        if bytes.is_empty() || bytes.len() >= IFNAMSIZ || bytes.contains(&0) {
            return Err(Error::InvalidIfname(ifname.to_string()));
        }
        let err = |step: &'static str, source: io::Error| Error::Tap {
            ifname: ifname.to_string(),
            step,
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(|e| err("open /dev/net/tun", e))?;
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..bytes.len()].copy_from_slice(bytes);
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` is a live, correctly
        // sized and aligned `IfReq` (40 bytes, like `ifreq`) for the whole call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if rc < 0 {
            return Err(err("TUNSETIFF", io::Error::last_os_error()));
        }
        let hdr_len = NET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one `int` through the pointer, which is valid.
        let rc = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                TUNSETVNETHDRSZ,
                &hdr_len as *const libc::c_int,
            )
        };
        if rc < 0 {
            return Err(err("TUNSETVNETHDRSZ", io::Error::last_os_error()));
        }
        // SAFETY: TUNSETOFFLOAD takes its flags by value; 0 = no offloads.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, 0 as libc::c_ulong) };
        if rc < 0 {
            return Err(err("TUNSETOFFLOAD", io::Error::last_os_error()));
        }
        let len = req.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
        let ifname = String::from_utf8_lossy(&req.name[..len]).into_owned();
        Ok(Self { file, ifname })
    }

    /// The interface name the kernel gave (resolves a `%d` template).
    pub fn ifname(&self) -> &str {
        &self.ifname
    }
}

impl NetBackend for Tap {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        let n = self.file.write(frame)?;
        if n != frame.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short write to tap",
            ));
        }
        Ok(())
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }
}
