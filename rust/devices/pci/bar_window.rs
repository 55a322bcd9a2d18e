//! A PCI MMIO window on the MMIO bus: every access in it goes to the BAR that decodes its address
//! now, so a BAR the guest moves within the windows keeps working (see docs/devices.md).

use std::sync::Arc;

use super::PciRoot;
use crate::devices::{BusDevice, DeviceAction};

pub struct PciBarWindow {
    root: Arc<PciRoot>,
    base: u64,
}

impl PciBarWindow {
    pub fn new(root: Arc<PciRoot>, base: u64) -> PciBarWindow {
        PciBarWindow { root, base }
    }
}

impl BusDevice<u64> for PciBarWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let hit = self
            .root
            .access_bar(self.base + offset, &mut |f, bar, off| {
                f.read_bar(bar, off, data)
            });
        if !hit {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceAction {
        self.root
            .access_bar(self.base + offset, &mut |f, bar, off| {
                f.write_bar(bar, off, data)
            });
        DeviceAction::None
    }
}
