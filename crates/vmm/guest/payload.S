# livemig's KVM guest payload: dirties a working set with checkable pages.
#
# Assembled by build.rs (`as --64`, then `objcopy -O binary`) into a flat binary that the host
# loads at CODE_ADDR. The host enters it in 64-bit mode with an identity map of all guest
# memory, `%rdi` = the vCPU's index, and interrupts off. It uses no stack, no interrupts and no
# privileged instruction other than `out` (allowed in ring 3 by IOPL=3), so it runs the same in
# ring 3 (native speed on the nested hosts livemig is tested on) and in ring 0.
#
# The addresses and offsets below are mirrored in src/kvm/layout.rs; keep them in sync.
#
# Writing page p (absolute page number, address p * 4096) to generation g = gen_table[p] + 1:
#   1. slot.page = p, slot.gen = g, slot.count_at = slot.counter, then slot.busy = 1
#   2. words 0..512 of the page, in ascending order, per crates/vmm/src/pattern.rs:
#      w0 = TAG | g, w1 = p, wi = base ^ (i * K) with base = mix(p << 32 | g)
#   3. gen_table[p] = g
#   4. slot.counter = slot.count_at + 1
#   5. slot.busy = 0
# so that, whenever the vCPU stops, the host can tell exactly what every page must hold.

        .equ PARAMS,            0x3000
        .equ P_NVCPUS,          0x10
        .equ P_FIRST_PAGE,      0x18
        .equ P_WS_PAGES,        0x20
        .equ P_TICKS_PER_PAGE,  0x28
        .equ P_REPORT_EVERY,    0x30
        .equ P_GEN_TABLE,       0x38
        .equ P_MAX_LAG,         0x48
        .equ P_SLEEP_MIN,       0x50
        .equ P_TICKS_PER_US,    0x58
        .equ P_IDLE_US,         0x60
        .equ SLOTS,             0x3100
        .equ SLOT_SHIFT,        6
        .equ S_COUNTER,         0x00
        .equ S_BUSY,            0x08
        .equ S_PAGE,            0x10
        .equ S_GEN,             0x18
        .equ S_COUNT_AT,        0x20
        .equ S_CURSOR,          0x28
        .equ S_DEADLINE,        0x30

        .equ PORT_BOOT,         0x510
        .equ PORT_PROGRESS,     0x511
        .equ PORT_SLEEP,        0x512

        .code64
        .text
        .globl _start
_start:
        mov     %rdi, %r15                      # r15 = vCPU index
        mov     %rdi, %r14
        shl     $SLOT_SHIFT, %r14
        add     $SLOTS, %r14                    # r14 = this vCPU's slot
        mov     $PARAMS, %r13                   # r13 = parameter block
        movabs  $0x9e3779b97f4a7c15, %r8        # r8 = K
        mov     $PORT_BOOT, %dx
        mov     %r15d, %eax
        out     %eax, (%dx)
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
        # Nothing to write for this vCPU: ask the host to sleep a while.
        mov     P_IDLE_US(%r13), %rax
        mov     $PORT_SLEEP, %dx
        out     %eax, (%dx)
        jmp     main_loop

have_page:
        add     P_FIRST_PAGE(%r13), %rax
        mov     %rax, %r12                      # r12 = page number
        mov     P_GEN_TABLE(%r13), %rbx         # rbx = generation table
        mov     (%rbx,%r12,4), %r11d
        inc     %r11d                           # r11 = new generation
        # 1. announce the write
        mov     %r12, S_PAGE(%r14)
        mov     %r11, S_GEN(%r14)
        mov     S_COUNTER(%r14), %rax
        mov     %rax, S_COUNT_AT(%r14)
        movq    $1, S_BUSY(%r14)
        # base = mix(page << 32 | gen)
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
        xor     %rdx, %rax                      # rax = base
        # 2. the page, word 0 first
        mov     %r12, %rdi
        shl     $12, %rdi                       # rdi = page address
        movabs  $0x4c4d504700000000, %rdx       # TAG "LMPG"
        or      %r11, %rdx
        mov     %rdx, (%rdi)
        mov     %r12, 8(%rdi)
        mov     $2, %ecx
        lea     (%r8,%r8), %rsi                 # rsi = i * K
1:
        mov     %rax, %rdx
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
        incq    S_CURSOR(%r14)

        # Progress report every report_every pages (0: never).
        mov     P_REPORT_EVERY(%r13), %rcx
        test    %rcx, %rcx
        jz      pace
        xor     %edx, %edx
        div     %rcx
        test    %rdx, %rdx
        jnz     pace
        mov     S_COUNTER(%r14), %rax
        mov     $PORT_PROGRESS, %dx
        out     %eax, (%dx)

pace:
        # Rate: deadline += ticks_per_page; when behind by more than max_lag, forget the debt;
        # while ahead by sleep_min ticks or more, ask the host to sleep (no spinning).
        mov     P_TICKS_PER_PAGE(%r13), %rcx
        test    %rcx, %rcx
        jz      main_loop
        mov     S_DEADLINE(%r14), %rsi
        add     %rcx, %rsi                      # rsi = deadline
        rdtsc
        shl     $32, %rdx
        or      %rdx, %rax                      # rax = now
        mov     %rax, %rdx
        sub     %rsi, %rdx                      # rdx = now - deadline (signed)
        cmp     P_MAX_LAG(%r13), %rdx
        jle     2f
        mov     %rax, %rsi                      # too far behind: restart the schedule
2:
        mov     %rsi, S_DEADLINE(%r14)
3:
        rdtsc
        shl     $32, %rdx
        or      %rdx, %rax                      # rax = now
        mov     %rsi, %rdx
        sub     %rax, %rdx                      # rdx = deadline - now (signed)
        cmp     P_SLEEP_MIN(%r13), %rdx
        jl      main_loop
        mov     %rdx, %rax
        xor     %edx, %edx
        divq    P_TICKS_PER_US(%r13)
        mov     $PORT_SLEEP, %dx
        out     %eax, (%dx)
        jmp     3b
