//! MSI-X (PCI Local Bus 3.0 §6.8.2): the vector table and pending-bit array a device keeps in a
//! BAR, the enable and function-mask bits of its capability, and delivery through one irqfd per
//! vector (KVM injects the message its GSI is routed to). A masked vector's message is held as a
//! pending bit and sent when it is unmasked.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::devices::msi_routes::MsiRoutes;

pub const ENTRY_SIZE: u64 = 16;
const VECTOR_MASKED: u32 = 1;
/// The capability's message-control bits (in the capability's first dword's high half).
pub const CONTROL_ENABLE: u16 = 1 << 15;
pub const CONTROL_FUNCTION_MASK: u16 = 1 << 14;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MsixState {
    /// Per vector: address low, address high, data, vector control.
    pub table: Vec<[u32; 4]>,
    pub pba: Vec<u64>,
    pub enabled: bool,
    pub function_masked: bool,
}

pub struct Msix {
    state: MsixState,
    irqfds: Vec<EventFd>,
    /// None only in unit tests, which have no VM to route in.
    routes: Option<Arc<MsiRoutes>>,
    gsi_base: u32,
}

impl Msix {
    pub fn new(irqfds: Vec<EventFd>, routes: Option<Arc<MsiRoutes>>, gsi_base: u32) -> Msix {
        let vectors = irqfds.len();
        let mut m = Msix {
            state: MsixState::default(),
            irqfds,
            routes,
            gsi_base,
        };
        m.state.table = vec![[0, 0, 0, VECTOR_MASKED]; vectors];
        m.state.pba = vec![0; vectors.div_ceil(64)];
        m
    }

    pub fn vectors(&self) -> usize {
        self.irqfds.len()
    }

    pub fn state(&self) -> &MsixState {
        &self.state
    }

    pub fn restore(&mut self, st: &MsixState) -> Result<(), String> {
        if st.table.len() != self.vectors() || st.pba.len() != self.state.pba.len() {
            return Err(format!(
                "MSI-X state has {} vectors, the device {}",
                st.table.len(),
                self.vectors()
            ));
        }
        self.state = st.clone();
        for v in 0..self.vectors() {
            self.update_route(v);
        }
        Ok(())
    }

    fn update_route(&self, vector: usize) {
        let Some(routes) = &self.routes else { return };
        let [lo, hi, data, _] = self.state.table[vector];
        let address = u64::from(lo) | u64::from(hi) << 32;
        let message = (address != 0).then_some((address, data));
        // A routing failure leaves the vector unroutable; the guest sees no interrupt, as with a
        // bad address. There is nobody on the vCPU's exit path to report it to.
        let _ = routes.set(self.gsi_base + vector as u32, message);
    }

    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        let (v, dw) = (
            (offset / ENTRY_SIZE) as usize,
            (offset % ENTRY_SIZE / 4) as usize,
        );
        match self.state.table.get(v) {
            Some(entry) if data.len() == 4 => data.copy_from_slice(&entry[dw].to_le_bytes()),
            Some(entry) if data.len() == 8 && dw % 2 == 0 => {
                data[..4].copy_from_slice(&entry[dw].to_le_bytes());
                data[4..].copy_from_slice(&entry[dw + 1].to_le_bytes());
            }
            _ => data.fill(0),
        }
    }

    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let (v, dw) = (
            (offset / ENTRY_SIZE) as usize,
            (offset % ENTRY_SIZE / 4) as usize,
        );
        if v >= self.vectors() {
            return;
        }
        let words: Vec<u32> = match data.len() {
            4 => vec![u32::from_le_bytes(data.try_into().unwrap())],
            8 if dw % 2 == 0 => data
                .chunks(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            _ => return,
        };
        let was_masked = self.vector_masked(v);
        for (i, w) in words.into_iter().enumerate() {
            self.state.table[v][dw + i] = if dw + i == 3 { w & VECTOR_MASKED } else { w };
        }
        if dw < 3 {
            self.update_route(v);
        }
        if was_masked && !self.vector_masked(v) {
            self.deliver_pending(v);
        }
    }

    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let bytes: Vec<u8> = self
            .state
            .pba
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        let start = offset as usize;
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(start + i).copied().unwrap_or(0);
        }
    }

    /// The guest wrote the capability's message control.
    pub fn set_control(&mut self, control: u16) {
        let was_masked = !self.state.enabled || self.state.function_masked;
        self.state.enabled = control & CONTROL_ENABLE != 0;
        self.state.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        if was_masked {
            for v in 0..self.vectors() {
                self.deliver_pending(v);
            }
        }
    }

    fn vector_masked(&self, v: usize) -> bool {
        !self.state.enabled
            || self.state.function_masked
            || self.state.table[v][3] & VECTOR_MASKED != 0
    }

    fn deliver_pending(&mut self, v: usize) {
        let bit = 1u64 << (v % 64);
        if self.state.pba[v / 64] & bit != 0 && !self.vector_masked(v) {
            self.state.pba[v / 64] &= !bit;
            let _ = self.irqfds[v].write(1);
        }
    }

    /// Sends vector `v`'s message, or marks it pending while it is masked. Out-of-range vectors
    /// (VIRTIO_MSI_NO_VECTOR among them) send nothing.
    pub fn signal(&mut self, v: u16) {
        let v = v as usize;
        if v >= self.vectors() {
            return;
        }
        if self.vector_masked(v) {
            self.state.pba[v / 64] |= 1 << (v % 64);
        } else {
            // An eventfd write fails only when its counter would overflow: it is then set anyway.
            let _ = self.irqfds[v].write(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn msix() -> Msix {
        Msix::new(
            (0..2)
                .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                .collect(),
            None,
            24,
        )
    }

    #[test]
    fn masked_vectors_go_pending_and_fire_on_unmask() {
        let mut m = msix();
        m.set_control(CONTROL_ENABLE);
        m.write_table(0, &0xfee0_0000u32.to_le_bytes());
        m.write_table(8, &0x41u32.to_le_bytes());
        m.signal(0);
        assert!(m.irqfds[0].read().is_err(), "a masked vector sends nothing");
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 1);
        m.write_table(12, &0u32.to_le_bytes());
        assert_eq!(
            m.irqfds[0].read().unwrap(),
            1,
            "unmasking delivers the pending message"
        );
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        m.signal(0);
        assert_eq!(m.irqfds[0].read().unwrap(), 1);
        m.signal(0xffff);
        let mut d = [0u8; 4];
        m.read_table(16 + 12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1, "vector 1 starts masked");
    }

    #[test]
    fn function_mask_holds_every_vector() {
        let mut m = msix();
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        m.write_table(12, &0u32.to_le_bytes());
        m.signal(0);
        assert!(m.irqfds[0].read().is_err());
        m.set_control(CONTROL_ENABLE);
        assert_eq!(m.irqfds[0].read().unwrap(), 1);
    }
}
