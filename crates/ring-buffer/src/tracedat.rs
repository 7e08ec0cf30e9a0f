//! Export (feature `std`): a trace-cmd `trace.dat` file (version 6, `man 5 trace-cmd.dat.v6`)
//! holding the ring's sub-buffers unchanged as each CPU's data, so `trace-cmd report FILE`
//! lists the events.
//!
//! The file says what Linux's tracefs says about the format: `header_page` (the sub-buffer
//! header, with the data size of this buffer's sub-buffers) and `header_event` (the compressed
//! event header). Then event formats: trace-cmd reads an event's type from its first two
//! payload bytes (`common_type`), and this crate's events are whatever bytes the writer
//! wrote, so the file declares, for every first-two-bytes value present in the data, one
//! event `oskit/text_XXXX` whose only shown field is the whole payload as a string
//! (`char text[]` at offset 0). `trace-cmd report` then prints each event as the payload's
//! text (up to its first zero byte), with the time stamps the sub-buffers carry and the lost
//! events their commit words flag.
//!
//! Host-side and allocating (it is an export for a development machine, not something a kernel
//! runs): hence `std`, behind the feature that already gates the other OS glue.

use std::{
    collections::BTreeSet,
    io::{self, Write},
    string::String,
    vec::Vec,
};

use crate::format::{SUBBUF_HEADER_SIZE, Subbuf};

/// The `header_page` description for sub-buffers of `subbuf_size` bytes (Linux's
/// `events/header_page`: time stamp, commit word, the overwrite bit, the data).
pub fn header_page(subbuf_size: usize) -> String {
    format!(
        "\tfield: u64 timestamp;\toffset:0;\tsize:8;\tsigned:0;\n\
         \tfield: local_t commit;\toffset:8;\tsize:8;\tsigned:1;\n\
         \tfield: int overwrite;\toffset:8;\tsize:1;\tsigned:1;\n\
         \tfield: char data;\toffset:16;\tsize:{};\tsigned:0;\n",
        subbuf_size - SUBBUF_HEADER_SIZE
    )
}

/// The `header_event` description (Linux's `events/header_event`).
pub const HEADER_EVENT: &str = "# compressed entry header\n\
    \ttype_len    :    5 bits\n\
    \ttime_delta  :   27 bits\n\
    \tarray       :   32 bits\n\
    \n\
    \tpadding     : type == 29\n\
    \ttime_extend : type == 30\n\
    \ttime_stamp : type == 31\n\
    \tdata max type_len  == 28\n";

/// The format file of the event type `id`: the payload as one string.
pub fn event_format(id: u16) -> String {
    format!(
        "name: text_{id:04x}\n\
         ID: {id}\n\
         format:\n\
         \tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
         \n\
         \tfield:char text[];\toffset:0;\tsize:0;\tsigned:0;\n\
         \n\
         print fmt: \"%s\", REC->text\n"
    )
}

/// The event system the formats are declared in.
pub const SYSTEM: &str = "oskit";

/// Writes a `trace.dat` (version 6) to `out`: `cpus[i]` is CPU `i`'s data, whole sub-buffers
/// of `subbuf_size` bytes one after the other, oldest first (what `read_page` returns, a
/// `dump` file, a `trace_pipe_raw` capture). The sub-buffers go into the file unchanged.
///
/// Errors: `InvalidInput` for a `subbuf_size` that is not a power of two of at least 4 KiB,
/// a CPU's data that is not whole sub-buffers, or a sub-buffer that does not parse (see
/// [`Subbuf`]); otherwise what `out` returns.
pub fn write_trace_dat<W: Write>(mut out: W, subbuf_size: usize, cpus: &[&[u8]]) -> io::Result<()> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidInput, why.to_string());
    if !subbuf_size.is_power_of_two() || subbuf_size < 4096 {
        return Err(bad("sub-buffer size not a power of two of at least 4096"));
    }
    // Every first-two-bytes value of every event: one format each.
    let mut ids = BTreeSet::new();
    for data in cpus {
        if data.len() % subbuf_size != 0 {
            return Err(bad("CPU data is not whole sub-buffers"));
        }
        for page in data.chunks(subbuf_size) {
            let mut sb = Subbuf::new(page).map_err(|_| bad("a sub-buffer does not parse"))?;
            while let Some(ev) = sb
                .next_event()
                .map_err(|_| bad("an event does not decode"))?
            {
                ids.insert(u16::from_le_bytes([ev.payload[0], ev.payload[1]]));
            }
        }
    }

    let mut head = Vec::new();
    head.extend_from_slice(b"\x17\x08\x44tracing6\0");
    head.push(0); // little endian
    head.push(8); // long size
    head.extend_from_slice(&(subbuf_size as u32).to_le_bytes());
    let header_page = header_page(subbuf_size);
    head.extend_from_slice(b"header_page\0");
    head.extend_from_slice(&(header_page.len() as u64).to_le_bytes());
    head.extend_from_slice(header_page.as_bytes());
    head.extend_from_slice(b"header_event\0");
    head.extend_from_slice(&(HEADER_EVENT.len() as u64).to_le_bytes());
    head.extend_from_slice(HEADER_EVENT.as_bytes());
    head.extend_from_slice(&0u32.to_le_bytes()); // no ftrace event formats
    if ids.is_empty() {
        head.extend_from_slice(&0u32.to_le_bytes()); // no event systems
    } else {
        head.extend_from_slice(&1u32.to_le_bytes());
        head.extend_from_slice(SYSTEM.as_bytes());
        head.push(0);
        head.extend_from_slice(&(ids.len() as u32).to_le_bytes());
        for &id in &ids {
            let f = event_format(id);
            head.extend_from_slice(&(f.len() as u64).to_le_bytes());
            head.extend_from_slice(f.as_bytes());
        }
    }
    head.extend_from_slice(&0u32.to_le_bytes()); // kallsyms
    head.extend_from_slice(&0u32.to_le_bytes()); // printk formats
    head.extend_from_slice(&0u64.to_le_bytes()); // saved cmdlines
    head.extend_from_slice(&(cpus.len() as u32).to_le_bytes());
    head.extend_from_slice(b"flyrecord\0");
    // The CPU data starts page-aligned after the offset/size table.
    let table_end = head.len() + cpus.len() * 16;
    let mut offset = table_end.div_ceil(subbuf_size) * subbuf_size;
    for data in cpus {
        head.extend_from_slice(&(offset as u64).to_le_bytes());
        head.extend_from_slice(&(data.len() as u64).to_le_bytes());
        offset += data.len().div_ceil(subbuf_size) * subbuf_size;
    }
    head.resize(table_end.div_ceil(subbuf_size) * subbuf_size, 0);
    out.write_all(&head)?;
    for data in cpus {
        out.write_all(data)?;
    }
    out.flush()
}
