//! What the PVH loader hands over: `struct hvm_start_info` (Xen's `arch-x86/hvm/start_info.h`),
//! with its memory map and command line.

use core::{mem::size_of, slice};

/// `XEN_HVM_START_MAGIC_VALUE`.
pub const START_MAGIC: u32 = 0x336e_c578;
/// E820 type of ordinary RAM.
pub const MEMMAP_RAM: u32 = 1;

#[repr(C)]
struct StartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    _reserved: u32,
}

const _: () = assert!(size_of::<StartInfo>() == 56);

/// One `struct hvm_memmap_table_entry`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct MemmapEntry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// E820 type ([`MEMMAP_RAM`] for RAM).
    pub kind: u32,
    _reserved: u32,
}

/// The boot information the kernel uses.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    /// The physical memory map.
    pub memmap: &'static [MemmapEntry],
    /// The command line (`-append`), empty when none.
    pub cmdline: &'static str,
    /// Physical address of the ACPI RSDP (0 when the loader gave none).
    pub rsdp: u64,
}

impl BootInfo {
    /// The value of `key=value` on the command line.
    pub fn arg(&self, key: &str) -> Option<&'static str> {
        self.cmdline.split_ascii_whitespace().find_map(|word| {
            let (k, v) = word.split_once('=')?;
            (k == key).then_some(v)
        })
    }
}

/// Reads the start info at physical address `paddr` (identity-mapped below 4 GiB).
///
/// # Safety
/// `paddr` is what the PVH loader passed in `%ebx`, and the memory it describes is left untouched
/// for the life of the kernel.
pub unsafe fn parse(paddr: u32) -> Result<BootInfo, &'static str> {
    if paddr == 0 || !(paddr as usize).is_multiple_of(align_of::<StartInfo>()) {
        return Err("start info pointer is null or misaligned");
    }
    // SAFETY: by the contract the loader put a start info there; magic is checked before use.
    let info = unsafe { &*(paddr as usize as *const StartInfo) };
    if info.magic != START_MAGIC {
        return Err("start info has the wrong magic");
    }
    if info.version < 1 || info.memmap_paddr == 0 || info.memmap_entries == 0 {
        return Err("start info has no memory map (version 0 loader)");
    }
    if info.memmap_paddr >= 1 << 32 || info.cmdline_paddr >= 1 << 32 {
        return Err("start info points above the identity-mapped 4 GiB");
    }
    // SAFETY: the loader's memory map, in identity-mapped low memory the kernel never reuses.
    let memmap = unsafe {
        slice::from_raw_parts(
            info.memmap_paddr as usize as *const MemmapEntry,
            info.memmap_entries as usize,
        )
    };
    let cmdline = if info.cmdline_paddr == 0 {
        ""
    } else {
        // SAFETY: a NUL-terminated string the loader placed in low memory.
        let bytes = unsafe { core::ffi::CStr::from_ptr(info.cmdline_paddr as usize as *const _) };
        bytes.to_str().map_err(|_| "command line is not UTF-8")?
    };
    Ok(BootInfo {
        memmap,
        cmdline,
        rsdp: info.rsdp_paddr,
    })
}
