/* Syscall recorder for `stockade profile record` and `stockade profile test` (bcc, raw tracepoints).
 *
 * Counts the syscalls made by the tasks of one cgroup (STK_CGROUP_ID, the cgroup2 id of the sandbox).
 * Counting starts (the `armed` flag) when the user space arms it, or with STK_ARM_ON_EXEC at the first
 * execve/execveat in that cgroup, or with STK_ARM_ON_SECCOMP right after the first seccomp() call in
 * it: the sandbox installs a permissive filter as its last set-up step, exactly where the real filter
 * goes, so the runtime's own set-up is left out and everything from the filter's installation on (the
 * final execve, the dynamic loader) is in.
 *
 * With STK_DENIALS it also counts syscalls a seccomp filter refused: the kernel runs seccomp before
 * the sys_enter tracepoint, so a refused syscall shows a sys_exit with an error and no sys_enter.
 */
#include <uapi/linux/ptrace.h>

BPF_HASH(counts, u32, u64, 1024);
BPF_ARRAY(armed, u32, 1);

#ifdef STK_DENIALS
BPF_HASH(entered, u32, u32, 65536);  /* tid -> syscall nr that passed the filter */
BPF_HASH(denied, u32, u64, 1024);
#endif

static __always_inline int stk_is_armed(u32 nr)
{
    int zero = 0;
    u32 *on = armed.lookup(&zero);
    if (!on)
        return 0;
    if (*on)
        return 1;
#if defined(STK_ARM_ON_EXEC)
    if (nr != STK_NR_EXECVE && nr != STK_NR_EXECVEAT)
        return 0;
#elif defined(STK_ARM_ON_SECCOMP)
    if (nr == STK_NR_SECCOMP)
        *on = 1;
    return 0; /* the seccomp() call itself is the sandbox's, not the program's */
#else
    return 0;
#endif
    *on = 1;
    return 1;
}

RAW_TRACEPOINT_PROBE(sys_enter)
{
    if (bpf_get_current_cgroup_id() != STK_CGROUP_ID)
        return 0;
    u32 nr = (u32)ctx->args[1];
    if (!stk_is_armed(nr))
        return 0;
    u64 zero = 0;
    u64 *count = counts.lookup_or_try_init(&nr, &zero);
    if (count)
        __sync_fetch_and_add(count, 1);
#ifdef STK_DENIALS
    u32 tid = (u32)bpf_get_current_pid_tgid();
    entered.update(&tid, &nr);
#endif
    return 0;
}

#ifdef STK_DENIALS
RAW_TRACEPOINT_PROBE(sys_exit)
{
    if (bpf_get_current_cgroup_id() != STK_CGROUP_ID)
        return 0;
    int zero = 0;
    u32 *on = armed.lookup(&zero);
    if (!on || !*on)
        return 0;
    long ret = (long)ctx->args[1];
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    long nr_long = -1;
    bpf_probe_read_kernel(&nr_long, sizeof(nr_long), &regs->orig_ax);
    u32 nr = (u32)nr_long;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    u32 *seen = entered.lookup(&tid);
    int passed = seen && *seen == nr;
    entered.delete(&tid);
    /* a new child's first return (from fork/clone, value 0) has no matching entry: not a denial */
    if (passed || ret >= 0 || ret < -4095)
        return 0;
    u64 init = 0;
    u64 *count = denied.lookup_or_try_init(&nr, &init);
    if (count)
        __sync_fetch_and_add(count, 1);
    return 0;
}
#endif
