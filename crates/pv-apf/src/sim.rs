//! Software model of the hardware: a KVM host as the guest sees it.

use crate::hal::{ApfHardware, KvmFeatures};

/// A simulated host: KVM with the given features, or bare metal.
#[derive(Debug, Clone, Default)]
pub struct SimHost {
    features: Option<KvmFeatures>,
}

impl SimHost {
    /// Bare metal: no hypervisor answers.
    pub const fn bare_metal() -> Self {
        Self { features: None }
    }

    /// A KVM host offering `features`.
    pub const fn kvm(features: u32) -> Self {
        Self {
            features: Some(KvmFeatures(features)),
        }
    }
}

impl ApfHardware for SimHost {
    fn probe(&self) -> Option<KvmFeatures> {
        self.features
    }
}
