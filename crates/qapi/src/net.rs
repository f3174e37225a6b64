//! Network backends (QEMU's `qapi/net.json`).

use keel_qmp::schema::{opt, req};
use keel_qmp::{Command, Type};
use serde::{Deserialize, Serialize};

use crate::ANY;

/// `netdev_add` with `type: "tap"` or `type: "user"` (QEMU's `Netdev` union, the members
/// of those two branches).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NetdevAdd {
    /// `tap` or `user`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Netdev id, referenced by a device's `netdev=`.
    pub id: String,
    /// Host tap interface (tap).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ifname: Option<String>,
    /// Must be `no` (tap; Keel runs no scripts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
    /// Must be `no` (tap).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downscript: Option<String>,
    /// Guest network `ADDR[/MASK]` (user; default 10.0.2.0/24).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub net: Option<String>,
    /// The host's address on it (user; default .2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// First DHCP address (user; default .15).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dhcpstart: Option<String>,
    /// The DNS server's address (user; default .3).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<String>,
    /// Host name DHCP gives the guest (user).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// DNS domain DHCP gives the guest (user).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domainname: Option<String>,
    /// Isolate the guest: only `hostfwd` connections (user).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restrict: Option<bool>,
    /// IPv4 on (user; default on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<bool>,
    /// IPv6 on (user; default on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<bool>,
    /// Port forwards `[tcp|udp]:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT` (user).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostfwd: Option<Vec<StringWrapper>>,
}

/// QAPI's `String` struct: `{"str": "..."}`, how lists of strings travel in `Netdev`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StringWrapper {
    /// The string.
    pub str: String,
}

impl Command for NetdevAdd {
    const NAME: &'static str = "netdev_add";
    const PHASES: keel_phase::PhaseSet = ANY;
    type Output = ();
    fn arguments() -> Type {
        Type::object(
            "Netdev",
            vec![
                req("type", Type::str()),
                req("id", Type::str()),
                opt("ifname", Type::str()),
                opt("script", Type::str()),
                opt("downscript", Type::str()),
                opt("net", Type::str()),
                opt("host", Type::str()),
                opt("dhcpstart", Type::str()),
                opt("dns", Type::str()),
                opt("hostname", Type::str()),
                opt("domainname", Type::str()),
                opt("restrict", Type::bool()),
                opt("ipv4", Type::bool()),
                opt("ipv6", Type::bool()),
                opt(
                    "hostfwd",
                    Type::array(Type::object("String", vec![req("str", Type::str())])),
                ),
            ],
        )
    }
}
