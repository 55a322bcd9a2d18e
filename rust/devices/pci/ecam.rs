//! PCI Express enhanced configuration access (ECAM) for bus 0: byte `dev << 15 | fn << 12 | off`
//! of the region is byte `off` of that function's config space. Functions are conventional PCI:
//! offsets past 256 read zero.

use std::sync::Arc;

use super::{config_reg, read_bytes, PciRoot};
use crate::devices::{BusDevice, DeviceAction};

pub struct PciEcam {
    root: Arc<PciRoot>,
}

impl PciEcam {
    pub fn new(root: Arc<PciRoot>) -> PciEcam {
        PciEcam { root }
    }
}

fn decode(offset: u64) -> (u8, u8, u8, usize) {
    (
        (offset >> 20) as u8,
        (offset >> 15 & 0x1f) as u8,
        (offset >> 12 & 7) as u8,
        (offset & 0xfff) as usize,
    )
}

impl BusDevice<u64> for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (bus, dev, func, off) = decode(offset);
        match config_reg(off, data.len()) {
            Some((reg, within)) if reg < super::config_space::NUM_REGS => {
                read_bytes(self.root.read_config(bus, dev, func, reg), within, data)
            }
            Some(_) if self.root.read_config(bus, dev, func, 0) != u32::MAX => data.fill(0),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceAction {
        let (bus, dev, func, off) = decode(offset);
        if let Some((reg, within)) = config_reg(off, data.len()) {
            self.root.write_config(bus, dev, func, reg, within, data);
        }
        DeviceAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_device_function_and_offset() {
        let mut ecam = PciEcam::new(Arc::new(PciRoot::new(Vec::new())));
        let mut d = [0u8; 4];
        ecam.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0d57_8086);
        let mut b = [0u8; 1];
        ecam.read(0xb, &mut b);
        assert_eq!(b[0], 0x06);
        ecam.read(0x100, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0, "no extended capabilities");
        ecam.read(1 << 15, &mut d);
        assert_eq!(u32::from_le_bytes(d), u32::MAX, "00:01.0 is absent");
        ecam.read(1 << 12, &mut d);
        assert_eq!(u32::from_le_bytes(d), u32::MAX, "function 1 is absent");
    }
}
