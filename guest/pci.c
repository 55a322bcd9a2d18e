/*
 * pci.c - PCI configuration space through mechanism #1 (address port 0xcf8, data port 0xcfc) on
 * bus 0, function 0 of each device: the VMM's root bus has no bridges and no multi-function
 * devices. BARs are read as the VMM assigned them, never reprogrammed. Every port access is a VM
 * exit, so callers read what they need once.
 */
#include "guest.h"

#define PCI_ADDR_PORT 0xcf8
#define PCI_DATA_PORT 0xcfc
#define PCI_STATUS 0x06
#define PCI_STATUS_CAPS 0x10
#define PCI_CAP_PTR 0x34
#define PCI_BAR0 0x10

static void select_reg(uint32_t dev, uint32_t reg) { outl(PCI_ADDR_PORT, 0x80000000u | dev << 11 | (reg & 0xfc)); }

uint32_t pci_read32(uint32_t dev, uint32_t reg)
{
    select_reg(dev, reg);
    return inl(PCI_DATA_PORT);
}

uint16_t pci_read16(uint32_t dev, uint32_t reg) { return (uint16_t)(pci_read32(dev, reg) >> ((reg & 2) * 8)); }
uint8_t pci_read8(uint32_t dev, uint32_t reg) { return (uint8_t)(pci_read32(dev, reg) >> ((reg & 3) * 8)); }

void pci_write16(uint32_t dev, uint32_t reg, uint16_t v)
{
    select_reg(dev, reg);
    outw((uint16_t)(PCI_DATA_PORT + (reg & 2)), v);
}

int pci_find(uint16_t vendor, uint16_t device, uint32_t nth)
{
    uint32_t want = (uint32_t)device << 16 | vendor;
    for (uint32_t dev = 1; dev < 32; dev++)
        if (pci_read32(dev, 0) == want && nth-- == 0)
            return (int)dev;
    return -1;
}

uint64_t pci_bar(uint32_t dev, uint32_t bar)
{
    uint32_t lo = pci_read32(dev, PCI_BAR0 + 4 * bar);
    if (lo & 1) /* an I/O BAR */
        return 0;
    uint64_t addr = lo & ~0xful;
    if (((lo >> 1) & 3) == 2 && bar < 5) /* 64-bit: the next BAR holds the high half */
        addr |= (uint64_t)pci_read32(dev, PCI_BAR0 + 4 * (bar + 1)) << 32;
    return addr;
}

uint8_t pci_cap_next(uint32_t dev, uint8_t ptr)
{
    if (ptr == 0) {
        if (!(pci_read16(dev, PCI_STATUS) & PCI_STATUS_CAPS))
            return 0;
        return pci_read8(dev, PCI_CAP_PTR) & 0xfc;
    }
    return pci_read8(dev, ptr + 1u) & 0xfc;
}
