//! Devices on the vCPU exit path. Each device is one small file; the buses map port and MMIO
//! ranges to them.

pub mod acpi_pm;
pub mod bus;
pub mod cmos;
pub mod ged;
pub mod i8042;
pub mod msi_routes;
pub mod pci;
pub mod serial;
pub mod virtio;

/// What a device asks of the VM after a guest write: the vCPU loop turns it into an eventfd write,
/// records it as the VM's first lifecycle request if it is, and parks the vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceAction {
    None,
    Reset,
    Shutdown,
}

/// A device on a bus whose addresses are of type `A` (u16 ports, u64 guest physical addresses).
/// `offset` is relative to the base the device was inserted at.
pub trait BusDevice<A>: Send {
    fn read(&mut self, offset: A, data: &mut [u8]);
    fn write(&mut self, offset: A, data: &[u8]) -> DeviceAction;
}
