//! The part of libslirp 4.7's C API Keel uses (`slirp/libslirp.h`), declared here and
//! resolved with `dlopen`/`dlsym` when the first user network is created, so that the
//! binary neither links against libslirp nor needs its development headers, and a VM
//! without `-netdev user` starts on a host without the library.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::OnceLock;

use crate::Error;

/// The soname Debian's `libslirp0` installs.
pub(crate) const SONAME: &str = "libslirp.so.0";

/// `SlirpConfig.version` for the fields below (4: libslirp 4.7's `disable_dhcp`).
pub(crate) const CONFIG_VERSION: u32 = 4;

pub(crate) const POLL_IN: c_int = 1 << 0;
pub(crate) const POLL_OUT: c_int = 1 << 1;
pub(crate) const POLL_PRI: c_int = 1 << 2;
pub(crate) const POLL_ERR: c_int = 1 << 3;
pub(crate) const POLL_HUP: c_int = 1 << 4;

/// The opaque `Slirp` instance.
#[repr(C)]
pub(crate) struct Slirp {
    _private: [u8; 0],
}

pub(crate) type TimerCb = unsafe extern "C" fn(opaque: *mut c_void);
pub(crate) type AddPollCb =
    unsafe extern "C" fn(fd: c_int, events: c_int, opaque: *mut c_void) -> c_int;
pub(crate) type GetReventsCb = unsafe extern "C" fn(idx: c_int, opaque: *mut c_void) -> c_int;

/// `SlirpCb`: the callbacks, in the header's order (the last two from config version 4).
#[repr(C)]
pub(crate) struct Callbacks {
    pub send_packet:
        Option<unsafe extern "C" fn(buf: *const c_void, len: usize, opaque: *mut c_void) -> isize>,
    pub guest_error: Option<unsafe extern "C" fn(msg: *const c_char, opaque: *mut c_void)>,
    pub clock_get_ns: Option<unsafe extern "C" fn(opaque: *mut c_void) -> i64>,
    pub timer_new: Option<
        unsafe extern "C" fn(
            cb: Option<TimerCb>,
            cb_opaque: *mut c_void,
            opaque: *mut c_void,
        ) -> *mut c_void,
    >,
    pub timer_free: Option<unsafe extern "C" fn(timer: *mut c_void, opaque: *mut c_void)>,
    pub timer_mod:
        Option<unsafe extern "C" fn(timer: *mut c_void, expire_ms: i64, opaque: *mut c_void)>,
    pub register_poll_fd: Option<unsafe extern "C" fn(fd: c_int, opaque: *mut c_void)>,
    pub unregister_poll_fd: Option<unsafe extern "C" fn(fd: c_int, opaque: *mut c_void)>,
    pub notify: Option<unsafe extern "C" fn(opaque: *mut c_void)>,
    pub init_completed: Option<unsafe extern "C" fn(slirp: *mut Slirp, opaque: *mut c_void)>,
    pub timer_new_opaque: Option<
        unsafe extern "C" fn(id: c_int, cb_opaque: *mut c_void, opaque: *mut c_void) -> *mut c_void,
    >,
}

/// `SlirpConfig` up to version 4, in the header's order (C layout does the padding).
#[repr(C)]
pub(crate) struct Config {
    pub version: u32,
    pub restricted: c_int,
    pub in_enabled: bool,
    pub vnetwork: libc::in_addr,
    pub vnetmask: libc::in_addr,
    pub vhost: libc::in_addr,
    pub in6_enabled: bool,
    pub vprefix_addr6: libc::in6_addr,
    pub vprefix_len: u8,
    pub vhost6: libc::in6_addr,
    pub vhostname: *const c_char,
    pub tftp_server_name: *const c_char,
    pub tftp_path: *const c_char,
    pub bootfile: *const c_char,
    pub vdhcp_start: libc::in_addr,
    pub vnameserver: libc::in_addr,
    pub vnameserver6: libc::in6_addr,
    pub vdnssearch: *const *const c_char,
    pub vdomainname: *const c_char,
    pub if_mtu: usize,
    pub if_mru: usize,
    pub disable_host_loopback: bool,
    pub enable_emu: bool,
    pub outbound_addr: *const libc::sockaddr_in,
    pub outbound_addr6: *const libc::sockaddr_in6,
    pub disable_dns: bool,
    pub disable_dhcp: bool,
}

/// The library's entry points, resolved once.
#[derive(Debug)]
pub(crate) struct Lib {
    pub new: unsafe extern "C" fn(*const Config, *const Callbacks, *mut c_void) -> *mut Slirp,
    pub cleanup: unsafe extern "C" fn(*mut Slirp),
    pub pollfds_fill: unsafe extern "C" fn(*mut Slirp, *mut u32, AddPollCb, *mut c_void),
    pub pollfds_poll: unsafe extern "C" fn(*mut Slirp, c_int, GetReventsCb, *mut c_void),
    pub input: unsafe extern "C" fn(*mut Slirp, *const u8, c_int),
    pub handle_timer: unsafe extern "C" fn(*mut Slirp, c_int, *mut c_void),
    pub add_hostfwd: unsafe extern "C" fn(
        *mut Slirp,
        c_int,
        libc::in_addr,
        c_int,
        libc::in_addr,
        c_int,
    ) -> c_int,
    pub remove_hostfwd: unsafe extern "C" fn(*mut Slirp, c_int, libc::in_addr, c_int) -> c_int,
    pub version_string: unsafe extern "C" fn() -> *const c_char,
}

// SAFETY: `Lib` holds only function pointers into a library that is never unloaded; calling
// them from any thread is what the C API allows (each `Slirp` is used by one thread).
unsafe impl Send for Lib {}
// SAFETY: as above; the pointers are never written after loading.
unsafe impl Sync for Lib {}

static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();

/// The loaded library, loading it on first use; the error names the missing package.
pub(crate) fn lib() -> Result<&'static Lib, Error> {
    LIB.get_or_init(load)
        .as_ref()
        .map_err(|reason| Error::Library(reason.clone()))
}

fn dlerror() -> String {
    // SAFETY: dlerror returns a thread-local message or null; the text is copied at once.
    let msg = unsafe { libc::dlerror() };
    if msg.is_null() {
        "unknown dynamic loader error".into()
    } else {
        // SAFETY: non-null dlerror results are NUL-terminated strings.
        unsafe { CStr::from_ptr(msg) }
            .to_string_lossy()
            .into_owned()
    }
}

fn load() -> Result<Lib, String> {
    let name = c"libslirp.so.0";
    // SAFETY: dlopen with a valid NUL-terminated name; the handle is kept for the life of
    // the process (never dlclose'd), so the symbols below stay valid.
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        return Err(dlerror());
    }
    let sym = |symbol: &CStr| -> Result<*mut c_void, String> {
        // SAFETY: `handle` is a live dlopen handle and `symbol` is NUL-terminated.
        let p = unsafe { libc::dlsym(handle, symbol.as_ptr()) };
        if p.is_null() {
            Err(format!(
                "{SONAME} has no symbol {} (libslirp 4.7 or later is needed)",
                symbol.to_string_lossy()
            ))
        } else {
            Ok(p)
        }
    };
    // SAFETY: each symbol is the libslirp function of that name, whose C signature in
    // libslirp.h 4.7 is the Rust type of the field it is converted to.
    unsafe {
        Ok(Lib {
            new: func(sym(c"slirp_new")?),
            cleanup: func(sym(c"slirp_cleanup")?),
            pollfds_fill: func(sym(c"slirp_pollfds_fill")?),
            pollfds_poll: func(sym(c"slirp_pollfds_poll")?),
            input: func(sym(c"slirp_input")?),
            handle_timer: func(sym(c"slirp_handle_timer")?),
            add_hostfwd: func(sym(c"slirp_add_hostfwd")?),
            remove_hostfwd: func(sym(c"slirp_remove_hostfwd")?),
            version_string: func(sym(c"slirp_version_string")?),
        })
    }
}

/// A symbol's address as the function pointer type `F`.
///
/// # Safety
/// `F` is a function pointer type matching the symbol's C signature.
unsafe fn func<F: Copy>(p: *mut c_void) -> F {
    const { assert!(std::mem::size_of::<F>() == std::mem::size_of::<*mut c_void>()) };
    // SAFETY: same size (checked above); the caller vouches for the signature.
    unsafe { std::mem::transmute_copy(&p) }
}

/// The library's version (`slirp_version_string`), loading it if needed.
pub(crate) fn version() -> Result<String, Error> {
    let lib = lib()?;
    // SAFETY: returns a pointer to a static NUL-terminated string inside the library.
    let p = unsafe { (lib.version_string)() };
    if p.is_null() {
        return Ok(String::new());
    }
    // SAFETY: non-null, NUL-terminated, static.
    Ok(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The C layout of `SlirpConfig` on x86-64, as computed from libslirp.h 4.7.
    #[test]
    fn config_layout_matches_the_header() {
        assert_eq!(std::mem::offset_of!(Config, restricted), 4);
        assert_eq!(std::mem::offset_of!(Config, in_enabled), 8);
        assert_eq!(std::mem::offset_of!(Config, vnetwork), 12);
        assert_eq!(std::mem::offset_of!(Config, in6_enabled), 24);
        assert_eq!(std::mem::offset_of!(Config, vprefix_addr6), 28);
        assert_eq!(std::mem::offset_of!(Config, vprefix_len), 44);
        assert_eq!(std::mem::offset_of!(Config, vhost6), 48);
        assert_eq!(std::mem::offset_of!(Config, vhostname), 64);
        assert_eq!(std::mem::offset_of!(Config, vdhcp_start), 96);
        assert_eq!(std::mem::offset_of!(Config, vnameserver6), 104);
        assert_eq!(std::mem::offset_of!(Config, vdnssearch), 120);
        assert_eq!(std::mem::offset_of!(Config, if_mtu), 136);
        assert_eq!(std::mem::offset_of!(Config, disable_host_loopback), 152);
        assert_eq!(std::mem::offset_of!(Config, outbound_addr), 160);
        assert_eq!(std::mem::offset_of!(Config, disable_dns), 176);
        assert_eq!(std::mem::offset_of!(Config, disable_dhcp), 177);
        assert_eq!(std::mem::size_of::<Config>(), 184);
        assert_eq!(std::mem::size_of::<Callbacks>(), 11 * 8);
    }
}
