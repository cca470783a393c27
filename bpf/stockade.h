/* Shared maps, layouts and helpers for every Stockade BPF program (compiled by bcc).
 *
 * Maps are pinned under STK_PIN_DIR and shared by all program objects: the agent creates them
 * (bcc-free, see maps.py) and bcc's pinned tables re-use them, so policies survive a reload of
 * the programs and a restart of the agent. abi.py is the Python copy of every constant, layout
 * and hook number here; tests/test_bpf_abi.py compiles this header and checks it field by field.
 *
 * Per-container behaviour comes from stk_policies keyed by the container's cgroup id in the
 * unified hierarchy; a process whose cgroup is not below the Stockade parent cgroup
 * (stk_config.root_cgid) is never touched.
 */
#ifndef STOCKADE_H
#define STOCKADE_H

#ifndef STK_PIN_DIR
#define STK_PIN_DIR "/sys/fs/bpf/stockade"
#endif

#define STK_MAX_DEPTH 4      /* container cgroup may be at most this far below the parent */
#define STK_OBJ_LEN 128

/* stk_policy.flags */
#define STK_F_DENY_MOUNT        (1u << 0)
#define STK_F_PTRACE_OWN        (1u << 1)   /* ptrace only inside the own cgroup subtree */
#define STK_F_KILL_OWN          (1u << 2)   /* signals only inside the own cgroup subtree */
#define STK_F_DENY_USERNS       (1u << 3)
#define STK_F_DENY_MODULES      (1u << 4)   /* module request, kernel_read_file, load_data */
#define STK_F_DENY_BPF          (1u << 5)
#define STK_F_DENY_PERF         (1u << 6)
#define STK_F_DENY_MKNOD        (1u << 7)
#define STK_F_DENY_SYSCTL_WRITE (1u << 8)
#define STK_F_NO_EXEC_WRITABLE  (1u << 9)   /* exec only from read-only mounts */
#define STK_F_DENY_HOST_UNIX    (1u << 10)  /* unix connect only to sockets of the own subtree */
#define STK_F_EGRESS_DENY       (1u << 11)  /* egress default when no rule matches */
#define STK_F_EXEC_ALLOWLIST    (1u << 12)  /* exec only files listed with STK_ACC_EXEC allowed */
#define STK_F_EGRESS_TRIE       (1u << 13)  /* more egress rules than fit inline: they are in stk_net */

#define STK_NET_INLINE 16    /* egress rules kept inside the policy value (longest prefix first) */

#define STK_MODE_ENFORCE 0
#define STK_MODE_AUDIT   1

/* decisions written to events */
#define STK_DENIED  0
#define STK_AUDITED 1   /* audit mode: would have been denied, was allowed */

/* hooks named in events (abi.py HOOKS: the names, in this order) */
enum stk_hook {
    STK_H_SOCK_CREATE = 1, STK_H_CONNECT4, STK_H_CONNECT6, STK_H_SENDMSG4, STK_H_SENDMSG6,
    STK_H_SYSCTL, STK_H_DEVICE, STK_H_FILE_OPEN, STK_H_BPRM_CHECK, STK_H_SB_MOUNT,
    STK_H_MOVE_MOUNT, STK_H_SB_UMOUNT, STK_H_SB_PIVOTROOT, STK_H_PTRACE, STK_H_TASK_KILL,
    STK_H_USERNS_CREATE, STK_H_MODULE_REQUEST, STK_H_KERNEL_READ_FILE, STK_H_KERNEL_LOAD_DATA,
    STK_H_BPF, STK_H_PERF_EVENT_OPEN, STK_H_SOCKET_CREATE, STK_H_SOCKET_CONNECT,
    STK_H_SOCKET_BIND, STK_H_UNIX_STREAM_CONNECT, STK_H_INODE_MKNOD, STK_H_CAPABLE,
};

struct stk_config {
    u64 root_cgid;      /* id of the Stockade parent cgroup */
    u32 root_level;     /* its depth in the unified hierarchy (root = 0) */
    u32 alt_level;
    u64 alt_cgid;       /* a second parent, 0 if none: the cgroup kubelet puts its pods below */
};

/* One egress rule inside the policy value: address and mask in network byte order, IPv4 mapped
 * into IPv6 (::ffff:a.b.c.d), so one compare covers both families. */
struct stk_net_inline {
    u32 addr[4];        /* network address, already masked */
    u32 mask[4];
    u16 port_min;       /* host byte order; the rule applies to ports in [min, max] */
    u16 port_max;
    u32 action;         /* 0 allow, 1 deny */
};

struct stk_policy {
    u32 flags;
    u32 mode;
    u64 families;       /* bit n set: socket family n allowed */
    u64 cap_deny;       /* bit n set: capability n denied */
    u32 sock_type_deny; /* bit n set: socket type n (SOCK_RAW = 3, SOCK_PACKET = 10) denied */
    u16 bind_port_min;
    u16 bind_port_max;
    char container_id[64];
    char tenant[32];
    /* Egress rules, sorted by prefix length (longest first, at most one per network), so the
     * first match is the longest prefix: what the LPM trie would find, without its per-node
     * calls. Policies with more rules set STK_F_EGRESS_TRIE and keep all of them in stk_net. */
    u32 net_count;
    u32 pad;
    struct stk_net_inline net[STK_NET_INLINE];
};

/* network rules beyond STK_NET_INLINE: longest prefix over (cgroup id, IPv6 or v4-mapped address) */
struct stk_net_key {
    u32 prefixlen;      /* 64 + address prefix bits */
    u32 cgid_lo;
    u32 cgid_hi;
    u32 addr[4];
};

struct stk_net_rule {
    u32 action;         /* 0 allow, 1 deny */
    u16 port_min;       /* host byte order; the rule applies to ports in [min, max] */
    u16 port_max;
};

/* file rules: resolved to (device, inode) when the policy is installed */
struct stk_file_key {
    u64 cgid;
    u64 ino;
    u32 dev;
    u32 pad;
};

#define STK_ACC_READ  1
#define STK_ACC_WRITE 2
#define STK_ACC_EXEC  4

struct stk_file_rule {
    u32 deny;           /* STK_ACC_* denied */
    u32 allow;          /* STK_ACC_* allowed (exec allow-list) */
};

struct stk_event {
    u64 ts_ns;          /* CLOCK_MONOTONIC */
    u64 cgid;
    u32 pid;
    u32 hook;
    u32 decision;
    u32 family;
    u32 arg0;           /* port, socket type, capability, device major, flags ... */
    u32 arg1;           /* protocol, device minor, signal ... */
    u32 addr[4];
    char comm[16];
    char object[STK_OBJ_LEN];
};

/* bcc pinned tables: created by the agent before compiling, re-used here */
BPF_TABLE_PINNED("array", u32, struct stk_config, stk_config, 1, STK_PIN_DIR "/stk_config");
/* no preallocation: 4096 policies of 776 bytes would pin 3.4 MiB whether used or not */
BPF_TABLE_PINNED("hash", u64, struct stk_policy, stk_policies, 4096, STK_PIN_DIR "/stk_policies",
                 BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct stk_net_key, struct stk_net_rule, stk_net, 16384,
                 STK_PIN_DIR "/stk_net", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct stk_file_key, struct stk_file_rule, stk_files, 16384,
                 STK_PIN_DIR "/stk_files");

/* The event ring buffer, pinned like the tables (bcc's BPF_RINGBUF_OUTPUT cannot be pinned). */
struct stk_events_table_t {
    int key;
    u32 leaf;
    int (*ringbuf_output)(void *, u64, u64);
    void *(*ringbuf_reserve)(u64);
    void (*ringbuf_discard)(void *, u64);
    void (*ringbuf_submit)(void *, u64);
    u32 max_entries;
};
__attribute__((section("maps/ringbuf:" STK_PIN_DIR "/stk_events")))
struct stk_events_table_t stk_events = { .max_entries = 256 * 4096 };

/* The policy that governs the current task, or 0 outside containers.
 *
 * CHECK_ROOT (a constant at every call site): BPF-LSM hooks run for every task on the host, so
 * they first ask whether the task is below a Stockade parent at all, the cheapest exit for host
 * processes. There are at most two parents: the runtime's own, and the one kubelet puts its pods
 * below (/kubepods) once the CRI server has a pod there. cgroup programs are attached to the
 * parents and run only for sockets created below them; with one parent they skip the check.
 * Either way a task is governed only through a registered cgroup at most STK_MAX_DEPTH levels
 * below its parent, and the outermost one wins (a container cannot shed its policy by
 * nesting): the walk starts with the parent's direct child, the container's cgroup in the
 * runtime's layout, so a container costs one helper call and one hash lookup; each level in
 * between (a pod, kubelet's QoS class) costs one more of each. */
static __always_inline struct stk_policy *stk_policy_lookup(u64 *cgid, const int check_root)
{
    u32 zero = 0;
    struct stk_config *cfg = stk_config.lookup(&zero);
    if (!cfg || !cfg->root_cgid)
        return 0;
    u32 level = cfg->root_level;
    if ((check_root || cfg->alt_cgid) && bpf_get_current_ancestor_cgroup_id(level) != cfg->root_cgid) {
        level = cfg->alt_level;
        if (!cfg->alt_cgid || bpf_get_current_ancestor_cgroup_id(level) != cfg->alt_cgid)
            return 0;
    }
#pragma unroll
    for (int i = 1; i <= STK_MAX_DEPTH; i++) {
        u64 id = bpf_get_current_ancestor_cgroup_id(level + i);
        if (!id)
            return 0;
        struct stk_policy *p = stk_policies.lookup(&id);
        if (p) {
            *cgid = id;
            return p;
        }
    }
    return 0;
}

static __always_inline struct stk_policy *stk_policy_of(u64 *cgid)
{
    return stk_policy_lookup(cgid, 1);
}

/* Egress verdict for ADDR (IPv6 or v4-mapped, network byte order) and PORT (host order): 1 deny.
 * The longest matching prefix decides; when its port range does not cover PORT, the policy's
 * default applies (no fallback to a shorter prefix), exactly as with the LPM trie. */
static __always_inline int stk_egress_denied(struct stk_policy *p, u64 cgid, const u32 *addr, u32 port)
{
    int deny = (p->flags & STK_F_EGRESS_DENY) != 0;
    if (p->flags & STK_F_EGRESS_TRIE) {
        struct stk_net_key key = {};
        key.prefixlen = 64 + 128;
        key.cgid_lo = (u32)cgid;
        key.cgid_hi = (u32)(cgid >> 32);
        key.addr[0] = addr[0];
        key.addr[1] = addr[1];
        key.addr[2] = addr[2];
        key.addr[3] = addr[3];
        struct stk_net_rule *r = stk_net.lookup(&key);
        if (r && port >= r->port_min && port <= r->port_max)
            deny = r->action != 0;
        return deny;
    }
    u32 n = p->net_count;
    u32 a0 = addr[0], a1 = addr[1], a2 = addr[2], a3 = addr[3];
    u32 lo = 1, hi = 0, action = 0;   /* no match: an empty port range */
    /* Unrolled by hand (clang keeps a loop with an early exit rolled): constant offsets into
     * the value, which older verifiers (6.1) need to prove every rule access in bounds. */
#define STK_RULE(i)                                                                          \
    if (i >= n)                                                                              \
        goto matched;                                                                        \
    if (!(((a0 & p->net[i].mask[0]) ^ p->net[i].addr[0]) |                                  \
          ((a1 & p->net[i].mask[1]) ^ p->net[i].addr[1]) |                                  \
          ((a2 & p->net[i].mask[2]) ^ p->net[i].addr[2]) |                                  \
          ((a3 & p->net[i].mask[3]) ^ p->net[i].addr[3]))) {                                \
        lo = p->net[i].port_min;                                                             \
        hi = p->net[i].port_max;                                                             \
        action = p->net[i].action;                                                           \
        goto matched;                                                                        \
    }
    STK_RULE(0) STK_RULE(1) STK_RULE(2) STK_RULE(3) STK_RULE(4) STK_RULE(5) STK_RULE(6)
    STK_RULE(7) STK_RULE(8) STK_RULE(9) STK_RULE(10) STK_RULE(11) STK_RULE(12) STK_RULE(13)
    STK_RULE(14) STK_RULE(15)
#undef STK_RULE
    _Static_assert(STK_NET_INLINE == 16, "one STK_RULE per inline rule");
matched:
    if (port >= lo && port <= hi)
        deny = action != 0;
    return deny;
}

/* Start an event record (0 when the ring is full: the decision still stands). */
static __always_inline struct stk_event *stk_event_new(struct stk_policy *p, u64 cgid, u32 hook)
{
    struct stk_event *e = stk_events.ringbuf_reserve(sizeof(struct stk_event));
    if (!e)
        return 0;
    __builtin_memset(e, 0, sizeof(*e));
    e->ts_ns = bpf_ktime_get_ns();
    e->cgid = cgid;
    e->pid = bpf_get_current_pid_tgid() >> 32;
    e->hook = hook;
    e->decision = p->mode == STK_MODE_AUDIT ? STK_AUDITED : STK_DENIED;
    bpf_get_current_comm(e->comm, sizeof(e->comm));
    return e;
}

static __always_inline void stk_event_send(struct stk_event *e)
{
    if (e)
        stk_events.ringbuf_submit(e, 0);
}

/* Log a decision on a destination address (ADDR: v4 mapped into v6, network byte order). */
static __always_inline void stk_addr_event(struct stk_policy *p, u64 cgid, u32 hook, u32 family,
                                           u32 port, const u32 *addr)
{
    struct stk_event *e = stk_event_new(p, cgid, hook);
    if (!e)
        return;
    e->family = family;
    e->arg0 = port;
    e->addr[0] = addr[0];
    e->addr[1] = addr[1];
    e->addr[2] = addr[2];
    e->addr[3] = addr[3];
    stk_event_send(e);
}

/* Emit a plain event and say whether to deny (audit mode logs and lets it pass). */
static __always_inline int stk_refuse(struct stk_policy *p, u64 cgid, u32 hook, u32 arg0, u32 arg1)
{
    struct stk_event *e = stk_event_new(p, cgid, hook);
    if (e) {
        e->arg0 = arg0;
        e->arg1 = arg1;
        stk_event_send(e);
    }
    return p->mode != STK_MODE_AUDIT;
}

#endif
