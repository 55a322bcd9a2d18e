//! The VM's KVM GSI routing table: the in-kernel irqchip's default routes (GSIs 0-15 to the PIC
//! and IOAPIC, 16-23 to the IOAPIC, as KVM sets them up) plus one MSI route per MSI-X vector a
//! guest programmed. KVM_SET_GSI_ROUTING replaces the whole table, so it is rebuilt on each change.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;

use crate::error::{Error, Result};

const IOAPIC_PINS: u32 = 24;

pub struct MsiRoutes {
    vm: Arc<VmFd>,
    /// GSI → (address, data).
    msi: Mutex<BTreeMap<u32, (u64, u32)>>,
}

fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

impl MsiRoutes {
    pub fn new(vm: Arc<VmFd>) -> MsiRoutes {
        MsiRoutes {
            vm,
            msi: Mutex::new(BTreeMap::new()),
        }
    }

    /// Routes `gsi` to the MSI message (`address`, `data`); `None` removes its route.
    pub fn set(&self, gsi: u32, message: Option<(u64, u32)>) -> Result<()> {
        let mut msi = self.msi.lock().unwrap();
        let changed = match message {
            Some(m) => msi.insert(gsi, m) != Some(m),
            None => msi.remove(&gsi).is_some(),
        };
        if !changed {
            return Ok(());
        }
        let mut entries = Vec::new();
        for pin in 0..IOAPIC_PINS {
            if pin < 16 {
                let (chip, pic_pin) = if pin < 8 {
                    (KVM_IRQCHIP_PIC_MASTER, pin)
                } else {
                    (KVM_IRQCHIP_PIC_SLAVE, pin - 8)
                };
                entries.push(irqchip(pin, chip, pic_pin));
            }
            entries.push(irqchip(pin, KVM_IRQCHIP_IOAPIC, pin));
        }
        for (&gsi, &(address, data)) in msi.iter() {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = address as u32;
            e.u.msi.address_hi = (address >> 32) as u32;
            e.u.msi.data = data;
            entries.push(e);
        }
        let table = KvmIrqRouting::from_entries(&entries).map_err(|e| {
            Error::new(crate::error::Kind::Kvm, format!("GSI routing table: {e:?}"))
        })?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(|e| Error::kvm("KVM_SET_GSI_ROUTING", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_takes_the_table_with_msi_routes_added_and_removed() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("no /dev/kvm: skipping");
            return;
        };
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let routes = MsiRoutes::new(vm.clone());
        routes.set(24, Some((0xfee0_0000, 0x41))).unwrap();
        routes.set(25, Some((0xfee0_1000, 0x42))).unwrap();
        routes.set(24, Some((0xfee0_0000, 0x41))).unwrap(); // unchanged: no ioctl
        routes.set(24, None).unwrap();
        assert_eq!(
            routes
                .msi
                .lock()
                .unwrap()
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            vec![25]
        );
        // An irqfd on a routed GSI is accepted and can be raised.
        let evt = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        vm.register_irqfd(&evt, 25).unwrap();
        evt.write(1).unwrap();
    }

    #[test]
    fn an_msix_vector_lands_in_the_lapic_irr() {
        use crate::devices::virtio::msix::{Msix, CONTROL_ENABLE};
        use std::time::{Duration, Instant};
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("no /dev/kvm: skipping");
            return;
        };
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        // Software-enable the local APIC (spurious vector register, bit 8).
        let mut lapic = vcpu.get_lapic().unwrap();
        let svr = 0xf0;
        let bytes: &mut [u8] = lapic_bytes(&mut lapic.regs);
        bytes[svr..svr + 4].copy_from_slice(&0x1ffu32.to_le_bytes());
        vcpu.set_lapic(&lapic).unwrap();

        let routes = Arc::new(MsiRoutes::new(vm.clone()));
        let irq = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        vm.register_irqfd(&irq, 24).unwrap();
        let mut msix = Msix::new(vec![irq], Some(routes), 24);
        msix.set_control(CONTROL_ENABLE);
        // Vector 0: to APIC 0, fixed delivery, vector 0x41; then unmasked.
        msix.write_table(0, &0xfee0_0000u32.to_le_bytes());
        msix.write_table(8, &0x41u32.to_le_bytes());
        msix.write_table(12, &0u32.to_le_bytes());
        msix.signal(0);
        let irr_bit = |vcpu: &kvm_ioctls::VcpuFd| {
            let mut l = vcpu.get_lapic().unwrap();
            let b = lapic_bytes(&mut l.regs);
            let reg = 0x200 + (0x41 / 32) * 0x10;
            u32::from_le_bytes(b[reg..reg + 4].try_into().unwrap()) & (1 << (0x41 % 32)) != 0
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !irr_bit(&vcpu) {
            assert!(
                Instant::now() < deadline,
                "vector 0x41 never reached the LAPIC's IRR"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The LAPIC register page as bytes.
    fn lapic_bytes(regs: &mut [std::os::raw::c_char; 1024]) -> &mut [u8] {
        // SAFETY: c_char and u8 have the same size and alignment; the borrow is carried over.
        unsafe { std::slice::from_raw_parts_mut(regs.as_mut_ptr().cast::<u8>(), regs.len()) }
    }
}
