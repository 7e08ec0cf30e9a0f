//! No overflow is lost: a PMI taken after its context was switched out (interrupts were off
//! at the overflow), on the same CPU or after the task moved; SCHED records that reach the
//! threshold without any branch; and a model that puts the interrupt at every point of a
//! switch sequence.

mod common;

use common::{Signals, Sink, Space, Task, Tracer, br, cfg, tracer, user_cpu};
use oskit_bts::{
    BtsCpu, Config, Flags, Pmi, Record,
    sim::{SoftCpu, Store},
};

/// Runs branches `from..` of the task loaded on `cpu` until the CPU raises the PMI; returns
/// the next branch number.
fn run_to_pmi(cpu: &mut BtsCpu<SoftCpu>, from: u64) -> u64 {
    let mut i = from;
    loop {
        let s = cpu.hw_mut().branch(i, 0x9000, false);
        i += 1;
        assert!(matches!(s, Store::Stored | Store::Interrupt), "{s:?}");
        if s == Store::Interrupt {
            return i;
        }
    }
}

/// The measured bug: task A (INTERRUPT) crosses its threshold; with interrupts off the
/// scheduler switches A out and B in; the PMI is taken with B loaded. A's overflow must have
/// been handled at the switch-out, the LVT must be armed, and A's later overflows must still
/// interrupt.
#[test]
fn a_late_pmi_finds_the_overflow_handled_at_switch_out_and_the_lvt_armed() {
    let (bts, _, _) = tracer::<4>();
    let (a, b, mm) = (Task::new(1), Task::new(2), Space::new(100));
    let mut cpu = BtsCpu::new(user_cpu());
    bts.config(&a, &mm, cfg(16, Flags::TRACE | Flags::INTERRUPT))
        .unwrap();
    let (mut sink, mut sig) = (Sink::default(), Signals::default());
    bts.switch_in(&mut cpu, &a, 0, &mut sink, &mut sig).unwrap();
    let next = run_to_pmi(&mut cpu, 1);
    assert!(cpu.hw().interrupt_masked(), "the CPU delivered the PMI");
    // Interrupts off: the PMI waits while the scheduler switches.
    let out = bts.switch_out(&mut cpu, 0, &mut sink, &mut sig).unwrap();
    bts.switch_in(&mut cpu, &b, 0, &mut sink, &mut sig).unwrap();
    assert_eq!(out.map(|o| o.drained), Some(14), "handled at switch-out");
    // Interrupts on: the late PMI.
    assert!(cpu.hw_mut().take_interrupt());
    assert_eq!(
        bts.threshold_interrupt(&mut cpu, &mut sink, &mut sig),
        Ok(Pmi::Late)
    );
    assert!(!cpu.hw().interrupt_masked(), "LVT armed");
    // A runs again: its next threshold interrupts (it would be Full forever otherwise).
    bts.switch_in(&mut cpu, &a, 0, &mut sink, &mut sig).unwrap();
    let end = run_to_pmi(&mut cpu, next);
    assert!(cpu.hw_mut().take_interrupt());
    let pmi = bts.threshold_interrupt(&mut cpu, &mut sink, &mut sig);
    assert_eq!(pmi.map(|p| p.overflow().map(|o| o.drained)), Ok(Some(14)));
    bts.switch_out(&mut cpu, 0, &mut sink, &mut sig).unwrap();
    assert_eq!(
        sink.0.iter().map(|(_, r)| *r).collect::<Vec<_>>(),
        (1..end).map(br).collect::<Vec<_>>(),
        "every branch, in order, nothing lost"
    );
    assert!(sig.0.is_empty());
}

/// The same with the task moving to another CPU: the PMI is taken on the old CPU, where
/// nothing is loaded any more.
#[test]
fn a_late_pmi_after_the_task_moved_is_late_on_the_old_cpu() {
    let (bts, _, _) = tracer::<4>();
    let (a, mm) = (Task::new(1), Space::new(100));
    let (mut cpu0, mut cpu1) = (BtsCpu::new(user_cpu()), BtsCpu::new(user_cpu()));
    bts.config(&a, &mm, cfg(16, Flags::TRACE | Flags::INTERRUPT))
        .unwrap();
    let (mut sink, mut sig) = (Sink::default(), Signals::default());
    bts.switch_in(&mut cpu0, &a, 0, &mut sink, &mut sig)
        .unwrap();
    let next = run_to_pmi(&mut cpu0, 1);
    bts.switch_out(&mut cpu0, 0, &mut sink, &mut sig).unwrap();
    bts.switch_in(&mut cpu1, &a, 0, &mut sink, &mut sig)
        .unwrap();
    cpu1.hw_mut().branch(next, 0x9000, false);
    assert!(cpu0.hw_mut().take_interrupt());
    assert_eq!(
        bts.threshold_interrupt(&mut cpu0, &mut sink, &mut sig),
        Ok(Pmi::Late)
    );
    assert!(!cpu0.hw().interrupt_masked());
    // A second, unrelated PMI on cpu0 is not BTS's.
    assert_eq!(
        bts.threshold_interrupt(&mut cpu0, &mut sink, &mut sig),
        Ok(Pmi::NotBts)
    );
    bts.switch_out(&mut cpu1, 0, &mut sink, &mut sig).unwrap();
    let mut rest = [Record::Invalid; 16];
    let n = bts.drain(&a, &mut rest).unwrap();
    let all: Vec<Record> = sink
        .0
        .iter()
        .map(|(_, r)| *r)
        .chain(rest[..n].iter().copied())
        .collect();
    assert_eq!(all, (1..=next).map(br).collect::<Vec<_>>());
}

/// The measured bug: 8 records, `SIGNAL | SCHED`, four switches while the task runs only
/// kernel code (not recorded): the SCHED records alone reach the threshold. The tracer must
/// be signalled, not left with a silently full buffer.
#[test]
fn sched_records_reaching_the_threshold_signal() {
    let (bts, _, _) = tracer::<4>();
    let (t, mm) = (Task::new(7), Space::new(100));
    let mut cpu = BtsCpu::new(SoftCpu::default()); // CPL 0: kernel code, filtered
    let c = Config {
        signal: 10,
        ..cfg(8, Flags::TRACE | Flags::SCHED | Flags::SIGNAL)
    };
    bts.config(&t, &mm, c).unwrap();
    let (mut sink, mut sig) = (Sink::default(), Signals::default());
    let mut signalled_at = Vec::new();
    for now in 0..4 {
        let i = bts.switch_in(&mut cpu, &t, 2 * now, &mut sink, &mut sig);
        assert_eq!(cpu.hw_mut().branch(1, 2, false), Store::NotStored);
        let o = bts.switch_out(&mut cpu, 2 * now + 1, &mut sink, &mut sig);
        for (hook, r) in [("in", i), ("out", o)] {
            if r.unwrap().is_some_and(|r| r.signalled.is_some()) {
                signalled_at.push((now, hook));
            }
        }
    }
    // Threshold at 8 - 1 records: the 7th SCHED record (the 4th switch-in) reaches it.
    assert_eq!(signalled_at, [(3, "in")]);
    assert_eq!(sig.0, vec![(7, 10)], "signalled once, at the threshold");
    let mut out = [Record::Invalid; 8];
    let n = bts.drain(&t, &mut out).unwrap();
    assert_eq!(n, 8);
    assert!(
        out[..n]
            .iter()
            .all(|r| matches!(r, Record::TaskArrives { .. } | Record::TaskDeparts { .. }))
    );
}

/// INTERRUPT mode: SCHED records reaching the threshold are drained into the sink by the hook
/// that wrote them (no PMI comes for a software record).
#[test]
fn sched_records_reaching_the_threshold_drain_in_interrupt_mode() {
    let (bts, _, _) = tracer::<4>();
    let (t, mm) = (Task::new(7), Space::new(100));
    let mut cpu = BtsCpu::new(SoftCpu::default());
    bts.config(&t, &mm, cfg(8, Flags::SCHED | Flags::INTERRUPT))
        .unwrap();
    let (mut sink, mut sig) = (Sink::default(), Signals::default());
    let mut reports = Vec::new();
    for now in 0..10 {
        let i = bts.switch_in(&mut cpu, &t, 2 * now, &mut sink, &mut sig);
        let o = bts.switch_out(&mut cpu, 2 * now + 1, &mut sink, &mut sig);
        reports.extend(i.unwrap());
        reports.extend(o.unwrap());
    }
    // 20 records, threshold at 7: drained at the 7th and 14th, 6 left.
    assert_eq!(
        reports.iter().map(|r| r.drained).collect::<Vec<_>>(),
        [7, 7]
    );
    let mut rest = [Record::Invalid; 8];
    let n = bts.drain(&t, &mut rest).unwrap();
    assert_eq!(n, 6);
    let stamps: Vec<u64> = sink
        .0
        .iter()
        .map(|(_, r)| *r)
        .chain(rest[..n].iter().copied())
        .map(|r| match r {
            Record::TaskArrives { timestamp, pid: 7 }
            | Record::TaskDeparts { timestamp, pid: 7 } => timestamp,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        stamps,
        (0..20).collect::<Vec<_>>(),
        "every SCHED record, in order"
    );
}

/// One step of the model: what the scheduler or the task does on one CPU.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Switch A out and B in (interrupts off).
    ToB,
    /// Switch B out and A in.
    ToA,
    /// The running task makes a branch (A's are numbered; B is untraced).
    Branch,
}

/// Model: A (INTERRUPT, 8 records) and an untraced B share one CPU through a fixed schedule;
/// A's threshold PMI is taken at every possible later point of the schedule (the interrupt
/// interleaved with the switches), and more PMIs as they come. In every interleaving every
/// branch the CPU stored reaches the sink or the final drain, in order; a full buffer (the
/// PMI taken later than the slack allows) is reported; the LVT ends armed; no PMI is ever
/// misread as another source's.
#[test]
fn the_pmi_at_every_point_of_a_switch_sequence_loses_nothing() {
    use Step::*;
    let schedule = [
        Branch, Branch, Branch, Branch, Branch, Branch, Branch, ToB, Branch, ToA, Branch, ToB, ToA,
        Branch, Branch, Branch, Branch, Branch, Branch, Branch, Branch, ToB, Branch, ToA, Branch,
        Branch,
    ];
    for delay in 0..schedule.len() {
        let bts: Tracer<4> = tracer::<4>().0;
        let (a, b, mm) = (Task::new(1), Task::new(2), Space::new(100));
        let mut cpu = BtsCpu::new(user_cpu());
        bts.config(&a, &mm, cfg(8, Flags::TRACE | Flags::INTERRUPT))
            .unwrap();
        let (mut sink, mut sig) = (Sink::default(), Signals::default());
        bts.switch_in(&mut cpu, &a, 0, &mut sink, &mut sig).unwrap();
        let (mut on_a, mut made, mut pending_for) = (true, 0u64, None::<usize>);
        // A's branches the CPU stored (a late handler lets the buffer fill: the CPU then
        // refuses branches, as the hardware drops them, and the report says `full`).
        let (mut stored, mut refused, mut full_reports) = (Vec::new(), 0, 0);
        let mut count =
            |r: Option<oskit_bts::Overflow>| full_reports += usize::from(r.is_some_and(|o| o.full));
        for (k, step) in schedule.iter().enumerate() {
            match step {
                ToB => {
                    count(bts.switch_out(&mut cpu, 0, &mut sink, &mut sig).unwrap());
                    count(bts.switch_in(&mut cpu, &b, 0, &mut sink, &mut sig).unwrap());
                    on_a = false;
                }
                ToA => {
                    count(bts.switch_out(&mut cpu, 0, &mut sink, &mut sig).unwrap());
                    count(bts.switch_in(&mut cpu, &a, 0, &mut sink, &mut sig).unwrap());
                    on_a = true;
                }
                Branch if on_a => {
                    made += 1;
                    match cpu.hw_mut().branch(made, 0x9000, false) {
                        Store::Stored | Store::Interrupt => stored.push(br(made)),
                        Store::Full => refused += 1,
                        s => panic!("delay {delay}, step {k}: {s:?}"),
                    }
                }
                Branch => {
                    cpu.hw_mut().branch(0xb, 0xb, false);
                }
            }
            if cpu.hw_mut().take_interrupt() {
                pending_for = Some(k + delay);
            }
            if pending_for.is_some_and(|at| at <= k) {
                pending_for = None;
                let pmi = bts
                    .threshold_interrupt(&mut cpu, &mut sink, &mut sig)
                    .unwrap();
                assert!(
                    matches!(pmi, Pmi::Overflow(_) | Pmi::Late),
                    "delay {delay}, step {k}: {pmi:?}"
                );
                count(pmi.overflow());
                assert!(
                    !cpu.hw().interrupt_masked(),
                    "delay {delay}: LVT left masked"
                );
            }
        }
        if pending_for.take().is_some() || cpu.hw_mut().take_interrupt() {
            let pmi = bts
                .threshold_interrupt(&mut cpu, &mut sink, &mut sig)
                .unwrap();
            assert!(
                matches!(pmi, Pmi::Overflow(_) | Pmi::Late),
                "delay {delay}: {pmi:?}"
            );
        }
        bts.switch_out(&mut cpu, 0, &mut sink, &mut sig).unwrap();
        assert!(
            !cpu.hw().interrupt_masked(),
            "delay {delay}: LVT left masked"
        );
        let mut rest = [Record::Invalid; 8];
        let n = bts.drain(&a, &mut rest).unwrap();
        let all: Vec<Record> = sink
            .0
            .iter()
            .map(|(_, r)| *r)
            .chain(rest[..n].iter().copied())
            .collect();
        assert_eq!(all, stored, "delay {delay}: every stored branch, in order");
        assert_eq!(stored.len() + refused, made as usize);
        assert!(
            refused == 0 || full_reports > 0,
            "delay {delay}: refused branches without a full report"
        );
        if delay < 2 {
            assert_eq!(
                refused, 0,
                "delay {delay}: the slack covers a PMI taken at once"
            );
        }
    }
}

/// A SCHED record that meets a full buffer (the threshold interrupt came late) is written
/// after the switch hook's drain made room, not lost: the departure of a task whose branches
/// filled the buffer is in the trace, after those branches.
#[test]
fn a_sched_record_meeting_a_full_buffer_is_written_after_the_drain() {
    let (bts, _, _) = tracer::<4>();
    let (t, mm) = (Task::new(7), Space::new(100));
    let mut cpu = BtsCpu::new(user_cpu());
    bts.config(
        &t,
        &mm,
        cfg(8, Flags::TRACE | Flags::SCHED | Flags::INTERRUPT),
    )
    .unwrap();
    let (mut sink, mut sig) = (Sink::default(), Signals::default());
    bts.switch_in(&mut cpu, &t, 1, &mut sink, &mut sig).unwrap();
    // Interrupts stay off: the PMI is not taken, and the branches fill the buffer.
    let mut refused = 0;
    for k in 0..10 {
        if let Store::Full = cpu.hw_mut().branch(0x1000 + k, 0x2000, false) {
            refused += 1;
        }
    }
    assert!(refused > 0, "the buffer never filled");
    let report = bts
        .switch_out(&mut cpu, 2, &mut sink, &mut sig)
        .unwrap()
        .expect("the switch-out handles the overflow");
    assert!(report.full);
    let mut rest = [Record::Invalid; 8];
    let n = bts.drain(&t, &mut rest).unwrap();
    assert_eq!(
        rest[..n],
        [Record::TaskDeparts {
            timestamp: 2,
            pid: 7
        }],
        "the departure record after the drained branches"
    );
    assert!(matches!(
        sink.0.first(),
        Some((7, Record::TaskArrives { timestamp: 1, .. }))
    ));
}
