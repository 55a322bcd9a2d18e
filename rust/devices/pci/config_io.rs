//! PCI configuration mechanism #1: the address register at 0xcf8 (enable bit 31, bus 23:16,
//! device 15:11, function 10:8, register 7:2) and the data window at 0xcfc-0xcff, which takes
//! byte, word and dword accesses.

use std::sync::Arc;

use super::{read_bytes, PciRoot};
use crate::devices::{BusDevice, DeviceAction};

pub const PORT: u16 = 0xcf8;
pub const LEN: u64 = 8;
const ENABLE: u32 = 1 << 31;

pub struct PciConfigIo {
    root: Arc<PciRoot>,
    address: u32,
}

impl PciConfigIo {
    pub fn new(root: Arc<PciRoot>) -> PciConfigIo {
        PciConfigIo { root, address: 0 }
    }

    /// (bus, device, function, register) the address register selects, when enabled.
    fn target(&self) -> Option<(u8, u8, u8, usize)> {
        let a = self.address;
        (a & ENABLE != 0).then_some((
            (a >> 16) as u8,
            (a >> 11 & 0x1f) as u8,
            (a >> 8 & 7) as u8,
            (a >> 2 & 0x3f) as usize,
        ))
    }
}

impl BusDevice<u16> for PciConfigIo {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let offset = offset as usize;
        match offset {
            0..=3 if data.len() == 4 && offset == 0 => {
                data.copy_from_slice(&self.address.to_le_bytes())
            }
            4..=7 if offset - 4 + data.len() <= 4 => match self.target() {
                Some((bus, dev, func, reg)) => {
                    read_bytes(self.root.read_config(bus, dev, func, reg), offset - 4, data)
                }
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> DeviceAction {
        let offset = offset as usize;
        match offset {
            0 if data.len() == 4 => {
                self.address = u32::from_le_bytes(data.try_into().unwrap()) & !0x7f00_0003
            }
            4..=7 if offset - 4 + data.len() <= 4 => {
                if let Some((bus, dev, func, reg)) = self.target() {
                    self.root
                        .write_config(bus, dev, func, reg, offset - 4, data);
                }
            }
            _ => {}
        }
        DeviceAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn select(io: &mut PciConfigIo, dev: u32, reg: u32) {
        io.write(0, &(ENABLE | dev << 11 | reg << 2).to_le_bytes());
    }

    #[test]
    fn reads_the_host_bridge_and_floats_for_absent_devices() {
        let mut io = PciConfigIo::new(Arc::new(PciRoot::new(Vec::new())));
        select(&mut io, 0, 0);
        let mut d = [0u8; 4];
        io.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0d57_8086);
        let mut w = [0u8; 2];
        io.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0d57, "word at 0xcfe");
        let mut b = [0u8; 1];
        select(&mut io, 0, 2);
        io.read(7, &mut b);
        assert_eq!(b[0], 0x06, "class byte at 0xcff");
        select(&mut io, 5, 0);
        io.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), u32::MAX);
        io.write(0, &0u32.to_le_bytes());
        io.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), u32::MAX, "disabled address register");
        let mut a = [0u8; 4];
        io.read(0, &mut a);
        assert_eq!(u32::from_le_bytes(a), 0);
    }
}
