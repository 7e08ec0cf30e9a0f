//! OS glue (feature `std`, Linux): map the running kernel's own trace buffer through
//! `per_cpu/cpuN/trace_pipe_raw` of a tracefs mount and read it with [`MappedReader`].
//!
//! Linux ≥ 6.10 supports this; older kernels fail the `mmap` (`ENODEV`/`EINVAL`).

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd, RawFd},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use crate::{
    error::Error,
    format::{PAGE_SIZE, TRACE_MMAP_IOCTL_GET_READER, TraceBufferMeta},
    mapped::{MappedReader, RawRegion},
};

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Os(e.raw_os_error().unwrap_or(5))
    }
}

/// Where tracefs is mounted: `/sys/kernel/tracing`, else `/sys/kernel/debug/tracing`.
pub fn find_tracefs() -> Option<PathBuf> {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("per_cpu").is_dir())
}

/// A CPU's `trace_pipe_raw`, mapped read-only.
#[derive(Debug)]
pub struct TracefsMap {
    file: File,
    base: *mut libc::c_void,
    len: usize,
}

fn mmap(fd: RawFd, len: usize) -> io::Result<*mut libc::c_void> {
    // SAFETY: a fresh shared read-only mapping of a file we hold open; no existing memory is
    // affected.
    let p = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(p)
    }
}

impl TracefsMap {
    /// Maps `per_cpu/cpu<cpu>/trace_pipe_raw` under the tracefs directory `dir` (the top
    /// level or an `instances/NAME` directory).
    pub fn open(dir: &Path, cpu: usize) -> io::Result<Self> {
        let path = dir.join(format!("per_cpu/cpu{cpu}/trace_pipe_raw"));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        let fd = file.as_raw_fd();
        // The meta page alone first, to learn the size of the whole mapping.
        let meta_map = mmap(fd, PAGE_SIZE)?;
        // SAFETY: the first page is mapped readable and holds the meta struct (80 bytes).
        let meta = unsafe { meta_map.cast::<TraceBufferMeta>().read_volatile() };
        // SAFETY: unmapping exactly what we mapped above.
        unsafe { libc::munmap(meta_map, PAGE_SIZE) };
        let len = (meta.nr_subbufs as usize)
            .checked_mul(meta.subbuf_size as usize)
            .and_then(|s| s.checked_add(meta.meta_page_size as usize))
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let base = mmap(fd, len)?;
        Ok(Self { file, base, len })
    }

    /// Asks the kernel for a new reader sub-buffer (`TRACE_MMAP_IOCTL_GET_READER`).
    pub fn get_reader(&self) -> Result<(), Error> {
        // SAFETY: this ioctl takes no argument and only updates the kernel's mapping.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TRACE_MMAP_IOCTL_GET_READER as libc::c_ulong,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error().into())
        } else {
            Ok(())
        }
    }

    /// Waits until the kernel says the buffer has data to read (`poll` for `POLLIN`: the
    /// instance's `buffer_percent` decides how much; 0 wakes on any event), at most
    /// `timeout`. Returns whether it has, `false` on timeout. Blocks the calling thread;
    /// signals do not end the wait early.
    pub fn wait(&self, timeout: std::time::Duration) -> Result<bool, Error> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            let mut fd = libc::pollfd {
                fd: self.file.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for a file we hold open.
            let r = unsafe { libc::poll(&mut fd, 1, ms) };
            match r {
                0 => return Ok(false),
                r if r > 0 => return Ok(fd.revents & libc::POLLIN != 0),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e.into());
                    }
                }
            }
        }
    }

    /// A [`MappedReader`] over the mapping.
    pub fn reader(
        &self,
    ) -> Result<MappedReader<RawRegion, impl FnMut() -> Result<(), Error> + '_>, Error> {
        // SAFETY: the mapping lives as long as `self`, which the reader borrows.
        let region = unsafe { RawRegion::new(self.base.cast(), self.len) };
        MappedReader::new(region, move || self.get_reader())
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never, once open).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for TracefsMap {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in `open`; readers borrowing it are gone.
        unsafe { libc::munmap(self.base, self.len) };
    }
}
