//! Bookkeeping arrays carved out of whole pages from the caller's [`PageAlloc`]: the crate needs
//! no global allocator.

use core::{cell::UnsafeCell, mem, ptr::NonNull};

use crate::{error::Error, format::PAGE_SIZE, hal::PageAlloc};

/// Smallest order whose pages hold `bytes`.
pub(crate) const fn order_for(bytes: usize) -> u32 {
    let pages = bytes.div_ceil(PAGE_SIZE);
    let pages = if pages == 0 { 1 } else { pages };
    pages.next_power_of_two().trailing_zeros()
}

/// `len` values of `T` in pages of their own. Dropping it leaks: call [`PageArray::free`].
pub(crate) struct PageArray<T> {
    ptr: NonNull<T>,
    len: usize,
    order: u32,
}

// SAFETY: a `PageArray<T>` owns its `T`s like a `Box<[T]>` does.
unsafe impl<T: Send> Send for PageArray<T> {}
// SAFETY: shared access only hands out `&T`.
unsafe impl<T: Sync> Sync for PageArray<T> {}

impl<T> PageArray<T> {
    /// Allocates and fills the array with `init(i)`.
    pub(crate) fn new<A: PageAlloc>(
        alloc: &A,
        len: usize,
        mut init: impl FnMut(usize) -> Result<T, Error>,
        mut undo: impl FnMut(&T),
    ) -> Result<Self, Error> {
        const { assert!(mem::align_of::<T>() <= PAGE_SIZE) };
        let bytes = len
            .checked_mul(mem::size_of::<T>())
            .ok_or(Error::NoMemory)?;
        let order = order_for(bytes);
        let ptr = alloc.alloc_pages(order).ok_or(Error::NoMemory)?.cast::<T>();
        let mut arr = Self { ptr, len: 0, order };
        for i in 0..len {
            match init(i) {
                Ok(v) => {
                    // SAFETY: `i < len` and the pages hold `len` values of `T`, aligned because
                    // pages are page-aligned and `T`'s alignment is at most a page.
                    unsafe { arr.ptr.add(i).write(v) };
                    arr.len = i + 1;
                }
                Err(e) => {
                    arr.iter().for_each(&mut undo);
                    // SAFETY: the array came from `alloc` and is dropped here.
                    unsafe { arr.free(alloc) };
                    return Err(e);
                }
            }
        }
        Ok(arr)
    }

    /// Drops the values and gives the pages back.
    ///
    /// # Safety
    ///
    /// `alloc` is the allocator the array came from.
    pub(crate) unsafe fn free<A: PageAlloc>(self, alloc: &A) {
        // SAFETY: the first `len` values are initialised and dropped once, here.
        unsafe { core::ptr::slice_from_raw_parts_mut(self.ptr.as_ptr(), self.len).drop_in_place() };
        // SAFETY: the pages came from `alloc.alloc_pages(self.order)`.
        unsafe { alloc.free_pages(self.ptr.cast(), self.order) };
    }
}

impl<T> core::ops::DerefMut for PageArray<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: `len` initialised values live at `ptr`, and `&mut self` is exclusive.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> core::ops::Deref for PageArray<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `len` initialised values live at `ptr` for as long as `self`.
        unsafe { core::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

/// The address of a sub-buffer's memory. `read_page` exchanges the reader sub-buffer's memory
/// for the caller's page in place, under the reader lock, while writers use other sub-buffers:
/// a cell, so that shared references to the descriptors (which writers hold) do not claim it
/// is frozen. Reads are plain loads.
#[repr(transparent)]
pub(crate) struct SubbufMem(UnsafeCell<NonNull<u8>>);

impl SubbufMem {
    pub(crate) const fn new(mem: NonNull<u8>) -> Self {
        Self(UnsafeCell::new(mem))
    }

    /// The address.
    #[inline(always)]
    pub(crate) fn get(&self) -> NonNull<u8> {
        // SAFETY: only `set` writes the cell, and its contract excludes concurrent readers.
        unsafe { *self.0.get() }
    }

    /// The address as a raw pointer.
    #[inline(always)]
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.get().as_ptr()
    }

    /// Replaces the address.
    ///
    /// # Safety
    ///
    /// Nobody reads or writes this address concurrently (for a sub-buffer in a buffer: it is
    /// the reader sub-buffer, the writer has left it, and the reader lock is held).
    pub(crate) unsafe fn set(&self, mem: NonNull<u8>) {
        // SAFETY: no concurrent access, by the contract.
        unsafe { *self.0.get() = mem };
    }
}
