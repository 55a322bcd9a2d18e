//! Port-I/O bus: a sorted list of (base, length, device). Lookups happen on every PIO exit, so the
//! list stays small and is searched without allocation.

use std::sync::{Arc, Mutex};

use super::{DeviceAction, PioDevice};

pub type SharedDevice = Arc<Mutex<dyn PioDevice>>;

#[derive(Default)]
pub struct PioBus {
    ranges: Vec<(u16, u16, SharedDevice)>,
}

impl PioBus {
    pub fn insert(&mut self, base: u16, len: u16, dev: SharedDevice) {
        let end = base + len;
        assert!(
            self.ranges.iter().all(|(b, l, _)| end <= *b || base >= b + l),
            "PIO range {base:#x}+{len} overlaps another device"
        );
        self.ranges.push((base, len, dev));
        self.ranges.sort_by_key(|r| r.0);
    }

    fn find(&self, port: u16) -> Option<(u16, &SharedDevice)> {
        self.ranges
            .iter()
            .find(|(base, len, _)| port >= *base && port < base + len)
            .map(|(base, _, dev)| (port - base, dev))
    }

    /// Reads from an unclaimed port float high, as on a PC.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        match self.find(port) {
            Some((offset, dev)) => dev.lock().unwrap().read(offset, data),
            None => data.fill(0xff),
        }
    }

    pub fn write(&self, port: u16, data: &[u8]) -> DeviceAction {
        match self.find(port) {
            Some((offset, dev)) => dev.lock().unwrap().write(offset, data),
            None => DeviceAction::None,
        }
    }
}
