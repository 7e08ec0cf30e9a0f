//! The software CPU against the SDM's BTS rules, on a DS area and buffer built by hand.

use oskit_bts::{
    format::{BtsRecord, DsArea, RECORD_SIZE},
    hal::{BtsHardware, DebugCtl},
    sim::{SoftCpu, Store},
};

/// A DS area followed by `n` records, in one 8-aligned allocation.
struct Mem {
    words: Vec<u64>,
    n: usize,
}

impl Mem {
    fn new(n: usize) -> Self {
        Self {
            words: vec![0; 12 + 3 * n],
            n,
        }
    }
    fn ds_addr(&mut self) -> u64 {
        self.words.as_mut_ptr().expose_provenance() as u64
    }
    fn base(&mut self) -> u64 {
        self.ds_addr() + 0x60
    }
    fn ds(&self) -> DsArea {
        zerocopy::FromBytes::read_from_bytes(zerocopy::IntoBytes::as_bytes(&self.words[..12]))
            .unwrap()
    }
    fn set_ds(&mut self, ds: DsArea) {
        let w: &[u64] =
            zerocopy::FromBytes::ref_from_bytes(zerocopy::IntoBytes::as_bytes(&ds)).unwrap();
        self.words[..12].copy_from_slice(w);
    }
    fn record(&self, i: usize) -> BtsRecord {
        let w = &self.words[12 + 3 * i..15 + 3 * i];
        BtsRecord {
            from: w[0],
            to: w[1],
            flags: w[2],
        }
    }
    /// Programs base/index/max/threshold in records.
    fn program(&mut self, index: usize, threshold: usize) -> u64 {
        let base = self.base();
        let r = RECORD_SIZE as u64;
        let ds = DsArea {
            bts_buffer_base: base,
            bts_index: base + index as u64 * r,
            bts_absolute_maximum: base + self.n as u64 * r,
            bts_interrupt_threshold: base + threshold as u64 * r,
            ..DsArea::default()
        };
        self.set_ds(ds);
        base
    }
    fn index(&mut self) -> usize {
        ((self.ds().bts_index - self.base()) / RECORD_SIZE as u64) as usize
    }
    fn cpu(&mut self, debugctl: u64) -> SoftCpu {
        let mut cpu = SoftCpu::default();
        // SAFETY: `self.words` outlives the CPU in each test and is not reallocated.
        unsafe {
            cpu.set_ds_area(self.ds_addr());
            cpu.set_debugctl(DebugCtl(debugctl));
        }
        cpu
    }
}

const ON: u64 = DebugCtl::TR | DebugCtl::BTS;

#[test]
fn records_go_at_the_index_which_advances_by_one_record() {
    let mut m = Mem::new(4);
    m.program(0, 100);
    let mut cpu = m.cpu(ON);
    assert_eq!(cpu.branch(0x1000, 0x2000, true), Store::Stored);
    assert_eq!(cpu.branch(0x3000, 0x4000, false), Store::Stored);
    assert_eq!(m.index(), 2);
    assert_eq!(
        m.record(0),
        BtsRecord {
            from: 0x1000,
            to: 0x2000,
            flags: 0x10
        }
    );
    assert_eq!(
        m.record(1),
        BtsRecord {
            from: 0x3000,
            to: 0x4000,
            flags: 0
        }
    );
    assert_eq!(m.record(2), BtsRecord::default());
}

#[test]
fn circular_buffer_wraps_at_the_absolute_maximum_when_btint_is_clear() {
    let mut m = Mem::new(3);
    m.program(0, 100);
    let mut cpu = m.cpu(ON);
    for i in 0..5u64 {
        assert_eq!(cpu.branch(i + 1, 0x100, false), Store::Stored);
    }
    // 1,2,3 then wrap: 4 over slot 0, 5 over slot 1; next write at slot 2.
    assert_eq!(m.index(), 2);
    assert_eq!(
        [m.record(0).from, m.record(1).from, m.record(2).from],
        [4, 5, 3]
    );
}

#[test]
fn btint_raises_the_interrupt_at_the_threshold_and_stops_at_the_maximum() {
    let mut m = Mem::new(4);
    m.program(0, 2);
    let mut cpu = m.cpu(ON | DebugCtl::BTINT);
    assert_eq!(cpu.branch(1, 9, false), Store::Stored);
    assert_eq!(
        cpu.branch(2, 9, false),
        Store::Interrupt,
        "index reached threshold"
    );
    assert!(cpu.take_interrupt() && !cpu.take_interrupt());
    assert!(cpu.interrupt_masked());
    assert_eq!(
        cpu.branch(3, 9, false),
        Store::Stored,
        "LVT masked: no second interrupt"
    );
    cpu.rearm_threshold_interrupt();
    assert_eq!(
        cpu.branch(4, 9, false),
        Store::Interrupt,
        "re-armed, still above threshold"
    );
    assert_eq!(m.index(), 4);
    assert_eq!(cpu.branch(5, 9, false), Store::Full, "no wrap with BTINT");
    assert_eq!(m.index(), 4);
    assert_eq!(m.record(0).from, 1, "oldest record not overwritten");
}

#[test]
fn threshold_beyond_the_maximum_never_interrupts() {
    let mut m = Mem::new(2);
    m.program(0, 3);
    let mut cpu = m.cpu(ON);
    for i in 0..10 {
        assert_eq!(cpu.branch(i + 1, 1, false), Store::Stored);
    }
    assert!(!cpu.take_interrupt());
}

#[test]
fn cpl_filtering_follows_the_encoding_table() {
    // (BTS_OFF_OS, BTS_OFF_USR) -> (stored at CPL 0, stored at CPL 3)
    let table = [
        (false, false, true, true),
        (true, false, false, true),
        (false, true, true, false),
        (true, true, false, false),
    ];
    for (off_os, off_usr, kernel, user) in table {
        let mut m = Mem::new(8);
        m.program(0, 100);
        let mut ctl = ON;
        if off_os {
            ctl |= DebugCtl::BTS_OFF_OS;
        }
        if off_usr {
            ctl |= DebugCtl::BTS_OFF_USR;
        }
        let mut cpu = m.cpu(ctl);
        cpu.set_cpl(0);
        assert_eq!(
            cpu.branch(1, 2, false) == Store::Stored,
            kernel,
            "{off_os} {off_usr} cpl0"
        );
        cpu.set_cpl(3);
        assert_eq!(
            cpu.branch(3, 4, false) == Store::Stored,
            user,
            "{off_os} {off_usr} cpl3"
        );
        assert_eq!(m.index(), kernel as usize + user as usize);
    }
}

#[test]
fn tr_without_bts_generates_but_does_not_store() {
    let mut m = Mem::new(2);
    m.program(0, 100);
    for ctl in [
        0,
        DebugCtl::TR,
        DebugCtl::BTS,
        DebugCtl::TR | DebugCtl::BTINT,
    ] {
        let mut cpu = m.cpu(ctl);
        assert_eq!(cpu.branch(1, 2, false), Store::NotStored);
    }
    assert_eq!(m.index(), 0);
}

#[test]
fn an_index_outside_the_buffer_is_refused_not_written() {
    let mut m = Mem::new(2);
    let base = m.program(0, 100);
    let mut ds = m.ds();
    for bad in [base - 24, base + 48, base + 40, u64::MAX - 8] {
        ds.bts_index = bad;
        m.set_ds(ds);
        let mut cpu = m.cpu(ON);
        assert_eq!(cpu.branch(1, 2, false), Store::Fault, "index {bad:#x}");
    }
    let mut cpu = SoftCpu::default();
    // SAFETY: BTS on with no DS area: the model refuses to store.
    unsafe { cpu.set_debugctl(DebugCtl(ON)) };
    assert_eq!(cpu.branch(1, 2, false), Store::Fault);
    assert!(m.words.iter().skip(12).all(|&w| w == 0));
}
