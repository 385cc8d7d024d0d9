/*
 * embot's test guest: one 512-byte boot sector that keeps dirtying memory so a live migration of
 * it has real work (pre-copy rounds, a real dirty rate, auto-converge) and its result can be
 * checked: after any stop, every page of the range holds the same counter except for one step
 * (where the loop was). Same idea as QEMU's tests/migration/i386/a-b-bootblock.S; own code.
 *
 * What it does: enable A20, read the RAM size from CMOS (0x34/0x35: 64 KiB blocks above 16 MiB),
 * enter 32-bit protected mode with a flat GDT, zero the first byte of every page of the range,
 * then forever: add 1 to the first byte of every 4 KiB page from 1 MiB to 4 MiB short of the end
 * of RAM (or to LIMIT_MIB), spin DELAY_LOOPS times after each page, and write 'B' to the serial
 * port (0x3f8) after each full pass. After PASSES passes
 * (0 = never) it keeps the same loop and heartbeat but only reads the pages, so memory becomes
 * static while the guest still shows it runs; or, with HALT set, it writes 'H' to the serial
 * port and halts (cli; hlt): memory static and the vCPU asleep, its core free (a benchmark of
 * the migration stream alone wants that: a spinning TCG vCPU takes a whole core from it).
 *
 * Settings live in the image at fixed offsets (guest-image.ts patches them per VM):
 *   0x1ec u32 HALT          after PASSES passes: 0 = read on, heartbeating; 1 = 'H', then halt
 *   0x1f0 u32 DELAY_LOOPS   spin iterations after each page write (0 = as fast as the CPU goes)
 *   0x1f4 u32 LIMIT_MIB     end of the range in MiB (0 = end of RAM less 4 MiB)
 *   0x1f8 u32 PASSES        passes that write (0 = forever)
 *   0x1fc u16 "EG"          magic, so a patcher can tell this image from any other
 *   0x1fe u16 0xaa55        boot signature
 */
        .code16
        .text
        .globl _start
_start:
        cli
        xor     %ax, %ax
        mov     %ax, %ds
        mov     %ax, %ss
        mov     $0x7c00, %sp

        /* fast A20 gate; bit 0 would reset the machine, keep it clear */
        in      $0x92, %al
        or      $2, %al
        and     $0xfe, %al
        out     %al, $0x92

        /* CMOS 0x35:0x34 = RAM above 16 MiB in 64 KiB blocks (QEMU fills it in) */
        mov     $0x35, %al
        out     %al, $0x70
        in      $0x71, %al
        mov     %al, %bh
        mov     $0x34, %al
        out     %al, $0x70
        in      $0x71, %al
        mov     %al, %bl
        mov     %bx, ram64k

        lgdt    gdt_desc
        mov     %cr0, %eax
        or      $1, %eax
        mov     %eax, %cr0
        ljmp    $0x08, $protected

        .code32
protected:
        mov     $0x10, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     %ax, %fs
        mov     %ax, %gs
        mov     $0x7c00, %esp

        /* ebx = end of the range: end of RAM (16 MiB + ram64k * 64 KiB) less 4 MiB, where the
           firmware keeps its tables (counters there would start from the tables' bytes), capped
           by LIMIT_MIB */
        movzwl  ram64k, %ebx
        shl     $16, %ebx
        add     $0xc00000, %ebx
        mov     limit_mib, %eax
        test    %eax, %eax
        jz      1f
        shl     $20, %eax
        cmp     %ebx, %eax
        jae     1f
        mov     %eax, %ebx
1:
        /* Zero every counter first: the firmware left data in some of these pages (SeaBIOS's
           relocated code near the top of RAM), and counters must all start equal. */
        mov     $0x100000, %eax
6:      movb    $0, (%eax)
        add     $0x1000, %eax
        cmp     %ebx, %eax
        jb      6b

        mov     $1, %edi                /* 1: passes write, 0: passes only read */
        xor     %esi, %esi              /* passes done */

pass:
        mov     $0x100000, %eax
page:
        test    %edi, %edi
        jz      2f
        incb    (%eax)
        jmp     3f
2:      movb    (%eax), %dl
3:      mov     delay_loops, %ecx
        jecxz   5f
4:      dec     %ecx
        jnz     4b
5:      add     $0x1000, %eax
        cmp     %ebx, %eax
        jb      page

        mov     $0x3f8, %dx
        mov     $'B', %al
        out     %al, %dx

        inc     %esi
        mov     passes, %ecx
        jecxz   pass
        cmp     %ecx, %esi
        jb      pass
        /* HALT: say so on serial once, then sleep with interrupts off, so the vCPU thread leaves
           its core to whatever else runs (a migration's threads) while memory stays as filled */
        mov     halt, %ecx
        jecxz   7f
        mov     $'H', %al
        out     %al, %dx
8:      cli
        hlt
        jmp     8b
7:      xor     %edi, %edi
        jmp     pass

        .p2align 3
gdt:
        .quad   0
        .quad   0x00cf9a000000ffff      /* 0x08: code, base 0, 4 GiB, 32-bit */
        .quad   0x00cf92000000ffff      /* 0x10: data, base 0, 4 GiB */
gdt_desc:
        .word   gdt_desc - gdt - 1
        .long   gdt
ram64k:
        .word   0

        .org    0x1ec
halt:
        .long   0
delay_loops:
        .long   0
limit_mib:
        .long   0
passes:
        .long   0
        .ascii  "EG"
        .word   0xaa55
