//! Differential tests against the live Linux kernel (root): the same fork layout through the
//! kernel and through the crate's copy, page by page.
//!
//! The kernel side: anonymous memory faulted in as 64 KiB folios (mTHP size enabled for the
//! test, restored afterwards), split by `mprotect` and `munmap` at odd offsets, forked; the
//! parent's and child's `/proc/PID/pagemap` (PFN, exclusive, swap), `/proc/kpagecount` and
//! `/proc/kpageflags` before and after the child writes some pages. The model side: the same
//! folios (read from `kpageflags`) and entries in `SimFolios` / `SimSpace`, forked with
//! [`Fork`], the child's writes as copy-on-write faults. Every page must agree on sharing,
//! exclusivity, map count and the COW outcome.
#![cfg(target_os = "linux")]

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use oskit_pte_batch::hal::PAGE_SIZE;
use oskit_pte_batch::sim::{SimFolios, SimPage, SimSpace};
use oskit_pte_batch::{
    FolioOps, Fork, NonPresent, PageAlloc, PageTable, PteFormat, VmFlags, Vma, X86Flags, X86Pte,
};

const MTHP_64K: &str = "/sys/kernel/mm/transparent_hugepage/hugepages-64kB/enabled";
const PM_PFN: u64 = (1 << 55) - 1;
const PM_EXCLUSIVE: u64 = 1 << 56;
const PM_SWAP: u64 = 1 << 62;
const PM_PRESENT: u64 = 1 << 63;
const KPF_COMPOUND_HEAD: u64 = 1 << 15;
const KPF_COMPOUND_TAIL: u64 = 1 << 16;

/// Why the kernel side cannot run here, if it cannot.
fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (pagemap PFNs, kpagecount and the mTHP switch need it)".into());
    }
    for p in [MTHP_64K, "/proc/kpagecount", "/proc/kpageflags"] {
        if fs::metadata(p).is_err() {
            return Some(format!(
                "{p} is missing (kernel without mTHP or page monitoring)"
            ));
        }
    }
    None
}

/// Sets a sysfs switch and puts the old value back when dropped (also on panic).
struct Switch {
    path: &'static str,
    old: String,
}

impl Switch {
    fn set(path: &'static str, value: &str) -> std::io::Result<Self> {
        let text = fs::read_to_string(path)?;
        // "always inherit madvise [never]": the bracketed word is the setting.
        let old = text
            .split_whitespace()
            .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
            .unwrap_or("never")
            .to_string();
        fs::write(path, value)?;
        Ok(Self { path, old })
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        let _ = fs::write(self.path, &self.old);
    }
}

fn read_u64s(file: &File, index: u64, n: usize) -> Vec<u64> {
    let mut buf = vec![0u8; n * 8];
    file.read_exact_at(&mut buf, index * 8)
        .expect("read a /proc table");
    buf.chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

struct Kpage {
    count: File,
    flags: File,
}

impl Kpage {
    fn open() -> Self {
        Self {
            count: File::open("/proc/kpagecount").unwrap(),
            flags: File::open("/proc/kpageflags").unwrap(),
        }
    }
    fn count(&self, pfn: u64) -> u64 {
        read_u64s(&self.count, pfn, 1)[0]
    }
    fn flags(&self, pfn: u64) -> u64 {
        read_u64s(&self.flags, pfn, 1)[0]
    }
    /// The folio holding `pfn`: (head pfn, pages).
    fn folio(&self, pfn: u64) -> (u64, u64) {
        let mut head = pfn;
        while self.flags(head) & KPF_COMPOUND_TAIL != 0 {
            head -= 1;
        }
        if self.flags(head) & KPF_COMPOUND_HEAD == 0 {
            return (pfn, 1);
        }
        let mut n = 1;
        while n < 512 && self.flags(head + n) & KPF_COMPOUND_TAIL != 0 {
            n += 1;
        }
        (head, n)
    }
}

fn pagemap(pid: i32, va: u64, n: usize) -> Vec<u64> {
    let f = File::open(format!("/proc/{pid}/pagemap")).unwrap();
    read_u64s(&f, va / PAGE_SIZE, n)
}

/// A forked child that waits for orders on a pipe: write the listed pages, then exit.
struct Child {
    pid: i32,
    to_child: i32,
    from_child: i32,
    stepped: bool,
}

impl Child {
    /// Forks. The child only touches memory and pipes, then `_exit`s (async-signal-safe).
    fn fork(base: *mut u8, writes: &[usize]) -> Self {
        let (mut a, mut b) = ([0i32; 2], [0i32; 2]);
        // SAFETY: valid arrays of two fds.
        assert_eq!(unsafe { libc::pipe(a.as_mut_ptr()) }, 0);
        // SAFETY: as above.
        assert_eq!(unsafe { libc::pipe(b.as_mut_ptr()) }, 0);
        let writes: Vec<usize> = writes.to_vec();
        // SAFETY: the child only reads/writes its copy of the mapping and the pipes, then
        // calls _exit; it never returns into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            let mut byte = 0u8;
            // SAFETY: the pipe fds are open; the pages written are in the private mapping.
            unsafe {
                libc::read(a[0], (&mut byte as *mut u8).cast(), 1);
                for &i in &writes {
                    base.add(i * PAGE_SIZE as usize).write_volatile(0xc0);
                }
                libc::write(b[1], (&byte as *const u8).cast(), 1);
                libc::read(a[0], (&mut byte as *mut u8).cast(), 1);
                libc::_exit(0);
            }
        }
        Self {
            pid,
            to_child: a[1],
            from_child: b[0],
            stepped: false,
        }
    }
    /// Lets the child do its writes and waits for them.
    fn step(&mut self) {
        self.stepped = true;
        let mut byte = 1u8;
        // SAFETY: open pipe fds.
        unsafe {
            assert_eq!(
                libc::write(self.to_child, (&byte as *const u8).cast(), 1),
                1
            );
            assert_eq!(
                libc::read(self.from_child, (&mut byte as *mut u8).cast(), 1),
                1
            );
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        // The child reads one byte before its writes and one before it exits.
        let bytes = [2u8; 2];
        let n = if self.stepped { 1 } else { 2 };
        let mut status = 0;
        // SAFETY: open pipe fds, our own child.
        unsafe {
            libc::write(self.to_child, bytes.as_ptr().cast(), n);
            libc::waitpid(self.pid, &mut status, 0);
            libc::close(self.to_child);
            libc::close(self.from_child);
        }
    }
}

/// The model of one kernel layout: kernel folios copied into `SimFolios`, the parent's entries
/// into a `SimSpace`.
struct Model {
    pages: Vec<SimPage>,
    parent: Vec<u64>,
    child: Vec<u64>,
    /// Kernel head pfn -> model head pfn.
    folios: Vec<(u64, u64, u64)>,
}

const MBASE: u64 = 0x7000_0000_0000;
const MPFN: u64 = 0x10_0000;

impl Model {
    fn model_pfn(&self, kpfn: u64) -> u64 {
        let &(kh, mh, _) = self
            .folios
            .iter()
            .find(|&&(kh, _, n)| kpfn >= kh && kpfn < kh + n)
            .expect("folio known");
        mh + (kpfn - kh)
    }
    fn folios(&mut self) -> SimFolios<'_> {
        SimFolios::from_pages(MPFN, &mut self.pages)
    }
}

/// Builds the model of `n` parent pages from their pagemap entries (`readonly` pages mapped
/// without write permission) and forks it with the crate.
fn model_fork(kp: &Kpage, pm: &[u64], readonly: &dyn Fn(usize) -> bool) -> Model {
    let n = pm.len();
    let mut m = Model {
        pages: vec![SimPage::default(); 4 * n + 1024],
        parent: vec![0; n],
        child: vec![0; n],
        folios: Vec::new(),
    };
    let mut next = MPFN;
    for &e in pm {
        if e & PM_PRESENT == 0 {
            continue;
        }
        let kpfn = e & PM_PFN;
        if m.folios
            .iter()
            .any(|&(kh, _, n)| kpfn >= kh && kpfn < kh + n)
        {
            continue;
        }
        let (head, nr) = kp.folio(kpfn);
        let order = nr.trailing_zeros() as u8;
        next = next.next_multiple_of(nr);
        let mut f = SimFolios::from_pages(MPFN, &mut m.pages);
        f.add_folio(next, order, true).expect("model folio");
        m.folios.push((head, next, nr));
        next += nr;
    }
    let flags =
        (X86Flags::PRESENT | X86Flags::USER | X86Flags::ACCESSED | X86Flags::DIRTY | X86Flags::NX)
            .bits();
    for (i, &e) in pm.iter().enumerate() {
        if e & PM_PRESENT == 0 {
            continue;
        }
        let pfn = m.model_pfn(e & PM_PFN);
        let rw = if readonly(i) { 0 } else { X86Flags::RW.bits() };
        m.parent[i] = X86Pte::with_pfn(flags | rw, pfn);
        let mut f = m.folios();
        f.account_mapping(pfn);
        // A freshly faulted anon page is exclusive to its process.
        f.page_mut(pfn).unwrap().anon_exclusive = e & PM_EXCLUSIVE != 0;
    }
    let vma = Vma::new(VmFlags::MAYWRITE | VmFlags::WRITE, X86Pte::USER_READONLY);
    let Model {
        pages,
        parent,
        child,
        ..
    } = &mut m;
    {
        let mut f = SimFolios::from_pages(MPFN, pages);
        let mut p = SimSpace::<X86Pte>::new(MBASE, parent);
        let mut c = SimSpace::<X86Pte>::new(MBASE, child);
        let mut fork = Fork::new(&mut f, vma, vma);
        fork.copy_range(&mut c, &mut p, MBASE, MBASE + n as u64 * PAGE_SIZE)
            .expect("model fork");
    }
    m
}

/// The child's write fault on page `i` of the model: a read-only entry of a page others map
/// gets a private copy (`wp_page_copy`); an exclusive one is reused.
fn model_child_write(m: &mut Model, i: usize) {
    let e = m.child[i];
    let pfn = X86Pte::pfn(e);
    let Model { pages, child, .. } = m;
    let mut f = SimFolios::from_pages(MPFN, pages);
    let folio = f.folio(pfn).unwrap();
    if f.mapcount(pfn) == 1 && f.is_anon_exclusive(pfn) {
        child[i] = X86Pte::mkwrite(X86Pte::mkdirty(e));
        return;
    }
    let new = f.alloc_page().expect("model page");
    f.add_new_anon_rmap(new);
    f.remove_rmap(&folio, pfn, 1);
    f.ref_sub(&folio, 1);
    let mut c = SimSpace::<X86Pte>::new(MBASE, child);
    c.set(
        MBASE + i as u64 * PAGE_SIZE,
        X86Pte::mkwrite(X86Pte::mkdirty(X86Pte::with_pfn(e, new))),
    );
}

/// Compares kernel and model page by page: the child maps the parent's page or its own, the
/// parent's page map count, and pagemap's "exclusively mapped" against the model's map count.
fn compare(what: &str, kp: &Kpage, m: &Model, ppm: &[u64], cpm: &[u64]) -> usize {
    let mut checked = 0;
    for i in 0..ppm.len() {
        let (pe, ce) = (ppm[i], cpm[i]);
        assert_eq!(
            pe & PM_PRESENT != 0,
            X86Pte::is_present(m.parent[i]),
            "{what}: page {i} present in the parent"
        );
        if pe & PM_PRESENT == 0 {
            continue;
        }
        assert!(
            ce & PM_PRESENT != 0,
            "{what}: page {i} missing in the child"
        );
        let (kp_pfn, kc_pfn) = (pe & PM_PFN, ce & PM_PFN);
        let (mp_pfn, mc_pfn) = (X86Pte::pfn(m.parent[i]), X86Pte::pfn(m.child[i]));
        assert_eq!(
            kp_pfn == kc_pfn,
            mp_pfn == mc_pfn,
            "{what}: page {i}: shared by parent and child (kernel {kp_pfn:#x}/{kc_pfn:#x})"
        );
        let mpages = SimFolios::from_pages(MPFN, &mut m.pages.clone()).mapcount(mp_pfn) as u64;
        assert_eq!(
            kp.count(kp_pfn),
            mpages,
            "{what}: page {i}: map count of the parent's page"
        );
        for (who, e, mpfn) in [("parent", pe, mp_pfn), ("child", ce, mc_pfn)] {
            let mc = SimFolios::from_pages(MPFN, &mut m.pages.clone()).mapcount(mpfn);
            assert_eq!(
                e & PM_EXCLUSIVE != 0,
                mc == 1,
                "{what}: page {i}: {who}'s page exclusively mapped"
            );
        }
        // The model's COW rule: shared pages are read-only in both.
        if mp_pfn == mc_pfn {
            assert!(!X86Pte::is_writable(m.parent[i]) && !X86Pte::is_writable(m.child[i]));
        }
        checked += 1;
    }
    checked
}

#[test]
#[cfg_attr(
    miri,
    ignore = "mmap, fork, swapon and /proc are real system calls Miri cannot run"
)]
fn peer_fork_of_64k_folios_matches_the_kernel() {
    if let Some(why) = unavailable() {
        println!("skipped: {why}");
        return;
    }
    let _mthp = match Switch::set(MTHP_64K, "always") {
        Ok(s) => s,
        Err(e) => {
            println!("skipped: cannot enable 64 KiB mTHP: {e}");
            return;
        }
    };
    const N: usize = 256; // 1 MiB: 16 folios of 64 KiB
    // SAFETY: a fresh private anonymous mapping; unmapped at the end.
    let raw = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            2 * N * PAGE_SIZE as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(raw, libc::MAP_FAILED);
    let base = (raw as usize).next_multiple_of(16 * PAGE_SIZE as usize) as *mut u8;
    // SAFETY: `base..base + N pages` lies in the mapping.
    unsafe {
        for i in 0..N {
            base.add(i * PAGE_SIZE as usize).write_volatile(i as u8);
        }
    }
    let kp = Kpage::open();
    let va = base as u64;
    let pid = std::process::id() as i32;
    let before = pagemap(pid, va, N);
    let large = before
        .iter()
        .filter(|&&e| e & PM_PRESENT != 0 && kp.folio(e & PM_PFN).1 == 16)
        .count();
    if large < 64 {
        println!("skipped: the kernel gave only {large} pages in 64 KiB folios");
        // SAFETY: our mapping.
        unsafe { libc::munmap(raw, 2 * N * PAGE_SIZE as usize) };
        return;
    }
    // Split batches at odd offsets: pages 37..40 read-only, 87..89 unmapped.
    let readonly = |i: usize| (37..40).contains(&i);
    // SAFETY: ranges inside the mapping.
    unsafe {
        assert_eq!(
            libc::mprotect(
                base.add(37 * PAGE_SIZE as usize).cast(),
                3 * PAGE_SIZE as usize,
                libc::PROT_READ
            ),
            0
        );
        assert_eq!(
            libc::munmap(
                base.add(87 * PAGE_SIZE as usize).cast(),
                2 * PAGE_SIZE as usize
            ),
            0
        );
    }
    // The child writes every third page outside the read-only ones and the hole.
    let writes: Vec<usize> = (0..N)
        .filter(|&i| i % 3 == 0 && !readonly(i) && !(87..89).contains(&i))
        .collect();
    let ppm_before_fork = pagemap(pid, va, N);
    let mut child = Child::fork(base, &writes);
    let ppm = pagemap(pid, va, N);
    let cpm = pagemap(child.pid, va, N);
    assert_eq!(
        ppm.iter().map(|e| e & PM_PFN).collect::<Vec<_>>(),
        ppm_before_fork
            .iter()
            .map(|e| e & PM_PFN)
            .collect::<Vec<_>>(),
        "fork moved no parent page"
    );
    let mut m = model_fork(&kp, &ppm_before_fork, &readonly);
    let checked = compare("after fork", &kp, &m, &ppm, &cpm);
    assert!(checked > 200, "{checked} pages compared");

    child.step();
    for &i in &writes {
        model_child_write(&mut m, i);
    }
    let ppm = pagemap(pid, va, N);
    let cpm = pagemap(child.pid, va, N);
    compare("after the child's writes", &kp, &m, &ppm, &cpm);
    drop(child);
    // SAFETY: our mapping.
    unsafe { libc::munmap(raw, 2 * N * PAGE_SIZE as usize) };
}

/// A swap file enabled for the test, switched off and deleted when dropped (also on panic).
struct SwapFile {
    path: PathBuf,
}

impl SwapFile {
    fn enable() -> Result<Self, String> {
        let path = std::env::temp_dir().join(format!("oskit-pte-swap-{}", std::process::id()));
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .map_err(|e| format!("swap file: {e}"))?;
        f.write_all(&vec![0u8; 32 << 20])
            .map_err(|e| format!("swap file: {e}"))?;
        drop(f);
        let me = Self { path };
        let _ = fs::set_permissions(
            &me.path,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        );
        for cmd in ["mkswap", "swapon"] {
            let out = std::process::Command::new(cmd)
                .arg(&me.path)
                .output()
                .map_err(|e| format!("{cmd}: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "{cmd} failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        Ok(me)
    }
}

impl Drop for SwapFile {
    fn drop(&mut self) {
        let _ = std::process::Command::new("swapoff")
            .arg(&self.path)
            .output();
        let _ = fs::remove_file(&self.path);
    }
}

#[test]
#[cfg_attr(
    miri,
    ignore = "mmap, fork, swapon and /proc are real system calls Miri cannot run"
)]
fn peer_fork_of_swapped_out_pages_matches_the_kernel() {
    if let Some(why) = unavailable() {
        println!("skipped: {why}");
        return;
    }
    let swap = match SwapFile::enable() {
        Ok(s) => s,
        Err(why) => {
            println!("skipped: no swap file can be enabled here: {why}");
            return;
        }
    };
    const N: usize = 64;
    // SAFETY: a fresh private anonymous mapping; unmapped at the end.
    let raw = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            N * PAGE_SIZE as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(raw, libc::MAP_FAILED);
    let base = raw as *mut u8;
    // SAFETY: inside the mapping.
    unsafe {
        for i in 0..N {
            base.add(i * PAGE_SIZE as usize)
                .write_volatile(0x40 + i as u8);
        }
        libc::madvise(raw, N * PAGE_SIZE as usize, libc::MADV_PAGEOUT);
    }
    let pid = std::process::id() as i32;
    let va = base as u64;
    let before = pagemap(pid, va, N);
    let swapped: Vec<usize> = (0..N).filter(|&i| before[i] & PM_SWAP != 0).collect();
    if swapped.len() < N / 2 {
        println!(
            "skipped: MADV_PAGEOUT swapped out only {} of {N} pages",
            swapped.len()
        );
        // SAFETY: our mapping.
        unsafe { libc::munmap(raw, N * PAGE_SIZE as usize) };
        drop(swap);
        return;
    }
    // The model: the same swap slots (type and offset from pagemap), exclusive as Linux marks
    // a swapped-out page that was exclusive to its process.
    let mut parent = vec![0u64; N];
    for &i in &swapped {
        let e = before[i];
        parent[i] = NonPresent::Swap {
            ty: (e & 0x1f) as u32,
            offset: (e & PM_PFN) >> 5,
            exclusive: true,
        }
        .encode::<X86Pte>();
    }
    let child = Child::fork(base, &[]);
    let ppm = pagemap(pid, va, N);
    let cpm = pagemap(child.pid, va, N);
    let mut pages = vec![SimPage::default(); 16];
    let mut f = SimFolios::new(MPFN, &mut pages);
    let mut mchild = vec![0u64; N];
    let vma = Vma::new(VmFlags::MAYWRITE | VmFlags::WRITE, X86Pte::USER_READONLY);
    let rss = {
        let mut p = SimSpace::<X86Pte>::new(MBASE, &mut parent);
        let mut c = SimSpace::<X86Pte>::new(MBASE, &mut mchild);
        let mut fork = Fork::new(&mut f, vma, vma);
        fork.copy_range(&mut c, &mut p, MBASE, MBASE + N as u64 * PAGE_SIZE)
            .unwrap();
        fork.rss()
    };
    let kernel_child_swap = cpm.iter().filter(|&&e| e & PM_SWAP != 0).count() as i64;
    assert_eq!(rss.swap, kernel_child_swap, "swap entries in the child");
    assert_eq!(f.swap_refs(), kernel_child_swap, "slot references taken");
    for &i in &swapped {
        if ppm[i] & PM_SWAP == 0 || cpm[i] & PM_SWAP == 0 {
            continue; // swapped back in by someone meanwhile
        }
        // Same slot in both, as in the model.
        assert_eq!(ppm[i] & PM_PFN, cpm[i] & PM_PFN, "page {i}: slot");
        assert_eq!(
            X86Pte::swp_offset(parent[i]),
            X86Pte::swp_offset(mchild[i]),
            "page {i}: model slot"
        );
        // Shared, not exclusive, in both (Linux's copy_nonpresent_pte).
        for e in [parent[i], mchild[i]] {
            assert_eq!(
                NonPresent::decode::<X86Pte>(e),
                NonPresent::Swap {
                    ty: (ppm[i] & 0x1f) as u32,
                    offset: (ppm[i] & PM_PFN) >> 5,
                    exclusive: false
                }
            );
        }
    }
    // The parent reads one page back: the slot's contents.
    let probe = swapped[swapped.len() / 2];
    // SAFETY: inside the mapping.
    let v = unsafe { base.add(probe * PAGE_SIZE as usize).read_volatile() };
    assert_eq!(v, 0x40 + probe as u8);
    drop(child);
    // SAFETY: our mapping.
    unsafe { libc::munmap(raw, N * PAGE_SIZE as usize) };
    drop(swap);
}
