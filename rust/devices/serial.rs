//! 16550 UART at 0x3f8 with IRQ 4 (vm-superio's model). Output goes to the VMM's console; input is
//! pulled from the console into the UART's FIFO whenever the guest looks at the receive side.

use vm_superio::serial::NoEvents;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use super::{BusDevice, DeviceAction};
use crate::console::{Console, ConsoleWriter};

/// Raises the UART's interrupt through an irqfd bound to its GSI.
pub struct IrqFd(pub EventFd);

impl Trigger for IrqFd {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

const RBR: u16 = 0;
const LSR: u16 = 5;

pub struct Serial {
    uart: vm_superio::Serial<IrqFd, NoEvents, ConsoleWriter>,
    console: Console,
    /// A VM built to receive state takes no console input before its UART's state arrives: the
    /// restore replaces the FIFO, and what was moved into it would be lost. It waits in the
    /// console meanwhile.
    awaiting_state: bool,
}

impl Serial {
    pub fn new(irq: EventFd, console: Console, awaiting_state: bool) -> Serial {
        Serial {
            uart: vm_superio::Serial::new(IrqFd(irq), ConsoleWriter(console.clone())),
            console,
            awaiting_state,
        }
    }

    pub fn state(&self) -> vm_superio::serial::SerialState {
        self.uart.state()
    }

    /// Rebuilds the UART from saved registers (same console, same IRQ line).
    pub fn restore(&mut self, state: &vm_superio::serial::SerialState) -> std::io::Result<()> {
        let irq = self.uart.interrupt_evt().0.try_clone()?;
        self.uart = vm_superio::Serial::from_state(
            state,
            IrqFd(irq),
            NoEvents,
            ConsoleWriter(self.console.clone()),
        )
        .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        self.awaiting_state = false;
        Ok(())
    }

    /// Moves pending console input into the FIFO (which raises the RX interrupt if enabled).
    pub fn refill(&mut self) {
        let room = self.uart.fifo_capacity();
        if room == 0 || self.awaiting_state {
            return;
        }
        let bytes = self.console.take_input(room);
        if !bytes.is_empty() {
            // Cannot overflow: at most `room` bytes. An irqfd write failure only loses an IRQ.
            let _ = self.uart.enqueue_raw_bytes(&bytes);
        }
    }
}

impl BusDevice<u16> for Serial {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        if offset == RBR || offset == LSR {
            self.refill();
        }
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> DeviceAction {
        if let Some(&v) = data.first() {
            // An error here is a failed interrupt write; the byte itself was handled.
            let _ = self.uart.write(offset as u8, v);
        }
        DeviceAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_buffer(serial: &Serial) -> Vec<u8> {
        serial.state().in_buffer
    }

    #[test]
    fn input_typed_before_a_restore_follows_the_restored_fifo() {
        let console = Console::new(None, false).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut serial = Serial::new(irq, console.clone(), true);
        console.push_input(b"new");
        serial.refill();
        assert!(
            in_buffer(&serial).is_empty(),
            "input taken before the state arrived"
        );
        let mut saved = serial.state();
        saved.in_buffer = b"old".to_vec();
        serial.restore(&saved).unwrap();
        serial.refill();
        assert_eq!(in_buffer(&serial), b"oldnew");
    }
}
