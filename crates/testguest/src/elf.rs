//! A minimal ELF64 writer: one loadable segment plus the Xen PVH entry note.

/// `XEN_ELFNOTE_PHYS32_ENTRY`: the 32-bit physical entry point of a PVH kernel.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const SEGMENT_OFFSET: usize = 0x1000;

fn put16(b: &mut Vec<u8>, v: u16) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}

#[allow(clippy::too_many_arguments)]
fn phdr(b: &mut Vec<u8>, p_type: u32, flags: u32, off: u64, addr: u64, size: u64, align: u64) {
    put32(b, p_type);
    put32(b, flags);
    put64(b, off);
    put64(b, addr); // p_vaddr
    put64(b, addr); // p_paddr
    put64(b, size); // p_filesz
    put64(b, size); // p_memsz
    put64(b, align);
}

/// Builds the ELF file: `image` loaded at physical `load_addr`, PVH entry at `entry`.
pub(crate) fn pvh_elf(image: &[u8], load_addr: u64, entry: u64) -> Vec<u8> {
    let mut note = Vec::new();
    put32(&mut note, 4); // namesz ("Xen\0")
    put32(&mut note, 8); // descsz (a 64-bit address, as Linux's vmlinux has it)
    put32(&mut note, XEN_ELFNOTE_PHYS32_ENTRY);
    note.extend_from_slice(b"Xen\0");
    put64(&mut note, entry);
    let note_off = EHDR_SIZE + 2 * PHDR_SIZE;

    let mut b = Vec::with_capacity(SEGMENT_OFFSET + image.len());
    b.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    b.extend_from_slice(&[0; 8]);
    put16(&mut b, 2); // ET_EXEC
    put16(&mut b, 62); // EM_X86_64
    put32(&mut b, 1); // EV_CURRENT
    put64(&mut b, entry);
    put64(&mut b, EHDR_SIZE as u64); // e_phoff
    put64(&mut b, 0); // e_shoff
    put32(&mut b, 0); // e_flags
    put16(&mut b, EHDR_SIZE as u16);
    put16(&mut b, PHDR_SIZE as u16);
    put16(&mut b, 2); // e_phnum
    put16(&mut b, 64); // e_shentsize
    put16(&mut b, 0); // e_shnum
    put16(&mut b, 0); // e_shstrndx
    phdr(
        &mut b,
        PT_LOAD,
        7,
        SEGMENT_OFFSET as u64,
        load_addr,
        image.len() as u64,
        0x1000,
    );
    phdr(&mut b, PT_NOTE, 4, note_off as u64, 0, note.len() as u64, 4);
    b.extend_from_slice(&note);
    b.resize(SEGMENT_OFFSET, 0);
    b.extend_from_slice(image);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_note_are_where_loaders_look() {
        let elf = pvh_elf(&[0x90, 0xf4], 0x10_0000, 0x10_0000);
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(elf[4], 2, "ELFCLASS64");
        let note_off = EHDR_SIZE + 2 * PHDR_SIZE;
        assert_eq!(
            u32::from_le_bytes(elf[note_off + 8..note_off + 12].try_into().unwrap()),
            18
        );
        assert_eq!(&elf[note_off + 12..note_off + 16], b"Xen\0");
        assert_eq!(
            u32::from_le_bytes(elf[note_off + 16..note_off + 20].try_into().unwrap()),
            0x10_0000
        );
        assert_eq!(&elf[SEGMENT_OFFSET..], &[0x90, 0xf4]);
    }
}
