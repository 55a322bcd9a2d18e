//! Legacy devices on the vCPU exit path. Each device is one small file; the bus maps port ranges to them.

pub mod acpi_pm;
pub mod bus;
pub mod cmos;
pub mod i8042;
pub mod serial;

/// What a device asks of the VM after a guest write: the vCPU loop turns it into an eventfd write,
/// records it as the VM's first lifecycle request if it is, and parks the vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceAction {
    None,
    Reset,
    Shutdown,
}

/// A device on the port-I/O bus. `offset` is relative to the base port the device was inserted at.
pub trait PioDevice: Send {
    fn read(&mut self, offset: u16, data: &mut [u8]);
    fn write(&mut self, offset: u16, data: &[u8]) -> DeviceAction;
}
