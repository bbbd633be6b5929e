# livemig's guest image: a kernel that boots through the PVH protocol (Xen's
# XEN_ELFNOTE_PHYS32_ENTRY), fills memory with checkable pages, then dirties a working set at
# a set rate, counting its writes, and answers commands on COM1. Built by build.rs (`as`, then
# `ld -T guest/image.ld`) into an ELF64 that livemig embeds; `livemig guest-image --out PATH`
# writes it out, and QEMU boots it with `-kernel PATH -append "..."`. docs/guest-image.md
# describes the protocol, the command line and the console.
#
# Boot (ring 0, short: on the nested hosts livemig is tested on, guest ring-0 code is emulated
# at a few million instructions/s):
#   1. 32-bit flat protected mode, paging off, %ebx = hvm_start_info (magic 0x336ec578,
#      version >= 1 for the memory map). Guest memory = the end of the RAM entry holding 1 MiB,
#      rounded down to 2 MiB, at most MAX_MEMORY.
#   2. The command line is copied to CMDLINE_COPY, the system pages are zeroed, the GDT is
#      copied to GDT_ADDR, identity page tables (2 MiB pages) are built at PML4_ADDR.
#   3. Long mode; the command line is parsed into the parameter block; then SYSEXIT to ring 3
#      (IOPL 3, so `in`/`out` work there) at vcpu_main, or a jump to it in ring 0 with `ring0`.
# Application processors (livemig only): livemig enters them in 64-bit mode at ap_entry64
# (exported in the "livemig" ELF note) with %rdi = the vCPU's index, once vCPU 0 has written
# its index to PORT_BOOT (by then the GDT and page tables exist).
#
# Writing page p (absolute page number, address p * 4096) to generation g = gen_table[p] + 1:
#   1. slot.page = p, slot.gen = g, slot.count_at = slot.counter, then slot.busy = 1
#   2. words 0..512 of the page, in ascending order, per crates/vmm/src/pattern.rs:
#      w0 = TAG | g, w1 = p, wi = base ^ (i * K) with base = mix(p << 32 | g)
#   3. gen_table[p] = g
#   4. slot.counter = slot.count_at + 1
#   5. slot.busy = 0
# so that, whenever the vCPU stops, the host can tell exactly what every page must hold. The
# fill writes generation 1 the same way (vCPU v fills pages v, v + n, ...), so fill writes
# count in the vCPUs' counters too.
#
# The addresses and offsets below are mirrored in src/kvm/layout.rs; keep them in sync.

        .equ GDT_ADDR,          0x1000
        .equ IDT_ADDR,          0x2000
        .equ PARAMS,            0x3000
        .equ CMDLINE_COPY,      0x4000
        .equ CMDLINE_MAX,       4095
        .equ BOOT_STACK_TOP,    0x6000
        .equ PML4_ADDR,         0x8000
        .equ PDPT_ADDR,         0x9000
        .equ PD_ADDR,           0xa000
        .equ MAX_PDS,           16
        .equ STACKS,            0x20000
        .equ GEN_TABLE_ADDR,    0x110000
        .equ MAX_VCPUS,         16

        .equ P_MAGIC,           0x00
        .equ P_VERSION,         0x08
        .equ P_NVCPUS,          0x10
        .equ P_FIRST_PAGE,      0x18
        .equ P_WS_PAGES,        0x20
        .equ P_TICKS_PER_PAGE,  0x28
        .equ P_REPORT_EVERY,    0x30
        .equ P_GEN_TABLE,       0x38
        .equ P_HOST_WRITES,     0x40
        .equ P_MAX_LAG,         0x48
        .equ P_SLEEP_MIN,       0x50
        .equ P_TICKS_PER_US,    0x58
        .equ P_IDLE_US,         0x60
        .equ P_PAGES,           0x68
        .equ P_FILL_PAGES,      0x70
        .equ P_PACE,            0x78
        .equ P_TSC_KHZ,         0x80
        .equ P_STOP,            0x88
        .equ P_READY,           0x90
        .equ P_RING0,           0x98
        .equ P_ARG_FILL,        0xa0
        .equ P_ARG_WS,          0xa8
        .equ P_ARG_RATE,        0xb0
        .equ P_CMD_LEN,         0xb8
        .equ P_CMD_BUF,         0xc0
        .equ CMD_MAX,           63

        .equ SLOTS,             0x3100
        .equ SLOT_SHIFT,        6
        .equ S_COUNTER,         0x00
        .equ S_BUSY,            0x08
        .equ S_PAGE,            0x10
        .equ S_GEN,             0x18
        .equ S_COUNT_AT,        0x20
        .equ S_CURSOR,          0x28
        .equ S_DEADLINE,        0x30
        .equ S_FLAGS,           0x38
        .equ F_FILLED,          1
        .equ F_PARKED,          2

        .equ PORT_BOOT,         0x510
        .equ PORT_PROGRESS,     0x511
        .equ PORT_SLEEP,        0x512
        .equ COM1,              0x3f8
        .equ DEBUGCON,          0xe9

        .equ START_MAGIC,       0x336ec578

# ---------------------------------------------------------------------------------------------
# ELF notes: the PVH entry (what QEMU and linux-loader look for) and livemig's AP entry.

        .section .note.Xen, "a"
        .balign 4
        .long   4, 4, 18                        # namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY
        .asciz  "Xen"
        .long   pvh_entry

        .section .note.livemig, "a"
        .balign 4
        .long   8, 8, 0x4c4d0001                # namesz, descsz, type: 64-bit AP entry
        .asciz  "livemig"
        .quad   ap_entry64

# ---------------------------------------------------------------------------------------------
# Ring 0, 32-bit: the PVH entry.

        .section .text.boot, "ax"
        .code32
        .globl  pvh_entry
# Prints the string at \msg on the debug port and COM1 without a stack, then stops.
.macro  FAIL32 msg
        mov     $\msg, %esi
        jmp     fail32
.endm

pvh_entry:
        cli
        cld
        cmpl    $START_MAGIC, (%ebx)
        jne     bad_magic
        cmpl    $1, 4(%ebx)
        jb      bad_version
        # Memory: the end of the RAM entry (type 1) that holds 1 MiB.
        mov     40(%ebx), %esi                  # memmap_paddr (below 4 GiB)
        mov     48(%ebx), %ecx                  # memmap_entries
        xor     %ebp, %ebp                      # ebp = 2 MiB pages of memory
1:      test    %ecx, %ecx
        jz      2f
        cmpl    $1, 16(%esi)
        jne     3f
        cmpl    $0, 4(%esi)
        jne     3f
        cmpl    $0x100000, (%esi)
        ja      3f
        mov     (%esi), %eax
        mov     4(%esi), %edx
        add     8(%esi), %eax
        adc     12(%esi), %edx                  # edx:eax = end
        test    %edx, %edx
        jnz     4f
        cmp     $0x100000, %eax
        jbe     3f
4:      cmp     $(MAX_PDS / 4), %edx            # MAX_MEMORY = MAX_PDS GiB
        jb      5f
        mov     $(MAX_PDS / 4), %edx
        xor     %eax, %eax
5:      shrd    $21, %edx, %eax
        mov     %eax, %ebp
        jmp     2f
3:      add     $24, %esi
        dec     %ecx
        jmp     1b
2:      test    %ebp, %ebp
        jz      bad_memmap

        # The command line, before any system page is written.
        mov     24(%ebx), %esi
        mov     $CMDLINE_COPY, %edi
        mov     $CMDLINE_MAX, %ecx
        test    %esi, %esi
        jz      7f
6:      lodsb
        test    %al, %al
        jz      7f
        stosb
        loop    6b
7:      movb    $0, (%edi)

        # Zero the GDT, IDT and parameter pages, the boot stack, the page tables, the stacks.
        xor     %eax, %eax
        mov     $GDT_ADDR, %edi
        mov     $(3 * 4096 / 4), %ecx
        rep stosl
        mov     $(BOOT_STACK_TOP - 4096), %edi
        mov     $(4096 / 4), %ecx
        rep stosl
        mov     $PML4_ADDR, %edi
        mov     $((2 + MAX_PDS) * 4096 / 4), %ecx
        rep stosl
        mov     $STACKS, %edi
        mov     $(MAX_VCPUS * 4096 / 4), %ecx
        rep stosl

        mov     $gdt_image, %esi
        mov     $GDT_ADDR, %edi
        mov     $((gdt_image_end - gdt_image) / 4), %ecx
        rep movsl

        # Identity map with 2 MiB pages (present, writable, user), as layout.rs builds it.
        movl    $(PDPT_ADDR | 7), PML4_ADDR
        mov     %ebp, %ecx
        add     $511, %ecx
        shr     $9, %ecx                        # page directories used
        mov     $PDPT_ADDR, %edi
        mov     $(PD_ADDR | 7), %eax
8:      mov     %eax, (%edi)
        add     $8, %edi
        add     $4096, %eax
        loop    8b
        xor     %ecx, %ecx
        mov     $PD_ADDR, %edi
9:      mov     %ecx, %eax
        shl     $21, %eax
        or      $0x87, %eax
        mov     %eax, (%edi)
        mov     %ecx, %eax
        shr     $11, %eax
        mov     %eax, 4(%edi)
        add     $8, %edi
        inc     %ecx
        cmp     %ebp, %ecx
        jb      9b

        # Long mode: PAE, OSFXSR, OSXMMEXCPT; EFER.LME; PE, MP, ET, NE, WP, PG.
        lgdt    gdt_ptr
        mov     $0x620, %eax
        mov     %eax, %cr4
        mov     $PML4_ADDR, %eax
        mov     %eax, %cr3
        mov     $0xc0000080, %ecx
        rdmsr
        or      $0x100, %eax
        wrmsr
        mov     $0x80010033, %eax
        mov     %eax, %cr0
        ljmp    $0x08, $long_entry

bad_magic:
        FAIL32  msg_bad_magic
bad_version:
        FAIL32  msg_bad_version
bad_memmap:
        FAIL32  msg_bad_memmap
fail32:
        lodsb
        test    %al, %al
        jz      1f
        outb    %al, $DEBUGCON
        mov     $COM1, %dx
        outb    %al, %dx
        jmp     fail32
1:      hlt
        jmp     1b

# ---------------------------------------------------------------------------------------------
# Ring 0, 64-bit.

        .code64
long_entry:
        mov     $0x10, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     %ax, %fs
        mov     %ax, %gs
        mov     $BOOT_STACK_TOP, %rsp
        lidt    idt_ptr
        mov     %ebp, %ebp
        shl     $9, %rbp
        mov     $PARAMS, %r13
        mov     %rbp, P_PAGES(%r13)
        call    parse_cmdline
        mov     $(STACKS + 4096), %rcx
        xor     %edi, %edi
        cmpq    $0, P_RING0(%r13)
        jne     1f
        # SYSEXIT to ring 3: CS = SYSENTER_CS + 32 (0x28), SS = SYSENTER_CS + 40 (0x30).
        mov     $0x174, %ecx
        mov     $0x08, %eax
        xor     %edx, %edx
        wrmsr
        mov     $0x33, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %fs
        mov     %ax, %gs
        pushq   $0x3002                         # IOPL 3, interrupts off
        popfq
        mov     $vcpu_main, %rdx
        mov     $(STACKS + 4096), %rcx
        xor     %edi, %edi
        sysexitq
1:      mov     %rcx, %rsp
        jmp     vcpu_main

# Parses the command line at CMDLINE_COPY into the parameter block (docs/guest-image.md).
parse_cmdline:
        movq    $-1, P_ARG_FILL(%r13)
        movq    $1, P_PACE(%r13)
        movq    $1, P_NVCPUS(%r13)
        mov     $CMDLINE_COPY, %rsi
next_token:
        movzbl  (%rsi), %eax
        test    %al, %al
        jz      9f
        cmp     $' ', %al
        jne     1f
        inc     %rsi
        jmp     next_token
1:      mov     $key_fill, %rdi
        call    match
        jne     2f
        cmpb    $'a', (%rsi)                    # fill=all
        je      skip_token
        mov     $1024, %r9
        call    number
        mov     %rax, P_ARG_FILL(%r13)
        jmp     skip_token
2:      mov     $key_ws, %rdi
        call    match
        jne     3f
        mov     $1024, %r9
        call    number
        mov     %rax, P_ARG_WS(%r13)
        jmp     skip_token
3:      mov     $key_rate, %rdi
        call    match
        jne     4f
        mov     $1000, %r9
        call    number
        mov     %rax, P_ARG_RATE(%r13)
        jmp     skip_token
4:      mov     $key_report, %rdi
        call    match
        jne     5f
        mov     $1000, %r9
        call    number
        mov     %rax, P_REPORT_EVERY(%r13)
        jmp     skip_token
5:      mov     $key_vcpus, %rdi
        call    match
        jne     6f
        mov     $1000, %r9
        call    number
        mov     %rax, P_NVCPUS(%r13)
        jmp     skip_token
6:      mov     $key_tsc, %rdi
        call    match
        jne     7f
        mov     $1000, %r9
        call    number
        mov     %rax, P_TSC_KHZ(%r13)
        jmp     skip_token
7:      mov     $key_pace, %rdi
        call    match
        jne     8f
        xor     %eax, %eax                      # pace=sleep: 0, anything else (spin): 1
        cmpb    $'l', 1(%rsi)
        je      10f
        inc     %eax
10:     mov     %rax, P_PACE(%r13)
        jmp     skip_token
8:      mov     $key_ring0, %rdi
        call    match
        jne     skip_token
        movzbl  (%rsi), %eax
        test    %al, %al
        jz      11f
        cmp     $' ', %al
        jne     skip_token
11:     movq    $1, P_RING0(%r13)
skip_token:
        movzbl  (%rsi), %eax
        test    %al, %al
        jz      9f
        cmp     $' ', %al
        je      next_token
        inc     %rsi
        jmp     skip_token
9:      ret

# ZF set and %rsi past the key when the text at %rsi starts with the string at %rdi.
match:
        push    %rsi
1:      movzbl  (%rdi), %eax
        test    %al, %al
        jz      2f
        cmpb    (%rsi), %al
        jne     3f
        inc     %rdi
        inc     %rsi
        jmp     1b
2:      add     $8, %rsp
        cmp     %eax, %eax
        ret
3:      pop     %rsi
        or      $1, %eax                        # clears ZF
        ret

# %rax = the decimal number at %rsi, times %r9 per K/M/G suffix; %rsi past it.
number:
        xor     %eax, %eax
1:      movzbl  (%rsi), %ecx
        sub     $'0', %ecx
        cmp     $9, %ecx
        ja      2f
        imul    $10, %rax, %rax
        add     %rcx, %rax
        inc     %rsi
        jmp     1b
2:      movzbl  (%rsi), %ecx
        or      $0x20, %ecx
        cmp     $'k', %ecx
        je      5f
        cmp     $'m', %ecx
        je      4f
        cmp     $'g', %ecx
        jne     6f
        imul    %r9, %rax
4:      imul    %r9, %rax
5:      imul    %r9, %rax
        inc     %rsi
6:      ret

# ---------------------------------------------------------------------------------------------
# Every vCPU, ring 3 (or ring 0 with `ring0`). %rdi = the vCPU's index, %rsp its stack.

        .globl  ap_entry64
ap_entry64:
        lea     1(%rdi), %rsp
        shl     $12, %rsp
        add     $STACKS, %rsp
vcpu_main:
        mov     %rdi, %r15                      # r15 = vCPU index
        mov     %rdi, %r14
        shl     $SLOT_SHIFT, %r14
        add     $SLOTS, %r14                    # r14 = this vCPU's slot
        mov     $PARAMS, %r13                   # r13 = parameter block
        test    %r15, %r15
        jnz     1f
        call    bsp_init
        jmp     2f
1:      pause                                   # wait for vCPU 0's set-up
        cmpq    $0, P_READY(%r13)
        je      1b
2:      mov     $PORT_BOOT, %dx
        mov     %r15d, %eax
        out     %eax, (%dx)
        movabs  $0x9e3779b97f4a7c15, %r8        # r8 = K

# The fill: generation 1 of this vCPU's share of the first fill_pages data pages.
fill_loop:
        mov     S_CURSOR(%r14), %rax
        imul    P_NVCPUS(%r13), %rax
        add     %r15, %rax
        cmp     P_FILL_PAGES(%r13), %rax
        jae     fill_done
        add     P_FIRST_PAGE(%r13), %rax
        mov     %rax, %r12
        call    write_page
        incq    S_CURSOR(%r14)
        testb   $0xff, S_COUNTER(%r14)
        jnz     fill_loop
        call    poll
        jmp     fill_loop
fill_done:
        movq    $0, S_CURSOR(%r14)
        orq     $F_FILLED, S_FLAGS(%r14)
        test    %r15, %r15
        jnz     dirty_start
        # vCPU 0 says ready once every vCPU has filled its share.
        xor     %ecx, %ecx
1:      cmp     P_NVCPUS(%r13), %rcx
        jae     3f
        mov     %rcx, %rax
        shl     $SLOT_SHIFT, %rax
2:      testq   $F_FILLED, SLOTS + S_FLAGS(%rax)
        jnz     4f
        pause
        jmp     2b
4:      inc     %rcx
        jmp     1b
3:      mov     $msg_ready, %rsi
        call    puts
        mov     P_FILL_PAGES(%r13), %rax
        call    putdec
        call    newline
        movq    $2, P_READY(%r13)

dirty_start:
        rdtsc
        shl     $32, %rdx
        or      %rdx, %rax
        mov     %rax, S_DEADLINE(%r14)

main_loop:
        # Page index of this vCPU's next write: cursor * nvcpus + index, within the working set.
        mov     P_WS_PAGES(%r13), %rcx
        mov     S_CURSOR(%r14), %rax
        imul    P_NVCPUS(%r13), %rax
        add     %r15, %rax
        cmp     %rcx, %rax
        jb      have_page
        movq    $0, S_CURSOR(%r14)
        mov     %r15, %rax
        cmp     %rcx, %rax
        jb      have_page
        # Nothing to write for this vCPU: wait a while (IDLE_US).
        call    poll
        mov     P_IDLE_US(%r13), %rax
        call    wait_us
        jmp     main_loop

have_page:
        add     P_FIRST_PAGE(%r13), %rax
        mov     %rax, %r12
        call    write_page
        incq    S_CURSOR(%r14)

        # Progress report every report_every pages (0: never).
        mov     P_REPORT_EVERY(%r13), %rcx
        test    %rcx, %rcx
        jz      1f
        mov     S_COUNTER(%r14), %rax
        xor     %edx, %edx
        div     %rcx
        test    %rdx, %rdx
        jnz     1f
        mov     S_COUNTER(%r14), %rax
        mov     $PORT_PROGRESS, %dx
        out     %eax, (%dx)
1:      testb   $0xff, S_COUNTER(%r14)
        jnz     pace
        call    poll

pace:
        # Rate: deadline += ticks_per_page; when behind by more than max_lag, forget the debt;
        # while ahead by sleep_min ticks or more, wait (sleep through the host, or spin).
        mov     P_TICKS_PER_PAGE(%r13), %rcx
        test    %rcx, %rcx
        jz      main_loop
        mov     S_DEADLINE(%r14), %rsi
        add     %rcx, %rsi                      # rsi = deadline
        call    now
        mov     %rax, %rdx
        sub     %rsi, %rdx                      # rdx = now - deadline (signed)
        cmp     P_MAX_LAG(%r13), %rdx
        jle     2f
        mov     %rax, %rsi                      # too far behind: restart the schedule
2:      mov     %rsi, S_DEADLINE(%r14)
3:      call    now
        mov     S_DEADLINE(%r14), %rdx
        sub     %rax, %rdx                      # rdx = deadline - now (signed)
        cmp     P_SLEEP_MIN(%r13), %rdx
        jl      main_loop
        mov     %rdx, %rax
        xor     %edx, %edx
        divq    P_TICKS_PER_US(%r13)
        cmp     $10000, %rax                    # at most 10 ms at a time, then poll again
        jbe     4f
        mov     $10000, %eax
4:      call    wait_us
        call    poll
        jmp     3b

# %rax = the TSC.
now:
        rdtsc
        shl     $32, %rdx
        or      %rdx, %rax
        ret

# Waits %rax microseconds: asks livemig's host to sleep (pace=sleep), or spins on the TSC.
wait_us:
        cmpq    $0, P_PACE(%r13)
        jne     1f
        mov     $PORT_SLEEP, %dx
        out     %eax, (%dx)
        ret
1:      imul    P_TICKS_PER_US(%r13), %rax
        mov     %rax, %rcx
        call    now
        add     %rax, %rcx
2:      pause
        call    now
        cmp     %rcx, %rax
        jb      2b
        ret

# Writes the next generation of page %r12 (the protocol at the top). Keeps r8, r12-r15.
write_page:
        mov     P_GEN_TABLE(%r13), %rbx         # rbx = generation table
        mov     (%rbx,%r12,4), %r11d
        inc     %r11d                           # r11 = new generation
        # 1. announce the write
        mov     %r12, S_PAGE(%r14)
        mov     %r11, S_GEN(%r14)
        mov     S_COUNTER(%r14), %rax
        mov     %rax, S_COUNT_AT(%r14)
        movq    $1, S_BUSY(%r14)
        call    page_base
        # 2. the page, word 0 first
        mov     %r12, %rdi
        shl     $12, %rdi                       # rdi = page address
        movabs  $0x4c4d504700000000, %rdx       # TAG "LMPG"
        or      %r11, %rdx
        mov     %rdx, (%rdi)
        mov     %r12, 8(%rdi)
        mov     $2, %ecx
        lea     (%r8,%r8), %rsi                 # rsi = i * K
1:      mov     %rax, %rdx
        xor     %rsi, %rdx
        mov     %rdx, (%rdi,%rcx,8)
        add     %r8, %rsi
        inc     %ecx
        cmp     $512, %ecx
        jb      1b
        # 3. to 5. commit
        mov     %r11d, (%rbx,%r12,4)
        mov     S_COUNT_AT(%r14), %rax
        inc     %rax
        mov     %rax, S_COUNTER(%r14)
        movq    $0, S_BUSY(%r14)
        ret

# %rax = base = mix(%r12 << 32 | %r11) (pattern.rs). Clobbers rdx.
page_base:
        mov     %r12, %rax
        shl     $32, %rax
        or      %r11, %rax
        add     %r8, %rax
        mov     %rax, %rdx
        shr     $30, %rdx
        xor     %rdx, %rax
        movabs  $0xbf58476d1ce4e5b9, %rdx
        imul    %rdx, %rax
        mov     %rax, %rdx
        shr     $27, %rdx
        xor     %rdx, %rax
        movabs  $0x94d049bb133111eb, %rdx
        imul    %rdx, %rax
        mov     %rax, %rdx
        shr     $31, %rdx
        xor     %rdx, %rax
        ret

# At a page boundary: a vCPU other than 0 parks while vCPU 0 verifies; vCPU 0 reads COM1
# and runs a command when a line is complete. Keeps r8, r12-r15.
poll:
        cmpq    $0, P_STOP(%r13)
        je      1f
        test    %r15, %r15
        jz      1f
        orq     $F_PARKED, S_FLAGS(%r14)
2:      pause
        cmpq    $0, P_STOP(%r13)
        jne     2b
        andq    $~F_PARKED, S_FLAGS(%r14)
1:      test    %r15, %r15
        jnz     9f
3:      mov     $(COM1 + 5), %dx                # line status: data ready?
        inb     %dx, %al
        test    $1, %al
        jz      9f
        mov     $COM1, %dx
        inb     %dx, %al
        cmp     $'\r', %al
        je      4f
        cmp     $'\n', %al
        je      4f
        mov     P_CMD_LEN(%r13), %rcx
        cmp     $CMD_MAX, %rcx
        jae     3b
        mov     %al, P_CMD_BUF(%r13,%rcx)
        incq    P_CMD_LEN(%r13)
        jmp     3b
4:      call    command
        jmp     3b
9:      ret

# Runs the command line in the buffer (vCPU 0).
command:
        mov     P_CMD_LEN(%r13), %rcx
        test    %rcx, %rcx
        jz      9f
        movb    $0, P_CMD_BUF(%r13,%rcx)
        movq    $0, P_CMD_LEN(%r13)
        lea     P_CMD_BUF(%r13), %rsi
        mov     $cmd_verify, %rdi
        call    match
        jne     1f
        cmpb    $0, (%rsi)
        jne     1f
        jmp     verify
1:      lea     P_CMD_BUF(%r13), %rsi
        mov     $cmd_status, %rdi
        call    match
        jne     2f
        cmpb    $0, (%rsi)
        jne     2f
        mov     $msg_counter, %rsi
        call    puts
        call    total_counter
        call    putdec
        jmp     newline
2:      mov     $msg_unknown, %rsi
        call    puts
        lea     P_CMD_BUF(%r13), %rsi
        call    puts
        jmp     newline
9:      ret

# %rax = the sum of every vCPU's counter.
total_counter:
        xor     %eax, %eax
        xor     %ecx, %ecx
1:      cmp     P_NVCPUS(%r13), %rcx
        jae     2f
        mov     %rcx, %rdx
        shl     $SLOT_SHIFT, %rdx
        add     SLOTS + S_COUNTER(%rdx), %rax
        inc     %rcx
        jmp     1b
2:      ret

# The `verify` command (vCPU 0, at a page boundary): the other vCPUs park at a page
# boundary, then every data page with a generation is checked against the pattern, and the
# generations must add up to the counters.
verify:
        push    %rbx
        push    %rbp
        push    %r12
        push    %r11
        movq    $1, P_STOP(%r13)
        mov     $1, %ecx
1:      cmp     P_NVCPUS(%r13), %rcx
        jae     3f
        mov     %rcx, %rax
        shl     $SLOT_SHIFT, %rax
2:      testq   $F_PARKED, SLOTS + S_FLAGS(%rax)
        jnz     4f
        pause
        jmp     2b
4:      inc     %ecx
        jmp     1b
3:      mov     P_GEN_TABLE(%r13), %rbx
        mov     P_FIRST_PAGE(%r13), %r12
        xor     %r9d, %r9d                      # r9 = pages checked
        xor     %r10d, %r10d                    # r10 = pages wrong
        xor     %ebp, %ebp                      # rbp = sum of generations
        push    $-1                             # (%rsp) = first wrong page
5:      cmp     P_PAGES(%r13), %r12
        jae     8f
        mov     (%rbx,%r12,4), %r11d
        add     %r11, %rbp
        test    %r11d, %r11d
        jz      7f
        inc     %r9
        call    check_page
        je      7f
        inc     %r10
        cmpq    $-1, (%rsp)
        jne     7f
        mov     %r12, (%rsp)
7:      inc     %r12
        jmp     5b
8:      pop     %r12                            # first wrong page
        test    %r10, %r10
        jz      10f
        mov     $msg_verify_bad_page, %rsi
        call    puts
        mov     %r12, %rax
        shl     $12, %rax
        call    puthex
        mov     $msg_wrong, %rsi
        call    puts
        mov     %r10, %rax
        call    putdec
        jmp     12f
10:     call    total_counter
        cmp     %rax, %rbp
        je      11f
        mov     $msg_verify_bad_sum, %rsi
        call    puts
        mov     %rbp, %rax
        call    putdec
        mov     $msg_counter_sp, %rsi
        call    puts
        call    total_counter
        call    putdec
        jmp     12f
11:     mov     $msg_verify_ok, %rsi
        call    puts
        mov     %r9, %rax
        call    putdec
        mov     $msg_counter_sp, %rsi
        call    puts
        call    total_counter
        call    putdec
12:     call    newline
        movq    $0, P_STOP(%r13)
        pop     %r11
        pop     %r12
        pop     %rbp
        pop     %rbx
        ret

# ZF set when page %r12 holds generation %r11 exactly. Clobbers rax, rcx, rdx, rsi, rdi.
check_page:
        call    page_base
        mov     %r12, %rdi
        shl     $12, %rdi
        movabs  $0x4c4d504700000000, %rdx
        or      %r11, %rdx
        cmp     %rdx, (%rdi)
        jne     9f
        cmp     %r12, 8(%rdi)
        jne     9f
        mov     $2, %ecx
        lea     (%r8,%r8), %rsi
1:      mov     %rax, %rdx
        xor     %rsi, %rdx
        cmp     %rdx, (%rdi,%rcx,8)
        jne     9f
        add     %r8, %rsi
        inc     %ecx
        cmp     $512, %ecx
        jb      1b
        cmp     %eax, %eax
9:      ret

# vCPU 0's set-up, before any page is written: the layout, the rate, the generation table.
bsp_init:
        # Serial line: 8N1, no interrupts.
        mov     $(COM1 + 3), %dx
        mov     $3, %al
        outb    %al, %dx
        mov     $(COM1 + 1), %dx
        xor     %eax, %eax
        outb    %al, %dx
        # first data page = the 1 MiB boundary after the generation table
        mov     P_PAGES(%r13), %rax
        lea     GEN_TABLE_ADDR + 0xfffff(,%rax,4), %rax
        shr     $20, %rax
        shl     $8, %rax
        mov     %rax, P_FIRST_PAGE(%r13)
        mov     P_PAGES(%r13), %rcx
        sub     %rax, %rcx                      # rcx = data pages
        jbe     too_small
        mov     P_ARG_FILL(%r13), %rax
        cmp     $-1, %rax
        je      1f
        shr     $12, %rax
        cmp     %rcx, %rax
        jbe     2f
1:      mov     %rcx, %rax
2:      mov     %rax, P_FILL_PAGES(%r13)
        mov     P_ARG_WS(%r13), %rax
        shr     $12, %rax
        cmp     %rcx, %rax
        jbe     3f
        mov     %rcx, %rax
3:      mov     %rax, P_WS_PAGES(%r13)
        mov     P_NVCPUS(%r13), %rax
        test    %rax, %rax
        jnz     4f
        mov     $1, %eax
4:      cmp     $MAX_VCPUS, %rax
        jbe     5f
        mov     $MAX_VCPUS, %eax
5:      mov     %rax, P_NVCPUS(%r13)
        cmpq    $0, P_TSC_KHZ(%r13)
        jne     6f
        call    calibrate_tsc
        mov     %rax, P_TSC_KHZ(%r13)
6:      mov     P_TSC_KHZ(%r13), %rax
        xor     %edx, %edx
        mov     $1000, %ecx
        div     %rcx
        test    %rax, %rax
        jnz     7f
        mov     $1, %eax
7:      mov     %rax, P_TICKS_PER_US(%r13)      # rax = ticks per microsecond
        imul    $20000, %rax, %rcx              # behind by 20 ms: start afresh
        mov     %rcx, P_MAX_LAG(%r13)
        imul    $1000, %rax, %rcx               # wait only when 1 ms ahead
        mov     %rcx, P_SLEEP_MIN(%r13)
        movq    $10000, P_IDLE_US(%r13)
        movq    $GEN_TABLE_ADDR, P_GEN_TABLE(%r13)
        movq    $0, P_HOST_WRITES(%r13)
        # ticks per page = tsc_khz * 1000 * nvcpus / rate (0: as fast as possible)
        xor     %eax, %eax
        mov     P_ARG_RATE(%r13), %rcx
        test    %rcx, %rcx
        jz      8f
        mov     P_TSC_KHZ(%r13), %rax
        imul    $1000, %rax, %rax
        imul    P_NVCPUS(%r13), %rax
        xor     %edx, %edx
        div     %rcx
        test    %rax, %rax
        jnz     8f
        mov     $1, %eax
8:      mov     %rax, P_TICKS_PER_PAGE(%r13)
        # A zero generation table.
        mov     $GEN_TABLE_ADDR, %rdi
        mov     P_PAGES(%r13), %rcx
        shr     $1, %rcx
        xor     %eax, %eax
        rep stosq
        movabs  $0x3242504d564b4d4c, %rax       # "LMKVMPB2"
        mov     %rax, P_MAGIC(%r13)
        movq    $2, P_VERSION(%r13)
        # livemig-guest: boot memory=.. vcpus=.. data_pages=.. fill_pages=.. ws_pages=.. tsc_khz=..
        mov     $msg_boot, %rsi
        call    puts
        mov     P_PAGES(%r13), %rax
        shl     $12, %rax
        call    putdec
        mov     $msg_vcpus, %rsi
        call    puts
        mov     P_NVCPUS(%r13), %rax
        call    putdec
        mov     $msg_data, %rsi
        call    puts
        mov     P_PAGES(%r13), %rax
        sub     P_FIRST_PAGE(%r13), %rax
        call    putdec
        mov     $msg_fill, %rsi
        call    puts
        mov     P_FILL_PAGES(%r13), %rax
        call    putdec
        mov     $msg_ws, %rsi
        call    puts
        mov     P_WS_PAGES(%r13), %rax
        call    putdec
        mov     $msg_tsc, %rsi
        call    puts
        mov     P_TSC_KHZ(%r13), %rax
        call    putdec
        call    newline
        movq    $1, P_READY(%r13)
        ret
too_small:
        mov     $msg_too_small, %rsi
        call    puts
1:      pause
        jmp     1b

# %rax = the TSC's kHz, measured against the PIT (channel 2, 10 ms, through port 0x61).
calibrate_tsc:
        inb     $0x61, %al
        and     $0xfc, %al
        or      $0x01, %al                      # gate on, speaker off
        outb    %al, $0x61
        mov     $0xb0, %al                      # channel 2, lo/hi byte, mode 0
        outb    %al, $0x43
        mov     $(11932 & 0xff), %al            # 10 ms at 1.193182 MHz
        outb    %al, $0x42
        mov     $(11932 >> 8), %al
        outb    %al, $0x42
        call    now
        mov     %rax, %r9
        mov     $10000000, %ecx
1:      inb     $0x61, %al
        test    $0x20, %al
        jnz     2f
        dec     %ecx
        jnz     1b
        mov     $msg_no_pit, %rsi
        call    puts
        mov     $1000000, %eax                  # no PIT: assume 1 GHz
        ret
2:      call    now
        sub     %r9, %rax
        xor     %edx, %edx
        mov     $10, %ecx
        div     %rcx
        ret

# Console: every byte to COM1 (waiting for its transmitter, a bounded while) and port 0xe9.
putc:
        push    %rax
        push    %rcx
        push    %rdx
        mov     %al, %ah
        mov     $(COM1 + 5), %dx
        mov     $100000, %ecx
1:      inb     %dx, %al
        test    $0x20, %al
        jnz     2f
        pause
        dec     %ecx
        jnz     1b
2:      mov     %ah, %al
        mov     $COM1, %dx
        outb    %al, %dx
        outb    %al, $DEBUGCON
        pop     %rdx
        pop     %rcx
        pop     %rax
        ret

# The NUL-terminated string at %rsi.
puts:
        push    %rax
1:      movzbl  (%rsi), %eax
        test    %al, %al
        jz      2f
        call    putc
        inc     %rsi
        jmp     1b
2:      pop     %rax
        ret

newline:
        push    %rax
        mov     $'\n', %al
        call    putc
        pop     %rax
        ret

# %rax in decimal.
putdec:
        push    %rax
        push    %rcx
        push    %rdx
        push    %rsi
        sub     $32, %rsp
        lea     31(%rsp), %rsi
        movb    $0, (%rsi)
        mov     $10, %ecx
1:      xor     %edx, %edx
        div     %rcx
        add     $'0', %dl
        dec     %rsi
        mov     %dl, (%rsi)
        test    %rax, %rax
        jnz     1b
        call    puts
        add     $32, %rsp
        pop     %rsi
        pop     %rdx
        pop     %rcx
        pop     %rax
        ret

# %rax in hexadecimal with 0x.
puthex:
        push    %rax
        push    %rcx
        push    %rdx
        push    %rsi
        sub     $32, %rsp
        lea     31(%rsp), %rsi
        movb    $0, (%rsi)
1:      mov     %eax, %edx
        and     $15, %edx
        movzbl  hexdigits(%rdx), %edx
        dec     %rsi
        mov     %dl, (%rsi)
        shr     $4, %rax
        jnz     1b
        dec     %rsi
        movb    $'x', (%rsi)
        dec     %rsi
        movb    $'0', (%rsi)
        call    puts
        add     $32, %rsp
        pop     %rsi
        pop     %rdx
        pop     %rcx
        pop     %rax
        ret

# ---------------------------------------------------------------------------------------------
# Read-only data (the image never writes to itself).

        .section .rodata, "a"
        .balign 8
# null, kernel code 64 (0x08), kernel data (0x10), user data (0x18), user code 64 (0x20),
# then the pair SYSEXIT uses: user code 64 (0x28), user data (0x30).
gdt_image:
        .quad   0
        .quad   0x00af9b000000ffff
        .quad   0x00cf93000000ffff
        .quad   0x00cff3000000ffff
        .quad   0x00affb000000ffff
        .quad   0x00affb000000ffff
        .quad   0x00cff3000000ffff
gdt_image_end:
        .balign 8
gdt_ptr:
        .word   gdt_image_end - gdt_image - 1
        .long   GDT_ADDR
        .balign 8
idt_ptr:
        .word   0xfff
        .quad   IDT_ADDR

hexdigits:      .ascii "0123456789abcdef"
key_fill:       .asciz "fill="
key_ws:         .asciz "ws="
key_rate:       .asciz "rate="
key_report:     .asciz "report="
key_vcpus:      .asciz "vcpus="
key_tsc:        .asciz "tsc_khz="
key_pace:       .asciz "pace="
key_ring0:      .asciz "ring0"
cmd_verify:     .asciz "verify"
cmd_status:     .asciz "status"
msg_bad_magic:  .asciz "livemig-guest: error: no hvm_start_info (bad magic in %ebx)\n"
msg_bad_version: .asciz "livemig-guest: error: hvm_start_info version 0 has no memory map\n"
msg_bad_memmap: .asciz "livemig-guest: error: the memory map has no RAM above 1 MiB\n"
msg_too_small:  .asciz "livemig-guest: error: memory too small for the layout\n"
msg_no_pit:     .asciz "livemig-guest: warning: no PIT answer, assuming a 1 GHz TSC\n"
msg_boot:       .asciz "livemig-guest: boot memory="
msg_vcpus:      .asciz " vcpus="
msg_data:       .asciz " data_pages="
msg_fill:       .asciz " fill_pages="
msg_ws:         .asciz " ws_pages="
msg_tsc:        .asciz " tsc_khz="
msg_ready:      .asciz "livemig-guest: ready filled="
msg_counter:    .asciz "livemig-guest: counter="
msg_counter_sp: .asciz " counter="
msg_verify_ok:  .asciz "livemig-guest: verify ok pages="
msg_verify_bad_page: .asciz "livemig-guest: verify bad page="
msg_wrong:      .asciz " wrong="
msg_verify_bad_sum: .asciz "livemig-guest: verify bad sum="
msg_unknown:    .asciz "livemig-guest: unknown command "
