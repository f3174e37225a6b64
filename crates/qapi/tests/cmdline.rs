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
    let e = parse(&args(&["-nic", "user"])).unwrap_err().to_string();
    assert!(e.contains("only '-nic none' is supported"), "{e}");
    assert!(matches!(
        steps(&["-nic", "none", "-net", "none"]).as_slice(),
        [(_, Action::Nothing), (_, Action::Nothing)]
    ));
}
