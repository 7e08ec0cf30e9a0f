//! Real x86-64 backend for an HVM guest: CPUID detection, hypercalls (through the hypercall
//! page or `vmcall`/`vmmcall`), and a [`Hypervisor`] over them.
//!
//! Hypercall convention (64-bit): number in RAX; arguments in RDI, RSI, RDX, R10, R8; result
//! in RAX (negative errno on failure). The hypercall page holds one 32-byte stub per number.

use core::arch::asm;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::abi::{
    DOMID_SELF, EvtchnBindIpi, EvtchnBindVirq, EvtchnClose, EvtchnUnmask, NR_EVENT_CHANNELS_2L,
    Port, SchedShutdown, VcpuRegisterVcpuInfo, XenAddToPhysmap, XenHvmEvtchnUpcallVector,
    XenHvmParam, evtchnop, hvmop, hypercall, schedop, shutdown, vcpuop, xenmem,
};
use crate::error::{Error, errno};
use crate::hal::{
    Cpuid, Errno, EventDelivery, HypercallInsn, Hypervisor, P2m, StartInfoFrames, SuspendResult,
    ToolstackChannels, XenCpuid, detect,
};

/// The CPU this code runs on.
#[derive(Debug, Default, Clone, Copy)]
pub struct Cpu;

impl Cpuid for Cpu {
    fn cpuid(&self, leaf: u32) -> [u32; 4] {
        let r = ::x86::cpuid::cpuid!(leaf);
        [r.eax, r.ebx, r.ecx, r.edx]
    }
}

/// Probes this CPU for Xen. `Err(Error::NotXen)` ("not running on Xen") on bare metal, QEMU
/// TCG, KVM, ...
pub fn probe() -> Result<XenCpuid, Error> {
    detect(&Cpu)
}

/// Bytes per hypercall stub in the hypercall page.
const STUB_SIZE: usize = 32;
/// Offset of `evtchn_mask` in `struct shared_info` (x86-64: 32 vCPU infos of 64 bytes, then
/// 64 pending words).
const EVTCHN_MASK_OFFSET: usize = 32 * 64 + 64 * 8;

/// How hypercalls enter Xen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    /// Call the stub in the hypercall page at this virtual address.
    Page(usize),
    /// Execute `vmcall` / `vmmcall` directly.
    Insn(HypercallInsn),
}

/// Issues hypercalls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hypercalls {
    gate: Gate,
}

impl Hypercalls {
    /// Hypercalls by executing `insn` directly (Xen accepts `vmcall` on VMX and `vmmcall` on
    /// SVM from HVM guests). Pick it with [`crate::hal::hypercall_insn`].
    ///
    /// # Safety
    /// The CPU must be running on Xen ([`probe`] succeeded) and `insn` must be the one of this
    /// CPU's vendor: otherwise the instruction faults.
    pub const unsafe fn direct(insn: HypercallInsn) -> Self {
        Self {
            gate: Gate::Insn(insn),
        }
    }

    /// Asks Xen to fill the page at physical address `page_pa` (mapped executable at
    /// `page_va`) with hypercall stubs, by writing `page_pa` to the MSR of CPUID leaf base+2.
    ///
    /// # Safety
    /// Running on Xen as `info` says; `page_va` maps the 4 KiB page at `page_pa`, executable,
    /// owned by the caller and never written by anyone else while hypercalls use it.
    pub unsafe fn install_page(
        info: &XenCpuid,
        page_va: NonNull<u8>,
        page_pa: u64,
    ) -> Result<Self, Error> {
        if page_pa & 0xfff != 0 || page_va.as_ptr() as usize & 0xfff != 0 {
            return Err(Error::Unaligned);
        }
        // SAFETY: the caller guarantees we run on Xen, whose CPUID names this MSR, and that the
        // page is ours: Xen writes the stubs into it (page index 0 in the low bits).
        unsafe { ::x86::msr::wrmsr(info.hypercall_msr, page_pa) };
        Ok(Self {
            gate: Gate::Page(page_va.as_ptr() as usize),
        })
    }

    /// Hypercall `nr` with `args` (RDI, RSI, RDX, R10, R8). Returns RAX.
    ///
    /// # Safety
    /// The arguments must be what hypercall `nr` expects: pointers valid (and live for the
    /// call) for the structures it reads and writes; the hypercall must not break memory the
    /// program relies on (e.g. unmapping its own pages).
    pub unsafe fn call(&self, nr: u32, args: [u64; 5]) -> i64 {
        let ret: i64;
        match self.gate {
            // SAFETY: the stub at nr*32 of the installed page is `mov eax, nr; vmcall; ret`
            // (Xen's code); registers follow the 64-bit hypercall ABI, the C clobbers cover
            // whatever the stub and Xen scratch; the caller vouches for the arguments.
            Gate::Page(page) => unsafe {
                asm!(
                    "call {stub}",
                    stub = in(reg) page + nr as usize * STUB_SIZE,
                    inlateout("rax") u64::from(nr) => ret,
                    inlateout("rdi") args[0] => _,
                    inlateout("rsi") args[1] => _,
                    inlateout("rdx") args[2] => _,
                    inlateout("r10") args[3] => _,
                    inlateout("r8") args[4] => _,
                    clobber_abi("C"),
                )
            },
            // SAFETY: as above, entering Xen with the vendor's instruction.
            Gate::Insn(HypercallInsn::Vmcall) => unsafe {
                asm!(
                    "vmcall",
                    inlateout("rax") u64::from(nr) => ret,
                    inlateout("rdi") args[0] => _,
                    inlateout("rsi") args[1] => _,
                    inlateout("rdx") args[2] => _,
                    inlateout("r10") args[3] => _,
                    inlateout("r8") args[4] => _,
                    options(nostack),
                )
            },
            // SAFETY: as above.
            Gate::Insn(HypercallInsn::Vmmcall) => unsafe {
                asm!(
                    "vmmcall",
                    inlateout("rax") u64::from(nr) => ret,
                    inlateout("rdi") args[0] => _,
                    inlateout("rsi") args[1] => _,
                    inlateout("rdx") args[2] => _,
                    inlateout("r10") args[3] => _,
                    inlateout("r8") args[4] => _,
                    options(nostack),
                )
            },
        }
        ret
    }
}

/// A hypercall result: negative errno → `Err`.
fn check(ret: i64) -> Result<i64, Errno> {
    if ret < 0 {
        Err(Errno(ret.unsigned_abs().min(4095) as i32))
    } else {
        Ok(ret)
    }
}

/// The pseudo-physical map of an HVM (auto-translated) guest: the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct HvmP2m;

impl P2m for HvmP2m {
    fn pfn_to_mfn(&self, pfn: u64) -> Option<u64> {
        Some(pfn)
    }
    fn mfn_to_pfn(&self, mfn: u64) -> Option<u64> {
        Some(mfn)
    }
}

/// How the kernel receives event-channel upcalls, for [`EventDelivery`] after a restore.
#[derive(Debug, Clone, Copy)]
pub struct Delivery {
    /// The IDT vector of the upcall handler (Linux uses 0xf3).
    pub vector: u8,
    /// `true`: per-vCPU upcall vectors (`HVMOP_set_evtchn_upcall_vector` for each vCPU);
    /// `false`: one domain-wide callback (`HVM_PARAM_CALLBACK_IRQ` of type vector).
    pub per_vcpu_vector: bool,
    /// Where vCPU `n`'s `vcpu_info` lives, as (guest frame, byte offset), registered with
    /// `VCPUOP_register_vcpu_info`; `None`: the legacy slots in shared info (vCPUs < 32),
    /// nothing to register.
    pub vcpu_info: Option<fn(u32) -> (u64, u32)>,
}

impl Default for Delivery {
    fn default() -> Self {
        Self {
            vector: 0xf3,
            per_vcpu_vector: false,
            vcpu_info: None,
        }
    }
}

/// The hypervisor of an HVM guest: event channels, the suspend hypercall, shared info mapped
/// at a guest frame the kernel chose, event delivery.
#[derive(Debug)]
pub struct XenHvm {
    hc: Hypercalls,
    shared_info: NonNull<u8>,
    shared_info_gpfn: u64,
    frames: StartInfoFrames,
    delivery: Delivery,
    channels: ToolstackChannels,
}

impl XenHvm {
    /// Maps shared info at guest frame `shared_info_gpfn` (`XENMEM_add_to_physmap`) and reads
    /// the store and console frames (`HVMOP_get_param`).
    ///
    /// # Safety
    /// `hc` issues hypercalls to this Xen; `shared_info_va` maps `shared_info_gpfn` writable
    /// (4 KiB) for as long as the value lives, and nothing else uses that frame.
    pub unsafe fn new(
        hc: Hypercalls,
        shared_info_va: NonNull<u8>,
        shared_info_gpfn: u64,
    ) -> Result<Self, Error> {
        let mut this = Self {
            hc,
            shared_info: shared_info_va,
            shared_info_gpfn,
            frames: StartInfoFrames::default(),
            delivery: Delivery::default(),
            channels: ToolstackChannels::default(),
        };
        this.setup_shared_info()
            .map_err(|e| Error::Hypervisor(e.0))?;
        let store = this
            .param(hvmop::PARAM_STORE_PFN)
            .map_err(|e| Error::Hypervisor(e.0))?;
        let console = this
            .param(hvmop::PARAM_CONSOLE_PFN)
            .map_err(|e| Error::Hypervisor(e.0))?;
        this.frames = StartInfoFrames { store, console };
        this.reread_channels().map_err(|e| Error::Hypervisor(e.0))?;
        Ok(this)
    }

    /// Sets how upcalls reach the kernel (re-established by [`EventDelivery`] after a
    /// restore); [`Delivery::default`] until called.
    pub fn set_delivery(&mut self, delivery: Delivery) {
        self.delivery = delivery;
    }

    /// The store and console event channels of the current domain (read at `new` and by
    /// [`EventDelivery::reread_channels`]).
    pub fn channels(&self) -> ToolstackChannels {
        self.channels
    }

    fn set_param(&self, index: u32, value: u64) -> Result<(), Errno> {
        let mut p = XenHvmParam {
            domid: DOMID_SELF,
            index,
            value,
            ..XenHvmParam::default()
        };
        // SAFETY: HVMOP_set_param reads one xen_hvm_param, live on our stack.
        check(unsafe {
            self.hc.call(
                hypercall::HVM_OP,
                [u64::from(hvmop::SET_PARAM), &raw mut p as u64, 0, 0, 0],
            )
        })
        .map(drop)
    }

    /// A port from an HVM param: untrusted, must fit the 2-level port space (0: no channel,
    /// e.g. an HVM guest without a PV console).
    fn port_param(&self, index: u32) -> Result<Port, Errno> {
        let v = self.param(index)?;
        if v >= NR_EVENT_CHANNELS_2L as u64 {
            return Err(Errno(errno::EINVAL));
        }
        Ok(v as Port)
    }

    fn param(&self, index: u32) -> Result<u64, Errno> {
        let mut p = XenHvmParam {
            domid: DOMID_SELF,
            index,
            ..XenHvmParam::default()
        };
        // SAFETY: HVMOP_get_param reads and writes one xen_hvm_param, live on our stack.
        check(unsafe {
            self.hc.call(
                hypercall::HVM_OP,
                [u64::from(hvmop::GET_PARAM), &raw mut p as u64, 0, 0, 0],
            )
        })?;
        Ok(p.value)
    }

    fn evtchn_op<T>(&mut self, cmd: u32, arg: &mut T) -> Result<(), Errno> {
        // SAFETY: `arg` is the ABI structure of `cmd` (callers pair them), live for the call.
        check(unsafe {
            self.hc.call(
                hypercall::EVENT_CHANNEL_OP,
                [u64::from(cmd), arg as *mut T as u64, 0, 0, 0],
            )
        })
        .map(drop)
    }
}

impl Hypervisor for XenHvm {
    type Error = Errno;

    fn bind_virq(&mut self, virq: u32, vcpu: u32) -> Result<Port, Errno> {
        let mut op = EvtchnBindVirq {
            virq,
            vcpu,
            port: 0,
        };
        self.evtchn_op(evtchnop::BIND_VIRQ, &mut op)?;
        Ok(op.port)
    }

    fn bind_ipi(&mut self, vcpu: u32) -> Result<Port, Errno> {
        let mut op = EvtchnBindIpi { vcpu, port: 0 };
        self.evtchn_op(evtchnop::BIND_IPI, &mut op)?;
        Ok(op.port)
    }

    fn mask(&mut self, port: Port) {
        let port = port as usize;
        if port >= NR_EVENT_CHANNELS_2L {
            return;
        }
        let offset = EVTCHN_MASK_OFFSET + (port / 64) * 8;
        // SAFETY: `new`'s contract: shared_info maps a 4 KiB page we may write; the word is
        // inside it (offset < 2560 + 512) and 8-aligned; Xen accesses it atomically too.
        let word = unsafe { AtomicU64::from_ptr(self.shared_info.as_ptr().add(offset).cast()) };
        word.fetch_or(1 << (port % 64), Ordering::SeqCst);
    }

    fn unmask(&mut self, port: Port) -> Result<(), Errno> {
        let mut op = EvtchnUnmask { port };
        self.evtchn_op(evtchnop::UNMASK, &mut op)
    }

    fn close(&mut self, port: Port) -> Result<(), Errno> {
        let mut op = EvtchnClose { port };
        self.evtchn_op(evtchnop::CLOSE, &mut op)
    }

    fn max_ports(&self) -> usize {
        NR_EVENT_CHANNELS_2L
    }

    fn suspend(&mut self) -> Result<SuspendResult, Errno> {
        let mut op = SchedShutdown {
            reason: shutdown::SUSPEND,
        };
        // SAFETY: SCHEDOP_shutdown reads one sched_shutdown; an HVM guest passes 0 for the
        // start-info frame. Returns when the domain runs again.
        let ret = check(unsafe {
            self.hc.call(
                hypercall::SCHED_OP,
                [u64::from(schedop::SHUTDOWN), &raw mut op as u64, 0, 0, 0],
            )
        })?;
        Ok(if ret == 0 {
            SuspendResult::Resumed
        } else {
            SuspendResult::Cancelled
        })
    }

    fn update_va_mapping(&mut self, va: u64, pte: u64, flags: u64) -> Result<(), Errno> {
        // SAFETY: PV-only; on HVM Xen rejects it (-ENOSYS) without touching memory. Callers
        // asking for it on PV vouch for the mapping change.
        check(unsafe {
            self.hc
                .call(hypercall::UPDATE_VA_MAPPING, [va, pte, flags, 0, 0])
        })
        .map(drop)
    }

    fn start_info_frames(&self) -> StartInfoFrames {
        self.frames
    }

    fn set_start_info_frames(&mut self, frames: StartInfoFrames) {
        self.frames = frames;
    }

    fn shared_info_va(&self) -> u64 {
        self.shared_info.as_ptr() as u64
    }

    fn use_dummy_shared_info(&mut self) {
        // HVM shared info lives in a guest frame that stays mapped across the save.
    }

    fn unmap_shared_info(&mut self) -> Result<(), Errno> {
        Ok(())
    }

    fn setup_shared_info(&mut self) -> Result<(), Errno> {
        let mut op = XenAddToPhysmap {
            domid: DOMID_SELF,
            size: 0,
            space: xenmem::MAPSPACE_SHARED_INFO,
            idx: 0,
            gpfn: self.shared_info_gpfn,
        };
        // SAFETY: XENMEM_add_to_physmap reads one xen_add_to_physmap; it maps shared info at
        // the frame `new`'s caller reserved for it.
        check(unsafe {
            self.hc.call(
                hypercall::MEMORY_OP,
                [
                    u64::from(xenmem::ADD_TO_PHYSMAP),
                    &raw mut op as u64,
                    0,
                    0,
                    0,
                ],
            )
        })
        .map(drop)?;
        // The new domain's store and console frames.
        if let (Ok(store), Ok(console)) = (
            self.param(hvmop::PARAM_STORE_PFN),
            self.param(hvmop::PARAM_CONSOLE_PFN),
        ) {
            self.frames = StartInfoFrames { store, console };
        }
        Ok(())
    }
}

impl EventDelivery for XenHvm {
    type Error = Errno;

    fn set_callback(&mut self) -> Result<(), Errno> {
        if self.delivery.per_vcpu_vector {
            // Set per vCPU in register_vcpu_info.
            return Ok(());
        }
        self.set_param(
            hvmop::PARAM_CALLBACK_IRQ,
            hvmop::CALLBACK_VIA_TYPE_VECTOR | u64::from(self.delivery.vector),
        )
    }

    fn register_vcpu_info(&mut self, vcpu: u32) -> Result<(), Errno> {
        if let Some(place) = self.delivery.vcpu_info {
            let (mfn, offset) = place(vcpu);
            let mut op = VcpuRegisterVcpuInfo {
                mfn,
                offset,
                rsvd: 0,
            };
            // SAFETY: VCPUOP_register_vcpu_info reads one vcpu_register_vcpu_info, live on
            // our stack; the frame it names is the kernel's (`Delivery::vcpu_info`'s contract
            // is the caller's: it names memory reserved for that vCPU's vcpu_info).
            check(unsafe {
                self.hc.call(
                    hypercall::VCPU_OP,
                    [
                        u64::from(vcpuop::REGISTER_VCPU_INFO),
                        u64::from(vcpu),
                        &raw mut op as u64,
                        0,
                        0,
                    ],
                )
            })?;
        }
        if self.delivery.per_vcpu_vector {
            let mut op = XenHvmEvtchnUpcallVector {
                vcpu,
                vector: self.delivery.vector,
                _pad: [0; 3],
            };
            // SAFETY: HVMOP_set_evtchn_upcall_vector reads one xen_hvm_evtchn_upcall_vector,
            // live on our stack.
            check(unsafe {
                self.hc.call(
                    hypercall::HVM_OP,
                    [
                        u64::from(hvmop::SET_EVTCHN_UPCALL_VECTOR),
                        &raw mut op as u64,
                        0,
                        0,
                        0,
                    ],
                )
            })?;
        }
        Ok(())
    }

    fn reread_channels(&mut self) -> Result<(), Errno> {
        self.channels = ToolstackChannels {
            store: self.port_param(hvmop::PARAM_STORE_EVTCHN)?,
            console: self.port_param(hvmop::PARAM_CONSOLE_EVTCHN)?,
        };
        Ok(())
    }
}
