//! The ACPI shutdown device at port 0x600, which the FADT names as the reset register (value 1)
//! and the hardware-reduced sleep control register (SLP_TYP 5 | SLP_EN = 0x34: S5 power-off).

use super::{BusDevice, DeviceAction};

pub const RESET_VALUE: u8 = 1;
const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const S5: u8 = 5;

#[derive(Default)]
pub struct AcpiPm;

impl BusDevice<u16> for AcpiPm {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> DeviceAction {
        match (offset, data.first().copied()) {
            (0, Some(RESET_VALUE)) => DeviceAction::Reset,
            (0, Some(v)) if v & SLP_EN != 0 && (v >> SLP_TYP_SHIFT) & 0x7 == S5 => {
                DeviceAction::Shutdown
            }
            _ => DeviceAction::None,
        }
    }
}
