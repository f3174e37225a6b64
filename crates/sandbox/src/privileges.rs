//! No-new-privs and the privilege drop (`-run-with user=`, `-runas`, `-chroot`).

use std::ffi::CString;
use std::path::PathBuf;

use crate::SandboxError;

/// The user to become.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Its user id.
    pub uid: u32,
    /// Its primary group, the only group kept.
    pub gid: u32,
    /// The name it was given by, for messages (`1000:1000` for a numeric form).
    pub name: String,
}

/// What `-run-with`, `-runas` and `-chroot` ask for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunAs {
    /// The user to become, if any.
    pub user: Option<User>,
    /// The directory to make the root, if any.
    pub chroot: Option<PathBuf>,
}

impl RunAs {
    /// Whether anything is to change.
    pub fn requested(&self) -> bool {
        self.user.is_some() || self.chroot.is_some()
    }
}

impl User {
    /// Reads `NAME` (looked up in the user database) or `UID:GID` (QEMU 9's numeric form).
    pub fn lookup(option: &str, spec: &str) -> Result<User, SandboxError> {
        let bad = |message: String| SandboxError::Option {
            option: option.to_owned(),
            message,
        };
        if let Some((u, g)) = spec.split_once(':') {
            let uid = u
                .parse()
                .map_err(|_| bad(format!("'{u}' is not a user id (UID:GID)")))?;
            let gid = g
                .parse()
                .map_err(|_| bad(format!("'{g}' is not a group id (UID:GID)")))?;
            return Ok(User {
                uid,
                gid,
                name: spec.to_owned(),
            });
        }
        let name = CString::new(spec).map_err(|_| bad("a user name has no NUL byte".into()))?;
        // SAFETY: passwd is plain data, filled by getpwnam_r before use.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut buf = vec![0 as libc::c_char; 16 << 10];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call: the name is NUL-terminated, `pwd` and
        // `result` are ours, `buf` is valid for its length.
        let r = unsafe {
            libc::getpwnam_r(
                name.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        if r != 0 || result.is_null() {
            return Err(bad(format!("no such user '{spec}'")));
        }
        Ok(User {
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
            name: spec.to_owned(),
        })
    }
}

/// Whether the process runs as root (the only case in which it can change its user).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Sets no-new-privs on the calling thread, inherited by every thread it starts and every
/// program it would execute: no set-id binary or file capability can raise privileges.
/// Call it on the main thread before any other thread exists.
pub fn set_no_new_privs() -> Result<(), SandboxError> {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if r != 0 {
        return Err(SandboxError::Privileges {
            what: "set no-new-privs".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn check(what: impl FnOnce() -> String, r: libc::c_int) -> Result<(), SandboxError> {
    if r != 0 {
        return Err(SandboxError::Privileges {
            what: what(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Changes the root (`chroot`, then `chdir("/")`) and the user (`setgroups` to the primary
/// group only, `setgid`, `setuid`) of the whole process, as QEMU does, and checks that root
/// cannot be regained. Needs root; the caller checks that first ([`is_root`]) to refuse
/// with a clear message before anything starts.
///
/// The C library makes every thread of the process repeat the set-id calls, so the filters
/// installed before the drop allow them (`Policy::new(_, true)`); once the process no longer
/// holds uid 0 they cannot raise anything.
pub fn drop_privileges(run_as: &RunAs) -> Result<(), SandboxError> {
    if let Some(dir) = &run_as.chroot {
        let shown = dir.display().to_string();
        let path =
            CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|_| SandboxError::Option {
                option: format!("-chroot {shown}"),
                message: "a path has no NUL byte".into(),
            })?;
        // SAFETY: a NUL-terminated path; chroot and chdir touch no memory of ours.
        check(|| format!("chroot {shown}"), unsafe {
            libc::chroot(path.as_ptr())
        })?;
        // SAFETY: a static NUL-terminated path.
        check(|| "chdir /".into(), unsafe { libc::chdir(c"/".as_ptr()) })?;
    }
    let Some(user) = &run_as.user else {
        return Ok(());
    };
    let gid = user.gid;
    // SAFETY: one gid_t, valid for the call.
    check(|| format!("setgroups({gid})"), unsafe {
        libc::setgroups(1, &gid)
    })?;
    // SAFETY: integer argument only.
    check(|| format!("setgid({gid})"), unsafe { libc::setgid(gid) })?;
    // SAFETY: integer argument only.
    check(|| format!("setuid({})", user.uid), unsafe {
        libc::setuid(user.uid)
    })?;
    // SAFETY: integer argument only.
    if user.uid != 0 && unsafe { libc::setuid(0) } == 0 {
        return Err(SandboxError::Privileges {
            what: format!("drop root for user {}", user.name),
            source: std::io::Error::other("setuid(0) still succeeds"),
        });
    }
    Ok(())
}
