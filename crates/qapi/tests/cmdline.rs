//! The command line as scripts in the wild write it: QEMU's shorthands become the same
//! steps as their long forms.

use keel_qapi::cmdline::{Action, Invocation, parse};

fn steps(args: &[&str]) -> Vec<(String, Action)> {
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    match parse(&args) {
        Ok(Invocation::Run(steps)) => steps.into_iter().map(|s| (s.option, s.action)).collect(),
        other => panic!("{args:?}: {other:?}"),
    }
}

#[test]
fn drive_if_virtio_is_a_drive_and_a_virtio_blk() {
    let s = steps(&[
        "-drive",
        "file=a.img,format=raw,if=virtio",
        "-drive",
        "file=b.img,if=virtio,id=mine,readonly=on",
    ]);
    assert_eq!(s.len(), 4, "{s:?}");
    let (Action::Blockdev(a), Action::Device(da)) = (&s[0].1, &s[1].1) else {
        panic!("{s:?}")
    };
    assert_eq!(
        (a.node_name.as_str(), a.read_only),
        ("virtio0", Some(false))
    );
    assert_eq!(da.driver, "virtio-blk");
    assert_eq!(da.props["drive"], "virtio0");
    let (Action::Blockdev(b), Action::Device(db)) = (&s[2].1, &s[3].1) else {
        panic!("{s:?}")
    };
    assert_eq!((b.node_name.as_str(), b.read_only), ("mine", Some(true)));
    assert_eq!(db.props["drive"], "mine");
    // Both steps carry the option as written, for messages.
    assert_eq!(s[0].0, "-drive file=a.img,format=raw,if=virtio");
    assert_eq!(s[1].0, s[0].0);
}

#[test]
fn other_drive_interfaces_and_networks_say_what_to_use() {
    let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let e = parse(&args(&["-drive", "file=a.img,if=ide"]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("if=ide is not supported (use if=virtio"), "{e}");
    // QEMU's default -nic model (e1000 on pc) does not exist in Keel: the message says
    // which model to give.
    let e = parse(&args(&["-nic", "user"])).unwrap_err().to_string();
    assert!(e.contains("add model=virtio-net-pci (pc)"), "{e}");
    let e = parse(&args(&["-nic", "user,model=e1000"]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("NIC model 'e1000' is not available"), "{e}");
    let e = parse(&args(&["-net", "user"])).unwrap_err().to_string();
    assert!(e.contains("-nic user,model=virtio-net-pci"), "{e}");
    assert!(matches!(
        steps(&["-nic", "none", "-net", "none"]).as_slice(),
        [(_, Action::Nothing), (_, Action::Nothing)]
    ));
}

#[test]
fn nic_is_a_netdev_and_its_device() {
    let s = steps(&[
        "-nic",
        "user,model=virtio,mac=52:54:00:12:34:99,hostfwd=tcp::2222-:22,hostfwd=udp::5353-:53",
        "-nic",
        "user,id=up,model=virtio-net-device,restrict=on",
    ]);
    let (Action::Netdev(n), Action::Device(d)) = (&s[0].1, &s[1].1) else {
        panic!("{s:?}")
    };
    assert_eq!(
        (n.kind.as_str(), n.id.as_str()),
        ("user", "__org.qemu.nic0")
    );
    let rules: Vec<&str> = n.hostfwd.iter().flatten().map(|r| r.str.as_str()).collect();
    assert_eq!(rules, ["tcp::2222-:22", "udp::5353-:53"]);
    assert_eq!(d.driver, "virtio-net-pci");
    assert_eq!(d.props["netdev"], "__org.qemu.nic0");
    assert_eq!(d.props["mac"], "52:54:00:12:34:99");
    let (Action::Netdev(n), Action::Device(d)) = (&s[2].1, &s[3].1) else {
        panic!("{s:?}")
    };
    assert_eq!((n.id.as_str(), n.restrict), ("up", Some(true)));
    assert_eq!(d.driver, "virtio-net-device");
    assert_eq!(d.props["netdev"], "up");
}

#[test]
fn netdev_user_options() {
    let s = steps(&[
        "-netdev",
        "user,id=n0,net=192.168.76.0/24,dhcpstart=192.168.76.9,hostname=g,ipv6=off,hostfwd=tcp::1-:2",
    ]);
    let Action::Netdev(n) = &s[0].1 else {
        panic!("{s:?}")
    };
    assert_eq!(n.net.as_deref(), Some("192.168.76.0/24"));
    assert_eq!(n.dhcpstart.as_deref(), Some("192.168.76.9"));
    assert_eq!(n.hostname.as_deref(), Some("g"));
    assert_eq!(n.ipv6, Some(false));
    assert_eq!(n.hostfwd.as_ref().map(Vec::len), Some(1));
    let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let e = parse(&args(&["-netdev", "user,id=n0,smb=/tmp"]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("Invalid parameter 'smb'"), "{e}");
    let e = parse(&args(&["-netdev", "user,id=n0,restrict=maybe"]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("'restrict' expects 'on' or 'off'"), "{e}");
}
