//! PCI: one root bus (bus 0) with the host bridge at 00:00.0 and devices from 00:01.0 on.
//! Configuration space is reached through mechanism #1 (ports 0xcf8/0xcfc, `config_io`) and ECAM
//! (`ecam`); BAR accesses through `bar_window`, which routes by the addresses the BARs decode now.

pub mod bar_window;
pub mod config_io;
pub mod config_space;
pub mod ecam;
pub mod host_bridge;

use std::sync::{Arc, Mutex};

/// A PCI function on the root bus.
pub trait PciFunction: Send {
    fn config(&self) -> &config_space::ConfigSpace;
    /// A 32-bit register read.
    fn read_config(&mut self, reg: usize) -> u32 {
        self.config().read(reg)
    }
    /// A guest write of 1, 2 or 4 bytes at byte `offset` of register `reg`.
    fn write_config(&mut self, reg: usize, offset: usize, data: &[u8]);
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);
}

pub type SharedFunction = Arc<Mutex<dyn PciFunction>>;

/// Device numbers on bus 0.
pub const MAX_DEVICES: usize = 32;

/// The root bus: which function answers at each device number. Fixed once the VM is built.
pub struct PciRoot {
    devices: Vec<Option<SharedFunction>>,
}

impl PciRoot {
    /// A root bus with the host bridge at device 0 and `functions` from device 1 on.
    pub fn new(functions: Vec<SharedFunction>) -> PciRoot {
        assert!(functions.len() < MAX_DEVICES, "too many PCI devices");
        let mut devices: Vec<Option<SharedFunction>> =
            vec![Some(Arc::new(Mutex::new(host_bridge::HostBridge::new())))];
        devices.extend(functions.into_iter().map(Some));
        devices.resize_with(MAX_DEVICES, || None);
        PciRoot { devices }
    }

    fn function(&self, bus: u8, device: u8, function: u8) -> Option<&SharedFunction> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.devices.get(device as usize)?.as_ref()
    }

    /// A register read; absent functions read all ones (the vendor id 0xffff says "nobody").
    pub fn read_config(&self, bus: u8, device: u8, function: u8, reg: usize) -> u32 {
        match self.function(bus, device, function) {
            Some(f) => f.lock().unwrap().read_config(reg),
            None => u32::MAX,
        }
    }

    pub fn write_config(
        &self,
        bus: u8,
        device: u8,
        function: u8,
        reg: usize,
        offset: usize,
        data: &[u8],
    ) {
        if let Some(f) = self.function(bus, device, function) {
            f.lock().unwrap().write_config(reg, offset, data);
        }
    }

    /// Routes a memory access at guest address `addr` to the BAR that decodes it, if any. Returns
    /// false when none does.
    pub fn access_bar(
        &self,
        addr: u64,
        access: &mut dyn FnMut(&mut dyn PciFunction, usize, u64),
    ) -> bool {
        for f in self.devices.iter().flatten() {
            let mut f = f.lock().unwrap();
            if !f.config().memory_enabled() {
                continue;
            }
            let hit = (0..6).find_map(|i| {
                let bar = f.config().bar(i)?;
                let base = f.config().bar_address(i);
                (addr >= base && addr - base < bar.size).then_some((i, addr - base))
            });
            if let Some((bar, offset)) = hit {
                access(&mut *f, bar, offset);
                return true;
            }
        }
        false
    }
}

/// Splits a config access at byte `offset` of config space into (register, byte in register),
/// or None when it is misaligned or crosses a register.
pub fn config_reg(offset: usize, len: usize) -> Option<(usize, usize)> {
    (matches!(len, 1 | 2 | 4) && offset.is_multiple_of(len)).then_some((offset / 4, offset % 4))
}

/// Reads `data.len()` bytes at byte `within` of a register value.
pub fn read_bytes(value: u32, within: usize, data: &mut [u8]) {
    let bytes = value.to_le_bytes();
    data.copy_from_slice(&bytes[within..within + data.len()]);
}
