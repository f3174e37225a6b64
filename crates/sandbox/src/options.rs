//! QEMU's command-line options for the sandbox and the user: `-sandbox`, `-run-with`,
//! `-runas`, `-chroot`, read before the rest of the command line.

use std::path::PathBuf;

use crate::SandboxError;
use crate::privileges::{RunAs, User};

/// `allow` or `deny`, as QEMU spells a `-sandbox` sub-option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Onoff {
    /// The calls of the set are allowed (in the main class's filter).
    Allow,
    /// The calls of the set are refused.
    Deny,
}

/// `elevateprivileges=allow|deny|children`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Privileges {
    /// The set-id calls are allowed in the main class.
    Allow,
    /// Refused.
    Deny,
    /// QEMU: refused, and no-new-privs set for children; Keel always sets no-new-privs and
    /// spawns no children, so this is `Deny`.
    Children,
}

/// `-sandbox on|off[,obsolete=..][,elevateprivileges=..][,spawn=..][,resourcecontrol=..]`.
///
/// QEMU's sets mapped onto Keel's filters: each `allow` adds its calls to the main class's
/// allow-list (the vCPU, worker and monitor classes never get them). Keel's defaults differ
/// from QEMU's: the sandbox is on without the option, and every set is denied unless
/// allowed (QEMU allows all but `obsolete`), because Keel needs none of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxOptions {
    /// `on` (the default) or `off`.
    pub enable: bool,
    /// `obsolete`: old system calls (`_sysctl`, `uselib`, `ustat`...).
    pub obsolete: Onoff,
    /// `elevateprivileges`: `setuid` and friends.
    pub elevate_privileges: Privileges,
    /// `spawn`: `fork`, `vfork`, `execve`, `clone` of a process.
    pub spawn: Onoff,
    /// `resourcecontrol`: scheduler, affinity, memory policy and rlimit changes.
    pub resource_control: Onoff,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        SandboxOptions {
            enable: true,
            obsolete: Onoff::Deny,
            elevate_privileges: Privileges::Deny,
            spawn: Onoff::Deny,
            resource_control: Onoff::Deny,
        }
    }
}

fn bad(option: &str, message: impl Into<String>) -> SandboxError {
    SandboxError::Option {
        option: option.to_owned(),
        message: message.into(),
    }
}

/// Splits QemuOpts `k=v,k=v` (`,,` is a literal comma); a first item without `=` is
/// `implied=item`.
fn split(option: &str, value: &str, implied: &str) -> Result<Vec<(String, String)>, SandboxError> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut chars = value.chars().peekable();
    let mut parts = Vec::new();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    for (i, part) in parts.into_iter().enumerate() {
        match part.split_once('=') {
            Some((k, v)) => items.push((k.to_owned(), v.to_owned())),
            None if i == 0 && !part.is_empty() => items.push((implied.to_owned(), part)),
            None => return Err(bad(option, format!("Invalid parameter '{part}'"))),
        }
    }
    Ok(items)
}

fn allow_deny(option: &str, key: &str, v: &str) -> Result<Onoff, SandboxError> {
    match v {
        "allow" => Ok(Onoff::Allow),
        "deny" => Ok(Onoff::Deny),
        _ => Err(bad(
            option,
            format!("invalid argument for {key}: '{v}' (allow or deny)"),
        )),
    }
}

impl SandboxOptions {
    /// Reads the value of `-sandbox` (`on,spawn=deny`, ...).
    pub fn parse(value: &str) -> Result<SandboxOptions, SandboxError> {
        let option = format!("-sandbox {value}");
        let mut o = SandboxOptions::default();
        let mut enable = None;
        for (k, v) in split(&option, value, "enable")? {
            match k.as_str() {
                "enable" => {
                    enable = Some(match v.as_str() {
                        "on" | "yes" | "true" => true,
                        "off" | "no" | "false" => false,
                        _ => {
                            return Err(bad(
                                &option,
                                format!("Parameter 'enable' expects 'on' or 'off', not '{v}'"),
                            ));
                        }
                    })
                }
                "obsolete" => o.obsolete = allow_deny(&option, &k, &v)?,
                "spawn" => o.spawn = allow_deny(&option, &k, &v)?,
                "resourcecontrol" => o.resource_control = allow_deny(&option, &k, &v)?,
                "elevateprivileges" => {
                    o.elevate_privileges = match v.as_str() {
                        "allow" => Privileges::Allow,
                        "deny" => Privileges::Deny,
                        "children" => Privileges::Children,
                        _ => {
                            return Err(bad(
                                &option,
                                format!(
                                    "invalid argument for elevateprivileges: '{v}' \
                                     (allow, deny or children)"
                                ),
                            ));
                        }
                    }
                }
                other => return Err(bad(&option, format!("Invalid parameter '{other}'"))),
            }
        }
        o.enable =
            enable.ok_or_else(|| bad(&option, "Parameter 'enable' is missing (on or off)"))?;
        Ok(o)
    }
}

/// What the sandbox options of one command line ask for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    /// `-sandbox` (on by default).
    pub sandbox: SandboxOptions,
    /// `-run-with`, `-runas`, `-chroot`.
    pub run_as: RunAs,
}

/// The options this crate reads, each taking one value.
const OPTIONS: &[&str] = &["sandbox", "run-with", "runas", "chroot"];

/// Takes `-sandbox`, `-run-with`, `-runas` and `-chroot` out of `args` (the rest, in order,
/// is returned for the VMM's own parser) and reads them. A later option overrides an
/// earlier one. Users are looked up here, so a missing one is reported before anything
/// starts.
pub fn extract(args: &[String]) -> Result<(Vec<String>, Settings), SandboxError> {
    let mut rest = Vec::new();
    let mut settings = Settings::default();
    let mut i = 0;
    while i < args.len() {
        let raw = &args[i];
        i += 1;
        let name = raw
            .strip_prefix("--")
            .or_else(|| raw.strip_prefix('-'))
            .filter(|n| OPTIONS.contains(n));
        let Some(name) = name else {
            rest.push(raw.clone());
            continue;
        };
        let value = args
            .get(i)
            .ok_or_else(|| bad(raw, "requires an argument"))?;
        i += 1;
        let option = format!("{raw} {value}");
        match name {
            "sandbox" => settings.sandbox = SandboxOptions::parse(value)?,
            "runas" => settings.run_as.user = Some(User::lookup(&option, value)?),
            "chroot" => settings.run_as.chroot = Some(PathBuf::from(value)),
            _ => {
                for (k, v) in split(&option, value, "")? {
                    match k.as_str() {
                        "user" => settings.run_as.user = Some(User::lookup(&option, &v)?),
                        "chroot" => settings.run_as.chroot = Some(PathBuf::from(v)),
                        "async-teardown" if v == "off" => {}
                        "async-teardown" => {
                            return Err(bad(&option, "async-teardown=on is not supported"));
                        }
                        other => {
                            return Err(bad(&option, format!("Invalid parameter '{other}'")));
                        }
                    }
                }
            }
        }
    }
    Ok((rest, settings))
}

/// The usage lines of these options, for `-h`.
pub const HELP: &str = "\
Sandbox and user (Keel's sandbox is ON by default, unlike QEMU's):
  -sandbox on|off[,obsolete=allow|deny][,elevateprivileges=allow|deny|children]
           [,spawn=allow|deny][,resourcecontrol=allow|deny]
                                    seccomp filters per thread class (vcpu, worker,
                                    monitor, main); each set defaults to deny; a
                                    forbidden call is named on stderr and the VMM
                                    exits with status 159. -sandbox off disables it.
  -run-with user=NAME|UID:GID[,chroot=DIR]  -runas USER  -chroot DIR
                                    once /dev/kvm, images, sockets and the pid file
                                    are open, and before the guest runs: chroot,
                                    then become USER (root only)
";

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn libvirts_line_parses() {
        let o = SandboxOptions::parse(
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        )
        .unwrap();
        assert_eq!(o, SandboxOptions::default());
        let o = SandboxOptions::parse("off").unwrap();
        assert!(!o.enable);
        let o = SandboxOptions::parse("enable=on,spawn=allow,elevateprivileges=children").unwrap();
        assert_eq!(o.spawn, Onoff::Allow);
        assert_eq!(o.elevate_privileges, Privileges::Children);
    }

    #[test]
    fn bad_values_say_what_is_accepted() {
        let e = SandboxOptions::parse("maybe").unwrap_err().to_string();
        assert!(e.contains("expects 'on' or 'off'"), "{e}");
        let e = SandboxOptions::parse("on,spawn=perhaps")
            .unwrap_err()
            .to_string();
        assert!(e.contains("allow or deny"), "{e}");
        let e = SandboxOptions::parse("on,fork=deny")
            .unwrap_err()
            .to_string();
        assert!(e.contains("Invalid parameter 'fork'"), "{e}");
        let e = SandboxOptions::parse("spawn=deny").unwrap_err().to_string();
        assert!(e.contains("'enable' is missing"), "{e}");
    }

    #[test]
    fn extract_takes_only_its_options() {
        let (rest, s) = extract(&args(&[
            "-M",
            "microvm",
            "-sandbox",
            "off",
            "-m",
            "256M",
            "-run-with",
            "user=0:0,chroot=/",
        ]))
        .unwrap();
        assert_eq!(rest, args(&["-M", "microvm", "-m", "256M"]));
        assert!(!s.sandbox.enable);
        let user = s.run_as.user.unwrap();
        assert_eq!((user.uid, user.gid), (0, 0));
        assert_eq!(s.run_as.chroot, Some(PathBuf::from("/")));
        let (_, s) = extract(&args(&["-runas", "root"])).unwrap();
        assert_eq!(s.run_as.user.unwrap().uid, 0);
        let e = extract(&args(&["-runas", "no-such-user-keel"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no such user"), "{e}");
        let e = extract(&args(&["-sandbox"])).unwrap_err().to_string();
        assert!(e.contains("requires an argument"), "{e}");
        let (_, s) = extract(&[]).unwrap();
        assert!(s.sandbox.enable);
        assert_eq!(s.run_as, RunAs::default());
    }
}
