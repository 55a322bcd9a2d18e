/*
 * idle.c - how a vCPU with nothing to do waits: in vmmpy's paravirtual idle port when the VMM has
 * one, else with HLT until the LAPIC timer fires (for QEMU, Cloud Hypervisor, any PVH VMM).
 *
 * vmmpy answers a 32-bit read of the idle port with "VMPY"; elsewhere an unclaimed port reads as
 * all ones. The fallback never burns a core: the BSP arms the LAPIC timer (one-shot, at most
 * FALLBACK_MAX_MS so serial input, which raises no interrupt, is seen that soon), then `int3`
 * enters entry.S's idle gate, which halts with interrupts on. It assumes KVM's LAPIC timer rate
 * (1 GHz bus clock, divide by 1); a slower clock only makes the sleeps longer. Only the BSP has a
 * TSS (the gate's stack), which is enough: without vmmpy the guest starts no APs.
 */
#include "guest.h"

#define VMMPY_IDLE_SIGNATURE 0x59504d56u /* "VMPY" */
#define FALLBACK_MAX_MS 10
#define TIMER_TICKS_PER_MS 1000000u

#define PIC1_DATA 0x21
#define PIC2_DATA 0xa1
#define LAPIC_SVR 0xfee000f0ul
#define LAPIC_LVT_TIMER 0xfee00320ul
#define LAPIC_TIMER_INIT 0xfee00380ul
#define LAPIC_TIMER_DIV 0xfee003e0ul
#define APIC_ENABLE 0x100
#define TIMER_VECTOR 0x20   /* entry.S's IDT */
#define SPURIOUS_VECTOR 0x21
#define TIMER_DIV_1 0xb

/* Until the BSP has looked, assume vmmpy: APs (which only vmmpy starts) may idle at once. */
static int pv_idle = 1;

void idle_init(void)
{
    if (inl(IDLE_PORT) == VMMPY_IDLE_SIGNATURE)
        return;
    pv_idle = 0;
    outb(PIC1_DATA, 0xff); /* only the LAPIC timer may interrupt */
    outb(PIC2_DATA, 0xff);
    mmio_write32(LAPIC_SVR, APIC_ENABLE | SPURIOUS_VECTOR);
    mmio_write32(LAPIC_TIMER_DIV, TIMER_DIV_1);
    mmio_write32(LAPIC_LVT_TIMER, TIMER_VECTOR); /* one-shot, unmasked */
}

void idle_ms(uint32_t ms)
{
    if (pv_idle) {
        outl(IDLE_PORT, ms);
        return;
    }
    if (ms == 0)
        return;
    mmio_write32(LAPIC_TIMER_INIT, (ms < FALLBACK_MAX_MS ? ms : FALLBACK_MAX_MS) * TIMER_TICKS_PER_MS);
    __asm__ volatile("int3" ::: "memory"); /* entry.S: why not int $n */
}
