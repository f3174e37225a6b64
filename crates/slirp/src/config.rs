//! The options of `-netdev user` as QEMU 7.2 reads them (`net/slirp.c`), checked and turned
//! into the addresses of the virtual network.

use std::net::Ipv4Addr;

use crate::Error;

/// What `-netdev user,...` / `netdev_add type=user` asks for, as written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserOptions {
    /// `net=ADDR[/MASK]`: the guest network (default 10.0.2.0/24); MASK is a prefix length
    /// (4-32) or a dotted mask; without one, the class of ADDR decides, as in QEMU.
    pub net: Option<String>,
    /// `host=ADDR`: the host's address on that network (default network + 2).
    pub host: Option<String>,
    /// `dhcpstart=ADDR`: the first address DHCP hands out (default network + 15).
    pub dhcpstart: Option<String>,
    /// `dns=ADDR`: the virtual DNS server (default network + 3).
    pub dns: Option<String>,
    /// `hostname=NAME`: the name DHCP gives the guest.
    pub hostname: Option<String>,
    /// `domainname=NAME`: the DNS domain DHCP gives the guest.
    pub domainname: Option<String>,
    /// `restrict=on`: the guest reaches nothing outside (only `hostfwd` connections in).
    pub restrict: bool,
    /// `ipv4=off` disables IPv4 (default on).
    pub ipv4: Option<bool>,
    /// `ipv6=off` disables IPv6 (default on: fec0::/64, host fec0::2, DNS fec0::3).
    pub ipv6: Option<bool>,
    /// `hostfwd=RULE`, repeatable.
    pub hostfwd: Vec<String>,
}

/// The virtual network's addresses, checked (QEMU's `net_slirp_init`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserConfig {
    /// Network address.
    pub net: Ipv4Addr,
    /// Network mask.
    pub mask: Ipv4Addr,
    /// The host (gateway) address.
    pub host: Ipv4Addr,
    /// First DHCP address.
    pub dhcp_start: Ipv4Addr,
    /// DNS server address.
    pub dns: Ipv4Addr,
    /// Whether the guest is cut off from the outside.
    pub restrict: bool,
    /// IPv4 on.
    pub ipv4: bool,
    /// IPv6 on (QEMU's defaults: prefix fec0::/64, host ::2, DNS ::3).
    pub ipv6: bool,
    /// The guest's host name (DHCP option 12).
    pub hostname: Option<String>,
    /// The DNS domain (DHCP option 15).
    pub domainname: Option<String>,
    /// Port forwards set up with the network.
    pub hostfwd: Vec<HostFwd>,
}

impl Default for UserConfig {
    /// QEMU's defaults: 10.0.2.0/24, host .2, DNS .3, DHCP from .15.
    fn default() -> Self {
        Self {
            net: Ipv4Addr::new(10, 0, 2, 0),
            mask: Ipv4Addr::new(255, 255, 255, 0),
            host: Ipv4Addr::new(10, 0, 2, 2),
            dhcp_start: Ipv4Addr::new(10, 0, 2, 15),
            dns: Ipv4Addr::new(10, 0, 2, 3),
            restrict: false,
            ipv4: true,
            ipv6: true,
            hostname: None,
            domainname: None,
            hostfwd: Vec::new(),
        }
    }
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::Invalid(msg.into())
}

/// `inet_aton` as QEMU uses it, for the dotted-quad form every QEMU document writes.
fn addr(text: &str, what: &str) -> Result<Ipv4Addr, Error> {
    text.parse()
        .map_err(|_| invalid(format!("Failed to parse {what}")))
}

/// The mask QEMU infers for a network given without one (`net=ADDR`).
fn class_mask(net: u32) -> u32 {
    if net & 0x8000_0000 == 0 {
        0xff00_0000
    } else if net & 0xfff0_0000 == 0xac10_0000 {
        0xfff0_0000
    } else if net & 0xc000_0000 == 0x8000_0000 || net & 0xffff_0000 == 0xc0a8_0000 {
        // Class B, and the private 192.168.0.0/16.
        0xffff_0000
    } else if net & 0xffff_0000 == 0xc612_0000 {
        0xfffe_0000
    } else if net & 0xe000_0000 == 0xe000_0000 {
        0xffff_ff00
    } else {
        0xffff_fff0
    }
}

impl UserConfig {
    /// Checks `opts` and computes the addresses, with QEMU 7.2's rules and messages.
    pub fn from_options(opts: &UserOptions) -> Result<Self, Error> {
        let mut c = UserConfig {
            restrict: opts.restrict,
            ipv4: opts.ipv4.unwrap_or(true),
            ipv6: opts.ipv6.unwrap_or(true),
            ..UserConfig::default()
        };
        if !c.ipv4 && (opts.net.is_some() || opts.host.is_some() || opts.dns.is_some()) {
            return Err(invalid("IPv4 disabled but netmask/host/dns provided"));
        }
        if !c.ipv4 && !c.ipv6 {
            return Err(invalid("IPv4 and IPv6 disabled"));
        }
        if let Some(net) = &opts.net {
            let (net, mask) = match net.split_once('/') {
                None => {
                    let n = u32::from(addr(net, "netmask")?);
                    (n, class_mask(n))
                }
                Some((a, m)) => {
                    let n = u32::from(addr(a, "netmask")?);
                    let mask = match m.parse::<u32>() {
                        Ok(bits) if (4..=32).contains(&bits) => u32::MAX << (32 - bits),
                        Ok(_) => {
                            return Err(invalid(
                                "Invalid netmask provided (must be in range 4-32)",
                            ));
                        }
                        Err(_) => u32::from(
                            m.parse::<Ipv4Addr>()
                                .map_err(|_| invalid("Failed to parse netmask (trailing chars)"))?,
                        ),
                    };
                    (n, mask)
                }
            };
            let net = net & mask;
            c.net = net.into();
            c.mask = mask.into();
            c.host = (net | (0x0202 & !mask)).into();
            c.dhcp_start = (net | (0x020f & !mask)).into();
            c.dns = (net | (0x0203 & !mask)).into();
        }
        let (net, mask) = (u32::from(c.net), u32::from(c.mask));
        if let Some(h) = &opts.host {
            c.host = addr(h, "host")?;
        }
        if u32::from(c.host) & mask != net {
            return Err(invalid("Host doesn't belong to network"));
        }
        if let Some(d) = &opts.dns {
            c.dns = addr(d, "DNS")?;
        }
        if c.restrict && u32::from(c.dns) & mask != net {
            return Err(invalid("DNS doesn't belong to network"));
        }
        if c.dns == c.host {
            return Err(invalid("DNS must be different from host"));
        }
        if let Some(d) = &opts.dhcpstart {
            c.dhcp_start = addr(d, "DHCP start address")?;
        }
        if u32::from(c.dhcp_start) & mask != net {
            return Err(invalid("DHCP doesn't belong to network"));
        }
        if c.dhcp_start == c.host || c.dhcp_start == c.dns {
            return Err(invalid("DHCP must be different from host and DNS"));
        }
        for (name, value) in [
            ("domainname", &opts.domainname),
            ("vhostname", &opts.hostname),
        ] {
            if let Some(v) = value {
                if name == "domainname" && v.is_empty() {
                    return Err(invalid("'domainname' parameter cannot be empty"));
                }
                if v.len() > 255 {
                    return Err(invalid(format!(
                        "'{name}' parameter cannot exceed 255 bytes"
                    )));
                }
                if v.contains('\0') {
                    return Err(invalid(format!("'{name}' parameter cannot contain NUL")));
                }
            }
        }
        c.hostname = opts.hostname.clone();
        c.domainname = opts.domainname.clone();
        c.hostfwd = opts
            .hostfwd
            .iter()
            .map(|r| HostFwd::parse(r))
            .collect::<Result<_, _>>()?;
        Ok(c)
    }

    /// QEMU's one-line summary of the backend (`info network`): `net=10.0.2.0,restrict=off`.
    pub fn summary(&self) -> String {
        let r = if self.restrict { "on" } else { "off" };
        format!("net={},restrict={r}", self.net)
    }
}

/// One `hostfwd=` rule: connections to the host's `host_addr:host_port` are forwarded to
/// the guest's `guest_addr:guest_port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFwd {
    /// The rule as written (for messages).
    pub rule: String,
    /// UDP instead of TCP.
    pub udp: bool,
    /// Host address to listen on (default 0.0.0.0, every address).
    pub host_addr: Ipv4Addr,
    /// Host port (0: the host picks one).
    pub host_port: u16,
    /// Guest address (default: the first DHCP address).
    pub guest_addr: Ipv4Addr,
    /// Guest port.
    pub guest_port: u16,
}

impl HostFwd {
    /// Parses `[tcp|udp]:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT`, with QEMU's messages.
    pub fn parse(rule: &str) -> Result<Self, Error> {
        let fail = |why: &str| invalid(format!("Invalid host forwarding rule '{rule}' ({why})"));
        let (proto, rest) = rule
            .split_once(':')
            .ok_or_else(|| fail("No : separators"))?;
        let udp = match proto {
            "" | "tcp" => false,
            "udp" => true,
            "unix" => return Err(fail("unix sockets are not supported by Keel")),
            _ => return Err(fail("Bad protocol name")),
        };
        let (haddr, rest) = rest
            .split_once(':')
            .ok_or_else(|| fail("Missing : separator"))?;
        let host_addr = if haddr.is_empty() {
            Ipv4Addr::UNSPECIFIED
        } else {
            haddr.parse().map_err(|_| fail("Bad host address"))?
        };
        let (hport, rest) = rest
            .split_once('-')
            .ok_or_else(|| fail("Bad host port separator"))?;
        let host_port = parse_port(hport).ok_or_else(|| fail("Bad host port"))?;
        let (gaddr, gport) = rest
            .split_once(':')
            .ok_or_else(|| fail("Missing guest address"))?;
        let guest_addr = if gaddr.is_empty() {
            Ipv4Addr::UNSPECIFIED
        } else {
            gaddr.parse().map_err(|_| fail("Bad guest address"))?
        };
        let guest_port = parse_port(gport)
            .filter(|p| *p != 0)
            .ok_or_else(|| fail("Bad guest port"))?;
        Ok(Self {
            rule: rule.to_owned(),
            udp,
            host_addr,
            host_port,
            guest_addr,
            guest_port,
        })
    }

    /// Parses the host side of `hostfwd_remove`: `[tcp|udp]:[HOSTADDR]:HOSTPORT`.
    pub fn parse_host(rule: &str) -> Result<(bool, Ipv4Addr, u16), Error> {
        let fail = || invalid("invalid format");
        let (proto, rest) = rule.split_once(':').ok_or_else(fail)?;
        let udp = match proto {
            "" | "tcp" => false,
            "udp" => true,
            _ => return Err(fail()),
        };
        let (haddr, port) = rest.split_once(':').ok_or_else(fail)?;
        let addr = if haddr.is_empty() {
            Ipv4Addr::UNSPECIFIED
        } else {
            haddr.parse().map_err(|_| fail())?
        };
        Ok((udp, addr, parse_port(port).ok_or_else(fail)?))
    }
}

/// A port as `qemu_strtoi(.., 0, ..)` reads it: decimal, `0x` hex or leading-0 octal.
fn parse_port(text: &str) -> Option<u16> {
    let t = text.trim_start();
    let v = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        i64::from_str_radix(h, 16).ok()?
    } else if t.len() > 1 && t.starts_with('0') {
        i64::from_str_radix(&t[1..], 8).ok()?
    } else {
        t.parse::<i64>().ok()?
    };
    u16::try_from(v).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(f: impl FnOnce(&mut UserOptions)) -> Result<UserConfig, Error> {
        let mut o = UserOptions::default();
        f(&mut o);
        UserConfig::from_options(&o)
    }

    fn msg(r: Result<UserConfig, Error>) -> String {
        r.err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn defaults_are_qemus() {
        let c = cfg(|_| {}).unwrap();
        assert_eq!(c, UserConfig::default());
        assert_eq!(c.summary(), "net=10.0.2.0,restrict=off");
    }

    #[test]
    fn net_moves_the_derived_addresses() {
        let c = cfg(|o| o.net = Some("192.168.76.0/24".into())).unwrap();
        assert_eq!(c.host, Ipv4Addr::new(192, 168, 76, 2));
        assert_eq!(c.dhcp_start, Ipv4Addr::new(192, 168, 76, 15));
        assert_eq!(c.dns, Ipv4Addr::new(192, 168, 76, 3));
        let c = cfg(|o| o.net = Some("10.1.2.3/255.255.0.0".into())).unwrap();
        assert_eq!(
            (c.net, c.mask),
            ("10.1.0.0".parse().unwrap(), "255.255.0.0".parse().unwrap())
        );
        assert_eq!(c.host, Ipv4Addr::new(10, 1, 2, 2));
        // No mask: the address's class decides (10/8 here).
        let c = cfg(|o| o.net = Some("10.9.0.0".into())).unwrap();
        assert_eq!(c.mask, Ipv4Addr::new(255, 0, 0, 0));
        assert_eq!(c.host, Ipv4Addr::new(10, 0, 2, 2));
    }

    #[test]
    fn inconsistent_addresses_get_qemus_messages() {
        assert_eq!(
            msg(cfg(|o| o.net = Some("10.0.2.0/3".into()))),
            "Invalid netmask provided (must be in range 4-32)"
        );
        assert_eq!(
            msg(cfg(|o| o.net = Some("ten".into()))),
            "Failed to parse netmask"
        );
        assert_eq!(
            msg(cfg(|o| o.host = Some("10.0.3.2".into()))),
            "Host doesn't belong to network"
        );
        assert_eq!(
            msg(cfg(|o| o.dns = Some("10.0.2.2".into()))),
            "DNS must be different from host"
        );
        assert_eq!(
            msg(cfg(|o| o.dhcpstart = Some("10.0.2.3".into()))),
            "DHCP must be different from host and DNS"
        );
        assert_eq!(
            msg(cfg(|o| o.dhcpstart = Some("10.0.5.3".into()))),
            "DHCP doesn't belong to network"
        );
        assert_eq!(
            msg(cfg(|o| {
                o.restrict = true;
                o.dns = Some("8.8.8.8".into());
            })),
            "DNS doesn't belong to network"
        );
        // Unrestricted, a DNS outside the network is fine (QEMU checks it only with restrict).
        assert!(cfg(|o| o.dns = Some("8.8.8.8".into())).is_ok());
        assert_eq!(
            msg(cfg(|o| {
                o.ipv4 = Some(false);
                o.ipv6 = Some(false);
            })),
            "IPv4 and IPv6 disabled"
        );
        assert_eq!(
            msg(cfg(|o| o.domainname = Some(String::new()))),
            "'domainname' parameter cannot be empty"
        );
    }

    #[test]
    fn hostfwd_rules() {
        let f = HostFwd::parse("tcp::2222-:22").unwrap();
        assert!(!f.udp);
        assert_eq!((f.host_addr, f.host_port), (Ipv4Addr::UNSPECIFIED, 2222));
        assert_eq!((f.guest_addr, f.guest_port), (Ipv4Addr::UNSPECIFIED, 22));
        let f = HostFwd::parse("udp:127.0.0.1:5555-10.0.2.20:53").unwrap();
        assert!(f.udp);
        assert_eq!(f.host_addr, Ipv4Addr::LOCALHOST);
        assert_eq!(f.guest_addr, Ipv4Addr::new(10, 0, 2, 20));
        let f = HostFwd::parse(":127.0.0.1:0x10-:010").unwrap();
        assert_eq!((f.host_port, f.guest_port), (16, 8));
        for (rule, why) in [
            ("tcp", "No : separators"),
            ("sctp::1-:2", "Bad protocol name"),
            ("tcp:1-2", "Missing : separator"),
            ("tcp:nohost:1-:2", "Bad host address"),
            ("tcp::1:2", "Bad host port separator"),
            ("tcp::70000-:2", "Bad host port"),
            ("tcp::1-2", "Missing guest address"),
            ("tcp::1-x:2", "Bad guest address"),
            ("tcp::1-:0", "Bad guest port"),
        ] {
            let e = HostFwd::parse(rule).unwrap_err().to_string();
            assert_eq!(e, format!("Invalid host forwarding rule '{rule}' ({why})"));
        }
        assert_eq!(
            HostFwd::parse_host("udp:127.0.0.1:53").unwrap(),
            (true, Ipv4Addr::LOCALHOST, 53)
        );
        assert!(HostFwd::parse_host("tcp:53").is_err());
    }
}
