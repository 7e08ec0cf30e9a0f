//! Xen's public ABI as far as save/restore needs it (`xen/include/public/{xen,sched,event_channel,
//! memory,hvm/hvm_op,hvm/params}.h`, x86-64 layout).
//!
//! Every structure is byte-exact: `repr(C)`, explicit padding, zerocopy derives and compile-time
//! size/offset assertions.

use static_assertions::{const_assert, const_assert_eq};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Hypercall numbers (`__HYPERVISOR_*`).
pub mod hypercall {
    /// `__HYPERVISOR_memory_op`.
    pub const MEMORY_OP: u32 = 12;
    /// `__HYPERVISOR_update_va_mapping` (PV only).
    pub const UPDATE_VA_MAPPING: u32 = 14;
    /// `__HYPERVISOR_xen_version`.
    pub const XEN_VERSION: u32 = 17;
    /// `__HYPERVISOR_grant_table_op`.
    pub const GRANT_TABLE_OP: u32 = 20;
    /// `__HYPERVISOR_mmuext_op` (PV only).
    pub const MMUEXT_OP: u32 = 26;
    /// `__HYPERVISOR_sched_op`.
    pub const SCHED_OP: u32 = 29;
    /// `__HYPERVISOR_vcpu_op`.
    pub const VCPU_OP: u32 = 24;
    /// `__HYPERVISOR_event_channel_op`.
    pub const EVENT_CHANNEL_OP: u32 = 32;
    /// `__HYPERVISOR_hvm_op`.
    pub const HVM_OP: u32 = 34;
}

/// `sched_op` sub-commands (`SCHEDOP_*`).
pub mod schedop {
    /// Give up the CPU.
    pub const YIELD: u32 = 0;
    /// Block until an event arrives.
    pub const BLOCK: u32 = 1;
    /// Stop the domain with a [`super::SchedShutdown`] reason.
    pub const SHUTDOWN: u32 = 2;
}

/// Reasons of [`schedop::SHUTDOWN`] (`SHUTDOWN_*`).
pub mod shutdown {
    /// Domain exited normally: clean up and kill.
    pub const POWEROFF: u32 = 0;
    /// Clean up, kill, and then restart.
    pub const REBOOT: u32 = 1;
    /// Clean up, save the suspend image, and kill (or resume when cancelled).
    pub const SUSPEND: u32 = 2;
    /// Tell the controller we crashed.
    pub const CRASH: u32 = 3;
    /// Restart because the watchdog timed out.
    pub const WATCHDOG: u32 = 4;
}

/// `event_channel_op` sub-commands (`EVTCHNOP_*`).
pub mod evtchnop {
    /// Bind a VIRQ of a vCPU to a new port ([`super::EvtchnBindVirq`]).
    pub const BIND_VIRQ: u32 = 1;
    /// Close a port.
    pub const CLOSE: u32 = 3;
    /// Send an event on a port.
    pub const SEND: u32 = 4;
    /// Bind an inter-processor interrupt of a vCPU to a new port ([`super::EvtchnBindIpi`]).
    pub const BIND_IPI: u32 = 7;
    /// Unmask a port and deliver its pending event ([`super::EvtchnUnmask`]).
    pub const UNMASK: u32 = 9;
}

/// `vcpu_op` sub-commands (`VCPUOP_*`).
pub mod vcpuop {
    /// Registers where a vCPU's `vcpu_info` lives ([`super::VcpuRegisterVcpuInfo`]).
    pub const REGISTER_VCPU_INFO: u32 = 10;
}

/// `update_va_mapping` flags (`UVMF_*`).
pub mod uvmf {
    /// No TLB flush.
    pub const NONE: u64 = 0;
    /// Flush the whole TLB.
    pub const TLB_FLUSH: u64 = 1;
    /// Flush only the one address.
    pub const INVLPG: u64 = 2;
}

/// `memory_op` sub-commands and `add_to_physmap` spaces.
pub mod xenmem {
    /// `XENMEM_add_to_physmap`.
    pub const ADD_TO_PHYSMAP: u32 = 7;
    /// `XENMAPSPACE_shared_info`.
    pub const MAPSPACE_SHARED_INFO: u32 = 0;
    /// `XENMAPSPACE_grant_table`.
    pub const MAPSPACE_GRANT_TABLE: u32 = 1;
}

/// `hvm_op` sub-commands and parameters.
pub mod hvmop {
    /// `HVMOP_set_param`.
    pub const SET_PARAM: u32 = 0;
    /// `HVMOP_get_param`.
    pub const GET_PARAM: u32 = 1;
    /// `HVMOP_set_evtchn_upcall_vector`: a per-vCPU upcall vector
    /// ([`super::XenHvmEvtchnUpcallVector`]).
    pub const SET_EVTCHN_UPCALL_VECTOR: u32 = 23;
    /// `HVM_PARAM_CALLBACK_IRQ`: how event-channel upcalls reach the domain.
    pub const PARAM_CALLBACK_IRQ: u32 = 0;
    /// `HVM_PARAM_CALLBACK_IRQ` value type "vector" (bits 63:56): bits 7:0 are the vector.
    pub const CALLBACK_VIA_TYPE_VECTOR: u64 = 2 << 56;
    /// `HVM_PARAM_STORE_PFN`.
    pub const PARAM_STORE_PFN: u32 = 1;
    /// `HVM_PARAM_STORE_EVTCHN`.
    pub const PARAM_STORE_EVTCHN: u32 = 2;
    /// `HVM_PARAM_CONSOLE_PFN`.
    pub const PARAM_CONSOLE_PFN: u32 = 17;
    /// `HVM_PARAM_CONSOLE_EVTCHN`.
    pub const PARAM_CONSOLE_EVTCHN: u32 = 18;
}

/// Virtual IRQ numbers (`VIRQ_*`).
pub mod virq {
    /// Timer tick of this vCPU (per-vCPU).
    pub const TIMER: u32 = 0;
    /// Request guest to dump debug info.
    pub const DEBUG: u32 = 1;
    /// Bytes received on the emergency console.
    pub const CONSOLE: u32 = 2;
    /// A domain has exited (dom0 only).
    pub const DOM_EXC: u32 = 3;
    /// Trace buffer has records.
    pub const TBUF: u32 = 4;
    /// A domain's debugger stopped it.
    pub const DEBUGGER: u32 = 6;
    /// Xenoprof samples available (per-vCPU).
    pub const XENOPROF: u32 = 7;
    /// Xen's console ring has data.
    pub const CON_RING: u32 = 8;
    /// Physical CPU state changed.
    pub const PCPU_STATE: u32 = 9;
    /// Memory event pending.
    pub const MEM_EVENT: u32 = 10;
    /// Argo interdomain message.
    pub const ARGO: u32 = 11;
    /// Xen's heap is low.
    pub const ENOMEM: u32 = 12;
    /// Performance monitoring interrupt (per-vCPU).
    pub const XENPMU: u32 = 13;
    /// First architecture-specific VIRQ.
    pub const ARCH_0: u32 = 16;
    /// Whether `virq` is per-vCPU (bound once per vCPU: `TIMER`, `DEBUG`, `XENOPROF`,
    /// `XENPMU`, marked "V." in `xen.h`). Every other VIRQ is global ("G."): Xen binds it
    /// only on vCPU 0 and answers `-EINVAL` for any other vCPU.
    pub const fn is_per_vcpu(virq: u32) -> bool {
        matches!(virq, TIMER | DEBUG | XENOPROF | XENPMU)
    }
    /// Number of VIRQs (`NR_VIRQS`).
    pub const NR_VIRQS: u32 = 24;
}

/// `evtchn_port_t`.
pub type Port = u32;

/// Number of event-channel ports of the 2-level ABI on a 64-bit guest
/// (`sizeof(xen_ulong_t) * sizeof(xen_ulong_t) * 64`).
pub const NR_EVENT_CHANNELS_2L: usize = 4096;

/// `struct evtchn_bind_virq`: binds `virq` of `vcpu`; Xen fills `port`.
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Debug, Clone, Copy, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct EvtchnBindVirq {
    /// IN: the VIRQ (`VIRQ_*`).
    pub virq: u32,
    /// IN: the vCPU whose VIRQ it is.
    pub vcpu: u32,
    /// OUT: the new port.
    pub port: Port,
}

/// `struct evtchn_bind_ipi`: a new IPI port of `vcpu`; Xen fills `port`.
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Debug, Clone, Copy, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct EvtchnBindIpi {
    /// IN: the vCPU the port notifies.
    pub vcpu: u32,
    /// OUT: the new port.
    pub port: Port,
}

/// `struct evtchn_unmask`.
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Debug, Clone, Copy, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct EvtchnUnmask {
    /// IN: the port to unmask.
    pub port: Port,
}

/// `struct evtchn_close`: argument of [`evtchnop::CLOSE`].
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Debug, Clone, Copy, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct EvtchnClose {
    /// IN: the port to close.
    pub port: Port,
}

/// `struct vcpu_register_vcpu_info`: argument of [`vcpuop::REGISTER_VCPU_INFO`].
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Debug, Clone, Copy, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct VcpuRegisterVcpuInfo {
    /// Guest frame holding the `vcpu_info`.
    pub mfn: u64,
    /// Byte offset of the `vcpu_info` in that frame.
    pub offset: u32,
    /// Reserved (zero).
    pub rsvd: u32,
}

/// `struct xen_hvm_evtchn_upcall_vector`: argument of [`hvmop::SET_EVTCHN_UPCALL_VECTOR`].
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Debug, Clone, Copy, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct XenHvmEvtchnUpcallVector {
    /// The vCPU.
    pub vcpu: u32,
    /// The vector its upcalls arrive on.
    pub vector: u8,
    /// Explicit padding (zero).
    pub _pad: [u8; 3],
}

/// `struct sched_shutdown`: argument of [`schedop::SHUTDOWN`].
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Debug, Clone, Copy, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct SchedShutdown {
    /// A `SHUTDOWN_*` reason.
    pub reason: u32,
}

/// `struct xen_add_to_physmap` (x86-64): map a Xen page (shared info, grant frame) at `gpfn`.
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Debug, Clone, Copy, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct XenAddToPhysmap {
    /// `DOMID_SELF` (0x7ff0) for the calling domain.
    pub domid: u16,
    /// Number of pages for `XENMAPSPACE_gmfn_range`.
    pub size: u16,
    /// A `XENMAPSPACE_*` value.
    pub space: u32,
    /// Index into the space.
    pub idx: u64,
    /// Guest frame to map it at.
    pub gpfn: u64,
}

/// `DOMID_SELF`.
pub const DOMID_SELF: u16 = 0x7ff0;

/// `struct xen_hvm_param`: argument of [`hvmop::GET_PARAM`] / [`hvmop::SET_PARAM`].
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Debug, Clone, Copy, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct XenHvmParam {
    /// `DOMID_SELF`.
    pub domid: u16,
    /// Explicit padding (zero).
    pub _pad: [u8; 2],
    /// An `HVM_PARAM_*` index.
    pub index: u32,
    /// The value.
    pub value: u64,
}

/// Magic prefix of [`StartInfo::magic`] on x86-64.
pub const START_INFO_MAGIC: &[u8] = b"xen-3.0-x86_64";

/// `MAX_GUEST_CMDLINE`.
pub const MAX_GUEST_CMDLINE: usize = 1024;

/// `struct start_info` of a PV guest (x86-64). The toolstack rewrites the store and console
/// frames on restore; the guest turns them into PFNs before it suspends.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct StartInfo {
    /// `"xen-<version>-<platform>"`.
    pub magic: [u8; 32],
    /// Total pages allocated to this domain.
    pub nr_pages: u64,
    /// Machine address of the shared info page.
    pub shared_info: u64,
    /// `SIF_*` flags.
    pub flags: u32,
    /// Explicit padding.
    pub _pad0: u32,
    /// Machine frame of the xenstore ring (a PFN while suspended).
    pub store_mfn: u64,
    /// Event channel of the xenstore ring.
    pub store_evtchn: u32,
    /// Explicit padding.
    pub _pad1: u32,
    /// Machine frame of the console ring (`console.domU.mfn`; a PFN while suspended).
    pub console_mfn: u64,
    /// Event channel of the console ring (`console.domU.evtchn`).
    pub console_evtchn: u32,
    /// Explicit padding.
    pub _pad2: u32,
    /// Virtual address of the initial page tables.
    pub pt_base: u64,
    /// Number of bootstrap page-table frames.
    pub nr_pt_frames: u64,
    /// Virtual address of the page-frame list.
    pub mfn_list: u64,
    /// Start of a loaded module.
    pub mod_start: u64,
    /// Size of the module in bytes.
    pub mod_len: u64,
    /// Command line.
    pub cmd_line: [u8; MAX_GUEST_CMDLINE],
    /// First PFN of the P2M table.
    pub first_p2m_pfn: u64,
    /// Number of P2M frames.
    pub nr_p2m_frames: u64,
}

const_assert_eq!(core::mem::size_of::<EvtchnBindVirq>(), 12);
const_assert_eq!(core::mem::offset_of!(EvtchnBindVirq, vcpu), 4);
const_assert_eq!(core::mem::offset_of!(EvtchnBindVirq, port), 8);
const_assert_eq!(core::mem::size_of::<EvtchnBindIpi>(), 8);
const_assert_eq!(core::mem::offset_of!(EvtchnBindIpi, port), 4);
const_assert_eq!(core::mem::size_of::<EvtchnUnmask>(), 4);
const_assert_eq!(core::mem::size_of::<SchedShutdown>(), 4);
const_assert_eq!(core::mem::size_of::<XenAddToPhysmap>(), 24);
const_assert_eq!(core::mem::offset_of!(XenAddToPhysmap, idx), 8);
const_assert_eq!(core::mem::offset_of!(XenAddToPhysmap, gpfn), 16);
const_assert_eq!(core::mem::size_of::<XenHvmParam>(), 16);
const_assert_eq!(core::mem::offset_of!(XenHvmParam, index), 4);
const_assert_eq!(core::mem::offset_of!(XenHvmParam, value), 8);
const_assert_eq!(core::mem::offset_of!(StartInfo, nr_pages), 32);
const_assert_eq!(core::mem::offset_of!(StartInfo, shared_info), 40);
const_assert_eq!(core::mem::offset_of!(StartInfo, flags), 48);
const_assert_eq!(core::mem::offset_of!(StartInfo, store_mfn), 56);
const_assert_eq!(core::mem::offset_of!(StartInfo, store_evtchn), 64);
const_assert_eq!(core::mem::offset_of!(StartInfo, console_mfn), 72);
const_assert_eq!(core::mem::offset_of!(StartInfo, console_evtchn), 80);
const_assert_eq!(core::mem::offset_of!(StartInfo, pt_base), 88);
const_assert_eq!(core::mem::offset_of!(StartInfo, cmd_line), 128);
const_assert_eq!(core::mem::offset_of!(StartInfo, first_p2m_pfn), 1152);
const_assert_eq!(core::mem::size_of::<StartInfo>(), 1168);
const_assert_eq!(core::mem::align_of::<StartInfo>(), 8);
const_assert!(virq::NR_VIRQS > virq::XENPMU);
const_assert_eq!(core::mem::size_of::<EvtchnClose>(), 4);
const_assert_eq!(core::mem::size_of::<VcpuRegisterVcpuInfo>(), 16);
const_assert_eq!(core::mem::offset_of!(VcpuRegisterVcpuInfo, offset), 8);
const_assert_eq!(core::mem::size_of::<XenHvmEvtchnUpcallVector>(), 8);
const_assert_eq!(core::mem::offset_of!(XenHvmEvtchnUpcallVector, vector), 4);
