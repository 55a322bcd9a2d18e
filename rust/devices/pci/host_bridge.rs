//! The host bridge at 00:00.0: identity only (Intel's 0x0d57 id, class 06/00/00, like Cloud
//! Hypervisor's), no BARs.

use super::config_space::{ConfigSpace, Identity};
use super::PciFunction;

pub struct HostBridge {
    config: ConfigSpace,
}

impl HostBridge {
    pub fn new() -> HostBridge {
        let id = Identity {
            vendor: 0x8086,
            device: 0x0d57,
            revision: 0,
            class: (0x06, 0x00, 0x00),
            subsystem_vendor: 0,
            subsystem: 0,
        };
        HostBridge {
            config: ConfigSpace::new(&id),
        }
    }
}

impl PciFunction for HostBridge {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn write_config(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.config.write(reg, offset, data);
    }

    fn read_bar(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write_bar(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}
