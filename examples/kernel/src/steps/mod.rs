//! One composition step per oskit crate: each drives its crate on this kernel and checks what
//! it did (`fork`: oskit-pte-batch, `bts`: oskit-bts, `apf`: oskit-pv-apf, `xen`:
//! oskit-xen-suspend, `trace` + `trace_map`: oskit-ring-buffer read from ring 3).

pub mod apf;
pub mod bts;
pub mod fork;
pub mod fork_control;
pub mod fork_measure;
pub mod fork_scale;
pub mod trace;
pub mod trace_map;
pub mod xen;
