//! ACPI Generic Event Device (GED, `ACPI0013`): how a hardware-reduced ACPI platform, which has no
//! SCI or GPE block, tells the OS about platform events. The VMM sets an event bit and pulses an
//! edge interrupt through an irqfd; the DSDT's `_EVT` method (acpi.rs) reads the event register,
//! which clears it, and notifies the device the bit stands for (the power button, `PWRB`).
//!
//! The register is one byte at offset 0 of a page of MMIO (the rest of the page reads 0); writes
//! are ignored. Bit 3 is the power button, the bit Cloud Hypervisor uses for it too.

use vmm_sys_util::eventfd::EventFd;

use super::{BusDevice, DeviceAction};

/// The GED's interrupt: an ISA-range GSI no other device uses (COM1 has 4, the PIT 2).
pub const GED_GSI: u32 = 5;
/// Event bits in the register.
pub const POWER_BUTTON: u8 = 1 << 3;

pub struct Ged {
    pending: u8,
    irq: EventFd,
}

impl Ged {
    /// `irq` is an irqfd bound to `GED_GSI`: each write is one edge.
    pub fn new(irq: EventFd) -> Ged {
        Ged { pending: 0, irq }
    }

    /// Latches `events` and raises the interrupt. The bits stay set until the guest reads the
    /// register, so an event pressed while the guest cannot run is seen once it runs.
    pub fn notify(&mut self, events: u8) -> std::io::Result<()> {
        self.pending |= events;
        self.irq.write(1)
    }
}

impl BusDevice<u64> for Ged {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 {
            if let Some(b) = data.first_mut() {
                *b = std::mem::take(&mut self.pending);
            }
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) -> DeviceAction {
        DeviceAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn notify_latches_raises_and_a_read_clears() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut ged = Ged::new(irq.try_clone().unwrap());
        let mut b = [0xaau8; 4];
        ged.read(0, &mut b);
        assert_eq!(b, [0; 4]);
        assert!(irq.read().is_err(), "no interrupt before an event");

        ged.notify(POWER_BUTTON).unwrap();
        ged.notify(POWER_BUTTON).unwrap();
        assert_eq!(irq.read().unwrap(), 2, "one edge per event");
        ged.read(1, &mut b[..1]);
        assert_eq!(b[0], 0, "only offset 0 is the register");
        ged.read(0, &mut b[..1]);
        assert_eq!(b[0], POWER_BUTTON);
        ged.read(0, &mut b[..1]);
        assert_eq!(b[0], 0, "reading clears");
        assert_eq!(ged.write(0, &[0xff]), DeviceAction::None);
    }
}
