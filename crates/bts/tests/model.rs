//! Property test: random branch/switch/read/drain/clear sequences against a shadow model of a
//! circular trace (the newest `capacity` records), with a seeded xorshift PRNG.

mod common;

use std::collections::VecDeque;

use common::{Ignore, Space, Task, tracer, user_cpu};
use oskit_bts::{BtsCpu, Config, Error, Flags, Record, format::RECORD_SIZE};

struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn circular_traces_match_the_shadow_model() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let rounds = if cfg!(miri) { 4 } else { 200 };
    for round in 0..rounds {
        let (bts, alloc, _) = tracer::<2>();
        let (t, mm) = (Task::new(round), Space::new(1000));
        let mut cpu = BtsCpu::new(user_cpu());
        let capacity = 1 + rng.below(40) as usize;
        let mut flags = Flags::TRACE;
        if rng.below(2) == 0 {
            flags = flags | Flags::SCHED;
        }
        match rng.below(5) {
            0 => flags = flags | Flags::NO_KERNEL,
            1 => flags = flags | Flags::NO_USER,
            2 => flags = flags | Flags::KERNEL,
            3 => flags = flags | Flags::KERNEL | Flags::NO_USER,
            _ => {}
        }
        let cfg = Config {
            size: capacity * RECORD_SIZE + rng.below(RECORD_SIZE as u64) as usize,
            flags: flags | Flags::ALLOC,
            signal: 0,
        };
        bts.config(&t, &mm, cfg).unwrap();
        let mut shadow: VecDeque<Record> = VecDeque::new();
        let push = |shadow: &mut VecDeque<Record>, r: Record| {
            if shadow.len() == capacity {
                shadow.pop_front();
            }
            shadow.push_back(r);
        };
        let mut clock = 0;
        for _ in 0..300 {
            clock += 1;
            match rng.below(6) {
                0 => {
                    // The task runs a burst of branches.
                    bts.switch_in(&mut cpu, &t, clock, &mut Ignore, &mut Ignore)
                        .unwrap();
                    if flags.contains(Flags::SCHED) {
                        push(
                            &mut shadow,
                            Record::TaskArrives {
                                timestamp: clock,
                                pid: round,
                            },
                        );
                    }
                    for _ in 0..rng.below(3 * capacity as u64) {
                        let cpl = if rng.below(2) == 0 { 0 } else { 3 };
                        cpu.hw_mut().set_cpl(cpl);
                        let from = 0x1000 + rng.below(1 << 40);
                        let (to, predicted) = (rng.below(1 << 47), rng.below(2) == 0);
                        cpu.hw_mut().branch(from, to, predicted);
                        // User branches by default; kernel ones only with KERNEL.
                        let filtered = if cpl == 0 {
                            !flags.contains(Flags::KERNEL)
                        } else {
                            flags.contains(Flags::NO_USER)
                        };
                        if !filtered {
                            push(
                                &mut shadow,
                                Record::Branch {
                                    from,
                                    to,
                                    predicted,
                                },
                            );
                        }
                    }
                    clock += 1;
                    bts.switch_out(&mut cpu, clock, &mut Ignore, &mut Ignore)
                        .unwrap();
                    if flags.contains(Flags::SCHED) {
                        push(
                            &mut shadow,
                            Record::TaskDeparts {
                                timestamp: clock,
                                pid: round,
                            },
                        );
                    }
                }
                1 | 2 => {
                    assert_eq!(bts.size(&t), Ok(shadow.len()));
                    let i = rng.below(capacity as u64 + 1) as usize;
                    let want = shadow
                        .len()
                        .checked_sub(i + 1)
                        .map(|at| shadow[at])
                        .ok_or(Error::InvalidArgument);
                    assert_eq!(bts.read(&t, i), want, "round {round} index {i}");
                }
                3 => {
                    let mut out = vec![Record::Invalid; capacity];
                    let n = bts.drain(&t, &mut out).unwrap();
                    assert_eq!(&out[..n], shadow.make_contiguous(), "round {round}");
                    shadow.clear();
                }
                4 => {
                    if rng.below(4) == 0 {
                        bts.clear(&t).unwrap();
                        shadow.clear();
                    }
                }
                _ => {
                    // An untraced task runs: nothing recorded.
                    bts.switch_in(&mut cpu, &Task::new(9999), clock, &mut Ignore, &mut Ignore)
                        .unwrap();
                    cpu.hw_mut().branch(1, 2, false);
                    bts.switch_out(&mut cpu, clock, &mut Ignore, &mut Ignore)
                        .unwrap();
                }
            }
        }
        bts.untrace(&t).unwrap();
        assert_eq!(bts.run_deferred(), 1);
        assert_eq!((alloc.live(), mm.locked()), (0, 0));
    }
}
