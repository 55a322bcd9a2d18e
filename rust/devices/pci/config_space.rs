//! A type-0 PCI configuration header (PCI Local Bus 3.0 §6.1) with its capability list: 256 bytes
//! of registers, a per-register mask of the bits the guest may write, and the BAR sizing protocol
//! (a BAR's low address bits read back as zero, so writing all ones and reading back gives its size).

pub const NUM_REGS: usize = 64;
pub const CAP_START: usize = 0x40;
const COMMAND_STATUS: usize = 1;
const BAR0: usize = 4;
const CAP_POINTER: u8 = 0x34;
const STATUS_CAP_LIST: u32 = 1 << 20;
pub const COMMAND_MEMORY: u32 = 1 << 1;
/// I/O space, memory space, bus master, parity error response, SERR#, INTx disable.
const COMMAND_WRITABLE: u32 = 0x0547;
const BAR_MEM64: u32 = 0b100;
const BAR_PREFETCH: u32 = 0b1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    /// A power of two, at least 16 bytes.
    pub size: u64,
    pub prefetchable: bool,
}

/// What identifies a function: vendor, device, revision, class (base, sub, programming interface),
/// subsystem vendor and subsystem id.
pub struct Identity {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    pub class: (u8, u8, u8),
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

#[derive(Clone)]
pub struct ConfigSpace {
    regs: [u32; NUM_REGS],
    writable: [u32; NUM_REGS],
    /// 64-bit memory BARs by index (the next index holds the high half).
    bars: [Option<Bar>; 6],
    next_cap: usize,
    last_cap: Option<usize>,
}

impl ConfigSpace {
    pub fn new(id: &Identity) -> ConfigSpace {
        let mut regs = [0u32; NUM_REGS];
        let mut writable = [0u32; NUM_REGS];
        regs[0] = u32::from(id.vendor) | u32::from(id.device) << 16;
        writable[COMMAND_STATUS] = COMMAND_WRITABLE;
        let (base, sub, prog) = id.class;
        regs[2] = u32::from(id.revision)
            | u32::from(prog) << 8
            | u32::from(sub) << 16
            | u32::from(base) << 24;
        // Cache line size and latency timer are plain storage; header type 0, single function.
        writable[3] = 0x0000_ffff;
        regs[11] = u32::from(id.subsystem_vendor) | u32::from(id.subsystem) << 16;
        // Interrupt line is storage for the OS; interrupt pin 0: no INTx, MSI-X only.
        writable[15] = 0xff;
        ConfigSpace {
            regs,
            writable,
            bars: [None; 6],
            next_cap: CAP_START,
            last_cap: None,
        }
    }

    /// Declares BAR `index` as a 64-bit memory BAR (it takes `index + 1` too) at `addr`.
    pub fn add_bar64(&mut self, index: usize, bar: Bar, addr: u64) {
        assert!(
            index < 5
                && bar.size.is_power_of_two()
                && bar.size >= 16
                && addr.is_multiple_of(bar.size)
        );
        self.bars[index] = Some(bar);
        let flags = BAR_MEM64 | if bar.prefetchable { BAR_PREFETCH } else { 0 };
        self.regs[BAR0 + index] = addr as u32 | flags;
        self.regs[BAR0 + index + 1] = (addr >> 32) as u32;
    }

    /// The address BAR `index` decodes at now (the guest may have moved it).
    pub fn bar_address(&self, index: usize) -> u64 {
        u64::from(self.regs[BAR0 + index] & !0xf) | u64::from(self.regs[BAR0 + index + 1]) << 32
    }

    pub fn bar(&self, index: usize) -> Option<Bar> {
        self.bars[index]
    }

    pub fn memory_enabled(&self) -> bool {
        self.regs[COMMAND_STATUS] & COMMAND_MEMORY != 0
    }

    /// Appends a capability (`body` without its id and next bytes); `writable` masks the guest's
    /// writes over the whole capability, dword by dword. Returns its offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8], writable: &[u32]) -> usize {
        let offset = self.next_cap;
        let len = (2 + body.len()).next_multiple_of(4);
        assert!(
            offset + len <= NUM_REGS * 4,
            "capabilities overflow config space"
        );
        let mut bytes = vec![0u8; len];
        bytes[0] = id;
        bytes[2..2 + body.len()].copy_from_slice(body);
        for (i, chunk) in bytes.chunks(4).enumerate() {
            self.regs[offset / 4 + i] = u32::from_le_bytes(chunk.try_into().unwrap());
            self.writable[offset / 4 + i] = writable.get(i).copied().unwrap_or(0);
        }
        match self.last_cap {
            None => {
                self.regs[CAP_POINTER as usize / 4] |= offset as u32;
                self.regs[COMMAND_STATUS] |= STATUS_CAP_LIST;
            }
            Some(prev) => self.regs[prev / 4] |= (offset as u32) << ((prev % 4 + 1) * 8),
        }
        self.last_cap = Some(offset);
        self.next_cap = offset + len;
        offset
    }

    pub fn read(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0)
    }

    /// A guest write of `data` (1, 2 or 4 bytes) at byte `offset` within register `reg`.
    pub fn write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        if reg >= NUM_REGS || offset + data.len() > 4 {
            return;
        }
        let mut bytes = self.regs[reg].to_le_bytes();
        bytes[offset..offset + data.len()].copy_from_slice(data);
        let value = u32::from_le_bytes(bytes);
        let touched = (u64::MAX >> (64 - 8 * data.len()) << (8 * offset)) as u32;
        if (BAR0..BAR0 + 6).contains(&reg) {
            self.write_bar(reg - BAR0, value, touched);
            return;
        }
        let mask = self.writable[reg] & touched;
        self.regs[reg] = (self.regs[reg] & !mask) | (value & mask);
    }

    fn write_bar(&mut self, index: usize, value: u32, touched: u32) {
        let (bar, high) = match (
            self.bars[index],
            index.checked_sub(1).and_then(|i| self.bars[i]),
        ) {
            (Some(bar), _) => (bar, false),
            (None, Some(bar)) => (bar, true),
            _ => return,
        };
        let size_mask = !(bar.size - 1);
        let mask = if high {
            (size_mask >> 32) as u32
        } else {
            size_mask as u32 & !0xf
        } & touched;
        let reg = BAR0 + index;
        self.regs[reg] = (self.regs[reg] & !mask) | (value & mask);
    }

    /// The whole 256 bytes, for saved state.
    pub fn bytes(&self) -> Vec<u8> {
        self.regs.iter().flat_map(|r| r.to_le_bytes()).collect()
    }

    /// Restores the guest-visible registers from saved state: only the bits the guest could have
    /// written take the saved value, so a state document cannot change what the device is.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), String> {
        if bytes.len() != NUM_REGS * 4 {
            return Err(format!(
                "PCI config space state has {} bytes, not {}",
                bytes.len(),
                NUM_REGS * 4
            ));
        }
        for (reg, chunk) in bytes.chunks(4).enumerate() {
            let value = u32::from_le_bytes(chunk.try_into().unwrap());
            self.write(reg, 0, &value.to_le_bytes());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> ConfigSpace {
        let id = Identity {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: (1, 0x80, 0),
            subsystem_vendor: 0x1af4,
            subsystem: 2,
        };
        let mut c = ConfigSpace::new(&id);
        c.add_bar64(
            0,
            Bar {
                size: 0x8000,
                prefetchable: false,
            },
            0xc000_8000,
        );
        c
    }

    #[test]
    fn header_fields() {
        let c = space();
        assert_eq!(c.read(0), 0x1042_1af4);
        assert_eq!(c.read(2), 0x0180_0001);
        assert_eq!(c.read(3) >> 16 & 0xff, 0, "header type 0");
        assert_eq!(c.read(11), 0x0002_1af4);
        assert_eq!(
            c.read(4),
            0xc000_8004,
            "64-bit memory BAR, not prefetchable"
        );
        assert_eq!(c.read(5), 0);
    }

    #[test]
    fn bar_sizing_protocol() {
        let mut c = space();
        c.write(4, 0, &u32::MAX.to_le_bytes());
        c.write(5, 0, &u32::MAX.to_le_bytes());
        let size = !((u64::from(c.read(5)) << 32) | u64::from(c.read(4) & !0xf)) + 1;
        assert_eq!(size, 0x8000);
        assert_eq!(c.read(4) & 0xf, 0b100, "type bits stay");
        c.write(4, 0, &0xd000_0000u32.to_le_bytes());
        c.write(5, 0, &0u32.to_le_bytes());
        assert_eq!(c.bar_address(0), 0xd000_0000);
        // Unimplemented BARs read zero whatever is written.
        c.write(6, 0, &u32::MAX.to_le_bytes());
        assert_eq!(c.read(6), 0);
    }

    #[test]
    fn read_only_fields_and_sub_dword_writes() {
        let mut c = space();
        c.write(0, 0, &[0, 0, 0, 0]);
        assert_eq!(c.read(0), 0x1042_1af4);
        c.write(1, 0, &[0x06]);
        assert!(c.memory_enabled());
        assert_eq!(c.read(1) & 0xffff, 0x6);
        c.write(15, 0, &[0x0b]);
        c.write(15, 1, &[0x01]);
        assert_eq!(c.read(15), 0x0b, "interrupt pin stays 0");
    }

    #[test]
    fn capability_list() {
        let mut c = space();
        assert_eq!(c.read(1) & STATUS_CAP_LIST, 0);
        let a = c.add_capability(0x11, &[0; 10], &[]);
        let b = c.add_capability(0x09, &[16, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
        assert_eq!((a, b), (0x40, 0x4c));
        assert_ne!(c.read(1) & STATUS_CAP_LIST, 0);
        assert_eq!(c.read(0x34 / 4) & 0xff, 0x40);
        assert_eq!(c.read(a / 4), 0x4c11, "first points at the second");
        assert_eq!(c.read(b / 4) & 0xffff, 0x0009, "last ends the list");
    }

    #[test]
    fn restore_takes_only_guest_writable_bits() {
        let mut c = space();
        c.write(1, 0, &[0x02]);
        c.write(4, 0, &0xd000_0000u32.to_le_bytes());
        let mut saved = c.bytes();
        saved[0] = 0x99;
        let mut fresh = space();
        fresh.restore(&saved).unwrap();
        assert_eq!(fresh.read(0), 0x1042_1af4);
        assert!(fresh.memory_enabled());
        assert_eq!(fresh.bar_address(0), 0xd000_0000);
    }
}
