//! MC146818-style CMOS RTC and NVRAM at ports 0x70 (index, offset 0) and 0x71 (data, offset 1).
//!
//! * Bit 7 of a byte written to the index port is the NMI-disable bit; bits 6:0 select one of the
//!   128 NVRAM bytes.
//! * The time-of-day registers are not stored: every read takes the host's UTC clock, so the
//!   guest's wall clock starts right without the VMM keeping a timer. Writes to them are ignored.
//!   The update-in-progress bit is always clear; a guest that compares two readings of the seconds
//!   register (as Linux does) retries across a second boundary.
//! * No interrupts are raised (no periodic, alarm or update-ended IRQ 8).
//! * The memory-size bytes are filled in as a PC BIOS would.
//! * Writing 0 to the shutdown-status byte (0x0f) with NMIs disabled, i.e. after writing 0x8f to
//!   the index port, asks for a reset: that is how Linux's real-mode reboot path (and the BIOS
//!   reboot convention it follows) restarts the machine. Linux's SMP bring-up code also writes
//!   the shutdown byte, with index 0x0f (NMIs enabled), to set and later clear the warm-reset
//!   vector; those writes only store.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::devices::{BusDevice, DeviceAction};

const NVRAM_SIZE: usize = 128;

const INDEX_PORT: u16 = 0;
const DATA_PORT: u16 = 1;
const INDEX_MASK: u8 = 0x7f;
const NMI_DISABLE: u8 = 0x80;

// Time of day (registers 0x01, 0x03 and 0x05, the alarm, are plain NVRAM here).
const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_CENTURY: u8 = 0x32;

// Status registers.
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
/// Status A: update in progress (read-only, always clear here).
const REG_A_UIP: u8 = 0x80;
/// Status A at power-on: 32.768 kHz time base (DV = 010), 1024 Hz periodic rate (RS = 0110).
const REG_A_INIT: u8 = 0x26;
/// Status B: 24-hour mode.
const REG_B_24H: u8 = 0x02;
/// Status B: binary (not BCD) data mode.
const REG_B_BINARY: u8 = 0x04;
/// Status B at power-on: 24-hour, BCD, no interrupts enabled.
const REG_B_INIT: u8 = REG_B_24H;
/// Status D: valid RAM and time (the battery is fine).
const REG_D_VRT: u8 = 0x80;
/// 12-hour mode: PM flag in the hours register.
const HOURS_PM: u8 = 0x80;

/// Shutdown status byte.
const REG_SHUTDOWN_STATUS: u8 = 0x0f;

// Memory size bytes, as a PC BIOS fills them in.
const REG_BASE_MEM_LO: u8 = 0x15;
const REG_BASE_MEM_HI: u8 = 0x16;
const REG_EXT_MEM_LO: u8 = 0x17;
const REG_EXT_MEM_HI: u8 = 0x18;
const REG_EXT_MEM2_LO: u8 = 0x30;
const REG_EXT_MEM2_HI: u8 = 0x31;
const REG_MEM_ABOVE_16M_LO: u8 = 0x34;
const REG_MEM_ABOVE_16M_HI: u8 = 0x35;
const REG_MEM_ABOVE_4G_LO: u8 = 0x5b;
const REG_MEM_ABOVE_4G_MID: u8 = 0x5c;
const REG_MEM_ABOVE_4G_HI: u8 = 0x5d;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const BASE_MEM_KIB: u64 = 640;

/// Broken-down UTC time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CivilTime {
    year: i64,
    /// 1..=12
    month: u8,
    /// 1..=31
    day: u8,
    /// 1..=7, Sunday = 1 (the RTC convention).
    weekday: u8,
    hour: u8,
    minute: u8,
    second: u8,
}

impl CivilTime {
    /// Convert seconds since 1970-01-01T00:00:00Z to a proleptic-Gregorian civil date and time.
    fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let time_of_day = secs.rem_euclid(86_400);

        // Count from 0000-03-01 so that the leap day is the last day of a "year"; eras are the
        // 400-year Gregorian cycles of 146097 days. 719468 days separate 0000-03-01 from the epoch.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let day_of_era = z.rem_euclid(146_097); // 0..=146096
        let year_of_era =
            (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
        let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
        let month_from_march = (5 * day_of_year + 2) / 153; // 0 = March .. 11 = February
        let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
        let month = if month_from_march < 10 {
            month_from_march + 3
        } else {
            month_from_march - 9
        };
        let year = year_of_era + era * 400 + i64::from(month <= 2);

        // 1970-01-01 was a Thursday (Sunday = 0 → Thursday = 4).
        let weekday = (days + 4).rem_euclid(7) + 1;

        CivilTime {
            year,
            month: month as u8,
            day: day as u8,
            weekday: weekday as u8,
            hour: (time_of_day / 3600) as u8,
            minute: (time_of_day / 60 % 60) as u8,
            second: (time_of_day % 60) as u8,
        }
    }

    fn now() -> Self {
        let secs = match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs() as i64),
        };
        Self::from_unix(secs)
    }
}

fn to_bcd(value: u8) -> u8 {
    ((value / 10) << 4) | (value % 10)
}

/// The CMOS RTC / NVRAM device.
pub struct Cmos {
    nvram: [u8; NVRAM_SIZE],
    /// Register selected by the last index write (bit 7 stripped).
    index: u8,
    /// Bit 7 of the last index write: NMIs disabled.
    nmi_disabled: bool,
}

impl Cmos {
    /// `mem_below_4g` and `mem_above_4g` are the bytes of guest RAM below and above 4 GiB.
    pub fn new(mem_below_4g: u64, mem_above_4g: u64) -> Self {
        let mut cmos = Cmos {
            nvram: [0; NVRAM_SIZE],
            index: 0,
            nmi_disabled: false,
        };

        cmos.set(REG_A, REG_A_INIT);
        cmos.set(REG_B, REG_B_INIT);
        cmos.set(REG_C, 0);
        cmos.set(REG_D, REG_D_VRT);

        // Conventional memory in KiB (640 unless the VM is tinier than that).
        let base_kib = (mem_below_4g / KIB).min(BASE_MEM_KIB);
        cmos.set_u16(REG_BASE_MEM_LO, REG_BASE_MEM_HI, base_kib);

        // Extended memory above 1 MiB in KiB; 16 bits only, so it saturates at 64 MiB - 1 KiB.
        let ext_kib = (mem_below_4g.saturating_sub(MIB) / KIB).min(0xffff);
        cmos.set_u16(REG_EXT_MEM_LO, REG_EXT_MEM_HI, ext_kib);
        cmos.set_u16(REG_EXT_MEM2_LO, REG_EXT_MEM2_HI, ext_kib);

        // Memory between 16 MiB and 4 GiB in 64 KiB units.
        let above_16m = (mem_below_4g.saturating_sub(16 * MIB) / (64 * KIB)).min(0xffff);
        cmos.set_u16(REG_MEM_ABOVE_16M_LO, REG_MEM_ABOVE_16M_HI, above_16m);

        // Memory above 4 GiB in 64 KiB units, 24 bits (up to 1 TiB).
        let above_4g = (mem_above_4g / (64 * KIB)).min(0xff_ffff);
        cmos.set(REG_MEM_ABOVE_4G_LO, above_4g as u8);
        cmos.set(REG_MEM_ABOVE_4G_MID, (above_4g >> 8) as u8);
        cmos.set(REG_MEM_ABOVE_4G_HI, (above_4g >> 16) as u8);

        cmos
    }

    fn set(&mut self, reg: u8, value: u8) {
        self.nvram[usize::from(reg)] = value;
    }

    /// (NVRAM, selected register with bit 7 = NMI disabled) for snapshots and migration.
    pub fn state(&self) -> (Vec<u8>, u8) {
        (
            self.nvram.to_vec(),
            self.index | if self.nmi_disabled { 0x80 } else { 0 },
        )
    }

    pub fn restore(&mut self, nvram: &[u8], index: u8) -> Result<(), String> {
        if nvram.len() != NVRAM_SIZE {
            return Err(format!(
                "CMOS state has {} bytes of NVRAM, expected {NVRAM_SIZE}",
                nvram.len()
            ));
        }
        self.nvram.copy_from_slice(nvram);
        self.index = index & 0x7f;
        self.nmi_disabled = index & 0x80 != 0;
        Ok(())
    }

    fn set_u16(&mut self, lo: u8, hi: u8, value: u64) {
        self.set(lo, value as u8);
        self.set(hi, (value >> 8) as u8);
    }

    /// Encode a time field for the data mode selected in status B.
    fn encode(&self, value: u8) -> u8 {
        if self.nvram[usize::from(REG_B)] & REG_B_BINARY != 0 {
            value
        } else {
            to_bcd(value)
        }
    }

    fn encode_hours(&self, hour: u8) -> u8 {
        if self.nvram[usize::from(REG_B)] & REG_B_24H != 0 {
            return self.encode(hour);
        }
        // 12-hour mode: 12, 1..11 with the PM flag in bit 7.
        let pm = if hour >= 12 { HOURS_PM } else { 0 };
        let hour12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(hour12) | pm
    }

    fn read_register(&mut self, reg: u8) -> u8 {
        match reg {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH
            | REG_YEAR | REG_CENTURY => {
                let now = CivilTime::now();
                match reg {
                    REG_SECONDS => self.encode(now.second),
                    REG_MINUTES => self.encode(now.minute),
                    REG_HOURS => self.encode_hours(now.hour),
                    REG_WEEKDAY => self.encode(now.weekday),
                    REG_DAY => self.encode(now.day),
                    REG_MONTH => self.encode(now.month),
                    REG_YEAR => self.encode(now.year.rem_euclid(100) as u8),
                    _ => self.encode(now.year.div_euclid(100).clamp(0, 99) as u8),
                }
            }
            REG_A => self.nvram[usize::from(REG_A)] & !REG_A_UIP,
            REG_C => {
                // Interrupt flags clear on read; none are ever raised here.
                let value = self.nvram[usize::from(REG_C)];
                self.set(REG_C, 0);
                value
            }
            _ => self.nvram[usize::from(reg)],
        }
    }

    fn write_register(&mut self, reg: u8, value: u8) -> DeviceAction {
        match reg {
            // The clock follows the host: setting it is accepted and ignored.
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH
            | REG_YEAR | REG_CENTURY => {}
            REG_A => self.set(REG_A, value & !REG_A_UIP),
            // Status C and D are read-only.
            REG_C | REG_D => {}
            REG_SHUTDOWN_STATUS => {
                self.set(reg, value);
                if value == 0 && self.nmi_disabled {
                    return DeviceAction::Reset;
                }
            }
            _ => self.set(reg, value),
        }
        DeviceAction::None
    }

    fn read_byte(&mut self, offset: u16) -> u8 {
        match offset {
            // The index register is write-only.
            INDEX_PORT => 0xff,
            DATA_PORT => self.read_register(self.index),
            _ => 0xff,
        }
    }

    fn write_byte(&mut self, offset: u16, value: u8) -> DeviceAction {
        match offset {
            INDEX_PORT => {
                self.index = value & INDEX_MASK;
                self.nmi_disabled = value & NMI_DISABLE != 0;
                DeviceAction::None
            }
            DATA_PORT => self.write_register(self.index, value),
            _ => DeviceAction::None,
        }
    }
}

impl BusDevice<u16> for Cmos {
    /// A wider access is split into byte accesses at consecutive ports, as the ISA bus does.
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self.read_byte(offset.saturating_add(i as u16));
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> DeviceAction {
        let mut action = DeviceAction::None;
        for (i, byte) in data.iter().enumerate() {
            if self.write_byte(offset.saturating_add(i as u16), *byte) == DeviceAction::Reset {
                action = DeviceAction::Reset;
            }
        }
        action
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn read_reg(cmos: &mut Cmos, reg: u8) -> u8 {
        assert_eq!(cmos.write(INDEX_PORT, &[reg]), DeviceAction::None);
        let mut data = [0u8];
        cmos.read(DATA_PORT, &mut data);
        data[0]
    }

    fn write_reg(cmos: &mut Cmos, index: u8, value: u8) -> DeviceAction {
        assert_eq!(cmos.write(INDEX_PORT, &[index]), DeviceAction::None);
        cmos.write(DATA_PORT, &[value])
    }

    fn from_bcd(v: u8) -> u8 {
        assert!(v >> 4 <= 9 && v & 0xf <= 9, "{v:#x} is not BCD");
        (v >> 4) * 10 + (v & 0xf)
    }

    #[test]
    fn civil_time_conversion() {
        let t = CivilTime::from_unix(0);
        assert_eq!((t.year, t.month, t.day, t.weekday), (1970, 1, 1, 5)); // Thursday
        assert_eq!((t.hour, t.minute, t.second), (0, 0, 0));
        // 2000-02-29T12:34:56Z, a Tuesday.
        let t = CivilTime::from_unix(951_827_696);
        assert_eq!((t.year, t.month, t.day, t.weekday), (2000, 2, 29, 3));
        assert_eq!((t.hour, t.minute, t.second), (12, 34, 56));
        // 2024-12-31T23:59:59Z, a Tuesday; one second later is 2025-01-01, a Wednesday.
        let t = CivilTime::from_unix(1_735_689_599);
        assert_eq!((t.year, t.month, t.day, t.weekday), (2024, 12, 31, 3));
        assert_eq!((t.hour, t.minute, t.second), (23, 59, 59));
        let t = CivilTime::from_unix(1_735_689_600);
        assert_eq!((t.year, t.month, t.day, t.weekday), (2025, 1, 1, 4));
        // 2100-03-01 (2100 is not a leap year), a Monday.
        let t = CivilTime::from_unix(4_107_542_400);
        assert_eq!((t.year, t.month, t.day, t.weekday), (2100, 3, 1, 2));
    }

    #[test]
    fn bcd_time_is_plausible() {
        let mut cmos = Cmos::new(512 << 20, 0);
        assert_eq!(read_reg(&mut cmos, REG_A), 0x26);
        assert_eq!(read_reg(&mut cmos, REG_B), 0x02);
        assert_eq!(read_reg(&mut cmos, REG_C), 0x00);
        assert_eq!(read_reg(&mut cmos, REG_D), 0x80);

        // Retry if a minute boundary falls between the readings.
        for _ in 0..3 {
            let before = CivilTime::now();
            let sec = from_bcd(read_reg(&mut cmos, REG_SECONDS));
            let min = from_bcd(read_reg(&mut cmos, REG_MINUTES));
            let hour = from_bcd(read_reg(&mut cmos, REG_HOURS));
            let weekday = from_bcd(read_reg(&mut cmos, REG_WEEKDAY));
            let day = from_bcd(read_reg(&mut cmos, REG_DAY));
            let month = from_bcd(read_reg(&mut cmos, REG_MONTH));
            let year = from_bcd(read_reg(&mut cmos, REG_YEAR));
            let century = from_bcd(read_reg(&mut cmos, REG_CENTURY));
            let after = CivilTime::now();
            if before.minute != after.minute {
                continue;
            }
            assert!(sec < 60 && min < 60 && hour < 24);
            assert!((1..=7).contains(&weekday));
            assert!((1..=31).contains(&day) && (1..=12).contains(&month));
            assert_eq!(i64::from(century) * 100 + i64::from(year), after.year);
            assert_eq!(
                (month, day, weekday),
                (after.month, after.day, after.weekday)
            );
            assert_eq!((hour, min), (after.hour, after.minute));
            assert!(sec >= before.second && sec <= after.second);
            return;
        }
        panic!("clock kept crossing minute boundaries");
    }

    #[test]
    fn binary_and_12_hour_modes() {
        let mut cmos = Cmos::new(512 << 20, 0);
        write_reg(&mut cmos, REG_B, REG_B_BINARY | REG_B_24H);
        assert_eq!(read_reg(&mut cmos, REG_B), 0x06);
        let century = read_reg(&mut cmos, REG_CENTURY);
        assert_eq!(i64::from(century), CivilTime::now().year / 100);
        assert!(read_reg(&mut cmos, REG_SECONDS) < 60);
        assert!(read_reg(&mut cmos, REG_HOURS) < 24);

        write_reg(&mut cmos, REG_B, REG_B_BINARY);
        let hours = read_reg(&mut cmos, REG_HOURS);
        assert!((1..=12).contains(&(hours & !HOURS_PM)));
    }

    #[test]
    fn time_writes_are_ignored_and_nvram_is_kept() {
        let mut cmos = Cmos::new(512 << 20, 0);
        write_reg(&mut cmos, REG_YEAR, 0x99);
        assert_eq!(
            from_bcd(read_reg(&mut cmos, REG_YEAR)),
            (CivilTime::now().year % 100) as u8
        );
        write_reg(&mut cmos, 0x40, 0x5a);
        assert_eq!(read_reg(&mut cmos, 0x40), 0x5a);
        // UIP cannot be set, status D is read-only.
        write_reg(&mut cmos, REG_A, 0xa6);
        assert_eq!(read_reg(&mut cmos, REG_A), 0x26);
        write_reg(&mut cmos, REG_D, 0);
        assert_eq!(read_reg(&mut cmos, REG_D), 0x80);
        // The index port reads as 0xff.
        let mut data = [0u8];
        cmos.read(INDEX_PORT, &mut data);
        assert_eq!(data[0], 0xff);
    }

    #[test]
    fn memory_bytes_512m() {
        let mut cmos = Cmos::new(512 << 20, 0);
        let mut byte = |reg| read_reg(&mut cmos, reg);
        // 640 KiB = 0x0280.
        assert_eq!((byte(0x15), byte(0x16)), (0x80, 0x02));
        // (512 MiB - 1 MiB) / 1 KiB = 523264, capped at 0xffff.
        assert_eq!((byte(0x17), byte(0x18)), (0xff, 0xff));
        assert_eq!((byte(0x30), byte(0x31)), (0xff, 0xff));
        // (512 MiB - 16 MiB) / 64 KiB = 7936 = 0x1f00.
        assert_eq!((byte(0x34), byte(0x35)), (0x00, 0x1f));
        assert_eq!((byte(0x5b), byte(0x5c), byte(0x5d)), (0, 0, 0));
    }

    #[test]
    fn memory_bytes_6g_with_1g_hole() {
        // 6 GiB of RAM, the 1 GiB MMIO hole at 3 GiB: 3 GiB below 4 GiB, 3 GiB above.
        let mut cmos = Cmos::new(3 * GIB, 3 * GIB);
        let mut byte = |reg| read_reg(&mut cmos, reg);
        assert_eq!((byte(0x15), byte(0x16)), (0x80, 0x02));
        assert_eq!((byte(0x17), byte(0x18)), (0xff, 0xff));
        assert_eq!((byte(0x30), byte(0x31)), (0xff, 0xff));
        // (3 GiB - 16 MiB) / 64 KiB = 48896 = 0xbf00.
        assert_eq!((byte(0x34), byte(0x35)), (0x00, 0xbf));
        // 3 GiB / 64 KiB = 49152 = 0x00c000.
        assert_eq!((byte(0x5b), byte(0x5c), byte(0x5d)), (0x00, 0xc0, 0x00));
    }

    #[test]
    fn small_memory_bytes() {
        let mut cmos = Cmos::new(512 * KIB, 0);
        assert_eq!(read_reg(&mut cmos, 0x15), 0x00);
        assert_eq!(read_reg(&mut cmos, 0x16), 0x02); // 512 KiB
        assert_eq!(read_reg(&mut cmos, 0x17), 0);
        assert_eq!(read_reg(&mut cmos, 0x34), 0);
        let mut cmos = Cmos::new(8 * MIB, 0);
        // 7 MiB = 7168 KiB = 0x1c00.
        assert_eq!(
            (read_reg(&mut cmos, 0x17), read_reg(&mut cmos, 0x18)),
            (0x00, 0x1c)
        );
    }

    #[test]
    fn shutdown_status_reset_needs_nmi_disabled_index() {
        let mut cmos = Cmos::new(512 << 20, 0);

        // Linux SMP boot: warm-reset code 0x0a, later cleared with 0, both at plain 0x0f.
        assert_eq!(write_reg(&mut cmos, 0x0f, 0x0a), DeviceAction::None);
        assert!(!cmos.nmi_disabled);
        assert_eq!(read_reg(&mut cmos, 0x0f), 0x0a);
        assert_eq!(write_reg(&mut cmos, 0x0f, 0x00), DeviceAction::None);
        assert_eq!(read_reg(&mut cmos, 0x0f), 0x00);

        // Non-zero data at 0x8f only stores.
        assert_eq!(write_reg(&mut cmos, 0x8f, 0x05), DeviceAction::None);
        assert!(cmos.nmi_disabled);
        assert_eq!(read_reg(&mut cmos, 0x0f), 0x05);

        // Zero at another register with NMIs disabled is no reset either.
        assert_eq!(write_reg(&mut cmos, 0x8e, 0x00), DeviceAction::None);

        // Linux's real-mode reboot: CMOS_WRITE(0x00, 0x8f).
        assert_eq!(write_reg(&mut cmos, 0x8f, 0x00), DeviceAction::Reset);
        assert!(cmos.nmi_disabled);

        // A 16-bit write to port 0x70 (index in the low byte, data in the high byte) splits.
        let mut cmos = Cmos::new(512 << 20, 0);
        assert_eq!(cmos.write(INDEX_PORT, &[0x8f, 0x00]), DeviceAction::Reset);
        assert_eq!(cmos.write(INDEX_PORT, &[0x0f, 0x00]), DeviceAction::None);
    }
}
