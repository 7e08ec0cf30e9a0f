//! Software model of the hardware: a CPU that stores branch records as the SDM specifies.

use crate::hal::{BtsHardware, BtsSupport};

/// A software CPU with BTS, for tests and for machines (every VM) without it.
#[derive(Debug, Clone)]
pub struct SoftCpu {
    support: BtsSupport,
}

impl Default for SoftCpu {
    fn default() -> Self {
        Self {
            support: BtsSupport {
                debug_store: true,
                dtes64: true,
                bts_enabled: true,
            },
        }
    }
}

impl SoftCpu {
    /// A software CPU that reports `support` when probed.
    pub const fn with_support(support: BtsSupport) -> Self {
        Self { support }
    }
}

impl BtsHardware for SoftCpu {
    fn probe(&self) -> BtsSupport {
        self.support
    }
}
