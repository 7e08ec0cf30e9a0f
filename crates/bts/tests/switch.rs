//! Context-switch hooks (SCHED records, DEBUGCTL/DS_AREA loading) and the threshold
//! interrupt (drain into a sink, signal, truncation).

mod common;

use std::num::NonZeroU32;

use common::{Ignore, Signals, Space, Task, br, cfg, tracer, user_cpu};
use oskit_bts::{
    BtsCpu, Config, Flags, Overflow, Pmi, Record,
    hal::{BtsHardware, DebugCtl, RecordSink},
    sim::Store,
};

#[derive(Default)]
struct Sink {
    got: Vec<(u32, Record)>,
    room: usize,
}
impl RecordSink for Sink {
    fn push(&mut self, pid: u32, record: Record) -> bool {
        if self.got.len() == self.room {
            return false;
        }
        self.got.push((pid, record));
        true
    }
}

#[test]
fn switch_in_loads_ds_area_and_debugctl_and_switch_out_disables() {
    let (bts, _, _) = tracer::<4>();
    let (t, mm) = (Task::new(7), Space::new(100));
    let mut cpu = BtsCpu::new(user_cpu());
    // SAFETY: enabling LBR (bit 0) only: no memory involved.
    unsafe { cpu.hw_mut().set_debugctl(DebugCtl(1)) };
    bts.config(&t, &mm, cfg(4, Flags::TRACE | Flags::NO_KERNEL))
        .unwrap();
    bts.switch_in(&mut cpu, &t, 0, &mut Ignore, &mut Ignore)
        .unwrap();
    let ctl = cpu.hw().debugctl();
    assert!(ctl.has(DebugCtl::TR | DebugCtl::BTS | DebugCtl::BTS_OFF_OS));
    assert!(!ctl.has(DebugCtl::BTINT) && !ctl.has(DebugCtl::BTS_OFF_USR));
    assert!(ctl.has(1), "unrelated DEBUGCTL bits kept");
    assert_ne!(cpu.hw().ds_area(), 0);
    cpu.hw_mut().set_cpl(0);
    assert_eq!(
        cpu.hw_mut().branch(1, 2, false),
        Store::NotStored,
        "NO_KERNEL"
    );
    cpu.hw_mut().set_cpl(3);
    assert_eq!(cpu.hw_mut().branch(3, 4, false), Store::Stored);
    bts.switch_out(&mut cpu, 0, &mut Ignore, &mut Ignore)
        .unwrap();
    assert_eq!(cpu.hw().debugctl(), DebugCtl(1));
    assert_eq!(cpu.hw_mut().branch(5, 6, false), Store::NotStored);
    assert_eq!(bts.size(&t), Ok(1));
}

#[test]
fn sched_writes_arrive_and_depart_records_around_the_branches() {
    let (bts, _, _) = tracer::<4>();
    let (t, mm) = (Task::new(7), Space::new(100));
    let mut cpu = BtsCpu::new(user_cpu());
    bts.config(&t, &mm, cfg(8, Flags::TRACE | Flags::SCHED))
        .unwrap();
    bts.switch_in(&mut cpu, &t, 100, &mut Ignore, &mut Ignore)
        .unwrap();
    cpu.hw_mut().branch(1, 0x9000, false);
    bts.switch_out(&mut cpu, 200, &mut Ignore, &mut Ignore)
        .unwrap();
    let mut out = [Record::Invalid; 8];
    assert_eq!(bts.drain(&t, &mut out), Ok(3));
    assert_eq!(
        out[..3],
        [
            Record::TaskArrives {
                timestamp: 100,
                pid: 7
            },
            br(1),
            Record::TaskDeparts {
                timestamp: 200,
                pid: 7
            },
        ]
    );
}

#[test]
fn sched_without_trace_records_only_timestamps() {
    let (bts, _, _) = tracer::<4>();
    let (t, mm) = (Task::new(7), Space::new(100));
    let mut cpu = BtsCpu::new(user_cpu());
    bts.config(&t, &mm, cfg(8, Flags::SCHED)).unwrap();
    bts.switch_in(&mut cpu, &t, 1, &mut Ignore, &mut Ignore)
        .unwrap();
    assert_eq!(cpu.hw().debugctl().0 & DebugCtl::BTS_MASK, 0);
    cpu.hw_mut().branch(1, 2, false);
    bts.switch_out(&mut cpu, 2, &mut Ignore, &mut Ignore)
        .unwrap();
    assert_eq!(bts.size(&t), Ok(2));
}

#[test]
fn interrupt_mode_drains_into_the_sink_at_the_threshold() {
    let (bts, _, _) = tracer::<4>();
    let (t, mm) = (Task::new(7), Space::new(100));
    let mut cpu = BtsCpu::new(user_cpu());
    bts.config(&t, &mm, cfg(16, Flags::TRACE | Flags::INTERRUPT))
        .unwrap();
    bts.switch_in(&mut cpu, &t, 0, &mut Ignore, &mut Ignore)
        .unwrap();
    assert!(cpu.hw().debugctl().has(DebugCtl::BTINT));
    let mut sink = Sink {
        room: 1000,
        ..Sink::default()
    };
    let mut signals = Signals::default();
    let mut reports = Vec::new();
    for i in 1..=100 {
        if cpu.hw_mut().branch(i, 0x9000, false) == Store::Interrupt {
            assert!(cpu.hw_mut().take_interrupt());
            reports.push(
                bts.threshold_interrupt(&mut cpu, &mut sink, &mut signals)
                    .unwrap()
                    .overflow()
                    .unwrap(),
            );
            assert!(!cpu.hw().interrupt_masked(), "re-armed");
            assert!(cpu.hw().debugctl().has(DebugCtl::BTS), "tracing resumed");
        }
    }
    bts.switch_out(&mut cpu, 0, &mut Ignore, &mut Ignore)
        .unwrap();
    // Threshold at 16 - 2 records: 100 branches give 7 interrupts of 14 records.
    assert_eq!(reports.len(), 7);
    assert!(
        reports
            .iter()
            .all(|r| r.drained == 14 && r.truncated == 0 && !r.full)
    );
    let mut rest = [Record::Invalid; 16];
    let n = bts.drain(&t, &mut rest).unwrap();
    assert_eq!(n, 2);
    let all: Vec<Record> = sink
        .got
        .iter()
        .map(|(_, r)| *r)
        .chain(rest[..n].iter().copied())
        .collect();
    assert_eq!(
        all,
        (1..=100).map(br).collect::<Vec<_>>(),
        "nothing lost, in order"
    );
    assert!(sink.got.iter().all(|(pid, _)| *pid == 7));
    assert!(signals.0.is_empty());
}

#[test]
fn a_full_sink_reports_truncation_and_a_late_handler_reports_a_full_buffer() {
    let (bts, _, _) = tracer::<4>();
    let (t, mm) = (Task::new(7), Space::new(100));
    let mut cpu = BtsCpu::new(user_cpu());
    bts.config(&t, &mm, cfg(8, Flags::TRACE | Flags::INTERRUPT))
        .unwrap();
    bts.switch_in(&mut cpu, &t, 0, &mut Ignore, &mut Ignore)
        .unwrap();
    for i in 1..=10 {
        cpu.hw_mut().branch(i, 0x9000, false); // interrupt not serviced: buffer fills up
    }
    let mut sink = Sink {
        room: 5,
        ..Sink::default()
    };
    let report = bts
        .threshold_interrupt(&mut cpu, &mut sink, &mut Signals::default())
        .unwrap()
        .overflow()
        .unwrap();
    assert_eq!(
        report,
        Overflow {
            drained: 5,
            truncated: 3,
            full: true,
            signalled: None
        }
    );
    assert_eq!(
        sink.got.iter().map(|(_, r)| *r).collect::<Vec<_>>(),
        (1..=5).map(br).collect::<Vec<_>>()
    );
    bts.switch_out(&mut cpu, 0, &mut Ignore, &mut Ignore)
        .unwrap();
    assert_eq!(bts.size(&t), Ok(0), "emptied even when truncated");
}

#[test]
fn signal_mode_signals_and_stops_tracing_until_drained() {
    let (bts, _, _) = tracer::<4>();
    let (t, mm) = (Task::new(7), Space::new(100));
    let mut cpu = BtsCpu::new(user_cpu());
    let c = Config {
        signal: 12,
        ..cfg(8, Flags::TRACE | Flags::SIGNAL)
    };
    bts.config(&t, &mm, c).unwrap();
    bts.switch_in(&mut cpu, &t, 0, &mut Ignore, &mut Ignore)
        .unwrap();
    let mut signals = Signals::default();
    let mut sink = Sink::default();
    let mut i = 0;
    while cpu.hw_mut().branch(i + 1, 0x9000, false) != Store::Interrupt {
        i += 1;
    }
    let r = bts
        .threshold_interrupt(&mut cpu, &mut sink, &mut signals)
        .unwrap()
        .overflow()
        .unwrap();
    assert_eq!(r.signalled, NonZeroU32::new(12));
    assert_eq!(r.drained, 0);
    assert_eq!(signals.0, vec![(7, 12)]);
    assert_eq!(
        cpu.hw_mut().branch(99, 1, false),
        Store::NotStored,
        "paused"
    );
    bts.switch_out(&mut cpu, 0, &mut Ignore, &mut Ignore)
        .unwrap();
    // Switching in again keeps it paused until the tracer drains.
    bts.switch_in(&mut cpu, &t, 0, &mut Ignore, &mut Ignore)
        .unwrap();
    assert_eq!(cpu.hw_mut().branch(99, 1, false), Store::NotStored);
    bts.switch_out(&mut cpu, 0, &mut Ignore, &mut Ignore)
        .unwrap();
    let mut out = [Record::Invalid; 8];
    let n = bts.drain(&t, &mut out).unwrap();
    assert_eq!(out[..n], (1..=n as u64).map(br).collect::<Vec<_>>()[..]);
    bts.switch_in(&mut cpu, &t, 0, &mut Ignore, &mut Ignore)
        .unwrap();
    assert_eq!(
        cpu.hw_mut().branch(99, 1, false),
        Store::Stored,
        "resumed after drain"
    );
    bts.switch_out(&mut cpu, 0, &mut Ignore, &mut Ignore)
        .unwrap();
}

#[test]
fn an_interrupt_without_a_loaded_context_is_not_ours() {
    let (bts, _, _) = tracer::<4>();
    let (t, mm) = (Task::new(7), Space::new(100));
    let mut cpu = BtsCpu::new(user_cpu());
    let mut sink = Sink::default();
    assert_eq!(
        bts.threshold_interrupt(&mut cpu, &mut sink, &mut Signals::default()),
        Ok(Pmi::NotBts)
    );
    // Loaded but below the threshold, or circular: not ours either.
    bts.config(&t, &mm, cfg(8, Flags::TRACE | Flags::INTERRUPT))
        .unwrap();
    bts.switch_in(&mut cpu, &t, 0, &mut Ignore, &mut Ignore)
        .unwrap();
    cpu.hw_mut().branch(1, 2, false);
    assert_eq!(
        bts.threshold_interrupt(&mut cpu, &mut sink, &mut Signals::default()),
        Ok(Pmi::NotBts)
    );
    assert!(cpu.hw().debugctl().has(DebugCtl::BTS), "left tracing");
    bts.switch_out(&mut cpu, 0, &mut Ignore, &mut Ignore)
        .unwrap();
}

#[test]
fn switch_in_of_a_busy_context_runs_untraced_and_counts_a_miss() {
    // An operation holding the context on another CPU: simulated by a second CPU that has
    // the task loaded.
    let (bts, _, _) = tracer::<4>();
    let (t, mm) = (Task::new(7), Space::new(100));
    let mut a = BtsCpu::new(user_cpu());
    let mut b = BtsCpu::new(user_cpu());
    bts.config(&t, &mm, cfg(8, Flags::TRACE)).unwrap();
    bts.switch_in(&mut a, &t, 0, &mut Ignore, &mut Ignore)
        .unwrap();
    bts.switch_in(&mut b, &t, 0, &mut Ignore, &mut Ignore)
        .unwrap();
    assert!(!b.is_loaded());
    assert_eq!(b.missed(), 1);
    bts.switch_out(&mut a, 0, &mut Ignore, &mut Ignore).unwrap();
}
