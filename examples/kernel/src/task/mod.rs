//! Tasks: the preemptive scheduler, the work queue, ring-3 tasks and the small user library
//! they run.

pub mod sched;
pub mod ulib;
pub mod usermode;
pub mod workqueue;
