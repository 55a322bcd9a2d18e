//! The port-I/O and MMIO buses: a sorted list of (base, length, device) per address space.
//! Lookups happen on every PIO or MMIO exit, so the lists stay small and are searched without
//! allocation.

use std::sync::{Arc, Mutex};

use super::{BusDevice, DeviceAction};

pub type SharedDevice<A> = Arc<Mutex<dyn BusDevice<A>>>;

/// An address on a bus: a port (u16) or a guest physical address (u64). Ranges are kept as u64,
/// so `base + len` of a port range cannot overflow.
pub trait Address: Copy + Into<u64> + TryFrom<u64> + std::fmt::LowerHex {}
impl Address for u16 {}
impl Address for u64 {}

pub struct Bus<A: Address> {
    ranges: Vec<(u64, u64, SharedDevice<A>)>,
}

pub type PioBus = Bus<u16>;
pub type MmioBus = Bus<u64>;

impl<A: Address> Default for Bus<A> {
    fn default() -> Self {
        Bus { ranges: Vec::new() }
    }
}

impl<A: Address> Bus<A> {
    pub fn insert(&mut self, base: A, len: u64, dev: SharedDevice<A>) {
        let start: u64 = base.into();
        let end = start.checked_add(len).filter(|_| len > 0);
        let end = end.unwrap_or_else(|| panic!("bus range {base:#x}+{len} is empty or wraps"));
        assert!(
            self.ranges
                .iter()
                .all(|(b, l, _)| end <= *b || start >= b + l),
            "bus range {base:#x}+{len} overlaps another device"
        );
        self.ranges.push((start, len, dev));
        self.ranges.sort_by_key(|r| r.0);
    }

    fn find(&self, addr: A) -> Option<(A, &SharedDevice<A>)> {
        let addr: u64 = addr.into();
        let (base, _, dev) = self
            .ranges
            .iter()
            .find(|(base, len, _)| addr >= *base && addr - base < *len)?;
        // The offset is below the address it came from, so it fits the address type.
        Some((A::try_from(addr - base).ok()?, dev))
    }

    /// Reads from unclaimed addresses float high, as on a PC.
    pub fn read(&self, addr: A, data: &mut [u8]) {
        match self.find(addr) {
            Some((offset, dev)) => dev.lock().unwrap().read(offset, data),
            None => data.fill(0xff),
        }
    }

    pub fn write(&self, addr: A, data: &[u8]) -> DeviceAction {
        match self.find(addr) {
            Some((offset, dev)) => dev.lock().unwrap().write(offset, data),
            None => DeviceAction::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers the offset of its last access; reads answer the offset's low byte.
    #[derive(Default)]
    struct Probe(u64);

    impl<A: Address> BusDevice<A> for Probe {
        fn read(&mut self, offset: A, data: &mut [u8]) {
            self.0 = offset.into();
            data.fill(self.0 as u8);
        }

        fn write(&mut self, offset: A, _data: &[u8]) -> DeviceAction {
            self.0 = offset.into();
            DeviceAction::Reset
        }
    }

    #[test]
    fn routes_by_range_and_passes_offsets() {
        let mut bus = MmioBus::default();
        let a = Arc::new(Mutex::new(Probe::default()));
        bus.insert(0xfeb0_0000, 0x1000, a.clone());
        bus.insert(0xfeb0_1000, 1, Arc::new(Mutex::new(Probe::default())));
        let mut b = [0u8; 1];
        bus.read(0xfeb0_0fff, &mut b);
        assert_eq!((b[0], a.lock().unwrap().0), (0xff, 0xfff));
        bus.read(0xfeb0_0010, &mut b);
        assert_eq!(b[0], 0x10);
        assert_eq!(bus.write(0xfeb0_1000, &[0]), DeviceAction::Reset);
        // Unclaimed: reads float high, writes do nothing.
        bus.read(0xfeb0_1001, &mut b);
        assert_eq!(b[0], 0xff);
        assert_eq!(bus.write(0xfeb0_1001, &[0]), DeviceAction::None);
    }

    #[test]
    fn port_ranges_reach_the_top_of_the_space() {
        let mut bus = PioBus::default();
        bus.insert(0xfff8, 8, Arc::new(Mutex::new(Probe::default())));
        let mut b = [0u8; 1];
        bus.read(0xffff, &mut b);
        assert_eq!(b[0], 7);
    }

    #[test]
    #[should_panic(expected = "overlaps")]
    fn refuses_overlaps() {
        let mut bus = PioBus::default();
        bus.insert(0x600, 8, Arc::new(Mutex::new(Probe::default())));
        bus.insert(0x607, 1, Arc::new(Mutex::new(Probe::default())));
    }
}
