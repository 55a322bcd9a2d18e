//! i8042 keyboard controller at 0x60/0x64 (vm-superio's model). Its reset trigger only raises a
//! flag here; the write then reports `DeviceAction::Reset` like every other reset source.

use std::sync::atomic::{AtomicBool, Ordering};

use vm_superio::{I8042Device, Trigger};

use super::{BusDevice, DeviceAction};

#[derive(Default)]
pub struct ResetFlag(AtomicBool);

impl Trigger for ResetFlag {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::Relaxed);
        Ok(())
    }
}

pub struct I8042 {
    dev: I8042Device<ResetFlag>,
}

impl Default for I8042 {
    fn default() -> Self {
        I8042 {
            dev: I8042Device::new(ResetFlag::default()),
        }
    }
}

/// Offsets within the device's range at 0x60: data port 0x60 and command/status port 0x64.
const DATA: u16 = 0;
const COMMAND: u16 = 4;

impl BusDevice<u16> for I8042 {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let value = match offset {
            DATA | COMMAND => self.dev.read(offset as u8),
            _ => 0xff,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = value;
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> DeviceAction {
        if let (DATA | COMMAND, Some(&v)) = (offset, data.first()) {
            // Its only error is the trigger's, which cannot fail.
            let _ = self.dev.write(offset as u8, v);
        }
        if self.dev.reset_evt().0.swap(false, Ordering::Relaxed) {
            DeviceAction::Reset
        } else {
            DeviceAction::None
        }
    }
}
