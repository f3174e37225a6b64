//! QEMU's character multiplexer escapes on a serial port's standard input (`-serial
//! mon:stdio`, `-nographic`): after the escape character (C-a unless `-echr` says
//! otherwise) `h` prints the help, `x` ends the process ("QEMU: Terminated", status 0),
//! the escape character again sends it to the guest; other commands are ignored, as QEMU
//! ignores unknown ones. (QEMU's `c`, which switches stdio to its human monitor, is not
//! offered: Keel's human monitor takes stdio with `-monitor stdio` instead.)

use std::sync::atomic::{AtomicU8, Ordering};

/// The escape character, process-wide as QEMU's `-echr`.
static ESCAPE: AtomicU8 = AtomicU8::new(1);

/// Sets the escape character (`-echr N`; QEMU's default is 1, C-a).
pub fn set_mux_escape(ch: u8) {
    ESCAPE.store(ch, Ordering::Relaxed);
}

/// The escape character.
pub fn mux_escape() -> u8 {
    ESCAPE.load(Ordering::Relaxed)
}

/// What one input byte means to the mux.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MuxByte {
    /// Give this byte to the guest.
    Send(u8),
    /// Nothing (the escape character, or an unknown command after it).
    Nothing,
    /// Print [`mux_help`].
    Help,
    /// End the process, as QEMU's `quit`.
    Exit,
}

/// The mux's input state: whether the last byte was the escape character.
#[derive(Debug, Clone)]
pub struct MuxInput {
    escape: u8,
    pending: bool,
}

impl MuxInput {
    /// A mux with escape character `escape`.
    pub fn new(escape: u8) -> Self {
        Self {
            escape,
            pending: false,
        }
    }

    /// Reads one byte.
    pub fn byte(&mut self, b: u8) -> MuxByte {
        if !self.pending {
            if b == self.escape {
                self.pending = true;
                return MuxByte::Nothing;
            }
            return MuxByte::Send(b);
        }
        self.pending = false;
        match b {
            _ if b == self.escape => MuxByte::Send(b),
            b'h' | b'?' => MuxByte::Help,
            b'x' => MuxByte::Exit,
            _ => MuxByte::Nothing,
        }
    }
}

/// What `C-a x` writes before the process ends (QEMU's words).
pub const MUX_TERMINATED: &str = "QEMU: Terminated\n\r";

/// QEMU 7.2's mux help for escape character `escape`, byte for byte (`C-a` for the
/// control characters 1-25, else a note of the ASCII code and `Escape-Char`).
pub fn mux_help(escape: u8) -> String {
    let (head, e) = if (1..26).contains(&escape) {
        (
            "\n\r".to_owned(),
            format!("C-{}", char::from(escape - 1 + b'a')),
        )
    } else {
        (
            format!("\n\rEscape-Char set to Ascii: 0x{escape:02x}\n\r\n\r"),
            "Escape-Char".to_owned(),
        )
    };
    let lines = [
        "% h    print this help\n\r",
        "% x    exit emulator\n\r",
        "% s    save disk data back to file (if -snapshot)\n\r",
        "% t    toggle console timestamps\n\r",
        "% b    send break (magic sysrq)\n\r",
        "% c    switch between console and monitor\n\r",
        "% %  sends %\n\r",
    ];
    let mut s = head;
    for l in lines {
        s.push_str(&l.replace('%', &e));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_as_qemus_mux() {
        let mut m = MuxInput::new(1);
        let got: Vec<MuxByte> = b"a\x01\x01\x01h\x01zb\x01x"
            .iter()
            .map(|&b| m.byte(b))
            .collect();
        use MuxByte::*;
        assert_eq!(
            got,
            [
                Send(b'a'),
                Nothing,
                Send(1),
                Nothing,
                Help,
                Nothing,
                Nothing,
                Send(b'b'),
                Nothing,
                Exit
            ]
        );
    }

    #[test]
    fn help_is_qemus_text() {
        let h = mux_help(1);
        assert!(h.starts_with("\n\rC-a h    print this help\n\rC-a x    exit emulator\n\r"));
        assert!(h.ends_with("C-a C-a  sends C-a\n\r"), "{h:?}");
        let h = mux_help(0x14);
        assert!(h.contains("C-t x    exit emulator"), "{h:?}");
        let h = mux_help(0x7e);
        assert!(h.starts_with("\n\rEscape-Char set to Ascii: 0x7e\n\r\n\rEscape-Char h"));
    }
}
